"""A run killed in the middle and run again completes to the same pool as an uninterrupted run."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
from conftest import jpeg, write_tar

RECIPE = """
sources:
  - {{name: wds, format: webdataset, modality: image_text, paths: ["{corpus}/*.tar"]}}
stages:
  - image_decode: {{}}
  - caption_length: {{min: 3}}
  - exact_dedup: {{}}
output: {{path: "{out}", shard_rows: 7}}
execution: {{num_workers: 1, num_cpus: 1}}
"""

COLORS = ["red", "green", "blue", "yellow", "orange", "purple", "black", "pink"]


def _corpus(root: Path, tars: int = 24, per_tar: int = 16) -> None:
    root.mkdir()
    for t in range(tars):
        samples = []
        for i in range(per_tar):
            k = (t * 7 + i) % 40  # repeats content across tars: duplicates for exact_dedup
            samples.append(
                {
                    "__key__": f"{t:03d}{i:03d}",
                    "jpg": jpeg(48 + k, 40, COLORS[k % 8]),
                    "txt": f"A {COLORS[k % 8]} circle number {k} on white.".encode(),
                }
            )
        write_tar(root / f"{t:05d}.tar", samples)


def _run(recipe: Path, **kw) -> subprocess.Popen:
    env = dict(os.environ, RAY_ACCEPT_CALLABLE_NAMESPACES="1")
    return subprocess.Popen(
        [sys.executable, "-m", "curation.cli", "run", str(recipe), "-q"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        **kw,
    )


def _files(pool: Path) -> dict[str, tuple[str, int]]:
    """relative path -> (sha256, mtime_ns) for shards and rejects. Right after the kill, a Ray worker of the
    killed run may still be finishing a unit (it is not in the driver's process group): its temp file can be
    renamed away between listing and reading, and is skipped."""
    out = {}
    for sub in ("shards", "rejects"):
        for f in sorted((pool / sub).iterdir()):
            try:
                out[f"{sub}/{f.name}"] = (hashlib.sha256(f.read_bytes()).hexdigest(), f.stat().st_mtime_ns)
            except FileNotFoundError:
                continue
    return out


def test_killed_run_resumes_to_the_same_pool(tmp_path):
    _corpus(tmp_path / "corpus")
    ref_recipe, recipe = tmp_path / "ref.yaml", tmp_path / "r.yaml"
    ref_recipe.write_text(RECIPE.format(corpus=tmp_path / "corpus", out=tmp_path / "ref"))
    recipe.write_text(RECIPE.format(corpus=tmp_path / "corpus", out=tmp_path / "pool"))
    assert _run(ref_recipe).wait(timeout=300) == 0

    proc = _run(recipe)
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
    before = _files(tmp_path / "pool")

    out = _run(recipe)
    log = out.communicate(timeout=300)[0].decode()
    assert out.returncode == 0, log
    after = _files(tmp_path / "pool")
    # shards of units finished before the kill were not rewritten
    for name, (sha, mtime) in before.items():
        if not name.endswith(".tmp") and name.split("/")[1][:5] in done_before:
            assert after[name] == (sha, mtime), name
    # no temp files left, and the pool is byte-identical to the uninterrupted run
    assert not [n for n in after if ".tmp-" in n]
    ref = _files(tmp_path / "ref")
    assert {n: s for n, (s, _) in after.items()} == {n: s for n, (s, _) in ref.items()}
    kept = pl.read_parquet(tmp_path / "pool" / "shards" / "*.parquet")
    assert kept["id"].n_unique() == kept.height == 40  # 40 distinct contents, each kept once


def test_temp_files_of_killed_writers_are_swept_and_never_listed(ray_local, tiny_recipe, tmp_path):
    """A worker SIGKILLed mid-write leaves its temp file (Ray's retry writes its own): a rerun, and every run
    once its tasks are done, delete such files; the manifest never lists them."""
    import json

    from curation.recipe import load_pipeline
    from curation.runner import run_pipeline

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
