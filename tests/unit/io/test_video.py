"""Tests for curation.io.video (frame sampling, bad input, shots) and curation.sample.video.
Benchmark-video decontamination (curation.dedup.video): tests/unit/dedup/test_video.py."""

from __future__ import annotations

import io
import random
import struct

import av
import numpy as np
import pytest
from PIL import Image

from curation.io.video import VideoError, VideoReader, frame_size, probe, sample_frames
from curation.sample.video import make_video, reencode, transcode, trim, truncate, video_frames

# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip() -> bytes:
    return make_video(1, 0, size=(320, 240), seconds=5.0, fps=12)


def _size(jpeg: bytes) -> tuple[int, int]:
    return Image.open(io.BytesIO(jpeg)).size


def test_sample_frames_timestamps_count_sizes(clip: bytes) -> None:
    vf = sample_frames(clip)
    assert vf.ts == [0.0, 1.0, 2.0, 3.0, 4.0]
    # 320x240 in 28-pixel steps: 320/28 = 11.4 -> 308, 240/28 = 8.6 -> 252 (what the model reads)
    assert len(vf.frames) == 5 and all(_size(f) == (308, 252) for f in vf.frames)
    assert (vf.duration, vf.width, vf.height, vf.codec, vf.fps) == (5.0, 320, 240, "h264", 12.0)

    small = sample_frames(clip, max_side=160)  # 160x120 -> 168x112
    assert all(_size(f) == (168, 112) for f in small.frames)
    exact = sample_frames(clip, max_side=160, factor=1)  # the exact shape
    assert all(_size(f) == (160, 120) for f in exact.frames)
    bounded = sample_frames(clip, max_pixels=28 * 28 * 20)  # at most 20 tokens: floored to fit
    assert all(_size(f) == (140, 84) for f in bounded.frames)

    dense = sample_frames(clip, fps=4)  # 4 fps on a 12 fps grid: the first frame at or after k/4
    assert len(dense.ts) == 20
    for k, t in enumerate(dense.ts):
        assert k / 4 - 1e-9 <= t < k / 4 + 1 / 12


@pytest.mark.parametrize(
    ("size", "max_side", "kw", "want"),
    [
        ((640, 360), 384, {}, (392, 224)),  # scaled to 384x216, then to multiples of 28
        ((360, 640), 384, {}, (224, 392)),
        ((1920, 1080), 384, {}, (392, 224)),
        ((64, 48), 384, {}, (56, 56)),  # never scaled down; raised to the 4-token minimum
        ((20, 20), 384, {}, (56, 56)),
        ((640, 360), 384, {"factor": 1}, (384, 216)),
        ((640, 360), 384, {"min_pixels": 200_000}, (616, 336)),  # raised keeping the shape
        ((640, 360), 384, {"max_pixels": 28 * 28 * 40}, (224, 112)),  # floored: 32 tokens
    ],
)
def test_frame_size_rounds_to_the_models_grid(size, max_side, kw, want) -> None:
    w, h = frame_size(*size, max_side, **kw)
    assert (w, h) == want
    factor = kw.get("factor", 28)
    assert w % factor == 0 and h % factor == 0
    assert kw.get("min_pixels", 0) <= w * h <= kw.get("max_pixels", 10**9)


def test_long_videos_are_spread_short_ones_densified(clip: bytes) -> None:
    spread = sample_frames(clip, max_frames=3)  # 3 frames over 5 s, not the first 3 seconds
    assert len(spread.ts) == 3 and spread.ts[0] == 0.0 and spread.ts[-1] > 3.0
    short = sample_frames(make_video(1, 1, seconds=1.5, fps=10))
    assert len(short.ts) == 4 and short.ts == sorted(short.ts)
    assert len(sample_frames(clip, min_frames=0, fps=0.5).ts) == 3


def test_sources_path_bytes_fileobj_and_codecs(clip: bytes, tmp_path) -> None:
    path = tmp_path / "clip.mp4"
    path.write_bytes(clip)
    ref = sample_frames(clip).ts
    assert sample_frames(str(path)).ts == ref
    with open(path, "rb") as fh:
        assert sample_frames(fh).ts == ref
    with VideoReader(path) as v:
        assert [t for t, _ in v.frames()] == ref and v.info.duration == 5.0
    info = probe(clip)
    assert (info.duration, info.frames, info.codec) == (5.0, 60, "h264")
    raw = sample_frames(transcode(clip, fmt="h264"))  # an elementary stream: no timestamps, no duration
    assert raw.duration is None and raw.ts[0] == 0.0 and len(raw.ts) >= 2 and raw.ts == sorted(raw.ts)
    seen = set()
    for seed in range(6):
        copy = reencode(clip, random.Random(seed))
        vf = sample_frames(copy)
        seen.add(vf.codec)
        assert 4 <= len(vf.ts) <= 5 and vf.ts == sorted(vf.ts) and vf.ts[0] == 0.0
    assert seen == {"h264", "mpeg4", "vp9"}


