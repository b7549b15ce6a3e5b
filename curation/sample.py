"""Deterministic sample corpus generator (``curation sample OUT``).

Why this exists: the curation pipeline has to be developed, tested and demonstrated without
anyone's private data. This module writes a corpus that looks like what data teams bring --
img2dataset-style WebDataset tars, Parquet files with image bytes, JSONL with image folders,
OBELICS-style interleaved documents, pure-text JSONL and a small VQA benchmark -- and mixes in
the dirt that real crawls contain (broken images, useless captions, duplicates, benchmark
leakage, ...). Every dirty sample is recorded in ``truth.parquet`` so that filters can be scored
against ground truth rather than eyeballed.

Design constraints and how they are met:

* **Content a caption can describe.** Images are drawn with PIL from a small *scene* description
  (shapes, simple objects, signs with text); clean captions are generated from the same scene,
  so a CLIP-style model can learn to match them, and mismatched captions really are wrong.
* **Determinism.** Every shard has its own ``random.Random`` seeded from xxh64 of
  ``(seed, source, shard)`` (Python's ``hash`` is salted per process), which decides the dirt
  plan of the shard; every row has its own generator seeded from ``(seed, source, shard, row)``.
  A duplicate therefore never needs the *output* of another shard: it re-derives the original
  row from its coordinates. Shards can be written in any order by any number of processes and
  the bytes are identical.
* **Scale without memory.** Nothing holds more than one shard (and Parquet buffers only one
  row group). ``truth.parquet`` is streamed by the parent in canonical order.
"""

from __future__ import annotations

import bisect
import functools
import io
import itertools
import json
import logging
import math
import multiprocessing
import os
import random
import re
import shutil
import struct
import sys
import tarfile
import textwrap
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import xxhash
from PIL import Image, ImageDraw, ImageEnhance, ImageFont
from tqdm import tqdm

__all__ = [
    "DIRT_KINDS",
    "IMAGE_TEXT_SOURCES",
    "SOURCES",
    "CorpusSpec",
    "bench_item",
    "caption_en",
    "draw_scene",
    "make_scene",
    "write_sample_corpus",
]

logger = logging.getLogger(__name__)

FORMAT = "curation.sample/1"

# --------------------------------------------------------------------------------------------
# Corpus layout and dirt rates
# --------------------------------------------------------------------------------------------

SOURCES = ("wds", "parquet", "jsonl", "interleaved", "text", "video")
IMAGE_TEXT_SOURCES = ("wds", "parquet", "jsonl")
SOURCE_SHARE = {"wds": 0.59, "parquet": 0.15, "jsonl": 0.10, "interleaved": 0.08, "text": 0.05, "video": 0.03}
MAX_VIDEOS = 2000  # videos cost ~45 ms each to encode: past this, wds takes the rest of the rows
BENCH_VIDEOS = (10, 100)  # benchmark videos: bench_items // 5, within these bounds
SOURCE_DIR = {
    "wds": "image_text/wds",
    "parquet": "image_text/parquet",
    "jsonl": "image_text/jsonl",
    "interleaved": "interleaved",
    "text": "text",
    "video": "video",
}
SOURCE_EXT = {
    "wds": ".tar",
    "parquet": ".parquet",
    "jsonl": ".jsonl",
    "interleaved": ".jsonl",
    "text": ".jsonl",
    "video": ".jsonl",
}
SOURCE_URL = {
    "wds": "https://example.com/img/{key}.jpg",
    "parquet": "https://example.org/photos/{key}.jpg",
    "jsonl": "https://example.net/media/{key}.jpg",
    "interleaved": "https://example.com/blog/{key}.html",
    "text": "https://example.com/articles/{key}.html",
    "video": "https://example.com/clips/{key}.mp4",
}
KEY_STRIDE = 10_000  # img2dataset keys: shard * 10000 + row, so a shard holds at most 10000 rows
PARQUET_ROW_GROUP = 250
TRUTH_ROW_GROUP = 16_384  # bounds the parent's buffer
JPEG_QUALITY = 85
PNG_SHARE = 0.08
BOMB_SIDE = 30_000
MIN_ROWS_ALL_KINDS = 100  # from this size on, every dirt kind is guaranteed to occur

_COMMON_IMAGE_TEXT_RATES = {
    "mismatched_caption": 0.05,
    "tiny": 0.02,
    "huge": 0.005,
    "extreme_aspect": 0.02,
    "exact_duplicate": 0.03,
    "near_duplicate": 0.02,
    "corrupt_image": 0.01,
    "truncated_image": 0.01,
    "empty_caption": 0.02,
    "boilerplate_caption": 0.02,
    "repeated_phrase": 0.02,
    "non_english_caption": 0.03,
    "benchmark_copy": 0.01,
}
_NON_UTF8 = {"non_utf8_caption": 0.01}  # Parquet strings are UTF-8 by definition: not there
_JSONL_ONLY = {"malformed_json": 0.01, "missing_image": 0.01}
_TEXT_RATES = {
    "exact_duplicate": 0.03,
    "near_duplicate": 0.03,
    "non_english_caption": 0.03,  # kind names are shared with image-text; `source` tells them apart
    "boilerplate_caption": 0.03,
    "benchmark_copy": 0.01,  # a text QA item embedded in the document (re-cased, re-wrapped, edited)
}
BENCHMARK_RATE = 0.01  # default share of rows planted with a benchmark copy, per source (--benchmark-rate)
RATES: dict[str, dict[str, float]] = {
    "wds": {**_COMMON_IMAGE_TEXT_RATES, **_NON_UTF8},
    "parquet": dict(_COMMON_IMAGE_TEXT_RATES),
    "jsonl": {**_COMMON_IMAGE_TEXT_RATES, **_NON_UTF8, **_JSONL_ONLY},
    "interleaved": {"benchmark_copy": 0.01},  # a quiz post: a VQA image (transformed) next to its question
    "text": dict(_TEXT_RATES),
    # a benchmark video re-encoded (codec, size, rate) and trimmed at both ends; a download cut short; a
    # held still picture; black; bytes that are no video; an empty file; audio only. Not dirt: several
    # shots joined by hard cuts, and text burned into the picture.
    "video": {
        "benchmark_copy": 0.01,
        "truncated_video": 0.03,
        "static_video": 0.04,
        "black_video": 0.03,
        "corrupt_video": 0.02,
        "empty_video": 0.01,
        "audio_only": 0.02,
        "multi_shot": 0.15,
        "burned_text": 0.08,
    },
}
# Kinds placed deliberately (once each) in the first rows of a source so that small corpora
# still contain every kind. The decompression bomb is *only* placed this way: exactly one.
FORCED: dict[str, tuple[str, ...]] = {
    "wds": (*_COMMON_IMAGE_TEXT_RATES, *_NON_UTF8, "decompression_bomb"),
    "jsonl": tuple(_JSONL_ONLY),
    "text": tuple(_TEXT_RATES),
    "interleaved": ("benchmark_copy",),
    "video": (
        "benchmark_copy",
        "truncated_video",
        "static_video",
        "black_video",
        "corrupt_video",
        "empty_video",
        "audio_only",
        "multi_shot",
        "burned_text",
    ),
}
DIRT_KINDS = (
    "clean",
    *_COMMON_IMAGE_TEXT_RATES,
    "non_utf8_caption",
    "decompression_bomb",
    "malformed_json",
    "missing_image",
)
VIDEO_DIRT_KINDS = (
    "truncated_video",
    "static_video",
    "black_video",
    "corrupt_video",
    "empty_video",
    "audio_only",
    "multi_shot",
    "burned_text",
)
ALL_DIRT_KINDS = DIRT_KINDS + VIDEO_DIRT_KINDS

# --------------------------------------------------------------------------------------------
# Vocabulary for scenes and captions
# --------------------------------------------------------------------------------------------

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (250, 215, 40),
    "orange": (250, 140, 30),
    "purple": (140, 60, 180),
    "black": (20, 20, 20),
    "white": (245, 245, 245),
    "pink": (250, 160, 200),
    "brown": (130, 80, 40),
    "grey": (128, 128, 128),
}
COLOUR_NAMES = tuple(COLOURS)
LIGHT_COLOURS = frozenset({"white", "yellow", "pink", "orange", "grey"})
SHAPES = ("circle", "square", "rectangle", "triangle", "star", "ellipse")
NUMBERS_EN = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}
SIGN_PHRASES = (
    "OPEN",
    "CLOSED",
    "SALE",
    "EXIT",
    "STOP",
    "OPEN 24 HOURS",
    "WELCOME",
    "NO PARKING",
    "CAFE",
    "HOTEL",
    "PHARMACY",
    "FRESH BREAD",
    "BUS STOP",
    "PIZZA",
    "BOOKS",
    "FOR RENT",
    "KEEP OUT",
    "THANK YOU",
    "HELLO",
    "LIBRARY",
    "BAKERY",
    "FREE WIFI",
    "PARKING",
    "ICE CREAM",
    "SCHOOL",
    "DANGER",
    "ENTRANCE",
    "TAXI",
    "MARKET",
    "GARDEN",
)
BOILERPLATE_CAPTIONS = (
    "Click here to download",
    "stock photo",
    "image not found",
    "Copyright all rights reserved",
    "placeholder image",
    "No description available",
    "untitled",
    "Loading...",
    "thumbnail",
    "Image may be subject to copyright",
    "photo",
    "View full size",
    "{img}",
    "{dsc}",
)
REPEATED_PHRASES = ("best price", "free shipping", "buy now", "cheap", "hot deal", "click here", "sale")


def _rng(*parts: Any) -> random.Random:
    """An independent, reproducible stream for one tuple of coordinates.

    Python's ``hash`` is salted per process, so xxh64 of the coordinates' text is used instead;
    this is what makes output identical whatever process writes a shard.
    """
    return random.Random(xxhash.xxh64_intdigest("/".join(map(str, parts)).encode()))


# --------------------------------------------------------------------------------------------
# Scenes: what is drawn, in coordinates relative to the canvas
# --------------------------------------------------------------------------------------------
# A scene is a plain dict. Centres are fractions of width/height, sizes fractions of the short
# side, so one scene can be rendered at any size (which is how tiny/huge/extreme_aspect dirt and
# near-duplicates keep the same content).


def _background(rng: random.Random, avoid: set[str] = frozenset()) -> tuple:
    """A flat colour or a two-colour gradient, never using a colour the foreground needs."""
    allowed = [c for c in COLOUR_NAMES if c not in avoid]
    if rng.random() < 0.35:
        c1, c2 = rng.sample(allowed, 2)
        return ("gradient", c1, c2, rng.choice("vh"))
    return ("flat", rng.choice(allowed))


def _bg_colours(bg: tuple) -> set[str]:
    return {bg[1]} if bg[0] == "flat" else {bg[1], bg[2]}


def _random_groups(rng: random.Random) -> list[tuple[str, str, int]]:
    """1-5 shapes as (shape, colour, count) groups with distinct (shape, colour) pairs."""
    total = rng.randint(1, 5)
    n_groups = rng.randint(1, min(3, total))
    cuts = sorted(rng.sample(range(1, total), n_groups - 1))
    counts = [b - a for a, b in zip([0, *cuts], [*cuts, total])]
    pairs: list[tuple[str, str]] = []
    while len(pairs) < n_groups:
        pair = (rng.choice(SHAPES), rng.choice(COLOUR_NAMES))
        if pair not in pairs:
            pairs.append(pair)
    return [(s, c, n) for (s, c), n in zip(pairs, counts)]


def make_shape_scene(rng: random.Random, groups: list[tuple[str, str, int]] | None = None) -> dict:
    """Shapes on a background, optionally with a word written above or below them.

    Shapes are placed one per cell of a grid so that none overlap: a caption (or a benchmark
    question) that says "three circles" must be countable in the picture.
    """
    groups = groups or _random_groups(rng)
    total = sum(n for _, _, n in groups)
    bg = _background(rng, avoid={c for _, c, _ in groups})
    label = None
    if rng.random() < 0.2:
        ink = "black" if (_bg_colours(bg) & LIGHT_COLOURS) else "white"
        if ink in _bg_colours(bg):
            ink = "black" if ink == "white" else "white"
        label = (rng.choice(SIGN_PHRASES), ink, rng.choice(("top", "bottom")))
    band = (0.25, 1.0) if label and label[2] == "top" else (0.0, 0.75) if label else (0.0, 1.0)
    grid = 1 if total == 1 else 2 if total <= 4 else 3
    cells = rng.sample([(c, r) for r in range(grid) for c in range(grid)], total)
    band_h = band[1] - band[0]
    r_max = min(1.0, band_h) / grid / 2 / 1.3 * 0.85
    shapes = []
    kinds = [(s, c) for s, c, n in groups for _ in range(n)]
    for (shape, colour), (col, row) in zip(kinds, cells):
        shapes.append(
            {
                "shape": shape,
                "colour": colour,
                "cx": (col + 0.5 + rng.uniform(-0.08, 0.08)) / grid,
                "cy": band[0] + band_h * (row + 0.5 + rng.uniform(-0.08, 0.08)) / grid,
                "r": rng.uniform(0.65, 1.0) * r_max,
                "aspect": rng.uniform(1.7, 2.4),
                "vertical": rng.random() < 0.3,
                "flip": rng.random() < 0.2,
            }
        )
    sizes = [sh["r"] / r_max for sh in shapes]
    size_words = [
        ("small" if s < 0.75 else "large" if s > 0.93 else None) if n == 1 and total > 1 else None
        for (_, _, n), s in zip(groups, _first_of_each(groups, sizes))
    ]
    return {
        "kind": "shapes",
        "bg": bg,
        "shapes": shapes,
        "groups": [(s, c, n, w) for (s, c, n), w in zip(groups, size_words)],
        "label": label,
    }


def _first_of_each(groups: list, values: list) -> list:
    """The value of the first member of every group (shapes are listed group by group)."""
    out, i = [], 0
    for _, _, n in groups:
        out.append(values[i])
        i += n
    return out


def make_objects_scene(rng: random.Random) -> dict:
    """A house / tree / car composition, maybe with a sun, grass and a sky gradient."""
    sky = rng.random() < 0.6
    bg = ("gradient", "blue", "white", "v") if sky else ("flat", rng.choice(("white", "grey", "pink")))
    ground = rng.random() < 0.6
    names = rng.sample(("house", "tree", "car"), rng.randint(1, 3))
    scale = {1: 1.0, 2: 0.85, 3: 0.7}[len(names)]
    objects = []
    for j, name in enumerate(names):
        obj = {"obj": name, "cx": (j + 0.5 + rng.uniform(-0.08, 0.08)) / len(names)}
        if name == "house":
            obj["size"] = rng.uniform(0.24, 0.38) * scale
            obj["colour"] = rng.choice(("red", "yellow", "blue", "orange", "pink"))
            obj["roof"] = rng.choice([c for c in ("brown", "red", "grey", "black") if c != obj["colour"]])
        elif name == "tree":
            obj["size"] = rng.uniform(0.35, 0.5) * scale
        else:
            obj["size"] = rng.uniform(0.36, 0.5) * scale
            cars = ("red", "blue", "yellow", "black", "orange", "purple") + (() if ground else ("green",))
            obj["colour"] = rng.choice(cars)
        objects.append(obj)
    sun = None
    if rng.random() < (0.7 if len(names) == 1 else 0.5):
        sun = {"cx": rng.choice((0.14, 0.86)), "cy": 0.15, "r": rng.uniform(0.06, 0.09)}
    return {"kind": "objects", "bg": bg, "sky": sky, "ground": ground, "objects": objects, "sun": sun}


