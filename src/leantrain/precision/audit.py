"""Coverage audit: every GEMM of one training step, counted per kind, and any that ran unrounded.

:func:`audit` runs one forward and backward pass of an emulated copy of the model under two observers:

- the emulating autograd functions report each GEMM they run (kind ``parameter`` / ``activation`` /
  ``embedding``; ``forward``, ``backward_data``, ``backward_weight``), and whether the policy rounds its inputs;
- a ``TorchDispatchMode`` sees every aten GEMM operator below autograd (``mm``, ``addmm``, ``bmm``,
  ``baddbmm``, ``convolution``, ``convolution_backward``, fused attention and recurrent kernels, ...). One that
  runs while no emulating function is running is a GEMM leantrain did not route: it ran on unrounded FP32
  operands. It is reported with its operator, the module that was running and the pass (forward, or the
  backward node).
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from leantrain.precision import intercept
from leantrain.precision.emulate import emulate, emulation_of
from leantrain.precision.policy import Policy

__all__ = ["GemmAudit", "audit", "is_gemm_op"]

_GEMM_OPS = {"mm", "addmm", "bmm", "baddbmm", "addbmm", "mv", "addmv", "dot", "vdot", "matmul", "linear",
             "convolution", "convolution_backward", "_convolution", "conv_tbc", "_int_mm", "_addmm_activation",
             "_native_multi_head_attention", "_transformer_encoder_layer_fwd", "lstm", "gru", "rnn_tanh", "rnn_relu",
             "bilinear", "einsum", "tensordot", "inner"}
_GEMM_PREFIXES = ("_scaled_dot_product", "_flash_attention", "_efficient_attention", "mkldnn_rnn", "_cudnn_rnn",
                  "miopen_rnn", "_thnn_fused", "cudnn_convolution", "miopen_convolution", "mkldnn_convolution",
                  "slow_conv", "_slow_conv", "thnn_conv", "_conv_depthwise", "conv_depthwise", "_cdist", "_euclidean",
                  "mkldnn_linear", "_mkldnn", "_nnpack")


def is_gemm_op(name: str) -> bool:
    """Whether the aten operator ``name`` (overload packet name, e.g. ``"addmm"``) runs a matrix product."""
    return name in _GEMM_OPS or name.startswith(_GEMM_PREFIXES)


@dataclass
class GemmAudit:
    """The GEMMs of one training step. ``emulated[kind][gemm]``: GEMMs run by leantrain's emulating functions
    (kind ``parameter``/``activation``/``embedding``, gemm ``forward``/``backward_data``/``backward_weight``);
    ``fp32_by_policy[kind][gemm]``: those among them whose inputs the policy leaves FP32; ``unrounded``:
    ``"op in module (pass)"`` -> count of aten GEMMs that ran outside any emulating function."""

    policy: str
    emulated: dict[str, dict[str, int]] = field(default_factory=dict)
    fp32_by_policy: dict[str, dict[str, int]] = field(default_factory=dict)
    unrounded: dict[str, int] = field(default_factory=dict)

    @property
    def total_emulated(self) -> int:
        return sum(sum(v.values()) for v in self.emulated.values())

    @property
    def total_unrounded(self) -> int:
        return sum(self.unrounded.values())

    def to_dict(self) -> dict[str, Any]:
        return {"policy": self.policy, "emulated": self.emulated, "fp32_by_policy": self.fp32_by_policy,
                "unrounded": self.unrounded, "total_emulated": self.total_emulated,
                "total_unrounded": self.total_unrounded}

    def describe(self) -> str:
        rows = ["| kind | forward | backward_data | backward_weight | of which FP32 by policy |", "|---|---|---|---|---|"]
        for kind in intercept.KINDS:
            c = self.emulated.get(kind, {})
            f = sum(self.fp32_by_policy.get(kind, {}).values())
            rows.append(f"| {kind} | {c.get('forward', 0)} | {c.get('backward_data', 0)} | "
                        f"{c.get('backward_weight', 0)} | {f} |")
        lines = [f"GEMMs of one training step under policy `{self.policy}`", "", *rows, ""]
        if self.unrounded:
            lines.append(f"{self.total_unrounded} GEMM(s) ran UNROUNDED (not routed by leantrain):")
            lines += [f"- {k}: {v}" for k, v in sorted(self.unrounded.items())]
        else:
            lines.append("0 GEMMs ran unrounded.")
        return "\n".join(lines)


class _AtenGemms(TorchDispatchMode):
    def __init__(self, found: dict[str, int], running: Callable[[], str]) -> None:
        super().__init__()
        self.found, self.running = found, running

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = func.overloadpacket.__name__
        if is_gemm_op(name) and intercept.current_gemm() is None:
            node = torch._C._current_autograd_node()
            where = f"backward ({node.name()})" if node is not None else "forward"
            self.found[f"{name} in {self.running()} ({where})"] += 1
        return func(*args, **(kwargs or {}))


def _random_projection(out: Any, gen: torch.Generator) -> torch.Tensor:
    """``sum <out_i, r_i>`` over the floating tensors of ``out`` (nested tuples/lists/dicts, HF ModelOutput) with
    fixed random ``r_i``: a scalar whose gradient reaches every parameter that influences any output."""
    if isinstance(out, torch.Tensor):
        if not out.is_floating_point() or not out.requires_grad:
            return torch.zeros(())
        r = torch.randn(out.shape, generator=gen, dtype=out.dtype).to(out.device)
        return (out * r).sum()
    items = out.values() if isinstance(out, dict) else out if isinstance(out, list | tuple) else ()
    total = torch.zeros(())
    for o in items:
        total = total + _random_projection(o, gen)
    return total


def audit(model: nn.Module, *inputs: Any, policy: str | Policy | None = "bf16",
          loss_fn: Callable[[Any], torch.Tensor] | None = None, allow_unsupported: Any = (),
          **kwargs: Any) -> GemmAudit:
    """Count the GEMMs of one training step of ``model`` on ``inputs`` (``model(*inputs, **kwargs)``), on a deep
    copy emulated under ``policy`` (``policy=None``: ``model`` must be emulated already; its copy keeps its
    emulation). The loss is ``loss_fn(output)``, or by default a fixed random projection of every floating
    output. ``model`` itself is not changed (no gradients, no statistics)."""
    m = copy.deepcopy(model)
    if policy is not None:
        emulate(m, policy, allow_unsupported=allow_unsupported)
    emu = emulation_of(m)
    if emu is None:
        raise ValueError("policy=None audits an emulated model; this model is not emulated (pass policy=...)")
    result = GemmAudit(emu.policy.name)
    emulated: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    fp32: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    unrounded: dict[str, int] = defaultdict(int)

    def count(L: intercept.GemmNumerics, gemms: tuple[str, ...]) -> None:
        for g in gemms:
            emulated[L.kind][g] += 1
            if not L.policy.gemms()[g].rounds:
                fp32[L.kind][g] += 1

    def running() -> str:
        return (emu._stack[-1][0] or "<root>") if emu._stack else "<outside the model>"

    intercept._counter.append(count)
    try:
        with _AtenGemms(unrounded, running):
            out = m(*inputs, **kwargs)
            loss = loss_fn(out) if loss_fn is not None else _random_projection(out, torch.Generator().manual_seed(0))
            loss.backward()
    finally:
        intercept._counter.remove(count)
    result.emulated = {k: dict(v) for k, v in emulated.items()}
    result.fp32_by_policy = {k: dict(v) for k, v in fp32.items()}
    result.unrounded = dict(unrounded)
    return result
