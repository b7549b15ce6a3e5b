"""Video keyframe sampling and benchmark-video decontamination: throughput and accuracy.

    python benchmarks/bench_video.py [--runs 3] [--bench 200] [--clean 2000]

1. Sampling throughput of :func:`curation.io.video.sample_frames` (1 fps, JPEG) and of the index's
   4-fps sampling, against decoding alone: PyAV decoding every frame with no conversion (same
   FFmpeg libraries, one process) and, when the ``ffmpeg`` CLI is installed, ``ffmpeg -threads 1
   -i X -f null -`` (a process per video, as a shell loop would run it). Three corpora: the
   synthetic sample videos (160x120 .. 320x240, 3-8 s, 10-15 fps) and 640x360 / 1280x720 videos at
   30 fps, 10 s (the same generator at web sizes). Best of ``--runs`` rounds, every method once per
   round (fair when other jobs share the cores); one process.
2. :class:`curation.dedup.video.VideoHashIndex` at scale: ``--bench`` benchmark videos, two copies
   of each (re-encoded to h264/MPEG-4/VP9 at 0.5-1x size, sometimes 2/3 the frame rate, and cut by
   0-30% at each end: one in one pass, one as a re-encode then a trim), and ``--clean`` unrelated
   encoded videos. Recall, false-positive rate, query rate, index size.
3. Query cost against index size: random 64-bit hashes (no matches, so this is the brute-force
   scan alone), rows of 8 frames.
"""

from __future__ import annotations

import argparse
import io
import os
import pickle
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from functools import partial

import av
import numpy as np

from curation.dedup.image import hamming, hash_batch
from curation.dedup.video import VideoHashIndex
from curation.io.video import probe, sample_frames
from curation.sample.video import make_video, reencode, trim


def best_of(runs: int, fn) -> float:
    return best_of_each(runs, [fn])[0]


def best_of_each(runs: int, fns: list) -> list[float]:
    """Best time of each function over ``runs`` rounds; a round runs every function once, so that
    all of them see the same share of a machine that other jobs also use."""
    best = [float("inf")] * len(fns)
    for _ in range(runs):
        for k, fn in enumerate(fns):
            t = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t)
    return best


def sampling(runs: int) -> None:
    corpora = {
        "sample videos (160x120-320x240, 3-8 s, 10-15 fps)": [make_video(21, i) for i in range(100)],
        "640x360, 30 fps, 10 s": [make_video(22, i, size=(640, 360), seconds=10, fps=30) for i in range(10)],
        "1280x720, 30 fps, 10 s": [make_video(23, i, size=(1280, 720), seconds=10, fps=30) for i in range(4)],
    }
    ffmpeg = shutil.which("ffmpeg")
    print(f"\n## Sampling, best of {runs} rounds, one process\n")
    print("| corpus | method | videos/s | video seconds/s | frames kept/s | vs decode alone |")
    print("|---|---|---:|---:|---:|---:|")
    for label, vids in corpora.items():
        seconds = sum(probe(v).duration for v in vids)
        with tempfile.TemporaryDirectory() as tmp:
            paths = []
            for k, v in enumerate(vids):
                paths.append(os.path.join(tmp, f"{k}.mp4"))
                with open(paths[-1], "wb") as fh:
                    fh.write(v)
            kept = {fps: sum(len(sample_frames(v, fps=fps).frames) for v in vids) for fps in (1.0, 4.0)}
            methods = [("PyAV decode every frame, no conversion (baseline)", partial(decode_all, vids), None)]
            if ffmpeg:
                methods.append(
                    (
                        "`ffmpeg -threads 1 -i X -f null -` (a process per video)",
                        partial(ffmpeg_all, ffmpeg, paths),
                        None,
                    )
                )
            methods += [
                ("sample_frames, 1 fps, JPEG q90 (the reader)", partial(sample_all, vids, 1.0), 1.0),
                ("sample_frames, 4 fps (as the index samples)", partial(sample_all, vids, 4.0), 4.0),
                ("VideoHashIndex.build (4 fps + pHash/dHash)", partial(build_all, vids), None),
            ]
            times = best_of_each(runs, [fn for _, fn, _ in methods])
            base = times[0]
            for (name, _, fps), t in zip(methods, times):
                frames = f"{kept[fps] / t:,.0f}" if fps else ""
                print(
                    f"| {label} | {name} | {len(vids) / t:,.1f} | {seconds / t:,.0f} | {frames} | "
                    f"{base / t:.2f}x |"
                )
            sys.stdout.flush()