def make_sign_scene(rng: random.Random, phrase: str | None = None) -> dict:
    """A sign board with a phrase on it; the text is rendered with PIL's FreeType default font."""
    board = rng.choice(("red", "green", "blue", "black", "white", "yellow", "orange", "brown", "purple"))
    if board in LIGHT_COLOURS:
        ink = "black"
    elif board in ("blue", "black", "green", "purple"):
        ink = rng.choice(("white", "white", "yellow"))
    else:
        ink = "white"
    bg = _background(rng, avoid={board, ink})
    return {
        "kind": "sign",
        "bg": bg,
        "phrase": phrase or rng.choice(SIGN_PHRASES),
        "board": board,
        "ink": ink,
        "cx": 0.5 + rng.uniform(-0.05, 0.05),
        "cy": rng.uniform(0.38, 0.5),
        "w": rng.uniform(0.65, 0.88),
        "h": rng.uniform(0.25, 0.4),
        "post": rng.random() < 0.5,
    }


def make_scene(rng: random.Random) -> dict:
    """A random scene: half shape compositions, a quarter objects, a quarter signs."""
    u = rng.random()
    if u < 0.5:
        return make_shape_scene(rng)
    if u < 0.75:
        return make_objects_scene(rng)
    return make_sign_scene(rng)


def _pick_size(rng: random.Random) -> tuple[int, int]:
    """Mostly 96-512 px per side, aspect between 1:2 and 2:1 (log-uniform, like web images)."""
    side = math.exp(rng.uniform(math.log(96), math.log(448)))
    aspect = math.exp(rng.uniform(-math.log(2), math.log(2)))
    w = int(min(512, max(96, side * math.sqrt(aspect))))
    h = int(min(512, max(96, side / math.sqrt(aspect))))
    return w, h


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


@functools.cache
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _text(
    draw: ImageDraw.ImageDraw, phrase: str, x: float, y: float, max_w: float, max_h: float, ink: str
) -> None:
    """Draw ``phrase`` centred on (x, y), as large as fits into max_w x max_h."""
    size = max(4, int(max_h))
    length = _font(size).getlength(phrase)
    if length > max_w:
        size = max(4, int(size * max_w / length))
    draw.text((x, y), phrase, font=_font(size), fill=COLOURS[ink], anchor="mm")


def _draw_shape(draw: ImageDraw.ImageDraw, sh: dict, w: int, h: int) -> None:
    s = min(w, h)
    x, y, r = sh["cx"] * w, sh["cy"] * h, sh["r"] * s
    fill = COLOURS[sh["colour"]]
    shape = sh["shape"]
    if shape in ("rectangle", "ellipse"):
        a, b = r * 1.3, r * 1.3 / sh["aspect"]
        if sh["vertical"]:
            a, b = b, a
        box = [x - a, y - b, x + a, y + b]
        (draw.rectangle if shape == "rectangle" else draw.ellipse)(box, fill=fill)
    elif shape == "circle":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
    elif shape == "square":
        draw.rectangle([x - 0.9 * r, y - 0.9 * r, x + 0.9 * r, y + 0.9 * r], fill=fill)
    elif shape == "triangle":
        sign = -1 if sh["flip"] else 1
        base = y + sign * 0.8 * r
        draw.polygon([(x, y - sign * r), (x - 0.95 * r, base), (x + 0.95 * r, base)], fill=fill)
    elif shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else 0.45 * r
            ang = -math.pi / 2 + k * math.pi / 5
            pts.append((x + rad * math.cos(ang), y + rad * math.sin(ang)))
        draw.polygon(pts, fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _draw_object(draw: ImageDraw.ImageDraw, obj: dict, w: int, h: int, base: float) -> None:
    s = obj["size"] * min(w, h)
    x = obj["cx"] * w
    if obj["obj"] == "house":
        draw.rectangle([x - s / 2, base - s, x + s / 2, base], fill=COLOURS[obj["colour"]])
        roof = [(x - 0.6 * s, base - s), (x + 0.6 * s, base - s), (x, base - 1.55 * s)]
        draw.polygon(roof, fill=COLOURS[obj["roof"]])
        draw.rectangle([x - 0.1 * s, base - 0.4 * s, x + 0.1 * s, base], fill=COLOURS["brown"])
    elif obj["obj"] == "tree":
        draw.rectangle([x - 0.06 * s, base - 0.5 * s, x + 0.06 * s, base], fill=COLOURS["brown"])
        cy, rr = base - 0.8 * s, 0.35 * s
        draw.ellipse([x - rr, cy - rr, x + rr, cy + rr], fill=COLOURS["green"])
    else:  # car: body + cabin + two black wheels
        fill = COLOURS[obj["colour"]]
        draw.rectangle([x - s / 2, base - 0.3 * s, x + s / 2, base - 0.1 * s], fill=fill)
        draw.rectangle([x - 0.25 * s, base - 0.48 * s, x + 0.2 * s, base - 0.3 * s], fill=fill)
        for wx in (x - 0.3 * s, x + 0.3 * s):
            rr = 0.1 * s
            draw.ellipse([wx - rr, base - 0.1 * s - rr, wx + rr, base - 0.1 * s + rr], fill=COLOURS["black"])


def draw_scene(scene: dict, width: int, height: int) -> Image.Image:
    """Render a scene at any size. The single drawing entry point for corpus and benchmark."""
    bg = scene["bg"]
    if bg[0] == "flat":
        img = Image.new("RGB", (width, height), COLOURS[bg[1]])
    else:  # a 2-pixel image stretched bilinearly is the cheapest gradient PIL can make
        _, c1, c2, direction = bg
        seed_img = Image.new("RGB", (1, 2) if direction == "v" else (2, 1), COLOURS[c1])
        seed_img.putpixel((0, 1) if direction == "v" else (1, 0), COLOURS[c2])
        img = seed_img.resize((width, height), Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(img)
    s = min(width, height)
    kind = scene["kind"]
    if kind == "shapes":
        for sh in scene["shapes"]:
            _draw_shape(draw, sh, width, height)
        if scene["label"]:
            phrase, ink, where = scene["label"]
            y = height * (0.12 if where == "top" else 0.88)
            _text(draw, phrase, width / 2, y, width * 0.9, height * 0.14, ink)
    elif kind == "objects":
        if scene["ground"]:
            draw.rectangle([0, height * 0.75, width, height], fill=COLOURS["green"])
        base = height * (0.84 if scene["ground"] else 0.9)
        sun = scene["sun"]
        if sun:
            x, y, r = sun["cx"] * width, sun["cy"] * height, sun["r"] * s
            for k in range(8):
                ang = k * math.pi / 4
                draw.line(
                    [
                        (x + 1.3 * r * math.cos(ang), y + 1.3 * r * math.sin(ang)),
                        (x + 1.8 * r * math.cos(ang), y + 1.8 * r * math.sin(ang)),
                    ],
                    fill=COLOURS["yellow"],
                    width=max(1, int(r / 5)),
                )
            draw.ellipse([x - r, y - r, x + r, y + r], fill=COLOURS["yellow"])
        for obj in scene["objects"]:
            _draw_object(draw, obj, width, height, base)
    elif kind == "sign":
        x, y = scene["cx"] * width, scene["cy"] * height
        bw, bh = scene["w"] * width / 2, scene["h"] * height / 2
        if scene["post"]:
            draw.rectangle([x - 0.03 * s, y, x + 0.03 * s, height], fill=COLOURS["grey"])
        draw.rectangle(
            [x - bw, y - bh, x + bw, y + bh],
            fill=COLOURS[scene["board"]],
            outline=COLOURS["black"],
            width=max(1, s // 100),
        )
        _text(draw, scene["phrase"], x, y, bw * 1.8, bh * 1.2, scene["ink"])
    else:
        raise ValueError(f"unknown scene kind {kind!r}")
    return img


def _scaled(img: Image.Image, factor: float) -> Image.Image:
    size = (max(1, round(img.width * factor)), max(1, round(img.height * factor)))
    return img.resize(size, Image.Resampling.BILINEAR)


def encode_image(img: Image.Image, fmt: str, quality: int = JPEG_QUALITY) -> bytes:
    buf = io.BytesIO()
    if fmt == "png":
        img.save(buf, "PNG")
    else:
        img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


@functools.lru_cache(maxsize=2)
def decompression_bomb_png(side: int = BOMB_SIDE) -> bytes:
    """A valid 1-bit greyscale PNG of side x side pixels, all black, about 110 KB.

    Written by hand, row by row into a zlib stream, so that the 900 MP image never exists in
    memory (here or in PIL). Decoders that trust the header would allocate gigabytes.
    """
    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte 0 + packed zero pixels
    comp = zlib.compressobj(9)
    block = row * 256
    parts = [comp.compress(block if side - y >= 256 else row * (side - y)) for y in range(0, side, 256)]
    parts.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", b"".join(parts))
        + _png_chunk(b"IEND", b"")
    )


# --------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------


def _plural(noun: str) -> str:
    return noun + "es" if noun.endswith("s") else noun + "s"


def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _join_en(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _bg_en(bg: tuple, rng: random.Random) -> str:
    if bg[0] == "flat":
        return _a(f"{bg[1]} background")
    return rng.choice((f"a gradient from {bg[1]} to {bg[2]}", _a(f"{bg[1]}-to-{bg[2]} gradient background")))


def _items_en(groups: list) -> str:
    parts = []
    for shape, colour, n, size in groups:
        if n == 1:
            parts.append(_a(f"{size} {colour} {shape}" if size else f"{colour} {shape}"))
        else:
            parts.append(f"{NUMBERS_EN[n]} {colour} {_plural(shape)}")
    return _join_en(parts)


def _quoted_words(phrase: str) -> tuple[str, str]:
    """('word' | 'words', 'is' | 'are') for a sign phrase."""
    return ("words", "are") if " " in phrase else ("word", "is")


def scene_phrase_en(scene: dict, rng: random.Random) -> str:
    """The core noun phrase describing a scene ("a red circle and two blue squares on ...")."""
    kind = scene["kind"]
    if kind == "shapes":
        return f"{_items_en(scene['groups'])} on {_bg_en(scene['bg'], rng)}"
    if kind == "sign":
        word, _ = _quoted_words(scene["phrase"])
        return rng.choice(
            (
                f"a sign that reads '{scene['phrase']}'",
                _a(f"{scene['board']} sign with the {word} '{scene['phrase']}' in {scene['ink']} letters"),
                _a(f"{scene['board']} board with '{scene['phrase']}' written on it"),
            )
        )
    names = []
    for obj in scene["objects"]:
        if obj["obj"] == "house":
            small = "small " if obj["size"] < 0.22 and rng.random() < 0.6 else ""
            names.append(
                rng.choice(
                    (
                        f"a {small}house",
                        _a(f"{small}{obj['colour']} house"),
                        _a(f"{small}{obj['colour']} house with a {obj['roof']} roof"),
                    )
                )
            )
        elif obj["obj"] == "tree":
            names.append(rng.choice(("a tree", "a green tree")))
        else:
            names.append(rng.choice(("a car", _a(f"{obj['colour']} car"))))
    main = names[0] + "".join(link + name for link, name in zip((" next to ", " and "), names[1:]))
    mods = ["on green grass"] if scene["ground"] else []
    if scene["sun"] and scene["sky"]:
        mods.append(rng.choice(("under a yellow sun and a blue sky", "on a sunny day with a blue sky")))
    elif scene["sun"]:
        mods.append(rng.choice(("under a yellow sun", "on a sunny day", "with a yellow sun in the corner")))
    elif scene["sky"]:
        mods.append("under a blue sky")
    if not scene["sky"]:
        mods.append(("against " if scene["ground"] else "on ") + _a(f"{scene['bg'][1]} background"))
    return " ".join([main, *mods])


def caption_en(scene: dict, rng: random.Random) -> str:
    """A clean English caption derived from the scene, with varied templates."""
    core = scene_phrase_en(scene, rng)
    kind = scene["kind"]
    if kind == "shapes":
        items, bg = core.split(" on ", 1)
        caption = rng.choice(
            (
                f"{_cap(items)} on {bg}.",
                f"{_cap(items)} against {bg}.",
                f"A picture of {items} on {bg}.",
                f"{_cap(bg)} with {items}.",
                f"Simple drawing of {items}.",
                f"Clip art: {items} on {bg}.",
                f"{_cap(items)}.",
            )
        )
        if scene["label"]:
            phrase, _, where = scene["label"]
            word, verb = _quoted_words(phrase)
            caption += f" The {word} '{phrase}' {verb} written at the {where}."
        return caption
    prefix = rng.choice(("", "", "Photo of ", "A drawing of ", "Illustration: ")) if kind == "objects" else ""
    return _cap(prefix + core) + "."


# Other languages: correct content, simpler templates. Each entry: noun forms, colour forms,
# numbers, list joiner, background phrase, templates.
_DE_NOUNS = {
    "circle": ("Kreis", "Kreise", "m"),
    "square": ("Quadrat", "Quadrate", "n"),
    "rectangle": ("Rechteck", "Rechtecke", "n"),
    "triangle": ("Dreieck", "Dreiecke", "n"),
    "star": ("Stern", "Sterne", "m"),
    "ellipse": ("Ellipse", "Ellipsen", "f"),
    "house": ("Haus", "Häuser", "n"),
    "tree": ("Baum", "Bäume", "m"),
    "car": ("Auto", "Autos", "n"),
}
_DE_COLOURS = {
    "red": ("Rot", "rotem"),
    "green": ("Grün", "grünem"),
    "blue": ("Blau", "blauem"),
    "yellow": ("Gelb", "gelbem"),
    "orange": ("Orange", "orangem"),
    "purple": ("Lila", "lila"),
    "black": ("Schwarz", "schwarzem"),
    "white": ("Weiß", "weißem"),
    "pink": ("Rosa", "rosa"),
    "brown": ("Braun", "braunem"),
    "grey": ("Grau", "grauem"),
}
_FR_NOUNS = {
    "circle": ("cercle", "cercles", "m"),
    "square": ("carré", "carrés", "m"),
    "rectangle": ("rectangle", "rectangles", "m"),
    "triangle": ("triangle", "triangles", "m"),
    "star": ("étoile", "étoiles", "f"),
    "ellipse": ("ellipse", "ellipses", "f"),
    "house": ("maison", "maisons", "f"),
    "tree": ("arbre", "arbres", "m"),
    "car": ("voiture", "voitures", "f"),
}
_FR_COLOURS = {
    "red": ("rouge", "rouge"),
    "green": ("vert", "verte"),
    "blue": ("bleu", "bleue"),
    "yellow": ("jaune", "jaune"),
    "orange": ("orange", "orange"),
    "purple": ("violet", "violette"),
    "black": ("noir", "noire"),
    "white": ("blanc", "blanche"),
    "pink": ("rose", "rose"),
    "brown": ("marron", "marron"),
    "grey": ("gris", "grise"),
}
_ES_NOUNS = {
    "circle": ("círculo", "círculos", "m"),
    "square": ("cuadrado", "cuadrados", "m"),
    "rectangle": ("rectángulo", "rectángulos", "m"),
    "triangle": ("triángulo", "triángulos", "m"),
    "star": ("estrella", "estrellas", "f"),
    "ellipse": ("elipse", "elipses", "f"),
    "house": ("casa", "casas", "f"),
    "tree": ("árbol", "árboles", "m"),
    "car": ("coche", "coches", "m"),
}
# (masculine, feminine, masculine plural, feminine plural)
_ES_COLOURS = {
    "red": ("rojo", "roja", "rojos", "rojas"),
    "green": ("verde", "verde", "verdes", "verdes"),
    "blue": ("azul", "azul", "azules", "azules"),
    "yellow": ("amarillo", "amarilla", "amarillos", "amarillas"),
    "orange": ("naranja", "naranja", "naranjas", "naranjas"),
    "purple": ("morado", "morada", "morados", "moradas"),
    "black": ("negro", "negra", "negros", "negras"),
    "white": ("blanco", "blanca", "blancos", "blancas"),
    "pink": ("rosa", "rosa", "rosas", "rosas"),
    "brown": ("marrón", "marrón", "marrones", "marrones"),
    "grey": ("gris", "gris", "grises", "grises"),
}
_ZH_NOUNS = {
    "circle": ("圆形", "个"),
    "square": ("正方形", "个"),
    "rectangle": ("长方形", "个"),
    "triangle": ("三角形", "个"),
    "star": ("五角星", "个"),
    "ellipse": ("椭圆", "个"),
    "house": ("房子", "座"),
    "tree": ("树", "棵"),
    "car": ("汽车", "辆"),
}
_ZH_COLOURS = {
    "red": "红色",
    "green": "绿色",
    "blue": "蓝色",
    "yellow": "黄色",
    "orange": "橙色",
    "purple": "紫色",
    "black": "黑色",
    "white": "白色",
    "pink": "粉色",
    "brown": "棕色",
    "grey": "灰色",
}
_NUMBERS = {
    "de": ("ein", "zwei", "drei", "vier", "fünf"),
    "fr": ("un", "deux", "trois", "quatre", "cinq"),
    "es": ("un", "dos", "tres", "cuatro", "cinco"),
    "zh": ("一", "两", "三", "四", "五"),
}
LANGS = ("de", "fr", "es", "zh")


def _fr_colour(colour: str, gender: str, n: int) -> str:
    word = _FR_COLOURS[colour][gender == "f"]
    if n > 1 and colour not in ("orange", "brown") and not word.endswith("s"):
        word += "s"
    return word


def _item_foreign(lang: str, noun: str, colour: str | None, n: int) -> str:
    """One noun phrase ("zwei Kreise in Rot", "deux carrés bleus", "两个蓝色的正方形")."""
    if lang == "zh":
        word, measure = _ZH_NOUNS[noun]
        return f"{_NUMBERS['zh'][n - 1]}{measure}{_ZH_COLOURS[colour] + '的' if colour else ''}{word}"
    nouns = {"de": _DE_NOUNS, "fr": _FR_NOUNS, "es": _ES_NOUNS}[lang]
    sing, plur, gender = nouns[noun]
    if n == 1:
        num = {
            "de": "eine" if gender == "f" else "ein",
            "fr": "une" if gender == "f" else "un",
            "es": "una" if gender == "f" else "un",
        }[lang]
    else:
        num = _NUMBERS[lang][n - 1]
    head = f"{num} {sing if n == 1 else plur}"
    if not colour:
        return head
    if lang == "de":
        return f"{head} in {_DE_COLOURS[colour][0]}"
    if lang == "fr":
        return f"{head} {_fr_colour(colour, gender, n)}"
    return f"{head} {_ES_COLOURS[colour][(gender == 'f') + 2 * (n > 1)]}"


def _join_foreign(lang: str, parts: list[str]) -> str:
    if len(parts) == 1:
        return parts[0]
    sep, last = {"de": (", ", " und "), "fr": (", ", " et "), "es": (", ", " y "), "zh": ("、", "和")}[lang]
    return sep.join(parts[:-1]) + last + parts[-1]


def _bg_foreign(lang: str, bg: tuple) -> str:
    if bg[0] == "flat":
        c = bg[1]
        return {
            "de": f"auf {_DE_COLOURS[c][1]} Hintergrund",
            "fr": f"sur un fond {_FR_COLOURS[c][0]}",
            "es": f"sobre un fondo {_ES_COLOURS[c][0]}",
            "zh": f"{_ZH_COLOURS[c]}背景上",
        }[lang]
    a, b = bg[1], bg[2]
    fr_de = "d'" if _FR_COLOURS[a][0][0] in "aeiou" else "de "
    return {
        "de": f"auf einem Farbverlauf von {_DE_COLOURS[a][0]} zu {_DE_COLOURS[b][0]}",
        "fr": f"sur un dégradé {fr_de}{_FR_COLOURS[a][0]} à {_FR_COLOURS[b][0]}",
        "es": f"sobre un degradado de {_ES_COLOURS[a][0]} a {_ES_COLOURS[b][0]}",
        "zh": f"从{_ZH_COLOURS[a]}到{_ZH_COLOURS[b]}的渐变背景上",
    }[lang]


def caption_foreign(scene: dict, lang: str, rng: random.Random) -> str:
    """A caption in German, French, Spanish or Chinese that describes the same content."""
    kind = scene["kind"]
    if kind == "sign":
        p = scene["phrase"]
        return {
            "de": f"Ein Schild mit der Aufschrift '{p}'.",
            "fr": f"Un panneau qui indique « {p} ».",
            "es": f"Un letrero que dice «{p}».",
            "zh": f"一个写着“{p}”的标牌。",
        }[lang]
    if kind == "shapes":
        items = _join_foreign(lang, [_item_foreign(lang, s, c, n) for s, c, n, _ in scene["groups"]])
        bg = _bg_foreign(lang, scene["bg"])
        if lang == "zh":
            return rng.choice((f"{bg}有{items}。", f"图中{bg}有{items}。"))
        lead = {
            "de": ("Zu sehen: ", "Ein Bild: ", ""),
            "fr": ("Une image avec ", "Dessin simple : ", ""),
            "es": ("Una imagen con ", "Dibujo simple: ", ""),
        }[lang]
        return _cap(rng.choice(lead) + f"{items} {bg}.")
    items = _join_foreign(lang, [_item_foreign(lang, o["obj"], o.get("colour"), 1) for o in scene["objects"]])
    if lang == "zh":
        return f"图中有{items}" + ("，天上有一个黄色的太阳" if scene["sun"] else "") + "。"
    sun = {"de": " unter einer gelben Sonne", "fr": " sous un soleil jaune", "es": " bajo un sol amarillo"}[
        lang
    ]
    return _cap(items + (sun if scene["sun"] else "") + ".")


def _cp1252_caption(caption: str, rng: random.Random) -> bytes:
    """The caption with typographic characters, encoded as Windows-1252: invalid UTF-8."""
    text = rng.choice((f"“{caption}”", f"{caption} — © Café Müller", f"{caption} (naïve style, à la carte)"))
    data = text.encode("cp1252")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return data
    raise AssertionError("cp1252 caption unexpectedly valid UTF-8")  # pragma: no cover


def _near_caption(caption: str, rng: random.Random) -> str:
    """Same or slightly edited caption, as a re-upload of the same picture would carry."""
    edit = rng.randrange(4)
    if edit == 0:
        return caption
    if edit == 1:
        return caption.rstrip(".").lower()
    if edit == 2:
        return "Photo: " + caption
    return caption.replace(" and ", " & ", 1) if " and " in caption else caption + " HD"


# --------------------------------------------------------------------------------------------
# Benchmark items
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=128)
def bench_item(seed: int, idx: int) -> dict:
    """One VQA item: a scene drawn like corpus images and a question with its answer.

    Pure function of (seed, idx) so that corpus shards can plant copies of benchmark images
    (``benchmark_copy`` dirt) without reading the benchmark files.
    """
    rng = _rng(seed, "benchmark", idx)
    qtype = ("colour", "word", "count")[idx % 3]
    target = rng.choice(SHAPES)
    others = rng.sample([s for s in SHAPES if s != target], rng.randint(0, 2))
    if qtype == "colour":
        colour = rng.choice(COLOUR_NAMES)
        groups = [(target, colour, 1)] + [(s, rng.choice(COLOUR_NAMES), 1) for s in others]
        scene = make_shape_scene(rng, groups)
        question, answer = f"What colour is the {target}?", colour
        options = [colour, *rng.sample([c for c in COLOUR_NAMES if c != colour], 3)]
    elif qtype == "count":
        n = rng.randint(1, 5)
        groups = [(target, rng.choice(COLOUR_NAMES), n)]
        groups += [(s, rng.choice(COLOUR_NAMES), 1) for s in others[: 5 - n]]
        scene = make_shape_scene(rng, groups)
        question, answer = f"How many {_plural(target)} are there?", str(n)
        options = [answer, *rng.sample([str(k) for k in range(1, 7) if k != n], 3)]
    else:
        scene = make_sign_scene(rng)
        answer = scene["phrase"]
        question = f"What {'is' if ' ' in answer else 'word is'} written on the sign?"
        options = [answer, *rng.sample([p for p in SIGN_PHRASES if p != answer], 3)]
    rng.shuffle(options)
    w, h = _pick_size(rng)
    w, h = max(w, 128), max(h, 128)
    return {
        "item_id": f"vqa-{idx + 1:04d}",
        "question": question,
        "answer": answer,
        "options": options,
        "image": encode_image(draw_scene(scene, w, h), "png"),
        "qtype": qtype,
        "subject": target,
    }


def plant_image(data: bytes, rng: random.Random) -> tuple[bytes, str, int, int]:
    """A benchmark image as it leaks into a crawl: cropped, brightened, resized and re-encoded.

    Crop: up to 10% of the width and of the height removed in total, split at random between the two
    sides (left 3% + right 7%, say); half of the copies are not cropped. Brightness x0.75-1.25 on
    half of them; resized x0.75-1.3 on 70%; then JPEG at quality 60-95 (or PNG for 30% of the resized
    ones): never the benchmark's own bytes. Returns (bytes, format, width, height).
    """
    img = Image.open(io.BytesIO(data)).convert("RGB")
    if rng.random() < 0.5:
        cut_w, cut_h = rng.uniform(0, 0.10) * img.width, rng.uniform(0, 0.10) * img.height
        left, top = rng.uniform(0, cut_w), rng.uniform(0, cut_h)
        img = img.crop(
            (round(left), round(top), round(img.width - (cut_w - left)), round(img.height - (cut_h - top)))
        )
    if rng.random() < 0.5:
        img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.75, 1.25))
    resized = rng.random() < 0.7
    if resized:
        img = _scaled(img, rng.uniform(0.75, 1.3))
    fmt = "png" if resized and rng.random() < 0.3 else "jpeg"
    return encode_image(img, fmt, rng.choice((60, 70, 80, 90, 95))), fmt, img.width, img.height


