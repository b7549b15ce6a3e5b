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

from curation.bounds import bounded
from curation.stage import ScoreFilter, first_reason, reason_where, register, unscored


def _clean(e: Exception) -> str:
    """The error text without object addresses, so reject details are the same on every run."""
    return _ADDRESS.sub("", str(e))


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
MAX_DETAIL = 288  # characters of an exception's text kept in the reject detail


@register
class ImageDecode(ScoreFilter):
    """Decode every image; reject missing, undecodable and truncated ones and decompression bombs.

    Interleaved documents are rejected when any of their images fails, with the image's position in
    the detail (``image 2: ...``); their score is the largest image's pixel count.

    Writes ``width``, ``height``, ``image_format`` and ``score_image_decode`` (pixels declared by the
    header). The pixel limit is checked on the header *before* decoding, so a 30000x30000 PNG of a few
    kilobytes costs nothing. ``full_decode: false`` decodes JPEGs at 1/8 scale (libjpeg's DCT scaling):
    every byte of entropy-coded data is still read, so truncation is still caught, at a fraction of the cost.
    """

    name: ClassVar[str] = "image_decode"
    reads: ClassVar[tuple[str, ...]] = ("image",)
    writes: ClassVar[tuple[str, ...]] = ("width", "height", "image_format")
    default_modalities: ClassVar[tuple[str, ...]] = ("image_text", "interleaved")

    # Pillow's own bomb threshold (about 0.25 GB of RGBA); Pillow itself refuses more than twice its
    # PIL.Image.MAX_IMAGE_PIXELS, so a higher max_pixels needs that raised too
    max_pixels: int = bounded(89_478_485, 1, 1 << 34)
    full_decode: bool = False

    def score(self, batch: pa.Table) -> dict[str, pa.Array]:
        n = batch.num_rows
        width, height = np.zeros(n, np.int32), np.zeros(n, np.int32)
        pixels = np.zeros(n, np.float64)
        valid = np.zeros(n, bool)
        sized = np.zeros(n, bool)
        fmts: list[str | None] = [None] * n
        failed: list[str | None] = [None] * n
        detail: list[str | None] = [None] * n
        modality = batch["modality"].to_pylist()
        singles, multis = batch["image"].to_pylist(), batch["images"].to_pylist()
        for i in range(n):
            if modality[i] == "interleaved":  # every image of the document must decode
                images = [(j, d) for j, d in enumerate(multis[i] or []) if d is not None]
                for j, data in images:
                    info, err = self._check(data)
                    if err:
                        failed[i], detail[i] = err[0], f"image {j}: {err[1] or err[0]}"
                        break
                    pixels[i] = max(pixels[i], info[2])
                valid[i] = bool(images) and failed[i] is None
                continue
            if singles[i] is None:
                failed[i] = "missing_image"
                continue
            info, err = self._check(singles[i])
            if err:
                failed[i], detail[i] = err
            if info is not None:
                width[i], height[i], pixels[i], fmts[i] = info
                valid[i] = sized[i] = True
        # every reject is an image that did not decode (a bomb is never decoded): decide() keeps the rest
        return {
            self.score_name: pa.array(pixels, mask=~valid),
            "width": pa.array(width, mask=~sized),
            "height": pa.array(height, mask=~sized),
            "image_format": pa.array(fmts, pa.string()),
            **unscored(failed, detail),
        }

    def _check(self, data: bytes) -> tuple[tuple | None, tuple[str, str] | None]:
        """((width, height, pixels, format) or None, (reason, detail) or None) for one encoded image."""
        try:
            with warnings.catch_warnings():
                # Pillow warns between 1x and 2x its own limit; the check below is ours.
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img = Image.open(io.BytesIO(data))
            with img:
                w, h = img.size
                info = (w, h, float(w) * h, (img.format or "").lower() or None)
                if w * h > self.max_pixels:
                    return info, ("decompression_bomb", f"{w}x{h} exceeds max_pixels={self.max_pixels}")
                if not self.full_decode and img.format == "JPEG":
                    img.draft(img.mode, (max(1, w // 8), max(1, h // 8)))
                img.load()
                return info, None
        except Image.DecompressionBombError as e:  # above 2x Pillow's limit it refuses to open
            return None, ("decompression_bomb", _clean(e))
        except Exception as e:  # noqa: BLE001 - PIL raises many types for bad data
            return None, ("undecodable", f"{type(e).__name__}: {_clean(e)}"[:MAX_DETAIL])


@register
class ImageSize(ScoreFilter):
    """Reject images whose shorter side is below ``min_side`` or longer side above ``max_side``.

    Score: the shorter side. Needs ``image_decode`` earlier in the pipeline (it sets width/height).
    """

    name: ClassVar[str] = "image_size"
    reads: ClassVar[tuple[str, ...]] = ("width", "height")
    default_modalities: ClassVar[tuple[str, ...]] = ("image_text",)

    min_side: int = bounded(32, 0, 65_535)
    max_side: int = bounded(4096, 1, 1_048_576)

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

    max_ratio: float = bounded(3.0, 1, 10_000)

    def score(self, batch):
        w = batch["width"].cast(pa.float64())
        h = batch["height"].cast(pa.float64())
        lo = pc.max_element_wise(pc.min_element_wise(w, h), 1.0)
        return {self.score_name: pc.divide(pc.max_element_wise(w, h), lo)}

    def decide(self, batch, scores):
        return reason_where(pc.greater(scores[self.score_name], self.max_ratio), "aspect_ratio_above_max")
