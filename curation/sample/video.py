"""Deterministic synthetic videos for the sample corpus, the tests and the benchmarks.

Why this exists: video decontamination has to be tested on benchmark videos and on copies of them
that went through what copies go through on the web (another codec, a lower bitrate, a smaller
size, a lower frame rate, a cut at both ends) without anyone's private videos. These videos are
small (160x120 .. 320x240, 3-8 s, 10-15 fps, 20-150 KB) and cheap (about 30 ms each on one core,
most of it in the encoder).

Content: a *world* of 2x2 drawn scenes (:func:`curation.sample.scenes.make_scene` /
:func:`~curation.sample.scenes.draw_scene`) larger than the frame, a camera that pans across it along a
seeded path, and one to three shapes that move across the view. Frames therefore change over time
(a frame hash is not the same for the whole video) and different videos differ; like the sample
images they are flat-colour drawings, which is the hard case for perceptual hashes (unrelated
drawings with the same layout hash alike), so false-positive rates measured on them are
pessimistic.

Determinism: every video draws from ``curation.sample.seeding._rng(seed, "video", idx)`` and libx264 runs
single-threaded, so the same ``(seed, idx)`` gives the same bytes in any process (with the same
FFmpeg build).

    >>> data = make_video(0, 1)                        # mp4/h264, moov first (web "faststart")
    >>> copy = trim(reencode(data, random.Random(3)), 0.8, 3.5)
    >>> broken = truncate(data, random.Random(3))      # cut mid-file, for bad-input tests
"""

from __future__ import annotations

import io
import itertools
import math
import os
import random
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np
from av.video.reformatter import VideoReformatter
from PIL import Image, ImageDraw, ImageFont

from curation.io.video import rational_rate
from curation.sample.scenes import COLOUR_NAMES, COLOURS, draw_scene, make_scene
from curation.sample.seeding import _rng

__all__ = ["SIZES", "make_video", "reencode", "transcode", "trim", "truncate", "video_frames"]

#: Frame sizes of generated videos (4:3 and 16:9, all even: yuv420p needs even sides).
SIZES = ((160, 120), (192, 144), (224, 168), (256, 192), (320, 240), (256, 144), (320, 180))
_FPS = (10, 12, 15)
_WORLD_SCALE = (1.5, 2.2)  # world side / frame side: how far the camera can pan
_PAN_SPEED = 0.25  # frame sides per second, at most
_X264 = {"preset": "ultrafast", "threads": "1"}

# Re-encoding targets of :func:`reencode`: (codec, container format, options drawn from the rng).
_TARGETS = (
    (
        "libx264",
        "mp4",
        lambda r: {
            "preset": r.choice(("ultrafast", "superfast")),
            "threads": "1",
            "crf": str(r.randint(26, 38)),
        },
    ),
    ("mpeg4", "avi", lambda r: {"qscale": str(r.randint(4, 12)), "threads": "1"}),
    (
        "libvpx-vp9",
        "webm",
        lambda r: {
            "crf": str(r.randint(35, 50)),
            "b": "0",
            "deadline": "realtime",
            "cpu-used": "8",
            "threads": "1",
            "row-mt": "0",
        },
    ),
)


