"""Decisions that need the whole pool: an index before the unit pass, a cut after it.

Most stages decide row by row, inside the unit tasks. Three need every row first, and all go the same way:
read a few columns of every row, decide once on the driver, keep the decision, apply it everywhere.

- **Index, then query** (:class:`~curation.stage.IndexedFilter`: exact dedup, decontamination). Before the
  unit pass, a parallel pre-pass reads the stage's ``index_columns`` of every unit (cached under
  ``_work/index``); the index is built once (in tasks over id ranges when rows of different ids never
  interact, so no process holds every row) and shipped to every worker through the object store
  (:func:`build_indexes`). The stage then decides row by row against it.
- **Cut at a quantile** (``keep_fraction`` on a ranking score filter: DataComp's "top 30%"): the unit pass
  only scores; the threshold is the score of the ``ceil(keep_fraction * n)``-th best row of all ``n`` scored.
- **Decide over clusters** (:class:`~curation.stage.GlobalFilter`: near-duplicate videos): the unit pass
  writes per-row columns; ``decide_global`` sees them all and names the rows to reject.

Both cuts (:func:`apply_cuts`) record their decision under ``_work/global/<stage>.json`` before any shard
changes, so a rerun applies the same one; then each shard's rejected rows move to a rejects file
(:func:`curation.io.pool.cut_shard`, never rewriting a shard in place) and the stages after the cut run on
what it keeps, up to the next cut.
"""

from __future__ import annotations

import json
import logging
import math
import pickle
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from curation.io import commit
from curation.io import fs as cfs
from curation.io.pool import KeyCut, ThresholdCut, cut_shard, lineage_keys, scan_columns
from curation.io.readers import Unit, read_unit
from curation.recipe import PipelineRecipe
from curation.runner import (
    UnitJob,
    map_items,
    map_units,
    pipeline_schema,
    progress_bar,
    tail_runner,
    task_resources,
    units_of,
    video_payload_of,
    worker_count,
)
from curation.schema import REJECT_COLUMNS, ROW_SCHEMA
from curation.stage import GlobalFilter, IndexedFilter, ScoreFilter, Stage

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- index, then query (before the unit pass)


def build_indexes(
    recipe: PipelineRecipe, stages: list[Stage], units: list[Unit], root: str, workers: int, progress: bool
) -> list:
    """Pre-pass for the index-then-query ``stages``: index columns of every unit (cached), one index
    per stage."""
    import ray

    indexed = [s for s in stages if isinstance(s, IndexedFilter)]
    if not indexed:
        return []
    fs, path = cfs.filesystem(root)
    columns = tuple(dict.fromkeys(c for s in indexed for c in s.index_columns))
    if not columns:  # every index comes from elsewhere (a benchmark registry): no corpus pre-pass
        return [ray.put(stage.build_index(None)) for stage in indexed]
    cached = {
        int(i.base_name.split(".")[0])
        for i in fs.get_file_info(pafs.FileSelector(f"{path}/_work/index", allow_not_found=True))
        if i.base_name.endswith(".parquet")
    }
    todo = [u for u in units if u.index not in cached]
    counts: dict[int, int] = {}
    if todo:
        bar = progress_bar(len(todo), "indexed", progress)
        # Indexing a unit is cheap (read and hash): a few tasks per worker, many units each.
        kwargs = {"root": root, "columns": columns, "batch_rows": recipe.execution.batch_rows}
        for batch in map_units(todo, _index_batch, kwargs, workers, min(len(todo), workers * 8)):
            counts.update(zip(batch["unit"].tolist(), batch["rows"].tolist()))
            bar.update(len(batch["unit"]))
        bar.close()
    files = [f"{path}/_work/index/{u.index:05d}.parquet" for u in units]
    built: dict[int, Any] = {}
    split = [i for i, s in enumerate(indexed) if s.index_columns and s.splits_by_id]
    if split:
        # Built in tasks over id ranges of at most index_partition_rows rows each (a resumed run reads the
        # row counts of the units indexed before from their footers).
        for u, name in zip(units, files):
            if u.index not in counts:
                with fs.open_input_file(name) as f:
                    counts[u.index] = pq.read_metadata(f).num_rows
        parts = max(1, math.ceil(sum(counts.values()) / recipe.execution.index_partition_rows))
        items = [{"part": p, "lo": lo, "hi": hi} for p, (lo, hi) in enumerate(id_ranges(parts))]
        kwargs = {"root": root, "files": files, "stages": [indexed[i] for i in split]}
        done: dict[int, list] = {}
        bar = progress_bar(parts, "index parts", progress and parts > 1)
        for batch in map_items(items, _index_range_batch, kwargs, workers, parts):
            for part, blob in zip(batch["part"].tolist(), batch["index"]):
                done[part] = pickle.loads(blob)
            bar.update(len(batch["part"]))
        bar.close()
        for k, i in enumerate(split):
            built[i] = indexed[i].merge_index([done[p][k] for p in sorted(done)])
    rest = [i for i in range(len(indexed)) if i not in built]
    rows = None
    if any(indexed[i].index_columns for i in rest):  # an index that needs every row at once
        tables = []
        for name in files:
            with fs.open_input_file(name) as f:
                tables.append(pq.read_table(f))
        rows = pa.concat_tables(tables)
    for i in rest:
        built[i] = indexed[i].build_index(rows if indexed[i].index_columns else None)
    return [ray.put(built[i]) for i in range(len(indexed))]


