"""Throughput of curation.dedup.image: hashing vs imagehash / plain PIL, and index queries.

    python benchmarks/bench_phash.py [--n 2000]

Images: drawn scenes (curation.sample) of 96-512 px, JPEG q85. Single process.
"""

from __future__ import annotations

import argparse
import io
import random
import time

import numpy as np
from PIL import Image

from curation import sample as S
from curation.dedup.image import ImageHashIndex, _dct_matrix, hash_batch, phash

_C = _dct_matrix(32)


def plain_phash(b: bytes) -> int:
    """Same hash, no draft: full decode, convert, resize, numpy DCT."""
    px = np.asarray(Image.open(io.BytesIO(b)).convert("L").resize((32, 32), Image.Resampling.LANCZOS),
                    dtype=np.float64)
    low = (_C @ px @ _C.T)[:8, :8].ravel()
    bits = low > np.median(low[1:])
    return int("".join("1" if x else "0" for x in bits), 2)


def rate(fn, data) -> float:
    t = time.perf_counter()
    fn(data)
    return len(data) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000)
    args = ap.parse_args()
    jpegs = []
    for k in range(args.n):
        rng = random.Random(k)
        img = S.draw_scene(S.make_scene(rng), *S._pick_size(rng))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=85)
        jpegs.append(buf.getvalue())
    rows = []
    ours = rate(lambda d: [phash(b) for b in d], jpegs)
    rows.append(("curation phash (draft, per image)", ours))
    rows.append(("curation hash_batch (pHash+dHash, batched DCT)", rate(hash_batch, jpegs)))
    rows.append(("plain PIL resize + numpy DCT, no draft", rate(lambda d: [plain_phash(b) for b in d], jpegs)))
    try:
        import imagehash
        rows.append(("imagehash.phash 4.x", rate(lambda d: [imagehash.phash(Image.open(io.BytesIO(b))) for b in d], jpegs)))
    except ImportError:
        pass
    print(f"\nHashing {len(jpegs)} JPEGs (96-512 px), 1 core\n")
    print("| method | images/s | ours (per image) / this |")
    print("|---|---:|---:|")
    for name, r in rows:
        print(f"| {name} | {r:,.0f} | {ours / r:.2f}x |")

    rng = np.random.default_rng(0)
    print("\nImageHashIndex.query (pHash r=10 + dHash r=8), random 64-bit hashes, batches of 256\n")
    print("| index items | corpus hashes/s |")
    print("|---:|---:|")
    for n in (10_000, 100_000):
        idx = ImageHashIndex(rng.integers(0, 2**64, n, dtype=np.uint64),
                             rng.integers(0, 2**64, n, dtype=np.uint64), [f"i{k}" for k in range(n)])
        q = rng.integers(0, 2**64, 4096, dtype=np.uint64)
        qd = rng.integers(0, 2**64, 4096, dtype=np.uint64)
        t = time.perf_counter()
        for s in range(0, len(q), 256):
            idx.query(q[s:s + 256], qd[s:s + 256])
        print(f"| {n:,} | {len(q) / (time.perf_counter() - t):,.0f} |")


if __name__ == "__main__":
    main()
