"""Demo pipeline throughput across Ray nodes and on object storage.

Two comparisons, each on the same generated corpus (`curation.sample`) and `pipelines/demo.yaml` (report off):

1. **One node against two nodes, same CPUs in total**: a Ray cluster of one node with 2 CPUs, and one of two
   nodes with 1 CPU each. Both are ``ray.cluster_utils.Cluster`` clusters (full raylets, each node with its
   own object store) started the same way, in a child process (``tests/helpers/servers/raycluster.py``, as
   ``tests/integration/test_cluster.py`` uses it): a private short ``RAY_TMPDIR`` and token authentication.
   ``curation run --address`` joins them as a user would. Ray start-up is outside the timings. The pipeline is
   deterministic, so both pools must have the same shards, byte for byte: the script checks their sha256s.
2. **Local disk against S3**: on the one-node cluster, the corpus and the pool on local disk, then both on a
   local S3 server (SeaweedFS ``weed mini`` from ``tests/helpers/servers/s3server.py``, on loopback). The
   corpus is uploaded once, untimed. The cluster carries the AWS_* variables, so its workers reach the
   server. The script checks that the S3 pool holds the same ids as the local one. Its shards are not
   byte-identical: a row records where it came from (``source_uri``, video references) and the recipe hash
   covers ``vars``. The script lists the Parquet columns that differ, so that any other difference shows.

Seconds are the wall time of ``curation run`` (process start, planning, the dedup index pass, the unit pass,
the manifest). CPU seconds are counted for the driver and the cluster's processes, for the S3 server, and for
every other process on the machine: the last shows how much the machine was shared during a run. Peak memory
is the largest sum of PSS over the driver and the cluster's processes (the S3 server's is not counted). With
``--repeat N`` there are N rounds (one node: local disk, S3; then two nodes), each on fresh clusters, so that
the runs of a round share the machine's load; the fastest run of each kind is kept.

    python benchmarks/bench_scale.py --rows 50000 --repeat 2 --json bench-out/scale.json
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import hashlib
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(Path(__file__).resolve().parent), str(ROOT)]
from bench_pipeline import _descendants as _tree
from bench_pipeline import _pss_kib

from tests.helpers.servers.raycluster import LocalCluster

RECIPE = ROOT / "pipelines" / "demo.yaml"
# Resources of a cluster node, per CPU it has: the one-node and the two-node cluster get the same totals.
OBJECT_STORE_PER_CPU = 500 * 1024**2
MEMORY_PER_CPU = 4 * 1024**3
# What demo.yaml reads from a sample corpus: only these folders are uploaded to S3.
CORPUS_PARTS = ("image_text", "interleaved", "text", "video")


# ---------------------------------------------------------------- the clusters


def fresh_cluster(nodes: int, cpus: int, extra_env: dict[str, str] | None = None) -> LocalCluster:
    """A fresh cluster of ``nodes`` x ``cpus``, each node with the same resources per CPU."""
    return LocalCluster(nodes, cpus, OBJECT_STORE_PER_CPU * cpus, MEMORY_PER_CPU * cpus, extra_env=extra_env)


# ---------------------------------------------------------------- measuring


def _descendants(roots: list[int]) -> set[int]:
    """``roots`` and every process below them."""
    return set().union(*(_tree(r) for r in roots))


def _cpu_ticks(pid: int) -> int:
    """utime + stime of ``pid`` (all its threads), in clock ticks."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    except (OSError, ValueError, IndexError):
        return 0


