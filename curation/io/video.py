"""Video frame sampling with PyAV: a few frames per video, decoded in order, as JPEG.

A video row carries a reference to its file (``video``) plus sampled frames (``frames``, JPEG
bytes) and their absolute timestamps in seconds from the start of the stream (``frame_ts``);
filters, captioners and decontamination look at those frames and never at the file again.
:func:`sample_frames` makes them::

    >>> vf = sample_frames("clip.mp4")            # 1 frame per second, at most 64, <= 384 px
    >>> vf.ts[:3], vf.duration, vf.codec
    ([0.0, 1.0, 2.0], 12.5, 'h264')

:class:`VideoReader` is the same machinery one level down (header facts, then PIL images one at a
time), for consumers that need no JPEG, such as the benchmark-video index; :func:`probe` reads the
header only.

How frames are picked: sampling times are ``0, 1/fps, 2/fps, ...``; the frame kept for a time is
the first decoded frame whose timestamp is at or after it. The file is decoded in order, never
seeked: seeking in H.264 lands on a keyframe and decodes forward from there for every sample,
which costs more than one in-order pass at these rates. Only kept frames are converted to RGB,
scaled (libswscale, area averaging) and JPEG-encoded, and only those are held in memory.

Defaults and why:

* ``fps=1.0``: one frame per second is what frame-level filters and decontamination need (a
  benchmark copy of a few seconds still gives several frames) at a fraction of the decode's cost.
* ``max_frames=64``: bounds the row; a longer video is sampled evenly over its whole duration
  (``duration / 64`` apart) rather than only in its first minute, so a copied clip in the middle
  of a long video is still seen.
* ``min_frames=4``: a video shorter than 4 s is sampled more densely (``duration / 4`` apart) so
  that short clips still carry several frames: matching on one frame is matching an image, and the
  temporal check of :mod:`curation.dedup.video` needs at least two.
* ``max_side=384`` and ``quality=90``: large enough for CLIP-style models (224-384 px inputs) and
  OCR of large text; 5-40 KB per frame, depending on the content.
* ``factor=28``: each side is then rounded to a multiple of 28 pixels (the model's 14-pixel patches,
  merged 2x2), with at least ``min_pixels`` (4 tokens) and at most ``max_pixels``, as Qwen2-VL's
  ``smart_resize`` does: 640x360 is sampled at 392x224, exactly what the model will read.

Frames come out upright: a display-matrix rotation (phone videos) is applied, as players do.
Streams without timestamps (raw H.264/HEVC elementary streams) are timed by counting frames at
the stream's nominal rate.

Bad input never takes a worker down: anything wrong raises :class:`VideoError` (a ``ValueError``)
naming the source and the problem, which the reader turns into a rejected row with that reason.
Problems told apart: not a media file, a still image, no video stream, an MP4 whose index is
missing or cut (``moov``/``mdat`` box past the end of the file), decoding that fails part-way or
stops before the duration the header announces (truncation: the message says how many frames and
seconds were decoded), no decodable frame at all, absurd frame sizes.
"""

from __future__ import annotations

import collections
import io
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any

import av
import av.error
from av.video.reformatter import VideoReformatter
from PIL import Image

from curation.target.geometry import MAX_PIXELS, MERGE, MIN_PIXELS, PATCH, smart_resize

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = [
    "Shot",
    "VideoError",
    "VideoFrames",
    "VideoInfo",
    "VideoReader",
    "VideoSource",
    "probe",
    "sample_frames",
    "sample_shots",
]

#: A local path, the file's bytes, or a binary file object (an open S3 object, say).
VideoSource = str | os.PathLike | bytes | bytearray | memoryview | IO[bytes]

MAX_SIDE_LIMIT = 16_384  # a frame side above this is rejected before decoding (memory bombs)
_EPS = 1e-3  # seconds: timestamps are rationals, sampling times floats
# still-image demuxers: FFmpeg opens a JPEG as a one-frame "video"; here that is not a video
_IMAGE_FORMATS = ("image2", "_pipe", "apng")


#: Sampled frames' sides are multiples of this (the model's 14-pixel patches merged 2x2) unless told
#: otherwise, and hold at least MIN_PIXELS (4 visual tokens, the model's lower bound per image).
FACTOR = PATCH * MERGE


