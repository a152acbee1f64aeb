"""Reproduction experiments, one module per paper claim; each registers itself with
:func:`leantrain.app.registry.experiment`. ``leantrain reproduce --list`` lists them."""
