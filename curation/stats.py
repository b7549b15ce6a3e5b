"""What a run counts, and the numbers people read: ``stats.json`` and the summary table.

Each unit's task counts, per stage, rows in and out, drops by reason, outcomes and seconds
(:func:`new_counter`, :func:`count_drops`, :func:`count_outcomes`, filled by
:func:`curation.runner.apply_stages`); the driver merges the units' counters with those of the stages run
after a pool-wide cut (:func:`pool_stats`) and adds score histograms read back from the pool's files in two
streamed passes (:func:`histograms`), so the driver's memory does not grow with the pool.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from curation.io import fs as cfs
from curation.io.pool import scan_columns
from curation.io.readers import INGEST
from curation.stage import ScoreFilter, Stage


def new_counter() -> dict[str, Any]:
    return {"rows_in": 0, "rows_out": 0, "drops": {}, "outcomes": {}, "seconds": 0.0}


def count_outcomes(counter: dict, before: pa.Table, after: pa.Table, column: str) -> None:
    """Values ``column`` took on this batch (rows that had none before the stage ran)."""
    values = after[column]
    if column in before.column_names:
        values = values.filter(pc.is_null(before[column]))
    for item in pc.value_counts(values.drop_null()).to_pylist():
        counter["outcomes"][item["values"]] = counter["outcomes"].get(item["values"], 0) + item["counts"]


def count_drops(counter: dict, table: pa.Table, stage: str) -> None:
    mask = pc.equal(table["reject_stage"], stage)
    if not pc.any(mask).as_py():
        return
    for item in pc.value_counts(table.filter(mask)["reject_reason"]).to_pylist():
        counter["drops"][item["values"]] = counter["drops"].get(item["values"], 0) + item["counts"]


def pool_stats(
    records: list[dict],
    stages: list[Stage],
    root: str,
    elapsed: float,
    tail_counters: list[dict] = (),
    cuts: list[dict] = (),
    rows_out: int | None = None,
) -> dict[str, Any]:
    """Merge the counters of the units and of the stages after global cuts (``tail_counters``); the cuts'
    own entries (``cuts``) follow their stage; add score histograms read from the shards and rejects."""
    names = [INGEST] + [s.label for s in stages]
    merged = {n: new_counter() for n in names}
    write_s = 0.0
    for counters in [r["counters"] for r in records] + list(tail_counters):
        for n in names:
            c = counters.get(n)
            if not c:
                continue
            m = merged[n]
            m["rows_in"] += c["rows_in"]
            m["rows_out"] += c["rows_out"]
            m["seconds"] += c["seconds"]
            for key in ("drops", "outcomes"):
                for value, k in (c.get(key) or {}).items():
                    m[key][value] = m[key].get(value, 0) + k
    write_s = sum(rec.get("write_seconds", 0.0) for rec in records)
    rows_in = merged[INGEST]["rows_in"]
    hist = histograms(stages, root, rows=rows_in)
    if rows_out is None:
        rows_out = merged[names[-1]]["rows_out"]
    entries = [
        {
            "name": n,
            **merged[n],
            "seconds": round(merged[n]["seconds"], 3),
            "drops": dict(sorted(merged[n]["drops"].items(), key=lambda kv: -kv[1])),
            "outcomes": dict(sorted(merged[n]["outcomes"].items(), key=lambda kv: -kv[1])),
            "histograms": hist.get(n, {}),
        }
        for n in names
    ]
    for cut in cuts:  # right after the stage whose score it cuts
        at = next(
            i
            for i, e in enumerate(entries)
            if e["name"] == cut["name"].removesuffix(" (keep_fraction)").removesuffix(" (pool-wide)")
        )
        entries.insert(at + 1, cut)
    return {
        "rows_in": rows_in,
        "rows_out": rows_out,
        "rows_rejected": rows_in - rows_out,
        "elapsed_s": round(elapsed, 3),
        "rows_per_s": round(rows_in / elapsed, 1) if elapsed else None,
        "write_seconds": round(write_s, 3),
        "stages": entries,
    }


def histograms(
    stages: list[Stage], root: str, bins: int = 30, sample: int = 100_000, rows: int | None = None
) -> dict[str, dict]:
    """Score histograms over every row of the pool (shards and rejects), streamed: two passes over the score
    columns, a batch at a time, so the driver's memory does not grow with the pool. The first pass takes the
    range and an evenly strided sample of about ``sample`` of the pool's ``rows`` (the run's count; counted
    from the footers when not given), the same rows on every run, whose 0.5% and 99.5% quantiles bound the
    bins; the second counts every value into them."""
    fs, path = cfs.filesystem(root)
    files = sorted(
        i.path
        for d in ("shards", "rejects")
        for i in fs.get_file_info(pafs.FileSelector(f"{path}/{d}", allow_not_found=True))
        if i.path.endswith(".parquet")
    )
    wanted = {
        s.label: [
            f.name for f in s.output_fields() if pa.types.is_floating(f.type) or pa.types.is_integer(f.type)
        ]
        for s in stages
        if isinstance(s, ScoreFilter)
    }
    cols = sorted({c for v in wanted.values() for c in v})
    if not files or not cols:
        return {}
    if rows is None:
        rows = 0
        for name in files:
            with fs.open_input_file(name) as f:
                rows += pq.read_metadata(f).num_rows
    stride = max(1, math.ceil(rows / sample))
    schema = pa.schema(
        list(
            {
                f.name: f
                for s in stages
                if isinstance(s, ScoreFilter)
                for f in s.output_fields()
                if f.name in cols
            }.values()
        )
    )

    low = {c: math.inf for c in cols}
    high = {c: -math.inf for c in cols}
    picked: dict[str, list[np.ndarray]] = {c: [] for c in cols}
    offset = 0
    for b in scan_columns(fs, files, cols, schema):
        take = pa.array((np.arange(offset, offset + b.num_rows) % stride) == 0)
        offset += b.num_rows
        for c in cols:
            col = b.column(c)
            if len(col) == col.null_count:
                continue
            low[c] = min(low[c], float(pc.min(col).as_py()))
            high[c] = max(high[c], float(pc.max(col).as_py()))
            picked[c].append(col.filter(take).drop_null().to_numpy(zero_copy_only=False).astype(np.float64))
    edges: dict[str, tuple[float, float]] = {}
    for c in cols:
        values = np.concatenate(picked[c]) if picked[c] else np.empty(0)
        if not len(values):
            continue
        # Bin the central 99% so one outlier (a 900-megapixel bomb) cannot flatten the picture;
        # values outside fall into the end bins, and how many did is recorded.
        lo, hi = (float(q) for q in np.quantile(values, [0.005, 0.995]))
        if hi <= lo:
            lo, hi = low[c], (high[c] if high[c] > low[c] else low[c] + 1)
        edges[c] = (lo, hi)
    counts = {c: np.zeros(bins, dtype=np.int64) for c in edges}
    clipped = dict.fromkeys(edges, 0)
    for b in scan_columns(fs, files, list(edges), schema):
        for c, (lo, hi) in edges.items():
            values = b.column(c).drop_null().to_numpy(zero_copy_only=False).astype(np.float64)
            clipped[c] += int(((values < lo) | (values > hi)).sum())
            counts[c] += np.histogram(np.clip(values, lo, hi), bins=bins, range=(lo, hi))[0]
    out: dict[str, dict] = {}
    for label, names in wanted.items():
        for c in names:
            if c in edges:
                lo, hi = edges[c]
                out.setdefault(label, {})[c] = {
                    "edges": [round(float(e), 6) for e in np.linspace(lo, hi, bins + 1)],
                    "counts": counts[c].tolist(),
                    "min": low[c],
                    "max": high[c],
                    "outside_range": clipped[c],
                }
    return out


def summary_table(stats: dict[str, Any]) -> str:
    """Plain-text summary printed at the end of a run."""
    lines = [f"{'stage':<22}{'rows in':>10}{'rows out':>10}{'dropped':>9}{'sec':>8}  drops by reason"]
    for s in stats["stages"]:
        dropped = s["rows_in"] - s["rows_out"]
        reasons = ", ".join(f"{r}={k:,}" for r, k in s["drops"].items()) or "-"
        if s.get("outcomes"):
            reasons += "; kept: " + ", ".join(f"{v}={k:,}" for v, k in s["outcomes"].items())
        lines.append(
            f"{s['name']:<22}{s['rows_in']:>10,}{s['rows_out']:>10,}"
            f"{dropped:>9,}{s['seconds']:>8.1f}  {reasons}"
        )
    lines.append(
        f"{'total':<22}{stats['rows_in']:>10,}{stats['rows_out']:>10,}{stats['rows_rejected']:>9,}"
        f"{stats['elapsed_s']:>8.1f}  {stats['rows_per_s']:,} rows/s (wall clock, Ray start-up excluded)"
    )
    return "\n".join(lines)
