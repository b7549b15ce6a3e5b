"""The only module that builds Ray Data plans.

A pipeline run is:

1. plan units (one per input file or Parquet row-group range) on the driver, deterministically;
2. if a stage needs a global index (exact dedup), a parallel pre-pass reads the index columns of
   every unit (cached under ``_work/index``); the index is built once, in parallel tasks over id
   ranges when the stage allows it (so no process holds every row), and put in the object store;
3. a Ray Data plan maps each pending unit through a pool of actors (stages ``setup()`` once per
   actor): read -> stages -> shards + rejects, committed per unit (see :mod:`curation.io.pool`);
4. the driver merges the units' counters into ``stats.json``, writes ``manifest.json`` and the report.

Units are the grain of parallelism, so a plan over few large files still uses every worker.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import pickle
import sys
import time
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from curation import secrets
from curation.io import fs as cfs
from curation.io import outputs
from curation.io.pool import Pool, UnitSink, commit_done
from curation.io.readers import INGEST, UNIT_FAILED, Unit, plan_units, read_unit
from curation.recipe import PipelineRecipe
from curation.schema import REJECT_COLUMNS, ROW_SCHEMA, conform
from curation.stage import GlobalFilter, IndexedFilter, NotReady, ScoreFilter, Stage

log = logging.getLogger(__name__)


def pipeline_schema(stages: list[Stage]) -> pa.Schema:
    """ROW_SCHEMA plus every stage's extra columns, in pipeline order."""
    fields = list(ROW_SCHEMA)
    for s in stages:
        if isinstance(s, ScoreFilter):
            fields += [f for f in s.output_fields() if f.name not in {x.name for x in fields}]
    return pa.schema(fields)


# ---------------------------------------------------------------- per-unit work (runs in workers)


@dataclass
class UnitJob:
    """Everything a worker needs to process units; shipped once per actor."""

    stages: list[Stage]
    root: str
    recipe_hash: str
    formats: list[str]
    shard_rows: int
    shard_bytes: int
    write_rejects: bool
    batch_rows: int
    token: str = ""  # identifies this job's set-up stages in a worker process (see _ready)
    schema_stages: list[Stage] | None = None  # the whole pipeline, when ``stages`` is only its first part
    video: str = "both"  # what video rows keep in the shards written (curation.io.pool.video_payload)
    reject_media: bool = False  # rejects keep the bytes of media that did not decode (output.reject_media)

    @property
    def schema(self) -> pa.Schema:
        return pipeline_schema(self.schema_stages or self.stages)


def _new_counter() -> dict[str, Any]:
    return {"rows_in": 0, "rows_out": 0, "drops": {}, "outcomes": {}, "seconds": 0.0}


def _count_outcomes(counter: dict, before: pa.Table, after: pa.Table, column: str) -> None:
    """Values ``column`` took on this batch (rows that had none before the stage ran)."""
    values = after[column]
    if column in before.column_names:
        values = values.filter(pc.is_null(before[column]))
    for item in pc.value_counts(values.drop_null()).to_pylist():
        counter["outcomes"][item["values"]] = counter["outcomes"].get(item["values"], 0) + item["counts"]


def _count_drops(counter: dict, table: pa.Table, stage: str) -> None:
    mask = pc.equal(table["reject_stage"], stage)
    if not pc.any(mask).as_py():
        return
    for item in pc.value_counts(table.filter(mask)["reject_reason"]).to_pylist():
        counter["drops"][item["values"]] = counter["drops"].get(item["values"], 0) + item["counts"]


