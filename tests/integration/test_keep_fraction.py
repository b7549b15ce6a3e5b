"""Global thresholds: keep_fraction keeps the top fraction of every row a stage scored, pool-wide."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import polars as pl
import pytest

from curation.pipeline import run_pipeline
from curation.recipe import load_pipeline
from curation.spec import RecipeError

RECIPE = """
name: keep
sources:
  - {{name: pairs, format: webdataset, modality: image_text, paths: ["{corpus}/image_text/wds/*.tar"]}}
stages:
  - image_decode: {{}}
  - caption_language: {{keep_fraction: {fraction}}}
output: {{path: "{out}", shard_rows: 150}}
"""


def _recipe(tmp_path: Path, corpus: Path, fraction, name="keep.yaml") -> Path:
    path = tmp_path / name
    path.write_text(RECIPE.format(corpus=corpus, out=tmp_path / "pool", fraction=fraction))
    return path


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_keep_fraction_cuts_at_the_global_quantile_and_resumes(ray_local, sample_corpus, tmp_path):
    result = run_pipeline(load_pipeline(_recipe(tmp_path, sample_corpus, 0.3)), progress=False)
    pool = Path(result.pool)
    kept = pl.read_parquet(pool / "shards" / "*.parquet")
    rejects = pl.read_parquet(pool / "rejects" / "*.parquet")
    moved = rejects.filter(pl.col("reject_reason") == "below_keep_fraction")
    scored = pl.concat([kept.select("score_caption_language"), rejects.select("score_caption_language")])
    n = scored["score_caption_language"].drop_nulls().len()
    assert n > 100 and len(list((pool / "shards").glob("*.parquet"))) > 2  # several shards: the cut is global
    # exactly the top 30% of every scored row (ties at the cut broken by id), nothing below the cut survives
    assert kept.height == math.ceil(0.3 * n)
    assert kept["score_caption_language"].min() >= moved["score_caption_language"].max()
    assert set(moved["reject_stage"]) == {"caption_language"}
    assert "the cut for the top 30% of" in moved["reject_detail"][0]
    # no row lost or duplicated: every row (by lineage: exact duplicates share an id) is in exactly one place
    rows = [(u, o) for t in (kept, rejects) for u, o in zip(t["source_uri"], t["source_offset"])]
    assert len(rows) == len(set(rows)) == result.stats["rows_in"]
    manifest = json.loads((pool / "manifest.json").read_text())
    assert manifest["totals"]["rows"] == kept.height
    for s in manifest["shards"]:
        assert _sha(pool / s["parquet"]["path"]) == s["parquet"]["sha256"]
        assert _sha(pool / s["tar"]["path"]) == s["tar"]["sha256"]
    assert sum(r["rows"] for r in manifest["rejects"]) == rejects.height
    stage = next(s for s in result.stats["stages"] if s["name"] == "caption_language (keep_fraction)")
    assert stage["drops"]["below_keep_fraction"] == moved.height and stage["scored"] == n
    assert result.stats["rows_out"] == kept.height

    # the rerun of a finished pool changes nothing
    before = {p.name: _sha(p) for p in sorted((pool / "shards").iterdir())}
    again = run_pipeline(load_pipeline(_recipe(tmp_path, sample_corpus, 0.3)), progress=False)
    assert {p.name: _sha(p) for p in sorted((pool / "shards").iterdir())} == before
    assert again.manifest == manifest


def test_cutting_a_shard_survives_a_crash_before_its_record(ray_local, sample_corpus, tmp_path, monkeypatch):
    """The crash window of the cut: new shard and rejects written, record not yet: the rerun ends the same."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    import curation.io.pool as pool_mod
    from curation.io import commit

    path = tmp_path / "annotated.yaml"
    path.write_text(
        RECIPE.format(corpus=sample_corpus, out=tmp_path / "base", fraction=0.3).replace(
            "caption_language: {keep_fraction: 0.3}", "caption_language: {annotate_only: true}"
        )
    )
    base = Path(run_pipeline(load_pipeline(path), progress=False).pool)
    entry = json.loads((base / "manifest.json").read_text())["shards"][0]
    table = pq.read_table(base / entry["parquet"]["path"])
    schema = table.schema
    reject_schema = pa.schema(
        list(schema) + [pa.field(c, pa.string()) for c in ("reject_stage", "reject_reason", "reject_detail")]
    )
    threshold = float(pl.from_arrow(table)["score_caption_language"].median())

    def cut(root: Path) -> dict:
        c = pool_mod.ThresholdCut("caption_language", "score_caption_language", threshold, (), "test")
        return pool_mod.cut_shard(str(root), entry, c, schema, reject_schema, ["parquet", "webdataset"])

    shutil.copytree(base, tmp_path / "clean")
    clean = cut(tmp_path / "clean")
    shutil.copytree(base, tmp_path / "crash")
    real = commit.write_bytes

    def crash_at_record(p, data, fs=None):
        if "/_work/global/" in str(p):
            raise OSError("disk full (simulated)")
        real(p, data, fs)

    monkeypatch.setattr(commit, "write_bytes", crash_at_record)
    with pytest.raises(OSError, match="simulated"):
        cut(tmp_path / "crash")
    assert (tmp_path / "crash" / entry["parquet"]["path"]).exists()  # the old shard is whole until the record
    monkeypatch.setattr(commit, "write_bytes", real)
    again = cut(tmp_path / "crash")
    assert again == clean and 0 < clean["moved"] < table.num_rows
    for root in (tmp_path / "clean", tmp_path / "crash"):
        assert not (root / entry["parquet"]["path"]).exists() and not (root / entry["tar"]["path"]).exists()
    for rel in (clean["shard"]["parquet"]["path"], clean["shard"]["tar"]["path"], clean["rejects"]["path"]):
        assert _sha(tmp_path / "clean" / rel) == _sha(tmp_path / "crash" / rel)
    assert clean["shard"]["rows"] + clean["rejects"]["rows"] == table.num_rows
    assert cut(tmp_path / "crash") == clean  # and once recorded, a rerun does nothing


