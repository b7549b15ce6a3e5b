"""`curation run` as users start it, in a process (and a session) of its own so that a test can kill it: the
corpus it runs over, its recipe, and the pool's files to compare runs by."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

from tests.helpers.images import jpeg, write_tar

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


def write_corpus(root: Path, tars: int = 24, per_tar: int = 16) -> None:
    """``tars`` tars of coloured circles with captions; content repeats across tars (duplicates to drop)."""
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


def start_run(recipe: Path, **kw) -> subprocess.Popen:
    """``curation run RECIPE -q`` in a new session: ``os.killpg`` kills the driver and the Ray it starts."""
    env = dict(os.environ, RAY_ACCEPT_CALLABLE_NAMESPACES="1")
    return subprocess.Popen(
        [sys.executable, "-m", "curation.cli", "run", str(recipe), "-q"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        **kw,
    )


def pool_files(pool: Path) -> dict[str, tuple[str, int]]:
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