def _machine_busy_ticks() -> int:
    """CPU time spent by the whole machine (all CPUs, not idle, not waiting for I/O), in clock ticks."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return sum(v[:8]) - v[3] - v[4]  # user nice system idle iowait irq softirq steal


def measure(cmd: list[str], env: dict[str, str], also: list[int], server: list[int] = ()) -> dict:
    """Run ``cmd``; wall seconds; peak PSS (MiB) summed over its process tree and those of ``also``; the CPU
    seconds those trees used, those the trees of ``server`` used, and those every other process used.

    CPU time is sampled per process every 0.25 s (a process that exits loses at most its last 0.25 s): the
    share of other processes shows how much the machine was shared during the run."""
    tick = os.sysconf("SC_CLK_TCK")
    peak = 0
    load = os.getloadavg()[0]
    base = {p: _cpu_ticks(p) for p in _descendants(list(also))}
    server_base = sum(_cpu_ticks(p) for p in _descendants(list(server))) if server else 0
    busy0 = _machine_busy_ticks()
    seen: dict[int, int] = {}
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True
    )
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            pids = _descendants([proc.pid, *also])
            peak = max(peak, sum(_pss_kib(p) for p in pids))
            for p in pids:
                seen[p] = max(seen.get(p, 0), _cpu_ticks(p))
            time.sleep(0.25)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out = proc.communicate()[0].decode(errors="replace")
    wall = time.perf_counter() - t0
    done.set()
    th.join()
    for p in _descendants(list(also)):
        seen[p] = max(seen.get(p, 0), _cpu_ticks(p))
    busy = _machine_busy_ticks() - busy0
    server_cpu = (sum(_cpu_ticks(p) for p in _descendants(list(server))) - server_base) if server else 0
    ours = sum(max(0, t - base.get(p, 0)) for p, t in seen.items())
    if proc.returncode:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{out[-3000:]}")
    time.sleep(2)  # let the job's workers exit before the next measurement
    return {
        "seconds": round(wall, 2),
        "peak_mib": round(peak / 1024, 1),
        "load_before": round(load, 2),
        "cpu_s": round(ours / tick, 1),
        "server_cpu_s": round(server_cpu / tick, 1),
        "others_cpu_s": round(max(0, busy - ours - server_cpu) / tick, 1),
    }


def server_pids() -> list[int]:
    """Our own child processes running ``weed`` (the S3 server that ``seaweedfs_s3`` started)."""
    me = os.getpid()
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    text = f.read()
                comm, rest = text.split("(", 1)[1].rsplit(")", 1)
                if int(rest.split()[1]) == me and comm == "weed":
                    out.append(int(entry))
            except (OSError, ValueError, IndexError):
                continue
    return out


def run_cmd(corpus: str, out: str, address: str) -> list[str]:
    sets = [f"vars.corpus={corpus}", f"vars.out={out}", "output.report=false"]
    return [
        sys.executable,
        "-m",
        "curation.cli",
        "run",
        str(RECIPE),
        "-q",
        "--overwrite",
        "--address",
        address,
        *[a for s in sets for a in ("--set", s)],
    ]


def best_of(runs: list[dict], stats: list[dict]) -> dict:
    """The fastest of ``runs`` with rows/s from its stats.json (rows in, pipeline seconds without
    process start)."""
    i = min(range(len(runs)), key=lambda k: runs[k]["seconds"])
    r, s = runs[i], stats[i]
    return {
        **r,
        "rows_in": s["rows_in"],
        "rows_out": s["rows_out"],
        "rows_per_s": round(s["rows_in"] / r["seconds"], 1),
        "pipeline_seconds": s["elapsed_s"],
        "pipeline_rows_per_s": s["rows_per_s"],
        "all_seconds": [x["seconds"] for x in runs],
        "all_cpu_s": [x["cpu_s"] for x in runs],
        "all_server_cpu_s": [x["server_cpu_s"] for x in runs],
        "all_others_cpu_s": [x["others_cpu_s"] for x in runs],
    }


# ---------------------------------------------------------------- pools


def local_pool(pool: Path) -> dict:
    """{"stats", "manifest", "sha" {shard file: sha256}, "ids" sorted kept ids} of a local pool."""
    import pyarrow.parquet as pq

    shards = sorted((pool / "shards").iterdir())
    return {
        "stats": json.loads((pool / "stats.json").read_text()),
        "manifest": json.loads((pool / "manifest.json").read_text()),
        "sha": {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in shards},
        "ids": sorted(
            i
            for f in shards
            if f.suffix == ".parquet"
            for i in pq.read_table(f, columns=["id"])["id"].to_pylist()
        ),
    }


def s3_pool(client, uri: str, local: Path) -> dict:
    """The same for a pool on S3, ``sha`` from its manifest; and ``differing_columns``: the Parquet columns
    whose values differ from those of the same shard in the ``local`` pool (where a row came from is
    part of a row)."""
    import pyarrow.parquet as pq

    bucket, prefix = uri.removeprefix("s3://").split("/", 1)

    def get(key: str) -> bytes:
        return client.get_object(Bucket=bucket, Key=f"{prefix}/{key}")["Body"].read()

    manifest = json.loads(get("manifest.json"))
    sha, ids, differ = {}, [], set()
    for shard in manifest["shards"]:
        for kind in ("parquet", "tar"):
            if kind in shard:
                sha[Path(shard[kind]["path"]).name] = shard[kind]["sha256"]
        there = pq.read_table(io.BytesIO(get(shard["parquet"]["path"])))
        ids += there["id"].to_pylist()
        here_path = local / "shards" / Path(shard["parquet"]["path"]).name
        if not here_path.exists():
            differ.add("(shard missing locally)")
            continue
        here = pq.read_table(here_path)
        differ |= {
            c
            for c in set(here.column_names) | set(there.column_names)
            if c not in here.column_names or c not in there.column_names or not here[c].equals(there[c])
        }
    return {
        "stats": json.loads(get("stats.json")),
        "manifest": manifest,
        "sha": sha,
        "ids": sorted(ids),
        "differing_columns": sorted(differ),
    }


def upload(client, folder: Path, bucket: str, prefix: str) -> tuple[int, int, float]:
    """What demo.yaml reads of ``folder`` to ``s3://bucket/prefix``; (files, bytes, seconds)."""
    files = [f for part in CORPUS_PARTS for f in sorted((folder / part).rglob("*")) if f.is_file()]
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(8) as ex:
        list(
            ex.map(
                lambda f: client.upload_file(str(f), bucket, f"{prefix}/{f.relative_to(folder).as_posix()}"),
                files,
            )
        )
    return len(files), sum(f.stat().st_size for f in files), round(time.perf_counter() - t0, 1)


