"""Numbers in recipes and configs: the rule every number follows, and the ranges fields declare.

Every integer must fit in 64 bits and every float must be finite (YAML reads ``.inf`` and ``.nan``): a value
past either is refused when the recipe loads, not met later as an ``OverflowError`` deep in a writer. A field
whose zero, negative or huge values mean nothing declares its range with :func:`bounded`;
:func:`curation.spec.build` checks it and names the key.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

INT64 = (-(1 << 63), (1 << 63) - 1)


def bounded(default: Any, lo: float | None = None, hi: float | None = None, **metadata: Any) -> Any:
    """A dataclass field whose value, when given, must lie in ``[lo, hi]`` (None: that end is open)."""
    return dataclasses.field(default=default, metadata={**metadata, "range": (lo, hi)})


def fits(value: Any) -> bool:
    """Whether every number in ``value`` (plain data: numbers, strings, lists, mappings) follows the rule."""
    if isinstance(value, bool):
        return True
    if isinstance(value, int):
        return INT64[0] <= value <= INT64[1]
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(fits(v) for v in value.values())
    if isinstance(value, list):
        return all(fits(v) for v in value)
    return True


def out_of_range(value: float, lo: float | None, hi: float | None) -> str | None:
    """What was expected, when ``value`` is outside ``[lo, hi]``; None when it is inside."""
    if (lo is None or value >= lo) and (hi is None or value <= hi):
        return None
    what = "a number" if isinstance(value, float) else "a positive integer" if lo == 1 else "an integer"
    if lo is not None and hi is not None:
        return f"{what} between {lo:,} and {hi:,}"
    return f"{what} of at least {lo:,}" if lo is not None else f"{what} of at most {hi:,}"
