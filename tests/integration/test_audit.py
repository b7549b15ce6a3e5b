"""`curation audit`: recall and false positives against the planted benchmark copies, report names, bad
input."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from curation.audit import run_audit
from curation.cli import main
from tests.helpers import ROOT

REGISTRY = str(ROOT / "pipelines" / "benchmarks.yaml")


@pytest.fixture(scope="session")
def planted(tmp_path_factory) -> Path:
    """3,000 rows with a benchmark copy in 10% of every source: ~300 plants of every kind, ~2,700 other rows
    (videos are 1% of rows, so only a few video plants: tests/unit/dedup/test_video.py measures video
    recall at scale)."""
    from curation.sample import write_sample_corpus

    out = tmp_path_factory.mktemp("planted") / "corpus"
    write_sample_corpus(out, rows=3000, seed=11, progress=False, benchmark_rate=0.1)
    return out


def _corpus_paths(corpus: Path) -> list[str]:
    return [str(corpus / d) for d in ("image_text", "interleaved", "text", "video")]


@pytest.fixture(scope="session")
def audit(planted, ray_local, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("audit") / "out"
    result = run_audit(
        REGISTRY, _corpus_paths(planted), str(out), registry_set=[f"vars.corpus={planted}"], progress=False
    )
    return {"out": out, "data": result.data, "corpus": planted}


def _joined(audit: dict) -> pl.DataFrame:
    """Truth rows with the benchmark items the audit matched in them (empty list: none)."""
    corpus = audit["corpus"]
    found: dict[tuple[str, int], list[str]] = {}
    for b in audit["data"]["benchmarks"].values():
        for m in b["matches"]:
            found.setdefault((m["source_uri"], m["source_offset"]), []).append(m["benchmark_item"])
    truth = pl.read_parquet(corpus / "truth.parquet")
    items = [found.get((f"{corpus}/{f}", o), []) for f, o in zip(truth["file"], truth["offset"])]
    return truth.with_columns(pl.Series("found", items, dtype=pl.List(pl.String)))


def test_recall_on_every_kind_of_planted_copy(audit):
    df = _joined(audit)
    plants = df.filter(pl.col("dirt") == "benchmark_copy")
    assert plants.height >= 250 and set(plants["source"]) == {
        "wds",
        "parquet",
        "jsonl",
        "interleaved",
        "text",
        "video",
    }
    per_source = plants.group_by("source").agg((pl.col("found").list.len() > 0).mean().alias("recall"))
    recall = (plants["found"].list.len() > 0).mean()
    assert recall >= 0.99, per_source
    # and the match names the planted item itself, not only a look-alike
    named = (
        plants.filter(pl.col("found").list.len() > 0)
        .select(
            pl.struct("bench_item", "found").map_elements(lambda r: r["bench_item"] in r["found"], pl.Boolean)
        )
        .to_series()
    )
    assert named.mean() >= 0.99
    # and, nearly always, only it: template questions shared by many items do not drag their siblings in
    only = plants.select(
        pl.struct("bench_item", "found").map_elements(
            lambda r: set(r["found"]) == {r["bench_item"]}, pl.Boolean
        )
    ).to_series()
    assert only.mean() >= 0.97, plants.filter(~only).select("source", "bench_item", "found")


def test_false_positives_on_clean_rows(audit):
    df = _joined(audit)
    clean = df.filter(pl.col("dirt") != "benchmark_copy")
    flagged = clean.filter(pl.col("found").list.len() > 0)
    assert flagged.height <= 0.001 * clean.height, flagged.select("file", "offset", "dirt", "found")


def test_report_json_has_the_documented_names(audit):
    data = json.loads((audit["out"] / "report.json").read_text())
    assert set(data["benchmarks"]) == {"sample_vqa", "sample_qa", "sample_video"}
    for name, b in data["benchmarks"].items():
        summary = json.loads((audit["corpus"] / "corpus.json").read_text())["benchmark"]
        assert b["items"] == summary["videos" if name == "sample_video" else "items"]
        assert 0 < b["contaminated_items"] <= b["items"]
        assert b["contaminated_items"] == len({m["benchmark_item"] for m in b["matches"]})
        m = b["matches"][0]
        assert {"benchmark_item", "sample_id", "modality", "method", "score"} <= set(m)
        assert m["method"] in data["methods"] and 0 < m["score"] <= 1
        assert [x["score"] for x in b["matches"]] == sorted((x["score"] for x in b["matches"]), reverse=True)
    # the template VQA questions ("What colour is the circle?") are too short to name an item alone: matched
    # through their image, so partly indexed, never "not indexed"
    vqa = data["benchmarks"]["sample_vqa"]
    assert not vqa["not_indexed"] and vqa["partially_indexed"]
    assert all(x["part"] == "text" for x in vqa["partially_indexed"])
    methods = {m["method"] for b in data["benchmarks"].values() for m in b["matches"]}
    assert {"text_containment", "image_hash", "image_question", "video_keyframes"} <= methods
    assert data["rows_scanned"] == 3000


def test_report_html_shows_matches_side_by_side(audit):
    html = (audit["out"] / "report.html").read_text()
    assert "sample_vqa" in html and "sample_qa" in html and "<svg" in html
    assert html.count('<div class="m">') >= 100
    assert html.count("data:image/jpeg;base64") >= 100  # benchmark and corpus thumbnails
    assert "<mark>" in html  # the question located in the corpus text


def test_a_pool_is_audited_like_its_sources(planted, audit, ray_local, tmp_path):
    """Rows read back from a pool's shards keep their ids and lineage, so the audit finds the same matches."""
    from curation.pipeline import run_pipeline
    from curation.recipe import load_pipeline

    recipe = tmp_path / "keep.yaml"
    recipe.write_text(f"""
sources: [{{name: t, format: jsonl, modality: text, paths: ["{planted}/text/*.jsonl"]}},
          {{name: d, format: jsonl, modality: interleaved, paths: ["{planted}/interleaved/*.jsonl"]}}]
stages: [{{caption_length: {{annotate_only: true}}}}]
output: {{path: "{tmp_path / "pool"}", formats: [parquet], report: false}}
""")
    run_pipeline(load_pipeline(recipe), progress=False)
    result = run_audit(
        REGISTRY,
        [str(tmp_path / "pool")],
        str(tmp_path / "audit"),
        registry_set=[f"vars.corpus={planted}"],
        progress=False,
    )
    from_pool = {
        (m["sample_id"], m["benchmark_item"], m["method"])
        for b in result.data["benchmarks"].values()
        for m in b["matches"]
    }
    direct = {
        (m["sample_id"], m["benchmark_item"], m["method"])
        for b in audit["data"]["benchmarks"].values()
        for m in b["matches"]
        if m["row_modality"] in ("text", "interleaved")
    }
    assert from_pool == direct and from_pool