def apply_stages(table: pa.Table, stages: list[Stage], counters: dict[str, dict]) -> pa.Table:
    """Run ``stages`` over one batch, counting rows in/out, drops by reason and time per stage.

    A stage that raises on a batch does not stop the run: the batch's live rows are rejected with
    reason ``stage_error`` and the exception text, so the failure is counted and visible.
    """
    alive = _alive(table)
    for stage in stages:
        c = counters[stage.label]
        c["rows_in"] += alive  # what the previous stage let through
        t0 = time.perf_counter()
        before = table
        try:
            table = stage(table)
            if stage.outcome_column and stage.outcome_column in table.column_names:
                _count_outcomes(c, before, table, stage.outcome_column)
        except Exception as e:  # noqa: BLE001 - isolate the batch, never the run
            log.exception("stage %s failed on a batch of %d rows", stage.label, table.num_rows)
            from curation.stage import mark_rejected

            live = pc.indices_nonzero(pc.is_null(table["reject_reason"]))
            table = mark_rejected(
                table,
                live,
                stage.label,
                pa.array(["stage_error"] * len(live)),
                pa.array([f"{type(e).__name__}: {e}"[:500]] * len(live)),
            )
        c["seconds"] += time.perf_counter() - t0
        _count_drops(c, table, stage.label)
        alive = _alive(table)
        c["rows_out"] += alive
    return table


def _alive(table: pa.Table) -> int:
    """Rows not rejected so far."""
    return table["reject_reason"].null_count


def process_unit(unit: Unit, job: UnitJob) -> dict[str, Any]:
    """Read one unit, run the stages, write and commit its shards; return its done record."""
    t_start, started_at = time.perf_counter(), time.time()
    schema = job.schema
    shard_schema = pa.schema([f for f in schema if f.name not in REJECT_COLUMNS])
    sink = UnitSink(
        job.root,
        unit.index,
        shard_schema,
        schema,
        job.formats,
        job.shard_rows,
        job.shard_bytes,
        job.write_rejects,
        job.video,
        reject_media=job.reject_media,
    )
    counters = {INGEST: _new_counter(), **{s.label: _new_counter() for s in job.stages}}
    errors: list[str] = []
    write_s = 0.0
    hash_col = None
    reader = read_unit(unit, job.batch_rows)
    while True:
        t0 = time.perf_counter()
        table = next(reader, None)
        counters[INGEST]["seconds"] += time.perf_counter() - t0
        if table is None:
            break
        ingest = counters[INGEST]
        ingest["rows_in"] += table.num_rows
        _count_drops(ingest, table, INGEST)
        ingest["rows_out"] += _alive(table)
        errors += table.filter(pc.is_in(table["reject_reason"], pa.array(["unreadable_file", UNIT_FAILED])))[
            "reject_detail"
        ].to_pylist()
        if hash_col is None or len(hash_col) != table.num_rows:
            hash_col = pa.array([job.recipe_hash] * table.num_rows, pa.string())
        table = table.set_column(table.schema.get_field_index("recipe_hash"), "recipe_hash", hash_col)
        table = apply_stages(table, job.stages, counters)
        table = conform(table, schema)
        rejected = pc.is_valid(table["reject_reason"])
        t0 = time.perf_counter()
        with _storage(unit, job, sink):
            sink.reject(table.filter(rejected))
            sink.write(table.filter(pc.invert(rejected)).select(shard_schema.names))
        write_s += time.perf_counter() - t0
    with _storage(unit, job, sink):
        outputs = sink.close()
    record = {
        "unit": unit.index,
        "uri": unit.uri,
        "source": unit.source,
        "recipe_hash": job.recipe_hash,
        "counters": counters,
        "errors": errors,
        "started_at": started_at,
        "seconds": time.perf_counter() - t_start,
        "write_seconds": write_s,
        "worker": f"{os.uname().nodename}:{os.getpid()}",
        **outputs,
    }
    with _storage(unit, job, sink):
        commit_done(job.root, record)
    return record


@contextlib.contextmanager
def _storage(unit: Unit, job: UnitJob, sink: UnitSink):
    """A write that fails (a full disk, a failing object store) fails the unit with a StorageError that says where;
    its temp files are removed, its committed parts are never listed (the unit has no done record)."""
    try:
        with cfs.writing(job.root, f"unit {unit.index} ({unit.uri}): "):
            yield
    except cfs.StorageError:
        sink.abort()
        raise


def _storage_failure(e: BaseException) -> cfs.StorageError | None:
    """The StorageError behind an exception a Ray task raised (Ray wraps it, sometimes twice), if any."""
    seen, text = set(), str(e)
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, cfs.StorageError):
            return e
        e = getattr(e, "cause", None) or e.__cause__ or e.__context__
    # Ray Data wraps a task's exception in UserCodeException, whose cause reaches the driver only as text
    marker = f"{cfs.StorageError.__module__}.StorageError: "
    if marker in text:
        return cfs.StorageError(text.split(marker, 1)[1].splitlines()[0])
    return None