class VideoError(ValueError):
    """A video that cannot be sampled; ``str(e)`` is ``"<source>: <problem>"``.

    ``frames_decoded`` and ``seconds_decoded`` say how far decoding got before the failure
    (0 when the file could not be opened).
    """

    def __init__(
        self, source: str, problem: str, *, frames_decoded: int = 0, seconds_decoded: float = 0.0
    ) -> None:
        super().__init__(f"{source}: {problem}")
        self.source = source
        self.problem = problem
        self.frames_decoded = frames_decoded
        self.seconds_decoded = seconds_decoded


@dataclass(frozen=True)
class VideoInfo:
    """What the container header says; nothing is decoded."""

    duration: float | None  # seconds; None when the header does not say
    width: int  # display size: coded size corrected by the sample aspect ratio
    height: int
    codec: str  # FFmpeg decoder name: h264, hevc, vp9, av1, mpeg4, ...
    fps: float | None  # average frame rate
    frames: int | None  # frame count from the header (None: not stored, as in Matroska)
    container: str  # FFmpeg demuxer name
    audio: bool = False  # the container has an audio stream


@dataclass(frozen=True)
class VideoFrames:
    """Sampled frames of one video: JPEG bytes and their timestamps, plus the header facts."""

    frames: list[bytes]
    ts: list[float]  # seconds from the start of the stream, increasing
    duration: float | None
    width: int  # of the video (before rotation), not of the frames (scaled to ``max_side``)
    height: int
    codec: str
    fps: float | None
    audio: bool = False
    ext: str = "mp4"  # the container's file extension (container_ext)


def _name(src: Any, name: str | None) -> str:
    if name:
        return name
    if isinstance(src, (str, os.PathLike)):
        return os.fspath(src)
    if isinstance(src, (bytes, bytearray, memoryview)):
        return f"<{len(src):,} bytes>"
    return str(getattr(src, "name", None) or "<stream>")


def _ffmpeg_message(e: BaseException) -> str:
    return getattr(e, "strerror", None) or str(e)


def _mp4_problem(fh: IO[bytes]) -> str | None:
    """Why an MP4/MOV file did not open, from its top-level boxes; None if it is not one.

    FFmpeg only says "Invalid data found"; the common real cause is a download cut short, which
    shows as a box running past the end of the file or no ``moov`` (index) box at all.
    """
    try:
        fh.seek(0, io.SEEK_END)
        size = fh.tell()
        fh.seek(0)
        head = fh.read(12)
        if len(head) < 12 or head[4:8] not in (b"ftyp", b"moov", b"mdat", b"free", b"wide"):
            return None
        pos, boxes = 0, []
        while pos + 8 <= size:
            fh.seek(pos)
            hdr = fh.read(16)
            box_size, kind = struct.unpack(">I4s", hdr[:8])
            if box_size == 1 and len(hdr) == 16:
                box_size = struct.unpack(">Q", hdr[8:16])[0]
            elif box_size == 0:
                box_size = size - pos
            kind_s = kind.decode("latin-1")
            boxes.append(kind_s)
            if box_size < 8:
                return f"MP4 box {kind_s!r} at offset {pos:,} has an invalid size {box_size}"
            if pos + box_size > size:
                missing = "" if "moov" in boxes else ", and there is no 'moov' box (the index) before it"
                return (
                    f"truncated MP4: box {kind_s!r} at offset {pos:,} declares {box_size:,} bytes "
                    f"but the file ends at {size:,}{missing}"
                )
            pos += box_size
        if "moov" not in boxes:
            return f"MP4 without a 'moov' box (the index); top-level boxes: {', '.join(boxes)}"
    except (OSError, struct.error):
        return None
    return None


