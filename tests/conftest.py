"""Shared fixtures: one Ray per test session, small inline corpora."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.helpers import ROOT
from tests.helpers.images import jpeg, write_tar
from tests.helpers.recipes import TINY_RECIPE

os.environ.setdefault("RAY_ACCEPT_CALLABLE_NAMESPACES", "1")


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray for the whole session (each start costs seconds): 2 CPUs, a small object store."""
    import ray

    ray.init(
        num_cpus=2,
        object_store_memory=300 * 1024 * 1024,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
    )
    yield ray
    ray.shutdown()


@pytest.fixture
def tiny_corpus(tmp_path: Path) -> Path:
    """A few rows in every format, with one of each common defect; labels in truth.json."""
    root = tmp_path / "corpus"
    (root / "wds").mkdir(parents=True)
    good = jpeg(96, 80, "red", "circle")
    samples = [
        {"__key__": "000", "jpg": good, "txt": b"A red circle on a white background."},
        {
            "__key__": "001",
            "jpg": jpeg(96, 80, "blue", "square"),
            "txt": b"A blue square on a white background.",
        },
        {
            "__key__": "002",
            "jpg": good,
            "txt": b"A red circle on a white background.",
        },  # exact duplicate of 000
        {"__key__": "003", "jpg": b"not an image at all", "txt": b"A green circle in the middle."},  # corrupt
        {
            "__key__": "004",
            "jpg": jpeg(96, 80, "green")[:300],
            "txt": b"A green circle in the middle.",
        },  # truncated
        {"__key__": "005", "jpg": jpeg(20, 16), "txt": b"A tiny red circle on white."},  # too small
        {"__key__": "006", "jpg": jpeg(400, 50), "txt": b"A long thin banner with a red circle."},  # aspect
        {"__key__": "007", "jpg": jpeg(96, 80, "blue"), "txt": b"Un cercle bleu sur un fond blanc."},
        {
            "__key__": "008",
            "jpg": jpeg(96, 80, "pink"),
            "txt": "A pink circle caf\xe9 sign.".encode("latin-1"),
        },
        {
            "__key__": "009",
            "jpg": jpeg(96, 80, "black"),
            "txt": b"best price best price best price best price",
        },
        {"__key__": "010", "jpg": jpeg(96, 80, "grey"), "txt": b"  "},
        {"__key__": "011", "jpg": jpeg(96, 80, "purple"), "txt": b"Click here to download this stock photo"},
        {"__key__": "012", "txt": b"A caption whose image member is missing."},
    ]
    write_tar(root / "wds" / "00000.tar", samples)
    (root / "jsonl" / "images").mkdir(parents=True)
    (root / "jsonl" / "images" / "a.jpg").write_bytes(jpeg(80, 80, "orange"))
    lines = [
        json.dumps({"caption": "An orange circle on a white background.", "image": "images/a.jpg"}).encode(),
        b'{"caption": "truncated json',
        json.dumps(
            {"caption": "A picture that is not there at all.", "image": "images/missing.jpg"}
        ).encode(),
    ]
    (root / "jsonl" / "pairs.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (root / "text").mkdir()
    docs = [{"text": "word " * 50}, {"text": "too short"}]
    (root / "text" / "docs.jsonl").write_text("\n".join(json.dumps(d) for d in docs) + "\n")
    return root


@pytest.fixture
def tiny_recipe(tmp_path: Path, tiny_corpus: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_RECIPE.format(corpus=tiny_corpus, out=tmp_path / "pool"))
    return path


@pytest.fixture(scope="session")
def sample_corpus(tmp_path_factory) -> Path:
    """An 800-row generated corpus (every kind of dirt, a 20-item benchmark), shared by the session."""
    from curation.sample import write_sample_corpus

    out = tmp_path_factory.mktemp("sample") / "corpus"
    write_sample_corpus(out, rows=800, seed=5, progress=False)
    return out


@pytest.fixture(scope="session")
def train_mixtures(tmp_path_factory, ray_local) -> dict[str, Path]:
    """Mixtures for the trainer, built from a 300-row sample corpus the way scripts/demo.sh builds them
    (demo and coldstart pools, then the shipped mixture recipes at ``budget: auto``), in shards of 60 rows
    so that streams split across shards: stage0, stage2, anneal_text_heavy, anneal_vision_heavy, coldstart."""
    from curation.mix.builder import build_mixtures
    from curation.mix.recipe import load_mix_recipe
    from curation.pipeline import run_pipeline
    from curation.recipe import load_pipeline
    from curation.sample import write_sample_corpus
    from tests.helpers.mix import packaged_tokenizer_json

    tmp = tmp_path_factory.mktemp("train")
    write_sample_corpus(tmp / "corpus", rows=300, seed=5, progress=False, workers=2)
    for name in ("demo", "coldstart"):
        run_pipeline(
            load_pipeline(
                ROOT / "pipelines" / f"{name}.yaml",
                [f"vars.corpus={tmp / 'corpus'}", f"vars.out={tmp / 'pools' / name}"],
            ),
            progress=False,
        )
    sets = [
        f"vars.pools={tmp / 'pools'}",
        f"vars.out={tmp / 'mix'}",
        f"vars.tokenizer={packaged_tokenizer_json()}",
        "output.shard_rows=60",
    ]
    for recipe, extra in (
        ("stage0_vision", ["vars.budget=auto"]),
        ("stage2_multitask", ["vars.budget=auto"]),
        ("stage3_anneal", ["vars.budget=auto"]),
        ("coldstart", []),
    ):
        build_mixtures(load_mix_recipe(ROOT / "mixtures" / f"{recipe}.yaml", sets + extra), progress=False)
    return {
        name: tmp / "mix" / name
        for name in ("stage0", "stage2", "anneal_text_heavy", "anneal_vision_heavy", "coldstart")
    }