def video_frames(
    seed: int,
    idx: int,
    *,
    size: tuple[int, int] | None = None,
    seconds: float | None = None,
    fps: int | None = None,
) -> tuple[Iterator[Image.Image], int, int]:
    """The frames of video ``idx`` of corpus ``seed`` before encoding: ``(frames, fps, n_frames)``.

    ``frames`` yields RGB PIL images lazily (one world is drawn once, then every frame is a crop
    of it with the moving shapes drawn on top). For tests that need many unrelated videos' frames
    without paying for a codec; :func:`make_video` encodes exactly these frames.
    """
    rng = _rng(seed, "video", idx)
    w, h = size or rng.choice(SIZES)
    seconds = seconds if seconds is not None else rng.uniform(3.0, 8.0)
    fps = fps or rng.choice(_FPS)
    n = max(1, round(seconds * fps))
    k = rng.uniform(*_WORLD_SCALE)
    ww, wh = round(w * k), round(h * k)
    world = Image.new("RGB", (ww, wh))
    tw, th = (ww + 1) // 2, (wh + 1) // 2
    for tx in range(2):
        for ty in range(2):
            world.paste(draw_scene(make_scene(rng), tw, th), (tx * tw, ty * th))
    # camera: an eased straight pan, at most PAN_SPEED frame sides per second (a hand-held or
    # tripod pan, whatever the video's length), kept inside the world
    x0, y0 = rng.uniform(0, ww - w), rng.uniform(0, wh - h)
    x1 = min(ww - w, max(0.0, x0 + rng.uniform(-1, 1) * _PAN_SPEED * w * seconds))
    y1 = min(wh - h, max(0.0, y0 + rng.uniform(-1, 1) * _PAN_SPEED * h * seconds))
    sprites = [_sprite(rng, w, h) for _ in range(rng.randint(1, 3))]

    def frames() -> Iterator[Image.Image]:
        for i in range(n):
            u = i / max(1, n - 1)
            e = u * u * (3 - 2 * u)  # smoothstep: the camera starts and stops gently
            x, y = round(x0 + (x1 - x0) * e), round(y0 + (y1 - y0) * e)
            img = world.crop((x, y, x + w, y + h))
            draw = ImageDraw.Draw(img)
            for sp in sprites:
                _draw_sprite(draw, sp, i / fps)
            yield img

    return frames(), fps, n


def make_video(
    seed: int,
    idx: int,
    *,
    size: tuple[int, int] | None = None,
    seconds: float | None = None,
    fps: int | None = None,
) -> bytes:
    """Video ``idx`` of corpus ``seed``: mp4 (h264, yuv420p, moov first), 20-150 KB.

    ``size``, ``seconds`` and ``fps`` override the seeded choices (160x120 .. 320x240, 3-8 s,
    10/12/15 fps).
    """
    frames, fps, _ = video_frames(seed, idx, size=size, seconds=seconds, fps=fps)
    first = next(frames)
    return _encode(
        itertools.chain([first], frames), *first.size, fps, "libx264", "mp4", dict(_X264, crf="23")
    )


@dataclass
class _Sprite:
    shape: str
    colour: tuple[int, int, int]
    r: float
    x: float
    y: float
    vx: float
    vy: float


def _sprite(rng: random.Random, w: int, h: int) -> _Sprite:
    """A shape moving across the view at 5-25% of the frame width per second, bouncing off edges."""
    r = rng.uniform(0.06, 0.14) * min(w, h)
    speed = rng.uniform(0.05, 0.25) * w
    ang = rng.uniform(0, 2 * math.pi)
    return _Sprite(
        rng.choice(("circle", "square", "triangle")),
        COLOURS[rng.choice(COLOUR_NAMES)],
        r,
        rng.uniform(r, w - r),
        rng.uniform(r, h - r),
        speed * math.cos(ang),
        speed * math.sin(ang),
    )


def _draw_sprite(draw: ImageDraw.ImageDraw, sp: _Sprite, t: float) -> None:
    w, h = draw.im.size
    x = _bounce(sp.x + sp.vx * t, sp.r, w - sp.r)
    y = _bounce(sp.y + sp.vy * t, sp.r, h - sp.r)
    r = sp.r
    if sp.shape == "circle":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=sp.colour)
    elif sp.shape == "square":
        draw.rectangle([x - r, y - r, x + r, y + r], fill=sp.colour)
    else:
        draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=sp.colour)


def _bounce(v: float, lo: float, hi: float) -> float:
    """``v`` reflected into [lo, hi] (a ball bouncing off the frame edges)."""
    span = hi - lo
    if span <= 0:
        return lo
    m = (v - lo) % (2 * span)
    return lo + (m if m <= span else 2 * span - m)


