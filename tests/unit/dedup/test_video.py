"""Benchmark-video decontamination (curation.dedup.video): recall on re-encoded, trimmed copies and
false positives on unrelated videos.

The false-positive rate asserted here is measured on 1,000 unrelated videos' frames (rendered,
not encoded, to fit the time budget) plus 40 encoded ones; ``benchmarks/bench_video.py`` measures
it on 6,000 encoded videos against 200 benchmark videos (0 false positives, see BENCHMARKS.md).
"""

from __future__ import annotations

import io
import pickle
import random

import pytest
from PIL import Image

from curation.dedup.video import VideoHashIndex
from curation.io.video import probe, sample_frames
from curation.sample.video import make_video, reencode, trim, video_frames

BENCH_SEED, CLEAN_SEED = 11, 12
N_BENCH = 50
N_SHORT = 5  # benchmark videos of 1.2-2 s among the N_BENCH: the hard case for a temporal check


def _bench_video(i: int) -> bytes:
    if i < N_SHORT:
        return make_video(BENCH_SEED, i, seconds=1.2 + 0.2 * i)
    return make_video(BENCH_SEED, i)


@pytest.fixture(scope="module")
def bench() -> list[tuple[str, bytes]]:
    return [(f"bench/{i:03d}", _bench_video(i)) for i in range(N_BENCH)]


@pytest.fixture(scope="module")
def index(bench) -> VideoHashIndex:
    return VideoHashIndex.build(bench)


def _copies(data: bytes, rng: random.Random) -> list[bytes]:
    """Two copies: re-encoded and trimmed in one pass, and re-encoded, then trimmed (two generations).
    Each cut removes 0-30% of the duration from the start and 0-30% from the end."""
    d = probe(data).duration
    out = []
    for two_generations in (False, True):
        a, b = rng.uniform(0, 0.3) * d, d - rng.uniform(0, 0.3) * d
        if two_generations:
            out.append(trim(reencode(data, rng), a, b))
        else:
            out.append(reencode(data, rng, start_s=a, end_s=b))
    return out


def test_recall_on_reencoded_trimmed_copies(index: VideoHashIndex, bench) -> None:
    assert len(index) == N_BENCH and not index.skipped
    total = found = top = 0
    for key, data in bench:
        rng = random.Random(f"copy/{key}")
        for copy in _copies(data, rng):
            vf = sample_frames(copy)
            hits = index.query(vf.frames, vf.ts)
            total += 1
            found += any(k == key for k, _ in hits)
            top += bool(hits) and hits[0][0] == key
    assert total == 2 * N_BENCH
    assert found / total >= 0.99, f"recall {found}/{total}"
    assert top == found


def _rendered_samples(seed: int, idx: int) -> tuple[list[bytes], list[float]]:
    """A 1-fps row of an unrelated video, rendered at 1 fps without a codec (a row that carries its
    frames): the codec changes frame hashes by a few bits, far less than unrelated content does."""
    frames, _, _ = video_frames(seed, idx, fps=1)
    out, ts = [], []
    for i, img in enumerate(frames):
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
        ts.append(float(i))
    return out, ts


def test_false_positives_on_unrelated_videos(index: VideoHashIndex) -> None:
    n_rendered, n_encoded = 1000, 40
    fp = sum(bool(index.query(*_rendered_samples(CLEAN_SEED, i))) for i in range(n_rendered))
    for i in range(n_encoded):
        vf = sample_frames(make_video(CLEAN_SEED + 1, i))
        fp += bool(index.query(vf.frames, vf.ts))
    assert fp <= 0.001 * (n_rendered + n_encoded), f"{fp} false positives"


@pytest.mark.parametrize("which", [N_BENCH - 1, N_SHORT - 1])
def test_benchmark_clip_inside_a_longer_video(index: VideoHashIndex, bench, which: int) -> None:
    """Frames of an unrelated video, a benchmark video, and unrelated again, all at 1 fps: found,
    also when the benchmark video lasts 2 s and so puts only two frames into the row."""
    key, data = bench[which]
    clip = sample_frames(data, min_frames=0)
    parts = [
        _rendered_samples(CLEAN_SEED + 2, 0),
        (clip.frames, clip.ts),
        _rendered_samples(CLEAN_SEED + 2, 1),
    ]
    frames, ts, t0 = [], [], 0.0
    for f, t in parts:
        frames += f
        ts += [t0 + x for x in t]
        t0 = ts[-1] + 1.0
    hits = index.query(frames, ts)
    assert hits and hits[0][0] == key and len(frames) > 2 * len(clip.frames)


def test_query_inputs_and_edge_cases(index: VideoHashIndex, bench) -> None:
    key, data = bench[N_SHORT]
    vf = sample_frames(data)
    as_bytes = index.query(vf.frames, vf.ts)
    assert as_bytes[0] == (key, 1.0)
    assert index.query([Image.open(io.BytesIO(f)) for f in vf.frames], vf.ts)[0][0] == key
    assert index.query(vf.frames[:1], vf.ts[:1]) == []  # one frame is an image, not a video
    assert index.query([b"not a jpeg"] * 3, [0.0, 1.0, 2.0]) == []
    # shuffled timestamps break the time order: no consistent offset, no match
    assert index.query(vf.frames, list(reversed(vf.ts))) == []
    with pytest.raises(ValueError):
        index.query(vf.frames, vf.ts[:-1])


def test_index_is_compact_picklable_and_skips_bad_videos(index: VideoHashIndex, bench) -> None:
    blob = pickle.dumps(index)
    assert len(blob) < 40 * len(index.phashes) + 100 * len(index)
    again = pickle.loads(blob)
    vf = sample_frames(bench[7][1])
    assert again.query(vf.frames, vf.ts) == index.query(vf.frames, vf.ts)
    small = VideoHashIndex.build([("ok", bench[7][1]), ("junk", b"junk" * 100), ("cut", bench[8][1][:1500])])
    assert small.keys == ["ok"]
    assert [k for k, _ in small.skipped] == ["junk", "cut"]
    assert "not a video" in small.skipped[0][1]
