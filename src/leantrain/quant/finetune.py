"""Low-precision fine-tuning: straight-through estimators with FP32 shadow weights (FGQ's recipe).

In training mode every :class:`~leantrain.quant.layers.QuantLayer` re-quantizes its FP32 shadow
weight at each forward pass with the layer's own grouping and solver, ``W_ste = W + (Q(W) -
W).detach()`` (identity gradient to ``W``), and its input goes through the calibrated activation
quantizer with the clipped straight-through estimator (zero gradient where a value saturated).
The optimizer updates the FP32 shadow weights; the integer codes follow them automatically. The
loop is :func:`leantrain.train.fit`. Activation scales stay as calibrated; residual edges that are
switched on stay on and are re-expanded from the updated weights.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from leantrain.quant.convert import QuantizedModel
from leantrain.train import History, fit

__all__ = ["finetune"]


def finetune(qmodel: QuantizedModel, data: Dataset | DataLoader, epochs: int, *, lr: float = 0.01, momentum: float = 0.9,
             weight_decay: float = 0.0, batch_size: int | None = None, optimizer: torch.optim.Optimizer | None = None,
             loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = nn.functional.cross_entropy,
             test: Dataset | None = None, seed: int = 0, device: str | torch.device = "cpu",
             progress: bool = False, **fit_kwargs: Any) -> History:
    """Train ``qmodel`` for ``epochs`` epochs through its quantizers (module docstring).

    ``data`` is a map-style Dataset or a DataLoader over one (its dataset and batch size are used;
    the sample order is leantrain's deterministic one). Default optimizer: SGD with momentum, a
    cosine learning-rate schedule over the run. Returns the :class:`~leantrain.train.History`.
    """
    if not isinstance(qmodel, QuantizedModel):
        raise TypeError(f"qmodel must be a QuantizedModel, got {type(qmodel).__name__}")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be an integer >= 1, got {epochs!r}")
    missing = [n for n, layer in qmodel.quant_layers().items() if layer.weight is None]
    if missing:
        raise ValueError(f"layers {missing} have no FP32 shadow weights (loaded from a packed file): fine-tune the "
                         "model returned by quantize_model instead")
    if isinstance(data, DataLoader):
        batch_size = batch_size or data.batch_size or 64
        data = data.dataset
    batch_size = batch_size or 64
    qmodel.set_mode("fake")
    params = [p for p in qmodel.parameters() if p.requires_grad]
    opt = optimizer or torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    steps = epochs * ((len(data) + batch_size - 1) // batch_size)  # type: ignore[arg-type]
    sched = None if optimizer is not None else torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
    hist = fit(qmodel, opt, loss_fn, data, epochs=epochs, batch_size=batch_size, test=test, seed=seed, device=device,
               scheduler=sched, progress=progress, eval_train=False, **fit_kwargs)
    qmodel.eval()
    return hist
