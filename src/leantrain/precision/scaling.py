"""Dynamic loss scaling for FP16 training: :class:`LossScaler`.

FP16's smallest subnormal is 2^-24 (about 6e-8): output gradients smaller than half of that round
to zero in the backward GEMMs. Loss scaling multiplies the loss by ``S`` before ``backward`` so that
every gradient is ``S`` times larger while it passes through the FP16 roundings, then divides the
FP32 parameter gradients by ``S`` before the update. The scale is chosen dynamically:

- a step whose unscaled gradients contain Inf or NaN is **skipped** (no optimizer update), counted
  in :attr:`LossScaler.skipped`, and the scale is multiplied by ``backoff_factor`` (0.5);
- after ``growth_interval`` (2000) consecutive finite steps the scale is multiplied by
  ``growth_factor`` (2).

These are the rules and defaults of ``torch.amp.GradScaler``; the implementation is plain tensor
code so it works with emulated FP16 on any device. Usage::

    scaler = LossScaler()
    for x, y in loader:
        optimizer.zero_grad()
        scaler.scale_loss(loss_fn(model(x), y)).backward()
        scaler.step(optimizer)           # unscale, skip on inf/NaN, update the scale
"""

from __future__ import annotations

import math
from typing import Any

import torch

from leantrain.precision.policy import DynamicLossScaling

__all__ = ["LossScaler"]


class LossScaler:
    """Dynamic (or, with ``dynamic=False``, static) loss scaling; see the module docstring.

    Attributes: ``scale`` (current factor), ``steps`` (optimizer steps taken), ``skipped`` (steps
    skipped for inf/NaN gradients), ``scale_history`` (scale after every :meth:`update`).
    """

    def __init__(self, init_scale: float = 2.0**16, growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 2000, *, dynamic: bool = True) -> None:
        DynamicLossScaling(init_scale, growth_factor, backoff_factor, growth_interval)  # validates the arguments
        self.scale = float(init_scale)
        self.growth_factor = float(growth_factor)
        self.backoff_factor = float(backoff_factor)
        self.growth_interval = int(growth_interval)
        self.dynamic = bool(dynamic)
        self.steps = 0
        self.skipped = 0
        self._good = 0
        self.scale_history: list[float] = []
        self._unscaled: set[int] = set()
        self._found: dict[int, bool] = {}

    @classmethod
    def from_config(cls, config: DynamicLossScaling) -> LossScaler:
        """A scaler with the parameters of a policy's :class:`DynamicLossScaling`."""
        return cls(config.init_scale, config.growth_factor, config.backoff_factor, config.growth_interval)

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss * scale`` (call ``.backward()`` on the result)."""
        return loss * self.scale

    @torch.no_grad()
    def unscale_(self, optimizer: torch.optim.Optimizer) -> bool:
        """Divide the gradients of ``optimizer``'s parameters by ``scale`` in place (once per step);
        returns True when any of them is Inf or NaN."""
        key = id(optimizer)
        if key in self._unscaled:
            return self._found[key]
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        found = False
        if grads:
            inv = 1.0 / self.scale
            torch._foreach_mul_(grads, inv)
            norms = torch._foreach_norm(grads, math.inf)
            found = not bool(torch.isfinite(torch.stack([n.float() for n in norms])).all())
        self._unscaled.add(key)
        self._found[key] = found
        return found

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """Unscale (if not done yet), then ``optimizer.step()`` unless a gradient is Inf/NaN; update
        the scale. Returns True when the step was taken, False when it was skipped."""
        found = self.unscale_(optimizer)
        if not found:
            optimizer.step()
        self.update(found)
        return not found

    def update(self, found_inf: bool) -> None:
        """Apply the grow/backoff rule after a step with (``found_inf=True``) or without non-finite gradients."""
        self._unscaled.clear()
        self._found.clear()
        if found_inf:
            self.skipped += 1
            self._good = 0
            if self.dynamic:
                self.scale *= self.backoff_factor
        else:
            self.steps += 1
            self._good += 1
            if self.dynamic and self._good >= self.growth_interval:
                self.scale *= self.growth_factor
                self._good = 0
        self.scale_history.append(self.scale)

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "growth_factor": self.growth_factor, "backoff_factor": self.backoff_factor,
                "growth_interval": self.growth_interval, "dynamic": self.dynamic, "steps": self.steps,
                "skipped": self.skipped, "good": self._good, "scale_history": list(self.scale_history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scale = float(state["scale"])
        self.growth_factor = float(state["growth_factor"])
        self.backoff_factor = float(state["backoff_factor"])
        self.growth_interval = int(state["growth_interval"])
        self.dynamic = bool(state["dynamic"])
        self.steps, self.skipped, self._good = int(state["steps"]), int(state["skipped"]), int(state["good"])
        self.scale_history = list(state["scale_history"])
