"""Build mixtures from pools to exact token budgets: ``curation mix mixtures/NAME.yaml``.

The work is three Ray Data passes and one plan on the driver:

1. **count**: every Parquet shard of every pool is read once; each row gets its text and visual
   tokens (:func:`curation.mix.tokens.row_tokens`, the model's own rules) and a flag per mixture source
   whose ``modality``/``mode``/``where`` it matches. Only these small per-row records reach the driver.
2. **plan** (driver): each source's candidates are put in a seeded order, a hash of (seed, mixture,
   source, epoch, row id), so the order does not depend on shard layout or worker count and adding rows
   to a pool only inserts; ``prefer: COLUMN`` orders by that column, best first, instead. Whole epochs
   are taken while the target exceeds the source (only with ``upsample``), then a prefix of the next
   epoch, then later rows that still fit the remainder: the budget is met to within less than the
   smallest row left over. The selected rows are shuffled across sources by another seeded hash and
   cut into output shards of ``shard_rows``. Every budget problem is found here, before anything is
   written.
3. **scatter**: each input shard is read once and its selected rows (repeated across epochs) go to
   per-output-shard bucket files under ``_work/``.
4. **gather**: each output shard sorts its buckets into plan order and is written as Parquet and/or
   WebDataset, committed by rename, then recorded as done. A rerun skips done shards; the plan is a
   pure function of the recipe and the pools, so redone shards are byte-identical.

Output per mixture, ``OUT/NAME/``: ``shards/NNNNN.{parquet,tar}``, ``manifest.json`` (recipe and hash,
shards with rows/bytes/sha256/tokens, tokens per source, mode and modality, the epoch ledger, how far
each budget was missed), ``report.html`` and ``report.json``. See ``docs/mixtures.md``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import xxhash

from curation.io import commit, outputs
from curation.io import fs as cfs
from curation.mix.recipe import MixRecipe, MixSource, Mixture, resolved_source
from curation.mix.tokens import Markup, Tokenizer, row_tokens
from curation.schema import ROW_SCHEMA, conform
from curation.spec import RecipeError
from curation.target.geometry import VisionConfig

log = logging.getLogger(__name__)

FORMAT = "curation.mixture/1"
# Columns row_tokens reads, and those every selector may use without naming them.
_TOKEN_COLUMNS = ("id", "text", "texts", "messages", "image", "width", "height", "images", "frames", "video")
_ALWAYS = ("id", "source", "modality", "mode")
MIX_FIELDS = [
    pa.field("key", pa.string()),  # unique within the mixture: id, or id_N for the N-th repeat of a row
    pa.field("mix_source", pa.string()),
    pa.field("mix_epoch", pa.int32()),
    pa.field("text_tokens", pa.int64()),
    pa.field("visual_tokens", pa.int64()),
    pa.field("tokens", pa.int64()),
]


# ---------------------------------------------------------------- pools


@dataclass
class PoolInfo:
    name: str
    root: str
    shards: list[dict[str, Any]]  # {"path": full uri/path, "rows": n, "sha256": ...}
    schema: pa.Schema
    recipe_hash: str | None
    rows: int


def open_pools(recipe: MixRecipe) -> dict[str, PoolInfo]:
    """Read each pool's manifest and shard schema; every problem names its recipe key (RecipeError)."""
    problems: list[str] = []
    pools: dict[str, PoolInfo] = {}
    used = {s.pool for m in recipe.mixtures for s in m.sources.values()}
    for name, root in recipe.pools.items():
        if name not in used:
            continue
        where = f"pools.{name}"
        root = root if cfs.is_uri(root) else os.path.abspath(root)
        try:
            manifest = json.loads(cfs.read_bytes(f"{root.rstrip('/')}/manifest.json"))
        except FileNotFoundError:
            problems.append(
                f"{where}: no pool at {root} (no manifest.json; pools are folders written by `curation run`)"
            )
            continue
        except (OSError, ValueError) as e:
            problems.append(f"{where}: cannot read {root}/manifest.json: {e}")
            continue
        shards = [
            {
                "path": f"{root.rstrip('/')}/{s['parquet']['path']}",
                "rows": s["rows"],
                "sha256": s["parquet"]["sha256"],
            }
            for s in manifest.get("shards", [])
            if "parquet" in s
        ]
        if manifest.get("shards") and not shards:
            problems.append(
                f"{where}: the pool at {root} has no Parquet shards (written with formats: "
                f"[webdataset]); mixing reads the Parquet shards: rerun the pool with parquet"
            )
            continue
        schema = ROW_SCHEMA
        if shards:
            try:
                fs, path = cfs.filesystem(shards[0]["path"])
                with fs.open_input_file(path) as f:
                    schema = pq.read_schema(f)
            except (OSError, pa.ArrowInvalid) as e:
                problems.append(f"{where}: cannot read shard {shards[0]['path']}: {e}")
                continue
        pools[name] = PoolInfo(
            name, root, shards, schema, manifest.get("recipe_hash"), sum(s["rows"] for s in shards)
        )
    if not problems:
        _check_columns(recipe, pools, problems)
    if problems:
        raise RecipeError(recipe.file, problems)
    return pools


