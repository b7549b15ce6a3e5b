"""The decontaminate stage and pipeline: benchmark items found in every source, few false alarms."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from curation.filters import registry
from curation.pipeline import run_pipeline
from curation.recipe import load_pipeline
from curation.schema import from_rows
from curation.spec import RecipeError
from tests.helpers import ROOT


@pytest.fixture
def corpus(sample_corpus: Path) -> Path:
    return sample_corpus


def _stage(corpus: Path, **params):
    stage = registry()["decontaminate"](
        benchmarks=str(ROOT / "pipelines" / "benchmarks.yaml"),
        registry_set=[f"vars.corpus={corpus}"],
        **params,
    )
    stage.setup()
    stage.use_index(stage.build_index(None))
    return stage


def test_a_question_inside_a_long_document_is_found(corpus):
    items = [json.loads(line) for line in (corpus / "benchmark" / "qa.jsonl").read_text().splitlines()]
    item = items[3]
    filler = "The committee met on Tuesday to discuss the budget for the coming year. " * 40
    letters = "ABCD"
    quiz = "\n".join(
        [f"Quiz: {item['question'].upper()}"]
        + [f"{letters[k]}) {c}" for k, c in enumerate(item["choices"])]
        + [f"Answer: {item['answer']}"]
    )
    batch = from_rows(
        [
            {"id": "a", "modality": "text", "text": f"{filler}\n{quiz}\n{filler}"},
            {"id": "b", "modality": "text", "text": filler},
        ]
    )
    out = _stage(corpus)(batch)
    assert out["reject_reason"].to_pylist() == ["contaminated:sample_qa", None]
    best = json.loads(out["reject_detail"][0].as_py())[0]
    assert best == {
        "benchmark": "sample_qa",
        "benchmark_item": item["id"],
        "modality": "text",
        "method": "text_containment",
        "score": best["score"],
        "detail": {},
    }
    # question and options are indexed as separate segments, so the labels in between cost nothing
    assert best["score"] >= 0.95 and out["score_decontaminate"].to_pylist() == [best["score"], 0.0]


def test_pipeline_removes_every_benchmark_copy(ray_local, corpus, tmp_path):
    recipe = load_pipeline(
        ROOT / "pipelines" / "decontaminate.yaml",
        [
            f"vars.corpus={corpus}",
            f"vars.out={tmp_path / 'pool'}",
            f"vars.registry={ROOT / 'pipelines' / 'benchmarks.yaml'}",
        ],
    )
    result = run_pipeline(recipe, progress=False)
    rejected = pl.read_parquet(
        tmp_path / "pool" / "rejects" / "*.parquet",
        columns=["source_uri", "source_offset", "reject_reason", "reject_detail"],
    )
    truth = pl.read_parquet(corpus / "truth.parquet").with_columns(
        (pl.lit(f"{corpus}/") + pl.col("file")).alias("source_uri"), pl.col("offset").alias("source_offset")
    )
    joined = truth.join(rejected, on=["source_uri", "source_offset"], how="left")
    copies = joined.filter(pl.col("dirt") == "benchmark_copy")
    assert copies.height >= 8 and copies["reject_reason"].str.starts_with("contaminated:sample_").all()
    for row in copies.iter_rows(named=True):  # the match is recorded in the rejects
        assert row["bench_item"] in {m["benchmark_item"] for m in json.loads(row["reject_detail"])}
    clean = joined.filter(pl.col("dirt") == "clean")
    assert clean["reject_reason"].str.starts_with("contaminated:").sum() <= 0.002 * clean.height
    assert result.stats["stages"][1]["name"] == "decontaminate"
    drops = result.stats["stages"][1]["drops"]
    assert set(drops) <= {"contaminated:sample_vqa", "contaminated:sample_qa", "contaminated:sample_video"}


def test_the_registry_is_required_and_checked(tmp_path, corpus):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"sources: [{{name: t, format: jsonl, modality: text, paths: ['{corpus}/text']}}]\n"
        f"stages: [decontaminate]\noutput: {{path: {tmp_path / 'o'}}}\n"
    )
    with pytest.raises(RecipeError, match="benchmarks: required"):
        load_pipeline(recipe)


def test_a_video_row_is_matched_from_its_frames_or_its_path(corpus, tmp_path):
    import random

    from curation.io.video import sample_frames
    from curation.sample.video import reencode

    original = (corpus / "benchmark" / "videos" / "vid-0002.mp4").read_bytes()
    copy = tmp_path / "copy.webm"
    copy.write_bytes(reencode(original, random.Random(4), start_s=0.7, end_s=3.2))  # re-encoded and trimmed
    vf = sample_frames(str(copy))
    batch = from_rows(
        [
            {"id": "framed", "modality": "video", "frames": vf.frames, "frame_ts": vf.ts},
            {"id": "path-only", "modality": "video", "video": str(copy)},
            {"id": "other", "modality": "video", "video": str(corpus / "benchmark" / "videos" / "nope.mp4")},
        ]
    )
    assert _stage(corpus)(batch)["reject_reason"].to_pylist() == ["contaminated:sample_video", None, None]
    out = _stage(corpus, media_roots=[str(tmp_path), str(corpus)])(
        batch
    )  # a path is followed under media_roots only
    assert out["reject_reason"].to_pylist() == ["contaminated:sample_video"] * 2 + [None]
    for detail in out["reject_detail"].to_pylist()[:2]:
        best = json.loads(detail)[0]
        assert (best["benchmark_item"], best["method"], best["modality"]) == (
            "vid-0002",
            "video_keyframes",
            "video",
        )


def test_a_near_copy_of_a_whole_item_is_also_a_minhash_match(corpus):
    item = json.loads((corpus / "benchmark" / "qa.jsonl").read_text().splitlines()[5])
    words = item["question"].split()
    words[len(words) // 2] = "indeed"  # one word changed, the options run together
    text = " ".join(words) + " " + " / ".join(item["choices"])
    out = _stage(corpus)(from_rows([{"id": "q", "modality": "text", "text": text}]))
    methods = {(m["benchmark_item"], m["method"]) for m in json.loads(out["reject_detail"][0].as_py())}
    assert {(item["id"], "text_containment"), (item["id"], "text_minhash")} <= methods
