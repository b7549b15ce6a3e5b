"""What counts as a copy for image dedup: the edits, and the images they are applied to.

Edits, as curation/dedup/image.py's docstring states them (``rng`` seeded per transform and item, so
every run draws the same copies):

* resize: factor 2**U(-1, 1), i.e. 0.5x-2x, bilinear / bicubic / Lanczos;
* JPEG re-encode at quality U{50..95}; PNG -> JPEG (the benchmark is PNG) and JPEG -> PNG;
* crop: U(0, 10%) of the width and, independently, of the height removed in total, split at
  random between the two sides of the axis (left 3% + right 7%, say); ``crop10`` always 10%;
* brightness: PIL ``ImageEnhance.Brightness`` factor U(0.75, 1.25);
* combinations: crop, then resize, then brightness, then JPEG at U{50..95}.

``tests/unit/dedup/test_image.py`` measures recall on these copies; ``benchmarks/bench_phash.py`` imports
them and measures more copies and 5,000 unrelated images.
"""

from __future__ import annotations

import io
import random

from PIL import Image, ImageEnhance

from curation import sample as S

_FILTERS = (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC, Image.Resampling.LANCZOS)


def encode(img: Image.Image, fmt: str = "JPEG", quality: int = 85) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    return buf.getvalue()


def resize(img: Image.Image, rng: random.Random) -> Image.Image:
    f = 2 ** rng.uniform(-1, 1)
    return img.resize((max(1, round(img.width * f)), max(1, round(img.height * f))), rng.choice(_FILTERS))


def crop(img: Image.Image, rng: random.Random, total: float | None = None) -> Image.Image:
    """Remove ``total`` (default U(0, 10%)) of each axis, split at random between its two sides."""
    w, h = img.size
    cx, cy = (rng.uniform(0, 0.1), rng.uniform(0, 0.1)) if total is None else (total, total)
    ux, uy = rng.random(), rng.random()
    return img.crop(
        (round(w * cx * ux), round(h * cy * uy), w - round(w * cx * (1 - ux)), h - round(h * cy * (1 - uy)))
    )


def brighten(img: Image.Image, rng: random.Random) -> Image.Image:
    return ImageEnhance.Brightness(img).enhance(rng.uniform(0.75, 1.25))


def jpeg(img: Image.Image, rng: random.Random) -> bytes:
    return encode(img, quality=rng.randint(50, 95))


TRANSFORMS = {
    "png->jpeg q50-95": jpeg,
    "jpeg->png": lambda i, r: encode(Image.open(io.BytesIO(jpeg(i, r))).convert("RGB"), "PNG"),
    "resize 0.5-2x": lambda i, r: encode(resize(i, r)),
    "crop <=10%": lambda i, r: encode(crop(i, r)),
    "crop 10%": lambda i, r: encode(crop(i, r, 0.1)),
    "brightness 0.75-1.25": lambda i, r: encode(brighten(i, r)),
    "combined": lambda i, r: jpeg(brighten(resize(crop(i, r), r), r), r),
    "combined, crop 10%": lambda i, r: jpeg(brighten(resize(crop(i, r, 0.1), r), r), r),
}


def bench_images(n: int) -> list[tuple[str, bytes]]:
    """The sample benchmark's first ``n`` images, as ``(item_id, png)``."""
    return [(it["item_id"], it["image"]) for it in (S.bench_item(1, k) for k in range(n))]


def copies(bench: list[tuple[str, bytes]], name: str, rep: int = 0) -> list[bytes]:
    """An edited copy of every benchmark image, deterministic per (transform, rep, item)."""
    out = []
    for k, (_, png) in enumerate(bench):
        img = Image.open(io.BytesIO(png)).convert("RGB")
        out.append(TRANSFORMS[name](img, random.Random(f"{name}/{rep}/{k}")))
    return out


def unrelated(n: int, first_seed: int) -> list[bytes]:
    """Corpus-like drawings (JPEG q85, one in 12 PNG), none drawn from a benchmark scene."""
    out = []
    for k in range(n):
        rng = random.Random(first_seed + k)
        img = S.draw_scene(S.make_scene(rng), *S._pick_size(rng))
        out.append(encode(img, "PNG") if k % 12 == 0 else encode(img))
    return out
