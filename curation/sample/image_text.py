"""Image-text rows: one scene drawn and captioned, made dirty on plan, written as WebDataset, Parquet
or JSONL.

The three sources hold the same kind of row in the formats data teams bring: img2dataset-style tars
(with a metadata Parquet per shard), Parquet files with image bytes inline, and JSONL with an image
folder. :func:`apply_dirt` is the one place where image-text dirt is made (broken and truncated images,
odd sizes, useless or foreign captions, duplicates, benchmark copies); JSONL line-level dirt
(malformed_json, missing_image) happens in its writer.
"""

from __future__ import annotations

import io
import json
import random
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from curation.sample.benchmarks import _bench_statement, bench_item, plant_image
from curation.sample.captions import (
    BOILERPLATE_CAPTIONS,
    LANGS,
    REPEATED_PHRASES,
    _cp1252_caption,
    _near_caption,
    caption_en,
    caption_foreign,
)
from curation.sample.plan import SOURCE_URL, CorpusSpec, _pick_original, shard_plan
from curation.sample.scenes import (
    BOMB_SIDE,
    JPEG_QUALITY,
    _pick_size,
    _scaled,
    decompression_bomb_png,
    draw_scene,
    encode_image,
    make_scene,
)
from curation.sample.seeding import _rng
from curation.sample.truth import ShardResult, _truth

PNG_SHARE = 0.08
PARQUET_ROW_GROUP = 250


@dataclass
class Sample:
    """One image-text row before it is written in a source's format."""

    key: str
    scene: dict
    width: int
    height: int
    fmt: str  # "jpeg" | "png"
    caption: str | bytes | None  # bytes: not valid UTF-8; None: no caption at all
    image: bytes | None = None
    quality: int = JPEG_QUALITY
    dirt: str = "clean"
    dup_of: str | None = None
    bench_item: str | None = None

    @property
    def ext(self) -> str:
        return "png" if self.fmt == "png" else "jpg"

    @property
    def caption_text(self) -> str | None:
        """The caption as a string (what a Windows-1252-aware reader would see)."""
        return self.caption.decode("cp1252") if isinstance(self.caption, bytes) else self.caption


def _draft(spec: CorpusSpec, source: str, shard: int, i: int) -> tuple[Sample, random.Random]:
    """The clean version of a row. Draw order is fixed so originals can be re-derived."""
    rng = _rng(spec.seed, source, shard, i)
    scene = make_scene(rng)
    w, h = _pick_size(rng)
    fmt = "png" if rng.random() < PNG_SHARE else "jpeg"
    return Sample(spec.key(shard, i), scene, w, h, fmt, caption_en(scene, rng)), rng


def _finish(s: Sample) -> Sample:
    if s.image is None:
        s.image = encode_image(draw_scene(s.scene, s.width, s.height), s.fmt, s.quality)
    return s


def clean_sample(spec: CorpusSpec, source: str, shard: int, i: int) -> Sample:
    return _finish(_draft(spec, source, shard, i)[0])


def _corrupt_bytes(rng: random.Random) -> bytes:
    """Bytes named .jpg that no decoder accepts: a JPEG header followed by junk, or an HTML page.

    The junk never contains 0xFF, so a JPEG parser finds no further marker and gives up.
    """
    if rng.random() < 0.7:
        return b"\xff\xd8\xff\xe0" + rng.randbytes(rng.randint(500, 20000)).replace(b"\xff", b"\x00")
    return (
        b"<!DOCTYPE html><html><head><title>404 Not Found</title></head><body><h1>Not Found</h1>"
        b"<p>The requested URL was not found on this server.</p></body></html>\n"
    )


