"""Ground truth: what every writer returns about its shard, and the rows of ``truth.parquet``.

Every dirty row of the corpus is labelled (file, offset, key, source, dirt kind, the original it
duplicates, the benchmark item planted in it), so that filters are scored against ground truth
rather than eyeballed. Writers return a :class:`ShardResult`; the corpus writer streams the truth rows
to ``truth.parquet`` in canonical order, whichever worker finished first.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa

TRUTH_SCHEMA = pa.schema(
    [
        ("file", pa.string()),
        ("offset", pa.int64()),
        ("key", pa.string()),
        ("source", pa.string()),
        ("dirt", pa.string()),
        ("dup_of", pa.string()),
        ("bench_item", pa.string()),
    ]
)


@dataclass
class ShardResult:
    source: str
    shard: int
    rows: int
    truth: list[tuple] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    images: int = 0  # loose image files written next to JSONL


def _truth(
    rel: str,
    offset: int,
    key: str,
    source: str,
    dirt: str,
    dup_of: str | None = None,
    bench: str | None = None,
) -> tuple:
    return (rel, offset, key, source, dirt, dup_of, bench)


def _truth_table(rows: list[tuple]) -> pa.Table:
    columns = list(zip(*rows))
    return pa.table({name: list(col) for name, col in zip(TRUTH_SCHEMA.names, columns)}, schema=TRUTH_SCHEMA)
