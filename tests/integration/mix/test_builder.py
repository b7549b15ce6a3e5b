"""curation mix: recipes, exact budgets, deterministic bytes, upsampling ledger, resume, outputs."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from curation.mix.builder import _apportion, build_mixtures, take_to_target
from curation.mix.recipe import load_mix_recipe, mix_recipe_from_dict, parse_amount
from curation.mix.tokens import Tokenizer, row_tokens
from curation.schema import row_id
from curation.spec import RecipeError
from tests.helpers import ROOT
from tests.helpers.mix import make_pool, packaged_tokenizer_json, text_row


def _jpeg(w: int, h: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=60)
    return buf.getvalue()


def image_row(i: int, side: int) -> dict:
    blob = _jpeg(side, side, i)
    caption = "a small red cat"
    return {
        "id": row_id("image_text", caption, [blob]),
        "source": "pairs",
        "modality": "image_text",
        "text": caption,
        "image": blob,
        "width": side,
        "height": side,
    }


def sft_row(i: int, mode: str) -> dict:
    messages = json.dumps(
        [
            {"role": "user", "content": f"question {i} /think"},
            {"role": "assistant", "content": f"<think>because {i}</think>\n\nanswer {i}"},
        ]
    )
    return {
        "id": row_id("sft", messages),
        "source": "cold",
        "modality": "sft",
        "messages": messages,
        "mode": mode,
    }


@pytest.fixture(scope="module")
def tokenizer_path() -> str:
    return str(packaged_tokenizer_json())


@pytest.fixture(scope="module")
def pools(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("pools")
    rng = np.random.default_rng(0)
    docs = [text_row(i, int(rng.integers(5, 60)), quality=float(rng.random())) for i in range(150)]
    pairs = [image_row(i, int(rng.choice([56, 112, 168, 224]))) for i in range(60)]
    modes = (
        ["non_thinking"] * 33
        + ["thinking"] * 23
        + ["auto_think"] * 4
        + ["think_with_image"] * 10
        + ["video"] * 5
    )
    cold = [sft_row(i, m) for i, m in enumerate(modes)]
    return {
        "docs": make_pool(base / "docs", docs),
        "pairs": make_pool(base / "pairs", pairs, shard_rows=25),
        "cold": make_pool(base / "cold", cold),
    }


def recipe(pools: dict[str, Path], out: Path, tokenizer: str, mixtures: dict, **top) -> dict:
    return {
        "name": "t",
        "pools": {k: str(v) for k, v in pools.items()},
        "tokenizer": tokenizer,
        "seed": 7,
        "output": {"path": str(out), "formats": ["parquet", "webdataset"], "shard_rows": 50},
        "mixtures": mixtures,
        **top,
    }


def build(raw: dict, **kw):
    return build_mixtures(mix_recipe_from_dict(raw), progress=False, **kw)


def shard_hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((folder / "shards").iterdir())}


# ---------------------------------------------------------------- recipe validation


def test_amounts():
    assert parse_amount("2M") == 2_000_000 and parse_amount("1.5B") == 1_500_000_000
    assert parse_amount("330k") == 330_000 and parse_amount(1200) == 1200 and parse_amount("12_000") == 12000
    assert parse_amount("lots") is None and parse_amount(True) is None


@pytest.mark.parametrize(
    "mixtures,expected",
    [
        (
            {
                "m": {
                    "budget": 100,
                    "sources": {"a": {"pool": "docs", "weight": 0.5}, "b": {"pool": "docs", "weight": 0.4}},
                }
            },
            "mixtures.m.sources: weights sum to 0.9",
        ),
        (
            {"m": {"budget": 100, "sources": {"a": {"pool": "nope", "weight": 1.0}}}},
            "mixtures.m.sources.a.pool: unknown pool 'nope'",
        ),
        (
            {"m": {"budget": 100, "sources": {"a": {"pool": "docs", "mode": "dreaming", "weight": 1.0}}}},
            "mixtures.m.sources.a.mode: unknown mode 'dreaming'",
        ),
        (
            {"m": {"budget": 100, "sources": {"a": {"pool": "docs", "modality": "smell", "weight": 1.0}}}},
            "mixtures.m.sources.a.modality: unknown modality 'smell'",
        ),
        (
            {"m": {"budget": "lots", "sources": {"a": {"pool": "docs", "weight": 1.0}}}},
            "mixtures.m.budget: expected",
        ),
        (
            {"m": {"budget": 100, "sources": {"a": {"pool": "docs", "weight": 1.0, "budget": 5}}}},
            "mixtures.m.sources.a: give exactly one of weight",
        ),
        (
            {
                "m": {
                    "budget": 100,
                    "sources": {"a": {"pool": "docs", "weight": 1.0, "where": "modality = = 'x'"}},
                }
            },
            "mixtures.m.sources.a.where: not a valid SQL predicate",
        ),
        (
            {"m": {"budget": 100, "sources": {"a": {"pool": "docs", "weight": 1.0, "colour": 1}}}},
            "mixtures.m.sources.a.colour: unknown key",
        ),
        (
            {
                "m": {
                    "budget": 10,
                    "sources": {"a": {"pool": "docs", "budget": 20}, "b": {"pool": "docs", "weight": 1.0}},
                }
            },
            "mixtures.m.budget: 10 tokens is less than the sources' own budgets",
        ),
        (
            {"m": {"unit": "bytes", "sources": {"a": {"pool": "docs", "weight": 1.0}}}},
            "mixtures.m.unit: 'bytes'",
        ),
    ],
)
def test_bad_recipes_name_the_key(pools, tmp_path, tokenizer_path, mixtures, expected):
    with pytest.raises(RecipeError) as e:
        mix_recipe_from_dict(recipe(pools, tmp_path / "out", tokenizer_path, mixtures))
    assert expected in str(e.value)
    assert not (tmp_path / "out").exists()


def test_every_problem_is_reported_at_once(pools, tmp_path, tokenizer_path):
    raw = recipe(
        pools,
        tmp_path / "out",
        tokenizer_path,
        {
            "a": {"budget": 100, "sources": {"x": {"pool": "nope", "weight": 1.0}}},
            "b": {"budget": 100, "sources": {"y": {"pool": "docs", "mode": "bad", "weight": 1.0}}},
        },
        extra_key=1,
    )
    with pytest.raises(RecipeError) as e:
        mix_recipe_from_dict(raw)
    assert len(e.value.problems) == 3


def test_budget_larger_than_the_pool_fails_before_writing(ray_local, pools, tmp_path, tokenizer_path):
    raw = recipe(
        pools,
        tmp_path / "out",
        tokenizer_path,
        {"m": {"budget": "1M", "sources": {"docs": {"pool": "docs", "weight": 1.0}}}},
    )
    with pytest.raises(RecipeError) as e:
        build(raw)
    msg = str(e.value)
    assert "mixtures.m.sources.docs: needs 1,000,000 tokens but pool 'docs' gives" in msg
    assert "set upsample: true" in msg
    assert not (tmp_path / "out").exists()


def test_unknown_column_in_where_and_prefer_fails_before_writing(ray_local, pools, tmp_path, tokenizer_path):
    raw = recipe(
        pools,
        tmp_path / "out",
        tokenizer_path,
        {
            "m": {
                "budget": 100,
                "sources": {
                    "a": {"pool": "docs", "where": "score_clip > 0.3", "weight": 0.5},
                    "b": {"pool": "docs", "prefer": "text", "weight": 0.5},
                },
            }
        },
    )
    with pytest.raises(RecipeError) as e:
        build(raw)
    assert "mixtures.m.sources.a.where: column 'score_clip' is not in pool 'docs'" in str(e.value)
    assert "mixtures.m.sources.b.prefer: column 'text' is large_string" in str(
        e.value
    ) or "mixtures.m.sources.b.prefer: column 'text' is string, not a number" in str(e.value)
    assert not (tmp_path / "out").exists()


def test_missing_pool_folder_names_the_pool(ray_local, pools, tmp_path, tokenizer_path):
    raw = recipe(
        {**pools, "docs": tmp_path / "gone"},
        tmp_path / "out",
        tokenizer_path,
        {"m": {"budget": 100, "sources": {"a": {"pool": "docs", "weight": 1.0}}}},
    )
    with pytest.raises(RecipeError, match=r"pools.docs: no pool at .*gone \(no manifest.json"):
        build(raw)


def test_shipped_recipes_are_valid():
    files = sorted((ROOT / "mixtures").glob("*.yaml"))
    names = {f.stem for f in files}
    assert {"stage0_vision", "stage1_alignment", "stage2_multitask", "stage3_anneal", "coldstart"} <= names
    for f in files:
        r = load_mix_recipe(f)
        assert r.mixtures
    anneal = load_mix_recipe(ROOT / "mixtures/stage3_anneal.yaml")
    assert len(anneal.mixtures) >= 3  # the annealing variants merged afterwards


# ---------------------------------------------------------------- sampling


def test_take_to_target_is_exact_when_rows_allow_and_never_overshoots():
    rng = np.random.default_rng(1)
    for _ in range(200):
        cost = rng.integers(1, 500, 300)
        order = rng.permutation(300)
        target = int(rng.integers(1, cost.sum()))
        picked, got = take_to_target(cost, order, target)
        assert got == int(cost[picked].sum()) <= target
        assert len(set(picked.tolist())) == len(picked)
        left = np.setdiff1d(order, picked)
        assert target - got < (cost[left].min() if len(left) else 1)  # nothing left would still fit


def test_apportion_adds_up():
    assert sum(_apportion(1000, [0.333, 0.333, 0.334])) == 1000
    assert _apportion(10, [0.5, 0.5]) == [5, 5]


def test_token_budgets_are_met_within_one_row_and_counts_are_real(ray_local, pools, tmp_path, tokenizer_path):
    raw = recipe(
        pools,
        tmp_path / "out",
        tokenizer_path,
        {
            "m": {
                "budget": 3000,
                "sources": {
                    "docs": {"pool": "docs", "weight": 0.6},
                    "pairs": {"pool": "pairs", "weight": 0.4},
                },
            }
        },
    )
    (res,) = build(raw)
    m = res.manifest
    assert m["sources"]["docs"]["target"] == 1800 and m["sources"]["pairs"]["target"] == 1200
    out = pl.read_parquet(Path(res.path) / "shards" / "*.parquet")
    for name, src in m["sources"].items():
        rows = out.filter(pl.col("mix_source") == name)
        assert rows["tokens"].sum() == src["tokens"] == src["selected"]
        smallest_row = rows["tokens"].min()
        assert 0 <= src["target"] - src["selected"] < smallest_row
    # text tokens are the words written (each a single WordPiece token), visual tokens the 28-px grid
    docs = out.filter(pl.col("modality") == "text")
    assert (docs["text_tokens"] == docs["text"].str.split(" ").list.len()).all()
    pairs = out.filter(pl.col("modality") == "image_text")
    assert (pairs["visual_tokens"] == (pairs["width"] // 28) * (pairs["height"] // 28)).all()
    # the manifest agrees with the shards and with an independent recount of the written rows
    recount = row_tokens(
        pq.read_table(Path(res.path) / "shards" / "00000.parquet"), Tokenizer.load(tokenizer_path)
    )
    first = out.slice(0, 50)
    assert recount["total"].tolist() == first["tokens"].to_list()
    assert sum(s["tokens"]["total"] for s in m["shards"]) == m["totals"]["tokens"] == out["tokens"].sum()
    assert m["totals"]["rows"] == out.height == sum(s["rows"] for s in m["shards"])
    assert (
        m["modalities"]["text"]["tokens"] + m["modalities"]["image_text"]["tokens"] == m["totals"]["tokens"]
    )


def test_same_recipe_and_seed_give_the_same_bytes_whatever_the_workers(
    ray_local, pools, tmp_path, tokenizer_path
):
    mixtures = {
        "m": {
            "budget": 2500,
            "sources": {"docs": {"pool": "docs", "weight": 0.5}, "pairs": {"pool": "pairs", "weight": 0.5}},
        }
    }
    (a,) = build(recipe(pools, tmp_path / "a", tokenizer_path, mixtures))
    (b,) = build(recipe(pools, tmp_path / "b", tokenizer_path, mixtures, execution={"num_workers": 1}))
    assert shard_hashes(Path(a.path)) == shard_hashes(Path(b.path))
    assert len(shard_hashes(Path(a.path))) >= 2
    (c,) = build(recipe(pools, tmp_path / "c", tokenizer_path, mixtures) | {"seed": 8})
    ids = lambda r: set(pl.read_parquet(Path(r.path) / "shards" / "*.parquet")["id"])
    assert ids(a) != ids(c)


def test_upsampling_only_when_allowed_with_an_epoch_ledger(ray_local, pools, tmp_path, tokenizer_path):
    base = {"budget": 12000, "sources": {"docs": {"pool": "docs", "weight": 1.0}}}
    with pytest.raises(RecipeError, match="set upsample: true"):
        build(recipe(pools, tmp_path / "x", tokenizer_path, {"m": base}))
    base["sources"]["docs"].update(upsample=True, max_epochs=1.5)
    with pytest.raises(RecipeError, match="more than max_epochs 1.5"):
        build(recipe(pools, tmp_path / "x", tokenizer_path, {"m": base}))
    base["sources"]["docs"]["max_epochs"] = 4
    (res,) = build(recipe(pools, tmp_path / "ok", tokenizer_path, {"m": base}))
    src = res.manifest["sources"]["docs"]
    available = src["available"]["tokens"]
    assert available < 12000 and src["epochs"] > 1
    ledger = src["ledger"]
    assert [e["complete"] for e in ledger[:-1]] == [True] * (len(ledger) - 1) and not ledger[-1]["complete"]
    assert all(e["tokens"] == available for e in ledger[:-1])
    assert sum(e["tokens"] for e in ledger) == src["selected"] and 0 <= 12000 - src["selected"] < 60
    out = pl.read_parquet(Path(res.path) / "shards" / "*.parquet")
    assert out["key"].n_unique() == out.height  # repeats get their own keys: id_1, id_2, ...
    assert out["id"].n_unique() == src["available"]["rows"]
    assert src["repeated_rows"] == out.height - out["id"].n_unique()
    import webdataset as wds

    keys = [
        s["__key__"]
        for tar in sorted((Path(res.path) / "shards").glob("*.tar"))
        for s in wds.WebDataset(str(tar), shardshuffle=False)
    ]
    assert sorted(keys) == sorted(out["key"].to_list())


def test_prefer_takes_the_best_rows_first(ray_local, pools, tmp_path, tokenizer_path):
    raw = recipe(
        pools,
        tmp_path / "out",
        tokenizer_path,
        {
            "m": {
                "budget": 1000,
                "sources": {"best": {"pool": "docs", "prefer": "score_quality", "weight": 1.0}},
            }
        },
    )
    (res,) = build(raw)
    out = pl.read_parquet(Path(res.path) / "shards" / "*.parquet")
    allq = pl.read_parquet(pools["docs"] / "shards" / "*.parquet")["score_quality"].sort(descending=True)
    k = out.height
    # the prefix of the best rows, plus the small rows that filled the remainder
    assert out["score_quality"].sort(descending=True)[: k - 3].to_list() == allq[: k - 3].to_list()


def test_rows_unit_scales_mode_budgets_to_the_pools(ray_local, pools, tmp_path, tokenizer_path):
    """The cold-start recipe's shape: the report's counts per mode, scaled to what the pools hold."""
    raw = recipe(
        pools,
        tmp_path / "out",
        tokenizer_path,
        {
            "coldstart": {
                "unit": "rows",
                "budget": "auto",
                "sources": {
                    "non_thinking": {"pool": "cold", "mode": "non_thinking", "budget": "330k"},
                    "thinking": {"pool": "cold", "mode": "thinking", "budget": "230k"},
                    "auto_think": {"pool": "cold", "mode": "auto_think", "budget": "20k"},
                    "think_with_image": {"pool": "cold", "mode": "think_with_image", "budget": "100k"},
                },
            }
        },
    )
    (res,) = build(raw)
    m = res.manifest
    # the pool holds 33 / 23 / 4 / 10 rows: non_thinking, thinking and think_with_image are equally scarce
    # (1 row per 10,000), so each gives all it has and auto_think gets its 2 in proportion
    expected = {"non_thinking": 33, "thinking": 23, "auto_think": 2, "think_with_image": 10}
    for name, k in expected.items():
        assert m["sources"][name]["rows"] == k == m["modes"][name]["rows"]
    assert m["totals"]["tokens"] > 0 and "video" not in m["modes"]


# ---------------------------------------------------------------- writing


def test_outputs_resume_and_refuse_another_recipe(ray_local, pools, tmp_path, tokenizer_path):
    mixtures = {
        "m": {
            "budget": 2500,
            "sources": {"docs": {"pool": "docs", "weight": 0.5}, "pairs": {"pool": "pairs", "weight": 0.5}},
        }
    }
    raw = recipe(pools, tmp_path / "out", tokenizer_path, mixtures)
    (res,) = build(raw)
    folder = Path(res.path)
    before = shard_hashes(folder)
    # a crash after shard 00001 was written but before it was recorded: rerun rewrites it identically
    (folder / "_work" / "done" / "00001.json").unlink()
    (folder / "shards" / "00001.parquet").write_bytes(b"half")
    mtime0 = (folder / "shards" / "00000.parquet").stat().st_mtime_ns
    (_res2,) = build(raw)
    assert shard_hashes(folder) == before
    assert (folder / "shards" / "00000.parquet").stat().st_mtime_ns == mtime0  # done shards are not rewritten
    manifest = json.loads((folder / "manifest.json").read_text())
    for s in manifest["shards"]:
        for kind in ("parquet", "tar"):
            assert hashlib.sha256((folder / s[kind]["path"]).read_bytes()).hexdigest() == s[kind]["sha256"]
    report = (folder / "report.html").read_text()
    assert "docs" in report and "Epoch ledger" in report and "<svg" in report
    data = json.loads((folder / "report.json").read_text())
    assert set(data["length_histograms"]) == {"docs", "pairs"}
    raw["mixtures"]["m"]["budget"] = 2000
    with pytest.raises(FileExistsError, match="different recipe"):
        build(raw)


def test_cli_mix_and_its_errors(ray_local, pools, tmp_path, tokenizer_path):
    raw = recipe(
        pools,
        tmp_path / "out",
        tokenizer_path,
        {
            "m": {
                "budget": 1000,
                "sources": {
                    "docs": {"pool": "docs", "weight": 0.7},
                    "pairs": {"pool": "pairs", "weight": 0.2},
                },
            }
        },
    )
    path = tmp_path / "mix.yaml"
    path.write_text(yaml.safe_dump(raw))
    cmd = [sys.executable, "-m", "curation.cli", "mix", str(path), "-q"]
    bad = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert bad.returncode == 2 and "weights sum to 0.9" in bad.stderr
    ok = subprocess.run(
        cmd + ["--set", "mixtures.m.sources.pairs.weight=0.3", "--dry-run"],
        capture_output=True,
        text=True,
        check=False,
        env={**__import__("os").environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address},
    )
    assert ok.returncode == 0, ok.stderr
    assert "dry run, nothing written" in ok.stdout and not (tmp_path / "out").exists()