def apply_dirt(s: Sample, rng: random.Random, spec: CorpusSpec, source: str, shard: int, i: int) -> None:
    """Turn a clean draft into ``s.dirt`` in place. The one place where dirt is made.

    Size dirt changes the render size (content stays describable); JSONL line-level dirt
    (malformed_json, missing_image) is left to the JSONL writer.
    """
    kind = s.dirt
    if kind in ("clean", "malformed_json", "missing_image"):
        return
    if kind == "mismatched_caption":  # the caption of another random scene
        caption = s.caption
        while caption == s.caption:
            caption = caption_en(make_scene(rng), rng)
        s.caption = caption
    elif kind in ("tiny", "huge", "extreme_aspect"):
        if kind == "tiny":
            a, b = rng.randint(8, 31), rng.randint(8, 48)
        elif kind == "huge":
            a, b = rng.randint(300, 900), rng.randint(4097, 6000)
        else:
            a = rng.randint(40, 120)
            b = int(a * rng.uniform(4.5, 10))
        s.width, s.height = (b, a) if rng.random() < 0.5 else (a, b)
        if kind == "huge":
            s.fmt = "jpeg"  # PNG of 3+ MP is slow to deflate; the JPEG of flat colours stays small
    elif kind == "decompression_bomb":
        s.image, s.fmt, s.width, s.height = decompression_bomb_png(), "png", BOMB_SIDE, BOMB_SIDE
    elif kind in ("exact_duplicate", "near_duplicate"):
        src, sh, j = _pick_original(spec, source, shard, i, rng)
        orig = clean_sample(spec, src, sh, j)
        s.dup_of = f"{spec.path(src, sh)}#{orig.key}"
        s.scene = orig.scene
        if kind == "exact_duplicate":
            s.image, s.fmt, s.caption = orig.image, orig.fmt, orig.caption
            s.width, s.height = orig.width, orig.height
        else:  # resized by 0.8-1.2 and/or re-encoded at another JPEG quality
            img = Image.open(io.BytesIO(orig.image)).convert("RGB")
            if rng.random() < 0.6:
                img = _scaled(img, rng.choice((rng.uniform(0.8, 0.95), rng.uniform(1.05, 1.2))))
            s.quality = rng.choice([q for q in (60, 70, 75, 80, 90, 95) if q != orig.quality])
            s.fmt, s.width, s.height = "jpeg", img.width, img.height
            s.image = encode_image(img, "jpeg", s.quality)
            s.caption = _near_caption(orig.caption, rng)
    elif kind == "corrupt_image":
        s.fmt, s.image = "jpeg", _corrupt_bytes(rng)
    elif kind == "truncated_image":
        s.fmt = "jpeg"
        full = encode_image(draw_scene(s.scene, s.width, s.height), "jpeg")
        s.image = full[: int(len(full) * rng.uniform(0.4, 0.7))]
    elif kind == "non_utf8_caption":
        s.caption = _cp1252_caption(s.caption, rng)
    elif kind == "empty_caption":
        s.caption = rng.choice(("", " ", "  \n", "\t", None))
    elif kind == "boilerplate_caption":
        s.caption = rng.choice(BOILERPLATE_CAPTIONS).format(
            img=f"IMG_{rng.randint(1000, 9999)}.JPG", dsc=f"DSC{rng.randint(10000, 99999)}.jpg"
        )
    elif kind == "repeated_phrase":
        s.caption = " ".join([rng.choice(REPEATED_PHRASES)] * rng.randint(6, 25))
    elif kind == "non_english_caption":
        s.caption = caption_foreign(s.scene, rng.choice(LANGS), rng)
    elif kind == "benchmark_copy":
        item = bench_item(spec.seed, rng.randrange(spec.bench_items))
        s.image, s.fmt, s.width, s.height = plant_image(item["image"], rng)
        s.caption, s.bench_item = _bench_statement(item, rng), item["item_id"]
    else:
        raise ValueError(f"unknown dirt kind {kind!r}")


def image_text_sample(spec: CorpusSpec, source: str, shard: int, i: int, kind: str) -> Sample:
    s, rng = _draft(spec, source, shard, i)
    s.dirt = kind
    apply_dirt(s, rng, spec, source, shard, i)
    return _finish(s)


# --------------------------------------------------------------------------------------------
# Writers (one per format)
# --------------------------------------------------------------------------------------------