def _bench_statement(item: dict, rng: random.Random) -> str:
    """The item's question and answer reworded as a caption (what leaks into web crawls)."""
    a, s = item["answer"], item["subject"]
    if item["qtype"] == "colour":
        return rng.choice((f"The {s} in this picture is {a}.", f"In this image, the {s} is coloured {a}."))
    if item["qtype"] == "count":
        noun = s if a == "1" else _plural(s)
        verb = "is" if a == "1" else "are"
        return rng.choice((f"There {verb} {a} {noun} in this picture.", f"This image shows {a} {noun}."))
    return rng.choice((f"The sign says '{a}'.", f"A sign with the text '{a}' on it."))


_QA_SLOTS = {
    "name": [
        "Amira Haddad",
        "Jonas Berg",
        "Lucia Moreno",
        "Kenji Sato",
        "Priya Nair",
        "Tomasz Kowalski",
        "Grace Okafor",
        "Mateo Rossi",
        "Ingrid Larsen",
        "Farid Rahimi",
        "Chloe Dubois",
        "Ravi Menon",
        "Sofia Petrova",
        "Daniel Mensah",
        "Hana Novak",
        "Oscar Lindqvist",
        "Leila Karimi",
        "Marcus Webb",
        "Yuki Tanaka",
        "Elena Costa",
        "Samuel Adeyemi",
        "Nora Fischer",
        "Diego Alvarez",
        "Mei Lin",
    ],
    "city": [
        "Lisbon",
        "Kyoto",
        "Vienna",
        "Montreal",
        "Edinburgh",
        "Cape Town",
        "Valparaiso",
        "Tallinn",
        "Porto",
        "Hanoi",
        "Oaxaca",
        "Bergen",
        "Nairobi",
        "Krakow",
        "Adelaide",
        "Quito",
        "Tbilisi",
        "Seville",
        "Galway",
        "Da Nang",
        "Ljubljana",
        "Cusco",
        "Bremen",
        "Marrakesh",
    ],
    "item": [
        "notebooks",
        "lanterns",
        "ceramic bowls",
        "wool scarves",
        "bicycle bells",
        "glass jars",
        "tin whistles",
        "leather wallets",
        "paper kites",
        "copper kettles",
        "oak chairs",
        "silk ribbons",
    ],
    "organism": [
        "pea seedlings",
        "fruit flies",
        "zebrafish larvae",
        "snails",
        "yeast cultures",
        "bean plants",
        "honey bees",
        "tadpoles",
        "earthworms",
        "moss samples",
    ],
    "factor": [
        "the amount of light",
        "the water temperature",
        "the salt concentration",
        "the soil acidity",
        "the length of the day",
        "the humidity of the air",
        "the type of food",
        "the noise level",
    ],
    "result": [
        "grew taller",
        "moved less",
        "lived longer",
        "changed colour",
        "produced more offspring",
        "lost weight",
        "became more active",
        "stopped feeding",
    ],
    "object": [
        "the bronze bell",
        "the stone fountain",
        "the clock tower",
        "the old printing press",
        "the ship's anchor",
        "the marble statue",
        "the wooden carousel",
        "the city archive",
    ],
    "group": [
        "the harbour workers",
        "the town council",
        "the monks",
        "the railway company",
        "the students",
        "the fishermen",
        "the merchants' guild",
        "the volunteer firefighters",
    ],
    "place": [
        "the market square",
        "the river bank",
        "the north gate",
        "the museum courtyard",
        "the main station",
        "the hill above the town",
        "the old harbour",
        "the botanical garden",
    ],
    "reason": [
        "to protect it from floods",
        "to make room for a new road",
        "because the old building burned",
        "after a dispute with the landowner",
        "to attract more visitors",
        "because of a storm",
    ],
    "thing": ["beetle", "orchid", "mineral", "lichen", "river fish", "mountain bird", "fern", "sea snail"],
    "region": [
        "the Andes",
        "the Carpathians",
        "northern Borneo",
        "the Atacama desert",
        "Lapland",
        "the Zagros mountains",
        "Tasmania",
        "the Okavango delta",
    ],
    "unit": ["kilometres", "miles"],
    "currency": ["euros", "dollars", "pounds", "francs"],
}
# [a|b|c] picks one alternative: items from one template then share only short fixed spans, so an item's
# 5-grams are mostly its own and a copy of one item does not look like a copy of its template siblings.
_QA_TEMPLATES = (
    (
        "[A train|An express|A night train|A freight train] [leaves|departs from|sets off from] {city} at {h1}:{m1} "
        "and [travels|covers|runs] {n1} {unit} to {city2} [at an average speed of|averaging|at a steady] {n2} {unit} "
        "[per hour|an hour]. [At what time does it reach|When does it arrive in|What time is it when it gets to] "
        "{city2}?",
        "time",
    ),
    (
        "{name} [bought|ordered|purchased] {n1} {item} [for|at] {n2} {currency} each [at a market in|from a "
        "workshop in|online from a shop in] {city} and [later sold|resold|sold] [all of them|the whole lot|every one "
        "of them] in {city2} for {n3} {currency} each. [How much profit did {name} make|What was the total profit "
        "of {name}|How much did {name} earn after costs]?",
        "money",
    ),
    (
        "[In an experiment run by|In a study led by|During a trial designed by] {name}, {n1} {organism} [were split "
        "into two groups|were divided into two sets|went into two tanks] and [kept|observed|grown] for {n2} days; "
        "only {factor} [differed|was different|changed] between [the groups|them]. The [first|second] group "
        "{result}. [Which variable was manipulated|What did {name} vary|Which condition was changed]?",
        "factor",
    ),
    (
        "[According to the local chronicle of|The town records of|An old guidebook to] {city} [say that|state "
        "that|report that] {group} moved {object} to {place} in {year}. [Which reason does the chronicle give for "
        "moving|Why did they move|What was the reason for relocating] {object}?",
        "reason",
    ),
    (
        "[Which|What] {thing} was [first described|first recorded|named] by {name} after [an expedition|a long "
        "journey|a field trip] to {region} in {year}[, and later named after the village where the first specimen "
        "was kept| together with {name2}| with help from local guides]?",
        "person",
    ),
    (
        "A [water tank|rain barrel|cistern|reservoir] in {city} holds {n1} litres and [is filled at|receives] {n2} "
        "litres per minute [while|but] a leak [removes|loses|drains] {n3} litres per minute. [How many minutes does "
        "it take to fill the empty tank|How long until it is full|After how many minutes is it full]?",
        "number",
    ),
    (
        "{name} and {name2} [share a workshop|run a small business|work together] in {city} [that makes|making|"
        "producing] {item}. {name} [makes|finishes|produces] {n1} [per day|a day|daily] and {name2} {n2}. [How many "
        "{item} do they make together in|What is their joint output of {item} over|How many {item} are ready "
        "after] {n3} days?",
        "number",
    ),
    (
        "[During|At] the [festival|harvest fair|spring parade] in {city} in {year}, {group} [carried|pulled|moved] "
        "{object} from {place} to {place2}. [How long had it stood at|For how many years had it been kept at|How "
        "many years had it spent at] {place} [before the festival|before that day|until then]?",
        "years",
    ),
)
_QA_EDITS = {
    "which": "what",
    "does": "did",
    "how": "so how",
    "the": "this",
    "many": "much",
    "later": "afterwards",
}