def _sha_report(a: dict, b: dict) -> dict:
    same = [n for n in a["sha"] if b["sha"].get(n) == a["sha"][n]]
    return {"shard_files": len(a["sha"]), "same_sha256": len(same), "identical": a["sha"] == b["sha"]}


# ---------------------------------------------------------------- the benchmark


def run_one_node(
    corpus: Path, work: Path, r: int, runs: dict, s3=None, s3_corpus: str | None = None
) -> str | None:
    """Repeat ``r`` on a fresh cluster of one node x 2 CPUs: local disk, then S3 when ``s3``; returns the
    S3 pool."""
    s3_out = None
    print(f"repeat {r + 1}: a Ray cluster of 1 node x 2 CPUs ...", file=sys.stderr)
    with fresh_cluster(1, 2, extra_env=s3.env() if s3 else None) as cluster:
        runs.setdefault("one_node_start_seconds", []).append(cluster.start_seconds)
        out = work / "pool-1node"
        shutil.rmtree(out, ignore_errors=True)
        print("  local disk ...", file=sys.stderr)
        m = measure(run_cmd(str(corpus), str(out), cluster.address), cluster.env, [cluster.proc.pid])
        runs.setdefault("one_node", []).append((m, json.loads((out / "stats.json").read_text())))
        if s3:
            import boto3

            s3_out = f"{s3_corpus.rsplit('/', 1)[0]}/pool-{r}"  # a fresh prefix: no delete in the timing
            print("  S3 ...", file=sys.stderr)
            m = measure(
                run_cmd(s3_corpus, s3_out, cluster.address), cluster.env, [cluster.proc.pid], server_pids()
            )
            client = boto3.client("s3", **s3.boto3_kwargs())
            bucket, prefix = s3_out.removeprefix("s3://").split("/", 1)
            stats = json.loads(client.get_object(Bucket=bucket, Key=f"{prefix}/stats.json")["Body"].read())
            runs.setdefault("s3", []).append((m, stats))
    return s3_out


def run_two_nodes(corpus: Path, work: Path, r: int, runs: dict) -> None:
    """Repeat ``r`` on a fresh cluster of two nodes x 1 CPU, local disk."""
    print(f"repeat {r + 1}: a Ray cluster of 2 nodes x 1 CPU ...", file=sys.stderr)
    with fresh_cluster(2, 1) as cluster:
        runs.setdefault("two_node_start_seconds", []).append(cluster.start_seconds)
        out = work / "pool-2node"
        shutil.rmtree(out, ignore_errors=True)
        print("  local disk ...", file=sys.stderr)
        m = measure(run_cmd(str(corpus), str(out), cluster.address), cluster.env, [cluster.proc.pid])
        runs.setdefault("two_nodes", []).append((m, json.loads((out / "stats.json").read_text())))
        # Informational: how many nodes ran the unit pass (the task name is the runner's, and may change).
        runs.setdefault("two_node_nodes_used", []).append(
            len(cluster.nodes_that_ran("MapBatches(process_batch)"))
        )


