"""Scenes: what the sample corpus draws, how it is drawn, and how it is encoded.

A scene is a plain dict: shapes on a background, a house/tree/car composition, or a sign with a phrase.
Centres are fractions of width/height and sizes fractions of the short side, so one scene can be
rendered at any size: that is how tiny/huge/extreme_aspect dirt and near-duplicates keep the same
content, and why a caption generated from the scene (:mod:`curation.sample.captions`) really describes
the picture. Image-text rows, interleaved documents, benchmarks, conversations and videos all draw here.

    >>> scene = make_scene(random.Random(0))
    >>> data = encode_image(draw_scene(scene, 320, 240), "jpeg")
"""

from __future__ import annotations

import functools
import io
import math
import random
import struct
import zlib

from PIL import Image, ImageDraw, ImageFont

from curation.sample.vocabulary import load

_VOCAB = load("scenes")
COLOURS: dict[str, tuple[int, int, int]] = _VOCAB["colours"]
COLOUR_NAMES = tuple(COLOURS)
LIGHT_COLOURS = frozenset(_VOCAB["light_colours"])
SIGN_PHRASES: tuple[str, ...] = _VOCAB["sign_phrases"]
SHAPES = ("circle", "square", "rectangle", "triangle", "star", "ellipse")  # each one is drawn by _draw_shape
JPEG_QUALITY = 85
BOMB_SIDE = 30_000


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
# Rendering and encoding
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