def _check_columns(recipe: MixRecipe, pools: dict[str, PoolInfo], problems: list[str]) -> None:
    for mix in recipe.mixtures:
        for sname, src in mix.sources.items():
            where = f"mixtures.{mix.name}.sources.{sname}"
            schema = pools[src.pool].schema
            for col in _where_columns(src):
                if col not in schema.names:
                    problems.append(
                        f"{where}.where: column '{col}' is not in pool '{src.pool}' (its columns: "
                        f"{', '.join(n for n in schema.names if n not in ROW_SCHEMA.names) or 'none'} "
                        f"besides the row schema's)"
                    )
            if src.prefer is not None:
                if src.prefer not in schema.names:
                    problems.append(f"{where}.prefer: column '{src.prefer}' is not in pool '{src.pool}'")
                elif not (
                    pa.types.is_integer(schema.field(src.prefer).type)
                    or pa.types.is_floating(schema.field(src.prefer).type)
                ):
                    problems.append(
                        f"{where}.prefer: column '{src.prefer}' is {schema.field(src.prefer).type}, "
                        f"not a number"
                    )


def _where_columns(src: MixSource) -> list[str]:
    return pl.sql_expr(src.where).meta.root_names() if src.where else []


# ---------------------------------------------------------------- pass 1: count


@dataclass
class Selector:
    """One mixture source as the counting workers see it."""

    key: str  # "mixture/source"
    pool: str
    modality: list[str]
    mode: list[str]
    where: str | None
    prefer: str | None
    pool_index: int  # position of the pool in the sorted pool names
    columns: tuple[str, ...]  # what ``where`` reads (parsed once here, not per batch)


def _selectors(recipe: MixRecipe, pool_index: dict[str, int]) -> list[Selector]:
    return [
        Selector(
            f"{m.name}/{s}",
            src.pool,
            src.modality,
            src.mode,
            src.where,
            src.prefer,
            pool_index[src.pool],
            tuple(_where_columns(src)),
        )
        for m in recipe.mixtures
        for s, src in m.sources.items()
    ]


def count_shard(
    path: str,
    pool_index: int,
    shard_index: int,
    selectors: list[Selector],
    tokenizer: Tokenizer,
    vision: VisionConfig,
    batch_rows: int,
    markup: Markup | None = None,
) -> pa.Table:
    """Per-row token counts and selector flags of one pool shard (what the plan needs, nothing more).

    Columns: pool, shard, row, id, source, modality, mode, text_tokens, visual_tokens, tokens, error,
    ``sel{i}`` (bool) and ``pref{i}`` (float64) for each selector. A row whose tokens cannot be counted
    (an image header that does not parse) gets tokens -1 and the reason in ``error``.
    """
    fs, fpath = cfs.filesystem(path)
    with fs.open_input_file(fpath) as f:
        pf = pq.ParquetFile(f)
        names = pf.schema_arrow.names
        extra = {c for s in selectors for c in (*s.columns, *([s.prefer] if s.prefer else []))}
        columns = [c for c in dict.fromkeys((*_ALWAYS, *_TOKEN_COLUMNS, *sorted(extra))) if c in names]
        out, start = [], 0
        for batch in pf.iter_batches(batch_size=batch_rows, columns=columns):
            table = pa.Table.from_batches([batch])
            out.append(
                _count_table(table, start, pool_index, shard_index, selectors, tokenizer, vision, markup)
            )
            start += table.num_rows
    if not out:
        return _count_table(
            pa.table({c: pa.array([], ROW_SCHEMA.field(c).type) for c in _ALWAYS}),
            0,
            pool_index,
            shard_index,
            selectors,
            tokenizer,
            vision,
            markup,
        )
    return pa.concat_tables(out)


