"""A run killed in the middle and run again completes to the same pool as an uninterrupted run."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import polars as pl

from tests.helpers.runs import RECIPE, pool_files, start_run, write_corpus


def test_killed_run_resumes_to_the_same_pool(tmp_path):
    write_corpus(tmp_path / "corpus")
    ref_recipe, recipe = tmp_path / "ref.yaml", tmp_path / "r.yaml"
    ref_recipe.write_text(RECIPE.format(corpus=tmp_path / "corpus", out=tmp_path / "ref"))
    recipe.write_text(RECIPE.format(corpus=tmp_path / "corpus", out=tmp_path / "pool"))
    assert start_run(ref_recipe).wait(timeout=300) == 0

    proc = start_run(recipe)
    done_dir = tmp_path / "pool" / "_work" / "done"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if done_dir.exists() and len(list(done_dir.glob("*.json"))) >= 3:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed: make the corpus larger"
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started, mid-run
    proc.wait()
    done_before = sorted(p.stem for p in done_dir.glob("*.json"))
    assert 3 <= len(done_before) < 24
    before = pool_files(tmp_path / "pool")

    out = start_run(recipe)
    log = out.communicate(timeout=300)[0].decode()
    assert out.returncode == 0, log
    after = pool_files(tmp_path / "pool")
    # shards of units finished before the kill were not rewritten
    for name, (sha, mtime) in before.items():
        if not name.endswith(".tmp") and name.split("/")[1][:5] in done_before:
            assert after[name] == (sha, mtime), name
    # no temp files left, and the pool is byte-identical to the uninterrupted run
    assert not [n for n in after if ".tmp-" in n]
    ref = pool_files(tmp_path / "ref")
    assert {n: s for n, (s, _) in after.items()} == {n: s for n, (s, _) in ref.items()}
    kept = pl.read_parquet(tmp_path / "pool" / "shards" / "*.parquet")
    assert kept["id"].n_unique() == kept.height == 40  # 40 distinct contents, each kept once


def test_temp_files_of_killed_writers_are_swept_and_never_listed(ray_local, tiny_recipe, tmp_path):
    """A worker SIGKILLed mid-write leaves its temp file (Ray's retry writes its own): a rerun, and every run
    once its tasks are done, delete such files; the manifest never lists them."""
    import json

    from curation.pipeline import run_pipeline
    from curation.recipe import load_pipeline

    pool = Path(run_pipeline(load_pipeline(tiny_recipe), progress=False).pool)
    before = sorted(p.name for p in (pool / "shards").iterdir())
    for stale in (
        "shards/00000_0001.parquet.tmp-deadbeef",
        "rejects/00000.parquet.tmp-0badf00d",
        "_work/done/00000.json.tmp-12345678",
    ):
        (pool / stale).write_bytes(b"half a file")
    again = run_pipeline(load_pipeline(tiny_recipe), progress=False)
    assert not [p for p in pool.rglob("*") if ".tmp-" in p.name]
    assert sorted(p.name for p in (pool / "shards").iterdir()) == before
    assert ".tmp-" not in json.dumps(again.manifest)
