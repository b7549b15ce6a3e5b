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
from test_resume import RECIPE, _corpus, _files, _run


def _busy_worker(driver: int, task: str = "_process_batch") -> psutil.Process | None:
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
    _corpus(tmp_path / "corpus", tars=24, per_tar=16)
    ref_recipe, recipe = tmp_path / "ref.yaml", tmp_path / "r.yaml"
    # two workers, so the run goes on while one is killed; no resume: the same process must finish the pool
    body = RECIPE.replace("execution: {{num_workers: 1, num_cpus: 1}}", "execution: {{num_workers: 2, num_cpus: 2}}")
    ref_recipe.write_text(body.format(corpus=tmp_path / "corpus", out=tmp_path / "ref"))
    recipe.write_text(body.format(corpus=tmp_path / "corpus", out=tmp_path / "pool"))
    assert _run(ref_recipe).wait(timeout=300) == 0

    proc = _run(recipe)
    _kill_one(proc, "_process_batch")  # a worker in the middle of a unit
    log = proc.communicate(timeout=300)[0].decode()
    assert proc.returncode == 0, log  # the task was retried on another worker; the run did not fail

    after, ref = _files(tmp_path / "pool"), _files(tmp_path / "ref")
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
    from test_mix import make_pool, text_row
    from test_mix_tokens import packaged_tokenizer_json

    pool = make_pool(tmp_path / "pool", [text_row(i, 5 + i % 40) for i in range(6000)], shard_rows=60)
    outs = {}
    for name in ("ref", "killed"):
        recipe = tmp_path / f"{name}.yaml"
        recipe.write_text(yaml.safe_dump({
            "pools": {"p": str(pool)}, "tokenizer": str(packaged_tokenizer_json()), "seed": 3,
            "output": {"path": str(tmp_path / name), "shard_rows": 50},
            "mixtures": {"m": {"budget": 80000, "sources": {"docs": {"pool": "p", "weight": 1.0}}}}}))
        env = dict(os.environ, RAY_ACCEPT_CALLABLE_NAMESPACES="1")
        env.pop("RAY_ADDRESS", None)
        proc = subprocess.Popen([sys.executable, "-m", "curation.cli", "mix", str(recipe), "-q"], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        if name == "killed":
            _kill_one(proc, "_gather_batch")  # writing the output shards
        log = proc.communicate(timeout=300)[0].decode()
        assert proc.returncode == 0, log
        folder = tmp_path / name / "m"
        outs[name] = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted((folder / "shards").iterdir())}
        assert not [n for n in outs[name] if ".tmp" in n]
    assert outs["killed"] == outs["ref"] and len(outs["ref"]) > 10


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs (root only: skipped elsewhere), grown later with ``remount``."""
    import subprocess

    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], check=False,
                                           capture_output=True).returncode != 0:
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

    _corpus(tmp_path / "corpus", tars=24, per_tar=16)
    ref_recipe, recipe = tmp_path / "ref.yaml", tmp_path / "r.yaml"
    ref_recipe.write_text(RECIPE.format(corpus=tmp_path / "corpus", out=tmp_path / "ref"))
    recipe.write_text(RECIPE.format(corpus=tmp_path / "corpus", out=small_disk / "pool"))
    assert _run(ref_recipe).wait(timeout=300) == 0
    used = sum(f.stat().st_size for f in (tmp_path / "ref").rglob("*") if f.is_file())
    assert used > 3 * 256 * 1024, "the pool must not fit the small disk: make the corpus larger"

    proc = _run(recipe)
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
    proc = _run(recipe)
    log = proc.communicate(timeout=300)[0].decode()
    assert proc.returncode == 0, log
    after, ref = _files(pool), _files(tmp_path / "ref")
    assert {n: s for n, (s, _) in after.items()} == {n: s for n, (s, _) in ref.items()}
    kept = pl.read_parquet(pool / "shards" / "*.parquet")
    assert kept["id"].n_unique() == kept.height == 40
