"""The decontaminate stage and pipeline: benchmark items found in every source, few false alarms."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from curation.recipe import RecipeError, load_pipeline
from curation.runner import run_pipeline
from curation.schema import from_rows
from curation.stage import load_registry

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def corpus(sample_corpus: Path) -> Path:
    return sample_corpus


def _stage(corpus: Path, **params):
    stage = load_registry()["decontaminate"](benchmarks=str(ROOT / "pipelines" / "benchmarks.yaml"),
                                             registry_set=[f"vars.corpus={corpus}"], **params)
    stage.setup()
    stage.use_index(stage.build_index(None))
    return stage


def test_a_question_inside_a_long_document_is_found(corpus):
    items = [json.loads(line) for line in (corpus / "benchmark" / "vqa.jsonl").read_text().splitlines()]
    long_q = max(items, key=lambda i: len(i["question"] + " ".join(i["options"])))
    filler = "The committee met on Tuesday to discuss the budget for the coming year. " * 40
    doc = f"{filler}\nQuiz: {long_q['question']}\nOptions: {', '.join(long_q['options'])}\nAnswer: {long_q['answer']}\n{filler}"
    batch = from_rows([{"id": "a", "modality": "text", "text": doc},
                       {"id": "b", "modality": "text", "text": filler}])
    out = _stage(corpus)(batch)
    assert out["reject_reason"].to_pylist() == ["benchmark_text", None]
    assert f"sample_vqa:{long_q['item_id']}" in out["reject_detail"][0].as_py()
    # Labels such as "Options:" and "Answer:" break the n-grams that span question, options and answer in
    # the indexed item text, so a faithful copy scores about 0.5 here, not 1.0 (to improve in the audit work).
    assert out["score_decontaminate"].to_pylist()[0] >= 0.5 and out["score_decontaminate"].to_pylist()[1] < 0.2


def test_pipeline_removes_every_benchmark_copy(ray_local, corpus, tmp_path):
    recipe = load_pipeline(ROOT / "pipelines" / "decontaminate.yaml",
                           [f"vars.corpus={corpus}", f"vars.out={tmp_path / 'pool'}",
                            f"vars.registry={ROOT / 'pipelines' / 'benchmarks.yaml'}"])
    result = run_pipeline(recipe, progress=False)
    rejected = pl.read_parquet(tmp_path / "pool" / "rejects" / "*.parquet",
                               columns=["source_uri", "source_offset", "reject_reason"])
    truth = pl.read_parquet(corpus / "truth.parquet").with_columns(
        (pl.lit(f"{corpus}/") + pl.col("file")).alias("source_uri"), pl.col("offset").alias("source_offset"))
    joined = truth.join(rejected, on=["source_uri", "source_offset"], how="left")
    copies = joined.filter(pl.col("dirt") == "benchmark_copy")
    assert copies.height and copies["reject_reason"].is_in(["benchmark_image", "benchmark_text"]).all()
    clean = joined.filter(pl.col("dirt") == "clean")
    false_alarms = clean["reject_reason"].is_in(["benchmark_image", "benchmark_text"]).sum()
    assert false_alarms <= 0.02 * clean.height
    assert result.stats["stages"][1]["name"] == "decontaminate"


def test_the_registry_is_required_and_checked(tmp_path, corpus):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"sources: [{{name: t, format: jsonl, modality: text, paths: ['{corpus}/text']}}]\n"
                      f"stages: [decontaminate]\noutput: {{path: {tmp_path / 'o'}}}\n")
    with pytest.raises(RecipeError, match="benchmarks: required"):
        load_pipeline(recipe)
