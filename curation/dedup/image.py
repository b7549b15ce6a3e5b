"""Perceptual image hashes and a Hamming-radius index for benchmark decontamination.

Finding copies of evaluation-benchmark images inside training data: every benchmark image is
hashed once into an :class:`ImageHashIndex` (two numpy ``uint64`` arrays plus the item ids, a
few MB for 100k items, picklable so it can be put in the Ray object store or broadcast), and
every worker hashes its corpus images with :func:`hash_batch` and calls
:meth:`ImageHashIndex.query`.

Hashes (64-bit, bit 63 = first coefficient/cell, row-major):

* :func:`phash` -- DCT perceptual hash: greyscale, resize to 32x32, 2D DCT-II (precomputed
  orthonormal numpy matrix, no scipy), top-left 8x8 block, each bit = coefficient > median of
  the 63 AC coefficients. The DC coefficient (mean brightness) is excluded from the median and
  its bit is always 0, which is what makes the hash invariant to brightness shifts.
* :func:`dhash` -- difference hash: greyscale, resize to 9x8, bit = pixel > right neighbour.

Speed: JPEGs are decoded with ``Image.draft`` (libjpeg DCT scaling, 1/2 .. 1/8) straight to
greyscale at the smallest scale that is still >= 128 px, which removes most of the decode cost
(see ``benchmarks/bench_phash.py``).

Default radius: :data:`DEFAULT_RADIUS` for pHash AND dHash (both must be within radius).
Measured on 100 drawn scenes like the corpus ones (``curation.sample.draw_scene``) x 14
transforms and 2,000 unrelated drawn scenes -- see ``tests/test_dedup_image.py`` and the
measured numbers below.

Measured (100 benchmark items x 13 transforms, 2,000 unrelated drawn scenes, FPR = share of
unrelated images matching any of the 100 items): pHash alone at r=10 gives recall 0.93 but FPR
10.9% -- flat-colour drawings of the same layout have near-identical greyscale hashes (minimum
unrelated pHash distance 0). Requiring dHash <= 8 as well cuts FPR to 0.65% (recall 0.87).
Re-encoding, resizing 0.5x-2x, PNG<->JPEG and brightness +-20% stay within pHash 4 (one
outlier at 12) and dHash 11; the misses are nearly all the 5%-per-edge crops (mean pHash
distance 10.8, dHash 9.9): a 10% zoom moves every edge of a flat drawing, which global hashes
do not tolerate. Crops of 2.5% per edge mostly match. For natural photos distances between
unrelated images are larger, so a wider radius (e.g. ``radius=12, dhash_radius=10``) is
affordable there.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from PIL import Image

__all__ = [
    "DEFAULT_DHASH_RADIUS",
    "DEFAULT_RADIUS",
    "INVALID_HASH",
    "ImageHashIndex",
    "dhash",
    "hamming",
    "hash_batch",
    "phash",
]

#: Hamming radius used by :class:`ImageHashIndex` for pHash (see the module docstring).
DEFAULT_RADIUS = 10
#: Hamming radius for the dHash confirmation (``None`` in ``query`` disables it).
DEFAULT_DHASH_RADIUS = 8
#: Value stored for images that could not be decoded; always paired with ``valid=False``.
INVALID_HASH = np.uint64(0)

_HASH_SIDE = 32  # pHash works on 32x32
_LOW = 8  # keeps the 8x8 lowest frequencies
_DRAFT_SIDE = 128  # JPEG decode target (>= 4x the 32 px working size); 64 made hashes of
# JPEG re-encodes unstable (max pHash distance 15-28 vs 2 at 128, measured on drawn scenes)


def _dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II matrix ``C`` (``C @ x`` is ``scipy.fft.dct(x, norm='ortho')``)."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    c = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    c[0] /= np.sqrt(2.0)
    return c


# only the 8 lowest-frequency rows are ever needed: D_low = C8 @ X @ C8.T
_C8 = np.ascontiguousarray(_dct_matrix(_HASH_SIDE)[:_LOW]).astype(np.float32)
_C8T = np.ascontiguousarray(_C8.T)
_AC = np.ones(_LOW * _LOW, dtype=bool)
_AC[0] = False
_SHIFTS = np.arange(63, -1, -1, dtype=np.uint64)

if hasattr(np, "bitwise_count"):  # numpy >= 2.0
    def _popcount(x: np.ndarray) -> np.ndarray:
        return np.bitwise_count(x)
else:  # pragma: no cover - numpy 1.x fallback: byte lookup table
    _POP8 = np.array([i.bit_count() for i in range(256)], dtype=np.uint8)

    def _popcount(x: np.ndarray) -> np.ndarray:
        b = np.ascontiguousarray(x).view(np.uint8).reshape(*x.shape, 8)
        return _POP8[b].sum(axis=-1, dtype=np.uint8)


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------


def _grey(image: bytes | bytearray | memoryview | Image.Image) -> Image.Image:
    """Greyscale PIL image, JPEGs decoded at reduced size with ``draft``. Raises on bad input."""
    if isinstance(image, Image.Image):
        img = image
    else:
        img = Image.open(io.BytesIO(bytes(image) if not isinstance(image, bytes) else image))
        if img.format == "JPEG":
            img.draft("L", (_DRAFT_SIDE, _DRAFT_SIDE))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # flatten transparency on white so that a transparent PNG hashes like its JPEG copy
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, rgba)
    if img.mode != "L":
        img = img.convert("L")
    return img


def _pixels(img: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    """(32x32 float32 for pHash, 8x9 float32 for dHash) from a greyscale image."""
    img.load()
    # LANCZOS (as imagehash does): BOX made re-encoded / resized copies drift more
    small = img.resize((_HASH_SIDE, _HASH_SIDE), Image.Resampling.LANCZOS)
    d = img.resize((9, 8), Image.Resampling.LANCZOS)
    return np.asarray(small, dtype=np.float32), np.asarray(d, dtype=np.float32)


def _pack(bits: np.ndarray) -> np.ndarray:
    """(N, 64) bool -> (N,) uint64, first bit most significant."""
    return np.packbits(bits, axis=1).view(">u8").reshape(-1).astype(np.uint64)


def _phash_bits(px: np.ndarray) -> np.ndarray:
    """(N, 32, 32) -> (N, 64) bool."""
    low = (_C8 @ px @ _C8T).reshape(len(px), _LOW * _LOW)
    med = np.median(low[:, _AC], axis=1, keepdims=True)
    bits = low > med
    bits[:, 0] = False  # DC: brightness, deliberately not part of the hash
    return bits


def _dhash_bits(px: np.ndarray) -> np.ndarray:
    """(N, 8, 9) -> (N, 64) bool."""
    return (px[:, :, :-1] > px[:, :, 1:]).reshape(len(px), 64)


# --------------------------------------------------------------------------------------------
# Public hash functions
# --------------------------------------------------------------------------------------------


def phash(image: bytes | Image.Image) -> int:
    """64-bit DCT perceptual hash of encoded image bytes or a PIL image. Raises on bad input."""
    p, _ = _pixels(_grey(image))
    return int(_pack(_phash_bits(p[None]))[0])


def dhash(image: bytes | Image.Image) -> int:
    """64-bit difference hash of encoded image bytes or a PIL image. Raises on bad input."""
    _, d = _pixels(_grey(image))
    return int(_pack(_dhash_bits(d[None]))[0])


def hash_batch(images: Sequence[Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hash many images; never raises.

    ``images`` holds encoded bytes, PIL images or ``None``. Returns ``(phashes, dhashes,
    valid)``: two ``uint64`` arrays and a bool mask; rows that are ``None`` or cannot be decoded
    get :data:`INVALID_HASH` and ``valid=False``. The DCT runs once for the whole batch.
    """
    n = len(images)
    p = np.zeros((n, _HASH_SIDE, _HASH_SIDE), dtype=np.float32)
    d = np.zeros((n, 8, 9), dtype=np.float32)
    valid = np.zeros(n, dtype=bool)
    for i, im in enumerate(images):
        if im is None:
            continue
        try:
            p[i], d[i] = _pixels(_grey(im))
        except Exception:  # noqa: BLE001, S112 - undecodable / truncated / bombs: a masked row
            continue
        valid[i] = True
    ph = _pack(_phash_bits(p)) if n else np.zeros(0, np.uint64)
    dh = _pack(_dhash_bits(d)) if n else np.zeros(0, np.uint64)
    ph[~valid] = INVALID_HASH
    dh[~valid] = INVALID_HASH
    return ph, dh, valid


