"""Seeds of derived random streams: one rule, so that every stream a run uses follows from its one seed.

A run that needs several independent streams (one per epoch, per rank, per iteration) seeds each with
:func:`derive_seed`. The rule is ``seed * SEED_STRIDE + index`` with ``SEED_STRIDE = 1_000_003``, a prime:

- for ``0 <= index < SEED_STRIDE`` different ``(seed, index)`` pairs give different seeds (the map is
  injective there), so no two streams of one run, or of runs with different seeds, coincide;
- it is plain integer arithmetic, identical on every platform and Python version (unlike ``hash``), so a
  resumed or re-run experiment draws the same numbers;
- :data:`leantrain.validation.SEED_MAX` bounds user seeds so that the derived seeds stay below ``2**63``,
  the range ``torch.manual_seed`` and ``torch.Generator`` take.
"""

from __future__ import annotations

__all__ = ["SEED_STRIDE", "derive_seed"]

#: Multiplier of the user's seed: a prime above any index we derive streams for (epochs, ranks, iterations).
SEED_STRIDE = 1_000_003


def derive_seed(seed: int, index: int) -> int:
    """The seed of stream ``index`` of a run seeded with ``seed``: ``seed * SEED_STRIDE + index``.

    Distinct for distinct ``(seed, index)`` with ``0 <= index < SEED_STRIDE``; callers that combine several
    counters (iteration and chunk) fold them into one ``index`` first.
    """
    return int(seed) * SEED_STRIDE + int(index)