class VideoReader:
    """An open video: header facts in :attr:`info` (read on opening), frames from :meth:`frames`.

    Opening raises :class:`VideoError` for anything that is not a readable video; use it as a
    context manager so that the container is closed::

        with VideoReader(data, name="s3://bucket/v.mp4") as v:
            duration = v.info.duration
            for t, img in v.frames(fps=4):
                ...
    """

    def __init__(self, src: VideoSource, *, name: str | None = None) -> None:
        self.name = _name(src, name)
        self.reached = 0.0  # seconds decoded, once a full in-order pass has ended
        if isinstance(src, (bytes, bytearray, memoryview)):
            if len(src) == 0:
                raise VideoError(self.name, "empty input (0 bytes)")
            fh: Any = io.BytesIO(src)
        elif isinstance(src, (str, os.PathLike)):
            path = os.fspath(src)
            if not os.path.exists(path):
                raise VideoError(self.name, "no such file")
            if os.path.getsize(path) == 0:
                raise VideoError(self.name, "empty file (0 bytes)")
            fh = path
        else:
            fh = src
        self._fh = fh
        try:
            self.container = av.open(fh, "r")
        except av.error.FFmpegError as e:
            raise VideoError(self.name, self._open_problem(e)) from None
        try:
            self.stream, self.info = self._header()
        except BaseException:
            self.container.close()
            raise

    def _open_problem(self, e: BaseException) -> str:
        problem = self.mp4_problem()
        return problem or f"not a video or audio file FFmpeg can read ({_ffmpeg_message(e)})"

    def mp4_problem(self) -> str | None:
        """:func:`_mp4_problem` of the source, when it can be re-read (path, bytes, seekable file)."""
        fh = self._fh
        try:
            if isinstance(fh, str):
                with open(fh, "rb") as f:
                    return _mp4_problem(f)
            if hasattr(fh, "seek") and fh.seekable():
                return _mp4_problem(fh)
        except OSError:
            return None
        return None

    def _header(self) -> tuple[Any, VideoInfo]:
        c = self.container
        fmt = c.format.name
        videos = [
            s
            for s in c.streams.video
            if not (s.disposition & (av.stream.Disposition.attached_pic | av.stream.Disposition.still_image))
        ]
        if any(k in fmt for k in _IMAGE_FORMATS):
            raise VideoError(self.name, f"a still image ({fmt}), not a video")
        if not videos:
            kinds = sorted({s.type for s in c.streams}) or ["none"]
            raise VideoError(self.name, f"no video stream (container {fmt}; streams: {', '.join(kinds)})")
        s = videos[0]
        cc = s.codec_context
        if cc is None:  # a cut file whose stream header FFmpeg could not finish reading
            raise VideoError(
                self.name, f"video stream without a decoder (container {fmt}): is the file cut short?"
            )
        w, h = cc.width, cc.height
        if w <= 0 or h <= 0:
            raise VideoError(self.name, f"video stream without a frame size ({cc.name})")
        if max(w, h) > MAX_SIDE_LIMIT:
            raise VideoError(self.name, f"frame size {w}x{h} is larger than {MAX_SIDE_LIMIT} px per side")
        sar = s.sample_aspect_ratio
        if sar and sar > 0 and sar != 1:
            w = max(1, round(w * float(sar)))
        duration = self._duration(s)
        rate = s.average_rate or s.guessed_rate
        return s, VideoInfo(
            duration=duration,
            width=w,
            height=h,
            codec=cc.name,
            fps=float(rate) if rate else None,
            frames=s.frames or None,
            container=fmt,
            audio=bool(c.streams.audio),
        )

    def _duration(self, s: Any) -> float | None:
        """The video stream's duration; the container's only when nothing else could set it."""
        if s.duration and s.time_base:
            return float(s.duration * s.time_base)
        tag = (s.metadata or {}).get("DURATION")  # Matroska: written by FFmpeg and mkvmerge
        if tag:
            try:
                hh, mm, ss = tag.split(":")
                return int(hh) * 3600 + int(mm) * 60 + float(ss)
            except ValueError:
                pass
        if self.container.duration and len(self.container.streams) == 1:
            return self.container.duration / 1e6
        return None

    def close(self) -> None:
        self.container.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def frames(
        self,
        *,
        fps: float = 1.0,
        max_frames: int = 64,
        min_frames: int = 4,
        max_side: int = 384,
        factor: int = FACTOR,
        min_pixels: int = MIN_PIXELS,
        max_pixels: int | None = None,
        timeout_s: float | None = None,
    ) -> Iterator[tuple[float, Image.Image]]:
        """``(timestamp, RGB PIL image)`` of the sampled frames, one at a time, decoded in order.

        Parameters as in :func:`sample_frames`. Errors are raised as they are met, so frames may
        have been yielded before a :class:`VideoError` (a truncated file).
        """
        return _frames(
            self,
            fps=fps,
            max_frames=max_frames,
            min_frames=min_frames,
            max_side=max_side,
            factor=factor,
            min_pixels=min_pixels,
            max_pixels=max_pixels,
            timeout_s=timeout_s,
        )


def probe(src: VideoSource, *, name: str | None = None) -> VideoInfo:
    """Header facts (duration, display size, codec, fps, frame count) without decoding.

    Raises :class:`VideoError` for anything that is not a readable video container.
    """
    with VideoReader(src, name=name) as v:
        return v.info


def _interval(info: VideoInfo, fps: float, max_frames: int, min_frames: int) -> float:
    """Seconds between sampling times (see the module docstring for the rules)."""
    step = 1.0 / fps
    d = info.duration
    if d and d > 0:
        if d / step >= max_frames:
            step = d / max_frames
        elif min_frames > 0 and d / step < min_frames:
            step = d / min_frames
    return step