def _count_table(
    table: pa.Table,
    start: int,
    pool_index: int,
    shard_index: int,
    selectors: list[Selector],
    tokenizer: Tokenizer,
    vision: VisionConfig,
    markup: Markup | None,
) -> pa.Table:
    n = table.num_rows
    errors: list[str | None] = [None] * n
    try:
        counts = row_tokens(table, tokenizer, vision, markup)
    except ValueError:  # one bad row spoils the batch: count row by row to find it
        counts = {k: np.zeros(n, np.int64) for k in ("text_tokens", "visual_tokens", "total")}
        for i in range(n):
            try:
                one = row_tokens(table.slice(i, 1), tokenizer, vision, markup)
            except ValueError as e:
                errors[i] = str(e)
                counts["total"][i] = -1
                continue
            for k in counts:
                counts[k][i] = one[k][0]
    cols: dict[str, Any] = {
        "pool": pa.array(np.full(n, pool_index, np.int32)),
        "shard": pa.array(np.full(n, shard_index, np.int32)),
        "row": pa.array(np.arange(start, start + n, dtype=np.int64)),
    }
    for c in _ALWAYS:
        cols[c] = table.column(c) if c in table.column_names else pa.nulls(n, pa.string())
    cols.update(
        text_tokens=pa.array(counts["text_tokens"]),
        visual_tokens=pa.array(counts["visual_tokens"]),
        tokens=pa.array(counts["total"]),
        error=pa.array(errors, pa.string()),
    )
    # media stay out of polars unless a predicate reads them ("images IS NOT NULL")
    wanted = {c for s in selectors if s.pool_index == pool_index for c in s.columns}
    df = pl.from_arrow(
        table.drop_columns(
            [c for c in ("image", "images", "frames") if c in table.column_names and c not in wanted]
        )
    )
    for i, s in enumerate(selectors):
        if s.pool_index != pool_index:
            cols[f"sel{i}"] = pa.array(np.zeros(n, bool))
            cols[f"pref{i}"] = pa.nulls(n, pa.float64())
            continue
        cond = pl.lit(True)
        if s.modality:
            cond = cond & pl.col("modality").is_in(s.modality)
        if s.mode:
            cond = cond & pl.col("mode").is_in(s.mode)
        if s.where:
            cond = cond & pl.sql_expr(s.where)
        # with_columns broadcasts a bare literal (a selector with no condition) to every row
        mask = (
            df.with_columns(cond.fill_null(False).alias("__m"))["__m"].to_numpy() if n else np.zeros(0, bool)
        )
        cols[f"sel{i}"] = pa.array(np.asarray(mask, bool))
        cols[f"pref{i}"] = (
            table.column(s.prefer).cast(pa.float64()) if s.prefer else pa.nulls(n, pa.float64())
        )
    return pa.table(cols)


def _count_batch(
    batch: dict[str, np.ndarray],
    selectors: list[Selector],
    tokenizer_path: str,
    allow_download: bool,
    vision: VisionConfig,
    markup: Markup,
    batch_rows: int,
) -> dict[str, np.ndarray]:
    tokenizer = Tokenizer.load(tokenizer_path, allow_download=allow_download)
    tables = []
    for item in batch["item"]:
        it = json.loads(item)
        tables.append(
            count_shard(it["path"], it["pool"], it["shard"], selectors, tokenizer, vision, batch_rows, markup)
        )
    sink = pa.BufferOutputStream()
    table = pa.concat_tables(tables)
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return {"ipc": np.array([sink.getvalue().to_pybytes()], dtype=object), "shards": np.array([len(tables)])}


# ---------------------------------------------------------------- pass 2: plan


@dataclass
class SourcePlan:
    name: str
    spec: MixSource
    candidates: int  # rows matching the selector with a positive token count
    uncountable: int  # matching rows whose tokens could not be counted (left out)
    available: int  # tokens (or rows) one pass over the candidates gives
    target: int = 0
    rows: list[np.ndarray] = field(default_factory=list)  # per epoch: indices into the count table
    selected: int = 0  # tokens (or rows) taken
    epochs: float = 0.0  # selected / available: passes over the source
    full_epochs: int = 0  # complete passes over the source


def _hash_order(ids: list[str], salt: str) -> np.ndarray:
    prefix = salt.encode()
    keys = np.fromiter((xxhash.xxh3_64_intdigest(prefix + i.encode()) for i in ids), np.uint64, len(ids))
    return np.lexsort((np.arange(len(ids)), keys))  # ties (never seen) broken by position, deterministically


def take_to_target(cost: np.ndarray, order: np.ndarray, target: int) -> tuple[np.ndarray, int]:
    """Rows of ``order`` whose costs add up to at most ``target``, as close to it as a greedy pass gets.

    The longest prefix that fits, then every later row that still fits what is left; so the shortfall
    is smaller than the cheapest row not taken.

    >>> take_to_target(np.array([5, 9, 3, 2]), np.array([0, 1, 2, 3]), 10)
    (array([0, 2, 3]), 10)
    """
    c = cost[order]
    cs = np.cumsum(c)
    k = int(np.searchsorted(cs, target, side="right"))
    taken = int(cs[k - 1]) if k else 0
    picked = [order[:k]]
    rest, rest_cost = order[k:], c[k:]
    left = target - taken
    fits = np.flatnonzero(rest_cost <= left)
    extra = []
    for j in fits:  # in order; only rows that could fit at all are visited
        if rest_cost[j] <= left:
            extra.append(rest[j])
            left -= int(rest_cost[j])
            if left == 0:
                break
    picked.append(np.asarray(extra, dtype=order.dtype))
    return np.concatenate(picked), target - left