@functools.lru_cache(maxsize=256)
def bench_qa_item(seed: int, idx: int) -> dict:
    """One text-only multiple-choice item (MMLU-style export: id, question, choices, answer letter).

    Questions are 25-45 words built from many slots, so two items share few 5-grams even when they
    come from the same template. Pure function of (seed, idx), like :func:`bench_item`.
    """
    rng = _rng(seed, "benchmark-qa", idx)
    template, kind = _QA_TEMPLATES[idx % len(_QA_TEMPLATES)]
    values: dict[str, str] = {}

    def pick(name: str) -> str:
        base = name.rstrip("0123456789")
        used = {v for k, v in values.items() if k.rstrip("0123456789") == base}
        return rng.choice([v for v in _QA_SLOTS[base] if v not in used])

    def repl(m: re.Match) -> str:
        name = m.group(1)
        if name not in values:
            if name in ("h1",):
                values[name] = str(rng.randint(5, 20))
            elif name in ("m1",):
                values[name] = f"{rng.randrange(0, 60, 5):02d}"
            elif name == "year":
                values[name] = str(rng.randint(1650, 1990))
            elif name[0] == "n" and name[1:].isdigit():
                values[name] = str(rng.randint(3, 480))
            else:
                values[name] = pick(name)
        return values[name]

    template = re.sub(r"\[([^\]]*)\]", lambda m: rng.choice(m.group(1).split("|")), template)
    question = re.sub(r"\{(\w+)\}", repl, template)
    question = question[0].upper() + question[1:]
    if kind == "time":
        pool = [f"{rng.randint(6, 23)}:{rng.randrange(0, 60, 5):02d}" for _ in range(12)]
    elif kind == "money":
        pool = [f"{rng.randint(10, 9000)} {values['currency']}" for _ in range(12)]
    elif kind in ("number", "years"):
        pool = [f"{rng.randint(2, 900)}{' years' if kind == 'years' else ''}" for _ in range(12)]
    elif kind == "factor":
        pool = list(_QA_SLOTS["factor"])
    elif kind == "reason":
        pool = list(_QA_SLOTS["reason"])
    else:
        pool = list(_QA_SLOTS["name"])
    choices = rng.sample(sorted(set(pool)), 4)
    answer = rng.randrange(4)
    return {"id": f"qa-{idx + 1:04d}", "question": question, "choices": choices, "answer": "ABCD"[answer]}


def _render_qa(item: dict, rng: random.Random) -> str:
    """A benchmark item as it shows up on the web: labelled, maybe re-cased, re-wrapped or lightly edited."""
    question = item["question"]
    if rng.random() < 0.3:  # one or two words changed: a paraphrased leak
        words = question.split(" ")
        spots = [k for k, w in enumerate(words) if w.lower() in _QA_EDITS]
        for k in rng.sample(spots, min(len(spots), rng.randint(1, 2))):
            words[k] = _QA_EDITS[words[k].lower()]
        question = " ".join(words)
    style = rng.randrange(3)
    letters = "ABCD"
    if style == 0:
        opts = "\n".join(f"{letters[k]}) {c}" for k, c in enumerate(item["choices"]))
        text = f"Question: {question}\n{opts}\nAnswer: {item['answer']}"
    elif style == 1:
        opts = "  ".join(f"({letters[k].lower()}) {c}" for k, c in enumerate(item["choices"]))
        text = f"Q{rng.randint(1, 40)}. {question} {opts}"
    else:
        text = f"{question}\nThe correct answer is {item['choices'][letters.index(item['answer'])]}."
    if rng.random() < 0.3:
        text = text.upper() if rng.random() < 0.5 else text.lower()
    if rng.random() < 0.4:  # re-wrapped at another width, as a PDF or forum quote does
        text = "\n".join(textwrap.wrap(text, width=rng.randint(24, 70)))
    return text


