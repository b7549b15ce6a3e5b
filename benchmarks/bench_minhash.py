"""MinHash signature throughput: datasketch against rensa, on the same shingles.

Generated documents (no downloads): `--docs` documents of 50-300 words drawn from a made-up
vocabulary. Shingles are word bigrams of `curation.dedup.text.tokens`, as `NearDupIndex` uses.

Rows:
- signature only: shingles prepared beforehand (strings for datasketch `update_batch` and rensa
  `RMinHash.update`; the xxh3 uint64 shingle hashes for rensa's flat-buffer batch call, which is what
  `NearDupIndex` does), so only signature building is timed;
- end to end: normalise + tokenise + shingle in Python + signature, per document.

    python benchmarks/bench_minhash.py --docs 20000
"""

from __future__ import annotations

import argparse
import random
import time

import numpy as np
from datasketch import MinHash
from rensa import RMinHash

from curation.dedup.text import NearDupIndex, _ngram_hashes, _token_hashes, tokens

NUM_PERM, SEED, SHINGLE = 128, 1, 2


def make_docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    vocab = [
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
        for _ in range(20000)
    ]
    return [" ".join(rng.choices(vocab, k=rng.randint(50, 300))).capitalize() + "." for _ in range(n)]


def shingle_strings(text: str) -> list[str]:
    t = tokens(text)
    return list({" ".join(t[i : i + SHINGLE]) for i in range(len(t) - SHINGLE + 1)})


def datasketch_sig(shingles: list[str]) -> np.ndarray:
    m = MinHash(num_perm=NUM_PERM, seed=SEED)
    m.update_batch([s.encode() for s in shingles])
    return m.hashvalues


def rensa_sig(shingles: list[str]) -> list[int]:
    m = RMinHash(NUM_PERM, SEED)
    m.update(shingles)
    return m.digest()


def rensa_flat(hashes: list[np.ndarray]) -> np.ndarray:
    offsets = np.zeros(len(hashes) + 1, dtype=np.uint64)
    np.cumsum([len(h) for h in hashes], out=offsets[1:])
    return RMinHash.digest_matrix_from_flat_token_hashes(np.concatenate(hashes), offsets, NUM_PERM, SEED)


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=20000)
    args = ap.parse_args()
    docs = make_docs(args.docs)
    n = len(docs)

    t_shingle = timed(lambda: [shingle_strings(d) for d in docs])
    strs = [shingle_strings(d) for d in docs]
    t_hash = timed(lambda: [np.unique(_ngram_hashes(_token_hashes(tokens(d)), SHINGLE)) for d in docs])
    hashes = [np.unique(_ngram_hashes(_token_hashes(tokens(d)), SHINGLE)) for d in docs]
    print(f"{n} docs, {sum(map(len, strs)) / n:.0f} shingles/doc, num_perm={NUM_PERM}\n")

    rows = [
        ("datasketch `update_batch` (sha1)", timed(lambda: [datasketch_sig(s) for s in strs]), t_shingle),
        ("rensa `RMinHash.update` (str)", timed(lambda: [rensa_sig(s) for s in strs]), t_shingle),
        ("rensa flat uint64 batch (NearDupIndex)", timed(lambda: rensa_flat(hashes)), t_hash),
    ]
    base = rows[0][1]
    print(
        "| backend | signature docs/s | speed-up vs datasketch | end-to-end docs/s (incl. Python shingling) |"
    )
    print("|---|---:|---:|---:|")
    for name, t_sig, t_prep in rows:
        print(f"| {name} | {n / t_sig:,.0f} | {base / t_sig:.1f}x | {n / (t_sig + t_prep):,.0f} |")
    print(
        f"\nPython shingling alone: {n / t_shingle:,.0f} docs/s (strings), "
        f"{n / t_hash:,.0f} docs/s (xxh3 hashes)"
    )

    idx = NearDupIndex([(str(i), d) for i, d in enumerate(docs[:2000])])
    t_q = timed(lambda: [idx.query(d) for d in docs[:2000]])
    print(f"NearDupIndex.query, one doc a call (2,000-item index): {2000 / t_q:,.0f} docs/s")


if __name__ == "__main__":
    main()
