"""How Keye-VL's vision tower turns pixels into LLM tokens: patches, merge, resize bounds, token counts.

Keye-VL reads an image as SigLIP 14-pixel patches whose 2x2 neighbourhoods the MLP projector merges
into one LLM token, after a Qwen2-VL-style resize to multiples of 28 pixels (:func:`smart_resize`); a video
is a run of such frames merged in temporal pairs. Counted any other way (bytes, a fixed cost per image),
visual budgets drift from what the trainer sees by tens of percent.

Why it lives here, on the ground floor (:mod:`curation.target`): ingest samples video frames at the sizes
the model will read (:mod:`curation.io.video`), the mixture builder counts tokens with it
(:mod:`curation.mix.tokens`) and the reference trainer resizes images by it (:mod:`curation.train`); it is
the model's input geometry, not any one of those. It depends on the standard library and numpy only.

    >>> visual_tokens(224, 224)
    64
    >>> video_tokens((8, 224, 224))   # 4 frame pairs, each raised to the video minimum: 12 x 12 tokens
    576
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Integral
from typing import Any

import numpy as np

PATCH = 14
MERGE = 2
_UNIT = PATCH * MERGE  # 28: one visual token covers a 28x28 pixel square
MIN_PIXELS = 4 * _UNIT * _UNIT  # 4 tokens: Keye-VL's default lower bound per image
MAX_PIXELS = 16384 * _UNIT * _UNIT  # 16,384 tokens: its default upper bound per image
# Video frames are bounded tighter than images (qwen-vl-utils' VIDEO_MIN_PIXELS / VIDEO_MAX_PIXELS):
# between 128 and 768 tokens per temporal pair of frames.
VIDEO_MIN_PIXELS = 128 * _UNIT * _UNIT
VIDEO_MAX_PIXELS = 768 * _UNIT * _UNIT
TEMPORAL_PATCH = 2
MAX_RATIO = 200  # the reference refuses longer/shorter side ratios above this


def _check_ratio(width: float, height: float, max_ratio: float) -> None:
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    ratio = max(width, height) / min(width, height)
    if ratio > max_ratio:
        raise ValueError(
            f"absolute aspect ratio must be smaller than {max_ratio}, got {ratio} ({width}x{height})"
        )


def smart_resize(
    width: int,
    height: int,
    *,
    patch: int = PATCH,
    merge: int = MERGE,
    min_pixels: int = MIN_PIXELS,
    max_pixels: int = MAX_PIXELS,
    max_ratio: float = MAX_RATIO,
) -> tuple[int, int]:
    """The ``(width, height)`` the model resizes an image to: Qwen2-VL's ``smart_resize`` rule.

    Each side is rounded to the nearest multiple of ``patch * merge`` (28), at least 28. If the area is
    then above ``max_pixels``, both sides are divided by ``sqrt(h * w / max_pixels)`` and floored to
    multiples of 28; if below ``min_pixels``, multiplied by ``sqrt(min_pixels / (h * w))`` and ceiled.
    So the aspect ratio is kept as closely as 28-pixel steps allow. Note the argument order is
    (width, height), unlike the reference's (height, width).

    Worked example, a 1000x700 photo: 1000/28 = 35.7 rounds to 36 (1008 px), 700/28 = 25 (700 px);
    1008 x 700 lies within the default bounds, so it costs 36 x 25 = 900 tokens.

    >>> smart_resize(1000, 700)
    (1008, 700)
    """
    _check_ratio(width, height, max_ratio)
    f = patch * merge
    h_bar = max(f, round(height / f) * f)
    w_bar = max(f, round(width / f) * f)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(f, math.floor(height / beta / f) * f)
        w_bar = max(f, math.floor(width / beta / f) * f)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / f) * f
        w_bar = math.ceil(width * beta / f) * f
    return int(w_bar), int(h_bar)


def visual_tokens(
    width: int,
    height: int,
    *,
    patch: int = PATCH,
    merge: int = MERGE,
    min_pixels: int = MIN_PIXELS,
    max_pixels: int = MAX_PIXELS,
    max_ratio: float = MAX_RATIO,
) -> int:
    """LLM tokens one image costs: ``(H / 28) * (W / 28)`` after :func:`smart_resize`.

    The 1000x700 photo of :func:`smart_resize` costs 900; a 56x56 (or 1x1) image costs the minimum, 4;
    a 10x20 one is scaled up keeping its shape, to 56x84 = 6 tokens; an 8000x6000 scan is scaled down
    to 4116x3080 = 16,170 tokens, under the 16,384 cap.

    >>> visual_tokens(1000, 700), visual_tokens(56, 56), visual_tokens(10, 20), visual_tokens(8000, 6000)
    (900, 4, 6, 16170)
    """
    w, h = smart_resize(
        width,
        height,
        patch=patch,
        merge=merge,
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        max_ratio=max_ratio,
    )
    f = patch * merge
    return (w // f) * (h // f)


def visual_tokens_np(
    widths: Any,
    heights: Any,
    *,
    patch: int = PATCH,
    merge: int = MERGE,
    min_pixels: int = MIN_PIXELS,
    max_pixels: int = MAX_PIXELS,
    max_ratio: float = MAX_RATIO,
) -> np.ndarray:
    """:func:`visual_tokens` over arrays of sizes (int64 result), for whole batches at once.

    The same float operations in the same order as the scalar rule (numpy's ``round`` rounds half to
    even, like Python's), so both agree exactly; the scalar one stays as the readable reference.
    """
    w = np.asarray(widths, dtype=np.float64)
    h = np.asarray(heights, dtype=np.float64)
    if w.shape != h.shape:
        raise ValueError(f"widths and heights differ in shape: {w.shape} vs {h.shape}")
    if w.size == 0:
        return np.zeros(w.shape, np.int64)
    bad = np.flatnonzero(~((w > 0) & (h > 0)))
    if bad.size:
        i = bad[0]
        raise ValueError(f"image size must be positive, got {w.flat[i]:g}x{h.flat[i]:g} at index {i}")
    ratio = np.maximum(w, h) / np.minimum(w, h)
    bad = np.flatnonzero(ratio > max_ratio)
    if bad.size:
        i = bad[0]
        raise ValueError(
            f"absolute aspect ratio must be smaller than {max_ratio}, got {ratio.flat[i]} "
            f"({w.flat[i]:g}x{h.flat[i]:g} at index {i})"
        )
    f = float(patch * merge)
    h_bar = np.maximum(f, np.round(h / f) * f)
    w_bar = np.maximum(f, np.round(w / f) * f)
    area = h_bar * w_bar
    big = area > max_pixels
    small = ~big & (area < min_pixels)
    with np.errstate(divide="ignore", invalid="ignore"):
        down = np.sqrt((h * w) / max_pixels)
        up = np.sqrt(min_pixels / (h * w))
        h_bar = np.where(big, np.maximum(f, np.floor(h / down / f) * f), h_bar)
        w_bar = np.where(big, np.maximum(f, np.floor(w / down / f) * f), w_bar)
        h_bar = np.where(small, np.ceil(h * up / f) * f, h_bar)
        w_bar = np.where(small, np.ceil(w * up / f) * f, w_bar)
    return ((h_bar / f).astype(np.int64) * (w_bar / f).astype(np.int64)).reshape(w.shape)


def video_tokens(
    frames: tuple[int, int, int] | Sequence[tuple[int, int]],
    *,
    temporal_patch: int = TEMPORAL_PATCH,
    patch: int = PATCH,
    merge: int = MERGE,
    min_pixels: int = VIDEO_MIN_PIXELS,
    max_pixels: int = VIDEO_MAX_PIXELS,
    max_ratio: float = MAX_RATIO,
) -> int:
    """LLM tokens a video's sampled frames cost.

    ``frames`` is ``(n_frames, width, height)`` or a list of per-frame ``(width, height)``. Frames merge
    in groups of ``temporal_patch`` (2): ``ceil(n / 2)`` groups (an odd last frame is padded, as the
    reference repeats it), each costing :func:`visual_tokens` of its first frame under the video bounds
    (default 128 to 768 tokens per group: tighter than images, since a video has many frames).

    Worked example: 9 frames of 640x360 make 5 pairs; 640x360 rounds to 644x364 = 23 x 13 = 299
    tokens, within bounds, so the video costs 5 x 299 = 1495 tokens.

    >>> video_tokens((9, 640, 360)), video_tokens([(640, 360)] * 9)
    (1495, 1495)
    """
    kw = {
        "patch": patch,
        "merge": merge,
        "min_pixels": min_pixels,
        "max_pixels": max_pixels,
        "max_ratio": max_ratio,
    }
    if len(frames) == 3 and all(isinstance(x, Integral) for x in frames):
        n, width, height = frames  # type: ignore[misc]
        if n < 0:
            raise ValueError(f"n_frames must be >= 0, got {n}")
        return 0 if n == 0 else -(-n // temporal_patch) * visual_tokens(width, height, **kw)
    sizes = list(frames)[::temporal_patch]
    return sum(visual_tokens(w, h, **kw) for w, h in sizes)  # type: ignore[misc]


@dataclass(frozen=True)
class VisionConfig:
    """How the vision tower turns pixels into LLM tokens (Keye-VL defaults)."""

    patch: int = PATCH  # SigLIP patch side in pixels
    merge: int = MERGE  # the projector merges merge x merge patches into one token
    min_pixels: int = MIN_PIXELS  # per image: 4 tokens
    max_pixels: int = MAX_PIXELS  # per image: 16,384 tokens
    video_min_pixels: int = VIDEO_MIN_PIXELS  # per temporal group of frames: 128 tokens
    video_max_pixels: int = VIDEO_MAX_PIXELS  # per temporal group of frames: 768 tokens
    temporal_patch: int = TEMPORAL_PATCH  # frames merged along time
    max_ratio: float = MAX_RATIO

    def image_tokens(self, widths: Any, heights: Any) -> np.ndarray:
        return visual_tokens_np(
            widths,
            heights,
            patch=self.patch,
            merge=self.merge,
            min_pixels=self.min_pixels,
            max_pixels=self.max_pixels,
            max_ratio=self.max_ratio,
        )

    def frame_tokens(self, widths: Any, heights: Any) -> np.ndarray:
        """Tokens of one temporal group of frames of these sizes."""
        return visual_tokens_np(
            widths,
            heights,
            patch=self.patch,
            merge=self.merge,
            min_pixels=self.video_min_pixels,
            max_pixels=self.video_max_pixels,
            max_ratio=self.max_ratio,
        )
