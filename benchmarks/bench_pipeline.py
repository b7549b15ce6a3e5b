"""Demo pipeline throughput: `curation run` (Ray Data) against a plain single-process loop.

Both do the same work on the same generated corpus: read every source, run every stage of
pipelines/demo.yaml (decode, size, aspect, caption length/repetition/boilerplate/language, document
length, exact dedup with its index pass), and write the Parquet + WebDataset shards and rejects. The
plain loop calls the same per-unit function in a for loop, without Ray. The HTML report is off in both.

Each is run as its own process; peak memory is the largest sum of PSS (proportional set size, so the
Ray object store's shared pages are not counted twice) over that process and all its descendants.

    python benchmarks/bench_pipeline.py --rows 5000 50000 --work /tmp/bench
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "pipelines" / "demo.yaml"

PLAIN_LOOP = r"""
import sys, time
from curation.io.pool import Pool
from curation.io.readers import plan_units
from curation.recipe import load_pipeline
from curation.poolwide import index_unit
from curation.runner import UnitJob, process_unit
from curation.stage import IndexedFilter
import pyarrow as pa

recipe = load_pipeline(sys.argv[1], sys.argv[2:])
t0 = time.perf_counter()
units = plan_units(recipe.sources, recipe.execution.unit_rows)
pool = Pool(recipe.output.path, recipe.hash)
pool.prepare(recipe.resolved, overwrite=True)
for s in recipe.stages:
    s.setup()
indexed = [s for s in recipe.stages if isinstance(s, IndexedFilter)]
if indexed:
    cols = tuple(dict.fromkeys(c for s in indexed for c in s.index_columns))
    rows = pa.concat_tables([index_unit(u, cols, recipe.execution.batch_rows) for u in units])
    for s in indexed:
        s.use_index(s.build_index(rows))
job = UnitJob(recipe.stages, pool.root, recipe.hash, recipe.output.formats, recipe.output.shard_rows,
              recipe.output.shard_bytes, recipe.output.write_rejects, recipe.execution.batch_rows)
n = sum(process_unit(u, job)["counters"]["ingest"]["rows_in"] for u in units)
print(f"rows={n} seconds={time.perf_counter() - t0:.3f}")
"""


def _pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _anon_kib(pid: int) -> int:
    """Private anonymous memory of ``pid`` (its heap: not the Ray object store's shared pages it maps)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
            except (OSError, ValueError, IndexError):
                continue
    out, stack = [], [pid]
    while stack:
        p = stack.pop()
        out.append(p)
        stack += children.get(p, [])
    return out


def measure(cmd: list[str], env: dict | None = None) -> dict:
    """Run ``cmd``; return wall seconds, peak PSS of its process tree and of its own process (MiB), and
    its output."""
    peak = own = anon = 0
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    done = threading.Event()

    def sample():
        nonlocal peak, own, anon
        while not done.is_set():
            peak = max(peak, sum(_pss_kib(p) for p in _descendants(proc.pid)))
            own = max(own, _pss_kib(proc.pid))
            anon = max(anon, _anon_kib(proc.pid))
            time.sleep(0.25)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out = proc.communicate()[0].decode(errors="replace")
    wall = time.perf_counter() - t0
    done.set()
    th.join()
    if proc.returncode:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{out[-3000:]}")
    # Ray leaves its session processes to exit on their own: give them a moment, so the next measurement
    # starts clean. (Never pkill them: other Ray sessions on the machine, a test suite's, are not ours
    # to stop.)
    time.sleep(2)
    return {
        "seconds": round(wall, 2),
        "peak_mib": round(peak / 1024, 1),
        "driver_peak_mib": round(own / 1024, 1),
        "driver_anon_peak_mib": round(anon / 1024, 1),
        "output": out,
    }


def bench(rows: int, work: Path, ray_only: bool = False) -> dict:
    from curation.sample import write_sample_corpus

    corpus = work / f"corpus-{rows}"
    if not (corpus / "corpus.json").exists():
        print(f"generating {rows:,} rows ...", file=sys.stderr)
        write_sample_corpus(corpus, rows=rows, seed=0, progress=False)
    sets = [f"vars.corpus={corpus}", "output.report=false"]
    py = sys.executable
    ray_cmd = [
        py,
        "-m",
        "curation.cli",
        "run",
        str(RECIPE),
        "-q",
        "--overwrite",
        *(arg for s in sets + [f"vars.out={work / f'ray-{rows}'}"] for arg in ("--set", s)),
    ]
    plain_cmd = [py, "-c", PLAIN_LOOP, str(RECIPE), *sets, f"vars.out={work / f'plain-{rows}'}"]
    print(f"{rows:,} rows: curation run (Ray Data) ...", file=sys.stderr)
    ray_ = measure(ray_cmd)
    ray_res = {
        "seconds": ray_["seconds"],
        "rows_per_s": round(rows / ray_["seconds"], 1),
        "peak_mib": ray_["peak_mib"],
        "driver_peak_mib": ray_["driver_peak_mib"],
        "driver_anon_peak_mib": ray_["driver_anon_peak_mib"],
    }
    if ray_only:  # memory against corpus size, without the (slower) baseline
        return {"rows": rows, "ray": ray_res}
    print(f"{rows:,} rows: plain loop ...", file=sys.stderr)
    plain = measure(plain_cmd)
    # Same work, same result: both pools must hold the same rows.
    import polars as pl

    ids = [
        sorted(pl.read_parquet(work / f"{k}-{rows}" / "shards" / "*.parquet", columns=["id"])["id"].to_list())
        for k in ("ray", "plain")
    ]
    assert ids[0] == ids[1], "the Ray and plain pools differ"
    return {
        "rows": rows,
        "kept": len(ids[0]),
        "plain": {
            "seconds": plain["seconds"],
            "rows_per_s": round(rows / plain["seconds"], 1),
            "peak_mib": plain["peak_mib"],
        },
        "ray": ray_res,
        "ratio": round(plain["seconds"] / ray_["seconds"], 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[5000, 50000])
    ap.add_argument("--work", type=Path, default=ROOT / "bench-out")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument(
        "--ray-only", action="store_true", help="skip the plain loop: rows/s and memory of curation run"
    )
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    results = [bench(r, args.work, args.ray_only) for r in args.rows]
    machine = (
        f"{platform.node()}: {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB, "
        f"Python {platform.python_version()}"
    )
    print(f"\nmachine: {machine}\n")
    print(
        "| rows | plain loop rows/s | Ray rows/s | ratio | plain peak MiB | Ray peak MiB (all processes) "
        "| Ray driver peak MiB (PSS / private heap) |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        plain = r.get("plain") or {}
        ratio = f"{r['ratio']}x" if "ratio" in r else "-"
        print(
            f"| {r['rows']:,} | {plain.get('rows_per_s', 0):,} | {r['ray']['rows_per_s']:,} | {ratio} "
            f"| {plain.get('peak_mib', 0):,} | {r['ray']['peak_mib']:,} | {r['ray']['driver_peak_mib']:,} / "
            f"{r['ray']['driver_anon_peak_mib']:,} |".replace("| 0 |", "| - |")
        )
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "results": results}, indent=2))


if __name__ == "__main__":
    main()
