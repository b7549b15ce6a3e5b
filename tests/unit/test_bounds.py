"""Recipe numbers out of range (huge, negative, zero where meaningless, .inf, .nan) are recipe errors that
name the key: the rule for every number and the ranges fields declare (curation.bounds)."""

from __future__ import annotations

import pytest

from curation.cli import main
from curation.recipe import load_pipeline
from curation.spec import RecipeError


def problems(path, overrides) -> list[str]:
    with pytest.raises(RecipeError) as e:
        load_pipeline(path, overrides)
    return e.value.problems


@pytest.mark.parametrize(
    "override, expected",
    [
        (
            "output.shard_rows=99999999999999999999999",
            (
                "output.shard_rows: expected an integer of at most 64 bits, "
                "got an integer 99999999999999999999999"
            ),
        ),
        (
            "output.shard_rows=0",
            "output.shard_rows: expected a positive integer between 1 and 10,000,000, got 0",
        ),
        (
            "output.shard_bytes=-1",
            "output.shard_bytes: expected an integer between 1,048,576 and 68,719,476,736, got -1",
        ),
        ("execution.batch_rows=.inf", "execution.batch_rows: expected a finite number, got a number inf"),
        ("execution.num_workers=.nan", "execution.num_workers: expected a finite number, got a number nan"),
        ("execution.unit_rows=0", "execution.unit_rows: expected a positive integer between 1 and"),
        (
            "stages.4.caption_repetition.max_ratio=1.5",
            "stages.4.caption_repetition.max_ratio: expected a number between 0 and 1, got 1.5",
        ),
        (
            "stages.6.caption_language.min_score=-0.1",
            "stages.6.caption_language.min_score: expected a number between",
        ),
        (
            "stages.1.image_size.min_side=-5",
            "stages.1.image_size.min_side: expected an integer between 0 and",
        ),
        (
            "stages.0.image_decode.resources.num_cpus=0",
            "stages.0.image_decode.resources.num_cpus: expected a number between 0.01 and 1,024, got 0",
        ),
        (
            "stages.0.image_decode.resources.concurrency=1000000000",
            "stages.0.image_decode.resources.concurrency: expected a positive integer between 1 and 10,000",
        ),
    ],
)
def test_out_of_range_numbers_name_the_key(tiny_recipe, override, expected):
    found = problems(tiny_recipe, [override])
    assert any(p.startswith(expected) for p in found), found


@pytest.mark.parametrize(
    "video, expected",
    [
        (
            "{max_frames: 1.0e+12}",
            "sources.0.video.max_frames: expected a number between 0 and 10,000, got 1000000000000.0",
        ),
        ("{fps: 1.0e+9}", "sources.0.video.fps: expected a number between 0 and 240"),
        ("{timeout_s: 1.0e+308}", "sources.0.video.timeout_s: expected a number between 0 and 86,400"),
        ("{timeout_s: .inf}", "sources.0.video: expected 64-bit integers and finite numbers, got a mapping"),
    ],
)
def test_video_options_have_upper_bounds(tiny_recipe, video, expected):
    text = tiny_recipe.read_text().replace("modality: image_text,", f"modality: video, video: {video},", 1)
    tiny_recipe.write_text(text)
    found = problems(tiny_recipe, [])
    assert any(p.startswith(expected) for p in found), found


def test_the_cli_exits_2_without_a_traceback(tiny_recipe, tmp_path, capsys):
    assert (
        main(
            [
                "run",
                str(tiny_recipe),
                "-q",
                "--set",
                "output.shard_rows=99999999999999999999999",
                "--set",
                "output.shard_bytes=-1",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "output.shard_rows: expected an integer of at most 64 bits" in err and "output.shard_bytes:" in err
    assert "Traceback" not in err and not (tmp_path / "pool").exists()


def test_mixture_budgets_and_weights_are_bounded(tmp_path):
    from curation.mix.recipe import load_mix_recipe

    pool = tmp_path / "pool"
    pool.mkdir()
    path = tmp_path / "mix.yaml"
    path.write_text(
        f"pools: {{p: {pool}}}\ntokenizer: tok.json\noutput: {{path: {tmp_path / 'out'}}}\n"
        "mixtures: {m: {budget: 1000, sources: {a: {pool: p, weight: 1.0}}}}\n"
    )
    for override, expected in [
        ("mixtures.m.budget=-5", "mixtures.m.budget: expected a positive number"),
        ("mixtures.m.budget=9999999999999999999", "mixtures.m.budget: expected a positive"),
        (
            "mixtures.m.sources.a.weight=2.0",
            "mixtures.m.sources.a.weight: expected a number between 0 and 1, got 2.0",
        ),
        ("mixtures.m.sources.a.max_epochs=.nan", "mixtures.m.sources.a.max_epochs: expected a finite number"),
        ("output.shard_rows=0", "output.shard_rows: expected a positive integer"),
    ]:
        with pytest.raises(RecipeError) as e:
            load_mix_recipe(path, [override])
        assert any(p.startswith(expected) for p in e.value.problems), (override, e.value.problems)


@pytest.mark.parametrize(
    "override, expected",
    [
        ("optim.lr=-0.001", "config.optim.lr: expected a number between 1e-12 and 10, got -0.001"),
        ("steps=0", "config.steps: expected a positive integer between 1 and 10,000,000, got 0"),
        (
            "data.batch_size=99999999999999999999",
            "config.data.batch_size: expected an integer of at most 64 bits",
        ),
        ("optim.beta2=.nan", "config.optim.beta2: expected a finite number"),
    ],
)
def test_train_config_numbers_are_bounded(override, expected):
    from curation.train.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=expected.replace(".", r"\.")):
        load_config(None, [override, "mixture=/nowhere"])
