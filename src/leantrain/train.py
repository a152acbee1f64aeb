"""One plain, reusable training loop with atomic checkpoints and bit-identical resume.

:func:`fit` trains ``model`` with any ``torch.optim`` optimizer on a map-style dataset, evaluates
at the end of each epoch, and keeps a metrics :class:`History`. The precision and distributed
layers plug in through :class:`Hooks` (wrap the model/optimizer, replace ``backward`` and
``step``), never by editing the loop.

Determinism and resume. The sample order of epoch ``e`` is
``torch.randperm(n, generator=Generator().manual_seed(derive_seed(seed, e)))``: it depends only
on ``(seed, epoch)``. A checkpoint (written atomically every ``checkpoint_every`` optimizer
steps and at the end) stores the model, optimizer, hooks state, epoch, position in the epoch,
history and the torch/numpy/python RNG states. Resuming restores all of them and skips the
batches already seen, so the continuation is bit-identical to an uninterrupted run (on the same
device and thread count; floating-point reductions may differ across thread counts).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from leantrain.seeds import derive_seed
from leantrain.storage import load_torch, remove_stale_temporaries, save_torch
from leantrain.validation import check_seed

__all__ = ["Hooks", "History", "CheckpointWriteError", "fit", "evaluate", "epoch_order", "batches", "accuracy_metric",
           "sequence_cross_entropy", "binary_cross_entropy", "loss_for_task"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Hooks:
    """Extension points of :func:`fit`; the default implementation is plain FP32 training.

    - ``wrap(model, optimizer) -> (model, optimizer)`` once before training (after resume);
    - ``backward(loss)`` instead of ``loss.backward()`` (e.g. loss scaling);
    - ``step(optimizer) -> bool`` instead of ``optimizer.step()``; returns False for a skipped step;
    - ``state_dict()`` / ``load_state_dict()`` are checkpointed with the model;
    - ``shard(batch) -> batch``: this process's part of each global batch (data parallelism);
    - ``writes_checkpoint() -> bool``: whether this process writes the checkpoint file (every process
      still builds the state, which may involve collectives; one writer keeps the file consistent).
    """

    def wrap(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, torch.optim.Optimizer]:
        return model, optimizer

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        optimizer.step()
        return True

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None

    def shard(self, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return batch

    def writes_checkpoint(self) -> bool:
        return True


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed (full disk, permission, ...); ``history`` holds the run's metrics so far.

    An ``OSError`` with the original errno, reason and the checkpoint's path, so callers that
    catch ``OSError`` keep working; the history lets them save the run's metrics elsewhere.
    """

    def __init__(self, cause: OSError, path: Path, history: History) -> None:
        super().__init__(cause.errno, f"cannot write checkpoint ({cause.strerror or cause})", str(path))
        self.history = history


@dataclass
class History:
    """Metrics of a run: one row per evaluation (``evals``) and the loss of every step."""

    evals: list[dict[str, float]] = field(default_factory=list)
    step_loss: list[float] = field(default_factory=list)
    skipped_steps: int = 0

    def last(self, key: str) -> float:
        """The most recent evaluated value of ``key`` (e.g. ``"test_accuracy"``)."""
        for row in reversed(self.evals):
            if key in row:
                return row[key]
        raise KeyError(key)

    def series(self, key: str) -> list[float]:
        return [row[key] for row in self.evals if key in row]


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The sample order of ``epoch``: a permutation fixed by ``(seed, epoch)`` alone."""
    g = torch.Generator().manual_seed(derive_seed(seed, epoch))
    return torch.randperm(n, generator=g)


def batches(dataset: Dataset, order: torch.Tensor, batch_size: int, start: int = 0,
            drop_last: bool = False) -> Iterator[tuple[torch.Tensor, ...]]:
    """Yield the batches of ``dataset`` in ``order`` starting from batch index ``start``.

    A ``TensorDataset`` is indexed directly (fast path); any other map-style dataset goes through a
    ``DataLoader`` with the same batch indices and the default collate.
    """
    n = len(order)
    nb = n // batch_size if drop_last else (n + batch_size - 1) // batch_size
    index_lists = [order[b * batch_size:(b + 1) * batch_size] for b in range(start, nb)]
    if isinstance(dataset, TensorDataset):
        for idx in index_lists:
            yield tuple(t[idx] for t in dataset.tensors)
    else:
        loader = DataLoader(dataset, batch_sampler=[i.tolist() for i in index_lists])
        for batch in loader:
            yield tuple(batch)


def accuracy_metric(output: torch.Tensor, target: torch.Tensor) -> float:
    """Fraction of rows whose arg-max (or ``logit > 0`` for one output) equals ``target``."""
    if output.dim() == 1 or output.shape[-1] == 1:
        pred = (output.reshape(-1) > 0).long()
    else:
        pred = output.argmax(-1)
    return (pred == target.reshape(pred.shape)).float().mean().item()


def sequence_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over every position of (batch, time, vocab) logits and (batch, time) targets.

    In nats per token; bits per character = value / ln 2.
    """
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


