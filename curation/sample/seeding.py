"""Reproducible random streams, one per tuple of coordinates.

Every shard, row, benchmark item and video of the sample corpus draws from its own stream, keyed by
where it sits (``seed, source, shard, row``). That is what lets any process write any shard, and lets a
duplicate re-derive its original from coordinates instead of reading another shard's output.
"""

from __future__ import annotations

import random
from typing import Any

import xxhash


def _rng(*parts: Any) -> random.Random:
    """An independent, reproducible stream for one tuple of coordinates.

    Python's ``hash`` is salted per process, so xxh64 of the coordinates' text is used instead;
    this is what makes output identical whatever process writes a shard.
    """
    return random.Random(xxhash.xxh64_intdigest("/".join(map(str, parts)).encode()))
