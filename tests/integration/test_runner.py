"""End-to-end runs of small pipelines on the session's local Ray."""

from __future__ import annotations

import json
from itertools import pairwise

import polars as pl
import pyarrow.parquet as pq

from curation.pipeline import run_pipeline
from curation.recipe import load_pipeline


def _reasons(pool) -> dict[str, str]:
    """key (from meta) -> reject_reason, over all rejects."""
    out = {}
    for f in sorted((pool / "rejects").glob("*.parquet")):
        for r in pq.read_table(f).to_pylist():
            meta = json.loads(r["meta"]) if r["meta"] else {}
            out[meta.get("__key__") or f"{r['source']}#{r['source_offset']}"] = r["reject_reason"]
    return out


def test_tiny_pipeline_rejects_every_defect_with_its_reason(ray_local, tiny_recipe, tmp_path):
    recipe = load_pipeline(tiny_recipe)
    result = run_pipeline(recipe, progress=False)
    pool = tmp_path / "pool"
    reasons = _reasons(pool)
    assert reasons == {
        "002": "duplicate",
        "003": "undecodable",
        "004": "undecodable",
        "005": "side_below_min",
        "006": "aspect_ratio_above_max",
        "007": "language_not_allowed",
        "008": "text_not_utf8",
        "009": "repeated_phrase",
        "010": "too_short",
        "011": "boilerplate",
        "012": "missing_image",
        "pairs#1": "malformed_row",
        "pairs#2": "missing_image_file",
        "docs#1": "too_short",
    }
    kept = pl.read_parquet(pool / "shards" / "*.parquet")
    assert sorted(kept["source"].to_list()) == ["docs", "pairs", "wds", "wds"]
    assert kept["id"].n_unique() == kept.height
    assert result.stats["rows_in"] == 18 and result.stats["rows_out"] == 4
    by_stage = {s["name"]: s for s in result.stats["stages"]}
    assert by_stage["ingest"]["drops"] == {"text_not_utf8": 1, "malformed_row": 1, "missing_image_file": 1}
    assert by_stage["image_decode"]["drops"] == {"undecodable": 2, "missing_image": 1}
    assert by_stage["exact_dedup"]["drops"] == {"duplicate": 1}
    # each stage's rows_out is the next stage's rows_in
    stages = result.stats["stages"]
    assert all(a["rows_out"] == b["rows_in"] for a, b in pairwise(stages))
    # the persisted scores are there for kept rows
    assert kept.filter(pl.col("modality") == "image_text")["score_caption_language"].min() > 0.3
    manifest = json.loads((pool / "manifest.json").read_text())
    assert manifest["totals"]["rows"] == 4 and manifest["recipe_hash"] == recipe.hash
    assert (pool / "report.html").exists()


def test_pool_is_readable_by_webdataset_ray_and_polars(ray_local, tiny_recipe, tmp_path):
    import webdataset as wds

    run_pipeline(load_pipeline(tiny_recipe), progress=False)
    pool = tmp_path / "pool"
    manifest = json.loads((pool / "manifest.json").read_text())
    tars = [str(pool / s["tar"]["path"]) for s in manifest["shards"]]
    parquet_ids = sorted(pl.read_parquet(pool / "shards" / "*.parquet")["id"].to_list())

    samples = list(wds.WebDataset(tars, shardshuffle=False))
    assert sorted(s["__key__"] for s in samples) == parquet_ids
    for s in samples:
        meta = json.loads(s["json"])
        assert meta["id"] == s["__key__"] and ("txt" in s) == (meta.get("text") is not None)
        if meta["modality"] == "image_text":
            assert "jpg" in s and s["txt"].decode() == meta["text"]

    ray_rows = ray_local.data.read_webdataset(tars, decoder=None).take_all()
    assert sorted(r["__key__"] for r in ray_rows) == parquet_ids
    # sha256 and sizes in the manifest are the files' own
    import hashlib

    for s in manifest["shards"]:
        for k in ("parquet", "tar"):
            data = (pool / s[k]["path"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == s[k]["sha256"] and len(data) == s[k]["bytes"]
