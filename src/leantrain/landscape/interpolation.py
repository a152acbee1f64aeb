"""1-D parametric plot between two solutions (Goodfellow et al.; Keskar et al. arXiv:1609.04836, Figure 3).

For two models of the same architecture with states ``a`` and ``b`` (parameters *and* floating
buffers such as BatchNorm running statistics) and each ``alpha``::

    state(alpha) = (1 - alpha) * a + alpha * b

is loaded into a private copy of ``model_a`` and evaluated (eval mode, :func:`leantrain.train.evaluate`)
on every data set given: loss and accuracy. ``alpha = 0`` is ``a`` and ``alpha = 1`` is ``b``
exactly (``1 * a + 0 * b == a`` in floating point). Outside ``[0, 1]`` the extrapolated running
variances can turn negative; they are clamped at 0 (the count is reported per ``alpha`` in
``clamped``) so that BatchNorm stays defined. Integer buffers (``num_batches_tracked``), which do
not affect eval-mode outputs, are taken from ``a`` for ``alpha < 0.5`` and from ``b`` otherwise.
Neither model is modified.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from leantrain.landscape.surface import LossFn, as_dataset
from leantrain.train import accuracy_metric, evaluate

__all__ = ["Interpolation", "interpolate", "interpolated_state", "plot_interpolation", "DEFAULT_ALPHAS"]

#: The paper's range, a in [-1, 2], at the 25 points of its official script (read-only).
DEFAULT_ALPHAS = np.linspace(-1, 2, 25)
DEFAULT_ALPHAS.flags.writeable = False


@dataclass
class Interpolation:
    """Curves of :func:`interpolate`: ``curves[name]["loss" | "accuracy"][j]`` at ``alphas[j]``."""

    alphas: list[float]
    curves: dict[str, dict[str, list[float]]]
    clamped: list[int] = field(default_factory=list)
    labels: tuple[str, str] = ("a", "b")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _is_variance(key: str) -> bool:
    return key.endswith("running_var")


def interpolated_state(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor],
                       alpha: float) -> tuple[dict[str, torch.Tensor], int]:
    """``(1 - alpha) * a + alpha * b`` entry by entry; returns the state and the number of clamped variances."""
    out: dict[str, torch.Tensor] = {}
    clamped = 0
    for key, ta in a.items():
        tb = b[key]
        if ta.is_floating_point():
            t = (1.0 - alpha) * ta + alpha * tb
            if _is_variance(key):
                clamped += int((t < 0).sum())
                t = t.clamp_min(0.0)
            out[key] = t
        else:
            out[key] = (ta if alpha < 0.5 else tb).clone()
    return out, clamped


def _check_compatible(sa: Mapping[str, torch.Tensor], sb: Mapping[str, torch.Tensor]) -> None:
    if sa.keys() != sb.keys():
        diff = sorted(set(sa) ^ set(sb))[:5]
        raise ValueError(f"model_a and model_b must have the same architecture; state keys differ: {diff}")
    for k in sa:
        if sa[k].shape != sb[k].shape:
            raise ValueError(f"model_a and model_b must have the same architecture; {k!r} has shapes "
                             f"{tuple(sa[k].shape)} and {tuple(sb[k].shape)}")


def _named_data(data: Any) -> dict[str, Any]:
    if hasattr(data, "train") and hasattr(data, "test") and not isinstance(data, Mapping):
        return {"train": as_dataset(data.train, name="data.train"), "test": as_dataset(data.test, name="data.test")}
    if isinstance(data, Mapping):
        if not data:
            raise ValueError("data must name at least one data set")
        return {str(k): as_dataset(v, name=f"data[{k!r}]") for k, v in data.items()}
    return {"data": as_dataset(data)}


def interpolate(model_a: nn.Module, model_b: nn.Module, loss_fn: LossFn, data: Any,
                alphas: Sequence[float] | np.ndarray = DEFAULT_ALPHAS, *, batch_size: int = 1024,
                metric: Any = accuracy_metric, labels: tuple[str, str] = ("a", "b"),
                progress: bool = False) -> Interpolation:
    """Loss and accuracy along ``(1 - alpha) * a + alpha * b`` (see the module docstring).

    Args:
        data: a :class:`leantrain.data.Split` (curves ``train`` and ``test``), a mapping
            ``name -> dataset`` or one dataset (curve ``data``); datasets as in
            :func:`leantrain.landscape.surface.as_dataset`.
        alphas: the interpolation coefficients (the paper: 25 points in [-1, 2]).
        metric: ``metric(output, target) -> float`` (default accuracy); None for loss only.
        labels: names of ``a`` and ``b`` for the plot.
    """
    if not isinstance(model_a, nn.Module) or not isinstance(model_b, nn.Module):
        raise TypeError("model_a and model_b must be torch.nn.Module instances")
    alphas_arr = np.asarray(alphas, dtype=np.float64).reshape(-1)
    if alphas_arr.size == 0 or not np.isfinite(alphas_arr).all():
        raise ValueError("alphas must be a non-empty sequence of finite numbers")
    sa = {k: v.detach().clone() for k, v in model_a.state_dict().items()}
    device = next(iter(sa.values())).device if sa else torch.device("cpu")
    sb = {k: v.detach().to(device).clone() for k, v in model_b.state_dict().items()}
    _check_compatible(sa, sb)
    sets = _named_data(data)
    probe = copy.deepcopy(model_a)
    curves: dict[str, dict[str, list[float]]] = {name: {"loss": [], "accuracy": []} for name in sets}
    clamped: list[int] = []
    it: Any = alphas_arr
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(alphas_arr, desc="interpolate", leave=False)
    for alpha in it:
        state, c = interpolated_state(sa, sb, float(alpha))
        probe.load_state_dict(state)
        clamped.append(c)
        for name, ds in sets.items():
            res = evaluate(probe, loss_fn, ds, batch_size=batch_size, device=device, metric=metric)
            curves[name]["loss"].append(res["loss"])
            curves[name]["accuracy"].append(res.get("accuracy", float("nan")))
    return Interpolation(alphas=[float(a) for a in alphas_arr], curves=curves, clamped=clamped, labels=tuple(labels))


def plot_interpolation(result: Interpolation, path: str | Path, *, title: str = "") -> Path:
    """Write the parametric plot: loss (left axis, log scale) and accuracy (right axis) against alpha."""
    from leantrain.plots import save_figure, subplots

    fig, ax = subplots(figsize=(6.8, 4.4))
    ax2 = ax.twinx()
    styles = ["-", "--", ":", "-."]
    for i, (name, c) in enumerate(result.curves.items()):
        ls = styles[i % len(styles)]
        ax.plot(result.alphas, c["loss"], ls, color="tab:blue", label=f"{name} loss")
        if not all(np.isnan(c["accuracy"])):
            ax2.plot(result.alphas, c["accuracy"], ls, color="tab:red", label=f"{name} accuracy")
    ax.set_yscale("log")
    ax.set_xlabel(f"alpha  (0 = {result.labels[0]}, 1 = {result.labels[1]})")
    ax.set_ylabel("loss (log scale)", color="tab:blue")
    ax2.set_ylabel("accuracy", color="tab:red")
    for x0 in (0.0, 1.0):
        ax.axvline(x0, color="grey", lw=0.6, alpha=0.6)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=4, frameon=False)
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title)
    return save_figure(fig, path)