@contextlib.contextmanager
def _stops_cleanly(root: str) -> Iterator[None]:
    """Once the pool is prepared, a write or read under ``root`` that fails (a full disk, an object store gone)
    in a task or on the driver stops the run with what happened and what to do; what was committed stays."""
    try:
        with cfs.writing(root):
            yield
    except Exception as e:
        if _storage_failure(e) is None:
            raise
        raise _stopped(e, root) from None


def _stopped(e: BaseException, root: str) -> cfs.StorageError:
    out = cfs.StorageError(
        f"{_storage_failure(e)}\nThe run stopped. Units finished before the failure are kept in {root}; free space "
        "(or fix the store) and run the same command again: it resumes where it stopped."
    )
    out.partial = True
    return out


def split_at_cuts(stages: list[Stage]) -> tuple[list[Stage], dict[str, list[Stage]]]:
    """The stages of the unit pass, and the stages after each pool-wide cut (up to the next cut).

    A global cut (``keep_fraction``, near-duplicate clusters) is known only once every row has been scored, so
    the unit pass stops at the first such stage; the stages after it run on the rows the cut keeps, shard by
    shard (an expensive VLM judge after DataComp's "top 30%" CLIP cut sees 30% of the rows, not all of them).
    """
    cuts = [i for i, s in enumerate(stages) if isinstance(s, ScoreFilter) and s.cuts]
    if not cuts:
        return list(stages), {}
    for s in stages[cuts[0] + 1 :]:
        if isinstance(s, IndexedFilter) and s.index_columns:
            raise ValueError(
                f"stage '{s.label}' indexes the whole corpus before filtering it, so it must come before "
                f"'{stages[cuts[0]].label}', whose cut runs after every row is scored: "
                f"move it up the stages list"
            )
    bounds = cuts + [len(stages) - 1]
    return (
        list(stages[: cuts[0] + 1]),
        {stages[c].label: list(stages[c + 1 : nxt + 1]) for c, nxt in zip(cuts, bounds[1:])},
    )


def _tail(job: UnitJob, index_refs: list):
    """In a worker: the stages after a cut as a function of the kept rows of one shard (see threshold_shard)."""
    job = _ready(job, index_refs)
    schema = job.schema

    def run(table: pa.Table) -> tuple[pa.Table, dict]:
        counters = {s.label: _new_counter() for s in job.stages}
        parts = [
            apply_stages(pa.Table.from_batches([b], table.schema), job.stages, counters)
            for b in table.to_batches(max_chunksize=job.batch_rows)
        ]
        out = pa.concat_tables([conform(p, schema) for p in parts]) if parts else schema.empty_table()
        return out, counters

    return run


def index_unit(unit: Unit, columns: tuple[str, ...], batch_rows: int) -> pa.Table:
    """The index columns of every row of a unit, plus the unit number (for input order)."""
    parts = [t.select(list(columns)) for t in read_unit(unit, batch_rows)]
    table = pa.concat_tables(parts) if parts else ROW_SCHEMA.empty_table().select(list(columns))
    return table.append_column("unit", pa.array([unit.index] * table.num_rows, pa.int64()))


# Stages set up in this worker process, by job token. Ray reuses worker processes across tasks, so
# models load once per worker and both passes run on warm, already-started workers (no actor start-up).
_READY: dict[str, UnitJob] = {}


def _ready(job: UnitJob, index_refs: list) -> UnitJob:
    ready = _READY.get(job.token)
    if ready is None:
        import ray

        for stage in job.stages:
            stage.setup()
        for stage, ref in zip([s for s in job.stages if isinstance(s, IndexedFilter)], index_refs):
            stage.use_index(ray.get(ref))
        _READY.clear()
        _READY[job.token] = ready = job
    return ready