def index_unit(unit: Unit, columns: tuple[str, ...], batch_rows: int) -> pa.Table:
    """The index columns of every row of a unit, plus the unit number (for input order)."""
    parts = [t.select(list(columns)) for t in read_unit(unit, batch_rows)]
    table = pa.concat_tables(parts) if parts else ROW_SCHEMA.empty_table().select(list(columns))
    return table.append_column("unit", pa.array([unit.index] * table.num_rows, pa.int64()))


def _index_batch(batch: dict[str, np.ndarray], root: str, columns: tuple[str, ...], batch_rows: int) -> dict:
    fs, path = cfs.filesystem(root)
    done, rows = [], []
    for unit in units_of(batch):
        table = index_unit(unit, columns, batch_rows)
        out = f"{path}/_work/index/{unit.index:05d}.parquet"
        with (
            cfs.writing(root, f"indexing unit {unit.index} ({unit.uri}): "),
            commit.open_committed(out, fs) as f,
        ):
            pq.write_table(table, f)
        done.append(unit.index)
        rows.append(table.num_rows)
    return {"unit": np.array(done, dtype=np.int64), "rows": np.array(rows, dtype=np.int64)}


def id_ranges(parts: int) -> list[tuple[str | None, str | None]]:
    """``parts`` ranges ``[lo, hi)`` of row ids that cover every string once (None: unbounded), even for
    ids that are hex digests (the first 8 hex digits are split evenly)."""
    cuts = [format(p * 16**8 // parts, "08x") for p in range(1, parts)]
    return list(zip([None, *cuts], [*cuts, None]))


def _index_range_batch(batch: dict[str, np.ndarray], root: str, files: list[str], stages: list) -> dict:
    """Indexes of the rows whose id falls in each range of ``batch``: every unit's index file is read and
    only that range kept, so a task holds one range's rows, never the corpus's."""
    fs, _ = cfs.filesystem(root)
    parts, blobs = [], []
    for item in batch["item"]:
        r = json.loads(item)
        tables = []
        for name in files:
            with cfs.writing(root, "building the exact-dedup index: "), fs.open_input_file(name) as f:
                t = pq.read_table(f)
            mask = None
            if r["lo"] is not None:
                mask = pc.greater_equal(t["id"], pa.scalar(r["lo"]))
            if r["hi"] is not None:
                below = pc.less(t["id"], pa.scalar(r["hi"]))
                mask = below if mask is None else pc.and_(mask, below)
            tables.append(t if mask is None else t.filter(mask))
        rows = pa.concat_tables(tables)
        parts.append(r["part"])
        blobs.append(pickle.dumps([s.build_index(rows) for s in stages]))
    return {"part": np.array(parts, dtype=np.int64), "index": np.array(blobs, dtype=object)}


# ---------------------------------------------------------------- cuts (after the unit pass)


def apply_cuts(
    recipe: PipelineRecipe,
    records: list[dict],
    root: str,
    tails: dict[str, list[Stage]],
    units: list[Unit],
    progress: bool,
) -> tuple[dict[str, dict], list[dict], list[dict], list[dict]]:
    """Pool-wide decisions, in stage order: for each score filter with ``keep_fraction``, keep the top
    fraction of all rows it scored (DataComp's "top 30%"), not per batch; for each :class:`GlobalFilter`, what
    its ``decide_global`` rejects (near-duplicate clusters).

    The unit pass only scored. Here the decision is made once on the driver and recorded under
    ``_work/global/<stage>.json`` before any shard changes, so a rerun applies the same one; then each
    shard's rejected rows move to a rejects file (:func:`curation.io.pool.cut_shard`) and the stages after the
    cut (``tails``, up to the next cut) run on the rows kept. Returns the rewritten shard entries by name,
    their rejects files, one stats entry per cut, and the counters of the stages after the cuts (one dict
    per shard).
    """
    stages = [s for s in recipe.stages if isinstance(s, ScoreFilter) and s.cuts]
    replaced: dict[str, dict] = {}
    extra_rejects: list[dict] = []
    out_stats: list[dict] = []
    tail_counters: list[dict] = []
    if not stages:
        return replaced, extra_rejects, out_stats, tail_counters
    fs, path = cfs.filesystem(root)
    schema = pipeline_schema(recipe.stages)
    shard_schema = pa.schema([f for f in schema if f.name not in REJECT_COLUMNS])
    for stage in stages:
        rec_path = f"{path}/_work/global/{stage.label}.json"
        if fs.get_file_info(rec_path).type == pafs.FileType.File:
            with fs.open_input_stream(rec_path) as f:
                rec = json.loads(f.read())
        else:
            files = [
                f"{path}/{replaced.get(s['name'], s)['parquet']['path']}"
                for r in records
                for s in r["shards"]
            ]
            files += [f"{path}/{r['rejects']['path']}" for r in records if r.get("rejects")]
            files += [f"{path}/{r['path']}" for r in extra_rejects]
            rec = (
                _quantile_decision(stage, files, fs, schema)
                if stage.keep_fraction is not None
                else _global_decision(stage, files, fs, schema)
            )
            fs.create_dir(f"{path}/_work/global", recursive=True)
            commit.write_bytes(rec_path, json.dumps(rec).encode(), fs)
        cut, what, entry_stats = _cut_of(stage, rec)
        entries = [replaced.get(s["name"], s) for r in records for s in r["shards"]]
        original = {e["name"]: s["name"] for e, s in zip(entries, (s for r in records for s in r["shards"]))}
        kwargs = {
            "root": root,
            "cut": cut,
            "schema": shard_schema,
            "reject_schema": schema,
            "formats": recipe.output.formats,
            "video": video_payload_of(recipe) if stage is stages[-1] else "both",
        }
        tail = tails.get(stage.label) or []
        cpus, gpus = task_resources(tail) if tail else (1.0, 0.0)
        workers = worker_count(recipe, tail, cpus, gpus)
        tail_job = None
        if tail:
            tail_job = UnitJob.of(recipe, tail, root)
            kwargs["tail_job"] = tail_job
            kwargs["index_refs"] = build_indexes(recipe, tail, units, root, workers, progress)
        moved: dict[str, int] = {}
        bar = progress_bar(
            len(entries),
            "shards",
            progress,
            what + (f", then {', '.join(s.label for s in tail)}" if tail else ""),
        )
        tasks = min(len(entries), workers * 4) or 1
        for batch in map_items(entries, _cut_batch, kwargs, workers, tasks, cpus, gpus):
            for r in batch["record"]:
                r = json.loads(r)
                replaced[original[r["name"]]] = r["shard"]  # by the unit pass's name: the manifest's key
                if r["rejects"]:
                    extra_rejects.append(r["rejects"])
                for reason, k in (r.get("moved_reasons") or {}).items():
                    moved[reason] = moved.get(reason, 0) + k
                if r.get("counters"):
                    tail_counters.append(r["counters"])
                bar.update(1)
        bar.close()
        extra_rejects.sort(key=lambda r: r["path"])  # tasks finish in any order; the manifest does not
        kept_before = sum(e["rows"] for e in entries)
        out_stats.append(
            {
                "rows_in": kept_before,
                "rows_out": kept_before - sum(moved.values()),
                "drops": dict(sorted(moved.items(), key=lambda kv: -kv[1])),
                "seconds": 0.0,
                "histograms": {},
                **entry_stats,
            }
        )
    return replaced, extra_rejects, out_stats, tail_counters


def _quantile_decision(stage: ScoreFilter, files: list[str], fs, schema: pa.Schema) -> dict:
    """The ``keep_fraction`` cut: the score of the ``k = ceil(keep_fraction * n)``-th best of the ``n`` rows
    scored (shards and rejects alike: every row that reached the stage; rows tied at it are kept in lineage
    order until exactly ``k`` are)."""
    col = stage.score_name
    # Only the scores are held (8 bytes a row), then the lineage of the rows tied at the cut, read again.
    values = [
        b.column(0).drop_null().to_numpy(zero_copy_only=False) for b in scan_columns(fs, files, [col], schema)
    ]
    values = np.sort(np.concatenate(values) if values else np.empty(0))[::-1]
    k = math.ceil(stage.keep_fraction * len(values))
    threshold = float(values[k - 1]) if k else math.inf
    # Rows tied at the cut (templated captions score alike) are kept in lineage order (source file and
    # offset: unique per row, unlike ids, which exact duplicates share) up to exactly k.
    above = int((values > threshold).sum())
    lineage = ["source_uri", "source_offset", "clip_start", col]
    tied = sorted(
        k
        for b in scan_columns(fs, files, lineage, schema)
        for k in lineage_keys(pa.Table.from_batches([b]).filter(pc.equal(b.column(3), threshold)))
    )
    return {
        "column": col,
        "keep_fraction": stage.keep_fraction,
        "scored": len(values),
        "threshold": threshold,
        "keep": k,
        "tied_kept": tied[: k - above],
    }


def _global_decision(stage: GlobalFilter, files: list[str], fs, schema: pa.Schema) -> dict:
    """A :class:`GlobalFilter`'s decision over every row it scored (in the pool's shards and rejects)."""
    col = stage.score_name
    columns = list(dict.fromkeys(["source_uri", "source_offset", "clip_start", col, *stage.global_columns]))
    # only the rows that reached the stage
    parts = [
        pa.Table.from_batches([b.filter(pc.is_valid(b.column(col)))])
        for b in scan_columns(fs, files, columns, schema)
    ]
    table = (
        pa.concat_tables(parts, promote_options="permissive")
        if parts
        else pa.schema([schema.field(c) for c in columns]).empty_table()
    )
    t = time.perf_counter()
    rejected, facts = stage.decide_global(table)
    log.info(
        "%s: %d of %d scored rows rejected (%.1f s)",
        stage.label,
        len(rejected),
        table.num_rows,
        time.perf_counter() - t,
    )
    return {
        "scored": table.num_rows,
        "rejected": {k: list(v) for k, v in sorted(rejected.items())},
        "facts": facts,
        "seconds": round(time.perf_counter() - t, 3),
    }


def _cut_of(stage: ScoreFilter, rec: dict):
    """The cut a recorded decision makes, the progress bar's label, and the stats entry's own fields."""
    if stage.keep_fraction is not None:
        col = rec["column"]
        log.info(
            "%s: keeping the top %.1f%% of %d scored rows: %s >= %.4f",
            stage.label,
            100 * rec["keep_fraction"],
            rec["scored"],
            col,
            rec["threshold"],
        )
        detail = (
            f"{col} below {rec['threshold']:.4f}, the cut for the top {100 * rec['keep_fraction']:g}% of "
            f"{rec['scored']:,} scored rows"
        )
        cut = ThresholdCut(stage.label, col, rec["threshold"], tuple(rec["tied_kept"]), detail)
        return (
            cut,
            f"{stage.label}: keep top {100 * rec['keep_fraction']:g}%",
            {
                "name": f"{stage.label} (keep_fraction)",
                "threshold": rec["threshold"],
                "scored": rec["scored"],
            },
        )
    cut = KeyCut(stage.label, {k: tuple(v) for k, v in rec["rejected"].items()})
    return (
        cut,
        f"{stage.label}: {len(rec['rejected']):,} rows out",
        {
            "name": f"{stage.label} (pool-wide)",
            "scored": rec["scored"],
            "seconds": rec.get("seconds", 0.0),
            **rec.get("facts", {}),
        },
    )


def _cut_batch(
    batch: dict[str, np.ndarray], tail_job: UnitJob | None = None, index_refs: list = (), **kwargs
) -> dict[str, np.ndarray]:
    tail = tail_runner(tail_job, list(index_refs)) if tail_job is not None else None
    out = []
    for item in batch["item"]:
        entry = json.loads(item)
        with cfs.writing(kwargs["root"], f"cutting shard {entry['name']}: "):
            out.append(json.dumps(cut_shard(entry=entry, tail=tail, **kwargs)))
    return {"record": np.array(out, dtype=object)}
