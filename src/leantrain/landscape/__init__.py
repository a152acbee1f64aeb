"""Loss-landscape diagnostics: why large batches generalize worse (Keskar et al., arXiv:1609.04836).

- :func:`sharpness`: the box-constrained sharpness metric ``phi_{x,f}(eps, A)``, full space or
  a random ``p``-dimensional subspace, maximized by L-BFGS-B (paper: 10 iterations).
- :func:`interpolate` / :func:`plot_interpolation`: the 1-D parametric plot of train/test loss and
  accuracy along ``(1 - alpha) a + alpha b`` (parameters and BatchNorm buffers).
- :func:`hessian_top_eigenvalues` (Lanczos) and :func:`hessian_trace` (Hutchinson) on exact
  Hessian-vector products.

One module-state policy for all of them (details in :mod:`leantrain.landscape.surface`): the
diagnostics evaluate a private copy of the model in eval mode (BatchNorm uses its running
statistics, which are held fixed and are not part of the parameter vector; dropout is off), so
the caller's model (parameters, buffers, train/eval flags) is never changed.
"""

from leantrain.landscape.hessian import TraceEstimate, hessian_top_eigenvalues, hessian_trace
from leantrain.landscape.interpolation import Interpolation, interpolate, interpolated_state, plot_interpolation
from leantrain.landscape.sharpness import Sharpness, box_half_widths, random_subspace, sharpness
from leantrain.landscape.surface import LossSurface, as_dataset

__all__ = [
    "LossSurface",
    "as_dataset",
    "Sharpness",
    "sharpness",
    "random_subspace",
    "box_half_widths",
    "hessian_top_eigenvalues",
    "hessian_trace",
    "TraceEstimate",
    "Interpolation",
    "interpolate",
    "interpolated_state",
    "plot_interpolation",
]