def _process_batch(batch: dict[str, np.ndarray], job: UnitJob, index_refs: list) -> dict[str, np.ndarray]:
    job = _ready(job, index_refs)
    fs, path = cfs.filesystem(job.root)
    records = []
    for unit in _units(batch):
        # A retried task (a worker died) skips the units it had already committed.
        try:
            with fs.open_input_stream(f"{path}/_work/done/{unit.index:05d}.json") as f:
                records.append(f.read().decode())
            continue
        except (FileNotFoundError, OSError):
            pass
        records.append(json.dumps(process_unit(unit, job)))
    return {"record": np.array(records, dtype=object)}


def _index_batch(batch: dict[str, np.ndarray], root: str, columns: tuple[str, ...], batch_rows: int) -> dict:
    fs, path = cfs.filesystem(root)
    done, rows = [], []
    for unit in _units(batch):
        table = index_unit(unit, columns, batch_rows)
        out = f"{path}/_work/index/{unit.index:05d}.parquet"
        tmp = f"{out}.tmp-{os.getpid()}"
        with cfs.writing(root, f"indexing unit {unit.index} ({unit.uri}): "):
            with fs.open_output_stream(tmp) as f:
                pq.write_table(table, f)
            fs.move(tmp, out)
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


def _units(batch: dict[str, np.ndarray]) -> Iterator[Unit]:
    for item in batch["item"]:
        yield Unit(**json.loads(item))


# ---------------------------------------------------------------- driver


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None) -> Iterator[None]:
    """Use a running Ray (tests, notebooks), connect to ``address``/``RAY_ADDRESS``, or start a local one."""
    import ray

    if ray.is_initialized():
        yield
        return
    address = address or os.environ.get("RAY_ADDRESS")
    kwargs: dict[str, Any] = dict(
        include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING, configure_logging=True
    )
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=num_cpus or os.cpu_count(), object_store_memory=1 << 30, **kwargs)
    try:
        yield
    finally:
        ray.shutdown()


@dataclass
class RunResult:
    pool: str
    manifest: dict[str, Any]
    stats: dict[str, Any]
    report: str | None


def run_pipeline(
    recipe: PipelineRecipe, *, address: str | None = None, overwrite: bool = False, progress: bool = True
) -> RunResult:
    """Run a validated pipeline recipe as a Ray Data job and write its pool.

    Before anything is read, refuses (:class:`curation.io.outputs.OutputError`) an output that overlaps a
    source, or a folder this tool did not write; from when the pool is prepared until it is written, holds the
    output's lock, so a second run on it is refused naming this one."""
    root = recipe.output.path if cfs.is_uri(recipe.output.path) else os.path.abspath(recipe.output.path)
    outputs.check_overlap(
        root,
        [
            (f"sources.{i}.{key}", p)
            for i, s in enumerate(recipe.sources)
            for key in ("paths", "media_roots")
            for p in getattr(s, key)
        ],
    )
    outputs.check_writable(root, "pool", overwrite)
    with contextlib.ExitStack() as held:
        return _run_pipeline(recipe, root, address, overwrite, progress, held)


