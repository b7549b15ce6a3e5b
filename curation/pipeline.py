"""``curation run``: a pipeline recipe to a pool, on local Ray or a cluster.

A run is:

1. plan units (one per input file or Parquet row-group range) on the driver, deterministically
   (:func:`curation.io.readers.plan_units`);
2. build the indexes of index-then-query stages in a parallel pre-pass
   (:func:`curation.poolwide.build_indexes`);
3. map each pending unit through its fused stages: read -> stages -> shards + rejects, committed per unit
   (:mod:`curation.runner`, :mod:`curation.io.pool`);
4. apply the pool-wide cuts, and run the stages after each on what it keeps
   (:func:`curation.poolwide.apply_cuts`);
5. merge the counters into ``stats.json`` (:mod:`curation.stats`), write ``manifest.json`` and the report.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

from curation.io import fs as cfs
from curation.io import outputs
from curation.io.pool import Pool
from curation.io.readers import INGEST, plan_units
from curation.poolwide import apply_cuts, build_indexes
from curation.recipe import PipelineRecipe
from curation.runner import (
    UnitJob,
    check_gpus,
    configure_data_context,
    map_units,
    process_batch,
    progress_bar,
    ray_session,
    stops_cleanly,
    task_resources,
    video_payload_of,
    worker_count,
)
from curation.stage import NotReady, split_at_cuts
from curation.stats import pool_stats

log = logging.getLogger(__name__)


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
        workers = worker_count(recipe, head, cpus_per_task, gpus_per_task)
        with stops_cleanly(root):  # from here on, a failing disk or store stops the run cleanly
            done = pool.done_records()
            pending = [u for u in units if u.index not in done]
            if done:
                log.info("resuming: %d of %d units already done", len(done), len(units))
            index_refs = build_indexes(recipe, head, units, root, workers, progress) if pending else []
            # after a cut, the last cut writes the video payload
            job = UnitJob.of(recipe, head, root, video="both" if tails else video_payload_of(recipe))
            if pending:
                bar = progress_bar(len(pending), "units", progress)
                rows = 0
                # About four units per task: each task costs ~0.15 s to schedule on a busy 2-CPU node, a unit
                # ~0.4 s of work; at least 8 tasks per worker keep the tail short.
                tasks = min(len(pending), max(workers * 8, len(pending) // 4))
                for batch in map_units(
                    pending,
                    process_batch,
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
            replaced, extra_rejects, global_stats, tail_counters = apply_cuts(
                recipe, records, root, tails, units, progress
            )
            pool.sweep_temp()  # every task is done: what is left under a temp name was a killed worker's
            t_end = time.perf_counter()
    ray_stop_s = time.perf_counter() - t_end
    lineage = {s.label: s.lineage() for s in recipe.stages if s.lineage()}
    with stops_cleanly(root):  # the manifest is one object, written last: a pool has all of it or none
        manifest = pool.write_manifest(recipe.resolved, records, replaced, extra_rejects, lineage)
        stats = pool_stats(
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
