"""Recipe loading: overrides, interpolation, strict validation with messages that name file and key."""

from __future__ import annotations

import pytest

from curation.cli import main
from curation.recipe import load_pipeline, recipe_hash
from curation.spec import RecipeError

BASE = """
name: t
vars: {{corpus: {corpus}, out: {out}}}
sources:
  - {{name: wds, format: webdataset, modality: image_text, paths: ["${{corpus}}/wds/*.tar"]}}
stages:
{stages}
output: {{path: "${{out}}"}}
"""


def _write(tmp_path, corpus, stages="  - image_decode: {}", **fmt):
    path = tmp_path / "r.yaml"
    path.write_text(BASE.format(corpus=corpus, out=tmp_path / "pool", stages=stages, **fmt))
    return path


def _problems(path, overrides=()):
    with pytest.raises(RecipeError) as info:
        load_pipeline(path, list(overrides))
    assert str(path) in str(info.value)
    return info.value.problems


def test_valid_recipe_loads_with_defaults(tmp_path, tiny_corpus):
    r = load_pipeline(
        _write(
            tmp_path,
            tiny_corpus,
            "  - image_decode: {}\n  - image_size: {min_side: 64}\n  - caption_language: {}",
        )
    )
    assert [s.label for s in r.stages] == ["image_decode", "image_size", "caption_language"]
    assert r.stages[1].min_side == 64 and r.stages[2].languages == ["en"]
    assert r.output.formats == ["parquet", "webdataset"]
    assert r.sources[0].paths == [f"{tiny_corpus}/wds/*.tar"]


def test_unknown_stage_names_the_known_ones(tmp_path, tiny_corpus):
    (p,) = _problems(_write(tmp_path, tiny_corpus, "  - image_dekode: {}"))
    assert p.startswith("stages.0: unknown stage 'image_dekode'") and "image_decode" in p


def test_unknown_key_and_wrong_type_are_all_reported(tmp_path, tiny_corpus):
    path = _write(tmp_path, tiny_corpus, "  - image_size: {min_sid: 3}\n  - aspect_ratio: {max_ratio: wide}")
    problems = _problems(path)
    assert any(p.startswith("stages.0.image_size.min_sid: unknown key") and "min_side" in p for p in problems)
    assert any(
        p.startswith("stages.1.aspect_ratio.max_ratio: expected a number, got a string 'wide'")
        for p in problems
    )


def test_missing_source_path_and_unknown_variable(tmp_path, tiny_corpus):
    (p,) = _problems(_write(tmp_path, tmp_path / "nowhere"))
    assert p.startswith("sources.0.paths.0: no file matches") and "nowhere" in p
    path = tmp_path / "v.yaml"
    path.write_text(BASE.format(corpus='"${elsewhere}"', out=tmp_path / "o", stages="  - image_decode: {}"))
    assert any("unknown variable ${elsewhere}" in p for p in _problems(path))


def test_top_level_typos_bad_format_and_duplicate_instances(tmp_path, tiny_corpus):
    path = _write(tmp_path, tiny_corpus, "  - caption_length: {}\n  - caption_length: {min: 5}")
    path.write_text(path.read_text().replace("format: webdataset", "format: tfrecord") + "outptu: {}\n")
    problems = _problems(path)
    assert any(p.startswith("outptu: unknown key") for p in problems)
    assert any(p.startswith("sources.0.format: 'tfrecord' is not a format") for p in problems)
    assert any("add instance: <name>" in p for p in problems)


def test_video_options_are_checked(tmp_path, tiny_corpus):
    path = _write(tmp_path, tiny_corpus)
    text = path.read_text().replace(
        "modality: image_text,",
        "modality: video, video: {fps: 0, factor: 2.5, min_pixels: 9000, max_pixels: 800,"
        " shots: yes please, clip_preset: turbo, max_sides: 3},",
    )
    path.write_text(text)
    problems = _problems(path)
    want = [
        "sources.0.video.fps: expected a positive number, got 0",
        "sources.0.video.factor: expected a whole number, got 2.5",
        "sources.0.video: min_pixels (9000) is above max_pixels (800)",
        "sources.0.video.shots: expected true or false, got 'yes please'",
        "sources.0.video.clip_preset: expected one of ultrafast",
        "sources.0.video.max_sides: unknown key (expected one of fps, max_frames, max_side",
    ]
    for w in want:
        assert any(p.startswith(w) for p in problems), (w, problems)