def test_bad_benchmark_files_are_named_and_listed(planted, ray_local, tmp_path, capsys):
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "good.jsonl").write_text(
        json.dumps(
            {
                "id": "g1",
                "question": "Which river flows through the old "
                "harbour town of Valparaiso according to the guide?",
            }
        )
        + "\n"
    )
    (bench / "noq.jsonl").write_text(
        json.dumps({"id": "n1", "prompt": "a question under another name"}) + "\n"
    )
    (bench / "img.jsonl").write_text(
        json.dumps(
            {"id": "i1", "question": "What is shown in this picture of the market?", "image": "missing.png"}
        )
        + "\n"
        + json.dumps({"id": "i2", "question": "What?", "image": "broken.png"})
        + "\n"
    )
    (bench / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (bench / "items.csv").write_text("id,question\n1,hello\n")
    reg = tmp_path / "reg.yaml"
    reg.write_text(f"""benchmarks:
  - {{name: good, paths: ["{bench}/good.jsonl"], fields: {{id: id, question: question}}}}
  - {{name: renamed, paths: ["{bench}/noq.jsonl"], fields: {{id: id, question: question}}}}
  - {{name: images, paths: ["{bench}/img.jsonl"], fields: {{id: id, question: question, image: image}}}}
  - {{name: csv, paths: ["{bench}/items.csv"], fields: {{id: id, question: question}}}}
""")
    code = main(
        [
            "audit",
            "--benchmarks",
            str(reg),
            "--corpus",
            str(planted / "text"),
            "--out",
            str(tmp_path / "o"),
            "-q",
        ]
    )
    assert code == 0
    data = json.loads((tmp_path / "o" / "report.json").read_text())
    b = data["benchmarks"]
    assert b["good"]["items"] == 1 and not b["good"]["not_indexed"] and not b["good"]["partially_indexed"]
    (x,) = b["renamed"]["not_indexed"]
    assert (
        "noq.jsonl" in x["item"]
        and "fields.question -> 'question'" in x["reason"]
        and "prompt" in x["reason"]
    )
    # i1 keeps its text: its missing image is a part not indexed; i2 ("What?", broken image) has nothing left
    partly = {(x["item"], x["part"]): x["reason"] for x in b["images"]["partially_indexed"]}
    assert set(partly) == {("i1", "image 0")} and "file not found" in partly[("i1", "image 0")]
    assert "missing.png" in partly[("i1", "image 0")]
    reasons = {(x["item"], x["part"]): x["reason"] for x in b["images"]["not_indexed"]}
    assert "not a readable image" in reasons[("i2", "image 0")]
    assert ("i2", "item") in reasons and ("i1", "item") not in reasons
    (c,) = b["csv"]["not_indexed"]
    assert "items.csv" in c["item"] and "unknown format '.csv'" in c["reason"]
    assert "contaminated" in capsys.readouterr().out


def test_audit_refuses_what_it_cannot_read(tmp_path, planted, capsys):
    (tmp_path / "weird.jsonl").write_text(json.dumps({"foo": 1}) + "\n")
    code = main(
        [
            "audit",
            "--benchmarks",
            REGISTRY,
            "--set",
            f"vars.corpus={planted}",
            "--corpus",
            str(tmp_path / "weird.jsonl"),
            "--out",
            str(tmp_path / "o"),
            "-q",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "weird.jsonl" in err and "foo" in err


@pytest.mark.slow
def test_at_scale_with_a_500_item_benchmark(ray_local, tmp_path):
    """50,000 rows, 500 VQA + 500 QA items + 100 videos, the default 1% plant rate: false positives grow with
    the benchmark's size (more look-alike drawings), so the small default test alone would flatter them."""
    from curation.sample import write_sample_corpus

    corpus = tmp_path / "corpus"
    write_sample_corpus(corpus, rows=50_000, seed=2, progress=False)
    result = run_audit(
        REGISTRY,
        _corpus_paths(corpus),
        str(tmp_path / "out"),
        registry_set=[f"vars.corpus={corpus}"],
        progress=False,
    )
    df = _joined({"corpus": corpus, "data": result.data})
    plants = df.filter(pl.col("dirt") == "benchmark_copy")
    assert plants.height >= 400 and (plants["found"].list.len() > 0).mean() >= 0.99
    clean = df.filter(pl.col("dirt") != "benchmark_copy")
    assert clean.filter(pl.col("found").list.len() > 0).height <= 0.001 * clean.height


def test_bad_match_options_are_named_as_on_the_command_line(planted, tmp_path, capsys):
    code = main(
        [
            "audit",
            "--benchmarks",
            REGISTRY,
            "--set",
            f"vars.corpus={planted}",
            "--corpus",
            str(planted / "text"),
            "--out",
            str(tmp_path / "o"),
            "--match",
            "bogus=1",
            "--match",
            "text_threshold=high",
            "-q",
        ]
    )
    err = capsys.readouterr().err
    assert (
        code == 2
        and "--match bogus: unknown key" in err
        and "--match text_threshold: expected a number" in err
    )
    assert not (tmp_path / "o").exists()