def _scaled_size(w: int, h: int, max_side: int) -> tuple[int, int]:
    f = min(1.0, max_side / max(w, h))
    return max(1, round(w * f)), max(1, round(h * f))


def frame_size(
    w: int,
    h: int,
    max_side: int,
    factor: int = FACTOR,
    min_pixels: int = MIN_PIXELS,
    max_pixels: int | None = None,
) -> tuple[int, int]:
    """The ``(width, height)`` a ``w`` x ``h`` video's frames are sampled at: scaled (never up) so that the
    longer side is ``max_side``, then each side rounded to the nearest multiple of ``factor`` with the area
    kept within ``[min_pixels, max_pixels]`` (Qwen2-VL's ``smart_resize``: what the model will resize the
    frame to anyway, so a frame stored at this size is read without resampling). ``factor=1`` keeps the
    exact aspect ratio. Raises :class:`VideoError` for aspect ratios the model refuses (over 200:1).

    >>> frame_size(640, 360, 384)     # 384x216, rounded to 28-pixel steps
    (392, 224)
    """
    sw, sh = _scaled_size(w, h, max_side)
    try:
        return smart_resize(
            sw, sh, patch=max(1, factor), merge=1, min_pixels=min_pixels, max_pixels=max_pixels or MAX_PIXELS
        )
    except ValueError as e:
        raise VideoError(f"cannot size frames of a {w}x{h} video: {e}") from None


def _decode_in_order(
    o: VideoReader, want_more: Callable[[], bool], timeout_s: float | None = None
) -> Iterator[tuple[float, av.VideoFrame]]:
    """Every frame of the video stream, decoded in order, with its time in seconds from the stream's start.

    ``want_more()`` is asked after each packet: once it is false the remaining packets are read without
    decoding (cheap), so that a file cut after the last frame wanted is still reported as truncated.
    ``timeout_s`` bounds the whole pass in wall-clock seconds, checked between packets (a stream crafted to
    decode forever, or a huge one, is given up on); it cannot interrupt one call that never returns.
    Raises :class:`VideoError` for a decode failure, no decodable frame, a stream shorter than its header,
    or the time running out.
    """
    import time

    deadline = time.monotonic() + timeout_s if timeout_s else None
    info, s = o.info, o.stream
    frame_dt = 1.0 / info.fps if info.fps else 0.0
    tb = float(s.time_base)
    origin = s.start_time
    decoded, reached = 0, 0.0
    packets = o.container.demux(s)
    try:
        for packet in packets:
            for frame in packet.decode():
                if frame.pts is not None:
                    if origin is None:
                        origin = frame.pts
                    t = max(0.0, (frame.pts - origin) * tb)
                else:  # raw H.264/HEVC elementary streams carry no timestamps: count frames
                    t = decoded * (frame_dt or 1 / 25)
                decoded += 1
                reached = max(reached, t + frame_dt)
                yield t, frame
            if deadline is not None and time.monotonic() > deadline:
                raise VideoError(
                    o.name,
                    f"decoding took longer than {timeout_s:g} s (stopped after "
                    f"{_n(decoded, 'frame')}, {reached:.2f} s{_of(info)})",
                    frames_decoded=decoded,
                    seconds_decoded=reached,
                )
            if not want_more():
                break
        for packet in packets:
            if packet.pts is not None and origin is not None:
                reached = max(reached, (packet.pts - origin + (packet.duration or 0)) * tb)
    except av.error.FFmpegError as e:
        where = (
            f"after {_n(decoded, 'frame')} ({reached:.2f} s{_of(info)})"
            if decoded
            else "before the first frame"
        )
        raise VideoError(
            o.name,
            f"truncated or corrupt: decoding failed {where}: {_ffmpeg_message(e)}{_also(o.mp4_problem())}",
            frames_decoded=decoded,
            seconds_decoded=reached,
        ) from None
    if decoded == 0:
        raise VideoError(o.name, f"no decodable frame in the {info.codec} stream{_declared(info)}")
    d = info.duration
    if d and reached < d - max(0.5, 2 * frame_dt):
        raise VideoError(
            o.name,
            f"truncated: the stream ends at {reached:.2f} s of the {d:.2f} s the "
            f"header announces ({_n(decoded, 'frame')} decoded){_also(o.mp4_problem())}",
            frames_decoded=decoded,
            seconds_decoded=reached,
        )
    o.reached = reached


