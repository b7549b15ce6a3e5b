"""Planning and execution: the only module that builds Ray Data plans.

Every workflow here is one plan shape (:func:`map_items`): a list of small JSON items (units of input,
shards, id ranges) split into blocks, a function over each block on at most ``workers`` concurrent tasks,
its outputs streamed back to the driver as they finish. A pipeline's unit pass maps :func:`process_batch`
over the pending units (:func:`map_units`); :mod:`curation.pipeline` drives the run, :mod:`curation.poolwide`
the passes before and after it that need the whole pool.

**Why a unit runs as one fused task** (read -> every stage -> shards and rejects -> commit), not as a
Ray Data pipeline of one operator per stage:

- *Exactly once.* A unit's rows are committed with its done record by the task that read them. A killed
  worker's unit is redone from its file, and a rerun skips done units; nothing is half in the object store.
- *Bad input costs one unit.* A reader that kills its process takes down one task, which is retried, then
  isolated (:func:`map_units`), never a shared operator that many units flow through.
- *Little data moves.* Images and frames stay in the process that decoded them; only done records (a few
  KB) reach the driver and the object store.

What it costs: a task asks for the largest ``num_cpus``/``num_gpus`` of its stages (:func:`task_resources`),
so a GPU stage's tasks also do the reading and decoding on the GPU worker's CPUs, and the model is idle while
they do. CPU reading and accelerator scoring do not overlap across tasks of different shapes, and a model is
loaded once per worker process rather than once per actor pool. Stages that decide over the whole pool cut
the fused chain in two (:func:`curation.stage.split_at_cuts`): the stages after a cut run fused on the shards
it keeps (:func:`tail_runner`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
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

from curation import secrets
from curation.io import fs as cfs
from curation.io.pool import Pool, UnitSink
from curation.io.readers import INGEST, UNIT_FAILED, Unit, read_unit
from curation.recipe import PipelineRecipe
from curation.schema import REJECT_COLUMNS, ROW_SCHEMA, conform
from curation.stage import IndexedFilter, NotReady, ScoreFilter, Stage
from curation.stats import count_drops, count_outcomes, new_counter

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

    @classmethod
    def of(cls, recipe: PipelineRecipe, stages: list[Stage], root: str, **kwargs: Any) -> UnitJob:
        """The job of ``stages`` (a part of ``recipe``'s, up to a cut) writing the pool at ``root``."""
        out = recipe.output
        return cls(
            stages,
            root,
            recipe.hash,
            out.formats,
            out.shard_rows,
            out.shard_bytes,
            out.write_rejects,
            recipe.execution.batch_rows,
            token=uuid.uuid4().hex,
            schema_stages=recipe.stages,
            reject_media=out.reject_media,
            **kwargs,
        )


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
                count_outcomes(c, before, table, stage.outcome_column)
        except Exception as e:  # isolate the batch, never the run
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
        count_drops(c, table, stage.label)
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
    counters = {INGEST: new_counter(), **{s.label: new_counter() for s in job.stages}}
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
        count_drops(ingest, table, INGEST)
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
        Pool(job.root, job.recipe_hash).commit_done(unit.index, record)
    return record


@contextlib.contextmanager
def _storage(unit: Unit, job: UnitJob, sink: UnitSink):
    """A write that fails (a full disk, a failing object store) fails the unit with a StorageError that says
    where; its temp files are removed, its committed parts are never listed (the unit has no done record)."""
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
def stops_cleanly(root: str) -> Iterator[None]:
    """Once the pool is prepared, a write or read under ``root`` that fails (a full disk, an object store
    gone) in a task or on the driver stops the run with what happened and what to do; what was
    committed stays."""
    try:
        with cfs.writing(root):
            yield
    except Exception as e:
        if _storage_failure(e) is None:
            raise
        raise _stopped(e, root) from None


def _stopped(e: BaseException, root: str) -> cfs.StorageError:
    out = cfs.StorageError(
        f"{_storage_failure(e)}\nThe run stopped. Units finished before the failure are kept in {root}; "
        "free space (or fix the store) and run the same command again: it resumes where it stopped."
    )
    out.partial = True
    return out


def tail_runner(job: UnitJob, index_refs: list):
    """In a worker: the stages after a cut as a function of the kept rows of one shard
    (see threshold_shard)."""
    job = _ready(job, index_refs)
    schema = job.schema

    def run(table: pa.Table) -> tuple[pa.Table, dict]:
        counters = {s.label: new_counter() for s in job.stages}
        parts = [
            apply_stages(pa.Table.from_batches([b], table.schema), job.stages, counters)
            for b in table.to_batches(max_chunksize=job.batch_rows)
        ]
        out = pa.concat_tables([conform(p, schema) for p in parts]) if parts else schema.empty_table()
        return out, counters

    return run


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


def process_batch(batch: dict[str, np.ndarray], job: UnitJob, index_refs: list) -> dict[str, np.ndarray]:
    job = _ready(job, index_refs)
    fs, path = cfs.filesystem(job.root)
    records = []
    for unit in units_of(batch):
        # A retried task (a worker died) skips the units it had already committed.
        try:
            with fs.open_input_stream(f"{path}/_work/done/{unit.index:05d}.json") as f:
                records.append(f.read().decode())
            continue
        except (FileNotFoundError, OSError):
            pass
        records.append(json.dumps(process_unit(unit, job)))
    return {"record": np.array(records, dtype=object)}


def units_of(batch: dict[str, np.ndarray]) -> Iterator[Unit]:
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
    kwargs: dict[str, Any] = {
        "include_dashboard": False,
        "log_to_driver": False,
        "logging_level": logging.WARNING,
        "configure_logging": True,
    }
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=num_cpus or os.cpu_count(), object_store_memory=1 << 30, **kwargs)
    try:
        yield
    finally:
        ray.shutdown()


def video_payload_of(recipe: PipelineRecipe) -> str:
    """``output.video`` resolved: ``auto`` is ``both`` when a video source keeps clips, else ``frames``."""
    if recipe.output.video != "auto":
        return recipe.output.video
    return "both" if any((s.video or {}).get("clip") for s in recipe.sources) else "frames"


def map_units(
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
    a unit whose own task fails is given up on: ``fn`` runs it once more marked failed (``Unit.failed``),
    which reads nothing and yields one ``unit_failed`` reject saying what happened. A StorageError still
    stops the run.
    """
    # Blocks are cut from consecutive items, and consecutive units come from the same source (heavy
    # tars, then light text files): deal units out by stride so every task gets a mix and none is the tail.
    dealt = [units[i] for b in range(tasks) for i in range(b, len(units), tasks)]
    try:
        yield from map_items([u.to_dict() for u in dealt], fn, fn_kwargs, workers, tasks, num_cpus, num_gpus)
        return
    except Exception as e:  # sorted out here: storage stops the run, the rest is isolated
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
        except Exception as e:  # whatever killed it, this unit is given up on, not the run
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
                f"stage '{s.label}' asks for {s.resources.num_gpus:g} GPU(s) per worker but the Ray cluster "
                f"has {cluster_gpus:g}; run on a GPU cluster (--address), or set "
                f"stages.<i>.{s.name}.resources.num_gpus: 0 to run it on CPU"
            )


def worker_count(
    recipe: PipelineRecipe, stages: list[Stage], cpus_per_task: float, gpus_per_task: float
) -> int:
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
