"""Figure writing shared by the library's plot functions and the app's experiments: PNG, saved atomically.

Figures are plain :class:`matplotlib.figure.Figure` objects drawn on their own Agg canvas. Nothing here
imports ``matplotlib.pyplot`` or calls ``matplotlib.use``: importing leantrain never changes the global
backend of a notebook or an application, and the figures we make are never registered with pyplot (so
there is nothing to close and no figure leaks into a user's ``plt.show()``).
"""

from __future__ import annotations

import io
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from leantrain.storage import write_bytes

__all__ = ["subplots", "save_figure", "curves"]


def subplots(nrows: int = 1, ncols: int = 1, *, figsize: tuple[float, float] | None = None,
             **kwargs: Any) -> tuple[Figure, Any]:
    """A new figure with an Agg canvas and its axes, like ``pyplot.subplots`` but outside pyplot.

    ``kwargs`` go to :meth:`matplotlib.figure.Figure.subplots` (``sharey=``, ``squeeze=``, ...).
    """
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, **kwargs)


def save_figure(fig: Figure, path: str | Path, *, dpi: int = 110) -> Path:
    """Save ``fig`` as PNG to ``path`` atomically (temporary file, then rename)."""
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=dpi)
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is not None:  # a figure a caller made with pyplot: release it there; ours are unknown to pyplot
        pyplot.close(fig)
    return write_bytes(path, buf.getvalue())


def curves(path: str | Path, series: Mapping[str, tuple[Sequence[float], Sequence[float]]], *,
           xlabel: str, ylabel: str, title: str = "", logy: bool = False,
           bands: Mapping[str, tuple[Sequence[float], Sequence[float], Sequence[float]]] | None = None) -> Path:
    """One line per ``label -> (x, y)``; optional ``bands[label] = (x, low, high)`` shaded."""
    fig, ax = subplots(figsize=(6.4, 4.2))
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
