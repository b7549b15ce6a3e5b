"""The sample's cold-start sources through pipelines/coldstart.yaml, checked row by row against
sft/truth.parquet (on the session's Ray)."""

from __future__ import annotations

import polars as pl
import pytest
import yaml

from curation.recipe import load_pipeline
from tests.helpers import ROOT


@pytest.fixture(scope="module")
def coldstart(tmp_path_factory, ray_local):
    """The sample corpus (150 rows: ~90 conversations) through pipelines/coldstart.yaml; without the
    think_with_image stage when it is not registered (then no think_with_image row can pass)."""
    from curation.filters import registry
    from curation.pipeline import run_pipeline
    from curation.sample import write_sample_corpus

    tmp = tmp_path_factory.mktemp("coldstart")
    write_sample_corpus(tmp / "corpus", rows=150, seed=4, progress=False, workers=2)
    recipe_path = ROOT / "pipelines" / "coldstart.yaml"
    sandbox = "think_with_image" in registry()
    if not sandbox:
        raw = yaml.safe_load(recipe_path.read_text())
        raw["stages"] = [s for s in raw["stages"] if "think_with_image" not in s]
        recipe_path = tmp / "coldstart.yaml"
        recipe_path.write_text(yaml.safe_dump(raw))
    recipe = load_pipeline(recipe_path, [f"vars.corpus={tmp / 'corpus'}", f"vars.out={tmp / 'pool'}"])
    result = run_pipeline(recipe, progress=False)
    cols = ["source_uri", "source_offset", "mode", "messages", "reject_stage", "reject_reason"]
    kept = (
        pl.read_parquet(tmp / "pool" / "shards" / "*.parquet")
        .with_columns(
            pl.lit(None, pl.Utf8).alias("reject_stage"), pl.lit(None, pl.Utf8).alias("reject_reason")
        )
        .select(cols)
    )
    rejected = pl.read_parquet(tmp / "pool" / "rejects" / "*.parquet").select(cols)
    truth = pl.read_parquet(tmp / "corpus" / "sft" / "truth.parquet").with_columns(
        (pl.lit(str(tmp / "corpus") + "/") + pl.col("file")).alias("source_uri"),
        pl.col("offset").alias("source_offset"),
    )
    rows = pl.concat([kept, rejected]).with_columns(pl.lit(True).alias("seen"))
    joined = truth.join(rows, on=["source_uri", "source_offset"], how="left", suffix="_got")
    return result, joined, sandbox


def test_every_conversation_is_accounted_for_once(coldstart):
    result, joined, _ = coldstart
    assert joined.height == result.stats["rows_in"]  # no input row twice in the pool
    assert joined["seen"].null_count() == 0, joined.filter(pl.col("seen").is_null()).to_dicts()
    assert joined.filter(pl.col("messages").is_null() & pl.col("reject_stage").is_null()).height == 0


def test_rejects_match_the_truth_labels(coldstart):
    _, joined, sandbox = coldstart
    rows = joined if sandbox else joined.filter(pl.col("source") != "think_with_image")
    wrong = rows.filter(
        (pl.col("stage").fill_null("-") != pl.col("reject_stage").fill_null("-"))
        | (pl.col("reason").fill_null("-") != pl.col("reject_reason").fill_null("-"))
    )
    assert wrong.height == 0, wrong.select("source", "offset", "dirt", "reason", "reject_reason").to_dicts()
    assert rows.filter(pl.col("dirt") != "clean").height >= 20  # every kind of dirt, at least once


def test_think_with_image_rows(coldstart):
    _, joined, sandbox = coldstart
    twi = joined.filter(pl.col("source") == "think_with_image")
    ingest = twi.filter(pl.col("stage") == "ingest")
    assert ingest.height >= 2 and (ingest["reject_reason"] == ingest["reason"]).all()
    clean = twi.filter(pl.col("dirt") == "clean")
    code = twi.filter((pl.col("dirt") != "clean") & (pl.col("stage") != "ingest"))
    assert code.height >= 6  # syntax error, raises, reads a file, opens a socket, no result, loops forever
    if sandbox:  # the code ran: a tool turn with the output image follows it, and sft_validate accepts that
        assert clean["reject_reason"].null_count() == clean.height > 0
        assert all('"role": "tool"' in m for m in clean["messages"])
        assert (code["reject_stage"] == "think_with_image").all()
    else:  # nothing ran the code: the rows are still in their pre-execution form
        assert (clean["reject_reason"] == "no_tool_turn").all()
        expected = code.select(
            pl.when(pl.col("dirt") == "syntax_error")
            .then(pl.lit("code_does_not_parse"))
            .otherwise(pl.lit("no_tool_turn"))
        ).to_series()
        assert (code["reject_reason"] == expected).all(), code.to_dicts()


def test_kept_rows_per_mode(coldstart):
    _, joined, sandbox = coldstart
    kept = joined.filter(pl.col("reject_stage").is_null())
    assert (kept["mode"] == kept["mode_got"]).all()
    got = dict(kept.group_by("mode").len().iter_rows())
    clean = dict(joined.filter(pl.col("dirt") == "clean").group_by("mode").len().iter_rows())
    for mode in ("thinking", "non_thinking", "auto_think", "video"):
        assert got.get(mode) == clean[mode] > 0, (mode, got, clean)
    assert got.get("think_with_image", 0) == (clean["think_with_image"] if sandbox else 0)
    # the report's mix: more non-reasoning than reasoning, auto-think the smallest
    assert clean["non_thinking"] > clean["thinking"] > clean["think_with_image"] > clean["auto_think"]