def _rotated_90(mp4: bytes) -> bytes:
    """The same file with the display matrix of a phone video held upright (``rotate=90`` in
    FFmpeg's terms): the 3x3 matrix of the track header (``tkhd``, version 0) is patched in place."""
    i = mp4.index(b"tkhd")
    assert mp4[i + 4] == 0
    matrix = struct.pack(">9i", 0, -0x10000, 0, 0x10000, 0, 0, 0, 0, 0x40000000)
    return mp4[: i + 44] + matrix + mp4[i + 80 :]


def test_display_rotation_is_applied(clip: bytes) -> None:
    """Frames come out upright, as FFmpeg's player and CLI show them (checked against
    ``ffmpeg -i rotated.mp4 frame.png``, FFmpeg 5.1: the same pixels)."""
    plain, turned = sample_frames(clip, max_frames=2), sample_frames(_rotated_90(clip), max_frames=2)
    assert turned.ts == plain.ts
    for a, b in zip(plain.frames, turned.frames):
        upright = Image.open(io.BytesIO(a)).transpose(Image.Transpose.ROTATE_90)
        got = Image.open(io.BytesIO(b))
        assert got.size == (252, 308)
        diff = np.abs(np.asarray(got, dtype=np.int16) - np.asarray(upright, dtype=np.int16)).mean()
        assert diff < 3  # only JPEG re-encoding differs


def test_trim_and_reencode_cut_where_asked(clip: bytes) -> None:
    cut = trim(clip, 1.0, 3.5)
    info = probe(cut)
    assert info.duration == pytest.approx(2.5, abs=0.1) and info.codec == "h264"
    assert probe(reencode(clip, random.Random(0), start_s=2.0)).duration == pytest.approx(3.0, abs=0.2)


def test_sample_video_is_deterministic() -> None:
    assert make_video(3, 7) == make_video(3, 7)
    assert make_video(3, 7) != make_video(3, 8)
    frames, _, n = video_frames(3, 7)
    assert probe(make_video(3, 7)).frames == n and len(list(frames)) == n


# --------------------------------------------------------------------------------------------
# Bad input: a VideoError naming the source and the problem, never a crash or a hang
# --------------------------------------------------------------------------------------------


def _audio_only() -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format="wav") as c:
        s = c.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        c.mux(s.encode(frame))
        c.mux(s.encode(None))
    return buf.getvalue()


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 24), "red").save(buf, "PNG")
    return buf.getvalue()


def _half(data: bytes) -> bytes:
    return data[: len(data) // 2]


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda clip: b"", "empty"),
        (lambda clip: bytes(random.Random(0).randbytes(4000)), "not a video"),
        (lambda clip: b"<html>404 not found</html>" * 20, "not a video"),
        (lambda clip: _png(), "still image"),
        (lambda clip: _audio_only(), "no video stream"),
        (lambda clip: _half(clip), "truncated or corrupt: decoding failed after"),
        (lambda clip: clip[:2000], "truncated MP4"),
        (lambda clip: _half(transcode(clip, fmt="matroska")), "truncated: the stream ends at"),
        (lambda clip: _half(transcode(clip, fmt="mov")), "no 'moov' box"),  # index at the end: cut off
    ],
)
def test_bad_input_gets_a_clear_error(clip: bytes, make, expected: str) -> None:
    with pytest.raises(VideoError) as e:
        sample_frames(make(clip), name="s3://bucket/v/0001.mp4")
    assert str(e.value).startswith("s3://bucket/v/0001.mp4: ")
    assert expected in str(e.value)
    assert isinstance(e.value, ValueError)


