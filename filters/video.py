"""Video heuristics over what ingest recorded: bounds on duration, size and frame rate; static clips;
blank (black, white, single-colour) frames.

They read the row's ``meta`` (``duration``, ``video_width``, ``video_height``, ``fps``: the header facts the
reader probed) and its sampled ``frames``; none of them opens the video file again, so they cost
milliseconds per row. Frames are decoded at reduced size (libjpeg's DCT scaling to about 64 px, then
greyscale): motion and blankness are properties of the whole picture, not of its detail.
"""

from __future__ import annotations

import io
import json
from typing import ClassVar

import numpy as np
import pyarrow as pa
from PIL import Image

from curation.bounds import bounded
from curation.stage import ScoreFilter, first_reason, reason_where, register, unscored

THUMB = 64  # side of the greyscale thumbnails motion and blankness are measured on


def thumbnails(frames: list[bytes] | None) -> tuple[list[np.ndarray], list[int]]:
    """Greyscale float32 thumbnails (0..1) of the frames that decode, and the positions of those that
    do not."""
    out, bad = [], []
    for j, data in enumerate(frames or []):
        try:
            with Image.open(io.BytesIO(data)) as img:
                img.draft("L", (THUMB, THUMB))
                out.append(
                    np.asarray(img.convert("L").resize((THUMB, THUMB), Image.Resampling.BILINEAR), np.float32)
                    / 255.0
                )
        except (OSError, ValueError, Image.DecompressionBombError):
            bad.append(j)
    return out, bad


def _meta(raw: str | None) -> dict:
    try:
        return json.loads(raw) if raw else {}
    except ValueError:
        return {}


def _facts(batch: pa.Table) -> dict[str, np.ndarray]:
    """Duration, shorter side and frame rate of each row's video (NaN: unknown) from its ``meta`` column, and
    whether ingest recorded any facts at all."""
    metas = [_meta(m) for m in batch["meta"].to_pylist()]
    nan = float("nan")
    return {
        "duration": np.array([m.get("duration") or nan for m in metas], np.float64),
        "side": np.array(
            [min(m.get("video_width") or 0, m.get("video_height") or 0) or nan for m in metas], np.float64
        ),
        "fps": np.array([m.get("fps") or nan for m in metas], np.float64),
        "known": np.array([bool(m.get("duration") or m.get("video_width")) for m in metas]),
    }


@register
class VideoBounds(ScoreFilter):
    """Reject videos outside duration, size and frame-rate bounds (from the header facts ingest recorded).

    Reasons: ``duration_below_min`` / ``duration_above_max`` (seconds), ``side_below_min`` (the shorter
    side of the picture, pixels), ``fps_below_min``, ``no_video_facts`` (ingest recorded none: the row did not
    come through a video reader). ``score_video_bounds`` is the duration. A bound set to null is not checked.
    """

    name: ClassVar[str] = "video_bounds"
    reads: ClassVar[tuple[str, ...]] = ("meta",)
    default_modalities: ClassVar[tuple[str, ...]] = ("video",)

    min_duration: float | None = bounded(1.0, 0, 1_000_000)
    max_duration: float | None = bounded(600.0, 0, 1_000_000)
    min_side: int | None = bounded(128, 0, 16_384)
    min_fps: float | None = bounded(5.0, 0, 240)

    def __post_init__(self):
        for name in ("min_duration", "max_duration", "min_side", "min_fps"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name}: expected a non-negative number or null, got {value}")
        if (
            self.min_duration is not None
            and self.max_duration is not None
            and self.min_duration > self.max_duration
        ):
            raise ValueError(
                f"min_duration ({self.min_duration}) is above max_duration ({self.max_duration})"
            )

    def score(self, batch: pa.Table) -> dict[str, pa.Array]:
        f = _facts(batch)
        return {
            self.score_name: pa.array(f["duration"], mask=np.isnan(f["duration"])),
            **unscored(reason_where(pa.array(~f["known"]), "no_video_facts")),
        }

    def decide(self, batch, scores):
        """The bounds, on the facts in the persisted ``meta`` column (read again: a threshold changed on a
        pool read back gives the same answer)."""
        f = _facts(batch)
        checks = []
        detail: list[str | None] = [None] * batch.num_rows

        def bound(values: np.ndarray, limit: float | None, below: bool, reason: str, what: str) -> None:
            if limit is None:
                return
            hit = (values < limit) if below else (values > limit)
            hit &= ~np.isnan(values)
            checks.append(reason_where(pa.array(hit), reason))
            for i in np.flatnonzero(hit):
                detail[i] = detail[i] or f"{what} {values[i]:g} {'<' if below else '>'} {limit:g}"

        bound(f["duration"], self.min_duration, True, "duration_below_min", "duration (s)")
        bound(f["duration"], self.max_duration, False, "duration_above_max", "duration (s)")
        bound(f["side"], self.min_side, True, "side_below_min", "shorter side (px)")
        bound(f["fps"], self.min_fps, True, "fps_below_min", "frame rate")
        if not checks:
            return pa.nulls(batch.num_rows, pa.string())
        return first_reason(*checks), pa.array(detail, pa.string())


