"""``PrecisionHooks``: mixed-precision emulation plugged into :func:`leantrain.train.fit`.

``fit(model, opt, loss_fn, data, ..., hooks=PrecisionHooks("fp16-scaled", recorder=Recorder()))``
emulates the policy in the model (:func:`leantrain.precision.emulate`), scales the loss when the
policy asks for loss scaling (:class:`LossScaler`: skipped steps are counted in
``History.skipped_steps``), applies the optional master-weight / optimizer-state rounding ablations
after each update, and advances the recorder's step. Its state (loss scale, stochastic-rounding
streams, recorder) is saved in ``fit``'s checkpoints, so a resumed run continues bit-identically.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from leantrain.numerics import quantize
from leantrain.precision.emulate import emulate, emulation_of
from leantrain.precision.instrument import Recorder
from leantrain.precision.operands import RandomStreams
from leantrain.precision.policy import FloatSpec, Policy, get_policy
from leantrain.precision.scaling import LossScaler
from leantrain.train import Hooks

__all__ = ["PrecisionHooks", "round_parameters", "round_optimizer_state"]


def _stream(spec: FloatSpec, streams: RandomStreams | None, device: torch.device, what: str) -> torch.Generator | None:
    if spec.rounding != "stochastic":
        return None
    if streams is None:
        raise ValueError(f"stochastic rounding of {what} needs streams= (a seeded RandomStreams, e.g. "
                         "emulation_of(model).streams): the global random generator is never used")
    return streams.get(device)


@torch.no_grad()
def round_parameters(model: nn.Module, spec: FloatSpec, streams: RandomStreams | None = None) -> None:
    """Round every floating parameter of ``model`` in place to ``spec`` (the stored-weight ablation:
    an update smaller than half an ulp of the weight is lost).

    Stochastic rounding draws from ``streams`` (one seeded generator per device, as the GEMM operands do), in
    parameter order, so a run is reproducible from its seed and checkpoint and leaves the global RNG alone.
    """
    for p in model.parameters():
        if p.is_floating_point():
            p.copy_(quantize(p, spec.format, spec.rounding, generator=_stream(spec, streams, p.device, "parameters")))


@torch.no_grad()
def round_optimizer_state(optimizer: torch.optim.Optimizer, spec: FloatSpec, streams: RandomStreams | None = None) -> None:
    """Round every floating, non-scalar optimizer state tensor (momentum, Adam moments) in place.

    Scalar state (step counters) stays as it is. Stochastic rounding draws from ``streams`` (seeded, one
    generator per device) in the optimizer's parameter-group order, never from the global RNG.
    """
    for group in optimizer.param_groups:
        for p in group["params"]:
            for v in optimizer.state.get(p, {}).values():
                if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() > 0:
                    gen = _stream(spec, streams, v.device, "optimizer state")
                    v.copy_(quantize(v, spec.format, spec.rounding, generator=gen))


class PrecisionHooks(Hooks):
    """:class:`leantrain.train.Hooks` that train under a precision :class:`Policy`.

    Args:
        policy: a :class:`Policy` or a policy name.
        recorder: optional :class:`Recorder` for rounding statistics.
        scaler: a :class:`LossScaler`; default: one built from ``policy.loss_scaling`` when the policy
            has loss scaling, else none.
        seed: seed of the stochastic-rounding streams.
        allow_unsupported: passed to :func:`emulate`.
    """

    def __init__(self, policy: str | Policy, *, recorder: Recorder | None = None, scaler: LossScaler | None = None,
                 seed: int = 0, allow_unsupported: Iterable[str | type] = ()) -> None:
        self.policy = get_policy(policy)
        self.recorder = recorder
        if scaler is None and self.policy.loss_scaling is not None:
            scaler = LossScaler.from_config(self.policy.loss_scaling)
        self.scaler = scaler
        self.seed = seed
        self.allow_unsupported = list(allow_unsupported)
        self.model: nn.Module | None = None
        self._pending_streams: dict[str, Any] | None = None

    def wrap(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[nn.Module, torch.optim.Optimizer]:
        emulate(model, self.policy, recorder=self.recorder, seed=self.seed, allow_unsupported=self.allow_unsupported)
        if self._pending_streams is not None:
            emulation_of(model).streams.load_state_dict(self._pending_streams)  # type: ignore[union-attr]
            self._pending_streams = None
        self.model = model
        return model, optimizer

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale_loss(loss) if self.scaler is not None else loss).backward()

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        if self.scaler is not None:
            taken = self.scaler.step(optimizer)
        else:
            optimizer.step()
            taken = True
        if taken and self.model is not None:
            streams = emulation_of(self.model).streams  # type: ignore[union-attr]
            if self.policy.master_weights is not None:
                round_parameters(self.model, self.policy.master_weights, streams)
            if self.policy.optimizer_state is not None:
                round_optimizer_state(optimizer, self.policy.optimizer_state, streams)
        if self.recorder is not None:
            self.recorder.next_step()
        return taken

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"policy": self.policy.name}
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        if self.recorder is not None:
            state["recorder"] = self.recorder.state_dict()
        emu = emulation_of(self.model) if self.model is not None else None
        if emu is not None:
            state["streams"] = emu.streams.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        if state.get("policy") not in (None, self.policy.name):
            raise ValueError(f"checkpoint was written under policy {state['policy']!r}, resuming with {self.policy.name!r}")
        if "scaler" in state and self.scaler is not None:
            self.scaler.load_state_dict(state["scaler"])
        if "recorder" in state and self.recorder is not None:
            self.recorder.load_state_dict(state["recorder"])
        if "streams" in state:
            emu = emulation_of(self.model) if self.model is not None else None
            if emu is not None:
                emu.streams.load_state_dict(state["streams"])
            else:
                self._pending_streams = state["streams"]
