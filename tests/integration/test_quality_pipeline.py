"""pipelines/quality.yaml, the shipped model-backed pool, end to end on the sample corpus: a tiny
random-weight CLIP from a local file, the judge and the captioner against a real OpenAI-compatible server
process (canned answers), and RapidOCR from its wheel. Mechanics, not quality: every row accounted for, the
global CLIP cut, the judge's and the captioner's columns, and the lineage in the manifest."""

from __future__ import annotations

import json
import math
from pathlib import Path

import polars as pl
import pytest

from curation.models.torch_compat import ensure_torchvision
from tests.helpers import ROOT

try:
    ensure_torchvision()
except ImportError:
    pytest.skip("needs the clip extra: pip install 'keye-curation[clip]'", allow_module_level=True)
pytest.importorskip("open_clip")
pytest.importorskip("rapidocr")

import torch  # after the fix above

from curation.models.clip import import_open_clip, save_clip
from curation.pipeline import run_pipeline
from curation.recipe import load_pipeline
from curation.sample import write_sample_corpus
from curation.stage import NotReady
from tests.helpers.clip import TINY_CLIP
from tests.helpers.servers.openai_server import canned_server


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path]:
    """The sample corpus and a tiny random-weight CLIP saved as a local file."""
    tmp = tmp_path_factory.mktemp("quality")
    torch.manual_seed(0)
    clip = save_clip(
        import_open_clip().CLIP(**TINY_CLIP).eval(), TINY_CLIP, tmp / "tiny.pt", name="tiny-test"
    )
    write_sample_corpus(tmp / "corpus", rows=240, seed=5, progress=False)
    return tmp / "corpus", clip


def _recipe(inputs, out: Path, url: str, *extra: str, clip: str | None = None):
    corpus, tiny = inputs
    return load_pipeline(
        ROOT / "pipelines" / "quality.yaml",
        [
            f"vars.corpus={corpus}",
            f"vars.out={out}",
            f"vars.clip={clip or tiny}",
            f"vars.vlm_url={url}",
            "vars.vlm_model=canned",
            *extra,
        ],
    )


def _stage_index(recipe, name: str) -> int:
    return [s.name for s in recipe.stages].index(name)


def test_quality_pipeline_end_to_end(inputs, tmp_path, ray_local):
    with canned_server() as url:
        caption = _stage_index(_recipe(inputs, tmp_path / "pool", url), "dense_caption")
        # The canned server answers every chat with the judge's JSON (6 words): accept it as a caption.
        recipe = _recipe(inputs, tmp_path / "pool", url, f"stages.{caption}.dense_caption.min_words=3")
        result = run_pipeline(recipe, progress=False)
    stats = {s["name"]: s for s in result.stats["stages"]}
    assert stats["clip_score"]["rows_in"] > 20
    near = stats["video_near_dedup (pool-wide)"]  # a first pool-wide cut; clip_score runs on what it keeps
    assert stats["clip_score"]["rows_in"] == near["rows_out"] and near["videos"] > 0
    cut = stats["clip_score (keep_fraction)"]
    scored = stats["clip_score"]["rows_out"]
    assert cut["rows_in"] == scored and cut["rows_out"] == math.ceil(0.3 * scored)
    assert stats["vlm_judge"]["rows_in"] == cut["rows_out"] and stats["vlm_judge"]["drops"] == {}

    kept = pl.read_parquet(tmp_path / "pool" / "shards" / "*.parquet")
    rejects = pl.read_parquet(tmp_path / "pool" / "rejects" / "*.parquet")
    assert kept.height == stats["dense_caption"]["rows_out"] and kept.height > 0
    assert set(kept["modality"]) <= {"image_text", "interleaved", "video"}
    # Every kept row scored by both model stages, with the judge's reason
    assert kept["score_clip_score"].null_count() == 0 and (kept["score_vlm_judge"] == 4).all()
    assert kept["vlm_judge_reason"].str.starts_with("saw ").all()
    pairs = kept.filter(pl.col("modality") == "image_text")
    assert pairs["dense_caption"].str.contains('"score": 4').all() and pairs["ocr_status"].null_count() == 0
    # Rows below the global cut are in the rejects with the reason; none was lost or written twice.
    assert (rejects["reject_reason"] == "below_keep_fraction").sum() == scored - cut["rows_out"]
    ids = pl.concat(
        [kept.select("source_uri", "source_offset"), rejects.select("source_uri", "source_offset")]
    )
    assert not ids.is_duplicated().any()
    manifest = json.loads((tmp_path / "pool" / "manifest.json").read_text())
    assert manifest["stages"]["clip_score"]["model"].startswith("tiny-test:")
    assert (
        manifest["stages"]["vlm_judge"]["model"] == "canned"
        and manifest["stages"]["vlm_judge"]["prompt_sha256"]
    )
    assert manifest["stages"]["dense_caption"]["prompt_sha256"]


def test_quality_pipeline_stops_before_reading_when_the_endpoint_is_down(inputs, tmp_path, ray_local):
    down = "http://127.0.0.1:9/v1"
    with pytest.raises(NotReady, match=r"vlm_judge.*127\.0\.0\.1:9"):
        run_pipeline(_recipe(inputs, tmp_path / "pool", down), progress=False)
    assert not (tmp_path / "pool").exists()
    # ... and without the CLIP weights, it names the spec.
    with pytest.raises(NotReady, match="ViT-B-32:datacomp_xl_s13b_b90k"):
        run_pipeline(
            _recipe(inputs, tmp_path / "pool", down, clip="ViT-B-32:datacomp_xl_s13b_b90k"), progress=False
        )


def test_a_corpus_index_after_a_global_cut_is_a_recipe_error(inputs, tmp_path):
    from curation.spec import RecipeError

    recipe = _recipe(inputs, tmp_path / "pool", "http://127.0.0.1:9/v1")
    dedup, clip = _stage_index(recipe, "exact_dedup"), _stage_index(recipe, "clip_score")
    with pytest.raises(
        RecipeError, match="'exact_dedup' indexes the whole corpus.*must come before 'clip_score'"
    ):
        _recipe(
            inputs,
            tmp_path / "pool",
            "http://127.0.0.1:9/v1",
            f"stages.{dedup}={{clip_score: {{model: x, keep_fraction: 0.5}}}}",
            f"stages.{clip}={{exact_dedup: {{}}}}",
        )