def _encode(
    frames: Iterable[Image.Image | av.VideoFrame],
    w: int,
    h: int,
    fps: float,
    codec: str,
    fmt: str,
    options: dict[str, str],
) -> bytes:
    """Encode PIL images (or ``av.VideoFrame``) at a constant ``fps``; returns the file's bytes.

    MP4 goes through a temporary file: the muxer's ``faststart`` (moov box first, as on the web)
    needs to reopen its output, which a Python file object does not allow.
    """
    faststart = fmt == "mp4"
    fd, path = tempfile.mkstemp(suffix=f".{fmt}") if faststart else (None, None)
    if fd is not None:
        os.close(fd)
    out = path if faststart else io.BytesIO()
    try:
        # bitexact: no random segment UID or muxing date (Matroska), so the same frames give the same bytes
        with av.open(
            out, "w", format=fmt, options={"movflags": "faststart"} if faststart else {"fflags": "+bitexact"}
        ) as c:
            s = c.add_stream(codec, rate=rational_rate(fps))
            s.width, s.height, s.pix_fmt = w, h, "yuv420p"
            s.options = options
            tb = Fraction(1) / s.codec_context.framerate
            for i, img in enumerate(frames):
                f = img if isinstance(img, av.VideoFrame) else av.VideoFrame.from_image(img)
                f.pts, f.time_base = i, tb
                c.mux(s.encode(f))
            c.mux(s.encode(None))
        if faststart:
            with open(path, "rb") as fh:
                return fh.read()
        return out.getvalue()
    finally:
        if path:
            os.unlink(path)


def transcode(
    data: bytes,
    *,
    codec: str = "libx264",
    fmt: str = "mp4",
    options: dict[str, str] | None = None,
    scale: float = 1.0,
    fps: float | None = None,
    start: float = 0.0,
    end: float | None = None,
) -> bytes:
    """Re-encode ``data``: keep frames with ``start <= t < end``, scale, resample to ``fps``.

    The output starts at t=0 (as ``ffmpeg -ss START -to END -i X ...`` does) and has a constant
    frame rate: ``fps`` (default: the input's). Frames are dropped or repeated by timestamp, like
    ffmpeg's ``fps`` filter. Sides are rounded to even numbers (yuv420p). The decoded clip is held
    in memory: this is for the small videos of this module.
    """
    with av.open(io.BytesIO(data)) as c:
        s = c.streams.video[0]
        src_fps = float(s.average_rate or s.guessed_rate or 25)
        out_fps = fps or src_fps
        w = max(2, round(s.codec_context.width * scale / 2) * 2)
        h = max(2, round(s.codec_context.height * scale / 2) * 2)
        origin = s.start_time or 0
        scaler = VideoReformatter()  # reused: a new libswscale context per frame costs ~1 ms
        out: list[av.VideoFrame] = []
        for f in c.decode(s):
            t = float((f.pts - origin) * f.time_base)
            if t < start - 1e-6 or (end is not None and t >= end - 1e-6):
                continue
            # emit this frame for every output slot it covers (drop when it covers none)
            while len(out) / out_fps <= t - start + 0.5 / src_fps:
                out.append(scaler.reformat(f, width=w, height=h, format="yuv420p", interpolation="AREA"))
    if not out:
        raise ValueError(f"no frames between {start} s and {end} s")
    return _encode(out, w, h, out_fps, codec, fmt, options if options is not None else dict(_X264))


def reencode(data: bytes, rng: random.Random, *, start_s: float = 0.0, end_s: float | None = None) -> bytes:
    """A copy as the web makes them: another codec and container (h264/mp4, MPEG-4 Part 2/avi,
    VP9/webm) at a lower quality, 0.5x-1x the size, and in one case out of three a lower frame
    rate (2/3 of the original). ``start_s``/``end_s`` also trim it, in the same pass."""
    codec, fmt, opts = rng.choice(_TARGETS)
    options = opts(rng)
    scale = rng.uniform(0.5, 1.0)
    with av.open(io.BytesIO(data)) as c:
        src_fps = float(c.streams.video[0].average_rate)
    fps = src_fps * 2 / 3 if rng.random() < 1 / 3 else None
    return transcode(
        data, codec=codec, fmt=fmt, options=options, scale=scale, fps=fps, start=start_s, end=end_s
    )


def trim(data: bytes, start_s: float, end_s: float) -> bytes:
    """The part of the video between ``start_s`` and ``end_s`` (seconds), re-encoded to h264/mp4."""
    return transcode(data, start=start_s, end=end_s)


def truncate(data: bytes, rng: random.Random) -> bytes:
    """The first 20-90% of the file: a download cut short. For an mp4 with its index (moov) first
    the decoder fails part-way; with the index last the file cannot even be opened."""
    return data[: int(len(data) * rng.uniform(0.2, 0.9))]


# ------------------------------------------------------------- the kinds of video the sample corpus mixes in


