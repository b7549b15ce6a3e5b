"""The demo pipeline on the generated sample corpus, checked row by row against truth.parquet."""

from __future__ import annotations

import polars as pl
import pytest

from curation.pipeline import run_pipeline
from curation.recipe import load_pipeline
from curation.sample import write_sample_corpus
from tests.helpers import ROOT

# What the demo pipeline must do with each kind of dirt (a set: the first stage that catches it wins).
EXPECTED = {
    "corrupt_image": {"undecodable"},
    "truncated_image": {"undecodable"},
    "decompression_bomb": {"decompression_bomb"},
    "tiny": {"side_below_min"},
    "huge": {"side_above_max", "aspect_ratio_above_max"},
    "extreme_aspect": {"aspect_ratio_above_max", "side_below_min"},
    "empty_caption": {"too_short"},
    "non_utf8_caption": {"text_not_utf8"},
    "boilerplate_caption": {"boilerplate", "too_short"},
    "repeated_phrase": {"repeated_phrase"},
    "non_english_caption": {"language_not_allowed", "low_language_confidence", "too_short"},
    "malformed_json": {"malformed_row"},
    "missing_image": {"missing_image_file", "missing_image"},
    # Not the spine's job (CLIP score, near-dup and benchmark decontamination come later): kept.
    "mismatched_caption": {None},
    "near_duplicate": {None},
    "benchmark_copy": {None},
}


@pytest.fixture(scope="module")
def demo(tmp_path_factory, ray_local):
    tmp = tmp_path_factory.mktemp("demo")
    write_sample_corpus(tmp / "corpus", rows=600, seed=3, progress=False)
    recipe = load_pipeline(
        ROOT / "pipelines" / "demo.yaml", [f"vars.corpus={tmp / 'corpus'}", f"vars.out={tmp / 'pool'}"]
    )
    result = run_pipeline(recipe, progress=False)
    cols = ["id", "source_uri", "source_offset"]
    kept = pl.read_parquet(tmp / "pool" / "shards" / "*.parquet", columns=cols).with_columns(
        pl.lit(None, pl.Utf8).alias("reject_reason")
    )
    rejected = pl.read_parquet(tmp / "pool" / "rejects" / "*.parquet", columns=cols + ["reject_reason"])
    rows = pl.concat([kept, rejected])
    truth = pl.read_parquet(tmp / "corpus" / "truth.parquet").with_columns(
        (pl.lit(str(tmp / "corpus") + "/") + pl.col("file")).alias("source_uri"),
        pl.col("offset").alias("source_offset"),
    )
    joined = truth.join(rows, on=["source_uri", "source_offset"], how="left", coalesce=True)
    return result, joined, rows


def test_every_input_row_is_accounted_for_exactly_once(demo):
    result, joined, rows = demo
    assert rows.select(["source_uri", "source_offset"]).is_duplicated().sum() == 0
    assert joined["id"].null_count() == 0, joined.filter(pl.col("id").is_null())
    assert rows.height == joined.height == result.stats["rows_in"]


@pytest.mark.parametrize("dirt", sorted(EXPECTED))
def test_each_kind_of_dirt_gets_its_reason(demo, dirt):
    _, joined, _ = demo
    image_sources = joined.filter(
        pl.col("source").is_in(["wds", "parquet", "jsonl"]) & (pl.col("dirt") == dirt)
    )
    assert image_sources.height, f"the sample corpus has no {dirt}"
    got = image_sources.group_by("reject_reason").len()
    if EXPECTED[dirt] == {None}:  # kept, up to the language-ID noise clean rows see (test_clean_rows_survive)
        lost = image_sources["reject_reason"].is_not_null().sum()
        assert lost <= max(1, 0.05 * image_sources.height), f"{dirt}: {got.to_dicts()}"
        return
    wrong = got.filter(
        pl.col("reject_reason").is_null() | ~pl.col("reject_reason").is_in(list(EXPECTED[dirt]))
    )
    assert wrong.height == 0, f"{dirt}: {got.to_dicts()}"


def test_exact_duplicates_are_removed_and_the_original_kept(demo):
    _, joined, _ = demo
    dups = joined.filter(pl.col("dirt") == "exact_duplicate")
    assert dups.height
    originals = joined.filter(pl.col("dirt") != "exact_duplicate").select(
        "id", pl.col("reject_reason").alias("orig")
    )
    checked = dups.join(originals.unique("id"), on="id", how="left")
    assert (
        checked["orig"].null_count() + checked.filter(pl.col("orig").is_not_null()).height == checked.height
    )
    # each duplicate is rejected as such, unless its original was rejected first for a content reason
    bad = checked.filter(
        (pl.col("reject_reason") != "duplicate") & (pl.col("reject_reason") != pl.col("orig"))
    )
    assert bad.height == 0, bad.select("file", "offset", "reject_reason", "orig").to_dicts()


def test_clean_rows_survive(demo):
    _, joined, _ = demo
    clean = joined.filter(pl.col("dirt") == "clean")
    lost = clean.filter(pl.col("reject_reason").is_not_null())
    assert lost.height <= 0.02 * clean.height, lost.group_by("reject_reason").len().to_dicts()


VIDEO_EXPECTED = {
    "truncated_video": "unreadable_video",
    "corrupt_video": "unreadable_video",
    "empty_video": "unreadable_video",
    "audio_only": "unreadable_video",
    "static_video": "static",
    "black_video": "mostly_blank",
    "clean": None,
    "multi_shot": None,
    "burned_text": None,
    "benchmark_copy": None,
}


def test_every_kind_of_video_gets_its_reason(demo):
    _, joined, _ = demo
    videos = joined.filter(pl.col("source") == "video")
    assert videos.height >= 12
    got = {(d, r) for d, r in zip(videos["dirt"], videos["reject_reason"])}
    assert {d for d, _ in got} == set(VIDEO_EXPECTED) - {"clean"} | ({"clean"} & set(videos["dirt"]))
    assert got == {(d, VIDEO_EXPECTED[d]) for d, _ in got}, sorted(
        got - {(d, VIDEO_EXPECTED[d]) for d, _ in got}
    )