def test_truncation_says_how_far_decoding_got(clip: bytes, tmp_path) -> None:
    path = tmp_path / "cut.mp4"
    path.write_bytes(clip[: len(clip) // 2])
    with pytest.raises(VideoError) as e:
        sample_frames(path)
    assert str(e.value).startswith(str(path))
    assert 0 < e.value.frames_decoded < 60 and 0 < e.value.seconds_decoded < 5.0
    assert f"{e.value.frames_decoded} frames" in str(e.value) and "of 5.00 s" in str(e.value)
    # a cut after the last sampling time is still caught (remaining packets are read, not decoded)
    with pytest.raises(VideoError, match="truncated"):
        sample_frames(clip[: int(len(clip) * 0.8)], max_frames=2)
    with pytest.raises(VideoError, match="no such file"):
        sample_frames(tmp_path / "missing.mp4")


def test_truncate_helper_always_gives_an_error() -> None:
    for k in range(8):
        data = make_video(2, k)
        with pytest.raises(VideoError):
            sample_frames(truncate(data, random.Random(k)))


def _scenes_with_keyframes_at_cuts(preset: str = "veryfast") -> tuple[bytes, list[tuple[float, float]]]:
    """Three 2-second scenes at 12 fps; x264 with B-frames, an I-frame forced at each cut (as its scene-cut
    detection places one at a hard cut)."""
    frames, cuts = [], []
    for j in range(3):
        part, _, _ = video_frames(5, 100 + j, size=(320, 240), seconds=2.0, fps=12)
        cuts.append(len(frames))
        frames += list(part)
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as c:
        s = c.add_stream("libx264", rate=12)
        s.width, s.height, s.pix_fmt = 320, 240, "yuv420p"
        s.options = {"preset": preset, "threads": "1", "scenecut": "0"}
        for i, im in enumerate(frames):
            f = av.VideoFrame.from_image(im).reformat(format="yuv420p")
            f.pts = i
            if i in cuts:
                f.pict_type = av.video.frame.PictureType.I
            c.mux(s.encode(f))
        c.mux(s.encode(None))
    return buf.getvalue(), [(0.0, 2.0), (2.0, 4.0), (4.0, 6.0)]


def _decoded(data: bytes) -> list[tuple[float, np.ndarray]]:
    with av.open(io.BytesIO(data)) as c:
        return [
            (round(float(f.pts * f.time_base), 3), f.to_ndarray(format="gray")) for f in c.decode(video=0)
        ]


def test_shots_on_keyframes_are_copied_packet_for_packet() -> None:
    from curation.io.video import encode_clips

    data, spans = _scenes_with_keyframes_at_cuts()
    clips = encode_clips(data, spans)
    assert [c.how for c in clips] == ["copy", "copy", "copy"]
    source = _decoded(data)
    for k, (clip, (a, b)) in enumerate(zip(clips, spans)):
        frames = _decoded(clip.data)
        assert [t for t, _ in frames] == [
            round(i / 12, 3) for i in range(24)
        ]  # from 0, every frame, in order
        want = [img for t, img in source if a - 1e-6 <= t < b - 1e-6]
        assert all(np.array_equal(x, y) for (_, x), y in zip(frames, want))  # the same pixels: not re-encoded
        assert probe(clip.data).codec == "h264"
    # scaling, or copy=False, re-encodes; so does a span that does not start on a keyframe
    assert [c.how for c in encode_clips(data, spans, max_side=160)] == ["encode"] * 3
    assert [c.how for c in encode_clips(data, spans, copy=False)] == ["encode"] * 3
    mixed = encode_clips(data, [(0.0, 2.0), (2.5, 4.0), (4.0, 6.0)])
    assert [c.how for c in mixed] == ["copy", "encode", "copy"]
    assert len(_decoded(mixed[1].data)) == 18


def test_shots_between_keyframes_are_re_encoded_from_their_cut() -> None:
    from curation.io.video import encode_clips

    data, _ = _scenes_with_keyframes_at_cuts()
    shifted = [(0.0, 1.5), (1.5, 6.0)]  # 1.5 s is no keyframe: neither span can be copied whole
    clips = encode_clips(data, shifted)
    assert [c.how for c in clips] == ["encode", "encode"]
    assert [len(_decoded(c.data)) for c in clips] == [18, 54]


def test_files_cut_inside_the_stream_header_are_video_errors() -> None:
    """Cut 348-360 bytes in, this mp4's stream has no decoder context yet: a VideoError, never an
    AttributeError."""
    data = make_video(0, 1, size=(64, 48), seconds=1.0, fps=5)
    for n in range(300, 400, 3):
        with pytest.raises(VideoError):
            sample_frames(data[:n])


def test_media_references_to_devices_are_refused() -> None:
    from curation.io import fs as cfs

    with pytest.raises(OSError, match="not a regular file: /dev/zero"):
        cfs.read_bytes("/dev/zero")  # a hostile corpus's video: would be read forever
