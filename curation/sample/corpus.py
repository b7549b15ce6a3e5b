"""The corpus writer: lays out the output folder, runs every shard writer in a process pool and writes
``truth.parquet``, ``sft/truth.parquet`` and ``corpus.json``.

Shard writers live with their sources (:mod:`~curation.sample.image_text`, :mod:`~curation.sample.text`,
...). Results arrive in any order; truth rows go out in canonical order, so the output depends only on
``rows``, ``seed`` and ``shard_rows``, never on ``workers``.

    >>> summary = write_sample_corpus("sample", rows=1000, seed=0)
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from curation.sample.benchmarks import write_benchmark, write_benchmark_videos
from curation.sample.image_text import write_jsonl_shard, write_parquet_shard, write_wds_shard
from curation.sample.interleaved import write_interleaved_shard
from curation.sample.plan import ALL_DIRT_KINDS, BENCHMARK_RATE, KEY_STRIDE, SOURCE_DIR, SOURCES, CorpusSpec
from curation.sample.sft import SFT_FILES, SFT_SOURCES, SFT_TRUTH_SCHEMA, write_sft_source
from curation.sample.text import write_text_shard
from curation.sample.truth import TRUTH_SCHEMA, ShardResult, _truth_table
from curation.sample.video_rows import write_video_shard

logger = logging.getLogger(__name__)

FORMAT = "curation.sample/1"
TRUTH_ROW_GROUP = 16_384  # bounds the parent's buffer


def _sft_writer(source: str):
    def write(out: Path, spec: CorpusSpec, shard: int = 0) -> ShardResult:
        return write_sft_source(out, spec, source)

    return write


WRITERS = {
    "wds": write_wds_shard,
    "parquet": write_parquet_shard,
    "jsonl": write_jsonl_shard,
    "interleaved": write_interleaved_shard,
    "text": write_text_shard,
    "benchmark": write_benchmark,
    "benchmark_video": write_benchmark_videos,
    "video": write_video_shard,
    **{f"sft_{source}": _sft_writer(source) for source in SFT_SOURCES},
}


def _run_task(task: tuple[str, CorpusSpec, str, int]) -> ShardResult:
    out, spec, source, shard = task
    return WRITERS[source](Path(out), spec, shard)


_LAYOUT_DIRS = (
    "image_text/wds",
    "image_text/parquet",
    "image_text/jsonl/images",
    "interleaved/images",
    "text",
    "video/clips",
    "benchmark/images",
    "benchmark/videos",
    "sft/llava/images",
    "sft/sharegpt/images",
    "sft/qa",
    "sft/think_with_image/images",
    "sft/video_qa",
)


_LAYOUT_TOP = (
    "image_text",
    "interleaved",
    "text",
    "video",
    "benchmark",
    "sft",
    "truth.parquet",
    "corpus.json",
)


def _prepare_out(out: Path) -> None:
    """Replace an earlier (possibly interrupted) sample corpus, never a folder holding anything else."""
    if out.exists():
        foreign = sorted(p.name for p in out.iterdir() if p.name not in _LAYOUT_TOP)
        if foreign:
            raise FileExistsError(
                f"{out} holds files that are not part of a sample corpus "
                f"({', '.join(foreign[:3])}); refusing to overwrite it"
            )
        for name in _LAYOUT_TOP:
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    for d in _LAYOUT_DIRS:
        (out / d).mkdir(parents=True, exist_ok=True)


def _pool_context() -> multiprocessing.context.BaseContext:
    """fork where available: no re-import of the caller's __main__, workers start in ms."""
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else None)


