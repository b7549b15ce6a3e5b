"""Image filters (filters/image.py) on small inline batches: decoding and its rejects, size and aspect
thresholds, annotate-only."""

from __future__ import annotations

import io
import struct
import zlib

import pyarrow as pa
import pytest
from PIL import Image

from tests.helpers.batches import batch, reasons, stage
from tests.helpers.images import jpeg


def png_bomb(w=30000, h=30000) -> bytes:
    """A valid PNG header declaring w x h grey pixels with a tiny compressed body (never allocated)."""

    def chunk(kind, data):
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    comp = zlib.compressobj(9)
    row = b"\x00" + b"\x00" * w
    body = b"".join(comp.compress(row) for _ in range(64)) + comp.flush()
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
        + chunk(b"IDAT", body)
        + chunk(b"IEND", b"")
    )


def test_image_decode_reasons_and_sizes():
    good = jpeg(64, 48)
    b = batch(
        {"image": good},
        {"image": None},
        {"image": b"garbage"},
        {"image": good[: len(good) // 2]},
        {"image": png_bomb()},
        {"image": good},
        modality="image_text",
    )
    b = b.set_column(
        b.schema.get_field_index("reject_reason"),
        "reject_reason",
        pa.array([None] * 5 + ["earlier"], pa.string()),
    )
    out = stage("image_decode")(b)
    assert reasons(out) == [
        None,
        "missing_image",
        "undecodable",
        "undecodable",
        "decompression_bomb",
        "earlier",
    ]
    assert out["width"].to_pylist()[0] == 64 and out["height"].to_pylist()[0] == 48
    assert " at 0x" not in "".join(d for d in out["reject_detail"].to_pylist() if d)  # stable across runs
    # 900 MP: above twice Pillow's limit, refused from the header (nothing decoded), with Pillow's numbers
    assert "900000000 pixels" in out["reject_detail"].to_pylist()[4]
    assert out["score_image_decode"].to_pylist()[5] is None  # rejected earlier: not scored
    assert out["image_format"].to_pylist()[0] == "jpeg"
    # between our max_pixels and Pillow's hard limit: our own check, with the declared size
    out = stage("image_decode", max_pixels=10_000)(batch({"image": png_bomb(200, 100)}))
    assert reasons(out) == ["decompression_bomb"] and out["width"].to_pylist() == [200]
    assert "200x100 exceeds max_pixels=10000" in out["reject_detail"].to_pylist()[0]
    import PIL.Image

    assert PIL.Image.MAX_IMAGE_PIXELS == 89_478_485  # no global state changed


@pytest.mark.parametrize("full", [False, True])
def test_truncated_jpeg_is_caught_with_or_without_full_decode(full):
    data = jpeg(320, 240, quality=95)
    cut = [data[: int(len(data) * f)] for f in (0.4, 0.7, 0.95)]
    out = stage("image_decode", full_decode=full)(batch(*[{"image": c} for c in cut]))
    assert reasons(out) == ["undecodable"] * 3


def test_size_and_aspect_thresholds_and_annotate_only():
    b = batch(*[{"width": w, "height": h} for w, h in [(20, 20), (64, 64), (5000, 800), (600, 60)]])
    out = stage("image_size", min_side=32, max_side=4096)(b)
    assert reasons(out) == ["side_below_min", None, "side_above_max", None]
    assert out["score_image_size"].to_pylist() == [20, 64, 800, 60]
    out = stage("aspect_ratio", max_ratio=3)(b)
    assert reasons(out) == [None, None, "aspect_ratio_above_max", "aspect_ratio_above_max"]
    out = stage("aspect_ratio", max_ratio=3, annotate_only=True)(b)
    assert reasons(out) == [None] * 4 and out["score_aspect_ratio"].to_pylist()[3] == 10.0


def test_png_bomb_helper_is_a_real_png():
    img = Image.open(io.BytesIO(png_bomb(300, 200)))
    img.load()
    assert img.size == (300, 200)


def test_image_decode_checks_every_image_of_an_interleaved_document():
    good = jpeg(64, 48)
    b = batch(
        {"texts": ["a", None, "b"], "images": [None, good, None]},
        {"texts": ["a", None, None], "images": [None, good, good[:200]]},
        {"texts": ["only text"], "images": [None]},
        modality="interleaved",
    )
    out = stage("image_decode")(b)
    assert reasons(out) == [None, "undecodable", None]
    assert out["reject_detail"].to_pylist()[1].startswith("image 2: ")
    assert out["score_image_decode"].to_pylist()[0] == 64 * 48
    assert out["width"].to_pylist() == [None, None, None]  # one size per document does not exist
