"""Token accounting (curation.mix.tokens): loading a tokenizer.json, and row_tokens over row-schema tables."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from curation.mix.tokens import Markup, Tokenizer, row_tokens
from curation.schema import from_rows
from curation.target.geometry import VisionConfig
from tests.helpers.mix import packaged_tokenizer_json


def encoded(w: int, h: int, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (120, 30, 200)).save(buf, fmt)
    return buf.getvalue()


# --- text tokenizer -------------------------------------------------------------------------------------


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