def plan_mixture(
    mix: Mixture, counts: pl.DataFrame, sel_index: dict[str, int], seed: int
) -> tuple[list[SourcePlan], list[str]]:
    """Targets and selected rows per source; returns (plans, problems). No problem means it fits."""
    problems: list[str] = []
    plans: list[SourcePlan] = []
    unit = mix.unit
    for sname, src in mix.sources.items():
        i = sel_index[f"{mix.name}/{sname}"]
        matched = counts.filter(pl.col(f"sel{i}"))
        bad = int((matched["tokens"] < 0).sum())
        cand = matched.filter(pl.col("tokens") > 0)
        cost = (
            np.ones(cand.height, np.int64) if unit == "rows" else cand["tokens"].to_numpy().astype(np.int64)
        )
        plans.append(SourcePlan(sname, src, cand.height, bad, int(cost.sum())))

    # Targets
    where = f"mixtures.{mix.name}"
    capacity = {p.name: p.available * (p.spec.max_epochs if p.spec.upsample else 1.0) for p in plans}
    weighted = [p for p in plans if p.spec.weight is not None]
    fixed = [p for p in plans if p.spec.budget is not None]
    for p in plans:
        if p.available == 0:
            problems.append(
                f"{where}.sources.{p.name}: no rows of pool '{p.spec.pool}' match "
                f"({_describe_selector(p.spec)}); check modality/mode/where"
            )
    if problems:
        return plans, problems
    if mix.budget is None:  # auto: the largest mixture that keeps the proportions and fits every source
        # exact fractions: the scarcest source must get all it has, not one row less to float rounding
        cap = {k: Fraction(v) for k, v in capacity.items()}
        if weighted:
            total = min(cap[p.name] / Fraction(p.spec.weight) for p in weighted)
            for p in weighted:
                p.target = math.floor(Fraction(p.spec.weight) * total)
        else:
            scale = min(Fraction(1), min(cap[p.name] / p.spec.budget for p in fixed))
            for p in fixed:
                p.target = math.floor(p.spec.budget * scale)
    else:
        for p in fixed:
            p.target = p.spec.budget
        rest = mix.budget - sum(p.spec.budget for p in fixed)
        for p, t in zip(weighted, _apportion(rest, [p.spec.weight for p in weighted])):
            p.target = t
    for p in plans:
        if p.target <= 0:
            problems.append(
                f"{where}.sources.{p.name}: its share comes to 0 {unit}; raise its weight or the budget"
            )
        elif p.target > p.available and not p.spec.upsample:
            problems.append(
                f"{where}.sources.{p.name}: needs {p.target:,} {unit} but pool '{p.spec.pool}' gives "
                f"{p.available:,} in {p.candidates:,} rows ({_describe_selector(p.spec)}); set upsample: "
                f"true to repeat rows, lower the budget, or use budget: auto"
            )
        elif p.target > capacity[p.name] + 1e-9:
            problems.append(
                f"{where}.sources.{p.name}: needs {p.target:,} {unit}, {p.target / p.available:.2f} passes "
                f"over pool '{p.spec.pool}' ({p.available:,} {unit}), more than max_epochs "
                f"{p.spec.max_epochs:g}; raise max_epochs, lower the budget, or use budget: auto"
            )
    if problems:
        return plans, problems

    # Rows
    for p in plans:
        i = sel_index[f"{mix.name}/{p.name}"]
        idx = np.flatnonzero((counts[f"sel{i}"].to_numpy()) & (counts["tokens"].to_numpy() > 0))
        ids = counts["id"].to_numpy()[idx].tolist()
        cost = (
            np.ones(len(idx), np.int64)
            if unit == "rows"
            else counts["tokens"].to_numpy()[idx].astype(np.int64)
        )
        pref = counts[f"pref{i}"].to_numpy()[idx] if p.spec.prefer else None
        full, left = divmod(p.target, p.available)
        p.full_epochs = full
        epoch = 0
        for epoch in range(full + (1 if left else 0)):
            order = _hash_order(ids, f"{seed}/{mix.name}/{p.name}/{epoch}/")
            if pref is not None:  # best first; NaN (no score) last; the hash order breaks ties
                key = np.where(np.isnan(pref), -np.inf, pref)[order]
                order = order[np.argsort(-key, kind="stable")]
            if epoch < full:
                p.rows.append(idx[order])
                p.selected += p.available
            else:
                chosen, got = take_to_target(cost, order, left)
                p.rows.append(idx[chosen])
                p.selected += got
        p.epochs = p.selected / p.available
    return plans, problems


def _apportion(total: int, weights: list[float]) -> list[int]:
    """Split ``total`` by ``weights`` into integers that add up to it exactly (largest remainder)."""
    raw = [total * w / sum(weights) for w in weights]
    out = [int(x) for x in raw]
    for j in sorted(range(len(raw)), key=lambda j: (out[j] - raw[j], j))[: total - sum(out)]:
        out[j] += 1
    return out


def _describe_selector(src: MixSource) -> str:
    parts = []
    if src.modality:
        parts.append(f"modality {'/'.join(src.modality)}")
    if src.mode:
        parts.append(f"mode {'/'.join(src.mode)}")
    if src.where:
        parts.append(f"where {src.where}")
    return ", ".join(parts) or "all rows"