def decode_all(vids: list[bytes]) -> None:
    for data in vids:
        with av.open(io.BytesIO(data)) as c:
            for _ in c.decode(video=0):
                pass


def ffmpeg_all(ffmpeg: str, paths: list[str]) -> None:
    for p in paths:
        subprocess.run([ffmpeg, "-v", "error", "-threads", "1", "-i", p, "-f", "null", "-"], check=True)


def sample_all(vids: list[bytes], fps: float) -> None:
    for data in vids:
        sample_frames(data, fps=fps)


def build_all(vids: list[bytes]) -> None:
    VideoHashIndex.build((str(k), v) for k, v in enumerate(vids))


def accuracy(n_bench: int, n_clean: int) -> None:
    print(
        f"\n## VideoHashIndex: {n_bench} benchmark videos, {2 * n_bench} copies, {n_clean} unrelated videos\n"
    )
    t = time.perf_counter()
    bench = [(f"b{i}", make_video(31, i)) for i in range(n_bench)]
    t_make = time.perf_counter() - t
    t = time.perf_counter()
    index = VideoHashIndex.build(bench)
    t_build = time.perf_counter() - t
    blob = pickle.dumps(index)
    print(
        f"- built in {t_build:.1f} s ({n_bench / t_build:.0f} videos/s; "
        f"generating them took {t_make:.1f} s): "
        f"{len(index.phashes):,} frames, pickled {len(blob) / 1024:.0f} KiB "
        f"({len(blob) / len(index.phashes):.1f} bytes per frame)"
    )
    copies = []
    t = time.perf_counter()
    for i, (key, data) in enumerate(bench):
        rng = random.Random(f"copy/{key}")
        d = probe(data).duration
        for two_generations in (False, True):
            a, b = rng.uniform(0, 0.3) * d, d - rng.uniform(0, 0.3) * d
            copy = (
                trim(reencode(data, rng), a, b)
                if two_generations
                else reencode(data, rng, start_s=a, end_s=b)
            )
            copies.append((key, a, sample_frames(copy)))
    print(f"- copies made and sampled in {time.perf_counter() - t:.1f} s")
    t = time.perf_counter()
    clean = []
    for i in range(n_clean):
        clean.append(sample_frames(make_video(32, i)))
        if (i + 1) % 500 == 0:
            print(f"  ... {i + 1} unrelated videos ({time.perf_counter() - t:.0f} s)", file=sys.stderr)
    print(f"- unrelated videos made and sampled in {time.perf_counter() - t:.1f} s")

    scores, found = [], 0
    for key, _, vf in copies:
        hits = dict(index.query(vf.frames, vf.ts))
        found += key in hits
        scores.append(hits.get(key, 0.0))
    fp_rows = []
    t = time.perf_counter()
    for k, vf in enumerate(clean):
        if index.query(vf.frames, vf.ts):
            fp_rows.append(k)
    t_query = time.perf_counter() - t
    n_frames = sum(len(vf.frames) for vf in clean)
    hashed = [hash_batch(vf.frames) + (np.asarray(vf.ts),) for vf in clean]
    t = time.perf_counter()
    for ph, dh, ok, ts in hashed:
        index.query_hashes(ph[ok], dh[ok], ts[ok])
    t_match = time.perf_counter() - t
    # the margin: how close unrelated videos come with the thresholds relaxed to 2 frames, any score
    loose = VideoHashIndex(
        index.phashes,
        index.dhashes,
        index.ts,
        index.video,
        index.keys,
        index.durations,
        min_matches=2,
        min_score=0.0,
    )
    near = sum(bool(loose.query_hashes(ph[ok], dh[ok], ts[ok])) for ph, dh, ok, ts in hashed)
    frame_distances(index, copies, hashed)
    print(
        f"- recall: {found}/{len(copies)} = {found / len(copies):.4f}; score of the true video: "
        f"min {min(scores):.2f}, 1st percentile {np.percentile(scores, 1):.2f}, "
        f"median {np.median(scores):.2f}"
    )
    print(f"- false positives: {len(fp_rows)}/{n_clean} = {len(fp_rows) / n_clean:.4%} {fp_rows[:10]}")
    print(
        f"- margin: unrelated videos with even 2 time-consistent matching frames (any score): "
        f"{near}/{n_clean}"
    )
    print(
        f"- query (hash the row's JPEG frames + match): {n_clean / t_query:,.0f} rows/s "
        f"({n_frames / n_clean:.1f} frames per row); match alone: {n_clean / t_match:,.0f} rows/s"
    )