def _run_pipeline(
    recipe: PipelineRecipe,
    root: str,
    address: str | None,
    overwrite: bool,
    progress: bool,
    held: contextlib.ExitStack,
) -> RunResult:
    """:func:`run_pipeline` once its output is checked; ``held`` keeps the output's lock until it returns."""
    for stage in recipe.stages:  # before any data is read: packages, weights, endpoints, GPUs
        stage.check_requirements()
        try:
            stage.preflight()
        except NotReady:
            raise
        except (ValueError, OSError) as e:
            raise NotReady(f"stage '{stage.label}': {e}") from e
    units = plan_units(recipe.sources, recipe.execution.unit_rows, recipe.limits)
    pool = Pool(root, recipe.hash)
    t_start = time.perf_counter()
    with ray_session(address, recipe.execution.num_cpus):
        import ray

        t0 = time.perf_counter()  # pipeline time excludes starting Ray (a cluster is already up)

        configure_data_context()
        head, tails = split_at_cuts(recipe.stages)
        cpus_per_task, gpus_per_task = task_resources(head)
        check_gpus(recipe.stages, ray.cluster_resources().get("GPU", 0))
        held.enter_context(outputs.lock(root, f"curation run {recipe.file}"))
        pool.prepare(recipe.resolved, overwrite=overwrite)
        workers = _workers(recipe, head, cpus_per_task, gpus_per_task)
        with _stops_cleanly(root):  # from here on, a failing disk or store stops the run cleanly
            done = pool.done_records()
            pending = [u for u in units if u.index not in done]
            if done:
                log.info("resuming: %d of %d units already done", len(done), len(units))
            index_refs = _build_indexes(recipe, head, units, root, workers, progress) if pending else []
            job = UnitJob(
                head,
                root,
                recipe.hash,
                recipe.output.formats,
                recipe.output.shard_rows,
                recipe.output.shard_bytes,
                recipe.output.write_rejects,
                recipe.execution.batch_rows,
                token=uuid.uuid4().hex,
                schema_stages=recipe.stages,
                video="both" if tails else video_payload_of(recipe),
                reject_media=recipe.output.reject_media,
            )  # after a cut, the last cut writes it
            if pending:
                bar = progress_bar(len(pending), "units", progress)
                rows = 0
                # About four units per task: each task costs ~0.15 s to schedule on a busy 2-CPU node, a unit
                # ~0.4 s of work; at least 8 tasks per worker keep the tail short.
                tasks = min(len(pending), max(workers * 8, len(pending) // 4))
                for batch in _map_units(
                    pending,
                    _process_batch,
                    {"job": job, "index_refs": index_refs},
                    workers,
                    tasks,
                    cpus_per_task,
                    gpus_per_task,
                ):
                    for rec in batch["record"]:
                        rec = json.loads(rec)
                        done[rec["unit"]] = rec
                        rows += rec["counters"][INGEST]["rows_in"]
                        bar.set_postfix_str(
                            f"{rows:,} rows, {rows / max(time.perf_counter() - t0, 1e-9):,.0f} rows/s"
                        )
                        bar.update(1)
                bar.close()
            records = [done[u.index] for u in units]
            replaced, extra_rejects, global_stats, tail_counters = _global_cuts(
                recipe, records, root, tails, units, progress
            )
            pool.sweep_temp()  # every task is done: what is left under a temp name was a killed worker's
            t_end = time.perf_counter()
    ray_stop_s = time.perf_counter() - t_end
    lineage = {s.label: s.lineage() for s in recipe.stages if s.lineage()}
    with _stops_cleanly(root):  # the manifest is one object, written last: a pool has all of it or none
        manifest = pool.write_manifest(recipe.resolved, records, replaced, extra_rejects, lineage)
        stats = _stats(
            records,
            recipe.stages,
            root,
            t_end - t0,
            tail_counters,
            global_stats,
            rows_out=manifest["totals"]["rows"],
        )
        stats["ray_start_s"], stats["ray_stop_s"] = round(t0 - t_start, 3), round(ray_stop_s, 3)
        pool.write_json("stats.json", stats)
    report = None
    if recipe.output.report and cfs.is_uri(root):
        log.warning(
            "report.html is written for local pools only; run `curation report` on a local copy of %s", root
        )
    elif recipe.output.report:
        from curation.report import write_report

        report = str(write_report(root)[0])
    return RunResult(root, manifest, stats, report)


def _global_cuts(
    recipe: PipelineRecipe,
    records: list[dict],
    root: str,
    tails: dict[str, list[Stage]],
    units: list[Unit],
    progress: bool,
) -> tuple[dict[str, dict], list[dict], list[dict], list[dict]]:
    """Pool-wide decisions, in stage order: for each score filter with ``keep_fraction``, keep the top fraction
    of all rows it scored (DataComp's "top 30%"), not per batch; for each :class:`GlobalFilter`, what its
    ``decide_global`` rejects (near-duplicate clusters).

    The unit pass only scored. Here the decision is made once on the driver and recorded under
    ``_work/global/<stage>.json`` before any shard changes, so a rerun applies the same one; then each shard's
    rejected rows move to a rejects file (:func:`curation.io.pool.cut_shard`) and the stages after the cut
    (``tails``, up to the next cut) run on the rows kept. Returns the rewritten shard entries by name, their
    rejects files, one stats entry per cut, and the counters of the stages after the cuts (one dict per shard).
    """
    from curation.io.pool import _commit_bytes

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
                _decide_threshold(stage, files, fs, schema)
                if stage.keep_fraction is not None
                else _decide_global(stage, files, fs, schema)
            )
            fs.create_dir(f"{path}/_work/global", recursive=True)
            _commit_bytes(fs, rec_path, json.dumps(rec).encode())
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
        workers = _workers(recipe, tail, cpus, gpus)
        tail_job = None
        if tail:
            tail_job = UnitJob(
                tail,
                root,
                recipe.hash,
                recipe.output.formats,
                recipe.output.shard_rows,
                recipe.output.shard_bytes,
                recipe.output.write_rejects,
                recipe.execution.batch_rows,
                token=uuid.uuid4().hex,
                schema_stages=recipe.stages,
            )
            kwargs["tail_job"] = tail_job
            kwargs["index_refs"] = _build_indexes(recipe, tail, units, root, workers, progress)
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


def video_payload_of(recipe: PipelineRecipe) -> str:
    """``output.video`` resolved: ``auto`` is ``both`` when a video source keeps clips, else ``frames``."""
    if recipe.output.video != "auto":
        return recipe.output.video
    return "both" if any((s.video or {}).get("clip") for s in recipe.sources) else "frames"


def scan_columns(
    fs: pafs.FileSystem,
    files: list[str],
    columns: list[str],
    schema: pa.Schema | None = None,
    batch_rows: int = 1 << 16,
) -> Iterator[pa.RecordBatch]:
    """Batches of ``columns`` from each Parquet file in turn; a column a file lacks (an older pool, an earlier
    cut's rejects) is null, typed by ``schema``. One file's footer is held at a time: a pyarrow dataset over
    the whole pool keeps every file's, about 150 KB each, so 500 MB for a pool of a million rows."""
    for name in files:
        with fs.open_input_file(name) as f:
            pf = pq.ParquetFile(f)
            have = set(pf.schema_arrow.names)
            for b in pf.iter_batches(columns=[c for c in columns if c in have], batch_size=batch_rows):
                if any(c not in have for c in columns):
                    b = pa.RecordBatch.from_arrays(
                        [
                            b.column(c)
                            if c in have
                            else pa.nulls(b.num_rows, schema.field(c).type if schema else None)
                            for c in columns
                        ],
                        names=columns,
                    )
                yield b


def _decide_threshold(stage: ScoreFilter, files: list[str], fs, schema: pa.Schema) -> dict:
    """The ``keep_fraction`` cut: the score of the ``k = ceil(keep_fraction * n)``-th best of the ``n`` rows
    scored (shards and rejects alike: every row that reached the stage; rows tied at it are kept in lineage
    order until exactly ``k`` are)."""
    from curation.io.pool import lineage_keys

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


def _decide_global(stage: GlobalFilter, files: list[str], fs, schema: pa.Schema) -> dict:
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
    from curation.io.pool import KeyCut, ThresholdCut

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
    from curation.io.pool import cut_shard

    tail = _tail(tail_job, list(index_refs)) if tail_job is not None else None
    out = []
    for item in batch["item"]:
        entry = json.loads(item)
        with cfs.writing(kwargs["root"], f"cutting shard {entry['name']}: "):
            out.append(json.dumps(cut_shard(entry=entry, tail=tail, **kwargs)))
    return {"record": np.array(out, dtype=object)}


def _build_indexes(
    recipe: PipelineRecipe, stages: list[Stage], units: list[Unit], root: str, workers: int, progress: bool
) -> list:
    """Pre-pass for the index-then-query ``stages``: index columns of every unit (cached), one index per stage."""
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
        for batch in _map_units(todo, _index_batch, kwargs, workers, min(len(todo), workers * 8)):
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


def _map_units(
    units: list[Unit],
    fn,
    fn_kwargs: dict,
    workers: int,
    tasks: int,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
) -> Iterator[dict]:
    """Both passes of a pipeline: ``fn`` over blocks of units (``batch["item"]`` holds them as JSON).

    Input is untrusted, and a reader can take its process down with it (a native decoder's abort, memory
    that runs out): a task is retried :data:`TASK_RETRIES` times, and a plan that still fails is not the end
    of the run. The units are run again one per task, so the others finish (``fn`` skips what is committed);
    a unit whose own task fails is given up on: ``fn`` runs it once more marked failed (``Unit.failed``), which
    reads nothing and yields one ``unit_failed`` reject saying what happened. A StorageError still stops the run.
    """
    # Blocks are cut from consecutive items, and consecutive units come from the same source (heavy
    # tars, then light text files): deal units out by stride so every task gets a mix and none is the tail.
    dealt = [units[i] for b in range(tasks) for i in range(b, len(units), tasks)]
    try:
        yield from map_items([u.to_dict() for u in dealt], fn, fn_kwargs, workers, tasks, num_cpus, num_gpus)
        return
    except Exception as e:  # noqa: BLE001 - sorted out here: storage stops the run, the rest is isolated
        if _storage_failure(e) is not None:
            raise
        log.warning(
            "a task failed after %d retries (%s); running its units one per task to find the one that fails",
            TASK_RETRIES,
            _failure(e),
        )
    yield from _isolated(units, fn, fn_kwargs, num_cpus, num_gpus)


def _isolated(units: list[Unit], fn, fn_kwargs: dict, num_cpus: float, num_gpus: float) -> Iterator[dict]:
    """``fn`` over each unit in a task of its own; a unit whose task fails again is run marked failed."""
    import ray

    def call(unit: Unit) -> dict:
        return fn({"item": np.array([json.dumps(unit.to_dict())], dtype=object)}, **fn_kwargs)

    remote = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus or None, max_retries=1)(in_worker(call))
    waiting = {remote.remote(u): u for u in units}
    while waiting:
        (ref,), _ = ray.wait(list(waiting), num_returns=1)
        unit = waiting.pop(ref)
        try:
            yield ray.get(ref)
        except Exception as e:  # noqa: BLE001 - whatever killed it, this unit is given up on, not the run
            if _storage_failure(e) is not None or unit.failed:
                raise
            why = (
                f"reading this unit failed {TASK_RETRIES + 2} times ({_failure(e)}); its rows are left out. "
                f"Check the file with the tools of its format, or remove it from the source"
            )
            log.error("unit %d (%s): %s", unit.index, unit.label, why)
            waiting[remote.remote(replace(unit, failed=why))] = unit


