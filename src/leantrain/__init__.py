"""leantrain: train and deploy deep networks lean.

Capabilities live in one sub-package each:

- :mod:`leantrain.numerics`   number formats and rounding (pure functions)
- :mod:`leantrain.precision`  mixed-precision training emulation (BF16, FP16, FP8, INT16 DFP)
- :mod:`leantrain.quant`      low-bit inference (ternary / 4-bit weights, 8-bit activations)
- :mod:`leantrain.optim`      PBQN and DANCE
- :mod:`leantrain.landscape`  sharpness, interpolation, Hessian diagnostics
- :mod:`leantrain.distributed` MLSL-style communication layer and scaling model
- :mod:`leantrain.imitation`  GAIL and RAIL
- :mod:`leantrain.data`, :mod:`leantrain.models`, :mod:`leantrain.train` shared ground

:mod:`leantrain.app` (experiments, benchmarks, CLI commands, report) sits on top and is never imported
by the library; docs/architecture.md has the package map and the dependency rule.
"""

__version__ = "0.1.0"