def bench(corpus: Path, work: Path, repeat: int, nodes: bool, s3=None, s3_corpus: str | None = None) -> dict:
    """``repeat`` rounds, each: one node (local disk, S3), then two nodes; each cluster fresh, so that the
    configurations of one round run under similar load. Then the checks on the pools of the last round."""
    runs: dict = {}
    s3_out = None
    for r in range(repeat):
        s3_out = run_one_node(corpus, work, r, runs, s3, s3_corpus)
        if nodes:
            run_two_nodes(corpus, work, r, runs)
    result: dict = {
        k: runs[k]
        for k in ("one_node_start_seconds", "two_node_start_seconds", "two_node_nodes_used")
        if k in runs
    }
    for k in ("one_node", "two_nodes", "s3"):
        if k in runs:
            result[k] = best_of([m for m, _ in runs[k]], [st for _, st in runs[k]])
    for k in (
        "two_nodes",
        "s3",
    ):  # rows/s against the one-node local run of the same round (same rows: seconds)
        if k in runs:
            result[f"{'nodes' if k == 'two_nodes' else 's3'}_ratio_by_round"] = [
                round(a["seconds"] / b["seconds"], 3) for (a, _), (b, _) in zip(runs["one_node"], runs[k])
            ]
    one = local_pool(work / "pool-1node")
    result["kept"] = len(one["ids"])
    if nodes:
        two = local_pool(work / "pool-2node")
        assert two["ids"] == one["ids"], "the one-node and two-node pools hold different ids"
        check = _sha_report(one, two)
        assert check["identical"], f"shard sha256s differ between one and two nodes: {check}"
        result["nodes_check"] = {"same_ids": True, **check}
        result["nodes_ratio"] = round(result["two_nodes"]["rows_per_s"] / result["one_node"]["rows_per_s"], 3)
        # Less sensitive to other load on the machine: CPU seconds used, fewest of the runs, two nodes /
        # one node.
        result["nodes_cpu_ratio"] = round(
            min(result["two_nodes"]["all_cpu_s"]) / min(result["one_node"]["all_cpu_s"]), 3
        )
    if s3:
        import boto3

        remote = s3_pool(boto3.client("s3", **s3.boto3_kwargs()), s3_out, work / "pool-1node")
        assert remote["ids"] == one["ids"], "the S3 pool and the local pool hold different ids"
        result["s3_check"] = {
            "same_ids": True,
            **_sha_report(one, remote),
            "differing_columns": remote["differing_columns"],
        }
        result["s3_ratio"] = round(result["s3"]["rows_per_s"] / result["one_node"]["rows_per_s"], 3)
        # CPU seconds of the pipeline's processes, and of the pipeline's plus the S3 server's, against
        # local disk.
        s3_cpu = [a + b for a, b in zip(result["s3"]["all_cpu_s"], result["s3"]["all_server_cpu_s"])]
        result["s3_cpu_ratio"] = round(
            min(result["s3"]["all_cpu_s"]) / min(result["one_node"]["all_cpu_s"]), 3
        )
        result["s3_cpu_ratio_with_server"] = round(min(s3_cpu) / min(result["one_node"]["all_cpu_s"]), 3)
    return result


def machine_info() -> dict:
    import pyarrow
    import ray

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "host": platform.node(),
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "ray": ray.__version__,
        "pyarrow": pyarrow.__version__,
        "date": datetime.date.today().isoformat(),
    }