def test_keep_fraction_only_for_ranking_scores(tmp_path, sample_corpus):
    path = tmp_path / "bad.yaml"
    path.write_text(
        RECIPE.format(corpus=sample_corpus, out=tmp_path / "pool", fraction=0.3).replace(
            "caption_language: {keep_fraction: 0.3}", "image_size: {keep_fraction: 0.3}"
        )
    )
    with pytest.raises(
        RecipeError, match="stages.1.image_size.keep_fraction: 'image_size' scores are not a quality"
    ):
        load_pipeline(path)
    with pytest.raises(RecipeError, match=r"keep_fraction: expected a fraction in \(0, 1\], got 1.5"):
        load_pipeline(_recipe(tmp_path, sample_corpus, 1.5, "bad2.yaml"))


def test_calibrate_shows_kept_fractions_and_borderline_rows(ray_local, sample_corpus, tmp_path):
    from curation.calibrate import calibrate
    from curation.cli import main

    path = tmp_path / "annotated.yaml"
    path.write_text(
        RECIPE.format(corpus=sample_corpus, out=tmp_path / "pool", fraction=0.3).replace(
            "caption_language: {keep_fraction: 0.3}", "caption_language: {annotate_only: true}"
        )
    )
    pool = Path(run_pipeline(load_pipeline(path), progress=False).pool)
    html, js = calibrate(pool, "score_caption_language", thresholds=[0.5], keep=[0.8, 0.3])
    data = json.loads(js.read_text())
    scores = pl.concat(
        [
            pl.read_parquet(pool / d / "*.parquet").select("score_caption_language")
            for d in ("shards", "rejects")
        ]
    )["score_caption_language"].drop_nulls()
    assert data["rows_scored"] == scores.len()
    cuts = data["cuts"]
    assert [c["threshold"] for c in cuts] == sorted(c["threshold"] for c in cuts)
    for c in cuts:
        assert c["kept"] == (scores >= c["threshold"]).sum()
    by_ask = {c["asked"]: c for c in cuts}
    assert by_ask["keep 30%"]["kept"] >= math.ceil(0.3 * scores.len())
    assert by_ask["keep 80%"]["kept_fraction"] >= 0.8
    page = html.read_text()
    assert "just below: dropped" in page and page.count("<img") >= 6 and "keeps" in page
    assert main(["calibrate", str(pool), "--score", "score_nope"]) == 2


TWO_CUTS = """
name: two_cuts
sources:
  - {{name: pairs, format: webdataset, modality: image_text, paths: ["{corpus}/image_text/wds/*.tar"]}}
stages:
  - image_decode: {{}}
  - caption_language: {{keep_fraction: 0.6}}
  - caption_length: {{unit: words, min: 7}}
  - caption_language: {{instance: lang_again, keep_fraction: 0.5}}
output: {{path: "{out}", shard_rows: 150}}
"""


def test_stages_after_a_cut_see_only_the_rows_it_kept(ray_local, sample_corpus, tmp_path):
    path = tmp_path / "two.yaml"
    path.write_text(TWO_CUTS.format(corpus=sample_corpus, out=tmp_path / "pool"))
    result = run_pipeline(load_pipeline(path), progress=False)
    stats = {s["name"]: s for s in result.stats["stages"]}
    assert [s["name"] for s in result.stats["stages"]] == [
        "ingest",
        "image_decode",
        "caption_language",
        "caption_language (keep_fraction)",
        "caption_length",
        "lang_again",
        "lang_again (keep_fraction)",
    ]
    first = stats["caption_language (keep_fraction)"]
    assert first["rows_out"] == math.ceil(0.6 * first["scored"])
    # caption_length ran on the rows the first cut kept, not on every row
    assert stats["caption_length"]["rows_in"] == first["rows_out"]
    assert 0 < sum(stats["caption_length"]["drops"].values()) < first["rows_out"]
    second = stats["lang_again (keep_fraction)"]
    assert second["scored"] == stats["lang_again"]["rows_in"] == stats["caption_length"]["rows_out"]
    kept = pl.read_parquet(Path(result.pool) / "shards" / "*.parquet")
    rejects = pl.read_parquet(Path(result.pool) / "rejects" / "*.parquet")
    assert kept.height == math.ceil(0.5 * second["scored"]) == result.stats["rows_out"]
    assert kept["score_lang_again"].null_count() == 0
    rows = [(u, o) for t in (kept, rejects) for u, o in zip(t["source_uri"], t["source_offset"])]
    assert len(rows) == len(set(rows)) == result.stats["rows_in"]
    # rows cut by the first cut were never scored by the second stage
    first_cut = rejects.filter(pl.col("reject_stage") == "caption_language")
    assert first_cut.height == first["rows_in"] - first["rows_out"]
    assert first_cut["score_lang_again"].null_count() == first_cut.height
    # a rerun of the finished pool changes nothing
    again = run_pipeline(load_pipeline(path), progress=False)
    assert again.manifest == result.manifest
