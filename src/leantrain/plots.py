"""Plot writing shared by experiments: matplotlib with the Agg backend, saved atomically."""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

os.environ.setdefault("MPLBACKEND", "Agg")

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from leantrain.storage import write_bytes  # noqa: E402

__all__ = ["save_figure", "curves", "plt"]


def save_figure(fig: plt.Figure, path: str | Path, *, dpi: int = 110) -> Path:
    """Save ``fig`` as PNG to ``path`` atomically and close it."""
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return write_bytes(path, buf.getvalue())


def curves(path: str | Path, series: Mapping[str, tuple[Sequence[float], Sequence[float]]], *,
           xlabel: str, ylabel: str, title: str = "", logy: bool = False,
           bands: Mapping[str, tuple[Sequence[float], Sequence[float], Sequence[float]]] | None = None) -> Path:
    """One line per ``label -> (x, y)``; optional ``bands[label] = (x, low, high)`` shaded."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, (x, y) in series.items():
        (line,) = ax.plot(x, y, label=label)
        if bands and label in bands:
            bx, lo, hi = bands[label]
            ax.fill_between(bx, lo, hi, color=line.get_color(), alpha=0.2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)