@register
class VideoMotion(ScoreFilter):
    """Motion score: the mean absolute difference between consecutive sampled frames (greyscale, 0..1).

    A slideshow of one picture, a static title card or a paused stream scores near 0 (JPEG noise alone gives
    about 0.002); a talking head about 0.01-0.03; camera motion and cuts more. Rows below ``min_motion`` are
    rejected as ``static``; above ``max_motion`` (if set) as ``too_much_motion`` (flicker, noise). Rows with
    fewer than two readable frames: ``too_few_frames``. Measured on the frames sampled at ingest (1 per
    second by default), so it sees motion over seconds, not between adjacent frames.
    """

    name: ClassVar[str] = "video_motion"
    reads: ClassVar[tuple[str, ...]] = ("frames",)
    default_modalities: ClassVar[tuple[str, ...]] = ("video",)
    ranks: ClassVar[bool] = True  # more motion is more video: keep_fraction keeps the most dynamic clips

    min_motion: float = bounded(0.008, 0, 1)
    max_motion: float | None = bounded(None, 0, 1)

    def __post_init__(self):
        if self.min_motion < 0 or (self.max_motion is not None and self.max_motion <= self.min_motion):
            raise ValueError("min_motion must be non-negative and max_motion, if set, above it")

    def score(self, batch: pa.Table) -> dict[str, pa.Array]:
        frames = batch["frames"].to_pylist()
        motion = np.full(len(frames), np.nan)
        for i, f in enumerate(frames):
            thumbs, _ = thumbnails(f)
            if len(thumbs) >= 2:
                stack = np.stack(thumbs)
                motion[i] = float(np.abs(np.diff(stack, axis=0)).mean())
        few = np.isnan(motion)
        return {
            self.score_name: pa.array(motion, mask=few),
            **unscored(reason_where(pa.array(few), "too_few_frames")),
        }

    def decide(self, batch, scores):
        m = scores[self.score_name].to_numpy(zero_copy_only=False)
        few = np.isnan(m)
        checks = [reason_where(pa.array(~few & (m < self.min_motion)), "static")]
        if self.max_motion is not None:
            checks.append(reason_where(pa.array(~few & (m > self.max_motion)), "too_much_motion"))
        detail = [None if np.isnan(x) else f"motion {x:.4f} (min {self.min_motion:g})" for x in m]
        return first_reason(*checks), pa.array(detail, pa.string())


@register
class VideoBlank(ScoreFilter):
    """Share of sampled frames that are blank: black, white or one flat colour (greyscale standard deviation
    below ``max_std``), or unreadable.

    Rejects ``mostly_blank`` when the share is above ``max_blank_fraction`` (a black intro of a few seconds
    is fine, a black video is not) and ``no_frames`` when there is nothing to look at.
    ``score_video_blank`` is the share; ``video_blank_frames`` lists the blank frames' timestamps, so a later
    step can trim them.
    """

    name: ClassVar[str] = "video_blank"
    reads: ClassVar[tuple[str, ...]] = ("frames", "frame_ts")
    default_modalities: ClassVar[tuple[str, ...]] = ("video",)

    max_std: float = bounded(0.02, 0, 1)  # of 0..1 greyscale: a flat colour with JPEG noise stays well below
    max_blank_fraction: float = bounded(0.5, 0, 1)

    def __post_init__(self):
        if not (0 <= self.max_blank_fraction <= 1) or self.max_std < 0:
            raise ValueError("max_blank_fraction: expected a share between 0 and 1; max_std non-negative")

    @property
    def frames_name(self) -> str:
        return f"{self.label}_frames"

    def output_fields(self) -> list[pa.Field]:
        return [pa.field(self.score_name, pa.float64()), pa.field(self.frames_name, pa.list_(pa.float64()))]

    def score(self, batch: pa.Table) -> dict[str, pa.Array]:
        frames, stamps = batch["frames"].to_pylist(), batch["frame_ts"].to_pylist()
        share = np.full(len(frames), np.nan)
        blank_ts: list[list[float] | None] = [None] * len(frames)
        for i, f in enumerate(frames):
            if not f:
                continue
            thumbs, bad = thumbnails(f)
            unreadable = set(bad)
            readable = [j for j in range(len(f)) if j not in unreadable]
            blank = [j for j, t in zip(readable, thumbs) if float(t.std()) < self.max_std] + bad
            share[i] = len(blank) / len(f)
            ts = stamps[i] or []
            blank_ts[i] = sorted(ts[j] for j in blank if j < len(ts))
        return {
            self.score_name: pa.array(share, mask=np.isnan(share)),
            self.frames_name: pa.array(blank_ts, pa.list_(pa.float64())),
            **unscored(reason_where(pa.array(np.isnan(share)), "no_frames")),
        }

    def decide(self, batch, scores):
        s = scores[self.score_name].to_numpy(zero_copy_only=False)
        none = np.isnan(s)
        detail = [None if np.isnan(x) else f"{x:.0%} of the sampled frames are blank" for x in s]
        return reason_where(pa.array(~none & (s > self.max_blank_fraction)), "mostly_blank"), pa.array(
            detail, pa.string()
        )