def frame_distances(index: VideoHashIndex, copies, hashed) -> None:
    """Frame-level evidence for the radii: copies' frames against their own benchmark frames (within
    0.2 s of the true moment), unrelated frames against all index frames."""
    keys = {k: i for i, k in enumerate(index.keys)}
    true_p, true_d = [], []
    for key, a, vf in copies:
        ph, dh, ok = hash_batch(vf.frames)
        mine = index.video == keys[key]
        for p, d, t in zip(ph[ok], dh[ok], np.asarray(vf.ts)[ok]):
            near = mine & (np.abs(index.ts - (t + a)) <= 0.2)
            if near.any():
                dp = hamming(index.phashes[near], p)
                dd = hamming(index.dhashes[near], d)
                k = np.argmin(np.maximum(dp, dd))
                true_p.append(dp[k])
                true_d.append(dd[k])
    clean_p, clean_d, clean_hit = [], [], 0
    for ph, dh, ok, _ in hashed:
        for p, d in zip(ph[ok], dh[ok]):
            dp, dd = hamming(index.phashes, p), hamming(index.dhashes, d)
            clean_p.append(dp.min())
            clean_d.append(dd.min())
            clean_hit += bool(((dp <= index.radius) & (dd <= index.dhash_radius)).any())
    pct = (50, 99, 100)
    print(
        f"- copies' frames vs their benchmark frame (n={len(true_p):,}): pHash distance p50/p99/max "
        f"{'/'.join(str(int(np.percentile(true_p, q))) for q in pct)}, dHash "
        f"{'/'.join(str(int(np.percentile(true_d, q))) for q in pct)}"
    )
    pct = (0.1, 1, 50)
    print(
        f"- unrelated frames vs the nearest index frame (n={len(clean_p):,}): pHash p0.1/p1/p50 "
        f"{'/'.join(str(int(np.percentile(clean_p, q))) for q in pct)}, dHash "
        f"{'/'.join(str(int(np.percentile(clean_d, q))) for q in pct)}; frames matching some index "
        f"frame at radius {index.radius}/{index.dhash_radius}: {clean_hit / len(clean_p):.2%} "
        "(what the time-offset vote and min_matches remove)"
    )


def query_all(index: VideoHashIndex, rows: list) -> None:
    for r in rows:
        index.query_hashes(*r)


def scaling(runs: int) -> None:
    print("\n## Query cost against index size (random hashes, rows of 8 frames, best of runs)\n")
    print("| index frames | (= 4-fps hours of video) | pickled MiB | rows/s | ms per row |")
    print("|---:|---:|---:|---:|---:|")
    rng = np.random.default_rng(0)
    for n in (10_000, 100_000, 1_000_000):
        n_videos = max(1, n // 2400)
        index = VideoHashIndex(
            rng.integers(0, 2**64, n, dtype=np.uint64),
            rng.integers(0, 2**64, n, dtype=np.uint64),
            rng.uniform(0, 600, n).astype(np.float32),
            rng.integers(0, n_videos, n).astype(np.int32),
            [f"v{k}" for k in range(n_videos)],
            np.full(n_videos, 600.0),
        )
        rows = [
            (
                rng.integers(0, 2**64, 8, dtype=np.uint64),
                rng.integers(0, 2**64, 8, dtype=np.uint64),
                np.arange(8.0),
            )
            for _ in range(200 if n < 1_000_000 else 50)
        ]
        t = best_of(runs, partial(query_all, index, rows))
        mib = len(pickle.dumps(index)) / 2**20
        print(
            f"| {n:,} | {n / 4 / 3600:.1f} | {mib:.1f} | {len(rows) / t:,.0f} | {t / len(rows) * 1e3:.2f} |"
        )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--bench", type=int, default=200)
    ap.add_argument("--clean", type=int, default=2000)
    ap.add_argument("--skip", nargs="*", default=(), choices=("sampling", "accuracy", "scaling"))
    args = ap.parse_args()
    print(
        f"Machine: {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), Python "
        f"{platform.python_version()}, PyAV {av.__version__} (FFmpeg libavcodec "
        f"{'.'.join(map(str, av.library_versions['libavcodec']))}), numpy {np.__version__}"
    )
    if "sampling" not in args.skip:
        sampling(args.runs)
    if "scaling" not in args.skip:
        scaling(args.runs)
    if "accuracy" not in args.skip:
        accuracy(args.bench, args.clean)


if __name__ == "__main__":
    main()
