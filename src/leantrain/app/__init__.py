"""The reproduction app: everything ``leantrain`` the command runs, above the library.

- :mod:`leantrain.app.experiments`  one module per reproduced paper claim (``leantrain reproduce``)
- :mod:`leantrain.app.bench`        one module per benchmark (``leantrain bench``)
- :mod:`leantrain.app.commands`     one module per CLI subcommand (found by :mod:`leantrain.cli`)
- :mod:`leantrain.app.registry`     the experiment and benchmark registries and their result records
- :mod:`leantrain.app.reproduce`    runs experiments, writes ``metrics.json``
- :mod:`leantrain.app.report`       the HTML / Markdown report and the README claims table
- :mod:`leantrain.app.runs`         methods and their baselines under one accounting (PBQN, DANCE experiments)
- :mod:`leantrain.app.provenance`   run keys: configuration plus the source of the code a cached run depends on

The library (numerics, precision, quant, optim, landscape, distributed, imitation, data, models, train)
never imports this package; see docs/architecture.md.
"""