def _frames(
    o: VideoReader,
    *,
    fps: float,
    max_frames: int,
    min_frames: int,
    max_side: int,
    factor: int = FACTOR,
    min_pixels: int = MIN_PIXELS,
    max_pixels: int | None = None,
    timeout_s: float | None = None,
) -> Iterator[tuple[float, Image.Image]]:
    if fps <= 0 or max_frames <= 0 or max_side <= 0:
        raise ValueError("fps, max_frames and max_side must be positive")
    info = o.info
    step = _interval(info, fps, max_frames, min_frames)
    size = frame_size(info.width, info.height, max_side, factor, min_pixels, max_pixels)
    scaler = VideoReformatter()  # one per video: keeps libswscale's context between frames
    target, kept = 0.0, 0
    # the decoder calls the lambda as it goes: it must see the live count, not a copy bound at definition
    for t, frame in _decode_in_order(o, lambda: kept < max_frames, timeout_s):  # noqa: B023 - live count
        if t < target - _EPS or kept >= max_frames:
            continue
        yield t, _rgb(scaler, frame, size)
        kept += 1
        target = (int((t + _EPS) / step) + 1) * step


def _rgb(scaler: VideoReformatter, frame: av.VideoFrame, size: tuple[int, int]) -> Image.Image:
    rgb = scaler.reformat(frame, width=size[0], height=size[1], format="rgb24", interpolation="AREA")
    return _upright(rgb.to_image(), frame.rotation)


# ---------------------------------------------------------------- shots

#: 8-bit pixel formats whose first plane is the luma (Y) plane at full size: read it without conversion.
_LUMA_FIRST = frozenset(
    {
        "yuv420p",
        "yuvj420p",
        "yuv422p",
        "yuvj422p",
        "yuv444p",
        "yuvj444p",
        "nv12",
        "nv21",
        "gray",
        "yuv411p",
        "yuv440p",
    }
)


