"""Near-duplicate videos within a corpus (the ``video_near_dedup`` stage): accuracy and the pair
search's cost.

    python benchmarks/bench_video_dedup.py [--originals 1000] [--copies 300] [--scale 20000]

1. Accuracy on the synthetic sample videos (fast-moving drawings, the hard case for frames sampled at 1 fps):
   ``--originals`` unrelated videos and ``--copies`` copies of some of them, a third each re-encoded from the
   start (another codec, 0.5-1x size, sometimes 2/3 the frame rate, maybe cut short), trimmed by whole
   seconds, and trimmed by a fraction of a second (their frames fall between the original's). Recall per kind
   and false pairs, at the stage's defaults and at neighbouring radii.
2. The pair search against a named baseline on the same hashes: **all pairs**, the same temporal check on
   every pair of videos (what a plain loop would do). Both find the same pairs here; the ratio is the time.
3. Scale: ``--scale`` videos of random frame hashes (16 frames each; no true pairs), the band search alone,
   to show it grows with the corpus, not with its square.
"""

from __future__ import annotations

import argparse
import platform
import random
import time

import numpy as np

from curation.dedup.video import _pair_match, frame_hashes, near_duplicate_pairs
from curation.io.video import sample_frames
from curation.sample.video import make_video, reencode


def hashes(videos: list[bytes]):
    P, D, T = zip(
        *(frame_hashes(vf.frames, vf.ts) for vf in (sample_frames(v, fps=1, max_frames=32) for v in videos))
    )
    return list(P), list(D), list(T)


def all_pairs(P, D, T, radius, dhash_radius, min_matches):
    out = []
    for a in range(len(P)):
        for b in range(a + 1, len(P)):
            q, r = (a, b) if len(P[a]) <= len(P[b]) else (b, a)
            if _pair_match(P[q], D[q], T[q], P[r], D[r], T[r], radius, dhash_radius, 0.5, min_matches, 0.5):
                out.append((a, b))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--originals", type=int, default=1000)
    ap.add_argument("--copies", type=int, default=300)
    ap.add_argument("--scale", type=int, default=20000)
    args = ap.parse_args()
    print(
        f"machine: {platform.processor() or platform.machine()}, {platform.system()}, "
        f"python {platform.python_version()}"
    )

    rng = random.Random(7)
    t0 = time.perf_counter()
    videos = [make_video(61, i) for i in range(args.originals)]
    kinds = {}
    for k in range(args.copies):
        i = rng.randrange(args.originals)
        kind = ("re-encoded", "whole-second trim", "fractional trim")[k % 3]
        start = {
            "re-encoded": 0.0,
            "whole-second trim": float(rng.choice([1, 2])),
            "fractional trim": rng.uniform(0.2, 1.8),
        }[kind]
        end = None if rng.random() < 0.5 else start + rng.uniform(3.0, 5.0)
        kinds[len(videos)] = (kind, i)
        videos.append(reencode(videos[i], rng, start_s=start, end_s=end))
    print(f"{len(videos)} videos made in {time.perf_counter() - t0:.0f} s")
    t0 = time.perf_counter()
    P, D, T = hashes(videos)
    frames = sum(len(p) for p in P)
    dt = time.perf_counter() - t0
    print(f"sampled and hashed {frames} frames in {dt:.1f} s ({frames / dt:.0f} frames/s, sampling included)")
    print("\n1. accuracy (recall per kind of copy, false pairs)")
    print(
        f"{'radius':>8} {'dhash':>6} {'min_m':>6} "
        + " ".join(f"{k:>18}" for k in ("re-encoded", "whole-second trim", "fractional trim"))
        + f" {'false':>6} {'candidates':>11}"
    )
    for radius, dr, mm in ((12, 16, 3), (12, 16, 2), (14, 18, 2), (16, 20, 2)):
        pairs, facts = near_duplicate_pairs(P, D, T, radius=radius, dhash_radius=dr, min_matches=mm)
        found = {(a, b) for a, b, _, _ in pairs}
        # a copy of a copy's original also pairs with the other copies of it: those are true pairs too
        origin = {c: i for c, (_, i) in kinds.items()}
        true = {(a, b) for a, b in found if origin.get(a, a) == origin.get(b, b)}
        cells = []
        for kind in ("re-encoded", "whole-second trim", "fractional trim"):
            mine = [(i, c) for c, (k, i) in kinds.items() if k == kind]
            cells.append(
                f"{sum(p in found for p in mine):>8}/{len(mine):<4} "
                f"{100 * np.mean([p in found for p in mine]):4.0f}%"
            )
        mark = "  <- stage defaults" if (radius, dr, mm) == (14, 18, 2) else ""
        print(
            f"{radius:>8} {dr:>6} {mm:>6} "
            + " ".join(f"{c:>18}" for c in cells)
            + f" {len(found - true):>6} {facts['candidate_pairs']:>11}{mark}"
        )

    print("\n2. pair search vs all pairs (same check, stage defaults)")
    t0 = time.perf_counter()
    banded, facts = near_duplicate_pairs(P, D, T, radius=14, dhash_radius=18, min_matches=2)
    t_band = time.perf_counter() - t0
    t0 = time.perf_counter()
    brute = all_pairs(P, D, T, 14, 18, 2)
    t_all = time.perf_counter() - t0
    got, base = {(a, b) for a, b, _, _ in banded}, set(brute)
    n = len(P)
    print(
        f"all pairs: {n * (n - 1) // 2:,} checks in {t_all:.2f} s; "
        f"bands: {facts['candidate_pairs']:,} checks in {t_band:.2f} s: {t_all / t_band:.1f}x faster; "
        f"pairs found {len(got)} vs {len(base)} "
        f"(missed by bands: {len(base - got)})"
    )

    print("\n   the same at 32-bit bands (the default above 250,000 frames)")
    pairs, facts = near_duplicate_pairs(P, D, T, radius=14, dhash_radius=18, min_matches=2, band_bits=32)
    found = {(a, b) for a, b, _, _ in pairs}
    for kind in ("re-encoded", "whole-second trim", "fractional trim"):
        mine = [(i, c) for c, (k, i) in kinds.items() if k == kind]
        print(f"   {kind:>18}: {sum(p in found for p in mine)}/{len(mine)}")

    print(f"\n3. scale: videos x 16 random frame hashes (no true pairs), up to {args.scale:,}")
    g = np.random.default_rng(0)
    for n, bits in (
        (args.scale // 4, 16),
        (args.scale // 2, 16),
        (args.scale, 16),
        (args.scale, 32),
        (args.scale * 5, 32),
        (args.scale * 25, 32),
    ):
        P2 = [g.integers(0, 2**63, 16, dtype=np.uint64) for _ in range(n)]
        T2 = [np.arange(16, dtype=float) for _ in range(n)]
        t0 = time.perf_counter()
        pairs, facts = near_duplicate_pairs(P2, P2, T2, band_bits=bits)
        dt = time.perf_counter() - t0
        print(
            f"{n:>9,} videos, {bits}-bit bands: {dt:7.2f} s ({n / dt:,.0f} videos/s), "
            f"{facts['candidate_pairs']:,} candidates, {len(pairs)} pairs"
        )


if __name__ == "__main__":
    main()