def _row(name: str, r: dict, base: dict | None) -> str:
    ratio = f"{r['rows_per_s'] / base['rows_per_s']:.2f}x" if base else "1.00x"
    server = f"{r['server_cpu_s']:,}" if r["server_cpu_s"] else "-"
    return (
        f"| {name} | {r['seconds']} | {r['rows_per_s']:,} | {ratio} | {r['cpu_s']:,} | {server} "
        f"| {r['others_cpu_s']:,} | {r['peak_mib']:,} | {', '.join(map(str, r['all_seconds']))} |"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--rows", type=int, default=50000, help="corpus rows (default 50000: about 20 s a run on 2 CPUs)"
    )
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench-scale"), help="corpus and pools go here")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument(
        "--repeat", type=int, default=1, help="rounds of runs on fresh clusters; the fastest is kept"
    )
    ap.add_argument("--skip-nodes", action="store_true", help="no two-node cluster")
    ap.add_argument("--skip-s3", action="store_true", help="no S3 runs")
    ap.add_argument("--keep", action="store_true", help="keep the corpus and pools in --work")
    args = ap.parse_args()
    if args.skip_nodes and args.skip_s3:
        ap.error("nothing to run: --skip-nodes and --skip-s3")
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    created = []
    corpus = work / f"corpus-{args.rows}"
    if not (corpus / "corpus.json").exists():
        from curation.sample import write_sample_corpus

        print(f"generating {args.rows:,} rows ...", file=sys.stderr)
        write_sample_corpus(corpus, rows=args.rows, seed=0, progress=False)
        created.append(corpus)
    created += [work / "pool-1node", work / "pool-2node"]
    info = machine_info()
    results: dict = {"rows": args.rows, "repeat": args.repeat, "load_at_start": os.getloadavg()[0]}
    try:
        if args.skip_s3:
            results.update(bench(corpus, work, args.repeat, not args.skip_nodes))
        else:
            import boto3

            from tests.helpers.servers.s3server import seaweedfs_s3

            with seaweedfs_s3() as s3:
                client = boto3.client("s3", **s3.boto3_kwargs())
                bucket = f"bench-{uuid.uuid4().hex[:8]}"
                client.create_bucket(Bucket=bucket)
                print("uploading the corpus to S3 ...", file=sys.stderr)
                n, size, secs = upload(client, corpus, bucket, "corpus")
                results["upload"] = {"files": n, "mib": round(size / 2**20, 1), "seconds": secs}
                results.update(
                    bench(corpus, work, args.repeat, not args.skip_nodes, s3, f"s3://{bucket}/corpus")
                )
    finally:
        if not args.keep:
            for p in created:
                shutil.rmtree(p, ignore_errors=True)
    results["load_at_end"] = os.getloadavg()[0]

    print(
        f"\nmachine: {info['host']}: {info['cpu_count']} CPUs ({info['cpu']}), {info['memory_gib']:.0f} GiB, "
        f"{info['platform']}, Python {info['python']}, Ray {info['ray']}, pyarrow {info['pyarrow']}, "
        f"{info['date']}"
    )
    print(
        f"corpus: {results['rows']:,} rows in, {results['kept']:,} kept; best of {args.repeat}; "
        f"load average {results['load_at_start']:.2f} at start, {results['load_at_end']:.2f} at end\n"
    )
    print(
        "| run | seconds | rows/s | vs one node, local disk | CPU s: driver + cluster | CPU s: S3 server "
        "| CPU s: other processes | peak MiB (driver + cluster) | every run, s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    base = results["one_node"]
    print(_row("1 node x 2 CPUs, local disk", base, None))
    if "two_nodes" in results:
        print(_row("2 nodes x 1 CPU, local disk", results["two_nodes"], base))
    if "s3" in results:
        print(_row("1 node x 2 CPUs, S3 (SeaweedFS, loopback)", results["s3"], base))
    print()
    if "nodes_check" in results:
        c = results["nodes_check"]
        print(
            f"one node vs two nodes: same ids; {c['same_sha256']}/{c['shard_files']} shard files with the "
            f"same sha256 (identical: {c['identical']}); unit pass ran on "
            f"{results['two_node_nodes_used']} node(s) (per round); two-node rows/s / one-node rows/s: "
            f"{results['nodes_ratio']} (best runs), "
            f"{results['nodes_ratio_by_round']} (round by round); CPU seconds, two nodes / one node: "
            f"{results['nodes_cpu_ratio']}"
        )
    if "s3_check" in results:
        c = results["s3_check"]
        u = results["upload"]
        print(
            f"local vs S3: same ids; {c['same_sha256']}/{c['shard_files']} shard files with the same sha256 "
            f"in the manifests (identical: {c['identical']}); Parquet columns that differ: "
            f"{', '.join(c['differing_columns']) or 'none'}; S3 rows/s / local rows/s: {results['s3_ratio']} "
            f"(best runs), {results['s3_ratio_by_round']} (round by round); CPU seconds, S3 / local: "
            f"{results['s3_cpu_ratio']} (pipeline), {results['s3_cpu_ratio_with_server']} (with the server); "
            f"upload (untimed in the runs): {u['files']:,} files, {u['mib']:,} MiB in {u['seconds']} s"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": info, "results": results}, indent=2))


if __name__ == "__main__":
    main()