def _luma_thumb(frame: av.VideoFrame, small: tuple[int, int], scaler: VideoReformatter):
    """A small greyscale view of ``frame`` (float32, 0..255) for cut detection.

    For the usual planar YUV formats the decoder's luma plane is sampled in place every ``k`` pixels (no
    copy of the frame, no libswscale call: measured 2x faster on 640x360 H.264 than a scaled conversion);
    other formats are converted to a ``small`` greyscale picture.
    """
    import numpy as np

    if frame.format.name in _LUMA_FIRST:
        plane = frame.planes[0]
        w, h = frame.width, frame.height
        k = max(1, min(w // small[0], h // small[1]))
        y = np.frombuffer(plane, np.uint8).reshape(-1, plane.line_size)[:h, :w]
        return y[k // 2 :: k, k // 2 :: k].astype(np.float32)
    return (
        scaler.reformat(frame, width=small[0], height=small[1], format="gray", interpolation="AREA")
        .to_ndarray()[:, : small[0]]
        .astype(np.float32)
    )


@dataclass
class Shot:
    """One shot of a video: ``[start, end)`` in seconds of the source, and its sampled frames (JPEG) with
    their absolute timestamps (seconds from the start of the source video, not of the shot)."""

    start: float
    end: float
    frames: list[bytes] = field(default_factory=list)
    ts: list[float] = field(default_factory=list)
    cut_score: float | None = None  # the frame difference that opened it (None: the first shot)


SHOT_SIDE = 48  # greyscale thumbnails compared between consecutive frames


def sample_shots(
    src: VideoSource,
    *,
    fps: float = 1.0,
    max_frames: int = 64,
    max_side: int = 384,
    factor: int = FACTOR,
    min_pixels: int = MIN_PIXELS,
    max_pixels: int | None = None,
    quality: int = 90,
    threshold: float = 0.07,
    min_shot_s: float = 1.0,
    contrast: float = 3.0,
    name: str | None = None,
    timeout_s: float | None = None,
) -> tuple[VideoInfo, list[Shot]]:
    """Split a video into shots at hard cuts and sample each shot's frames, in one in-order decode.

    Cut detection is content-based: every decoded frame is reduced to a small greyscale thumbnail (the luma
    plane sampled every few pixels), and a cut is placed where the mean absolute difference from the previous
    frame (0..1) exceeds ``threshold`` and is ``contrast`` times the average difference of the (up to 15)
    frames before it in the shot: camera motion and moving objects change a few percent of the picture
    from frame to frame, steadily; a cut to another scene changes much of it at once. The frame after the
    cut must differ from the frame before it too (a one-frame flash is not a cut), and a shot is at least
    ``min_shot_s`` long (fast motion does not make one-frame shots). A last shot shorter than that joins the
    one before.

    Frames are sampled per shot: its first frame, then every ``1/fps`` seconds from the shot's start; a
    shot with more than ``max_frames`` keeps that many, evenly spread. Raises :class:`VideoError`.
    """
    if fps <= 0 or max_frames <= 0 or max_side <= 0 or threshold <= 0 or min_shot_s < 0:
        raise ValueError("fps, max_frames, max_side and threshold must be positive, min_shot_s not negative")
    import numpy as np

    step = 1.0 / fps
    with VideoReader(src, name=name) as v:
        info = v.info
        size = frame_size(info.width, info.height, max_side, factor, min_pixels, max_pixels)
        small = _scaled_size(info.width, info.height, SHOT_SIDE)
        scaler, thumb = VideoReformatter(), VideoReformatter()
        shots = [Shot(0.0, 0.0)]
        target = 0.0
        # (t, frame, grey thumbnail, difference from the frame before): the previous, the current, the next
        # frame. A decoded frame is held only while it may still be sampled (its time has come, or it may open
        # a shot): holding every frame would keep the decoder from reusing its buffers (measured 20% slower).
        window: list[tuple[float, Any, Any, float]] = []
        recent: collections.deque[float] = collections.deque(maxlen=15)  # differences since the last cut

        def diff(x, y) -> float:
            return float(np.abs(x - y).mean()) / 255.0

        def take(i: int) -> None:
            """Decide whether window[i] opens a shot (it differs from the frame before, and so does the frame
            after it: a one-frame flash is not a cut), then sample it."""
            nonlocal target
            t, frame, _, d = window[i]
            if i > 0:
                if (
                    d > threshold
                    and t - shots[-1].start >= min_shot_s
                    and (not recent or d > contrast * sum(recent) / len(recent))
                    and (i + 1 >= len(window) or diff(window[i + 1][2], window[i - 1][2]) > threshold)
                ):
                    shots[-1].end = t
                    shots.append(Shot(t, t, cut_score=round(d, 4)))
                    target = t
                    recent.clear()
                else:
                    recent.append(d)
            if t >= target - _EPS and frame is not None:
                buf = io.BytesIO()
                _rgb(scaler, frame, size).save(buf, "JPEG", quality=quality)
                shots[-1].frames.append(buf.getvalue())
                shots[-1].ts.append(t)
                target = shots[-1].start + (int((t - shots[-1].start + _EPS) / step) + 1) * step

        for t, frame in _decode_in_order(v, lambda: True, timeout_s):
            grey = _luma_thumb(frame, small, thumb)
            d = diff(grey, window[-1][2]) if window else 0.0
            window.append((t, frame, grey, d))
            if len(window) == 1:
                take(0)  # the first frame: nothing before it, so no cut to decide
            elif len(window) == 3:
                take(1)
                window.pop(0)
            if len(window) > 1 and t < target - _EPS and d <= threshold:  # neither sampled nor a cut: let go
                window[-1] = (t, None, grey, d)
        if len(window) == 2:  # the last frame: nothing after it
            take(1)
        shots[-1].end = max(v.reached, shots[-1].ts[-1] if shots[-1].ts else 0.0)
    if len(shots) > 1 and shots[-1].end - shots[-1].start < min_shot_s:
        last = shots.pop()
        shots[-1].end = last.end
        shots[-1].frames += last.frames
        shots[-1].ts += last.ts
    for shot in shots:
        if len(shot.frames) > max_frames:
            keep = (
                [round(i * (len(shot.frames) - 1) / (max_frames - 1)) for i in range(max_frames)]
                if max_frames > 1
                else [0]
            )
            shot.frames, shot.ts = [shot.frames[i] for i in keep], [shot.ts[i] for i in keep]
    return info, shots


def _n(k: int, noun: str) -> str:
    return f"{k} {noun}" if k == 1 else f"{k} {noun}s"


def _also(problem: str | None) -> str:
    return f"; {problem}" if problem else ""


def _upright(img: Image.Image, rotation: float | None) -> Image.Image:
    """Apply the display matrix's rotation (phone videos), counter-clockwise like FFmpeg's player."""
    rot = round(rotation or 0) % 360
    if not rot:
        return img
    quarter = {
        90: Image.Transpose.ROTATE_90,
        180: Image.Transpose.ROTATE_180,
        270: Image.Transpose.ROTATE_270,
    }
    return img.transpose(quarter[rot]) if rot in quarter else img.rotate(rot, expand=True)


def _of(info: VideoInfo) -> str:
    return f" of {info.duration:.2f} s" if info.duration else ""


def _declared(info: VideoInfo) -> str:
    parts = [
        f"{info.frames} frames" if info.frames else "",
        f"{info.duration:.2f} s" if info.duration else "",
    ]
    parts = [p for p in parts if p]
    return f" (header: {', '.join(parts)})" if parts else ""


def sample_frames(
    src: VideoSource,
    *,
    fps: float = 1.0,
    max_frames: int = 64,
    min_frames: int = 4,
    max_side: int = 384,
    factor: int = FACTOR,
    min_pixels: int = MIN_PIXELS,
    max_pixels: int | None = None,
    quality: int = 90,
    name: str | None = None,
    timeout_s: float | None = None,
) -> VideoFrames:
    """Sample frames of a video as JPEG bytes with absolute timestamps.

    ``src`` is a local path, the file's bytes or a binary file object; ``name`` labels it in error
    messages (pass the URI when passing bytes). Frames are taken every ``1/fps`` seconds, at most
    ``max_frames`` spread over the whole video and at least ``min_frames`` when the video is short,
    and sized by :func:`frame_size` (longer side ``max_side``, sides in multiples of ``factor``, area within
    ``min_pixels``..``max_pixels``); decoding gives up after ``timeout_s`` seconds. Raises
    :class:`VideoError`.
    """
    with VideoReader(src, name=name) as v:
        frames, ts = [], []
        for t, img in v.frames(
            fps=fps,
            max_frames=max_frames,
            min_frames=min_frames,
            max_side=max_side,
            factor=factor,
            min_pixels=min_pixels,
            max_pixels=max_pixels,
            timeout_s=timeout_s,
        ):
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=quality)
            frames.append(buf.getvalue())
            ts.append(t)
        info = v.info
        return VideoFrames(
            frames=frames,
            ts=ts,
            duration=info.duration,
            width=info.width,
            height=info.height,
            codec=info.codec,
            fps=info.fps,
            audio=info.audio,
            ext=container_ext(info),
        )


# ---------------------------------------------------------------- clips


def container_ext(info: VideoInfo) -> str:
    """The file extension of a container FFmpeg reported (``mov,mp4,m4a,...`` -> ``mp4``)."""
    names = info.container.split(",")
    if "mp4" in names or "mov" in names:
        return "mp4"
    if "matroska" in names or "webm" in names:
        return "webm" if info.codec in ("vp8", "vp9", "av1") else "mkv"
    return names[0] or "bin"


#: Codecs whose packets an MP4 holds as they are: a shot of such a video that spans whole GOPs is copied.
_MP4_CODECS = frozenset({"h264", "hevc", "mpeg4", "av1", "vp9"})


@dataclass(frozen=True)
class Clip:
    """One span of a video as its own file: ``how`` it was made, ``copy`` (the source's packets, from the
    keyframe at its start to the one at its end) or ``encode`` (H.264, re-encoded from the decoded frames)."""

    data: bytes
    how: str


def encode_clips(
    src: VideoSource,
    spans: list[tuple[float, float]],
    *,
    max_side: int | None = None,
    crf: int = 23,
    preset: str = "veryfast",
    name: str | None = None,
    timeout_s: float | None = None,
    copy: bool = True,
) -> list[Clip]:
    """Each ``(start, end)`` span of the video (seconds, in order, not overlapping: shots) as its own MP4.

    * **Copied** when it can be (``copy``, no ``max_side`` scaling, an MP4-compatible codec): a span that
      starts on a keyframe and ends on the next span's keyframe (or at the end of the video) is the source's
      own packets in a new MP4, untouched, with timestamps from 0. Encoders place a keyframe at a hard cut
      (x264's scene-cut detection), so shots of web videos usually qualify; copying costs a demux, no
      decoding, no quality.
    * **Re-encoded** otherwise, in one in-order decode: frames with ``start <= t < end`` go to that span's
      H.264 encoder, so a clip starts exactly at its cut whatever the source's keyframes. ``max_side``
      scales down (even sides). Fragmented MP4 (``empty_moov``): written in one pass, plays everywhere web
      video does.
    """
    out: list[Clip | None] = [None] * len(spans)
    if copy and not max_side and spans:
        for k, data in _copy_spans(src, spans, name).items():
            out[k] = Clip(data, "copy")
    todo = [k for k, c in enumerate(out) if c is None]
    if todo:
        for k, data in zip(
            todo,
            _encode_spans(
                src,
                [spans[k] for k in todo],
                max_side=max_side,
                crf=crf,
                preset=preset,
                name=name,
                timeout_s=timeout_s,
            ),
        ):
            out[k] = Clip(data, "encode")
    return out  # type: ignore[return-value]


def _copy_spans(src: VideoSource, spans: list[tuple[float, float]], name: str | None) -> dict[int, bytes]:
    """The spans that start and end on keyframes, as MP4s of the source's packets (by span index)."""
    with VideoReader(src, name=name) as v:
        stream = v.stream
        if v.info.codec not in _MP4_CODECS or stream.time_base is None:
            return {}
        tb = float(stream.time_base)
        half = 0.5 / (v.info.fps or 25)
        packets, keys = [], []  # in decode order; keys: (time, index) of keyframes
        origin = stream.start_time  # times count from the stream's start, as the decoding pass counts them
        try:
            for p in v.container.demux(stream):
                if p.size and p.pts is not None and p.dts is not None:
                    if origin is None:
                        origin = p.pts
                    if p.is_keyframe:
                        keys.append(((p.pts - origin) * tb, len(packets)))
                    packets.append(p)
        except av.error.FFmpegError:
            return {}  # a damaged stream: the decoding path reports it
        if not packets:
            return {}
        last = (max(p.pts for p in packets) - origin) * tb

        def key_at(t: float) -> int | None:
            return next((i for kt, i in keys if abs(kt - t) <= half), None)

        copies = {}
        for k, (a, b) in enumerate(spans):
            first = key_at(a)
            stop = len(packets) if b >= last + half else key_at(b)
            if first is None or stop is None or stop <= first:
                continue
            copies[k] = _remux(stream, packets[first:stop], packets[first].pts)
        return copies


def _remux(stream, packets, offset: int) -> bytes:
    """Packets of ``stream`` in a new MP4, timestamps shifted so the first frame shows at 0 (the edit list
    keeps B-frame delays right: a plain MP4 with its index at the end, since an index written first would
    need a second pass over the file)."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        o = out.add_stream_from_template(stream)
        for p in packets:
            p.pts, p.dts, p.stream = p.pts - offset, p.dts - offset, o
            out.mux(p)
    return buf.getvalue()


def _encode_spans(
    src: VideoSource,
    spans: list[tuple[float, float]],
    *,
    max_side: int | None,
    crf: int,
    preset: str,
    name: str | None,
    timeout_s: float | None,
) -> list[bytes]:
    out: list[bytes] = [b""] * len(spans)
    with VideoReader(src, name=name) as v:
        info = v.info
        rate = rational_rate(info.fps or 25)
        w, h = info.width, info.height
        if max_side and max(w, h) > max_side:
            w, h = _scaled_size(w, h, max_side)
        w, h = max(2, w // 2 * 2), max(2, h // 2 * 2)
        scaler = VideoReformatter()
        k, enc = 0, None

        def finish() -> None:
            nonlocal enc
            if enc is not None:
                container, stream, buf = enc
                container.mux(stream.encode(None))
                container.close()
                out[k] = buf.getvalue()
                enc = None

        # the decoder calls the lambda as it goes: it must see the live span index, not a bound copy
        for t, frame in _decode_in_order(v, lambda: k < len(spans), timeout_s):  # noqa: B023 - live index
            while k < len(spans) and t >= spans[k][1] - _EPS:
                finish()
                k += 1
            if k >= len(spans):
                continue
            if t < spans[k][0] - _EPS:
                continue
            if enc is None:
                buf = io.BytesIO()
                container = av.open(buf, "w", format="mp4", options={"movflags": "frag_keyframe+empty_moov"})
                stream = container.add_stream("libx264", rate=rate)
                stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
                stream.options = {"crf": str(crf), "preset": preset, "threads": "1"}
                enc = (container, stream, buf)
            container, stream, _ = enc
            f = scaler.reformat(frame, width=w, height=h, format="yuv420p", interpolation="AREA")
            f.pts, f.time_base = round((t - spans[k][0]) * rate), 1 / rate
            container.mux(
                stream.encode(f)
            )  # timeout_s bounds this too: the decoder's clock runs while we encode
        finish()
    return out


def rational_rate(fps: float):
    """A frame rate as the fraction encoders want (29.97 -> 30000/1001)."""
    from fractions import Fraction

    return Fraction(fps).limit_denominator(1001)
