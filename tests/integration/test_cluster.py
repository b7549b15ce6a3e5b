"""The pipeline on a real two-node Ray cluster writes the same pool as a local run; the launcher config.

The cluster (a head and a second node, one CPU each: :class:`raycluster.LocalCluster`) runs in a child
process, so it cannot collide with this session's ``ray_local``, and ``curation run --address`` is another
child process, as a user would run it.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from curation.pipeline import run_pipeline
from curation.recipe import load_pipeline
from tests.helpers import ROOT
from tests.helpers.servers.raycluster import LocalCluster

NODE = {"num_cpus": 1, "object_store_memory": 200 * 1024**2, "memory": 2 * 1024**3}


@pytest.fixture
def two_nodes():
    with LocalCluster(nodes=2, start_timeout=120, **NODE) as cluster:
        yield cluster


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _rows(pool: Path) -> tuple[list[str], dict[str, list[str]]]:
    """(sorted kept ids, {reject reason: sorted ids})."""
    kept = sorted(
        i
        for f in (pool / "shards").glob("*.parquet")
        for i in pq.read_table(f, columns=["id"])["id"].to_pylist()
    )
    rejected: dict[str, list[str]] = {}
    for f in (pool / "rejects").glob("*.parquet"):
        for r in pq.read_table(f, columns=["id", "reject_reason"]).to_pylist():
            rejected.setdefault(r["reject_reason"], []).append(r["id"])
    return kept, {k: sorted(v) for k, v in rejected.items()}


def test_two_node_cluster_writes_the_same_pool_as_a_local_run(ray_local, two_nodes, tiny_recipe, tmp_path):
    local = Path(run_pipeline(load_pipeline(tiny_recipe), progress=False).pool)

    out = tmp_path / "pool_cluster"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "curation.cli",
            "run",
            str(tiny_recipe),
            "-q",
            "--address",
            two_nodes.address,
            "--set",
            f"vars.out={out}",
        ],
        check=False,
        env=two_nodes.env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    assert _rows(out) == _rows(local)
    assert len(_rows(out)[0]) == 4
    # Units, ids and writers are deterministic, so every shard has the same bytes (Parquet and tar).
    shards = sorted(p.name for p in (local / "shards").iterdir())
    assert shards == sorted(p.name for p in (out / "shards").iterdir())
    assert {Path(n).suffix for n in shards} == {".parquet", ".tar"}
    assert {n: _sha(out / "shards" / n) for n in shards} == {n: _sha(local / "shards" / n) for n in shards}
    m_local, m_out = (json.loads((p / "manifest.json").read_text()) for p in (local, out))
    assert m_out["shards"] == m_local["shards"] and m_out["recipe_hash"] == m_local["recipe_hash"]
    # Rejects too: their details carry no run-specific text (object addresses are stripped).
    assert m_out["rejects"] == m_local["rejects"]

    # Units were processed on both nodes (one CPU each).
    assert len(two_nodes.nodes_that_ran("MapBatches(process_batch)")) == 2


def test_two_node_cluster_audits_and_mixes_like_a_local_run(ray_local, two_nodes, sample_corpus, tmp_path):
    """The rest of the flow on the same cluster: the contamination audit finds the same matches, and a mixture
    built there has the same shards, byte for byte, as one built locally."""
    from curation.audit import run_audit
    from curation.mix.builder import build_mixtures
    from curation.mix.recipe import mix_recipe_from_dict
    from tests.helpers.mix import make_pool, packaged_tokenizer_json, text_row

    registry = str(ROOT / "pipelines" / "benchmarks.yaml")
    corpus = [str(sample_corpus / "text"), str(sample_corpus / "interleaved")]
    local = run_audit(
        registry,
        corpus,
        str(tmp_path / "audit_local"),
        registry_set=[f"vars.corpus={sample_corpus}"],
        progress=False,
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "curation.cli",
            "audit",
            "--benchmarks",
            registry,
            "--set",
            f"vars.corpus={sample_corpus}",
            "--corpus",
            *corpus,
            "--out",
            str(tmp_path / "audit_cluster"),
            "-q",
            "--address",
            two_nodes.address,
        ],
        check=False,
        env=two_nodes.env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    remote = json.loads((tmp_path / "audit_cluster" / "report.json").read_text())

    def matches(d: dict) -> set:
        return {
            (m["sample_id"], m["benchmark_item"], m["method"])
            for b in d["benchmarks"].values()
            for m in b["matches"]
        }

    assert matches(remote) == matches(local.data) and matches(remote)

    pool = make_pool(tmp_path / "pool", [text_row(i, 5 + i % 40) for i in range(600)], shard_rows=40)
    raw = {
        "pools": {"p": str(pool)},
        "tokenizer": str(packaged_tokenizer_json()),
        "seed": 3,
        "output": {"path": str(tmp_path / "mix_local"), "shard_rows": 30},
        "mixtures": {"m": {"budget": 6000, "sources": {"docs": {"pool": "p", "weight": 1.0}}}},
    }
    (built,) = build_mixtures(mix_recipe_from_dict(raw), progress=False)
    raw["output"]["path"] = str(tmp_path / "mix_cluster")
    recipe = tmp_path / "mix.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    proc = subprocess.run(
        [sys.executable, "-m", "curation.cli", "mix", str(recipe), "-q", "--address", two_nodes.address],
        check=False,
        env=two_nodes.env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    here, there = Path(built.path) / "shards", tmp_path / "mix_cluster" / "m" / "shards"
    names = sorted(p.name for p in here.iterdir())
    assert names == sorted(p.name for p in there.iterdir()) and len(names) > 4
    assert {n: _sha(there / n) for n in names} == {n: _sha(here / n) for n in names}
    assert len(two_nodes.nodes_that_ran("MapBatches(_gather_batch)")) >= 1


@pytest.mark.slow
def test_the_whole_flow_on_a_two_node_cluster_matches_local(ray_local, two_nodes, tmp_path):
    """sample -> pipelines/quality.yaml with its model stages (a tiny random-weight CLIP from a file, the VLM
    judge and captioner against an OpenAI-compatible server process, RapidOCR from its wheel) -> a mixture ->
    a few training steps, with the pipeline and the mix run on the two-node cluster: every step gives what the
    local run gives."""
    from curation.models.torch_compat import ensure_torchvision

    try:
        ensure_torchvision()  # before open_clip: see curation.models.torch_compat
    except ImportError:
        pytest.skip("needs the clip extra: pip install 'keye-curation[clip]'")
    pytest.importorskip("open_clip")
    pytest.importorskip("rapidocr")
    torch = pytest.importorskip("torch")
    from curation.mix.builder import build_mixtures
    from curation.mix.recipe import mix_recipe_from_dict
    from curation.models.clip import import_open_clip, save_clip
    from curation.train.config import load_config
    from curation.train.train import train
    from tests.helpers.clip import TINY_CLIP
    from tests.helpers.mix import packaged_tokenizer_json
    from tests.helpers.servers.openai_server import canned_server

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "curation.cli",
            "sample",
            str(tmp_path / "corpus"),
            "--rows",
            "240",
            "--seed",
            "5",
            "-q",
        ],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    torch.manual_seed(0)
    clip = save_clip(
        import_open_clip().CLIP(**TINY_CLIP).eval(), TINY_CLIP, tmp_path / "tiny.pt", name="tiny-test"
    )

    with canned_server() as url:
        sets = [
            f"vars.corpus={tmp_path / 'corpus'}",
            f"vars.clip={clip}",
            f"vars.vlm_url={url}",
            "vars.vlm_model=canned",
        ]
        recipe = load_pipeline(
            ROOT / "pipelines" / "quality.yaml", [*sets, f"vars.out={tmp_path / 'q_local'}"]
        )
        caption = [s.name for s in recipe.stages].index("dense_caption")
        sets.append(f"stages.{caption}.dense_caption.min_words=3")  # the canned answer is 6 words
        local = Path(
            run_pipeline(
                load_pipeline(
                    ROOT / "pipelines" / "quality.yaml", [*sets, f"vars.out={tmp_path / 'q_local'}"]
                ),
                progress=False,
            ).pool
        )
        args = [
            sys.executable,
            "-m",
            "curation.cli",
            "run",
            str(ROOT / "pipelines" / "quality.yaml"),
            "-q",
            "--address",
            two_nodes.address,
        ]
        for s in [*sets, f"vars.out={tmp_path / 'q_cluster'}"]:
            args += ["--set", s]
        proc = subprocess.run(
            args, check=False, env=two_nodes.env, cwd=ROOT, capture_output=True, text=True, timeout=600
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
    there = tmp_path / "q_cluster"
    assert _rows(there) == _rows(local) and len(_rows(local)[0]) > 10
    assert len(two_nodes.nodes_that_ran("MapBatches(process_batch)")) == 2

    def columns(pool: Path) -> dict:
        rows = {}
        for f in sorted((pool / "shards").glob("*.parquet")):
            for r in pq.read_table(f).to_pylist():
                rows[(r["source_uri"], r["source_offset"])] = (
                    r["score_clip_score"],
                    r["ocr_text"],
                    r["ocr_status"],
                    r["score_vlm_judge"],
                    r["dense_caption"],
                )
        return rows

    a, b = columns(local), columns(there)
    assert a.keys() == b.keys()
    assert all(v[0] is not None and v[3] == 4 for v in a.values())  # every kept row went through the models
    assert any(v[4] for v in a.values()) and any(v[2] for v in a.values())
    for k in (
        a
    ):  # model outputs: the same scores (CPU float, a batch may pair differently: tolerance), texts equal
        assert (a[k][0] is None) == (b[k][0] is None) and abs((a[k][0] or 0) - (b[k][0] or 0)) < 1e-4, k
        assert a[k][1:] == b[k][1:], k

    raw = {
        "pools": {"q": str(local)},
        "tokenizer": str(packaged_tokenizer_json()),
        "seed": 3,
        "output": {"path": str(tmp_path / "mix_local"), "shard_rows": 16},
        "mixtures": {"m": {"budget": "auto", "sources": {"all": {"pool": "q", "weight": 1.0}}}},
    }
    (built,) = build_mixtures(mix_recipe_from_dict(raw), progress=False)
    raw["pools"]["q"], raw["output"]["path"] = str(there), str(tmp_path / "mix_cluster")
    (tmp_path / "mix.yaml").write_text(yaml.safe_dump(raw))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "curation.cli",
            "mix",
            str(tmp_path / "mix.yaml"),
            "-q",
            "--address",
            two_nodes.address,
        ],
        check=False,
        env=two_nodes.env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    here, far = Path(built.path), tmp_path / "mix_cluster" / "m"
    names = sorted(p.name for p in (here / "shards").iterdir())
    assert names == sorted(p.name for p in (far / "shards").iterdir()) and len(names) > 2
    assert {n: _sha(far / "shards" / n) for n in names} == {n: _sha(here / "shards" / n) for n in names}

    def losses(mixture: Path, out: Path) -> list:
        train(
            load_config(
                None,
                [
                    f"mixture={mixture}",
                    f"out={out}",
                    "stage=2",
                    "steps=3",
                    "data.num_workers=0",
                    "log_every=100",
                ],
            )
        )
        return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]

    ran_local, ran_cluster = losses(here, tmp_path / "t_local"), losses(far, tmp_path / "t_cluster")
    assert [r["batch"] for r in ran_cluster] == [r["batch"] for r in ran_local] and len(ran_local) == 3
    assert [r["loss"] for r in ran_cluster] == pytest.approx([r["loss"] for r in ran_local], abs=1e-5)


# ---------------------------------------------------------------- the cluster launcher config


def test_ray_cluster_yaml_has_what_the_launcher_needs():
    config = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    for key in (
        "cluster_name",
        "provider",
        "auth",
        "head_node_type",
        "available_node_types",
        "file_mounts",
        "setup_commands",
        "head_start_ray_commands",
        "worker_start_ray_commands",
    ):
        assert key in config, key
    assert config["provider"]["type"] and config["provider"].get("region")
    types = config["available_node_types"]
    head = config["head_node_type"]
    assert head in types and len(types) >= 2
    for name, node in types.items():
        assert {"node_config", "resources", "min_workers", "max_workers"} <= set(node), name
        assert {"CPU", "memory", "object_store_memory"} <= set(node["resources"]), name
        assert name == head or node["resources"]["CPU"] > 0, name
    # the repository (recipes included) goes to ~/curation and is installed from there
    assert config["file_mounts"]["~/curation"] == "."
    assert (ROOT / "pipelines").is_dir()
    assert any("pip install -e ~/curation" in c for c in config["setup_commands"])
    # explicit sizes on `ray start`, equal to the node types' resources; the same auth mode everywhere
    workers = [n for n in types if n != head]
    for key, names in (("head_start_ray_commands", [head]), ("worker_start_ray_commands", workers)):
        start = next(c for c in config[key] if "ray start" in c)
        assert "export RAY_AUTH_MODE=token" in start, key
        flags = dict(re.findall(r"--(num-cpus|memory|object-store-memory)=(\d+)", start))
        for name in names:
            res = types[name]["resources"]
            assert flags == {
                "num-cpus": str(res["CPU"]),
                "memory": str(res["memory"]),
                "object-store-memory": str(res["object_store_memory"]),
            }, (key, name)
    assert any("RAY_AUTH_MODE=token" in c for c in config["setup_commands"])