def _failure(e: BaseException) -> str:
    """What killed a task, in one line (Ray's messages run to pages of traceback)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    died = next((ln for ln in lines if "died" in ln or "crashed" in ln or "signal" in ln.lower()), None)
    text = died or (lines[-1] if lines else "")
    return f"{type(e).__name__}: {text}"[:300]


def task_resources(stages: list[Stage]) -> tuple[float, float]:
    """(CPUs, GPUs) one unit task asks for: the most any of its fused stages needs."""
    return (
        max([s.resources.num_cpus for s in stages] or [1.0]),
        max([s.resources.num_gpus for s in stages] or [0.0]),
    )


def check_gpus(stages: list[Stage], cluster_gpus: float) -> None:
    """Refuse, before anything is read or written, stages that ask for more GPUs than the cluster has."""
    for s in stages:
        if s.resources.num_gpus > cluster_gpus:
            raise NotReady(
                f"stage '{s.label}' asks for {s.resources.num_gpus:g} GPU(s) per worker but the Ray cluster has "
                f"{cluster_gpus:g}; run on a GPU cluster (--address), or set stages.<i>.{s.name}.resources.num_gpus: 0 "
                f"to run it on CPU"
            )


def _workers(recipe: PipelineRecipe, stages: list[Stage], cpus_per_task: float, gpus_per_task: float) -> int:
    """Concurrent unit tasks: the cluster's CPUs (and GPUs) over what a task needs, capped by any stage's
    ``concurrency`` (a model-backed stage may allow fewer copies than there are CPUs: memory, rate limits)."""
    import ray

    if recipe.execution.num_workers:
        return recipe.execution.num_workers
    res = ray.cluster_resources()
    workers = max(1, int(res.get("CPU", 1) // cpus_per_task))
    if gpus_per_task:
        workers = min(workers, max(1, int(res.get("GPU", 0) // gpus_per_task)))
    caps = [s.resources.concurrency for s in stages if s.resources.concurrency]
    return min([workers, *caps])


TASK_RETRIES = 3  # a task whose worker dies is tried this many more times (Ray Data's default is without end)


def in_worker(fn):
    """``fn`` as it runs in a Ray worker: credentials masked in what the worker logs (:mod:`curation.secrets`;
    its logs go to files people share) before any of our code runs. Keeps ``fn``'s name, which names the task.
    (Ray's ``worker_process_setup_hook`` would do the same through a runtime env, at ~1.5 s a job.)"""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        secrets.install()
        return fn(*args, **kwargs)

    return run


def map_items(
    items: list[dict[str, Any]],
    fn,
    fn_kwargs: dict,
    workers: int,
    tasks: int,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
) -> Iterator[dict]:
    """The Ray Data plan of every workflow here: ``items`` split into ``tasks`` blocks of consecutive
    items, ``fn(batch, **fn_kwargs)`` over each block on at most ``workers`` concurrent tasks; yields
    ``fn``'s outputs (numpy batches) as they complete. ``batch["item"]`` holds the items as JSON strings.
    A task whose worker dies is retried :data:`TASK_RETRIES` times, then the plan fails.
    """
    import ray

    # One JSON string per item: a block mixing items with and without some key (Parquet row-group bounds)
    # would otherwise become a float column with NaNs.
    ds = ray.data.from_items([{"item": json.dumps(it)} for it in items], override_num_blocks=tasks)
    fn = in_worker(fn)
    with (
        warnings.catch_warnings()
    ):  # Ray 2.60 has no named parameter for max_retries yet; the dict still works
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*")
        ds = ds.map_batches(
            fn,
            fn_kwargs=fn_kwargs,
            batch_size=None,
            num_cpus=num_cpus,
            num_gpus=num_gpus or None,
            compute=ray.data.TaskPoolStrategy(size=min(workers, tasks)),
            max_retries=TASK_RETRIES,
        )
    yield from ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=0)


