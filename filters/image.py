"""Image heuristics: decodability (and decompression bombs), side lengths, aspect ratio."""

from __future__ import annotations

import io
import re
import warnings
from typing import ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from curation.stage import ScoreFilter, first_reason, reason_where, register


def _clean(e: Exception) -> str:
    """The error text without object addresses, so reject details are the same on every run."""
    return _ADDRESS.sub("", str(e))


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


@register
class ImageDecode(ScoreFilter):
    """Decode every image; reject missing, undecodable and truncated ones and decompression bombs.

    Writes ``width``, ``height``, ``image_format`` and ``score_image_decode`` (pixels declared by the
    header). The pixel limit is checked on the header *before* decoding, so a 30000x30000 PNG of a few
    kilobytes costs nothing. ``full_decode: false`` decodes JPEGs at 1/8 scale (libjpeg's DCT scaling):
    every byte of entropy-coded data is still read, so truncation is still caught, at a fraction of the cost.
    """

    name: ClassVar[str] = "image_decode"
    reads: ClassVar[tuple[str, ...]] = ("image",)
    writes: ClassVar[tuple[str, ...]] = ("width", "height", "image_format")
    default_modalities: ClassVar[tuple[str, ...]] = ("image_text",)

    max_pixels: int = 89_478_485  # Pillow's own bomb threshold (about 0.25 GB of RGBA); Pillow itself
    # refuses more than twice its PIL.Image.MAX_IMAGE_PIXELS, so a higher max_pixels needs that raised too
    full_decode: bool = False

    def score(self, batch: pa.Table) -> dict[str, pa.Array]:
        n = batch.num_rows
        width, height = np.zeros(n, np.int32), np.zeros(n, np.int32)
        pixels = np.zeros(n, np.float64)
        valid = np.zeros(n, bool)
        fmts: list[str | None] = [None] * n
        self._errors: list[str | None] = [None] * n
        for i, data in enumerate(batch["image"].to_pylist()):
            if data is None:
                self._errors[i] = "missing_image"
                continue
            try:
                with warnings.catch_warnings():
                    # Pillow warns between 1x and 2x its own limit; the check below is ours.
                    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                    img = Image.open(io.BytesIO(data))
                with img:
                    w, h = img.size
                    width[i], height[i], pixels[i], valid[i] = w, h, float(w) * h, True
                    fmts[i] = (img.format or "").lower() or None
                    if w * h > self.max_pixels:
                        self._errors[i] = "decompression_bomb"
                        continue
                    if not self.full_decode and img.format == "JPEG":
                        img.draft(img.mode, (max(1, w // 8), max(1, h // 8)))
                    img.load()
            except Image.DecompressionBombError as e:  # above 2x Pillow's limit it refuses to open
                self._errors[i] = f"decompression_bomb:{_clean(e)}"
            except Exception as e:  # PIL raises many types for bad data
                self._errors[i] = f"undecodable:{type(e).__name__}: {_clean(e)}"[:300]
        return {
            self.score_name: pa.array(pixels, mask=~valid),
            "width": pa.array(width, mask=~valid),
            "height": pa.array(height, mask=~valid),
            "image_format": pa.array(fmts, pa.string()),
        }

    def decide(self, batch, scores):
        reasons = [None if e is None else e.split(":", 1)[0] for e in self._errors]
        details = [None if e is None or ":" not in e else e.split(":", 1)[1] for e in self._errors]
        for i, r in enumerate(reasons):
            if r == "decompression_bomb" and scores["width"][i].is_valid:
                details[i] = f"{int(scores['width'][i].as_py())}x{int(scores['height'][i].as_py())} exceeds max_pixels={self.max_pixels}"
        return pa.array(reasons, pa.string()), pa.array(details, pa.string())


@register
class ImageSize(ScoreFilter):
    """Reject images whose shorter side is below ``min_side`` or longer side above ``max_side``.

    Score: the shorter side. Needs ``image_decode`` earlier in the pipeline (it sets width/height).
    """

    name: ClassVar[str] = "image_size"
    reads: ClassVar[tuple[str, ...]] = ("width", "height")
    default_modalities: ClassVar[tuple[str, ...]] = ("image_text",)

    min_side: int = 32
    max_side: int = 4096

    def score(self, batch):
        return {self.score_name: pc.min_element_wise(batch["width"], batch["height"]).cast(pa.float64())}

    def decide(self, batch, scores):
        longer = pc.max_element_wise(batch["width"], batch["height"])
        return first_reason(
            reason_where(pc.less(scores[self.score_name], self.min_side), "side_below_min"),
            reason_where(pc.greater(longer, self.max_side), "side_above_max"),
        )


@register
class AspectRatio(ScoreFilter):
    """Reject images whose longer/shorter side ratio exceeds ``max_ratio`` (banners, strips)."""

    name: ClassVar[str] = "aspect_ratio"
    reads: ClassVar[tuple[str, ...]] = ("width", "height")
    default_modalities: ClassVar[tuple[str, ...]] = ("image_text",)

    max_ratio: float = 3.0

    def score(self, batch):
        w = batch["width"].cast(pa.float64())
        h = batch["height"].cast(pa.float64())
        lo = pc.max_element_wise(pc.min_element_wise(w, h), 1.0)
        return {self.score_name: pc.divide(pc.max_element_wise(w, h), lo)}

    def decide(self, batch, scores):
        return reason_where(pc.greater(scores[self.score_name], self.max_ratio), "aspect_ratio_above_max")
