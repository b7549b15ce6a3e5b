"""curation train / merge: samples and positions, streams, every stage on sample-corpus mixtures, resume,
merging, and bad input refused before the first step."""

from __future__ import annotations

import io
import itertools
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from curation.cli import main
from curation.train.config import ConfigError, load_config
from curation.train.data import (
    ByteTokenizer,
    MixtureStream,
    Position,
    SampleBuilder,
    Shard,
    StreamPlan,
    _read_rows,
    open_mixture,
    patchify,
    plan_pieces,
)
from curation.train.merge import merge_checkpoints
from curation.train.train import evaluate, load_checkpoint, lr_at, train

STEPS = 24


def _png(w: int, h: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _cfg(mixture: Path, out: Path, stage: str, *sets: str):
    return load_config(
        None,
        [
            f"mixture={mixture}",
            f"out={out}",
            f"stage={stage}",
            f"steps={STEPS}",
            "data.num_workers=0",
            "log_every=100",
            *sets,
        ],
    )


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def _falls(out: Path) -> tuple[float, float]:
    losses = [r["loss"] for r in _log(out)]
    return float(np.mean(losses[:5])), float(np.mean(losses[-5:]))


# ---------------------------------------------------------------- config


def test_config_overrides_and_unknown_keys():
    cfg = load_config(None, ["stage=0", "optim.lr=1e-3", "lm.layers=2"])
    assert (cfg.stage, cfg.optim.lr, cfg.lm.layers) == ("0", 0.001, 2)
    with pytest.raises(ConfigError, match=r"config\.lm\.dims: unknown key"):
        load_config(None, ["lm.dims=3"])
    with pytest.raises(ConfigError, match=r"config\.stage: '4'"):
        load_config(None, ["stage=4"])
    with pytest.raises(ConfigError, match=r"config\.data\.batch_size: expected an integer"):
        load_config(None, ["data.batch_size=many"])


def test_config_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("stage: sft\nsteps: 7\nlm: {layers: 3}\noptim: {lr: 2.0e-4}\n")
    cfg = load_config(path, ["steps=9"])
    assert (cfg.stage, cfg.steps, cfg.lm.layers, cfg.optim.lr) == ("sft", 9, 3, 2e-4)
    path.write_text("vision: {depth: 3}\n")
    with pytest.raises(ConfigError, match=f"(?s){re.escape(str(path))}.*config.vision.depth: unknown key"):
        load_config(path)


def test_learning_rate_warms_up_then_decays_to_the_stage_floor():
    cfg = load_config(None, ["stage=3", "steps=100", "optim.warmup_steps=10"])
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(3e-4 / 10) and lrs[9] == pytest.approx(3e-4)
    assert all(a >= b for a, b in itertools.pairwise(lrs[9:]))
    assert lrs[-1] < 3e-4 * 0.01  # annealing decays to zero
    assert lr_at(99, load_config(None, ["stage=2", "steps=100"])) > 1e-3 * 0.09  # other stages keep 10%


# ---------------------------------------------------------------- samples and positions


def test_patches_come_in_merge_blocks_with_their_rows_and_columns():
    pixels = np.random.default_rng(0).integers(0, 255, (56, 84, 3), dtype=np.uint8)
    patches, rc = patchify(pixels, 14, 2)
    assert patches.shape == (4 * 6, 3 * 14 * 14)
    assert rc[:6].tolist() == [[0, 0], [0, 1], [1, 0], [1, 1], [0, 2], [0, 3]]  # one 2x2 block, then the next
    for k in (0, 5, 23):
        r, c = rc[k]
        crop = pixels[r * 14 : (r + 1) * 14, c * 14 : (c + 1) * 14].astype(np.float32) / 127.5 - 1
        np.testing.assert_allclose(patches[k], crop.transpose(2, 0, 1).ravel(), atol=1e-6)


def test_mrope_positions_for_image_video_and_text():
    tok = ByteTokenizer()
    cfg = load_config(None, ["data.tokens_per_second=2"])
    b = SampleBuilder("2", tok, cfg.data, cfg.vision, 64)
    frame = _png(56, 56)  # 4 patches a side: 2x2 LLM tokens per frame group
    row = {"modality": "video", "text": "ab", "frames": [frame] * 4, "frame_ts": [30.0, 30.5, 31.5, 32.0]}
    s = b.build(row)
    t, h, w = (np.array(a) for a in s.pos)
    assert s.ids[0] == tok.special["<|vision_start|>"]
    pads = [i for i, x in enumerate(s.ids) if x == tok.special["<|video_pad|>"]]
    assert len(pads) == 2 * 4  # 4 frames -> 2 temporal groups of 2x2 tokens
    # frames at absolute 30.0 and 31.5 s start the groups: t offsets 0 and 1.5 s x 2 tokens per second = 3
    assert t[pads].tolist() == [1, 1, 1, 1, 4, 4, 4, 4]
    assert h[pads].tolist() == [1, 1, 2, 2] * 2 and w[pads].tolist() == [1, 2, 1, 2] * 2
    end = pads[-1] + 1  # vision_end continues after the largest position of the block
    assert t[end] == h[end] == w[end] == 5
    assert t[end + 1 :].tolist() == [6, 7, 8] and s.targets[end + 1 :] == [True] * 3  # "a", "b", end of text
    assert not any(s.targets[: end + 1])
    image = b.build({"modality": "image_text", "text": "x", "image": _png(84, 56)})  # 3x2 tokens
    t, h, w = (np.array(a) for a in image.pos)
    pads = [i for i, x in enumerate(image.ids) if x == tok.special["<|image_pad|>"]]
    assert (
        set(t[pads]) == {1} and h[pads].tolist() == [1, 1, 1, 2, 2, 2] and w[pads].tolist() == [1, 2, 3] * 2
    )


def test_sft_loss_only_on_assistant_turns():
    tok = ByteTokenizer()
    cfg = load_config(None)
    b = SampleBuilder("sft", tok, cfg.data, cfg.vision, 64)
    messages = [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": [{"type": "image", "index": 0}, {"type": "text", "text": "Q? /think"}]},
        {"role": "assistant", "content": "<think>r</think>\n\nA."},
    ]
    s = b.build({"modality": "sft", "messages": json.dumps(messages), "images": [_png(56, 56)]})
    text = bytes(i for i, on in zip(s.ids, s.targets) if on and i < 256).decode()
    assert text == "<think>r</think>\n\nA."
    assert sum(s.targets) == len(text) + 1  # and the assistant's <|im_end|>
    assert b.build({"modality": "image_text", "text": "x", "image": _png(56, 56)}) == "not_a_conversation"
    bad = [
        {"role": "user", "content": [{"type": "image", "index": 3}]},
        {"role": "assistant", "content": "a"},
    ]
    assert b.build({"modality": "sft", "messages": json.dumps(bad), "images": []}) == "image_ref_out_of_range"


def test_long_samples_are_cut_before_a_visual_block():
    tok = ByteTokenizer()
    cfg = load_config(None, ["data.seq_len=40"])
    b = SampleBuilder("2", tok, cfg.data, cfg.vision, 64)
    row = {
        "modality": "interleaved",
        "texts": ["x" * 36, None, "y" * 30],
        "images": [None, _png(56, 56), None],
    }
    s = b.build(row)
    assert len(s.ids) == 36 and not s.visuals  # the image block (6 tokens) would cross 40: cut before it
    row["texts"][0] = "x" * 30
    s = b.build(row)
    assert len(s.ids) == 40 and len(s.visuals) == 1  # it fits: the text after it is cut instead
    assert b.build({"modality": "image_text", "text": "x", "image": _png(560, 560)}) == "longer_than_seq_len"


# ---------------------------------------------------------------- streams


@pytest.mark.parametrize(
    "rows,streams", [([10, 4], 2), ([10, 4], 4), ([5], 3), ([3, 3, 3, 3, 3], 2), ([7, 1], 5)]
)
def test_pieces_cover_every_row_once(rows, streams):
    shards = [Shard(i, str(i), n, 0, "") for i, n in enumerate(rows)]
    plan = plan_pieces(shards, streams)
    seen = [(s, r) for pieces in plan for s, a, b in pieces for r in range(a, b)]
    assert sorted(seen) == [(s, r) for s, n in enumerate(rows) for r in range(n)]


def test_ranks_and_workers_read_disjoint_rows_covering_the_mixture(train_mixtures):
    mixture = open_mixture(str(train_mixtures["stage2"]), "parquet")
    assert len(mixture.shards) > 1
    world, workers = 2, 2
    pieces = plan_pieces(mixture.shards, world * workers)
    cfg = load_config(None)
    builder = SampleBuilder("2", ByteTokenizer(), cfg.data, cfg.vision, 64)
    keys = []
    for rank in range(world):
        for worker in range(workers):
            ds = MixtureStream(mixture, StreamPlan(rank, world, workers, pieces), builder, 4)
            stream = ds.plan.stream_of(worker)
            n = sum(b - a for _, a, b in pieces[stream])
            rows = ds.rows(stream, Position())
            keys.append([next(rows)[0]["key"] for _ in range(n)])
    flat = [k for ks in keys for k in ks]
    assert len(flat) == len(set(flat)) == mixture.manifest["totals"]["rows"]


def test_webdataset_shards_give_the_parquet_rows(train_mixtures):
    pq_mix = open_mixture(str(train_mixtures["stage2"]), "parquet")
    tar_mix = open_mixture(str(train_mixtures["stage2"]), "webdataset")
    for a, b in zip(pq_mix.shards, tar_mix.shards):
        rows_a = list(_read_rows(a, "parquet", 5, 40))
        rows_b = list(_read_rows(b, "webdataset", 5, 40))
        assert len(rows_a) == len(rows_b) == 35
        for x, y in zip(rows_a, rows_b):
            for col in ("key", "modality", "text", "image", "texts", "frames", "frame_ts", "messages"):
                assert x[col] == y[col], col
            assert [i for i in x["images"] or [] if i] == [i for i in y["images"] or [] if i]


# ---------------------------------------------------------------- stages


STAGE_PLAN = [
    ("0", "stage0", None),
    ("1", "stage2", "0"),
    ("2", "stage2", "1"),
    ("3", "anneal_text_heavy", "2"),
    ("sft", "coldstart", "3"),
]


@pytest.fixture(scope="module")
def stage_runs(train_mixtures, tmp_path_factory):
    """The recipe in order, each stage from the previous one's weights: 0, 1, 2, 3, then sft."""
    base = tmp_path_factory.mktemp("runs")
    runs = {}
    for stage, mix, prev in STAGE_PLAN:
        init = runs[prev]["checkpoint"] if prev else None
        runs[stage] = train(
            _cfg(train_mixtures[mix], base / stage, stage, *([f"init={init}"] if init else []))
        )
        runs[stage].update(out=base / stage, init=init, mixture=str(train_mixtures[mix]))
    return runs


@pytest.mark.parametrize("stage", [s for s, _, _ in STAGE_PLAN])
def test_each_stage_trains_and_the_loss_falls(stage_runs, stage):
    """On the same batches, the loss of the stage's last weights is measurably below that of its first
    (stage 0 starts from random weights: its logged loss, first steps against last)."""
    run = stage_runs[stage]
    if run["init"]:
        before, after = (evaluate(p, run["mixture"], stage) for p in (run["init"], run["checkpoint"]))
    else:
        before, after = _falls(run["out"])
    assert after < before - 0.1, (before, after)
    log = _log(run["out"])
    assert len(log) == STEPS and all(r["tokens_per_s"] > 0 and 0 <= r["data_wait_share"] <= 1 for r in log)
    assert Path(run["plot"]).is_file() and Path(run["checkpoint"]).is_file()
    assert all(r["images"] > 0 for r in log[:3])  # pictures reach the model in every stage


def test_stage1_changes_only_the_projector(stage_runs):
    before = load_checkpoint(stage_runs["0"]["checkpoint"])["model"]
    after = load_checkpoint(stage_runs["1"]["checkpoint"])["model"]
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    projector = {k for k in before if k.startswith("projector.")}
    assert changed == projector


def test_checkpoint_records_config_step_and_data_position(stage_runs):
    ckpt = load_checkpoint(stage_runs["2"]["checkpoint"])
    assert ckpt["step"] == STEPS and ckpt["stage"] == "2" and ckpt["config"]["lm"]["vocab_size"] == 263
    assert ckpt["data"]["n_streams"] == 1 and ckpt["data"]["consumed"] == STEPS
    epoch, piece, row = ckpt["data"]["streams"]["0"]
    assert (epoch, piece, row) != (0, 0, 0)
    assert set(ckpt["optimizer"]["state"])  # the optimizer's moments travel with it


def test_resume_continues_from_the_same_data_position(train_mixtures, tmp_path):
    """Two workers (two streams, batches alternating between them): stopped at step 7 and resumed, the run
    consumes exactly the rows and reaches exactly the losses of the run that went straight through."""
    sets = ["steps=14", "data.num_workers=2"]
    full = tmp_path / "full"
    train(_cfg(train_mixtures["stage2"], full, "2", *sets, "ckpt_every=7"))
    part = tmp_path / "part"
    train(
        _cfg(
            train_mixtures["stage2"], part, "2", *sets, f"resume={full / 'checkpoints' / 'step_00000007.pt'}"
        )
    )
    a, b = _log(full)[7:], _log(part)
    assert [r["step"] for r in b] == list(range(8, 15))
    assert [r["batch"] for r in a] == [r["batch"] for r in b]
    np.testing.assert_allclose([r["loss"] for r in a], [r["loss"] for r in b], atol=1e-5)
    assert len({r["batch"] for r in a}) == len(a)


# ---------------------------------------------------------------- merge


def test_merged_checkpoint_is_the_average(stage_runs, train_mixtures, tmp_path):
    outs = []
    for mix in ("anneal_text_heavy", "anneal_vision_heavy"):
        run = train(
            _cfg(train_mixtures[mix], tmp_path / mix, "3", "steps=4", f"init={stage_runs['2']['checkpoint']}")
        )
        outs.append(run["checkpoint"])
    merged_path = tmp_path / "merged.pt"
    assert main(["merge", *outs, "--out", str(merged_path)]) == 0
    merged = load_checkpoint(str(merged_path))
    a, b = (load_checkpoint(p)["model"] for p in outs)
    differ = 0
    for k, v in merged["model"].items():
        torch.testing.assert_close(v, (a[k] + b[k]) / 2, rtol=0, atol=1e-7)
        differ += not torch.equal(a[k], b[k])
    assert differ > 10
    assert [m["mixture"]["path"] for m in merged["merged_from"]] == [
        str(train_mixtures[m]) for m in ("anneal_text_heavy", "anneal_vision_heavy")
    ]
    weighted = merge_checkpoints(outs, str(tmp_path / "w.pt"), weights=[3, 1])["model"]
    k = "lm.layers.0.mlp.up_proj.weight"
    torch.testing.assert_close(weighted[k], 0.75 * a[k] + 0.25 * b[k])
    # the merged model starts a stage like any checkpoint
    train(_cfg(train_mixtures["coldstart"], tmp_path / "after", "sft", "steps=1", f"init={merged_path}"))


def test_merge_refuses_checkpoints_of_another_config(stage_runs, tmp_path):
    ckpt = load_checkpoint(stage_runs["2"]["checkpoint"])
    ckpt["config"]["lm"]["layers"] = 2
    ckpt.pop("path")
    other = tmp_path / "other.pt"
    torch.save(ckpt, other)
    with pytest.raises(ConfigError, match=r"model configs differ:\n  - lm\.layers: 4 vs 2"):
        merge_checkpoints([stage_runs["2"]["checkpoint"], str(other)], str(tmp_path / "m.pt"))
    assert not (tmp_path / "m.pt").exists()


# ---------------------------------------------------------------- bad input, before the first step


def _copy(mixture: Path, tmp_path: Path) -> Path:
    dst = tmp_path / mixture.name
    shutil.copytree(mixture, dst)
    return dst


def _refused(cfg, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        train(cfg)
    assert not (Path(cfg.out) / "log.jsonl").exists()


def test_missing_truncated_or_changed_shards_are_refused(train_mixtures, tmp_path):
    mix = _copy(train_mixtures["stage2"], tmp_path)
    (mix / "shards" / "00001.parquet").unlink()
    with (mix / "shards" / "00002.parquet").open("ab") as f:
        f.write(b"x")
    blob = bytearray((mix / "shards" / "00000.parquet").read_bytes())
    blob[100] ^= 0xFF
    (mix / "shards" / "00000.parquet").write_bytes(bytes(blob))
    _refused(
        _cfg(mix, tmp_path / "out", "2"),
        r"(?s)00000\.parquet: sha256 .* differs.*00001\.parquet: missing .*00002\.parquet: \d+ bytes, the "
        r"manifest says",
    )
    (mix / "manifest.json").unlink()
    _refused(_cfg(mix, tmp_path / "out", "2"), r"manifest\.json: not found: is .* a mixture folder")


def test_a_stage_without_its_rows_is_refused(train_mixtures, tmp_path):
    _refused(
        _cfg(train_mixtures["stage0"], tmp_path / "a", "sft"),
        r"stage sft \(cold-start SFT.*\) needs rows of sft, and it holds image_text \(\d+ rows\)",
    )
    _refused(_cfg(train_mixtures["coldstart"], tmp_path / "b", "0"), r"stage 0 .* needs rows of image_text")


def test_a_checkpoint_of_another_config_is_refused(stage_runs, train_mixtures, tmp_path):
    _refused(
        _cfg(
            train_mixtures["stage2"],
            tmp_path / "a",
            "2",
            f"init={stage_runs['1']['checkpoint']}",
            "lm.layers=2",
            "vision.dim=32",
        ),
        r"init .* another model config .*\n  - lm\.layers: 4 vs 2\n  - vision\.dim: 64 vs 32",
    )
    _refused(
        _cfg(train_mixtures["stage2"], tmp_path / "b", "2", f"resume={stage_runs['1']['checkpoint']}"),
        r"a stage 1 run cannot continue as stage 2 \(start the new stage from it with --init\)",
    )
    _refused(
        _cfg(train_mixtures["stage2"], tmp_path / "c", "2", f"init={tmp_path / 'nothing.pt'}"),
        r"nothing\.pt: no such checkpoint",
    )


def test_cli_train_and_its_errors(train_mixtures, tmp_path, capsys):
    out = tmp_path / "cli"
    assert (
        main(
            [
                "train",
                str(train_mixtures["stage2"]),
                "--stage",
                "2",
                "--out",
                str(out),
                "--set",
                "steps=2",
                "--set",
                "data.num_workers=0",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "stage 2: 2 steps" in printed and "tokens/s" in printed and (out / "checkpoints").is_dir()
    assert (
        main(["train", str(train_mixtures["coldstart"]), "--stage", "0", "--out", str(tmp_path / "x")]) == 2
    )
    assert "needs rows of image_text" in capsys.readouterr().err
    assert main(["train", str(train_mixtures["stage2"]), "--set", "lm.widht=3"]) == 2
    assert "config.lm.widht: unknown key" in capsys.readouterr().err
    assert main(["merge", str(out), "--out", str(tmp_path / "m.pt")]) == 2
    assert "at least two" in capsys.readouterr().err


@pytest.mark.slow
def test_torchrun_two_ranks_on_cpu(train_mixtures, tmp_path):
    """Two processes under torchrun (Gloo): each rank reads its own streams, the checkpoint holds both."""
    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "-m",
        "curation.cli",
        "train",
        str(train_mixtures["stage2"]),
        "--stage",
        "2",
        "--out",
        str(out),
        "--set",
        "steps=4",
        "--set",
        "data.num_workers=0",
        "--set",
        "data.batch_size=4",
    ]
    subprocess.run(cmd, check=True, timeout=300)
    ckpt = load_checkpoint(str(out))
    assert ckpt["data"]["n_streams"] == 2 and set(ckpt["data"]["streams"]) == {"0", "1"}
    assert ckpt["data"]["streams"]["0"] != [0, 0, 0] and ckpt["data"]["streams"]["1"] != [0, 0, 0]
