"""Image copy detection (curation.dedup.image): accuracy on edited copies, and scan throughput.

    python benchmarks/bench_phash.py [--items 300] [--reps 2] [--unrelated 5000] [--n 2000]
                                     [--index-sizes 1000,5000] [--runs 3]

Accuracy: ``--reps`` edited copies of each of the sample benchmark's first ``--items`` images
per transform (the transforms of ``tests/helpers/image_edits.py``, imported from there, with other
seeds), and ``--unrelated`` corpus-like drawings (seeds 50,000+; the test uses 10,000+). FPR =
share of unrelated images matching any benchmark image.

Throughput, one core (BLAS limited to one thread): ``--n`` corpus JPEGs (drawn scenes,
96-512 px, q85) hashed with imagehash and with this module, then described and queried
against indexes of ``--index-sizes`` benchmark images. Drawings against drawings is the
expensive case: unrelated flat-colour drawings often pass the candidate stage. Best of
``--runs``, since other processes may share the cores.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy: one core, like a Ray task
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import io
import random
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from curation import sample as S
from curation.dedup.image import ImageHashIndex, describe, hash_batch, phash

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.helpers.image_edits import TRANSFORMS, bench_images, copies, unrelated


def best_rate(fn, n: int, runs: int) -> float:
    """Items per second of ``fn()`` over ``n`` items, best of ``runs``."""
    best = float("inf")
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return n / best


def accuracy(args) -> None:
    bench = bench_images(args.items)
    index = ImageHashIndex.build(bench)
    print(
        f"\nAccuracy: {args.items} benchmark images x {args.reps} copies per transform, "
        f"{args.unrelated:,} unrelated drawings; {index!r}\n"
    )
    print("| edit | copies | recall | distance of those found: p50 / p99 / max |")
    print("|---|---:|---:|---|")
    for name in TRANSFORMS:
        found = []
        for rep in range(1, args.reps + 1):  # rep 0 is the test's
            res = index.query(describe(copies(bench, name, rep)))
            best = {}
            for row, iid, d in res:
                if iid == bench[row][0]:
                    best[row] = min(best.get(row, np.inf), d)
            found += [best.get(k, np.inf) for k in range(len(bench))]
        found = np.array(found)
        p50, p99, mx = np.percentile(found[np.isfinite(found)], [50, 99, 100])
        recall = np.isfinite(found).mean()
        print(f"| {name} | {len(found):,} | {recall:.4f} | {p50:.1f} / {p99:.1f} / {mx:.1f} |")
    desc = describe(unrelated(args.unrelated, 50_000))
    rows = {row for row, _, _ in index.query(desc)}
    cand = index.candidates(desc)
    dist = index.distances(desc, cand[:, 0], cand[:, 1])
    closest = np.full(len(desc), np.inf)
    np.minimum.at(closest, cand[:, 0], dist)
    lowest = np.sort(closest[np.isfinite(closest)])
    print(
        f"\nUnrelated: FPR {len(rows) / args.unrelated:.3%} ({len(rows)} of {args.unrelated:,}); "
        f"{len(cand) / args.unrelated:.3f} candidates verified per image; their lowest distances: "
        + ", ".join(f"{d:.1f}" for d in lowest[:8])
    )


def throughput(args) -> None:
    jpegs = []
    for k in range(args.n):
        rng = random.Random(k)
        buf = io.BytesIO()
        S.draw_scene(S.make_scene(rng), *S._pick_size(rng)).save(buf, "JPEG", quality=85)
        jpegs.append(buf.getvalue())
    n, r = len(jpegs), args.runs
    rows = [
        (
            "curation `describe` (RGB thumbnail, pHash, colour layout)",
            best_rate(lambda: describe(jpegs), n, r),
        ),
        ("curation `hash_batch` (64-bit pHash + dHash)", best_rate(lambda: hash_batch(jpegs), n, r)),
        ("curation `phash` (one image at a time)", best_rate(lambda: [phash(b) for b in jpegs], n, r)),
    ]
    try:
        import imagehash

        rows.append(
            (
                "imagehash.phash 4.x (one image at a time)",
                best_rate(lambda: [imagehash.phash(Image.open(io.BytesIO(b))) for b in jpegs], n, r),
            )
        )
    except ImportError:
        pass
    desc = describe(jpegs)
    sizes = [int(s) for s in args.index_sizes.split(",") if s]
    bench = bench_images(max(sizes, default=0))
    for size in sizes:
        index = ImageHashIndex.build(bench[:size])
        q = best_rate(lambda index=index: [index.query(desc[s : s + 256]) for s in range(0, n, 256)], n, r)
        both = 1 / (1 / rows[0][1] + 1 / q)
        cand = len(index.candidates(desc)) / n
        rows.append((f"`query` only, index of {size:,} images ({cand:.2f} verified candidates/image)", q))
        rows.append((f"scan = `describe` + `query`, index of {size:,} images", both))
    print(f"\nThroughput: {n:,} corpus JPEGs (96-512 px), one core, best of {r}\n")
    print("| what | images/s |")
    print("|---|---:|")
    for name, rate in rows:
        print(f"| {name} | {rate:,.0f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=300)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--unrelated", type=int, default=5000)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--index-sizes", default="1000,5000")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    accuracy(args)
    throughput(args)


if __name__ == "__main__":
    main()