def selection_table(
    mix: Mixture, plans: list[SourcePlan], counts: pl.DataFrame, seed: int, shard_rows: int
) -> pl.DataFrame:
    """Every selected (row, epoch) in output order, with its output shard and unique key."""
    parts = []
    for p in plans:
        for epoch, rows in enumerate(p.rows):
            parts.append(
                counts[rows]
                .select(
                    "pool",
                    "shard",
                    "row",
                    "id",
                    "source",
                    "modality",
                    "mode",
                    "text_tokens",
                    "visual_tokens",
                    "tokens",
                )
                .with_columns(mix_source=pl.lit(p.name), mix_epoch=pl.lit(epoch, pl.Int32))
            )
    sel = pl.concat(parts)
    salts = [f"{seed}/{mix.name}/shuffle/{s}/{e}/" for s, e in zip(sel["mix_source"], sel["mix_epoch"])]
    keys = np.fromiter(
        (xxhash.xxh3_64_intdigest(s.encode() + i.encode()) for s, i in zip(salts, sel["id"])),
        np.uint64,
        sel.height,
    )
    order = np.lexsort((np.arange(sel.height), keys))
    sel = sel[order].with_columns(position=pl.int_range(pl.len(), dtype=pl.Int64))
    occurrence = sel.select(pl.int_range(pl.len()).over("id").alias("n"))["n"]
    sel = sel.with_columns(
        key=pl.when(occurrence == 0)
        .then(pl.col("id"))
        .otherwise(pl.col("id") + "_" + occurrence.cast(pl.Utf8)),
        out_shard=(pl.col("position") // shard_rows).cast(pl.Int32),
    )
    return sel


# ---------------------------------------------------------------- passes 3 and 4: scatter, gather


@dataclass
class WriteJob:
    root: str  # the mixture folder
    schema: pa.Schema  # output rows
    formats: list[str]


def _bucket_dir(path: str, out_shard: int) -> str:
    return f"{path}/_work/buckets/{out_shard:05d}"


def _scatter_batch(batch: dict[str, np.ndarray], job: WriteJob, pending: list[int]) -> dict[str, np.ndarray]:
    fs, path = cfs.filesystem(job.root)
    plan = pq.read_table(f"{path}/_work/plan.parquet", filesystem=fs)
    plan = plan.filter(pc.is_in(plan["out_shard"], pa.array(sorted(set(pending)), pa.int32())))
    for item in batch["item"]:
        it = json.loads(item)
        mine = plan.filter((pc.field("pool") == it["pool"]) & (pc.field("shard") == it["shard"]))
        if not mine.num_rows:
            continue
        sfs, spath = cfs.filesystem(it["path"])
        with sfs.open_input_file(spath) as f:
            src = pq.read_table(f)
        rows = src.take(mine["row"])
        rows = conform(
            rows.drop_columns([c for c in rows.column_names if c not in job.schema.names]),
            pa.schema([f for f in job.schema if f.name not in {m.name for m in MIX_FIELDS}]),
        )
        for fld in MIX_FIELDS:
            rows = rows.append_column(fld, mine[fld.name].cast(fld.type))
        rows = rows.append_column("position", mine["position"]).append_column("out_shard", mine["out_shard"])
        for out in pc.unique(mine["out_shard"]).to_pylist():
            part = rows.filter(pc.field("out_shard") == out).drop_columns(["out_shard"])
            target = f"{_bucket_dir(path, out)}/{it['pool']:03d}_{it['shard']:05d}.parquet"
            fs.create_dir(_bucket_dir(path, out), recursive=True)
            with commit.open_committed(target, fs) as f:
                pq.write_table(part, f)
    return {"done": np.array([len(batch["item"])])}


def _gather_batch(batch: dict[str, np.ndarray], job: WriteJob) -> dict[str, np.ndarray]:
    folder = outputs.OutputFolder(job.root, "mixture")
    fs, path = folder.fs, folder.path
    records = []
    for item in batch["item"]:
        it = json.loads(item)
        out = it["out_shard"]
        tables = []
        for name in it["buckets"]:
            with fs.open_input_file(f"{_bucket_dir(path, out)}/{name}") as f:
                tables.append(pq.read_table(f))
        table = pa.concat_tables(tables)
        table = table.take(pc.sort_indices(table["position"])).drop_columns(["position"])
        if table.num_rows != it["rows"]:
            raise RuntimeError(f"shard {out}: the buckets hold {table.num_rows} rows, the plan {it['rows']}")
        part = commit.ShardWriter(fs, path, f"{out:05d}", job.schema, job.formats, key="key")
        part.write(table.cast(job.schema))
        entry = part.commit()
        entry["name"] = f"{out:05d}"
        entry["tokens"] = {
            k: int(pc.sum(table[c]).as_py() or 0)
            for k, c in (("text", "text_tokens"), ("visual", "visual_tokens"), ("total", "tokens"))
        }
        record = {"out_shard": out, "entry": entry}
        folder.commit_done(out, record)
        records.append(json.dumps(record))
    return {"record": np.array(records, dtype=object)}


# ---------------------------------------------------------------- driver


@dataclass
class MixResult:
    name: str
    path: str
    manifest: dict[str, Any]
    report: str | None
    timings: dict[str, float] = field(default_factory=dict)  # seconds per pass (also in stats.json)


def build_mixtures(
    recipe: MixRecipe,
    *,
    only: list[str] | None = None,
    address: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    dry_run: bool = False,
) -> list[MixResult]:
    """Count, plan and write every mixture of ``recipe`` (or those named in ``only``).

    Raises :class:`RecipeError` for a recipe the pools cannot satisfy, before writing anything;
    ``dry_run`` stops after the plan and returns the would-be manifests. Raises
    :class:`curation.io.outputs.OutputError` before reading the pools for a mixture folder that overlaps a
    pool or holds what this tool did not write, and before writing for one that another run is writing.
    """
    from curation.runner import configure_data_context, ray_session

    if only:
        unknown = [n for n in only if n not in {m.name for m in recipe.mixtures}]
        if unknown:
            raise RecipeError(
                recipe.file,
                [
                    (
                        f"--only {', '.join(unknown)}: no such mixture (the recipe has "
                        f"{', '.join(m.name for m in recipe.mixtures)})"
                    )
                ],
            )
        recipe.mixtures = [m for m in recipe.mixtures if m.name in only]
    out_root = recipe.output.path.rstrip("/")
    out_root = out_root if cfs.is_uri(out_root) else os.path.abspath(out_root)
    folders = [f"{out_root}/{m.name}" for m in recipe.mixtures]
    for folder in folders:
        outputs.check_overlap(folder, [(f"pools.{n}", p) for n, p in recipe.pools.items()])
    outputs.check_writable(out_root, "mixtures-root")
    for folder in folders:
        outputs.check_writable(folder, "mixture", overwrite)
    tokenizer = Tokenizer.load(
        recipe.tokenizer, allow_download=recipe.allow_download
    )  # fail before Ray starts
    tokenizer_path = tokenizer.source
    pools = open_pools(recipe)
    pool_names = sorted(pools)
    pool_index = {n: i for i, n in enumerate(pool_names)}
    selectors = _selectors(recipe, pool_index)
    sel_index = {s.key: i for i, s in enumerate(selectors)}
    t0 = time.perf_counter()
    with ray_session(address, recipe.execution.num_cpus), contextlib.ExitStack() as held:
        import ray

        configure_data_context()
        workers = recipe.execution.num_workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        t1 = time.perf_counter()
        counts = _count(recipe, pools, pool_names, selectors, tokenizer_path, workers, progress)
        t2 = time.perf_counter()
        plans_by_mix, problems = {}, []
        for mix in recipe.mixtures:
            plans, probs = plan_mixture(mix, counts, sel_index, recipe.seed)
            plans_by_mix[mix.name] = plans
            problems += probs
        if problems:
            raise RecipeError(recipe.file, problems)
        timings = {
            "ray_start_s": t1 - t0,
            "count_s": t2 - t1,
            "plan_s": time.perf_counter() - t2,
            "rows_counted": counts.height,
            "count_rows_per_s": counts.height / max(t2 - t1, 1e-9),
        }
        if not dry_run:  # one writer per mixture folder, until every mixture is written
            outputs.claim(out_root, "mixtures-root")
            for folder in folders:
                held.enter_context(outputs.lock(folder, f"curation mix {recipe.file}"))
        results = []
        for mix in recipe.mixtures:
            results.append(
                _write_mixture(
                    recipe,
                    mix,
                    plans_by_mix[mix.name],
                    counts,
                    pools,
                    pool_names,
                    tokenizer,
                    workers,
                    overwrite,
                    progress,
                    dry_run,
                    dict(timings),
                )
            )
    return results


def _count(
    recipe: MixRecipe,
    pools: dict[str, PoolInfo],
    pool_names: list[str],
    selectors: list[Selector],
    tokenizer_path: str,
    workers: int,
    progress: bool,
) -> pl.DataFrame:
    from curation.runner import map_items, progress_bar

    items = [
        {"pool": pi, "shard": si, "path": s["path"], "rows": s["rows"]}
        for pi, name in enumerate(pool_names)
        for si, s in enumerate(pools[name].shards)
    ]
    if not items:
        raise RecipeError(recipe.file, [f"pools.{n}: the pool holds no rows" for n in pool_names])
    # Heavy shards first, dealt out by stride, so no task is left as the tail.
    items.sort(key=lambda it: -it["rows"])
    tasks = min(len(items), workers * 4)
    dealt = [items[i] for b in range(tasks) for i in range(b, len(items), tasks)]
    bar = progress_bar(len(items), "shards", progress, "count tokens")
    tables = []
    kwargs = {
        "selectors": selectors,
        "tokenizer_path": tokenizer_path,
        "allow_download": False,
        "vision": recipe.vision,
        "markup": recipe.markup,
        "batch_rows": recipe.execution.batch_rows,
    }
    for batch in map_items(dealt, _count_batch, kwargs, workers, tasks):
        for blob, k in zip(batch["ipc"], batch["shards"]):
            tables.append(pa.ipc.open_stream(io.BytesIO(blob)).read_all())
            bar.update(int(k))
    bar.close()
    counts = pl.from_arrow(pa.concat_tables(tables)).sort("pool", "shard", "row")
    return counts


def _write_mixture(
    recipe: MixRecipe,
    mix: Mixture,
    plans: list[SourcePlan],
    counts: pl.DataFrame,
    pools: dict[str, PoolInfo],
    pool_names: list[str],
    tokenizer: Tokenizer,
    workers: int,
    overwrite: bool,
    progress: bool,
    dry_run: bool,
    timings: dict[str, float],
) -> MixResult:
    """Write one mixture; ``timings`` (seconds of the shared passes) goes to its stats.json with its own."""
    from curation.runner import map_items, progress_bar

    out_root = recipe.output.path.rstrip("/")
    out_root = out_root if cfs.is_uri(out_root) else os.path.abspath(out_root)
    root = f"{out_root}/{mix.name}"
    sel = selection_table(mix, plans, counts, recipe.seed, recipe.output.shard_rows)
    schema = output_schema(
        [pools[n].schema for n in pool_names if any(s.pool == n for s in mix.sources.values())]
    )
    manifest = _manifest(recipe, mix, plans, sel, pools, tokenizer)
    if dry_run:
        return MixResult(mix.name, root, manifest, None, timings)
    t_write = time.perf_counter()

    folder = outputs.OutputFolder(root, "mixture")
    fs, path = folder.fs, folder.path
    folder.prepare({"mixture_hash": _mixture_hash(recipe, mix)}, overwrite=overwrite)
    commit.write_bytes(
        f"{path}/_work/plan.parquet",
        _parquet_bytes(
            sel.select(
                "pool", "shard", "row", "position", "out_shard", *[f.name for f in MIX_FIELDS]
            ).to_arrow()
        ),
        fs,
    )

    n_out = int(sel["out_shard"].max()) + 1 if sel.height else 0
    done = {n: rec["entry"] for n, rec in folder.done_records().items()}
    pending = [k for k in range(n_out) if k not in done]
    if done:
        log.info("%s: resuming, %d of %d shards already written", mix.name, len(done), n_out)
    job = WriteJob(root, schema, recipe.output.formats)
    if pending:
        feeds = (
            sel.filter(pl.col("out_shard").is_in(pending))
            .group_by("pool", "shard")
            .agg(pl.len())
            .sort("len", descending=True)
        )
        items = [
            {"pool": int(p), "shard": int(s), "path": pools[pool_names[p]].shards[s]["path"]}
            for p, s in zip(feeds["pool"], feeds["shard"])
        ]
        tasks = min(len(items), workers * 4)
        bar = progress_bar(len(items), "shards", progress, f"{mix.name}: scatter")
        for batch in map_items(items, _scatter_batch, {"job": job, "pending": pending}, workers, tasks):
            bar.update(int(batch["done"].sum()))
        bar.close()
        buckets = (
            sel.filter(pl.col("out_shard").is_in(pending))
            .group_by("out_shard", "pool", "shard")
            .agg(pl.len())
            .sort("out_shard", "pool", "shard")
        )
        gather = []
        for out in pending:
            b = buckets.filter(pl.col("out_shard") == out)
            gather.append(
                {
                    "out_shard": out,
                    "rows": int(b["len"].sum()),
                    "buckets": [f"{p:03d}_{s:05d}.parquet" for p, s in zip(b["pool"], b["shard"])],
                }
            )
        bar = progress_bar(len(gather), "shards", progress, f"{mix.name}: write")
        for batch in map_items(gather, _gather_batch, {"job": job}, workers, min(len(gather), workers * 4)):
            for rec in batch["record"]:
                rec = json.loads(rec)
                done[rec["out_shard"]] = rec["entry"]
                bar.update(1)
        bar.close()
    folder.sweep_temp()  # every task is done: what is left under a temp name was a killed worker's
    manifest["shards"] = [done[k] for k in range(n_out)]
    manifest["totals"]["shards"] = n_out
    manifest["totals"]["bytes"] = sum(
        s[k]["bytes"] for s in manifest["shards"] for k in ("parquet", "tar") if k in s
    )
    commit.write_bytes(
        f"{path}/manifest.json", json.dumps(manifest, indent=2, ensure_ascii=False).encode(), fs
    )
    fs.delete_dir_contents(f"{path}/_work/buckets", missing_dir_ok=True)
    timings["write_s"] = time.perf_counter() - t_write
    timings["shards_written"] = len(pending)
    commit.write_bytes(
        f"{path}/stats.json",
        json.dumps(
            {k: round(v, 3) if isinstance(v, float) else v for k, v in timings.items()}, indent=2
        ).encode(),
        fs,
    )
    report = None
    if recipe.output.report:
        from curation.mix.report import write_mix_report

        report = write_mix_report(root, manifest, sel)
    return MixResult(mix.name, root, manifest, report, timings)


def output_schema(schemas: list[pa.Schema]) -> pa.Schema:
    """The row schema, then every extra column of the pools (score columns) sorted, then the mix columns."""
    extra: dict[str, pa.Field] = {}
    for s in schemas:
        for f in s:
            if f.name not in ROW_SCHEMA.names and f.name not in extra:
                extra[f.name] = f
    return pa.schema([*ROW_SCHEMA, *(extra[k] for k in sorted(extra)), *MIX_FIELDS])


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def _mixture_hash(recipe: MixRecipe, mix: Mixture) -> str:
    """Recipe hash plus this mixture's name: what a resumed write must agree on."""
    return hashlib.sha256(f"{recipe.hash}/{mix.name}".encode()).hexdigest()[:16]


def _group_tokens(sel: pl.DataFrame, by: str) -> dict[str, dict[str, int]]:
    g = (
        sel.group_by(by)
        .agg(
            rows=pl.len(),
            text_tokens=pl.col("text_tokens").sum(),
            visual_tokens=pl.col("visual_tokens").sum(),
            tokens=pl.col("tokens").sum(),
        )
        .sort(by)
    )
    return {
        str(r[by]): {k: int(r[k]) for k in ("rows", "tokens", "text_tokens", "visual_tokens")}
        for r in g.iter_rows(named=True)
    }


def _manifest(
    recipe: MixRecipe,
    mix: Mixture,
    plans: list[SourcePlan],
    sel: pl.DataFrame,
    pools: dict[str, PoolInfo],
    tokenizer: Tokenizer,
) -> dict[str, Any]:
    unit = mix.unit
    by_source = _group_tokens(sel, "mix_source")
    sources = {}
    for p in plans:
        got = by_source.get(p.name, {"rows": 0, "tokens": 0, "text_tokens": 0, "visual_tokens": 0})
        ledger = []
        for epoch in range(len(p.rows)):
            ep = sel.filter((pl.col("mix_source") == p.name) & (pl.col("mix_epoch") == epoch))
            ledger.append(
                {
                    "epoch": epoch,
                    "rows": ep.height,
                    "tokens": int(ep["tokens"].sum()),
                    "complete": epoch < p.full_epochs,
                }
            )
        sources[p.name] = {
            **resolved_source(p.spec),
            "target": p.target,
            "selected": p.selected,
            "deviation": p.selected - p.target,
            **got,
            "available": {"rows": p.candidates, unit: p.available, "uncountable_rows": p.uncountable},
            "epochs": round(p.epochs, 6),
            "repeated_rows": int(sum(len(r) for r in p.rows[1:])),
            "ledger": ledger,
        }
    target = sum(p.target for p in plans)
    selected = sum(p.selected for p in plans)
    try:
        tokenizer_sha256 = commit.sha256_file(tokenizer.source)
    except (OSError, ValueError):  # a hub name, not a file
        tokenizer_sha256 = None
    return {
        "format": FORMAT,
        "name": mix.name,
        "recipe": recipe.resolved,
        "recipe_hash": recipe.hash,
        "seed": recipe.seed,
        "unit": unit,
        "tokenizer": {
            "source": os.path.basename(tokenizer.source)
            if not cfs.is_uri(tokenizer.source)
            else tokenizer.source,
            "sha256": tokenizer_sha256,
        },
        "vision": dataclasses.asdict(recipe.vision),
        "markup": dataclasses.asdict(recipe.markup),
        "pools": {
            n: {"path": pools[n].root, "recipe_hash": pools[n].recipe_hash, "rows": pools[n].rows}
            for n in sorted({s.pool for s in mix.sources.values()})
        },
        "budget": {
            "requested": mix.budget if mix.budget is not None else "auto",
            "target": target,
            "selected": selected,
            "deviation": selected - target,
            "deviation_pct": round(100.0 * (selected - target) / target, 6) if target else 0.0,
        },
        "sources": sources,
        "modes": _group_tokens(sel.with_columns(pl.col("mode").fill_null("(none)")), "mode"),
        "modalities": _group_tokens(sel.with_columns(pl.col("modality").fill_null("(none)")), "modality"),
        "shards": [],
        "totals": {
            "rows": sel.height,
            "tokens": int(sel["tokens"].sum()),
            "text_tokens": int(sel["text_tokens"].sum()),
            "visual_tokens": int(sel["visual_tokens"].sum()),
            "unique_rows": sel["id"].n_unique(),
            "shards": 0,
            "bytes": 0,
        },
    }


def iter_plan(results: list[MixResult]) -> Iterator[str]:
    """Lines describing each mixture (for the command's summary)."""
    for r in results:
        m = r.manifest
        b = m["budget"]
        yield (
            f"{r.name}: {m['totals']['rows']:,} rows, {m['totals']['tokens']:,} tokens "
            f"(target {b['target']:,} {m['unit']}, got {b['selected']:,}, deviation {b['deviation']:+,})"
        )
        for name, s in m["sources"].items():
            yield (
                f"  {name:<22}{s['rows']:>9,} rows {s['tokens']:>13,} tokens  target {s['target']:>12,} "
                f"{m['unit']:<6} dev {s['deviation']:+,}  epochs {s['epochs']:.2f}"
            )
