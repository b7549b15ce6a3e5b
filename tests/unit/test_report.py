"""Tests for curation.report on a tiny hand-built pool that follows docs/pool-format.md."""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from curation.html import svg_histogram, thumbnail
from curation.report import write_report

VOID = {"meta", "img", "br", "hr", "input", "link"}
SCRIPT_CAPTION = "<script>alert('x')</script> & friends"
LONG_CAPTION = "x" * 400


def jpeg(w: int = 48, h: int = 32, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def png_header(w: int, h: int) -> bytes:
    """A valid PNG signature + IHDR declaring w x h, with a tiny IDAT: a decompression bomb's header."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def row(**cols) -> dict:
    return cols


def rid(i: int) -> str:
    return f"{i:032x}"


def write_parquet(path: Path, rows: list[dict]) -> int:
    schema = pa.schema(
        [
            ("id", pa.string()),
            ("source", pa.string()),
            ("modality", pa.string()),
            ("text", pa.string()),
            ("image", pa.binary()),
            ("width", pa.int32()),
            ("height", pa.int32()),
            ("texts", pa.list_(pa.string())),
            ("images", pa.list_(pa.binary())),
            ("score_clip", pa.float64()),
            ("reject_stage", pa.string()),
            ("reject_reason", pa.string()),
            ("reject_detail", pa.string()),
        ]
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    # Small row groups so the reject reader really has to pick row groups.
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path, row_group_size=3)
    return path.stat().st_size


@pytest.fixture()
def pool(tmp_path: Path) -> Path:
    pool = tmp_path / "pool"
    good = jpeg(seed=1)
    shard0 = [
        row(
            id=rid(1),
            modality="image_text",
            text="a red bus",
            image=good,
            width=48,
            height=32,
            score_clip=0.31,
        ),
        row(
            id=rid(2),
            modality="image_text",
            text=SCRIPT_CAPTION,
            image=jpeg(seed=2),
            width=48,
            height=32,
            score_clip=0.28,
        ),
        row(
            id=rid(3),
            modality="interleaved",
            texts=["hello", None, "bye"],
            images=[None, b"junk", jpeg(seed=3)],
        ),
    ]
    shard1 = [
        row(id=rid(4), modality="text", text=LONG_CAPTION),
        row(id=rid(5), modality="image_text", text="kept five", image=jpeg(seed=5), score_clip=0.4),
        row(id=rid(6), modality="image_text", text="kept six", image=jpeg(seed=6), score_clip=0.5),
    ]
    truncated = jpeg(64, 64, seed=7)
    truncated = truncated[: len(truncated) // 2]
    bad = row(reject_stage="image_decode", reject_reason="undecodable", modality="image_text")
    small = row(reject_stage="image_size", reject_reason="side_below_min", modality="image_text")
    rejects = [
        row(id=rid(10), image=np.random.default_rng(0).bytes(500), text="random bytes", **bad),
        row(id=rid(11), image=truncated, text="truncated jpeg", reject_detail="truncated", **bad),
        row(id=rid(12), image=png_header(30000, 30000), text="bomb", **bad),
        row(id=rid(13), image=png_header(10000, 6000), text="60 MP", **bad),
        *(
            row(
                id=rid(20 + i),
                image=jpeg(8, 8, seed=20 + i),
                text=f"tiny {i}",
                reject_detail="8 < 32",
                **small,
            )
            for i in range(6)
        ),
        row(
            id=rid(30),
            modality="text",
            text=SCRIPT_CAPTION,
            reject_stage="text_len",
            reject_reason="text_too_short",
        ),
    ]
    shards, total_bytes = [], 0
    for p, rows in enumerate([shard0, shard1]):
        name = f"00000_{p:04d}"
        pbytes = write_parquet(pool / "shards" / f"{name}.parquet", rows)
        with tarfile.open(pool / "shards" / f"{name}.tar", "w"):
            pass
        tbytes = (pool / "shards" / f"{name}.tar").stat().st_size
        total_bytes += pbytes + tbytes
        shards.append(
            {
                "name": name,
                "unit": 0,
                "rows": len(rows),
                "tokens": None,
                "parquet": {"path": f"shards/{name}.parquet", "bytes": pbytes, "sha256": "0" * 64},
                "tar": {"path": f"shards/{name}.tar", "bytes": tbytes, "sha256": "0" * 64},
            }
        )
    rbytes = write_parquet(pool / "rejects" / "00000.parquet", rejects)
    manifest = {
        "format": "curation.pool/1",
        "recipe": {"stages": []},
        "recipe_hash": "0123456789abcdef",
        "shards": shards,
        "rejects": [{"path": "rejects/00000.parquet", "rows": len(rejects), "bytes": rbytes, "sha256": ""}],
        "totals": {"rows": 6, "rejected": 11, "shards": 2, "bytes": total_bytes},
    }
    stats = {
        "rows_in": 17,
        "rows_out": 6,
        "rows_rejected": 11,
        "elapsed_s": 3.5,
        "rows_per_s": 4.857,
        "stages": [
            {"name": "ingest", "rows_in": 17, "rows_out": 17, "drops": {}, "seconds": 0.5, "histograms": {}},
            {
                "name": "image_decode",
                "rows_in": 17,
                "rows_out": 13,
                "drops": {"undecodable": 4},
                "seconds": 1.0,
                "histograms": {"width": {"edges": [0, 16, 32, 48, 64], "counts": [6, 0, 0, 6]}},
            },
            {
                "name": "image_size",
                "rows_in": 13,
                "rows_out": 7,
                "drops": {"side_below_min": 6},
                "seconds": 0.1,
                "histograms": {},
            },
            {
                "name": "text_len",
                "rows_in": 7,
                "rows_out": 6,
                "drops": {"text_too_short": 1},
                "seconds": 0.1,
                "histograms": {},
            },
            {
                "name": "clip",
                "rows_in": 6,
                "rows_out": 6,
                "drops": {},
                "seconds": 1.8,
                "histograms": {
                    "score_clip": {"edges": [0.0, 0.1, 0.2, 0.3, 0.4, 0.5], "counts": [0, 0, 1, 1, 2]},
                    "empty": {"edges": [], "counts": []},
                },
            },
        ],
    }
    (pool / "manifest.json").write_text(json.dumps(manifest))
    (pool / "stats.json").write_text(json.dumps(stats))
    return pool


class Walker(HTMLParser):
    """Checks tags are balanced and counts <img> / placeholders per top-level section."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[tuple[str, dict]] = []
        self.sections: dict[str, dict] = {}
        self.svgs = 0
        self.placeholder_text: dict[str, list[str]] = {}

    def _section(self) -> str | None:
        for tag, attrs in reversed(self.stack):
            if tag == "section" and (attrs.get("data-reason") or attrs.get("id") == "kept"):
                return attrs.get("data-reason") or "kept"
        return None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        sec = self._section()
        if tag == "svg":
            self.svgs += 1
        if tag == "img" and sec:
            self.sections.setdefault(sec, {"img": 0, "ph": 0})["img"] += 1
            assert attrs["src"].startswith("data:image/jpeg;base64,")
        if tag == "div" and attrs.get("class") == "ph" and sec:
            self.sections.setdefault(sec, {"img": 0, "ph": 0})["ph"] += 1
        if tag not in VOID:
            self.stack.append((tag, attrs))

    def handle_startendtag(self, tag, attrs):
        if tag not in VOID:
            self.handle_starttag(tag, attrs)
            self.handle_endtag(tag)

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        assert self.stack and self.stack[-1][0] == tag, f"unbalanced </{tag}>, open: {self.stack[-3:]}"
        self.stack.pop()

    def handle_data(self, data):
        if self.stack and self.stack[-1][1].get("class") == "ph":
            self.placeholder_text.setdefault(self._section(), []).append(data)


def test_report_files_and_numbers(pool: Path) -> None:
    html_path, json_path = write_report(pool, thumbs_per_reason=4, thumbs_kept=4, thumb_px=64)
    assert html_path == pool.resolve() / "report.html" and html_path.exists()
    assert json_path == pool.resolve() / "report.json" and json_path.exists()

    rep = json.loads(json_path.read_text())
    stats = json.loads((pool / "stats.json").read_text())
    assert rep["recipe_hash"] == "0123456789abcdef"
    assert rep["totals"]["rows_in"] == 17 and rep["totals"]["rows_out"] == 6
    assert rep["totals"]["rows_rejected"] == 11 and rep["totals"]["shards"] == 2
    assert rep["totals"]["elapsed_s"] == 3.5 and rep["totals"]["rows_per_s"] == 4.857
    manifest = json.loads((pool / "manifest.json").read_text())
    assert rep["totals"]["bytes"] == manifest["totals"]["bytes"]
    for got, want in zip(rep["stages"], stats["stages"], strict=True):
        assert (got["name"], got["rows_in"], got["rows_out"], got["drops"], got["seconds"]) == (
            want["name"],
            want["rows_in"],
            want["rows_out"],
            want["drops"],
            want["seconds"],
        )
    reasons = {r["reason"]: r for r in rep["rejects"]}
    assert set(reasons) == {"undecodable", "side_below_min", "text_too_short"}
    assert reasons["undecodable"]["ids"] == [rid(10), rid(11), rid(12), rid(13)]
    assert reasons["side_below_min"]["ids"] == [rid(20 + i) for i in range(4)]  # bounded by thumbs_per_reason
    assert reasons["side_below_min"]["count"] == 6 and reasons["text_too_short"]["stage"] == "text_len"
    assert rep["kept_examples"] == [rid(1), rid(2), rid(3), rid(4)]


def test_report_html(pool: Path) -> None:
    html_path, _ = write_report(pool, thumbs_per_reason=4, thumbs_kept=4, thumb_px=64)
    doc = html_path.read_text(encoding="utf-8")
    w = Walker()
    w.feed(doc)
    w.close()
    assert [t for t, _ in w.stack] == [], "unclosed tags"

    for reason in ("undecodable", "side_below_min", "text_too_short"):
        assert reason in doc
    assert w.sections["side_below_min"] == {"img": 4, "ph": 0}
    assert w.sections["undecodable"] == {"img": 0, "ph": 4}
    assert w.sections["text_too_short"] == {"img": 0, "ph": 1}
    # kept: 2 JPEGs, an interleaved row (first *decodable* image), then the text row of shard 2.
    assert w.sections["kept"] == {"img": 3, "ph": 1}
    ph = " | ".join(w.placeholder_text["undecodable"])
    assert "cannot decode: unknown image format" in ph
    assert "cannot decode:" in w.placeholder_text["undecodable"][1] and "truncated" in ph
    assert "too large to preview (30000 x 30000)" in ph and "too large to preview (10000 x 6000)" in ph
    assert w.placeholder_text["text_too_short"] == ["no image"]

    assert "<script" not in doc.lower()
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; friends" in doc
    assert LONG_CAPTION not in doc and "x" * 290 + "…" in doc
    assert w.svgs == 3 and "image_decode · width" in doc and "clip · score_clip" in doc
    assert "no data" in doc  # the empty histogram
    assert "17" in doc and "35.3%" in doc  # rows in; 6/17 kept
    assert "http://" not in doc.replace('xmlns="http://www.w3.org/2000/svg"', "")  # self-contained


def test_thumbs_zero_and_no_rejects(pool: Path) -> None:
    (pool / "rejects" / "00000.parquet").unlink()
    html_path, json_path = write_report(pool, thumbs_per_reason=0, thumbs_kept=0)
    w = Walker()
    w.feed(html_path.read_text())
    assert "kept" not in w.sections and all(v["img"] == 0 for v in w.sections.values())
    assert {r["reason"] for r in json.loads(json_path.read_text())["rejects"]} == {
        "undecodable",
        "side_below_min",
        "text_too_short",
    }


def test_thumbnail_cases() -> None:
    uri, why = thumbnail(jpeg(400, 300), px=32)
    assert uri and uri.startswith("data:image/jpeg;base64,") and why == ""
    buf = io.BytesIO()
    Image.new("RGBA", (20, 20), (255, 0, 0, 0)).save(buf, "PNG")
    assert thumbnail(buf.getvalue())[0]
    assert thumbnail(None) == (None, "no image")
    before = Image.MAX_IMAGE_PIXELS
    assert thumbnail(png_header(30000, 30000)) == (None, "too large to preview (30000 x 30000)")
    assert Image.MAX_IMAGE_PIXELS == before  # the global bomb guard is never loosened


def test_svg_histogram_degenerate() -> None:
    assert "no data" in svg_histogram([], [])
    svg = svg_histogram([0, 1], [3, 4], title="a<b")  # wrong edge count: falls back to bin indices
    assert svg.count("<rect") == 2 and "a&lt;b" in svg
