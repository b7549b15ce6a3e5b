"""Benchmark-video decontamination: perceptual hashes of sampled frames, checked for time order.

A copy of a benchmark video on the web is rarely the same file: it was re-encoded (another codec,
bitrate, size, frame rate) and often cut at both ends. Its frames, though, still look like the
benchmark's frames at the same moments. So:

* **Build** (once, on the driver): :meth:`VideoHashIndex.build` samples every benchmark video
  densely (``fps=4``) and keeps, per frame, the 64-bit pHash and dHash of
  :mod:`curation.dedup.image`, the frame's timestamp and the video it came from -- four flat numpy
  arrays, 24 bytes per frame (a 10-minute benchmark video: 2,400 frames, 56 KB), picklable,
  put into the Ray object store once and shared by every worker.
* **Query** (per corpus row): the row's frames (sampled sparsely, 1 fps, by the reader) are hashed
  and compared with every index frame (vectorised XOR + popcount). A query frame *matches* an index
  frame when both hashes are within their Hamming radius. Matches then vote for a *time offset*
  (index timestamp minus query timestamp): a copy, trimmed or not, matches its benchmark at one
  offset (the amount cut from the start), while chance matches between unrelated videos scatter
  over many offsets. For each benchmark video the count is the number of distinct query frames that
  match within one offset window; the score is that count over the number of query frames that
  could overlap the benchmark video (all of them, unless the query is longer than the benchmark).

Defaults and why (measured with ``benchmarks/bench_video.py`` and ``tests/unit/io/test_video.py`` on the
synthetic videos of :mod:`curation.sample.video`: flat-colour drawings, the hard case where
unrelated frames with the same layout hash alike):

* ``fps=4`` at build: the nearest index frame is at most 0.125 s from any query frame, so even a
  copy at another frame rate, sampled at other moments, finds a frame seen less than an eighth of a
  second away. Index size and query cost grow linearly with it; for fast-moving benchmarks (sports)
  8 fps is the safer choice (on the synthetic set it made dHash 14 enough).
* ``radius=12`` (pHash) and ``dhash_radius=16``: frames of copies (re-encoded to h264, MPEG-4 or
  VP9 at low quality, 0.5-1x the size, some at 2/3 the frame rate, cut at both ends) lie within
  pHash 10 / dHash 12 of their benchmark frame at the 99th percentile (max 14 / 18); 99.8% of them
  match. Unrelated flat drawings come close in one hash or the other (1% of their frames are within
  pHash 12, 1% within dHash 9 of some index frame), but only 0.2% match both, and those never line
  up in time. With dHash 14 one copy in 400 lost too many frames; with 14 / 18, two-frame chance
  alignments appear (``benchmarks/bench_video.py`` prints these numbers).
* ``offset_tolerance=0.5`` s: the width of an offset bin. Index sampling (0.125 s), frame-rate
  changes (up to a frame, 0.1 s at 10 fps) and slowly changing content (a frame matches its
  neighbours too) spread a true offset over a few tenths of a second; windows of two adjacent bins
  are counted, so a true offset never straddles a bin edge.
* ``min_matches=3`` and ``min_score=0.5``: a verdict rests on at least three time-consistent frames
  and on at least half the frames that could match. One matching frame is what unrelated drawings
  of the same layout produce; three at one offset is rare (even two never happened in 6,000
  unrelated videos). Short videos still get three frames, as
  :func:`curation.io.video.sample_frames` samples videos under 4 s more densely (``min_frames=4``);
  when fewer than ``min_matches`` frames could match (a row of two frames, a 2-second benchmark
  clip inside a longer row sampled at 1 fps), all of those must match, and never fewer than two.

Limits: time-stretched copies (played faster or slower) break the constant offset; mirrored,
cropped or overlaid copies change the frame hashes (as for images); a short benchmark clip inside
a long corpus video is seen only if the row's sampling puts two or more frames inside it (at
``max_frames=64`` a 10-minute video is sampled every 9.4 s); a row of one frame is an image (use
:class:`~curation.dedup.image.ImageHashIndex`). Query cost is brute force, linear in
the index: under a millisecond per query frame for a million index frames (69 hours of video at
4 fps) on one core (see ``BENCHMARKS.md``).

    >>> index = VideoHashIndex.build([("mvbench/0001", "/bench/0001.mp4"), ...])
    >>> index.query(row["frames"], row["frame_ts"])
    [('mvbench/0001', 1.0)]
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from curation.dedup.image import hamming, hash_batch
from curation.io.video import VideoError, VideoReader, VideoSource

__all__ = [
    "DEFAULT_DHASH_RADIUS",
    "DEFAULT_RADIUS",
    "VideoHashIndex",
    "clusters",
    "frame_hashes",
    "near_duplicate_pairs",
]

log = logging.getLogger(__name__)

#: pHash Hamming radius for a frame match (the module docstring says how it was chosen).
DEFAULT_RADIUS = 12
#: dHash Hamming radius; a frame matches only when both hashes are within radius.
DEFAULT_DHASH_RADIUS = 16


class VideoHashIndex:
    """Frame hashes of benchmark videos, queried with a row's sampled frames and timestamps.

    State (all numpy, so pickling for ``ray.put`` is a memory copy): per index frame ``phashes``
    and ``dhashes`` (``uint64``), ``ts`` (``float32`` seconds) and ``video`` (``int32`` position in
    ``keys``); per video ``keys`` and ``durations``. Benchmark videos that could not be read are
    listed in ``skipped`` as ``(key, reason)``.
    """

    __slots__ = (
        "dhash_radius",
        "dhashes",
        "durations",
        "keys",
        "min_matches",
        "min_score",
        "offset_tolerance",
        "phashes",
        "radius",
        "skipped",
        "ts",
        "video",
    )

    def __init__(
        self,
        phashes: np.ndarray,
        dhashes: np.ndarray,
        ts: np.ndarray,
        video: np.ndarray,
        keys: Sequence[str],
        durations: Sequence[float],
        *,
        radius: int = DEFAULT_RADIUS,
        dhash_radius: int = DEFAULT_DHASH_RADIUS,
        offset_tolerance: float = 0.5,
        min_matches: int = 3,
        min_score: float = 0.5,
        skipped: Sequence[tuple[str, str]] = (),
    ) -> None:
        self.phashes = np.ascontiguousarray(phashes, dtype=np.uint64)
        self.dhashes = np.ascontiguousarray(dhashes, dtype=np.uint64)
        self.ts = np.ascontiguousarray(ts, dtype=np.float32)
        self.video = np.ascontiguousarray(video, dtype=np.int32)
        self.keys = list(keys)
        self.durations = np.ascontiguousarray(durations, dtype=np.float32)
        if not (len(self.phashes) == len(self.dhashes) == len(self.ts) == len(self.video)):
            raise ValueError("phashes, dhashes, ts and video must have the same length")
        if len(self.keys) != len(self.durations):
            raise ValueError("keys and durations must have the same length")
        self.radius = int(radius)
        self.dhash_radius = int(dhash_radius)
        self.offset_tolerance = float(offset_tolerance)
        self.min_matches = int(min_matches)
        self.min_score = float(min_score)
        self.skipped = list(skipped)

    @classmethod
    def build(
        cls,
        videos: Iterable[tuple[str, VideoSource]],
        *,
        fps: float = 4.0,
        max_frames: int = 4096,
        max_side: int = 256,
        batch_size: int = 512,
        **kwargs: Any,
    ) -> VideoHashIndex:
        """Index ``(key, video)`` pairs; ``video`` is anything :func:`~curation.io.video.sample_frames` reads.

        Every video is sampled at ``fps`` (at most ``max_frames`` frames, spread over longer
        videos) and every sampled frame is hashed; ``max_side`` only needs to keep the frames well
        above the hashes' 32 px working size. ``kwargs`` are the matching parameters of the
        constructor. A video that cannot be read is skipped, logged and listed in ``skipped``.
        """
        ph, dh, ts, vid, keys, durations, skipped = [], [], [], [], [], [], []
        for key, src in videos:
            key = str(key)
            try:
                p, d, t, duration = _hash_video(
                    src, key, fps=fps, max_frames=max_frames, max_side=max_side, batch_size=batch_size
                )
            except VideoError as e:
                log.warning("benchmark video skipped: %s", e)
                skipped.append((key, e.problem))
                continue
            ph.append(p)
            dh.append(d)
            ts.append(t)
            vid.append(np.full(len(p), len(keys), dtype=np.int32))
            keys.append(key)
            durations.append(duration)
        cat = lambda xs, dt: np.concatenate(xs) if xs else np.zeros(0, dt)
        return cls(
            cat(ph, np.uint64),
            cat(dh, np.uint64),
            cat(ts, np.float32),
            cat(vid, np.int32),
            keys,
            durations,
            skipped=skipped,
            **kwargs,
        )

    def __len__(self) -> int:
        return len(self.keys)

    def __repr__(self) -> str:
        return (
            f"VideoHashIndex({len(self)} videos, {len(self.phashes)} frames, radius={self.radius}, "
            f"dhash_radius={self.dhash_radius}, min_matches={self.min_matches}, "
            f"min_score={self.min_score})"
        )

    def __getstate__(self) -> dict:
        return {s: getattr(self, s) for s in self.__slots__}

    def __setstate__(self, state: dict) -> None:
        for s in self.__slots__:
            setattr(self, s, state[s])

    def query(
        self, frames: Sequence[Any], ts: Sequence[float], *, min_score: float | None = None
    ) -> list[tuple[str, float]]:
        """Benchmark videos this row copies, as ``(key, score)`` best first; empty when none.

        ``frames`` are encoded images (the row's JPEG bytes) or PIL images, ``ts`` their
        timestamps in seconds. Frames that cannot be decoded are ignored. ``score`` is in (0, 1]:
        the share of the query frames that could overlap the benchmark video and match it at one
        time offset. Only videos with ``score >= min_score`` (default: the index's) and at least
        ``min_matches`` matching frames are returned.
        """
        if len(frames) != len(ts):
            raise ValueError(f"{len(frames)} frames but {len(ts)} timestamps")
        ph, dh, valid = hash_batch(list(frames))
        return self.query_hashes(
            ph[valid], dh[valid], np.asarray(ts, dtype=np.float64)[valid], min_score=min_score
        )

    def query_hashes(
        self,
        phashes: np.ndarray,
        dhashes: np.ndarray,
        ts: np.ndarray,
        *,
        min_score: float | None = None,
        chunk_elems: int = 1 << 16,
    ) -> list[tuple[str, float]]:
        """:meth:`query` on precomputed frame hashes (``hash_batch`` output, valid rows only)."""
        q = np.asarray(phashes, dtype=np.uint64).reshape(-1)
        qd = np.asarray(dhashes, dtype=np.uint64).reshape(-1)
        qt = np.asarray(ts, dtype=np.float64).reshape(-1)
        n_q = len(q)
        if n_q < 2 or len(self.phashes) == 0:
            return []  # one frame is an image: the temporal check needs two (use the image index)
        qi, ji = self._frame_matches(q, qd, chunk_elems)
        if len(qi) == 0:
            return []
        # offset votes: windows of two adjacent bins, counting distinct query frames per window
        v = self.video[ji].astype(np.int64)
        off_bin = np.floor((self.ts[ji] - qt[qi]) / self.offset_tolerance).astype(np.int64)
        v2 = np.concatenate([v, v])
        w2 = np.concatenate([off_bin, off_bin - 1])
        i2 = np.concatenate([qi, qi]).astype(np.int64)
        triples = np.unique(np.stack([v2, w2, i2], axis=1), axis=0)
        windows, counts = np.unique(triples[:, :2], axis=0, return_counts=True)
        # best window per video
        order = np.lexsort((-counts, windows[:, 0]))
        windows, counts = windows[order], counts[order]
        first = np.r_[True, windows[1:, 0] != windows[:-1, 0]]
        vids, matched = windows[first, 0], counts[first]
        # frames that could overlap: all, unless the video is shorter than the query's span (a
        # benchmark clip inside a longer video: at most ceil(duration / step) samples fall in it)
        step = float(np.median(np.diff(np.sort(qt))))
        could = np.full(len(vids), n_q, dtype=np.float64)
        if step > 0:
            could = np.minimum(could, np.ceil(self.durations[vids] / step - 1e-6))
        need = np.maximum(2, np.minimum(self.min_matches, could))
        score = np.minimum(1.0, matched / np.maximum(could, 1))
        thr = self.min_score if min_score is None else float(min_score)
        keep = (matched >= need) & (score >= thr)
        out = sorted(
            ((self.keys[int(k)], float(s)) for k, s in zip(vids[keep], score[keep])),
            key=lambda x: (-x[1], x[0]),
        )
        return out

    def _frame_matches(
        self, q: np.ndarray, qd: np.ndarray, chunk_elems: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """(query frame, index frame) pairs within both radii.

        Brute force over the index in chunks of ``chunk_elems`` XORs written into reused buffers:
        64k (512 KB, cache-sized) is several times faster than chunks of 4M XORs in fresh arrays
        (measured: 0.7-0.9 ms per query frame per million index frames on one core, against 3.3 ms).
        """
        n, nq = len(self.phashes), len(q)
        step = max(1, chunk_elems // max(1, nq))
        xor = np.empty((nq, min(step, n)), np.uint64)
        bits = np.empty(xor.shape, np.uint8)
        near = np.empty(xor.shape, bool)
        qis, jis = [], []
        for s in range(0, n, step):
            block = self.phashes[s : s + step]
            x, b, m = xor[:, : len(block)], bits[:, : len(block)], near[:, : len(block)]
            np.bitwise_xor(q[:, None], block[None, :], out=x)
            _popcount_into(x, b)
            np.less_equal(b, self.radius, out=m)
            if not m.any():
                continue
            qi, jj = np.nonzero(m)
            jj = jj + s
            ok = hamming(qd[qi], self.dhashes[jj]) <= self.dhash_radius
            qis.append(qi[ok])
            jis.append(jj[ok])
        if not qis:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return np.concatenate(qis), np.concatenate(jis)


def _hash_video(
    src: VideoSource, key: str, *, fps: float, max_frames: int, max_side: int, batch_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """pHashes, dHashes and timestamps of a video's frames sampled at ``fps``, and its duration.

    Frames are hashed in batches as they are decoded. A video that fails part-way (truncated)
    keeps the frames decoded before the failure: they are still worth matching against. Raises
    :class:`VideoError` when no frame could be hashed.
    """
    ph, dh, ts = [], [], []
    images: list[Any] = []
    stamps: list[float] = []

    def flush() -> None:
        p, d, ok = hash_batch(images)
        ph.append(p[ok])
        dh.append(d[ok])
        ts.append(np.asarray(stamps, dtype=np.float32)[ok])
        images.clear()
        stamps.clear()

    with VideoReader(src, name=key) as video:
        try:
            for t, img in video.frames(fps=fps, max_frames=max_frames, min_frames=0, max_side=max_side):
                images.append(img)
                stamps.append(t)
                if len(images) >= batch_size:
                    flush()
        except VideoError as e:
            if not (images or ph):
                raise
            log.warning("benchmark video indexed up to the error: %s", e)
        duration = video.info.duration
    if images:
        flush()
    p, d, t = np.concatenate(ph), np.concatenate(dh), np.concatenate(ts)
    if len(p) == 0:
        raise VideoError(key, "no frame could be hashed")
    if not duration or duration < t[-1]:  # no header duration (or a truncated file): estimate
        duration = float(t[-1]) + ((t[-1] - t[0]) / (len(t) - 1) if len(t) > 1 else 1.0 / fps)
    return p, d, t, duration


def _popcount_into(x: np.ndarray, out: np.ndarray) -> None:
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0: no temporary
        np.bitwise_count(x, out=out)
    else:  # pragma: no cover
        out[...] = hamming(x, 0)


# ---------------------------------------------------------------- near duplicates within a corpus


def frame_hashes(frames: Sequence[Any], ts: Sequence[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """pHashes, dHashes and timestamps of a row's frames that decode (what
    :func:`near_duplicate_pairs` takes)."""
    ph, dh, ok = hash_batch(list(frames))
    return ph[ok], dh[ok], np.asarray(ts, dtype=np.float64)[ok]


#: Total frames from which :func:`near_duplicate_pairs` cuts frame hashes into 32-bit bands rather than 16.
WIDE_BANDS_FROM = 250_000


def near_duplicate_pairs(
    phashes: Sequence[np.ndarray],
    dhashes: Sequence[np.ndarray],
    ts: Sequence[np.ndarray],
    *,
    radius: int = DEFAULT_RADIUS,
    dhash_radius: int = DEFAULT_DHASH_RADIUS,
    offset_tolerance: float = 0.5,
    min_matches: int = 3,
    min_score: float = 0.5,
    band_bits: int | None = None,
    max_bucket: int = 256,
) -> tuple[list[tuple[int, int, float, float]], dict]:
    """Pairs of videos of a corpus that show the same footage: ``(a, b, score, offset)`` with ``a < b``.

    Video ``i`` is given by its frames' pHashes, dHashes and timestamps (``phashes[i]``, ...; sampled
    sparsely, 1 fps, as the readers do). Two videos are near-duplicates when, as in :class:`VideoHashIndex`,
    the frames of the one with fewer frames match the other's (both hashes within their radius) at one time
    offset, for at least ``min_matches`` frames and a ``min_score`` share of the frames that could overlap.
    ``offset`` is seconds to add to ``a``'s timestamps to land on ``b``'s: a re-upload, a re-encode, a trimmed
    or cut copy all match at one offset; unrelated videos with alike frames do not line up in time.

    Candidates come first, so the cost is not quadratic in the corpus: each frame's pHash is cut into
    ``64 / band_bits`` bands, and two videos are compared only when a frame of one shares a whole band with a
    frame of the other (at Hamming distance 6, one of four 16-bit bands is equal for about half of frame
    pairs; a copy has many frames, so it is found). A band value held by more than ``max_bucket`` videos
    (flat, black or title frames) proposes no pairs: those frames say nothing about which video is which.

    Unrelated frames share a 16-bit band by chance too: about ``n^2 / 128`` candidate pairs for ``n`` videos
    of 16 frames, fine up to about 15,000 videos (measured: 20,000 gave 3.9 million checks, 38 s on one core).
    So ``band_bits=None`` picks 16 up to :data:`WIDE_BANDS_FROM` frames and 32 above, where chance
    candidates vanish but fewer copies are proposed: on the synthetic set, re-encodes stay at 100% and
    whole-second trims go from 99% to 90%, copies trimmed by a fraction of a second (frames between the
    original's) from 78% to 40% (``benchmarks/bench_video_dedup.py``). Returns the pairs and counts
    (``candidate_pairs``, ``skipped_buckets``, ``band_bits``).
    """
    import polars as pl

    n = len(phashes)
    lens = np.array([len(p) for p in phashes], dtype=np.int64)
    if band_bits is None:
        band_bits = 16 if lens.sum() <= WIDE_BANDS_FROM else 32
    if band_bits not in (8, 16, 32):
        raise ValueError(f"band_bits: expected 8, 16 or 32, got {band_bits}")
    facts = {"videos": n, "candidate_pairs": 0, "skipped_buckets": 0, "band_bits": band_bits}
    if n < 2 or lens.sum() == 0:
        return [], facts
    ph = np.concatenate([np.asarray(p, np.uint64) for p in phashes])
    vid = np.repeat(np.arange(n, dtype=np.int64), lens)
    mask = np.uint64((1 << band_bits) - 1)
    keys = np.concatenate(
        [
            ((ph >> np.uint64(b * band_bits)) & mask).astype(np.int64) + (b << band_bits)
            for b in range(64 // band_bits)
        ]
    )
    df = pl.DataFrame({"key": keys, "vid": np.tile(vid, 64 // band_bits)}).unique()
    sizes = df.group_by("key").len()
    facts["skipped_buckets"] = int(sizes.filter(pl.col("len") > max_bucket).height)
    df = df.join(sizes.filter((pl.col("len") >= 2) & (pl.col("len") <= max_bucket)).select("key"), on="key")
    pairs = (
        df.join(df, on="key", suffix="_b")
        .filter(pl.col("vid") < pl.col("vid_b"))
        .select("vid", "vid_b")
        .unique()
        .sort("vid", "vid_b")
    )
    facts["candidate_pairs"] = pairs.height
    starts = np.r_[0, np.cumsum(lens)]
    dh = np.concatenate([np.asarray(d, np.uint64) for d in dhashes])
    tt = np.concatenate([np.asarray(t, np.float64) for t in ts])
    out = []
    for a, b in pairs.iter_rows():
        # the one with fewer frames is the query (a clip inside a longer video: all its frames can match)
        q, r = (a, b) if lens[a] <= lens[b] else (b, a)
        found = _pair_match(
            ph[starts[q] : starts[q + 1]],
            dh[starts[q] : starts[q + 1]],
            tt[starts[q] : starts[q + 1]],
            ph[starts[r] : starts[r + 1]],
            dh[starts[r] : starts[r + 1]],
            tt[starts[r] : starts[r + 1]],
            radius,
            dhash_radius,
            offset_tolerance,
            min_matches,
            min_score,
        )
        if found is not None:
            score, offset = found
            out.append((a, b, score, offset if q == a else -offset))
    return out, facts


def _pair_match(qp, qd, qt, rp, rd, rt, radius, dhash_radius, tol, min_matches, min_score):
    """``(score, offset)`` when the query video's frames match the reference's at one time offset,
    else None."""
    if len(qp) < 2 or len(rp) < 2:
        return None
    near = (hamming(qp[:, None], rp[None, :]) <= radius) & (hamming(qd[:, None], rd[None, :]) <= dhash_radius)
    qi, ri = np.nonzero(near)
    if len(qi) < 2:
        return None
    off = rt[ri] - qt[qi]
    bins = np.floor(off / tol).astype(np.int64)
    best, best_bin = 0, 0
    for w in np.unique(np.concatenate([bins, bins - 1])):  # windows of two adjacent bins
        k = len(np.unique(qi[(bins == w) | (bins == w + 1)]))
        if k > best:
            best, best_bin = k, w
    step = float(np.median(np.diff(np.sort(qt)))) or 1.0
    span = float(rt.max() - rt.min()) + step  # the reference's duration as sampled
    could = min(len(qp), max(1, int(np.ceil(span / step - 1e-6))))
    need = max(2, min(min_matches, could))
    score = min(1.0, best / could)
    if best < need or score < min_score:
        return None
    in_window = (bins == best_bin) | (bins == best_bin + 1)
    return score, float(np.median(off[in_window]))


def clusters(n: int, pairs: Iterable[tuple[int, int]]) -> np.ndarray:
    """Connected components of ``n`` items linked by ``pairs``: the component's smallest member for
    each item."""
    parent = np.arange(n)

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in pairs:
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return np.array([root(i) for i in range(n)])