def configure_data_context() -> None:
    """Ray Data settings for our plans (call inside :func:`ray_session`)."""
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # ours count units and rows, across passes
    ctx.print_on_execution_start = False
    # Each plan is one fused operator whose outputs are small done records: holding CPUs in reserve for
    # downstream operators (the default) only idles workers; measured on 2 CPUs, 8 x 1 s tasks took
    # 6.5 s with the reservation and 4.6 s without.
    ctx.op_resource_reservation_enabled = False
    if not log.isEnabledFor(logging.DEBUG):  # Ray Data's per-dataset INFO lines drown the summary
        logging.getLogger("ray.data").setLevel(logging.ERROR)


def progress_bar(total: int, unit: str, enabled: bool, desc: str | None = None):
    """tqdm on stderr: redrawn twice a second in a terminal, a line every 30 s in a log."""
    from tqdm import tqdm

    # In a terminal, redraw twice a second; in a log (ray job logs, CI) a line every 30 s is enough.
    interval = 0.5 if sys.stderr.isatty() else 30.0
    return tqdm(
        total=total,
        unit=unit,
        desc=desc,
        disable=not enabled,
        file=sys.stderr,
        dynamic_ncols=True,
        mininterval=interval,
    )


def _stats(
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
    merged = {n: _new_counter() for n in names}
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
    hist = _histograms(stages, root, rows=rows_in)
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


def _histograms(
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
            f"{s['name']:<22}{s['rows_in']:>10,}{s['rows_out']:>10,}{dropped:>9,}{s['seconds']:>8.1f}  {reasons}"
        )
    lines.append(
        f"{'total':<22}{stats['rows_in']:>10,}{stats['rows_out']:>10,}{stats['rows_rejected']:>9,}"
        f"{stats['elapsed_s']:>8.1f}  {stats['rows_per_s']:,} rows/s (wall clock, Ray start-up excluded)"
    )
    return "\n".join(lines)
