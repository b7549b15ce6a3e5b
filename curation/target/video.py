"""How a video is sampled into the frames the model reads: the ``sources.<i>.video`` options and defaults.

Keye-VL reads a video as frames with absolute timestamps, each resized like an image but within the video
bounds (:mod:`curation.target.geometry`). Ingest samples frames at that size (so the trainer reads them
without resampling), and decontamination samples a benchmark's videos the same way so that its frames
match the corpus's.

Why it lives here, on the ground floor (:mod:`curation.target`): the readers, the recipe's checks and the
``decontaminate`` stage all need the same defaults, and the frame sizes come from the model's geometry;
the recipe only validates what a source sets. The limits a recipe may set (``VIDEO_LIMITS``) stay with the
recipe.

    >>> frame_bounds(VIDEO_OPTIONS)
    {'max_side': 384, 'factor': 28, 'min_pixels': 3136, 'max_pixels': 602112}
"""

from __future__ import annotations

from typing import Any

from curation.target.geometry import MERGE, MIN_PIXELS, PATCH, VIDEO_MAX_PIXELS

#: ``sources.<i>.video`` keys: how ingest samples a source's videos (curation.io.video), with their defaults.
VIDEO_OPTIONS: dict[str, Any] = {
    "fps": 1.0,  # frames sampled per second
    "max_frames": 32,  # per video (or per shot): a longer one is sampled evenly over its length
    "max_side": 384,  # longer side of a sampled frame, pixels (before rounding to factor)
    # frame sides are multiples of this (28: 14-pixel patches merged 2x2); 1 keeps the exact shape
    "factor": PATCH * MERGE,
    "min_pixels": MIN_PIXELS,  # 3136: frame area bounds, as the model's smart_resize applies them (4 tokens)
    "max_pixels": VIDEO_MAX_PIXELS,  # 602112: ... and 768 tokens (the model's per-frame video bound)
    "shots": False,  # split at hard cuts: one row per shot (clip_start/clip_end), frames sampled per shot
    "shot_threshold": 0.07,  # mean absolute frame difference (0..1) that can make a cut
    "shot_contrast": 3.0,  # ... when it is this many times the shot's recent frame differences
    "min_shot_s": 1.0,  # shorter shots join their neighbour
    "timeout_s": 300.0,  # a video whose decoding takes longer is rejected (unreadable_video), not waited on
    "clip": False,  # keep the video in the row (video_bytes): the file, or each shot re-encoded from its cut
    "clip_preset": "veryfast",  # x264 preset for re-encoded shots: ultrafast is 2.5x faster, files 2x larger
}


def frame_bounds(options: dict[str, Any]) -> dict[str, int]:
    """The frame-size keyword arguments of :func:`curation.io.video.sample_frames` from resolved options."""
    return {k: int(options[k]) for k in ("max_side", "factor", "min_pixels", "max_pixels")}