def test_overrides_and_hash(tmp_path, tiny_corpus):
    path = _write(tmp_path, tiny_corpus, "  - image_decode: {}\n  - image_size: {min_side: 32}")
    base = load_pipeline(path)
    r = load_pipeline(
        path,
        ["stages.1.image_size.min_side=128", "output.formats=[parquet]", f"vars.out={tmp_path / 'other'}"],
    )
    assert r.stages[1].min_side == 128 and r.output.formats == ["parquet"]
    assert r.output.path == str(tmp_path / "other")
    assert r.hash != base.hash
    # the output folder and execution settings do not change the hash: same content, any folder
    moved = load_pipeline(path, [f"vars.out={tmp_path / 'x'}", "execution.batch_rows=64"])
    assert moved.hash == base.hash == recipe_hash(base.resolved)
    assert any("--set nothing" in p for p in _problems(path, ["nothing"]))


def test_yaml_is_loaded_safely(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("name: !!python/object/apply:os.system ['echo pwned']\n")
    (p,) = _problems(path)
    assert "not valid YAML" in p


def test_cli_exits_2_and_writes_nothing(tmp_path, tiny_corpus, capsys):
    path = _write(tmp_path, tiny_corpus, "  - image_size: {min_side: small}")
    assert main(["run", str(path), "-q"]) == 2
    err = capsys.readouterr().err
    assert "stages.0.image_size.min_side: expected an integer, got a string 'small'" in err
    assert not (tmp_path / "pool").exists()


def test_gpu_stage_on_a_cluster_without_gpus_fails_before_writing(ray_local, tmp_path, tiny_corpus):
    from curation.pipeline import run_pipeline
    from curation.stage import NotReady

    recipe = load_pipeline(_write(tmp_path, tiny_corpus, "  - image_decode: {resources: {num_gpus: 1}}"))
    with pytest.raises(
        NotReady,
        match=r"stage 'image_decode' asks for 1 GPU\(s\) per worker but the Ray "
        r"cluster has 0",
    ):
        run_pipeline(recipe, progress=False)
    assert not (tmp_path / "pool").exists()
    (p,) = _problems(_write(tmp_path, tiny_corpus, "  - image_decode: {resources: {concurrency: 0}}"))
    assert p.startswith("stages.0.image_decode.resources.concurrency: expected a positive integer")
    ok = load_pipeline(
        _write(tmp_path, tiny_corpus, "  - image_decode: {resources: {num_cpus: 2, concurrency: 1}}")
    )
    assert ok.stages[0].resources.num_cpus == 2.0 and ok.stages[0].resources.concurrency == 1


def test_a_stage_reading_what_nothing_fills_is_a_recipe_error(tmp_path, tiny_corpus, caplog):
    # image_size alone would see null sizes and keep every row: the recipe says which stage to add
    problems = _problems(_write(tmp_path, tiny_corpus, "  - image_size: {min_side: 32}"))
    assert problems == [
        (
            "stages.0 (image_size): reads width, height, which no source fills and no stage before it writes "
            "(add image_decode before it)"
        )
    ]
    problems = _problems(_write(tmp_path, tiny_corpus, "  - ocr: {}\n  - text_rich: {ocr: ocr2}"))
    assert any("stages.1 (text_rich): reads score_ocr2, ocr2_confidence, ocr2_status" in p for p in problems)
    # a pool written by an earlier pipeline may carry the columns: a warning, not an error
    pool = tmp_path / "pool.yaml"
    pool.write_text(
        f"sources: [{{name: p, format: pool, modality: mixed, paths: ['{tiny_corpus}/wds/*.tar']}}]\n"
        f"stages: [{{image_size: {{min_side: 32}}}}]\noutput: {{path: {tmp_path / 'o'}}}\n"
    )
    load_pipeline(pool, check_paths=False)
    assert "reads width, height" in caplog.text and "must come from the pool source" in caplog.text