def hamming(a: np.ndarray | int, b: np.ndarray | int) -> np.ndarray:
    """Element-wise (broadcasting) Hamming distance of uint64 hashes."""
    return _popcount(np.bitwise_xor(np.asarray(a, dtype=np.uint64), np.asarray(b, dtype=np.uint64)))


# --------------------------------------------------------------------------------------------
# Index
# --------------------------------------------------------------------------------------------


class ImageHashIndex:
    """Benchmark image hashes, queried by Hamming radius.

    Build once (driver side) and share: the state is two ``uint64`` arrays and the list of item
    ids (16 bytes + id per item), so ``ray.put`` / pickling is cheap. Undecodable benchmark
    images are dropped at build time and listed in :attr:`skipped`.

    A corpus hash matches an item when ``hamming(pHash) <= radius`` and, unless
    ``dhash_radius`` is ``None``, ``hamming(dHash) <= dhash_radius`` too.
    """

    __slots__ = ("dhash_radius", "dhashes", "item_ids", "phashes", "radius", "skipped")

    def __init__(self, phashes: np.ndarray, dhashes: np.ndarray, item_ids: Sequence[str],
                 *, radius: int = DEFAULT_RADIUS, dhash_radius: int | None = DEFAULT_DHASH_RADIUS,
                 skipped: Sequence[str] = ()) -> None:
        self.phashes = np.ascontiguousarray(phashes, dtype=np.uint64)
        self.dhashes = np.ascontiguousarray(dhashes, dtype=np.uint64)
        self.item_ids = list(item_ids)
        if not (len(self.phashes) == len(self.dhashes) == len(self.item_ids)):
            raise ValueError("phashes, dhashes and item_ids must have the same length")
        self.skipped = list(skipped)
        self.radius = int(radius)
        self.dhash_radius = None if dhash_radius is None else int(dhash_radius)

    @classmethod
    def build(cls, items: Iterable[tuple[str, Any]], *, batch_size: int = 512,
              **kwargs: Any) -> ImageHashIndex:
        """Index ``(item_id, image_bytes_or_PIL)`` pairs (e.g. the benchmark's VQA items)."""
        ps, ds, ids, skipped = [], [], [], []
        batch: list[tuple[str, Any]] = []

        def flush() -> None:
            ph, dh, ok = hash_batch([im for _, im in batch])
            ps.append(ph[ok])
            ds.append(dh[ok])
            for (iid, _), good in zip(batch, ok):
                (ids if good else skipped).append(iid)
            batch.clear()

        for item in items:
            batch.append(item)
            if len(batch) >= batch_size:
                flush()
        if batch:
            flush()
        cat = (lambda xs: np.concatenate(xs) if xs else np.zeros(0, np.uint64))
        return cls(cat(ps), cat(ds), ids, skipped=skipped, **kwargs)

    def __len__(self) -> int:
        return len(self.item_ids)

    def __repr__(self) -> str:
        return (f"ImageHashIndex({len(self)} items, radius={self.radius}, "
                f"dhash_radius={self.dhash_radius})")

    def __getstate__(self) -> dict:
        return {s: getattr(self, s) for s in self.__slots__}

    def __setstate__(self, state: dict) -> None:
        for s in self.__slots__:
            setattr(self, s, state[s])

    def query(self, hashes: np.ndarray, dhashes: np.ndarray | None = None,
              valid: np.ndarray | None = None, *, radius: int | None = None,
              dhash_radius: int | None | str = "default",
              chunk_elems: int = 1 << 21) -> list[tuple[int, str, int]]:
        """All ``(row_index, item_id, phash_distance)`` with the corpus row within radius.

        ``hashes`` / ``dhashes`` are the corpus pHashes / dHashes (``hash_batch`` output);
        ``valid`` masks rows out (invalid rows never match). Without ``dhashes`` only pHash is
        checked. Sorted by row, then distance. Brute force XOR + popcount, chunked so that a
        chunk's distance matrix stays under ``chunk_elems`` bytes.
        """
        r = self.radius if radius is None else int(radius)
        dr = self.dhash_radius if dhash_radius == "default" else dhash_radius
        q = np.asarray(hashes, dtype=np.uint64).reshape(-1)
        qd = None if dhashes is None or dr is None else np.asarray(dhashes, dtype=np.uint64).reshape(-1)
        rows = np.arange(len(q)) if valid is None else np.flatnonzero(np.asarray(valid, dtype=bool))
        out: list[tuple[int, str, int]] = []
        n = len(self.phashes)
        if n == 0 or len(rows) == 0:
            return out
        step = max(1, chunk_elems // n)
        for s in range(0, len(rows), step):
            rr = rows[s:s + step]
            dist = _popcount(np.bitwise_xor(q[rr, None], self.phashes[None, :]))
            qi, ii = np.nonzero(dist <= r)
            if len(qi) == 0:
                continue
            dd = dist[qi, ii]
            if qd is not None:
                keep = _popcount(np.bitwise_xor(qd[rr[qi]], self.dhashes[ii])) <= dr
                qi, ii, dd = qi[keep], ii[keep], dd[keep]
            order = np.lexsort((dd, qi))
            ids = self.item_ids
            out.extend((int(rr[qi[k]]), ids[ii[k]], int(dd[k])) for k in order)
        return out