WDS_META_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("caption", pa.string()),
        ("url", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("status", pa.string()),
    ]
)
PARQUET_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("caption", pa.string()),
        ("image", pa.binary()),
        ("url", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
    ]
)


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def write_wds_shard(out: Path, spec: CorpusSpec, shard: int) -> ShardResult:
    """An img2dataset-style tar plus its per-shard metadata Parquet (no image bytes)."""
    rel = spec.path("wds", shard)
    res = ShardResult("wds", shard, spec.shard_len("wds", shard), files=[rel, rel[:-4] + ".parquet"])
    meta: dict[str, list] = {name: [] for name in WDS_META_SCHEMA.names}
    with tarfile.open(out / rel, "w", format=tarfile.USTAR_FORMAT) as tar:
        for i, kind in enumerate(shard_plan(spec, "wds", shard)):
            s = image_text_sample(spec, "wds", shard, i, kind)
            info = {
                "key": s.key,
                "caption": s.caption_text,
                "url": SOURCE_URL["wds"].format(key=s.key),
                "width": s.width,
                "height": s.height,
                "status": "success",
            }
            members = {s.ext: s.image, "json": json.dumps(info, ensure_ascii=False).encode()}
            if s.caption is not None:
                members["txt"] = s.caption if isinstance(s.caption, bytes) else s.caption.encode()
            for ext in sorted(members):
                _tar_add(tar, f"{s.key}.{ext}", members[ext])
            for name, column in meta.items():
                column.append(info[name])
            res.truth.append(_truth(rel, i, s.key, "wds", kind, s.dup_of, s.bench_item))
    pq.write_table(pa.table(meta, schema=WDS_META_SCHEMA), out / res.files[1])
    return res


def write_parquet_shard(out: Path, spec: CorpusSpec, shard: int) -> ShardResult:
    """Image bytes inline, row groups of 250 rows, buffered one row group at a time."""
    rel = spec.path("parquet", shard)
    res = ShardResult("parquet", shard, spec.shard_len("parquet", shard), files=[rel])
    with pq.ParquetWriter(out / rel, PARQUET_SCHEMA, write_statistics=["key", "width", "height"]) as writer:
        buf: dict[str, list] = {name: [] for name in PARQUET_SCHEMA.names}
        plan = shard_plan(spec, "parquet", shard)
        for i, kind in enumerate(plan):
            s = image_text_sample(spec, "parquet", shard, i, kind)
            row = {
                "key": s.key,
                "caption": s.caption_text,
                "image": s.image,
                "url": SOURCE_URL["parquet"].format(key=s.key),
                "width": s.width,
                "height": s.height,
            }
            for name, column in buf.items():
                column.append(row[name])
            res.truth.append(_truth(rel, i, s.key, "parquet", kind, s.dup_of, s.bench_item))
            if len(buf["key"]) == PARQUET_ROW_GROUP or i == len(plan) - 1:
                writer.write_table(pa.table(buf, schema=PARQUET_SCHEMA))
                buf = {name: [] for name in PARQUET_SCHEMA.names}
    return res


def write_jsonl_shard(out: Path, spec: CorpusSpec, shard: int) -> ShardResult:
    """One JSON object per line, images in a sibling folder; line-level dirt happens here."""
    rel = spec.path("jsonl", shard)
    res = ShardResult("jsonl", shard, spec.shard_len("jsonl", shard), files=[rel])
    folder = (out / rel).parent
    with open(out / rel, "wb") as f:
        for i, kind in enumerate(shard_plan(spec, "jsonl", shard)):
            s = image_text_sample(spec, "jsonl", shard, i, kind)
            image_rel = f"images/{s.key}.{s.ext}"
            record: dict[str, Any] = {"key": s.key}
            if s.caption is not None:
                record["caption"] = s.caption_text
            record.update(image=image_rel, url=SOURCE_URL["jsonl"].format(key=s.key))
            line = json.dumps(record, ensure_ascii=False)
            data = line.encode("cp1252") if isinstance(s.caption, bytes) else line.encode()
            if kind == "malformed_json":
                data = data[: len(data) * 2 // 3]
            f.write(data + b"\n")
            if kind != "missing_image":
                (folder / image_rel).write_bytes(s.image)
                res.images += 1
            res.truth.append(_truth(rel, i, s.key, "jsonl", kind, s.dup_of, s.bench_item))
    return res
