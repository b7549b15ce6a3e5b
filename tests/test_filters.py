"""Stage behaviour on small inline batches: scores persist, thresholds decide, rejects carry reasons."""

from __future__ import annotations

import io
import struct
import zlib

import pyarrow as pa
import pytest
from PIL import Image

from conftest import jpeg
from curation.schema import from_rows
from curation.stage import load_registry

REG = load_registry()


def stage(name, **params):
    s = REG[name](**params)
    s.setup()
    return s


def batch(*rows, modality="image_text"):
    return from_rows(
        [
            {"id": str(i), "modality": modality, "source_uri": "mem", "source_offset": i, **r}
            for i, r in enumerate(rows)
        ]
    )


def reasons(table):
    return table["reject_reason"].to_pylist()


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


def test_caption_filters():
    texts = [
        "A red circle on a white background.",
        None,
        "   ",
        "best price best price best price best price",
        "Click here to download",
        "IMG_2034.JPG",
        "Ein roter Kreis auf weißem Hintergrund.",
        "a red circle and a red square",
    ]
    b = batch(*[{"text": t} for t in texts])
    assert reasons(stage("caption_length", min=3)(b)) == [
        None,
        "too_short",
        "too_short",
        None,
        None,
        "too_short",
        None,
        None,
    ]
    assert reasons(stage("caption_repetition")(b)) == [
        None,
        None,
        None,
        "repeated_phrase",
        None,
        None,
        None,
        None,
    ]
    assert reasons(stage("caption_boilerplate")(b)) == [
        None,
        None,
        None,
        None,
        "boilerplate",
        "boilerplate",
        None,
        None,
    ]
    out = stage("caption_language", languages=["en"])(b)
    assert out["lang"].to_pylist()[0] == "en" and out["lang"].to_pylist()[6] == "de"
    assert reasons(out)[6] == "language_not_allowed" and reasons(out)[0] is None
    assert "detected de" in out["reject_detail"].to_pylist()[6]
    assert reasons(out)[1] == "language_not_allowed"  # no text, no language


def test_stages_skip_other_modalities_unless_asked():
    b = batch({"text": "tiny"}, modality="text")
    assert reasons(stage("caption_length", min=3)(b)) == [None]
    assert reasons(stage("caption_length", min=3, modalities=["text"])(b)) == ["too_short"]
    # the score column exists even when no row applied, so every batch has one schema
    assert "score_caption_length" in stage("caption_length")(b).column_names


def test_exact_dedup_keeps_the_first_copy_in_input_order():
    s = stage("exact_dedup")
    index_rows = pa.table(
        {
            "id": ["a", "b", "a", "c", "a"],
            "unit": [1, 0, 0, 2, 1],
            "source_uri": ["u1", "u0", "u0", "u2", "u1"],
            "source_offset": [5, 0, 9, 0, 2],
        }
    )
    s.use_index(s.build_index(index_rows))
    b = from_rows(
        [
            {"id": i, "modality": "text", "source_uri": u, "source_offset": o}
            for i, u, o in [("a", "u1", 5), ("b", "u0", 0), ("a", "u0", 9), ("a", "u1", 2)]
        ]
    )
    out = s(b)
    assert reasons(out) == ["duplicate", None, None, "duplicate"]
    assert out["reject_detail"].to_pylist()[0] == "duplicate of u0#9"
    assert out["score_exact_dedup"].to_pylist() == [3.0, 1.0, 3.0, 3.0]


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