def write_sample_corpus(
    out: str | Path,
    rows: int = 5000,
    seed: int = 0,
    shard_rows: int = 1000,
    workers: int | None = None,
    progress: bool = True,
    benchmark_rate: float = BENCHMARK_RATE,
) -> dict:
    """Write a deterministic, deliberately dirty multimodal corpus to ``out``.

    ``rows`` is split 60/15/10/8/7 % over WebDataset, Parquet and JSONL image-text,
    interleaved documents and pure text. On top of those, ``sft/`` holds cold-start conversations
    (a fifth of ``rows``, 60..1500, in the five modes; labels in ``sft/truth.parquet``). The output
    (every byte of it) depends only on ``rows``, ``seed`` and ``shard_rows``, not on ``workers``.
    Returns the summary that is also written to ``out/corpus.json``.
    """
    if rows < 1:
        raise ValueError("rows must be >= 1")
    if not 1 <= shard_rows <= KEY_STRIDE:
        raise ValueError(f"shard_rows must be in 1..{KEY_STRIDE} (keys are shard*{KEY_STRIDE}+row)")
    if not 0 <= benchmark_rate <= 0.5:
        raise ValueError(
            "benchmark_rate must be in 0..0.5 (share of rows per source holding a benchmark copy)"
        )
    out = Path(out)
    _prepare_out(out)
    spec = CorpusSpec.make(rows, seed, shard_rows, benchmark_rate)
    canonical = [("benchmark", 0), ("benchmark_video", 0)] + [
        (src, sh) for src in SOURCES for sh in range(spec.n_shards(src))
    ]
    tasks = [(str(out), spec, src, sh) for src, sh in canonical]
    position = {key: k for k, key in enumerate(canonical)}
    n_workers = max(1, min(workers or os.cpu_count() or 1, len(tasks)))

    started = time.perf_counter()
    dirt_by_source: dict[str, Counter] = {src: Counter() for src in SOURCES}
    files: list[str] = []
    images: Counter = Counter()
    pool = _pool_context().Pool(n_workers) if n_workers > 1 else None  # fork before tqdm starts its thread
    try:
        results = pool.imap_unordered(_run_task, tasks) if pool else map(_run_task, tasks)
        bar = tqdm(total=rows, unit="rows", desc="sample corpus", file=sys.stderr, disable=not progress)
        with pq.ParquetWriter(out / "truth.parquet", TRUTH_SCHEMA) as truth_writer, bar:
            pending: dict[int, ShardResult] = {}
            next_k, buffer = 0, []
            for res in results:
                bar.update(res.rows)
                pending[position[(res.source, res.shard)]] = res
                while next_k in pending:  # truth rows go out in canonical order, whoever finished first
                    done = pending.pop(next_k)
                    next_k += 1
                    files += done.files
                    images[SOURCE_DIR.get(done.source, "benchmark")] += done.images
                    for row in done.truth:
                        dirt_by_source[done.source][row[4]] += 1
                    buffer += done.truth
                    if len(buffer) >= TRUTH_ROW_GROUP:
                        truth_writer.write_table(_truth_table(buffer))
                        buffer = []
            if buffer:
                truth_writer.write_table(_truth_table(buffer))
        # Cold-start sources last: the video QA rows point at the clips written above.
        sft_tasks = [(str(out), spec, f"sft_{source}", 0) for source in SFT_SOURCES]
        sft_results = list(pool.imap(_run_task, sft_tasks) if pool else map(_run_task, sft_tasks))
    except BaseException:
        if pool:
            pool.terminate()
        raise
    finally:
        if pool:
            pool.close()
            pool.join()
    elapsed = time.perf_counter() - started
    sft_truth = [row for res in sft_results for row in res.truth]
    pq.write_table(
        pa.Table.from_pylist(
            [dict(zip(SFT_TRUTH_SCHEMA.names, row)) for row in sft_truth], schema=SFT_TRUTH_SCHEMA
        ),
        out / "sft/truth.parquet",
    )
    files += [f for res in sft_results for f in res.files] + ["sft/truth.parquet"]

    totals = Counter()
    for counter in dirt_by_source.values():
        totals.update(counter)
    image_dirs = {
        "image_text/jsonl": "image_text/jsonl/images",
        "interleaved": "interleaved/images",
        "benchmark": "benchmark/images",
    }
    summary = {
        "format": FORMAT,
        "rows": rows,
        "seed": seed,
        "shard_rows": shard_rows,
        "sources": {src: spec.n(src) for src in SOURCES},
        "shards": {src: spec.n_shards(src) for src in SOURCES},
        "dirt": {kind: totals[kind] for kind in ALL_DIRT_KINDS},
        "dirt_by_source": {
            src: {k: c[k] for k in ALL_DIRT_KINDS if c[k]} for src, c in dirt_by_source.items()
        },
        "benchmark": {
            "items": spec.bench_items,
            "parquet": "benchmark/vqa.parquet",
            "jsonl": "benchmark/vqa.jsonl",
            "qa_jsonl": "benchmark/qa.jsonl",
            "video_jsonl": "benchmark/video_qa.jsonl",
            "videos": spec.bench_videos,
            "rate": benchmark_rate,
        },
        "truth": "truth.parquet",
        "files": sorted(files + ["truth.parquet"]),
        "image_files": {image_dirs[d]: images[d] for d in sorted(image_dirs)},
        "sft": {
            "rows": len(sft_truth),
            "truth": "sft/truth.parquet",
            "sources": {source: SFT_FILES[source] for source in SFT_SOURCES},
            "rows_by_source": {res.source.removeprefix("sft_"): res.rows for res in sft_results},
            "clean_by_mode": dict(sorted(Counter(r[4] for r in sft_truth if r[5] == "clean").items())),
            "dirt": dict(sorted(Counter(f"{r[3]}/{r[5]}" for r in sft_truth if r[5] != "clean").items())),
            "image_files": sum(res.images for res in sft_results),
        },
    }
    (out / "corpus.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    logger.info(
        "sample corpus: %d rows, %d files in %.1fs (%.0f rows/s) -> %s",
        rows,
        len(files),
        elapsed,
        rows / elapsed if elapsed else float("inf"),
        out,
    )
    return summary
