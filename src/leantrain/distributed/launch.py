"""Starting processes: under ``torchrun`` (:func:`init_from_env`) or locally for tests and benchmarks (:func:`spawn`).

``torchrun --nproc-per-node N [--nnodes K --rdzv-endpoint HOST:PORT] -m leantrain train ... --dp`` sets
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; :func:`init_from_env` joins that
rendezvous with gloo (CPU) or NCCL (CUDA, one device per local rank). :func:`spawn` starts ``N`` fresh
processes on 127.0.0.1 with a free port, runs a picklable function in each, returns every rank's result and
never waits longer than its ``timeout_s``: a rank that dies or hangs makes it raise :class:`SpawnError` with
each rank's outcome.
"""

from __future__ import annotations

import datetime
import io
import os
import queue
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["free_port", "init_from_env", "is_launched", "spawn", "SpawnError", "default_backend"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def is_launched() -> bool:
    """True when this process was started by torchrun (or anything that sets RANK and WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def default_backend(device: str | torch.device = "cpu") -> str:
    """``"nccl"`` for CUDA devices when NCCL is built in, else ``"gloo"``."""
    if torch.device(device).type == "cuda" and dist.is_nccl_available():
        return "nccl"
    return "gloo"


def init_from_env(device: str = "cpu", *, backend: str | None = None, timeout_s: float = 300.0) -> tuple[int, int]:
    """Join the torchrun rendezvous (env://); returns ``(rank, world_size)``.

    Already initialized: returns the current rank and size. On CUDA each process uses device ``LOCAL_RANK``.
    """
    if not is_launched():
        raise ValueError("init_from_env needs RANK and WORLD_SIZE in the environment: start the program with torchrun")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    backend = backend or default_backend(device)
    if torch.device(device).type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    timeout = datetime.timedelta(seconds=timeout_s)
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # torchrun's agent keeps one store across restarts; the previous attempt's gloo addresses are still in
        # it, and a restarted rank may read a dead peer's address. A key prefix per attempt keeps them apart.
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        base = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                             timeout=timeout)
        store = dist.PrefixStore(f"leantrain/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", base)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    else:
        dist.init_process_group(backend, timeout=timeout)
    return dist.get_rank(), dist.get_world_size()


class SpawnError(RuntimeError):
    """Some rank of :func:`spawn` failed, died or timed out. ``outcomes[rank]`` is a one-line status per rank;
    ``errors[rank]`` the traceback text of a rank that raised (empty otherwise)."""

    def __init__(self, message: str, outcomes: list[str], errors: list[str]) -> None:
        super().__init__(message + "\n" + "\n".join(f"  rank {r}: {o}" for r, o in enumerate(outcomes)))
        self.outcomes, self.errors = outcomes, errors


def _entry(rank: int, world_size: int, port: int, backend: str, timeout_s: float, threads: int,
           fn: Callable[..., Any], args: tuple, results: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS=str(threads))
    torch.set_num_threads(threads)
    try:
        dist.init_process_group(backend, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
        value = fn(rank, world_size, *args)
        buf = io.BytesIO()
        torch.save(value, buf)  # bytes, not shared-memory tensors: the sender may exit before the parent reads
        results.put((rank, "ok", buf.getvalue()))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:
                pass


def spawn(fn: Callable[..., Any], world_size: int, args: tuple = (), *, backend: str = "gloo",
          timeout_s: float = 120.0, collective_timeout_s: float = 60.0, threads: int = 1) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` new processes joined in one process group.

    ``fn`` and ``args`` must be picklable (``fn`` defined at module level). Returns the ranks' return values
    in rank order. Raises :class:`SpawnError` when a rank raises, exits without a result, or the whole run
    exceeds ``timeout_s`` (the remaining processes are terminated, then killed). ``collective_timeout_s`` is the
    process group's timeout for any single collective.
    """
    import multiprocessing as mp

    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world_size, port, backend, collective_timeout_s, threads, fn, args,
                                              results), daemon=True) for r in range(world_size)]
    for p in procs:
        p.start()
    outcome: dict[int, tuple[str, Any]] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(outcome) < world_size:
            try:
                rank, status, payload = results.get(timeout=0.2)
                outcome[rank] = (status, payload)
                continue
            except queue.Empty:
                pass
            if time.monotonic() > deadline:
                break
            dead = [r for r, p in enumerate(procs) if r not in outcome and not p.is_alive()]
            if dead:
                # Give the queue a moment: a rank that finished may still be flushing its result.
                time.sleep(0.5)
                while not results.empty():
                    rank, status, payload = results.get()
                    outcome[rank] = (status, payload)
                for r in dead:
                    if r not in outcome:
                        outcome[r] = ("died", f"exited with code {procs[r].exitcode} without a result")
                # The survivors are expected to notice through their collective timeouts; keep waiting for them.
    finally:
        for p in procs:
            p.join(timeout=max(0.0, min(5.0, deadline - time.monotonic())))
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(timeout=2)
            if p.is_alive():
                p.kill()
                p.join(timeout=2)
    outcomes, errors, values = [], [], []
    failed = False
    for r in range(world_size):
        status, payload = outcome.get(r, ("timeout", f"no result within {timeout_s:g} s"))
        if status == "ok":
            outcomes.append("ok")
            errors.append("")
            # Not a user's file: the bytes come from our own child process through the result queue, which has
            # already unpickled the tuple that carries them; return values may be any picklable object.
            values.append(torch.load(io.BytesIO(payload), weights_only=False))
        else:
            failed = True
            text = payload if isinstance(payload, str) else str(payload)
            last = [ln for ln in text.strip().splitlines() if ln.strip()]
            outcomes.append(f"{status}: {last[-1] if last else ''}")
            errors.append(text if status == "error" else "")
            values.append(None)
    if failed:
        raise SpawnError(f"spawn of {world_size} ranks running {getattr(fn, '__name__', fn)} failed", outcomes, errors)
    return values