def binary_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean ``binary_cross_entropy_with_logits`` of one logit per sample ((batch,) or (batch, 1)) vs 0/1 targets."""
    return nn.functional.binary_cross_entropy_with_logits(logits.reshape(-1), target.reshape(-1).to(logits.dtype))


def loss_for_task(task: str) -> LossFn:
    """The training loss of a :class:`~leantrain.data.DatasetInfo` task.

    ``classification``: cross-entropy of logits; ``binary``: :func:`binary_cross_entropy`;
    ``language``: :func:`sequence_cross_entropy`; ``regression``: mean squared error.
    """
    losses: dict[str, LossFn] = {
        "classification": nn.functional.cross_entropy,
        "binary": binary_cross_entropy,
        "language": sequence_cross_entropy,
        "regression": lambda out, y: nn.functional.mse_loss(out.reshape(y.shape), y),
    }
    if task not in losses:
        raise ValueError(f"task must be one of {sorted(losses)}, got {task!r}")
    return losses[task]


@torch.no_grad()
def evaluate(model: nn.Module, loss_fn: LossFn, dataset: Dataset, *, batch_size: int = 512,
             device: str | torch.device = "cpu", metric: Callable | None = accuracy_metric) -> dict[str, float]:
    """Mean loss (and ``metric``, default accuracy) of ``model`` in eval mode over ``dataset``.

    Every submodule's train/eval flag is restored afterwards (not just the top-level one: a
    model may deliberately hold some submodules, e.g. frozen BatchNorm, in eval mode).
    """
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    total, loss_sum, metric_sum = 0, 0.0, 0.0
    order = torch.arange(len(dataset))
    for x, y in batches(dataset, order, batch_size):
        x, y = x.to(device), y.to(device)
        out = model(x)
        k = len(y)
        loss_sum += loss_fn(out, y).item() * k
        if metric is not None:
            metric_sum += metric(out, y) * k
        total += k
    for m, mode in modes:
        m.training = mode
    res = {"loss": loss_sum / max(total, 1)}
    if metric is not None:
        res["accuracy"] = metric_sum / max(total, 1)
    return res


def _rng_state() -> dict[str, Any]:
    # numpy's state as plain data (its key array as a tensor): checkpoints hold tensors and plain data only.
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss))
    state = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def fit(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: LossFn,
    train: Dataset,
    *,
    epochs: int,
    batch_size: int,
    test: Dataset | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    hooks: Hooks | None = None,
    checkpoint: str | Path | None = None,
    checkpoint_every: int = 0,
    resume: bool = False,
    max_steps: int | None = None,
    eval_train: bool = True,
    metric: Callable | None = accuracy_metric,
    scheduler: Any | None = None,
    progress: bool = False,
    drop_last: bool = False,
    step_callback: Callable[[int, float], None] | None = None,
    model_spec: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    resume_overrides: dict[str, Any] | None = None,
) -> History:
    """Train ``model`` for ``epochs`` epochs (or ``max_steps`` optimizer steps, if reached first).

    Each evaluation row (end of every epoch) has ``epoch``, ``step``, ``train_loss`` (mean over the
    epoch's steps), ``test_loss``/``test_accuracy`` when ``test`` is given, and
    ``train_eval_loss``/``train_eval_accuracy`` (eval mode, whole training set) when
    ``eval_train``. ``model_spec`` (from :func:`leantrain.models.model_spec`) is stored in the
    checkpoint so :func:`leantrain.models.load_model` can rebuild the model; ``extra`` (a dict of
    plain data, see :func:`leantrain.storage.save_torch`; e.g. the data set's name) is stored beside
    it, see :func:`leantrain.models.checkpoint_extra`. ``checkpoint_every=N`` saves atomically every N
    steps; ``resume=True`` continues from ``checkpoint`` if it exists (bit-identically, see the module docstring).
    Resuming restores the optimizer's hyperparameters from the checkpoint; ``resume_overrides``
    (e.g. ``{"lr": 0.01}``) then replaces those param-group entries, a deliberate change of course.
    A checkpoint of another model or optimizer class is a ValueError naming the file. A failed
    checkpoint write raises :class:`CheckpointWriteError`, which carries the history so far.
    """
    check_seed("seed", seed)  # epoch orders are seeded with derive_seed(seed, epoch), which must fit 64 bits
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if checkpoint_every < 0:
        raise ValueError(f"checkpoint_every must be >= 0, got {checkpoint_every}")
    if (checkpoint_every or resume) and checkpoint is None:
        raise ValueError("checkpoint path is required with checkpoint_every > 0 or resume=True")
    if max_steps is not None and max_steps < 1:
        raise ValueError(f"max_steps must be None or >= 1, got {max_steps}")
    n = len(train)
    if n == 0:
        raise ValueError("train data set is empty")
    per_epoch = n // batch_size if drop_last else (n + batch_size - 1) // batch_size
    if per_epoch == 0:
        raise ValueError(f"batch_size {batch_size} > {n} samples with drop_last=True leaves no batch")
    hooks = hooks or Hooks()
    opt_class = type(optimizer).__name__  # before the hooks wrap it
    model.to(device)
    history = History()
    epoch, start_batch, step = 0, 0, 0
    ckpt_path = Path(checkpoint) if checkpoint is not None else None
    state = None
    if ckpt_path is not None:
        remove_stale_temporaries(ckpt_path.parent)  # a checkpoint write killed by SIGKILL left its temporary file
    if resume and ckpt_path is not None and ckpt_path.is_file():
        state = load_torch(ckpt_path, map_location=device)
        missing = [k for k in ("model", "optimizer", "epoch", "batch", "step", "history", "rng") if k not in state]
        if missing:
            raise ValueError(f"checkpoint {str(ckpt_path)!r} was not written by fit (missing {missing})")
        if state.get("batch_size", batch_size) != batch_size or state.get("n_train", n) != n:
            raise ValueError(f"checkpoint {str(ckpt_path)!r} was written with batch_size={state.get('batch_size')} on "
                             f"{state.get('n_train')} samples; resuming needs the same (got {batch_size}, {n})")
        saved_opt = state.get("optimizer_class")
        if saved_opt is not None and saved_opt != opt_class:
            raise ValueError(f"checkpoint {str(ckpt_path)!r} was written by a {saved_opt} optimizer; resuming it "
                             f"with {opt_class} is not possible (its state does not carry over)")
        try:
            model.load_state_dict(state["model"])
        except (RuntimeError, KeyError) as exc:
            raise ValueError(f"checkpoint {str(ckpt_path)!r} holds the weights of another model: "
                             f"{' '.join(str(exc).split())[:300]}") from exc
        if scheduler is not None and state.get("scheduler") is not None:
            scheduler.load_state_dict(state["scheduler"])
        hooks.load_state_dict(state.get("hooks", {}))
        epoch, start_batch, step = state["epoch"], state["batch"], state["step"]
        history = History(**state["history"])
        if start_batch and history.evals and history.evals[-1].get("epoch") == epoch + 1:
            history.evals.pop()  # the evaluation made when max_steps stopped inside this epoch; redone at its end
    else:
        torch.manual_seed(seed)
    # Checkpoints hold the unwrapped model's state (clean keys whatever the hooks wrap it in) and
    # the wrapped optimizer's (the one that actually steps).
    base_model = model
    model, optimizer = hooks.wrap(model, optimizer)
    if state is not None:
        try:
            optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError, RuntimeError) as exc:
            raise ValueError(f"checkpoint {str(ckpt_path)!r}: its optimizer state does not fit this optimizer "
                             f"({' '.join(str(exc).split())[:300]})") from exc
        for group in optimizer.param_groups:
            group.update(resume_overrides or {})
        _set_rng_state(state["rng"])  # last, so that nothing above consumes random numbers after it

    def save(ep: int, b: int) -> None:
        if ckpt_path is None:
            return
        record = {
            "model": base_model.state_dict(), "optimizer": optimizer.state_dict(),
            "batch_size": batch_size, "n_train": n, "extra": dict(extra or {}),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "hooks": hooks.state_dict(), "epoch": ep, "batch": b, "step": step,
            "history": {"evals": history.evals, "step_loss": history.step_loss,
                        "skipped_steps": history.skipped_steps},
            "rng": _rng_state(), "model_spec": model_spec, "optimizer_class": opt_class,
        }
        if hooks.writes_checkpoint():
            try:
                save_torch(ckpt_path, record)
            except OSError as exc:
                raise CheckpointWriteError(exc, ckpt_path, history) from exc

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=epochs * per_epoch, initial=epoch * per_epoch + start_batch, desc="train", leave=False)
    done = False
    position = (epoch, start_batch)
    while epoch < epochs and not done:
        model.train()
        order = epoch_order(n, seed, epoch)
        b = start_batch
        for batch in batches(train, order, batch_size, start_batch, drop_last):
            x, y = (t.to(device) for t in hooks.shard(batch)[:2])
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            hooks.backward(loss)
            if not hooks.step(optimizer):
                history.skipped_steps += 1
            if scheduler is not None:
                scheduler.step()
            step += 1
            b += 1
            lv = float(loss.detach())
            history.step_loss.append(lv)
            if step_callback is not None:
                step_callback(step, lv)
            if bar is not None:
                bar.update(1)
            # End-of-epoch checkpoints are written after the evaluation row, below.
            if checkpoint_every and step % checkpoint_every == 0 and b < per_epoch:
                save(epoch, b)
            if max_steps is not None and step >= max_steps:
                done = True
                break
        start_batch = 0
        row: dict[str, float] = {"epoch": epoch + 1, "step": step}
        # Over all of this epoch's b steps, including those before a resume (history.step_loss has them).
        this_epoch = history.step_loss[len(history.step_loss) - b:] if b else []
        row["train_loss"] = sum(this_epoch) / max(len(this_epoch), 1)
        if eval_train:
            for k, v in evaluate(model, loss_fn, train, device=device, metric=metric).items():
                row[f"train_eval_{k}"] = v
        if test is not None:
            for k, v in evaluate(model, loss_fn, test, device=device, metric=metric).items():
                row[f"test_{k}"] = v
        history.evals.append(row)
        if done and b < per_epoch:
            position = (epoch, b)  # stopped by max_steps inside the epoch: resume from here
        else:
            epoch += 1
            position = (epoch, 0)
        if checkpoint_every:
            save(*position)
    if bar is not None:
        bar.close()
    if ckpt_path is not None and not checkpoint_every:
        save(*position)
    return history