def _x264(frames: list[Image.Image], fps: int) -> bytes:
    return _encode(frames, *frames[0].size, fps, "libx264", "mp4", dict(_X264, crf="23"))


def make_multi_shot(seed: int, idx: int, shots: int) -> bytes:
    """``shots`` unrelated scenes (each a panning video of its own) joined by hard cuts; same size and
    rate."""
    rng = _rng(seed, "multi-shot", idx)
    size, fps = rng.choice(SIZES), rng.choice(_FPS)
    frames: list[Image.Image] = []
    for j in range(shots):
        part, _, _ = video_frames(
            seed, idx * 16 + j + 7_000_000, size=size, seconds=rng.uniform(1.5, 3.0), fps=fps
        )
        frames += list(part)
    return _x264(frames, fps)


def make_static(seed: int, idx: int) -> bytes:
    """One drawn picture held for 3-6 s: a slideshow frame, a title card."""
    rng = _rng(seed, "static", idx)
    frames, fps, _ = video_frames(seed, idx + 8_000_000, seconds=0.1)
    still = next(frames)
    return _x264([still] * round(rng.uniform(3, 6) * fps), fps)


def make_black(seed: int, idx: int) -> bytes:
    """3-6 s of black (a dead stream, a blank export), with faint noise as a camera would give."""
    rng = _rng(seed, "black", idx)
    w, h = rng.choice(SIZES)
    fps = rng.choice(_FPS)
    noise = np.random.default_rng(rng.getrandbits(64))
    frames = [
        Image.fromarray(noise.integers(0, 4, (h, w, 3), dtype=np.uint8))
        for _ in range(round(rng.uniform(3, 6) * fps))
    ]
    return _x264(frames, fps)


def make_burned_text(seed: int, idx: int, text: str) -> bytes:
    """A panning video with ``text`` burned into the lower third, like subtitles."""
    frames, fps, _ = video_frames(seed, idx + 9_000_000)
    frames = list(frames)
    w, h = frames[0].size
    font = ImageFont.load_default(size=max(10, h // 10))
    out = []
    for f in frames:
        d = ImageDraw.Draw(f)
        box = d.textbbox((0, 0), text, font=font)
        x, y = max(2, (w - (box[2] - box[0])) // 2), h - (box[3] - box[1]) - h // 12
        d.rectangle((x - 4, y - 2, x + box[2] - box[0] + 4, y + box[3] - box[1] + 4), fill=(0, 0, 0))
        d.text((x, y - box[1]), text, fill=(255, 255, 255), font=font)
        out.append(f)
    return _x264(out, fps)


def make_audio_only(seed: int, idx: int) -> bytes:
    """An MP4 with an AAC tone and no video stream (a podcast in a video folder)."""
    rng = _rng(seed, "audio", idx)
    rate, seconds, pitch = 16_000, rng.uniform(2, 4), rng.uniform(220, 880)
    fd, path = tempfile.mkstemp(suffix=".mp4")
    os.close(fd)
    try:
        with av.open(path, "w", format="mp4") as c:
            s = c.add_stream("aac", rate=rate)
            s.layout = "mono"
            t = np.arange(int(rate * seconds)) / rate
            pcm = (0.2 * np.sin(2 * np.pi * pitch * t)).astype(np.float32)
            for lo in range(0, len(pcm), 1024):
                frame = av.AudioFrame.from_ndarray(pcm[None, lo : lo + 1024], format="fltp", layout="mono")
                frame.sample_rate, frame.pts = rate, lo
                c.mux(s.encode(frame))
            c.mux(s.encode(None))
        with open(path, "rb") as fh:
            return fh.read()
    finally:
        os.unlink(path)


def other_container(data: bytes, ext: str) -> tuple[bytes, str]:
    """The same video as ``webm`` (VP9) or ``mkv`` (h264 in Matroska): containers and codecs web video
    comes in."""
    if ext == "webm":
        return transcode(
            data,
            codec="libvpx-vp9",
            fmt="webm",
            options={"crf": "40", "b": "0", "deadline": "realtime", "cpu-used": "8", "threads": "1"},
        ), "webm"
    return transcode(data, codec="libx264", fmt="matroska", options=dict(_X264, crf="23")), "mkv"