# --------------------------------------------------------------------------------------------
# Plans: which row gets which dirt
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CorpusSpec:
    """Everything a worker needs to produce any shard (small, hashable, picklable)."""

    seed: int
    rows: int
    shard_rows: int
    source_rows: tuple[tuple[str, int], ...]
    bench_items: int
    bench_rate: float = BENCHMARK_RATE

    @classmethod
    def make(cls, rows: int, seed: int, shard_rows: int, bench_rate: float = BENCHMARK_RATE) -> CorpusSpec:
        others = {s: round(rows * SOURCE_SHARE[s]) for s in SOURCES if s != "wds"}
        others["video"] = min(others["video"], MAX_VIDEOS)
        if rows >= MIN_ROWS_ALL_KINDS:  # room for every guaranteed kind, plus a clean first row
            others = {s: max(n, len(FORCED.get(s, ())) + 1) for s, n in others.items()}
        counts = {"wds": rows - sum(others.values()), **others}
        bench = max(20, min(500, rows // 100))
        return cls(seed, rows, shard_rows, tuple((s, counts[s]) for s in SOURCES), bench, bench_rate)

    @property
    def bench_videos(self) -> int:
        return max(BENCH_VIDEOS[0], min(BENCH_VIDEOS[1], self.bench_items // 5))

    def rates(self, source: str) -> dict[str, float]:
        """Dirt rates of a source, with this corpus's benchmark-copy rate."""
        rates = dict(RATES[source])
        if "benchmark_copy" in rates:
            rates["benchmark_copy"] = self.bench_rate
        return rates

    def n(self, source: str) -> int:
        return dict(self.source_rows)[source]

    def n_shards(self, source: str) -> int:
        return -(-self.n(source) // self.shard_rows)

    def shard_len(self, source: str, shard: int) -> int:
        return min(self.shard_rows, self.n(source) - shard * self.shard_rows)

    def path(self, source: str, shard: int) -> str:
        return f"{SOURCE_DIR[source]}/{shard:05d}{SOURCE_EXT[source]}"

    @staticmethod
    def key(shard: int, i: int) -> str:
        return f"{shard * KEY_STRIDE + i:09d}"


@functools.lru_cache(maxsize=16)
def _forced_kinds(spec: CorpusSpec, source: str) -> dict[int, str]:
    """Source-global row index -> kind, for kinds that must occur at least once.

    Placed in the first rows of the source, never on a shard's first row (that row stays clean
    so every duplicate has an earlier clean original in its own shard).
    """
    kinds = FORCED.get(source, ()) if spec.rows >= MIN_ROWS_ALL_KINDS else ()
    if not kinds:
        return {}
    window = min(spec.n(source), max(spec.shard_rows, 4 * len(kinds)))
    eligible = [g for g in range(window) if g % spec.shard_rows]
    if len(eligible) < len(kinds):
        logger.warning("%s: room for %d of %d guaranteed dirt kinds", source, len(eligible), len(kinds))
    rng = _rng(spec.seed, source, "forced")
    positions = rng.sample(eligible, min(len(eligible), len(kinds)))
    return dict(zip(positions, kinds))


@functools.lru_cache(maxsize=64)
def shard_plan(spec: CorpusSpec, source: str, shard: int) -> tuple[str, ...]:
    """The dirt kind of every row of one shard; cheap, so other shards can recompute it."""
    rates = spec.rates(source)
    kinds = list(rates)
    cum = list(itertools.accumulate(rates.values()))
    rng = _rng(spec.seed, source, shard)
    n = spec.shard_len(source, shard)
    plan = ["clean"] * n
    for i in range(1, n):
        k = bisect.bisect_right(cum, rng.random())
        if k < len(kinds):
            plan[i] = kinds[k]
    base = shard * spec.shard_rows
    for g, kind in _forced_kinds(spec, source).items():
        if base <= g < base + n:
            plan[g - base] = kind
    return tuple(plan)


def _pick_original(
    spec: CorpusSpec, source: str, shard: int, i: int, rng: random.Random
) -> tuple[str, int, int]:
    """An earlier clean row to duplicate: same shard, or an earlier shard of the same family.

    "Earlier" follows the canonical order wds < parquet < jsonl, then shard, then row. Text
    duplicates stay within the text source.
    """
    family = IMAGE_TEXT_SOURCES if source in IMAGE_TEXT_SOURCES else (source,)
    before = [(src, spec.n_shards(src)) for src in family[: family.index(source)]] + [(source, shard)]
    n_earlier = sum(n for _, n in before)
    src, sh, limit = source, shard, i
    if n_earlier and rng.random() < 0.4:
        k = rng.randrange(n_earlier)  # index into the earlier shards without listing them
        for src, n in before:
            if k < n:
                sh = k
                break
            k -= n
        limit = spec.shard_len(src, sh)
    plan = shard_plan(spec, src, sh)
    return src, sh, rng.choice([j for j in range(limit) if plan[j] == "clean"])


# --------------------------------------------------------------------------------------------
# Image-text samples
# --------------------------------------------------------------------------------------------


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
# Text documents and interleaved documents
# --------------------------------------------------------------------------------------------

_TOPICS = {
    "gardening": (
        {
            "plant": [
                "tomatoes",
                "basil",
                "roses",
                "carrots",
                "lettuce",
                "strawberries",
                "sunflowers",
                "beans",
                "potatoes",
                "tulips",
                "peppers",
                "courgettes",
                "mint",
                "raspberries",
            ],
            "season": ["spring", "early summer", "autumn", "late winter", "midsummer"],
            "tool": ["trowel", "watering can", "pair of shears", "garden fork", "wheelbarrow", "hoe"],
            "soil": ["sandy", "heavy", "dry", "acidic", "wet", "stony"],
            "pest": ["slugs", "aphids", "snails", "caterpillars", "pigeons"],
        },
        [
            "Many gardeners start planting {plant} in {season}.",
            "{Plant} need plenty of sunlight and regular watering.",
            "If the soil is too {soil}, mix in some compost before planting {plant}.",
            "A good {tool} is enough for most jobs in a small city garden.",
            "Water the {plant} in the morning so the leaves can dry before night.",
            "Our neighbour grows {plant} and {plant2} in large pots on the balcony.",
            "Remove weeds every week, otherwise they will take over the beds next to the {plant}.",
            "In {season}, cover young plants when the nights get cold.",
            "{Pest} love young {plant}, so check the leaves every few days.",
            "We lost half of our {plant} to {pest} last year.",
            "A cheap {tool} broke after two weeks, so buy a sturdy one.",
            "Harvest the {plant} before the first frost in {season}.",
            "Planting {plant} next to {plant2} keeps some {pest} away.",
            "The {soil} corner of the garden is only good for {plant}.",
        ],
    ),
    "cooking": (
        {
            "dish": [
                "tomato soup",
                "pancakes",
                "vegetable curry",
                "banana bread",
                "fried rice",
                "lentil stew",
                "potato salad",
                "apple pie",
                "mushroom risotto",
                "chickpea burgers",
            ],
            "ingredient": [
                "garlic",
                "onions",
                "fresh ginger",
                "butter",
                "lemon juice",
                "black pepper",
                "olive oil",
                "cumin",
                "parsley",
                "brown sugar",
                "sea salt",
                "chilli flakes",
            ],
            "time": ["ten minutes", "half an hour", "about an hour", "twenty minutes", "forty minutes"],
            "tool": ["cast iron pan", "large pot", "baking tray", "blender", "sharp knife"],
        },
        [
            "This recipe for {dish} is quick and cheap.",
            "Start by frying the {ingredient} in a {tool}.",
            "Add the {ingredient} and let everything simmer for {time}.",
            "{Dish} tastes even better on the second day.",
            "If you do not have {ingredient}, you can use {ingredient2} instead.",
            "Serve the {dish} warm with a slice of bread.",
            "Children usually like {dish} because it is mild and a little sweet.",
            "Keep the leftovers in the fridge and eat them within three days.",
            "A {tool} makes the {dish} much easier to prepare.",
            "My grandmother always added a pinch of {ingredient} to her {dish}.",
            "Let the {dish} rest for {time} before you cut it.",
            "Too much {ingredient} will overpower the other flavours.",
            "You can prepare the {dish} a day in advance.",
            "Taste the {dish} and add more {ingredient} if needed.",
        ],
    ),
    "travel": (
        {
            "city": [
                "Lisbon",
                "Kyoto",
                "Vienna",
                "Montreal",
                "Edinburgh",
                "Cape Town",
                "Valparaiso",
                "Tallinn",
                "Porto",
                "Hanoi",
                "Oaxaca",
                "Bergen",
            ],
            "place": [
                "the old harbour",
                "the central market",
                "a hill above the town",
                "the botanical garden",
                "the river bank",
                "the cathedral",
                "the fish market",
                "a small museum",
                "the old town walls",
            ],
            "transport": [
                "the tram",
                "a rented bicycle",
                "the night train",
                "a small ferry",
                "the local bus",
                "a taxi",
            ],
            "food": ["grilled fish", "street noodles", "fresh pastries", "local cheese", "spicy soup"],
        },
        [
            "Last summer we spent a week in {city}.",
            "The best way to get around {city} is {transport}.",
            "In the evening we walked to {place} to watch the sunset.",
            "Many visitors skip {place}, which is a pity.",
            "We took {transport} to {place} and had lunch there.",
            "Prices in {city} were lower than we had expected.",
            "If you only have one day, start early and visit {place} first.",
            "The locals were friendly and happy to give directions.",
            "Do not leave {city} without trying the {food}.",
            "Near {place} there is a stall that sells excellent {food}.",
            "Our hotel was close to {place}, which saved us a lot of time.",
            "It rained on the third day, so we spent the afternoon at {place}.",
            "Tickets for {transport} can be bought at every kiosk.",
            "We would happily go back to {city} next spring.",
        ],
    ),
    "technology": (
        {
            "device": [
                "laptop",
                "phone",
                "router",
                "smart watch",
                "tablet",
                "games console",
                "printer",
                "headset",
            ],
            "problem": [
                "the battery drains quickly",
                "the screen flickers",
                "the connection keeps dropping",
                "updates fail",
                "the fan is loud",
                "the device gets hot",
            ],
            "fix": [
                "restarting it",
                "updating the firmware",
                "resetting the network settings",
                "cleaning the charging port",
                "removing old apps",
                "replacing the cable",
            ],
            "brand": [
                "a small start-up",
                "a large manufacturer",
                "a budget brand",
                "an open hardware project",
            ],
        },
        [
            "A common complaint about a new {device} is that {problem}.",
            "In most cases {fix} solves the problem.",
            "Before you buy a new {device}, check how long it will receive updates.",
            "Our test {device} lasted almost two days on a single charge.",
            "If {problem}, try {fix} before calling support.",
            "Reviews often ignore how easy a {device} is to repair.",
            "Keep a backup of your data in case the {device} stops working.",
            "Cheaper models are often good enough for everyday use.",
            "The {device} we tested was made by {brand}.",
            "Some users report that {problem} after the latest update.",
            "Support suggested {fix}, which worked for us.",
            "A second-hand {device} can be a good deal if the seller is honest.",
            "Battery life matters more than raw speed for most people.",
            "We will publish a longer review of the {device} next month.",
        ],
    ),
    "science": (
        {
            "animal": [
                "octopus",
                "honey bee",
                "crow",
                "dolphin",
                "ant",
                "bat",
                "parrot",
                "squirrel",
                "zebrafish",
            ],
            "ability": [
                "solve simple puzzles",
                "recognise faces",
                "find their way home",
                "use tools",
                "communicate with each other",
                "remember places",
                "count small numbers",
            ],
            "place": ["the laboratory", "the wild", "a large aquarium", "a city park", "a field station"],
            "method": ["video tracking", "small radio tags", "food rewards", "long-term observation"],
        },
        [
            "Researchers have shown that the {animal} can {ability}.",
            "Experiments in {place} suggest that this behaviour is learned.",
            "The {animal} is often underestimated by people.",
            "Scientists still argue about how the {animal} manages to {ability}.",
            "Observations in {place} took more than three years.",
            "Some results were surprising even for experienced biologists.",
            "Further studies will compare the {animal} with the {animal2}.",
            "The findings were published in a peer-reviewed journal.",
            "The team used {method} to follow each {animal}.",
            "Without {method}, the study would not have been possible.",
            "Young animals learned to {ability} faster than adults.",
            "Critics point out that {place} is very different from natural conditions.",
            "The next experiment will test whether the {animal} can {ability} in {place}.",
            "Similar abilities have been reported for the {animal2}.",
        ],
    ),
}
_OPENERS = (
    "",
    "",
    "",
    "",
    "In my experience, ",
    "Honestly, ",
    "As many readers know, ",
    "Of course, ",
    "To be fair, ",
    "Interestingly, ",
    "Most of the time, ",
    "Last time, ",
)
_CLOSERS = (
    "",
    "",
    "",
    "",
    " at least in our experience",
    " which surprised us",
    " as far as we can tell",
    " according to several readers",
    " if you ask me",
    " once again",
)
_FOREIGN_TEXT = {
    "de": (
        {
            "stadt": ["Berlin", "Hamburg", "München", "Leipzig", "Köln"],
            "ding": ["das Fahrrad", "der Garten", "die Küche", "das Wetter", "der Markt"],
        },
        [
            "Am Wochenende waren wir in {stadt} unterwegs.",
            "Das Wetter war besser als erwartet.",
            "In {stadt} gibt es viele kleine Cafés und Buchläden.",
            "Besonders gefallen hat uns {ding}.",
            "Die Preise sind in den letzten Jahren deutlich gestiegen.",
            "Viele Menschen fahren dort mit dem Rad zur Arbeit.",
            "Im Sommer finden zahlreiche Konzerte im Freien statt.",
            "Wir möchten im nächsten Jahr wiederkommen.",
        ],
    ),
    "fr": (
        {
            "ville": ["Paris", "Lyon", "Marseille", "Bordeaux", "Lille"],
            "plat": ["la soupe à l'oignon", "les crêpes", "le gratin dauphinois", "la ratatouille"],
        },
        [
            "Nous avons passé quelques jours à {ville}.",
            "Le marché du samedi est très animé.",
            "Il faut absolument goûter {plat}.",
            "Les transports en commun sont pratiques et peu chers.",
            "Le soir, les terrasses sont pleines de monde.",
            "À {ville}, on peut tout visiter à pied.",
            "La recette de {plat} est simple mais demande du temps.",
            "Nous reviendrons certainement l'année prochaine.",
        ],
    ),
    "zh": (
        {"city": ["北京", "上海", "杭州", "成都", "西安"], "food": ["饺子", "火锅", "包子", "面条"]},
        [
            "上个周末我们去了{city}旅行。",
            "那里的天气比我们想象的要好。",
            "{city}有很多历史悠久的建筑。",
            "我们在小饭馆里吃了{food}，味道非常好。",
            "坐地铁去市中心很方便。",
            "晚上的街道很热闹，到处都是行人。",
            "当地人很友好，经常给我们指路。",
            "我们打算明年再去一次。",
        ],
    ),
}
_BOILERPLATE_LINES = (
    "We use cookies to improve your experience on our website.",
    "By continuing to browse, you agree to our use of cookies.",
    "Home | About us | Contact | Privacy policy | Terms of service",
    "Copyright © 2023 Example Media Group. All rights reserved.",
    "Subscribe to our newsletter to get the latest updates.",
    "Click here to accept all cookies.",
    "Log in | Register | Forgot your password?",
    "Share this page on Facebook, Twitter and LinkedIn.",
    "This page may contain affiliate links.",
    "Page not found. The page you are looking for might have been removed.",
    "JavaScript is disabled in your browser. Please enable it to continue.",
    "Skip to main content",
)
_TYPOS = {"the": "teh", "and": "adn", "with": "wiht", "is": "si", "for": "fro", "you": "yuo", "in": "ni"}


def _fill(template: str, slots: dict[str, list[str]], rng: random.Random) -> str:
    """Fill {slot} / {Slot} (capitalised) / {slot2} (a value other than {slot}'s)."""
    used: dict[str, str] = {}

    def repl(m: re.Match) -> str:
        name = m.group(1)
        base = name.rstrip("0123456789").lower()
        values = [v for v in slots[base] if v != used.get(base)] or slots[base]
        value = used.setdefault(base, rng.choice(values)) if base == name.lower() else rng.choice(values)
        return _cap(value) if name[0].isupper() else value

    return re.sub(r"\{(\w+)\}", repl, template)


def _units(text: str, lang: str) -> int:
    """Length in words; Chinese has no spaces, so two characters count as one word."""
    return len(text) // 2 if lang == "zh" else len(text.split())


def _text_doc(rng: random.Random, lang: str = "en") -> str:
    """50-400 words on one topic, in paragraphs.

    Templates are dealt like cards (no repeat until all are used), each document keeps a few
    slot values (so it stays on one city, one dish, ...), and English sentences get optional
    openers/closers: unrelated documents must not look like near-duplicates of each other.
    """
    if lang == "en":
        slots, templates = _TOPICS[rng.choice(sorted(_TOPICS))]
    else:
        slots, templates = _FOREIGN_TEXT[lang]
    slots = {name: rng.sample(values, min(3, len(values))) for name, values in slots.items()}
    target = rng.randint(50, 400)
    sep = "" if lang == "zh" else " "
    deck: list[str] = []
    paragraphs, para, total = [], [], 0
    while total < target:
        if not deck:
            deck = rng.sample(templates, len(templates))
        sentence = _fill(deck.pop(), slots, rng)
        if lang == "en":
            opener, closer = rng.choice(_OPENERS), rng.choice(_CLOSERS)
            if opener:
                sentence = opener + sentence[0].lower() + sentence[1:]
            sentence = sentence[:-1] + closer + "."
        n = _units(sentence, lang)
        if total + n > 400:
            break
        para.append(sentence)
        total += n
        if len(para) >= rng.randint(3, 6):
            paragraphs.append(sep.join(para))
            para = []
    if para:
        paragraphs.append(sep.join(para))
    return "\n\n".join(paragraphs)


def _boilerplate_doc(rng: random.Random) -> str:
    lines: list[str] = []
    while sum(len(x.split()) for x in lines) < rng.randint(50, 150):
        lines.append(rng.choice(_BOILERPLATE_LINES))
    return "\n".join(lines)


def _near_text(text: str, rng: random.Random) -> str:
    """A few typos and maybe an extra line: what a re-post of the same article looks like."""
    words = text.split(" ")
    for k in rng.sample(range(len(words)), max(1, len(words) // 80)):
        words[k] = _TYPOS.get(words[k], words[k])
    edited = " ".join(words)
    if edited == text or rng.random() < 0.5:
        edited += f"\n\nLast updated: {rng.choice(('March', 'June', 'October'))} {rng.randint(2015, 2024)}."
    return edited


def _text_body(spec: CorpusSpec, shard: int, i: int) -> tuple[str, random.Random]:
    """The clean text of a document (re-derivable, like image-text originals)."""
    rng = _rng(spec.seed, "text", shard, i)
    return _text_doc(rng), rng


def text_document(spec: CorpusSpec, shard: int, i: int, kind: str) -> tuple[dict, str | None, str | None]:
    """A pure-text row, its duplicate-of reference and the benchmark item planted in it (if any)."""
    text, rng = _text_body(spec, shard, i)
    dup_of = bench = None
    if kind in ("exact_duplicate", "near_duplicate"):
        _, sh, j = _pick_original(spec, "text", shard, i, rng)
        original, _ = _text_body(spec, sh, j)
        dup_of = f"{spec.path('text', sh)}#txt-{spec.key(sh, j)}"
        text = original if kind == "exact_duplicate" else _near_text(original, rng)
    elif kind == "non_english_caption":
        text = _text_doc(rng, rng.choice(("de", "fr", "zh")))
    elif kind == "boilerplate_caption":
        text = _boilerplate_doc(rng)
    elif kind == "benchmark_copy":  # a quiz item pasted into an article, or a page holding only the item
        item = bench_qa_item(spec.seed, rng.randrange(spec.bench_items))
        quiz, bench = _render_qa(item, rng), item["id"]
        paragraphs = text.split("\n\n")
        if rng.random() < 0.2:
            paragraphs = []
        paragraphs.insert(rng.randint(0, len(paragraphs)), quiz)
        text = "\n\n".join(paragraphs)
    doc_id = f"txt-{spec.key(shard, i)}"
    return {"id": doc_id, "text": text, "url": SOURCE_URL["text"].format(key=doc_id)}, dup_of, bench


_INTROS = (
    "This week in our drawing class we looked at simple pictures made from basic shapes and bright colours.",
    (
        "Children's art often starts with circles, squares and triangles. "
        "Here are a few examples from our collection."
    ),
    "The following examples come from a worksheet about colours and shapes.",
    "Street signs and simple pictures are a good way to practise reading and naming colours.",
)
_LEADS = (
    "The next picture shows {c}.",
    "Take a look at this image: {c}.",
    "Here we have {c}.",
    "In the image below you can see {c}.",
)
_FILLERS = (
    "Drawing with simple shapes trains the eye and the hand at the same time.",
    "Try to name every colour you see before reading on.",
    "Notice how a few flat colours are enough to make a picture easy to recognise.",
    "Teachers often use such pictures to introduce new words.",
)
_OUTROS = (
    "Try to draw these pictures yourself and compare the colours.",
    "That is all for today. Next time we will add more objects to our drawings.",
    "Share your own drawings with us in the comments.",
)


def _describe_paragraph(scene: dict, rng: random.Random) -> str:
    """A paragraph about one image: the scene phrase plus facts read off the scene."""
    sentences = [_cap(rng.choice(_LEADS).format(c=scene_phrase_en(scene, rng)))]
    if scene["kind"] == "shapes":
        total = sum(n for _, _, n, _ in scene["groups"])
        sentences.append(
            f"There {'is' if total == 1 else 'are'} {NUMBERS_EN[total]} "
            f"shape{'' if total == 1 else 's'} in total."
        )
        shape, colour, n, _ = rng.choice(scene["groups"])
        sentences.append(f"The {shape} is {colour}." if n == 1 else f"The {_plural(shape)} are all {colour}.")
    elif scene["kind"] == "sign":
        board = _a(scene["board"] + " board")
        sentences.append(f"The letters are {scene['ink']} on {board}, which makes them easy to read.")
    else:
        if scene["sun"]:
            sentences.append("The sun is shining in the corner of the picture.")
        for obj in scene["objects"]:
            if obj["obj"] == "house":
                sentences.append(f"The house has {obj['colour']} walls and a {obj['roof']} roof.")
            elif obj["obj"] == "car":
                sentences.append(f"The car is {obj['colour']} and has two black wheels.")
    return " ".join(sentences)


def interleaved_document(
    spec: CorpusSpec, shard: int, i: int, kind: str = "clean"
) -> tuple[dict, list[tuple[str, bytes]], str | None]:
    """An OBELICS-style document: aligned texts/images lists, each image described next to it.

    ``benchmark_copy``: one image is a transformed benchmark image (:func:`plant_image`) and its
    paragraph is the item's question, a quiz post: the (image, question) pair of a VQA item.
    Returns the document, its image files and the planted item's id.
    """
    rng = _rng(spec.seed, "interleaved", shard, i)
    doc_id = f"doc-{spec.key(shard, i)}"
    n_img = rng.randint(1, 3)
    n_par = rng.randint(max(2, n_img), 6)
    extra = n_par - n_img  # paragraphs that are not image descriptions
    texts: list[str | None] = []
    images: list[str | None] = []
    files: list[tuple[str, bytes]] = []
    if extra:
        texts.append(rng.choice(_INTROS))
        images.append(None)
        extra -= 1
    for k in range(n_img):
        scene = make_scene(rng)
        w, h = _pick_size(rng)
        rel = f"images/{doc_id}_{k}.jpg"
        files.append((rel, encode_image(draw_scene(scene, w, h), "jpeg")))
        texts += [_describe_paragraph(scene, rng), None]
        images += [None, rel]
        if extra > 1:
            texts.append(rng.choice(_FILLERS))
            images.append(None)
            extra -= 1
    if extra:
        texts.append(rng.choice(_OUTROS))
        images.append(None)
    bench = None
    if kind == "benchmark_copy":
        item = bench_item(spec.seed, rng.randrange(spec.bench_items))
        k = rng.randrange(n_img)
        data, fmt, _, _ = plant_image(item["image"], rng)
        rel = files[k][0].rsplit(".", 1)[0] + (".png" if fmt == "png" else ".jpg")
        files[k] = (rel, data)
        pos = [j for j, im in enumerate(images) if im is not None][k]
        images[pos] = rel
        quiz = f"Quiz time! {item['question']}"
        if rng.random() < 0.6:
            quiz += " Options: " + ", ".join(item["options"]) + "."
        texts[pos - 1] = quiz  # the paragraph before each image describes it
        bench = item["item_id"]
    url = SOURCE_URL["interleaved"].format(key=doc_id)
    doc = {"id": doc_id, "texts": texts, "images": images, "url": url}
    return doc, files, bench


# --------------------------------------------------------------------------------------------
# Shard writers (one per format)
# --------------------------------------------------------------------------------------------

TRUTH_SCHEMA = pa.schema(
    [
        ("file", pa.string()),
        ("offset", pa.int64()),
        ("key", pa.string()),
        ("source", pa.string()),
        ("dirt", pa.string()),
        ("dup_of", pa.string()),
        ("bench_item", pa.string()),
    ]
)
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
BENCH_SCHEMA = pa.schema(
    [
        ("item_id", pa.string()),
        ("question", pa.string()),
        ("answer", pa.string()),
        ("options", pa.list_(pa.string())),
        ("image", pa.binary()),
    ]
)


@dataclass
class ShardResult:
    source: str
    shard: int
    rows: int
    truth: list[tuple] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    images: int = 0  # loose image files written next to JSONL


def _truth(
    rel: str,
    offset: int,
    key: str,
    source: str,
    dirt: str,
    dup_of: str | None = None,
    bench: str | None = None,
) -> tuple:
    return (rel, offset, key, source, dirt, dup_of, bench)


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


def write_interleaved_shard(out: Path, spec: CorpusSpec, shard: int) -> ShardResult:
    rel = spec.path("interleaved", shard)
    res = ShardResult("interleaved", shard, spec.shard_len("interleaved", shard), files=[rel])
    folder = (out / rel).parent
    with open(out / rel, "w", encoding="utf-8") as f:
        for i, kind in enumerate(shard_plan(spec, "interleaved", shard)):
            doc, files, bench = interleaved_document(spec, shard, i, kind)
            f.write(json.dumps(doc, ensure_ascii=False) + "\n")
            for image_rel, data in files:
                (folder / image_rel).write_bytes(data)
            res.images += len(files)
            res.truth.append(_truth(rel, i, doc["id"], "interleaved", kind, None, bench))
    return res


def write_text_shard(out: Path, spec: CorpusSpec, shard: int) -> ShardResult:
    rel = spec.path("text", shard)
    res = ShardResult("text", shard, spec.shard_len("text", shard), files=[rel])
    with open(out / rel, "w", encoding="utf-8") as f:
        for i, kind in enumerate(shard_plan(spec, "text", shard)):
            doc, dup_of, bench = text_document(spec, shard, i, kind)
            f.write(json.dumps(doc, ensure_ascii=False) + "\n")
            res.truth.append(_truth(rel, i, doc["id"], "text", kind, dup_of, bench))
    return res


def write_benchmark(out: Path, spec: CorpusSpec, shard: int = 0) -> ShardResult:
    """The VQA benchmark as Parquet (PNG bytes inline) and as a JSONL twin with PNG files; the text QA
    benchmark as JSONL (MMLU-style: id, question, choices, answer letter)."""
    res = ShardResult(
        "benchmark", 0, 0, files=["benchmark/vqa.parquet", "benchmark/vqa.jsonl", "benchmark/qa.jsonl"]
    )
    with open(out / "benchmark/qa.jsonl", "w", encoding="utf-8") as f:
        for k in range(spec.bench_items):
            f.write(json.dumps(bench_qa_item(spec.seed, k), ensure_ascii=False) + "\n")
    parquet = pq.ParquetWriter(out / "benchmark/vqa.parquet", BENCH_SCHEMA, write_statistics=["item_id"])
    with parquet as writer, open(out / "benchmark/vqa.jsonl", "w", encoding="utf-8") as f:
        for start in range(0, spec.bench_items, 100):
            items = [bench_item(spec.seed, k) for k in range(start, min(spec.bench_items, start + 100))]
            writer.write_table(
                pa.table(
                    {name: [it[name] for it in items] for name in BENCH_SCHEMA.names}, schema=BENCH_SCHEMA
                )
            )
            for it in items:
                image_rel = f"images/{it['item_id']}.png"
                (out / "benchmark" / image_rel).write_bytes(it["image"])
                record = {k: it[k] for k in ("item_id", "question", "answer", "options")}
                f.write(json.dumps({**record, "image": image_rel}, ensure_ascii=False) + "\n")
            res.images += len(items)
    return res


_VIDEO_QUESTIONS = (
    (
        "Which best describes the camera movement in this clip?",
        ["it pans across a drawing", "it stays still", "it zooms into a face", "it follows a car"],
    ),
    (
        "What kind of scene does the video show?",
        ["simple drawn shapes and signs", "a football match", "a city street at night", "a cooking show"],
    ),
    ("How many seconds does the clip last, roughly?", ["about 5", "about 30", "about 60", "about 120"]),
)
_VIDEO_OVERLAYS = ("SALE", "NEWS", "LIVE", "Coffee", "Station", "Exit", "Market", "Report", "Daily", "Open")
_VIDEO_CAPTIONS = (
    "A short animation panning across simple shapes.",
    "Clip: coloured shapes drift past a sign.",
    "Animated drawing, camera moving slowly to the side.",
    "Shapes moving across a flat background.",
)


def bench_video(seed: int, k: int) -> bytes:
    """Benchmark video ``k`` (its own index range, so corpus videos never equal it by construction)."""
    from curation.sample_video import make_video

    return make_video(seed, 1_000_000 + k)


def write_benchmark_videos(out: Path, spec: CorpusSpec, shard: int = 0) -> ShardResult:
    """A video QA benchmark: JSONL (id, question, options, answer, video path) with mp4 files beside it."""
    res = ShardResult("benchmark_video", 0, 0, files=["benchmark/video_qa.jsonl"])
    with open(out / "benchmark/video_qa.jsonl", "w", encoding="utf-8") as f:
        for k in range(spec.bench_videos):
            rng = _rng(spec.seed, "benchmark-video", k)
            question, options = _VIDEO_QUESTIONS[k % len(_VIDEO_QUESTIONS)]
            rel = f"videos/vid-{k + 1:04d}.mp4"
            (out / "benchmark" / rel).write_bytes(bench_video(spec.seed, k))
            f.write(
                json.dumps(
                    {
                        "id": f"vid-{k + 1:04d}",
                        "question": question,
                        "options": rng.sample(options, len(options)),
                        "answer": options[0],
                        "video": rel,
                    }
                )
                + "\n"
            )
    return res


def write_video_shard(out: Path, spec: CorpusSpec, shard: int) -> ShardResult:
    """Video rows as JSONL (key, caption, video path, url) with the mp4 files in ``clips/``."""
    from curation.io.video import probe
    from curation.sample_video import (
        make_audio_only,
        make_black,
        make_burned_text,
        make_multi_shot,
        make_static,
        make_video,
        other_container,
        reencode,
        truncate,
    )

    rel = spec.path("video", shard)
    res = ShardResult("video", shard, spec.shard_len("video", shard), files=[rel])
    folder = (out / rel).parent
    with open(out / rel, "w", encoding="utf-8") as f:
        for i, kind in enumerate(shard_plan(spec, "video", shard)):
            rng = _rng(spec.seed, "video-row", shard, i)
            key = spec.key(shard, i)
            bench = None
            if kind == "benchmark_copy":
                k = rng.randrange(spec.bench_videos)
                data = bench_video(spec.seed, k)
                duration = probe(data).duration or 3.0
                start, end = rng.uniform(0, 0.3) * duration, duration * (1 - rng.uniform(0, 0.3))
                data, bench = reencode(data, rng, start_s=start, end_s=end), f"vid-{k + 1:04d}"
            idx, ext = shard * KEY_STRIDE + i, "mp4"
            caption = rng.choice(_VIDEO_CAPTIONS)
            if kind == "benchmark_copy":
                pass
            elif kind == "static_video":
                data = make_static(spec.seed, idx)
            elif kind == "black_video":
                data = make_black(spec.seed, idx)
            elif kind == "corrupt_video":
                data = rng.randbytes(rng.randint(500, 4000))
            elif kind == "empty_video":
                data = b""
            elif kind == "audio_only":
                data = make_audio_only(spec.seed, idx)
            elif kind == "multi_shot":
                data = make_multi_shot(spec.seed, idx, rng.randint(2, 3))
            elif kind == "burned_text":
                words = rng.sample(_VIDEO_OVERLAYS, 2)
                data, caption = (
                    make_burned_text(spec.seed, idx, " ".join(words)),
                    f"{caption} Text on screen.",
                )
            else:
                data = make_video(spec.seed, idx)
                if kind == "truncated_video":
                    data = truncate(data, rng)
                elif video_container(spec, shard, i) != "mp4":  # web video comes in other containers too
                    data, ext = other_container(data, video_container(spec, shard, i))
            clip = f"clips/{key}.{ext}"
            (folder / clip).write_bytes(data)
            f.write(
                json.dumps(
                    {
                        "key": key,
                        "caption": caption,
                        "video": clip,
                        "url": SOURCE_URL["video"].format(key=key),
                    }
                )
                + "\n"
            )
            res.truth.append(_truth(rel, i, key, "video", kind, None, bench))
    return res


# --------------------------------------------------------------------------------------------
# Cold-start SFT sources (curation.mix.coldstart, docs/sft-format.md)
# --------------------------------------------------------------------------------------------
# Sized after the Keye-VL cold-start mix (330k non-reasoning : 230k reasoning : 20k auto-think :
# 100k agentic, plus video) at a fifth of ``rows`` (60..1500 rows), so a default corpus holds about a
# thousand conversations. Written after every other source (the video QA rows point at the video
# source's clips); each row draws from its own _rng(seed, "sft", source, row), so the other sources'
# bytes never change. Labels go to sft/truth.parquet: the intended mode, the dirt, and the stage and
# reason that must reject the row (null: kept).

SFT_SHARE = 0.2
SFT_ROWS = (60, 1500)
SFT_MODE_MIX = {"non_thinking": 330, "thinking": 230, "auto_think": 20, "think_with_image": 100, "video": 50}
SFT_SOURCES = ("llava", "sharegpt", "qa", "think_with_image", "video_qa")
SFT_FILES = {
    "llava": "sft/llava/00000.json",
    "sharegpt": "sft/sharegpt/00000.jsonl",
    "qa": "sft/qa/00000.parquet",
    "think_with_image": "sft/think_with_image/00000.jsonl",
    "video_qa": "sft/video_qa/00000.jsonl",
}
# Share of each mode's clean rows that each source holds (every mode's shares add up to 1).
SFT_SPLIT = {
    "llava": {"non_thinking": 0.6, "thinking": 0.2},
    "sharegpt": {"non_thinking": 0.15, "thinking": 0.1},
    "qa": {"non_thinking": 0.25, "thinking": 0.7, "auto_think": 1.0},
    "think_with_image": {"think_with_image": 1.0},
    "video_qa": {"video": 1.0},
}
_TWI = "think_with_image"
# Dirt per source: kind -> (intended mode, stage that must reject it, reason). The code kinds are for
# the think_with_image stage (curation.synth.think_with_image), which runs the code in the sandbox.
SFT_DIRT: dict[str, dict[str, tuple[str, str, str]]] = {
    "llava": {
        "unbalanced_think": ("thinking", "sft_validate", "unbalanced_think_tags"),
        "empty_answer": ("non_thinking", "sft_validate", "empty_answer"),
        "degenerate_repetition": ("non_thinking", "sft_validate", "degenerate_repetition"),
        "placeholder_mismatch": ("non_thinking", "ingest", "placeholder_mismatch"),
        "missing_image": ("non_thinking", "ingest", "missing_image_file"),
        "bad_role_order": ("non_thinking", "ingest", "bad_role_order"),
        "unknown_mode": ("non_thinking", "ingest", "unknown_mode"),
        "suffix_mismatch": ("thinking", "ingest", "mode_suffix_mismatch"),
        "exact_duplicate": ("non_thinking", "exact_dedup", "duplicate"),
    },
    "sharegpt": {
        "image_ref_out_of_range": ("non_thinking", "sft_validate", "image_ref_out_of_range"),
        "malformed_json": ("non_thinking", "ingest", "malformed_row"),
        "unknown_role": ("non_thinking", "ingest", "unknown_role"),
        "empty_conversation": ("non_thinking", "ingest", "empty_conversation"),
    },
    "qa": {
        "empty_answer": ("thinking", "sft_validate", "empty_answer"),
        "unexpected_think": ("non_thinking", "sft_validate", "unexpected_think"),
        "missing_analysis": ("auto_think", "sft_validate", "missing_analysis"),
        "missing_think": ("thinking", "sft_validate", "missing_think"),
        "unknown_mode": ("thinking", "ingest", "unknown_mode"),
        "degenerate_repetition": ("thinking", "sft_validate", "degenerate_repetition"),
        "unbalanced_think": ("thinking", "sft_validate", "unbalanced_think_tags"),
    },
    _TWI: {
        "syntax_error": (_TWI, _TWI, "code_does_not_parse"),
        "raises": (_TWI, _TWI, "sandbox_error"),
        "reads_file": (_TWI, _TWI, "sandbox_blocked"),
        "opens_socket": (_TWI, _TWI, "sandbox_blocked"),
        "no_result": (_TWI, _TWI, "no_output_image"),
        "infinite_loop": (_TWI, _TWI, "sandbox_timeout"),  # exactly one: it costs the sandbox's whole timeout
        "missing_image": (_TWI, "ingest", "missing_image_file"),
        "malformed_json": (_TWI, "ingest", "malformed_row"),
    },
    "video_qa": {
        "missing_video": ("video", "ingest", "missing_video_file"),
        "truncated_video": (
            "video",
            "ingest",
            "unreadable_video",
        ),  # only when the corpus has a truncated clip
    },
}
SFT_DIRT_RATE = 0.03  # rows of each dirt kind per clean row of the source (at least one)
SFT_TRUTH_SCHEMA = pa.schema(
    [
        ("file", pa.string()),
        ("offset", pa.int64()),
        ("key", pa.string()),
        ("source", pa.string()),
        ("mode", pa.string()),
        ("dirt", pa.string()),
        ("stage", pa.string()),
        ("reason", pa.string()),
    ]
)
SFT_QA_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("question", pa.string()),
        ("answer", pa.string()),
        ("reasoning", pa.string()),
        ("analysis", pa.string()),
        ("image", pa.binary()),
        ("mode", pa.string()),
    ]
)

_LOOPS = (
    "Let me look at the picture again to be sure about the answer.",
    "Wait, I should check the colours once more before I answer.",
    "The answer is the same as before, so let me verify it one more time.",
)
_EASY = (
    "This is a simple question that I can answer directly.",
    "The answer can be read straight from the picture, so no step-by-step reasoning is needed.",
    "A direct lookup: there is nothing to work out.",
)
_HARD = (
    "This needs a few steps of calculation, so I will work through it first.",
    "Several numbers have to be combined; I should reason step by step.",
    "It is easy to slip on arithmetic like this, so I will think before answering.",
)
_SYSTEM = "You are a helpful assistant."


def video_container(spec: CorpusSpec, shard: int, i: int) -> str:
    """File extension of a clean video row: a fifth are webm (VP9) or mkv (h264 in Matroska), the rest mp4."""
    r = _rng(spec.seed, "video-container", shard, i).random()
    return "webm" if r < 0.1 else "mkv" if r < 0.2 else "mp4"


def _clips(spec: CorpusSpec, kind: str) -> list[str]:
    """Paths (relative to the corpus) of the video source's clips of one dirt kind, in order."""
    return [
        f"{SOURCE_DIR['video']}/clips/{spec.key(sh, i)}."
        f"{video_container(spec, sh, i) if kind == 'clean' else 'mp4'}"
        for sh in range(spec.n_shards("video"))
        for i, k in enumerate(shard_plan(spec, "video", sh))
        if k == kind
    ]


@functools.lru_cache(maxsize=8)
def sft_plan(spec: CorpusSpec) -> dict[str, tuple[tuple[str, str], ...]]:
    """``(intended mode, dirt kind)`` of every row of every cold-start source; row 0 is always clean."""
    total = min(SFT_ROWS[1], max(SFT_ROWS[0], round(spec.rows * SFT_SHARE)))
    weight = sum(SFT_MODE_MIX.values())
    per_mode = {m: round(total * w / weight) for m, w in SFT_MODE_MIX.items()}
    per_mode["auto_think"] = max(3, per_mode["auto_think"])
    per_mode["video"] = min(per_mode["video"], len(_VIDEO_QA) * len(_clips(spec, "clean")))
    plan = {}
    for source in SFT_SOURCES:
        rows = [
            (mode, "clean")
            for mode, share in SFT_SPLIT[source].items()
            for _ in range(round(per_mode[mode] * share))
        ]
        n_clean = len(rows)
        for kind, (mode, _, _) in SFT_DIRT[source].items():
            if kind == "truncated_video" and not _clips(spec, "truncated_video"):
                continue
            rows += [(mode, kind)] * (
                1 if kind == "infinite_loop" else max(1, round(n_clean * SFT_DIRT_RATE))
            )
        head = rows[:1] if rows and rows[0][1] == "clean" else []
        rest = rows[len(head) :]
        _rng(spec.seed, "sft", source, "plan").shuffle(rest)
        plan[source] = tuple(head + rest)
    return plan


def _scene_qa(scene: dict, rng: random.Random) -> tuple[str, str, str]:
    """A question about a drawn scene, its answer and the reasoning that gets there from the picture."""
    kind = scene["kind"]
    if kind == "shapes":
        groups = scene["groups"]
        if scene["label"] and rng.random() < 0.3:
            phrase, ink, where = scene["label"]
            return (
                "What is written in the picture?",
                f"It says '{phrase}'.",
                f"There is text at the {where} of the image, in {ink} letters. It spells '{phrase}'.",
            )
        shape = rng.choice([s for s, _, _, _ in groups])
        same = [g for g in groups if g[0] == shape]
        n = sum(g[2] for g in same)
        if n == 1 and rng.random() < 0.5:
            colour = same[0][1]
            return (
                f"What colour is the {shape}?",
                f"The {shape} is {colour}.",
                f"There is only one {shape} in the image, and it is filled with {colour}.",
            )
        if rng.random() < 0.5:
            total = sum(g[2] for g in groups)
            counts = " + ".join(str(g[2]) for g in groups)
            answer = f"There {'is' if total == 1 else 'are'} {NUMBERS_EN[total]} in total."
            return (
                "How many shapes are there in total?",
                answer,
                f"The picture shows {_items_en(groups)}. Adding the groups up: {counts} = {total}.",
            )
        noun = shape if n == 1 else _plural(shape)
        return (
            f"How many {_plural(shape)} are there in the picture?",
            f"There {'is' if n == 1 else 'are'} {NUMBERS_EN[n]} {noun}.",
            f"I look for every {shape} in the picture and find {_items_en(same)}. That makes {NUMBERS_EN[n]}.",
        )
    if kind == "sign":
        if rng.random() < 0.6:
            return (
                "What does the sign say?",
                f"The sign says '{scene['phrase']}'.",
                f"The {scene['board']} sign has {scene['ink']} letters on it that spell '{scene['phrase']}'.",
            )
        return (
            "What colour is the sign?",
            f"The sign is {scene['board']}.",
            f"The board in the middle of the picture is painted {scene['board']}, with {scene['ink']} text.",
        )
    names = [o["obj"] for o in scene["objects"]]
    car = next((o for o in scene["objects"] if o["obj"] == "car"), None)
    if car and rng.random() < 0.5:
        return (
            "What colour is the car?",
            f"The car is {car['colour']}.",
            f"The car is the object with two black wheels; its body is {car['colour']}.",
        )
    listed = _join_en([_a(n) for n in names])
    grass = " on green grass" if scene["ground"] else ""
    return (
        "Which objects can you see in this picture?",
        f"I can see {listed}.",
        f"From left to right the drawing shows {listed}{grass}.",
    )


def _text_qa(rng: random.Random, reasoned: bool) -> tuple[str, str, str]:
    """A question without an image: arithmetic, prices, time units, comparisons and number sequences.

    Every kind draws from thousands of parameter combinations, so generated rows are not accidental
    exact duplicates of each other (exact duplicates are planted on purpose, and labelled).
    """
    kind = rng.choice(
        ("add", "mul", "price", "units") if reasoned else ("add", "units", "compare", "sequence")
    )
    if kind == "add":
        a, b = rng.randint(12, 989), rng.randint(12, 989)
        tens = b // 10 * 10
        return (
            f"What is {a} + {b}?",
            f"{a + b}.",
            (
                f"First add the hundreds and tens: {a} + {tens} = {a + tens}. Then add the remaining {b % 10} "
                f"to get {a + b}."
            ),
        )
    if kind == "mul":
        a, b = rng.randint(3, 29), rng.randint(12, 999)
        tens = b // 10 * 10
        return (
            f"What is {a} x {b}?",
            f"{a * b}.",
            (
                f"Split {b} into {tens} and {b % 10}: {a} x {tens} = {a * tens} and {a} x {b % 10} = "
                f"{a * (b % 10)}. Together that is {a * b}."
            ),
        )
    if kind == "price":
        p, n = rng.randint(15, 195), rng.randint(3, 19)
        item = rng.choice(("pencil", "apple", "stamp", "ticket", "notebook", "candle"))
        return (
            f"One {item} costs {p} cents. How much do {n} of them cost?",
            f"{n * p} cents.",
            f"Each {item} costs {p} cents, so {n} of them cost {n} x {p} = {n * p} cents.",
        )
    if kind == "units":
        big, small, per = rng.choice((("hours", "minutes", 60), ("minutes", "seconds", 60)))
        a, b = rng.randint(1, 99), rng.randint(1, 59)
        return (
            f"How many {small} are there in {a} {big} and {b} {small}?",
            f"{a * per + b} {small}.",
            f"Each of the {a} {big} has {per} {small}, which gives {a * per}; adding {b} more makes {a * per + b}.",
        )
    if kind == "compare":
        a, b = rng.sample(range(100, 10_000), 2)
        return (
            f"Which number is larger, {a} or {b}?",
            f"{max(a, b)}.",
            f"{max(a, b)} is larger than {min(a, b)}.",
        )
    a, d = rng.randint(1, 99), rng.randint(2, 15)
    seq = ", ".join(str(a + k * d) for k in range(4))
    return (
        f"What number comes next: {seq}?",
        f"{a + 4 * d}.",
        f"Each number is {d} more than the one before, so the next is {a + 3 * d} + {d} = {a + 4 * d}.",
    )


def _sft_image(rng: random.Random, shapes_only: bool = False) -> tuple[dict, bytes, int, int]:
    scene = make_shape_scene(rng) if shapes_only else make_scene(rng)
    w, h = _pick_size(rng)
    w, h = max(w, 160), max(h, 160)
    return scene, encode_image(draw_scene(scene, w, h), "jpeg"), w, h


def _loop(rng: random.Random) -> str:
    return " ".join([rng.choice(_LOOPS)] * rng.randint(15, 25))


def _reply(answer: str, reasoning: str | None) -> str:
    return f"<think>{reasoning}</think>\n\n{answer}" if reasoning is not None else answer


def _llava_record(spec: CorpusSpec, i: int, mode: str, dirt: str) -> tuple[dict, list[tuple[str, bytes]]]:
    """A LLaVA-Instruct-style record (``image``, ``conversations`` of ``{from, value}``) and its image files."""
    rng = _rng(spec.seed, "sft", "llava", i)
    key = f"llava-{i:05d}"
    think = mode == "thinking"
    layout = rng.choices(("before", "after", "none", "two", "multi"), (55, 10, 15, 10, 10))[0]
    files: list[tuple[str, bytes]] = []
    if layout == "two":
        (s1, img1, _, _), (s2, img2, _, _) = _sft_image(rng, True), _sft_image(rng, True)
        n1, n2 = (sum(g[2] for g in s["groups"]) for s in (s1, s2))
        answer = (
            "The first picture."
            if n1 > n2
            else "The second picture."
            if n2 > n1
            else "Neither: they show the same number."
        )
        turns = [
            (
                "<image>\n<image>\nWhich of the two pictures shows more shapes?",
                answer,
                f"The first picture has {NUMBERS_EN[n1]} and the second has {NUMBERS_EN[n2]}.",
            )
        ]
        files = [(f"images/{key}-0.jpg", img1), (f"images/{key}-1.jpg", img2)]
    else:
        scene, img, _, _ = _sft_image(rng)
        files = [(f"images/{key}.jpg", img)]
        q, a, r = _scene_qa(scene, rng)
        prompt = {"before": f"<image>\n{q}", "after": f"{q}\n<image>", "none": q, "multi": f"<image>\n{q}"}[
            layout
        ]
        turns = [(prompt, a, r)]
        if layout == "multi":
            q2, a2, r2 = _scene_qa(scene, rng)
            turns.append((q2, a2, r2))
    conversations = []
    for q, a, r in turns:
        conversations += [
            {"from": "human", "value": q},
            {"from": "gpt", "value": _reply(a, r if think else None)},
        ]
    images = [rel for rel, _ in files]
    record: dict[str, Any] = {
        "id": key,
        "image": images[0] if len(images) == 1 else images,
        "conversations": conversations,
    }
    last = conversations[-1]
    if dirt == "unbalanced_think":
        last["value"] = last["value"].replace("</think>", "")
    elif dirt == "empty_answer":
        last["value"] = ""
    elif dirt == "degenerate_repetition":
        last["value"] = _loop(rng)
    elif dirt == "placeholder_mismatch":  # two placeholders, one image
        question = conversations[0]["value"].replace("<image>", "").strip()
        conversations[0]["value"] = f"<image>\n<image>\n{question}"
        record["image"], files = images[0], files[:1]
    elif dirt == "missing_image":  # as many images as placeholders, none of them on disk
        missing = [f"images/missing-{key}-{k}.jpg" for k in range(len(images))]
        record["image"], files = missing[0] if len(missing) == 1 else missing, []
    elif dirt == "bad_role_order":
        record["conversations"] = [conversations[1], conversations[0]]
    elif dirt == "unknown_mode":
        record["mode"] = "deep_think"
    elif dirt == "suffix_mismatch":
        conversations[-2]["value"] += " /no_think"
        if "<think>" not in last["value"]:
            last["value"] = _reply(last["value"], turns[-1][2])
    return record, files


def _new_text_qa(rng: random.Random, reasoned: bool, seen: set[str]) -> tuple[str, str, str]:
    """:func:`_text_qa`, drawn again until its question is new to the source: generated rows must not be
    accidental exact duplicates (rows are written in order, so this stays deterministic)."""
    q, a, r = _text_qa(rng, reasoned)
    while q in seen:
        q, a, r = _text_qa(rng, reasoned)
    seen.add(q)
    return q, a, r


def _sharegpt_record(
    spec: CorpusSpec, i: int, mode: str, dirt: str, seen: set[str]
) -> tuple[dict, list[tuple[str, bytes]]]:
    """An OpenAI-style record (``messages`` of ``{role, content}`` with image parts, ``images``)."""
    rng = _rng(spec.seed, "sft", "sharegpt", i)
    key = f"sharegpt-{i:05d}"
    think = mode == "thinking"
    system = rng.random() < 0.3
    files: list[tuple[str, bytes]] = []
    if rng.random() < 0.7:
        scene, img, _, _ = _sft_image(rng)
        q, a, r = _scene_qa(scene, rng)
        files = [(f"images/{key}.jpg", img)]
        user: Any = (
            [{"type": "image", "index": 0}, {"type": "text", "text": q}]
            if rng.random() < 0.7
            else f"<image>{q}"
        )  # llama-factory writes the placeholder into the text
    else:  # with a system turn, which the qa table never has: no accidental duplicate across the two
        q, a, r = _new_text_qa(rng, think, seen)
        user, system = q, True
    messages: list[dict] = [{"role": "system", "content": _SYSTEM}] if system else []
    messages += [
        {"role": "user", "content": user},
        {"role": "assistant", "content": _reply(a, r if think else None)},
    ]
    record: dict[str, Any] = {"id": key, "messages": messages, "images": [rel for rel, _ in files]}
    if dirt == "image_ref_out_of_range":
        messages[-2]["content"] = [{"type": "image", "index": 1}, {"type": "text", "text": q}]
        if not files:
            _, img, _, _ = _sft_image(rng)
            files = [(f"images/{key}.jpg", img)]
            record["images"] = [files[0][0]]
    elif dirt == "unknown_role":
        messages[-1]["role"] = "bot"
    elif dirt == "empty_conversation":
        record["messages"] = []
    return record, files


def _qa_record(spec: CorpusSpec, i: int, mode: str, dirt: str, seen: set[str]) -> dict:
    """A row of the question/answer/reasoning/analysis table (some with an image)."""
    rng = _rng(spec.seed, "sft", "qa", i)
    reasoned = mode == "thinking" or (mode == "auto_think" and rng.random() < 0.5)
    image = None
    if rng.random() < 0.4:
        scene, image, _, _ = _sft_image(rng)
        q, a, r = _scene_qa(scene, rng)
    else:
        q, a, r = _new_text_qa(rng, reasoned, seen)
    row = {
        "id": f"qa-{i:05d}",
        "question": q,
        "answer": a,
        "reasoning": r if reasoned else None,
        "analysis": None,
        "image": image,
        "mode": mode if rng.random() < 0.5 else None,
    }
    if mode == "auto_think":
        row["analysis"] = rng.choice(_HARD if reasoned else _EASY)
    if dirt == "empty_answer":
        row["answer"] = ""
    elif dirt == "unexpected_think":
        row.update(mode="non_thinking", answer=_reply(a, r))
    elif dirt == "missing_analysis":
        row.update(mode="auto_think", analysis=None, reasoning=r)
    elif dirt == "missing_think":
        row.update(mode="thinking", reasoning=None)
    elif dirt == "unknown_mode":
        row["mode"] = "fast_think"
    elif dirt == "degenerate_repetition":
        row["reasoning"] = _loop(rng)
    elif dirt == "unbalanced_think":
        row["reasoning"] = r.replace(". ", ".</think> ", 1) if ". " in r else r + "</think> Done."
    return row


_CORNERS = ("top-left", "top-right", "bottom-left", "bottom-right")
_CODE_CHARS = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"


def _corner_xy(corner: str, w: int, h: int, bw: int, bh: int, rng: random.Random) -> tuple[int, int]:
    mx, my = rng.randint(6, 24), rng.randint(6, 24)
    return (mx if "left" in corner else w - bw - mx), (my if "top" in corner else h - bh - my)


def _twi_task(rng: random.Random) -> tuple[Image.Image, str, str, str, str, tuple[int, int, int, int]]:
    """An image with a detail too small, turned or faint to see at a glance, and code that brings it out:
    ``(image, question, answer, reasoning, code, crop box)``."""
    scene = make_shape_scene(rng) if rng.random() < 0.6 else make_objects_scene(rng)
    w, h = rng.randint(360, 480), rng.randint(270, 360)
    img = draw_scene(scene, w, h)
    draw = ImageDraw.Draw(img)
    task = rng.choice(("zoom", "zoom", "rotate", "enhance", "mark"))
    corner = rng.choice(_CORNERS)
    word = "".join(rng.choice(_CODE_CHARS) for _ in range(rng.randint(3, 4)))
    if task == "rotate":
        font = _font(14)
        tw, th = int(font.getlength(word)) + 8, 20
        strip = Image.new("RGB", (tw, th), COLOURS["white"])
        ImageDraw.Draw(strip).text((4, 2), word, font=font, fill=COLOURS["black"])
        strip = strip.rotate(90, expand=True)  # reads bottom to top
        side = rng.choice(("left", "right"))
        x = 6 if side == "left" else w - strip.width - 6
        y = (h - strip.height) // 2
        img.paste(strip, (x, y))
        box = (max(0, x - 6), max(0, y - 6), min(w, x + strip.width + 6), min(h, y + strip.height + 6))
        code = (
            f"region = image.crop({box})\n"
            "result = region.rotate(-90, expand=True).resize((region.height * 3, region.width * 3))"
        )
        reasoning = (
            f"The text along the {side} edge is turned on its side, so it is hard to read. I will crop "
            "that strip and rotate it upright."
        )
        return (
            img,
            f"Some text runs sideways along the {side} edge. What does it say?",
            f"It says '{word}'.",
            reasoning,
            code,
            box,
        )
    if task == "mark":
        colour = rng.choice(
            ("red", "blue", "green", "purple", "orange", "black")
        )  # on a white patch of its own
        bw = bh = 14
        x, y = _corner_xy(corner, w, h, bw, bh, rng)
        draw.rectangle([x, y, x + bw, y + bh], fill=COLOURS["white"])
        draw.ellipse([x + 4, y + 4, x + bw - 4, y + bh - 4], fill=COLOURS[colour])
        question, answer = f"What colour is the tiny dot near the {corner} corner?", f"The dot is {colour}."
        reasoning = (
            f"There is a tiny dot near the {corner} corner, only a few pixels wide. I will crop around it "
            "and enlarge it to see its colour."
        )
    else:
        size = 9 if task == "zoom" else 14
        font = _font(size)
        bw, bh = int(font.getlength(word)) + 6, size + 6
        x, y = _corner_xy(corner, w, h, bw, bh, rng)
        paper, ink = (
            ((245, 245, 245), COLOURS["black"]) if task == "zoom" else ((200, 200, 200), (186, 186, 186))
        )
        draw.rectangle([x, y, x + bw, y + bh], fill=paper)
        draw.text((x + 3, y + 3), word, font=font, fill=ink)
        if task == "zoom":
            question, answer = (
                f"What is written on the small label in the {corner} corner?",
                f"The label reads '{word}'.",
            )
            reasoning = (
                f"The label in the {corner} corner is only a few pixels tall, too small to read at this "
                "size. I will crop the region around it and enlarge it four times."
            )
        else:
            question, answer = (
                f"There is faint writing in the {corner} corner. What does it say?",
                f"It says '{word}'.",
            )
            reasoning = (
                f"The writing in the {corner} corner is barely darker than its background. Raising the "
                "contrast of that region should make it readable."
            )
    pad = 10
    box = (max(0, x - pad), max(0, y - pad), min(w, x + bw + pad), min(h, y + bh + pad))
    if task == "enhance":
        code = (
            "from PIL import ImageEnhance\n"
            f"region = image.crop({box})\n"
            "result = ImageEnhance.Contrast(region).enhance(6.0).resize((region.width * 3, region.height * 3))"
        )
    else:
        code = f"x0, y0, x1, y1 = {box}\nresult = image.crop((x0, y0, x1, y1)).resize(((x1 - x0) * 4, (y1 - y0) * 4))"
    return img, question, answer, reasoning, code, box


# What the sandbox must refuse or fail on: code for the zoom box, keyed by dirt kind.
_BAD_CODE = {
    "syntax_error": "result = image.crop(({x0}, {y0}, {x1}, {y1}).resize(({dw}, {dh}))",
    "raises": "result = image.crop(({x0}, {y0}, {x1}, {y1})).resize((0, -{dh}))",
    "reads_file": "secret = open('/etc/passwd').read()\nresult = image.crop(({x0}, {y0}, {x1}, {y1}))",
    "opens_socket": (
        "import socket\nconn = socket.create_connection(('example.com', 80), timeout=2)\n"
        "conn.sendall(image.tobytes()[:64])\nresult = image.crop(({x0}, {y0}, {x1}, {y1}))"
    ),
    "no_result": "zoomed = image.crop(({x0}, {y0}, {x1}, {y1})).resize(({dw}, {dh}))",
    "infinite_loop": "while True:\n    pass\nresult = image",
}


def _twi_record(spec: CorpusSpec, i: int, mode: str, dirt: str) -> tuple[dict, list[tuple[str, bytes]]]:
    rng = _rng(spec.seed, "sft", _TWI, i)
    key = f"twi-{i:05d}"
    img, question, answer, reasoning, code, (x0, y0, x1, y1) = _twi_task(rng)
    if dirt in _BAD_CODE:
        code = _BAD_CODE[dirt].format(x0=x0, y0=y0, x1=x1, y1=y1, dw=(x1 - x0) * 4, dh=(y1 - y0) * 4)
    image = f"images/{key}.png"
    files = [(image, encode_image(img, "png"))]
    if dirt == "missing_image":
        image, files = f"images/missing-{key}.png", []
    return {
        "id": key,
        "question": question,
        "answer": answer,
        "reasoning": reasoning,
        "code": code,
        "image": image,
    }, files


_VIDEO_QA = (
    (
        "About how long is this clip?",
        "About {s} seconds.",
        "The sampled frames run from the start to about {d:.1f} seconds, so the clip lasts roughly {s} seconds.",
    ),
    (
        "What does the camera do in this video?",
        "It pans slowly across a drawing of simple shapes, objects and signs.",
        "From frame to frame the whole drawing shifts a little in the same direction: the camera is panning.",
    ),
    (
        "What moves in front of the background?",
        "One or more coloured shapes drift across the view and bounce off its edges.",
        "Besides the panning background, some small shapes change position between frames and turn back at the edges.",
    ),
)


def _video_qa_record(spec: CorpusSpec, i: int, mode: str, dirt: str, out: Path) -> dict:
    from curation.io.video import probe

    rng = _rng(spec.seed, "sft", "video_qa", i)
    clips = _clips(spec, "clean")
    key = f"vqa-{i:05d}"
    if dirt == "missing_video":
        return {
            "id": key,
            "question": _VIDEO_QA[0][0],
            "answer": "About 5 seconds.",
            "video": f"../../{SOURCE_DIR['video']}/clips/missing-{key}.mp4",
        }
    if dirt == "truncated_video":
        clip = _clips(spec, "truncated_video")[0]
        return {"id": key, "question": _VIDEO_QA[1][0], "answer": _VIDEO_QA[1][1], "video": f"../../{clip}"}
    k = sum(1 for _, d in sft_plan(spec)["video_qa"][:i] if d == "clean")  # clean rows before: one question
    clip = clips[k % len(clips)]  # per (clip, question), never twice
    q, a, r = _VIDEO_QA[(k // len(clips)) % len(_VIDEO_QA)]
    d = probe(str(out / clip)).duration or 0.0
    record = {"id": key, "question": q, "answer": a.format(s=round(d)), "video": f"../../{clip}"}
    if rng.random() < 0.4:
        record["reasoning"] = r.format(s=round(d), d=d)
    return record


def write_sft_source(out: Path, spec: CorpusSpec, source: str) -> ShardResult:
    """One cold-start source file (plus its images) and its truth rows."""
    rel = SFT_FILES[source]
    plan = sft_plan(spec)[source]
    res = ShardResult(f"sft_{source}", 0, len(plan), files=[rel])
    folder = (out / rel).parent
    records: list[dict] = []
    seen: set[str] = set()  # text-only questions so far
    for i, (mode, dirt) in enumerate(plan):
        files: list[tuple[str, bytes]] = []
        if source == "llava" and dirt == "exact_duplicate":  # an earlier clean record, re-derived: same bytes
            j = _rng(spec.seed, "sft", "llava", i, "dup").choice(
                [k for k in range(i) if plan[k][1] == "clean"]
            )
            record = dict(_llava_record(spec, j, *plan[j])[0], id=f"llava-{i:05d}")
            mode = plan[j][0]
        elif source == "llava":
            record, files = _llava_record(spec, i, mode, dirt)
        elif source == "sharegpt":
            record, files = _sharegpt_record(spec, i, mode, dirt, seen)
        elif source == "qa":
            record = _qa_record(spec, i, mode, dirt, seen)
        elif source == _TWI:
            record, files = _twi_record(spec, i, mode, dirt)
        else:
            record = _video_qa_record(spec, i, mode, dirt, out)
        for name, data in files:
            (folder / name).write_bytes(data)
        res.images += len(files)
        records.append(record)
        stage, reason = (None, None) if dirt == "clean" else SFT_DIRT[source][dirt][1:]
        res.truth.append((rel, i, record["id"], source, mode, dirt, stage, reason))
    if rel.endswith(".parquet"):
        pq.write_table(pa.Table.from_pylist(records, schema=SFT_QA_SCHEMA), out / rel, row_group_size=64)
    elif rel.endswith(".json"):
        (out / rel).write_text(json.dumps(records, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    else:
        with open(out / rel, "wb") as f:
            for (_, dirt), record in zip(plan, records):
                line = json.dumps(record, ensure_ascii=False).encode()
                f.write((line[: len(line) * 2 // 3] if dirt == "malformed_json" else line) + b"\n")
    return res


def _sft_writer(source: str):
    def write(out: Path, spec: CorpusSpec, shard: int = 0) -> ShardResult:
        return write_sft_source(out, spec, source)

    return write


WRITERS = {
    "wds": write_wds_shard,
    "parquet": write_parquet_shard,
    "jsonl": write_jsonl_shard,
    "interleaved": write_interleaved_shard,
    "text": write_text_shard,
    "benchmark": write_benchmark,
    "benchmark_video": write_benchmark_videos,
    "video": write_video_shard,
    **{f"sft_{source}": _sft_writer(source) for source in SFT_SOURCES},
}


def _run_task(task: tuple[str, CorpusSpec, str, int]) -> ShardResult:
    out, spec, source, shard = task
    return WRITERS[source](Path(out), spec, shard)


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------

_LAYOUT_DIRS = (
    "image_text/wds",
    "image_text/parquet",
    "image_text/jsonl/images",
    "interleaved/images",
    "text",
    "video/clips",
    "benchmark/images",
    "benchmark/videos",
    "sft/llava/images",
    "sft/sharegpt/images",
    "sft/qa",
    "sft/think_with_image/images",
    "sft/video_qa",
)


_LAYOUT_TOP = (
    "image_text",
    "interleaved",
    "text",
    "video",
    "benchmark",
    "sft",
    "truth.parquet",
    "corpus.json",
)


def _prepare_out(out: Path) -> None:
    """Replace an earlier (possibly interrupted) sample corpus, never a folder holding anything else."""
    if out.exists():
        foreign = sorted(p.name for p in out.iterdir() if p.name not in _LAYOUT_TOP)
        if foreign:
            raise FileExistsError(
                f"{out} holds files that are not part of a sample corpus "
                f"({', '.join(foreign[:3])}); refusing to overwrite it"
            )
        for name in _LAYOUT_TOP:
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    for d in _LAYOUT_DIRS:
        (out / d).mkdir(parents=True, exist_ok=True)


def _pool_context() -> multiprocessing.context.BaseContext:
    """fork where available: no re-import of the caller's __main__, workers start in ms."""
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else None)


def write_sample_corpus(
    out: str | Path,
    rows: int = 5000,
    seed: int = 0,
    shard_rows: int = 1000,
    workers: int | None = None,
    progress: bool = True,
    benchmark_rate: float = BENCHMARK_RATE,
) -> dict:
    """Write a deterministic, deliberately dirty multimodal corpus to ``out``.

    ``rows`` is split 60/15/10/8/7 % over WebDataset, Parquet and JSONL image-text,
    interleaved documents and pure text. On top of those, ``sft/`` holds cold-start conversations
    (a fifth of ``rows``, 60..1500, in the five modes; labels in ``sft/truth.parquet``). The output (every byte of it) depends only on
    ``rows``, ``seed`` and ``shard_rows``, not on ``workers``. Returns the summary that is also
    written to ``out/corpus.json``.
    """
    if rows < 1:
        raise ValueError("rows must be >= 1")
    if not 1 <= shard_rows <= KEY_STRIDE:
        raise ValueError(f"shard_rows must be in 1..{KEY_STRIDE} (keys are shard*{KEY_STRIDE}+row)")
    if not 0 <= benchmark_rate <= 0.5:
        raise ValueError(
            "benchmark_rate must be in 0..0.5 (share of rows per source holding a benchmark copy)"
        )
    out = Path(out)
    _prepare_out(out)
    spec = CorpusSpec.make(rows, seed, shard_rows, benchmark_rate)
    canonical = [("benchmark", 0), ("benchmark_video", 0)] + [
        (src, sh) for src in SOURCES for sh in range(spec.n_shards(src))
    ]
    tasks = [(str(out), spec, src, sh) for src, sh in canonical]
    position = {key: k for k, key in enumerate(canonical)}
    n_workers = max(1, min(workers or os.cpu_count() or 1, len(tasks)))

    started = time.perf_counter()
    dirt_by_source: dict[str, Counter] = {src: Counter() for src in SOURCES}
    files: list[str] = []
    images: Counter = Counter()
    pool = _pool_context().Pool(n_workers) if n_workers > 1 else None  # fork before tqdm starts its thread
    try:
        results = pool.imap_unordered(_run_task, tasks) if pool else map(_run_task, tasks)
        bar = tqdm(total=rows, unit="rows", desc="sample corpus", file=sys.stderr, disable=not progress)
        with pq.ParquetWriter(out / "truth.parquet", TRUTH_SCHEMA) as truth_writer, bar:
            pending: dict[int, ShardResult] = {}
            next_k, buffer = 0, []
            for res in results:
                bar.update(res.rows)
                pending[position[(res.source, res.shard)]] = res
                while next_k in pending:  # truth rows go out in canonical order, whoever finished first
                    done = pending.pop(next_k)
                    next_k += 1
                    files += done.files
                    images[SOURCE_DIR.get(done.source, "benchmark")] += done.images
                    for row in done.truth:
                        dirt_by_source[done.source][row[4]] += 1
                    buffer += done.truth
                    if len(buffer) >= TRUTH_ROW_GROUP:
                        truth_writer.write_table(_truth_table(buffer))
                        buffer = []
            if buffer:
                truth_writer.write_table(_truth_table(buffer))
        # Cold-start sources last: the video QA rows point at the clips written above.
        sft_tasks = [(str(out), spec, f"sft_{source}", 0) for source in SFT_SOURCES]
        sft_results = list(pool.imap(_run_task, sft_tasks) if pool else map(_run_task, sft_tasks))
    except BaseException:
        if pool:
            pool.terminate()
        raise
    finally:
        if pool:
            pool.close()
            pool.join()
    elapsed = time.perf_counter() - started
    sft_truth = [row for res in sft_results for row in res.truth]
    pq.write_table(
        pa.Table.from_pylist(
            [dict(zip(SFT_TRUTH_SCHEMA.names, row)) for row in sft_truth], schema=SFT_TRUTH_SCHEMA
        ),
        out / "sft/truth.parquet",
    )
    files += [f for res in sft_results for f in res.files] + ["sft/truth.parquet"]

    totals = Counter()
    for counter in dirt_by_source.values():
        totals.update(counter)
    image_dirs = {
        "image_text/jsonl": "image_text/jsonl/images",
        "interleaved": "interleaved/images",
        "benchmark": "benchmark/images",
    }
    summary = {
        "format": FORMAT,
        "rows": rows,
        "seed": seed,
        "shard_rows": shard_rows,
        "sources": {src: spec.n(src) for src in SOURCES},
        "shards": {src: spec.n_shards(src) for src in SOURCES},
        "dirt": {kind: totals[kind] for kind in ALL_DIRT_KINDS},
        "dirt_by_source": {
            src: {k: c[k] for k in ALL_DIRT_KINDS if c[k]} for src, c in dirt_by_source.items()
        },
        "benchmark": {
            "items": spec.bench_items,
            "parquet": "benchmark/vqa.parquet",
            "jsonl": "benchmark/vqa.jsonl",
            "qa_jsonl": "benchmark/qa.jsonl",
            "video_jsonl": "benchmark/video_qa.jsonl",
            "videos": spec.bench_videos,
            "rate": benchmark_rate,
        },
        "truth": "truth.parquet",
        "files": sorted(files + ["truth.parquet"]),
        "image_files": {image_dirs[d]: images[d] for d in sorted(image_dirs)},
        "sft": {
            "rows": len(sft_truth),
            "truth": "sft/truth.parquet",
            "sources": {source: SFT_FILES[source] for source in SFT_SOURCES},
            "rows_by_source": {res.source.removeprefix("sft_"): res.rows for res in sft_results},
            "clean_by_mode": dict(sorted(Counter(r[4] for r in sft_truth if r[5] == "clean").items())),
            "dirt": dict(sorted(Counter(f"{r[3]}/{r[5]}" for r in sft_truth if r[5] != "clean").items())),
            "image_files": sum(res.images for res in sft_results),
        },
    }
    (out / "corpus.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    logger.info(
        "sample corpus: %d rows, %d files in %.1fs (%.0f rows/s) -> %s",
        rows,
        len(files),
        elapsed,
        rows / elapsed if elapsed else float("inf"),
        out,
    )
    return summary


def _truth_table(rows: list[tuple]) -> pa.Table:
    columns = list(zip(*rows))
    return pa.table({name: list(col) for name, col in zip(TRUTH_SCHEMA.names, columns)}, schema=TRUTH_SCHEMA)
