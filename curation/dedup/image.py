"""Perceptual image hashes, and finding edited copies of benchmark images (decontamination).

Two tools:

* 64-bit hashes of whole images -- :func:`phash`, :func:`dhash`, :func:`hash_batch`,
  :func:`hamming`. Global and greyscale: good for frames of a video that is re-encoded as a whole
  (:mod:`curation.dedup.video` uses them), not for cropped copies.
* Copy detection -- :func:`describe` and :class:`ImageHashIndex`::

      index = ImageHashIndex.build([(key, image), ...])  # driver, once: bytes or PIL images
      desc = describe(images)                            # worker: bytes, PIL images (video
                                                         # keyframes) or None, per batch
      for row, key, distance in index.query(desc): ...  # images[row] is a copy of `key`

  ``describe`` never raises: ``desc.valid`` is False for ``None`` and undecodable images, which
  never match. ``query`` returns every match, sorted by row, then distance (lower is closer;
  a match has ``distance <= index.max_distance``). The index is numpy arrays (14.6 KB per
  benchmark image), picklable, to be put in the Ray object store once and shared.

What counts as a copy -- the edits measured (``tests/unit/dedup/test_image.py`` defines them): resized
0.5x-2x keeping the aspect ratio; re-encoded as JPEG at quality 50-95, PNG <-> JPEG; cropped:
up to 10% of the width and up to 10% of the height removed in total, split in any way between
the two sides of each axis (left 3% + right 7%, say); brightness factor 0.75-1.25 (RGB
multiplied, clipped at 255, as PIL's ``ImageEnhance.Brightness``); and all of them at once.
Not covered: stretching, rotation, flips, larger crops, overlays, other colour changes.

How, in three stages, each more exact and more costly per pair than the one before:

1. Candidates. Each benchmark image is indexed as 36 crop variants: per axis, the 6
   ``(left, right)`` crops at the centres of a grid covering ``l, r >= 0, l + r <= 10%``, so any
   allowed crop is within 1.7% per edge of a variant. A variant keeps the 64-bit pHash of its
   32x32 luma, its 4x4 colour layout (48 bytes) and its aspect ratio. An image is a candidate
   for a benchmark image when its pHash is within :data:`DEFAULT_RADIUS` (18) of a variant's
   (XOR + popcount over the variants of similar aspect ratio: the index is sorted by it), the
   aspect ratios agree (0.12 in log) and the colour layouts have a cosine >= 0.88
   (:data:`DEFAULT_MIN_COARSE`). The greyscale hash alone cannot tell flat-colour drawings of
   one layout apart; their colours can.
2. Alignment, per candidate pair, against a 64x64 RGB thumbnail stored per benchmark image: each
   axis is aligned on its own over a 0.5% grid of ``(left, right)`` crops up to 12% in total
   (325 per axis), scoring the cosine of the derivatives of the colour profiles -- two matrix
   products for all 325 crops. The three best (x, y) pairs whose aspect ratio is the image's
   (0.08 in log) go on.
3. Verification: each crop is resampled to 32x32; a brightness gain (0.7-1.3) is fitted by least
   squares on the image's unsaturated pixels and applied to the 64x64 thumbnail, clipped at 255;
   both images are blurred by [1 2 1] / 4 (a copy resampled from another size has edges half a
   pixel softer or sharper); the distance is the mean absolute RGB difference (0-255) of the
   worst 4x4-pixel tile, allowing a brightened copy to be darker than the prediction by up to
   ``(gain - 1) / gain`` of it where its thumbnail averaged pixels that saturated one by one.
   The worst tile, not the mean, because the unrelated images that get this far are the same
   picture but for a small part: a sign of the same colours and size with another word on it.

Measured (``benchmarks/bench_phash.py``: the sample benchmark's first 300 images, 600 copies per
edit, 5,000 unrelated corpus-like drawings from ``curation.sample``; ``BENCHMARKS.md`` has the
table): recall 0.995-1.0 for every edit, FPR 0.04% (2 of 5,000 unrelated drawings match one of
the 300: signs of the same board and background colours as a benchmark sign, with other words).
The previous index (global pHash <= 10 and dHash <= 8) had recall 0.87 and FPR 0.65% on the same
kind of data.

Why the defaults. Distance 12: copies have a 99th percentile of 5-8 per edit; of the 5 of 4,800
missed, 4 are small images re-encoded at low quality whose chroma bleeds into flat areas
(distance 12-15). The closest unrelated drawings are at 9.0, 10.6, 12.1, 12.3, 13.3. pHash
radius 18: 99.9% of copies are within 18 of a variant (the rest, like the fifth miss above at
28, are luma hashes with many near-median bits); a wider radius costs little, since the colour
layout then rejects most pairs, but gains little. Cosine 0.88: copies score >= 0.94 in 99.95% of
cases (lowest seen 0.90). A 48x48 comparison against a 96x96 thumbnail (27 KB per image)
separated no better: copies drift as much as text sharpens.

Speed (one core; drawings against drawings, the costly case, since unrelated flat-colour
drawings often pass stage 1): :func:`describe` about 3,000 images/s (JPEGs decoded with
``Image.draft`` at >= 128 px, one area-averaging resize); ``describe`` + ``query`` about 2,300
images/s against 1,000 benchmark images and 1,000 against 5,000, where 1.3 pairs per image
reach stages 2-3 (0.23 ms each).
"""

from __future__ import annotations

import functools
import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

__all__ = [
    "DEFAULT_MAX_DISTANCE",
    "DEFAULT_MIN_COARSE",
    "DEFAULT_RADIUS",
    "INVALID_HASH",
    "MAX_CROP",
    "ImageDescriptors",
    "ImageHashIndex",
    "describe",
    "dhash",
    "hamming",
    "hash_batch",
    "phash",
]

#: Hash stored for images that could not be decoded; always paired with ``valid=False``.
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


@functools.cache
def _dct_low(n: int) -> tuple[np.ndarray, np.ndarray]:
    """The 8 lowest-frequency rows of the n-point DCT, and their transpose: D_low = C8 @ X @ C8.T."""
    c8 = np.ascontiguousarray(_dct_matrix(n)[:_LOW]).astype(np.float32)
    return c8, np.ascontiguousarray(c8.T)


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


def _open(image: bytes | bytearray | memoryview | Image.Image, mode: str) -> Image.Image:
    """``mode`` ("L" or "RGB") PIL image; JPEGs decoded at reduced size (``draft``). Raises on bad input."""
    if isinstance(image, Image.Image):
        img = image
    else:
        img = Image.open(io.BytesIO(bytes(image) if not isinstance(image, bytes) else image))
        if img.format == "JPEG":
            img.draft(mode, (_DRAFT_SIDE, _DRAFT_SIDE))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # flatten transparency on white so that a transparent PNG hashes like its JPEG copy
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, rgba)
    if img.mode != mode:
        img = img.convert(mode)
    img.load()
    return img


def _pixels(img: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    """(32x32 float32 for pHash, 8x9 float32 for dHash) from a greyscale image."""
    # LANCZOS (as imagehash does): BOX made re-encoded / resized copies drift more
    small = img.resize((_HASH_SIDE, _HASH_SIDE), Image.Resampling.LANCZOS)
    d = img.resize((9, 8), Image.Resampling.LANCZOS)
    return np.asarray(small, dtype=np.float32), np.asarray(d, dtype=np.float32)


def _pack(bits: np.ndarray) -> np.ndarray:
    """(N, 64) bool -> (N,) uint64, first bit most significant."""
    return np.packbits(bits, axis=1).view(">u8").reshape(-1).astype(np.uint64)


def _phash_bits(px: np.ndarray) -> np.ndarray:
    """(N, s, s) -> (N, 64) bool."""
    c8, c8t = _dct_low(px.shape[-1])
    low = (c8 @ px @ c8t).reshape(len(px), _LOW * _LOW)
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
    """64-bit DCT perceptual hash of encoded image bytes or a PIL image. Raises on bad input.

    Greyscale, resized to 32x32 (Lanczos), 2D DCT-II (an orthonormal numpy matrix), top-left 8x8
    block; bit = coefficient > median of the 63 AC coefficients, first coefficient in bit 63,
    row-major. The DC bit (mean brightness) is always 0, so brightness shifts do not move it.
    """
    p, _ = _pixels(_open(image, "L"))
    return int(_pack(_phash_bits(p[None]))[0])


def dhash(image: bytes | Image.Image) -> int:
    """64-bit difference hash of encoded image bytes or a PIL image. Raises on bad input.

    Greyscale, resized to 9x8 (Lanczos); bit = pixel > its right neighbour.
    """
    _, d = _pixels(_open(image, "L"))
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
            p[i], d[i] = _pixels(_open(im, "L"))
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
# Copy-detection descriptors
# --------------------------------------------------------------------------------------------

#: Largest crop a copy may have, per axis, as a share of the side (split in any way between the
#: two edges: left 3% + right 7% is covered).
MAX_CROP = 0.10
_THUMB = 32  # query thumbnail side (RGB, whole image)
_FINE = 64  # stored benchmark thumbnail: 2x the query side, so any crop of it resamples to 32 px
_COARSE = 4  # coarse colour layout: 4x4 cells
_COARSE_DIM = _COARSE * _COARSE * 3
_TILE = 4  # the match distance is the worst 4x4-pixel tile of the 32x32 comparison
_TILE_POOL = np.kron(np.eye(_THUMB // _TILE), np.ones((_TILE, 1))).astype(np.float32)  # (32, 4)
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R 601, as PIL's "L"


def _cover(k: int, total: float) -> np.ndarray:
    """Centres of the k x k grid squares that cover the triangle ``l, r >= 0, l + r <= total``.

    Any crop ``(l, r)`` of one axis is then within ``total / (2k)`` of a centre on both edges.
    """
    s = total / k
    return np.array([((i + 0.5) * s, (j + 0.5) * s) for i in range(k) for j in range(k) if i + j < k])


def _area_matrix(l: float, r: float, n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights that average ``[l, 1 - r]`` of a signal of n_in samples into n_out."""
    edges = (l + (1 - l - r) * np.arange(n_out + 1) / n_out) * n_in
    j = np.arange(n_in)
    w = np.clip(np.minimum(edges[1:, None], j + 1) - np.maximum(edges[:-1, None], j), 0, None)
    return w / w.sum(axis=1, keepdims=True)


# crop variants indexed per benchmark image: 6 (left, right) crops per axis, 36 per image
_AXIS_VARIANTS = _cover(3, MAX_CROP)
_VARIANTS = np.array([(l, r, t, b) for t, b in _AXIS_VARIANTS for l, r in _AXIS_VARIANTS])
_VARIANT_ASPECT = np.log((1 - _VARIANTS[:, 0] - _VARIANTS[:, 1]) / (1 - _VARIANTS[:, 2] - _VARIANTS[:, 3]))
# verification aligns each axis on a 0.5% grid of (left, right) crops, 12% in total at most
_GRID = np.arange(0, 0.12 + 1e-9, 0.005)
_ALIGN = np.array([(l, r) for l in _GRID for r in _GRID if l + r <= 0.12 + 1e-9])
_ALIGN_W = np.stack([_area_matrix(l, r, _FINE, _THUMB) for l, r in _ALIGN]).astype(np.float32)
# the 2D comparison is done on both images blurred by [1, 2, 1] / 4: a copy resampled from another
# size has edges half a pixel softer or sharper, which otherwise dominates its worst tile
_BLUR = (np.eye(_THUMB) * 2 + np.eye(_THUMB, k=1) + np.eye(_THUMB, k=-1)) / 4
_BLUR[0, 0] = _BLUR[-1, -1] = 0.75
_BLUR = _BLUR.astype(np.float32)
_ALIGN_WB = _BLUR @ _ALIGN_W
_ALIGN_DW_FLAT = np.diff(_ALIGN_W, axis=1).reshape(len(_ALIGN), -1)  # then the derivative
_TRIU = np.triu_indices(_FINE)
_ALIGN_GRAM = (np.einsum("psi,psj->pij", *[np.diff(_ALIGN_W, axis=1)] * 2) * (2 - np.eye(_FINE)))[
    :, _TRIU[0], _TRIU[1]
].astype(np.float32)  # off-diagonal twice
_ALIGN_ASPECT = np.log(1 - _ALIGN.sum(axis=1))


@dataclass(frozen=True, eq=False)
class ImageDescriptors:
    """What :meth:`ImageHashIndex.query` needs of a batch of images (:func:`describe` makes it).

    Row ``i`` is ``images[i]``; rows with ``valid`` False (``None``, undecodable) are zeros.
    """

    phash: np.ndarray  # (n,) uint64: pHash of the thumbnail's luma
    coarse: np.ndarray  # (n, 48) int8: 4x4 RGB layout, channel means removed, unit norm x 127
    thumbs: np.ndarray  # (n, 32, 32, 3) uint8 RGB thumbnail of the whole image
    aspect: np.ndarray  # (n,) float32 log(width / height)
    valid: np.ndarray  # (n,) bool

    def __len__(self) -> int:
        return len(self.valid)

    def __getitem__(self, rows: slice | np.ndarray) -> ImageDescriptors:
        """The rows ``rows`` (a slice, indices or a mask) as descriptors of their own."""
        return ImageDescriptors(
            self.phash[rows], self.coarse[rows], self.thumbs[rows], self.aspect[rows], self.valid[rows]
        )


def _thumbs(img: Image.Image, boxes: np.ndarray, side: int) -> np.ndarray:
    """(len(boxes), side, side, 3) uint8: each crop box (l, r, t, b as shares) area-resampled."""
    w, h = img.size
    out = np.empty((len(boxes), side, side, 3), np.uint8)
    for k, (l, r, t, b) in enumerate(boxes):
        out[k] = np.asarray(
            img.resize((side, side), Image.Resampling.BOX, box=(l * w, t * h, w - r * w, h - b * h))
        )
    return out


def _thumb_phash(thumbs: np.ndarray) -> np.ndarray:
    """(n, 32, 32, 3) uint8 -> (n,) uint64 pHash of the luma."""
    if not len(thumbs):
        return np.zeros(0, np.uint64)
    return _pack(_phash_bits(thumbs.astype(np.float32) @ _LUMA))


def _coarse(thumbs: np.ndarray) -> np.ndarray:
    """(n, 32, 32, 3) uint8 -> (n, 48) int8: cosine-ready coarse colour layout.

    Channel means are removed, so a brightness factor (RGB x f) leaves the direction unchanged.
    """
    n, c = len(thumbs), _THUMB // _COARSE
    cells = thumbs.reshape(n, _COARSE, c, _COARSE, c, 3).mean(axis=(2, 4), dtype=np.float32)
    cells -= cells.mean(axis=(1, 2), keepdims=True)
    v = cells.reshape(n, _COARSE_DIM)
    v /= np.linalg.norm(v, axis=1, keepdims=True) + 1e-6
    return np.round(v * 127).astype(np.int8)


def describe(images: Sequence[Any]) -> ImageDescriptors:
    """Describe many images for :meth:`ImageHashIndex.query`; never raises.

    ``images`` holds encoded bytes, PIL images (decoded video frames, say) or ``None``. JPEGs
    are decoded at reduced size (``draft``, >= 128 px); each image becomes a 32x32 RGB thumbnail,
    its luma pHash, a 4x4 colour layout and its aspect ratio.
    """
    n = len(images)
    thumbs = np.zeros((n, _THUMB, _THUMB, 3), np.uint8)
    aspect = np.zeros(n, np.float32)
    valid = np.zeros(n, dtype=bool)
    whole = np.zeros((1, 4))
    for i, im in enumerate(images):
        if im is None:
            continue
        try:
            img = _open(im, "RGB")
            thumbs[i] = _thumbs(img, whole, _THUMB)[0]
            aspect[i] = np.log(img.width / img.height)
        except Exception:  # noqa: BLE001, S112 - undecodable / truncated / bombs: a masked row
            continue
        valid[i] = True
    thumbs[~valid] = 0
    ph = _thumb_phash(thumbs)
    ph[~valid] = INVALID_HASH
    return ImageDescriptors(ph, _coarse(thumbs), thumbs, aspect, valid)


# --------------------------------------------------------------------------------------------
# Index
# --------------------------------------------------------------------------------------------

#: pHash Hamming radius between a corpus image and the nearest crop variant (candidates).
DEFAULT_RADIUS = 18
#: Cosine of the 4x4 colour layouts (image vs crop variant) that a candidate needs to be verified.
DEFAULT_MIN_COARSE = 0.88
#: A match: mean absolute RGB difference (0-255) of the worst 4x4-pixel tile, aligned, at most this.
DEFAULT_MAX_DISTANCE = 12.0
_ASPECT_TOL_COARSE = 0.12  # log aspect, candidate vs nearest crop variant (edges off by <= 1.7%)
_ASPECT_TOL = 0.08  # log aspect, copy vs the aligned crop (pixel rounding of a 60-px copy)
_TOP_AXIS = 12  # best crops per axis, combined in pairs that keep the aspect ratio
_TOP = 3  # best such pairs compared in 2D
_GAIN = (0.7, 1.3)  # brightness factors the verification fits (copies are made with 0.75-1.25)
_SAT = (3, 252)  # query pixels this close to black / white are left out of the gain fit


def _crop_scores(q: np.ndarray, f: np.ndarray) -> np.ndarray:
    """(k, P): how well each crop in ``_ALIGN`` of benchmark profiles ``f`` (k, 3, 64) matches
    image profiles ``q`` (k, 3, 32).

    The score is the cosine of the profiles' derivatives (a brightness factor or a gradient
    background does not move it). With ``r = D W_p f`` the crop's derivative, both terms are
    single matrix products over all crops: ``r . dq = <D W_p, dq f^T>`` and
    ``|r|^2 = <(D W_p)^T D W_p, f f^T>`` (upper triangle).
    """
    dq = np.diff(q, axis=2)  # k, 3, 31
    num = _ALIGN_DW_FLAT @ (dq.transpose(0, 2, 1) @ f).reshape(len(q), -1).T  # P, k
    ff = (f.transpose(0, 2, 1) @ f)[:, _TRIU[0], _TRIU[1]]  # k, 64 * 65 / 2
    norm = np.sqrt(np.maximum(_ALIGN_GRAM @ ff.T, 1e-6)) * (np.linalg.norm(dq, axis=(1, 2)) + 1e-3)
    return (num / norm).T


class ImageHashIndex:
    """Benchmark images, queried for resized, re-encoded, cropped and brightened copies.

    Build once (driver side) and share: the state is numpy arrays (14.6 KB per image: 36 crop
    variants x (8-byte pHash, 48-byte colour layout, 4-byte aspect, 4-byte owner) and a 64x64
    RGB thumbnail) and the item ids, so ``ray.put`` / pickling is cheap. Undecodable benchmark
    images are dropped at build time and listed in :attr:`skipped`.
    """

    __slots__ = (
        "aspect",
        "coarse",
        "fine",
        "item_ids",
        "max_distance",
        "min_coarse",
        "owner",
        "phashes",
        "radius",
        "skipped",
        "variant_aspect",
    )

    def __init__(
        self,
        item_ids: Sequence[str],
        phashes: np.ndarray,
        coarse: np.ndarray,
        fine: np.ndarray,
        aspect: np.ndarray,
        *,
        radius: int = DEFAULT_RADIUS,
        min_coarse: float = DEFAULT_MIN_COARSE,
        max_distance: float = DEFAULT_MAX_DISTANCE,
        skipped: Sequence[str] = (),
    ) -> None:
        """Per image: ``phashes`` (n, 36) and ``coarse`` (n, 36, 48) of its crop variants,
        ``fine`` (n, 3, 64, 64) thumbnail, ``aspect`` (n,) log(width / height)."""
        n, v = len(item_ids), len(_VARIANTS)
        self.item_ids = list(item_ids)
        self.fine = np.ascontiguousarray(fine, dtype=np.uint8).reshape(n, 3, _FINE, _FINE)
        self.aspect = np.ascontiguousarray(aspect, dtype=np.float32).reshape(n)
        # variants sorted by aspect ratio: a query scans only those within _ASPECT_TOL_COARSE of its own
        va = (self.aspect[:, None] + _VARIANT_ASPECT[None, :].astype(np.float32)).reshape(-1)
        order = np.argsort(va, kind="stable")
        self.variant_aspect = va[order]
        self.owner = (order // v).astype(np.int32)
        self.phashes = np.ascontiguousarray(np.asarray(phashes, dtype=np.uint64).reshape(n * v)[order])
        coarse = np.asarray(coarse, dtype=np.int8).reshape(n * v, _COARSE_DIM)
        self.coarse = np.ascontiguousarray(coarse[order])
        self.skipped = list(skipped)
        self.radius = int(radius)
        self.min_coarse = float(min_coarse)
        self.max_distance = float(max_distance)

    @classmethod
    def build(cls, items: Iterable[tuple[str, Any]], **kwargs: Any) -> ImageHashIndex:
        """Index ``(item_id, image_bytes_or_PIL)`` pairs (e.g. the benchmark's VQA items)."""
        ids, ph, coarse, fine, aspect, skipped = [], [], [], [], [], []
        for iid, image in items:
            try:
                img = _open(image, "RGB")
                w, h = img.size
                if max(w, h) > 4 * _FINE:  # resampling 36 crops of a large image: shrink it first
                    s = 4 * _FINE / max(w, h)
                    img = img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.BOX)
                variants = _thumbs(img, _VARIANTS, _THUMB)
                fine.append(_thumbs(img, np.zeros((1, 4)), _FINE)[0].transpose(2, 0, 1))
            except Exception:  # noqa: BLE001 - undecodable benchmark image: listed, not indexed
                skipped.append(iid)
                continue
            ids.append(iid)
            ph.append(_thumb_phash(variants))
            coarse.append(_coarse(variants))
            aspect.append(np.log(w / h))
        v = len(_VARIANTS)
        return cls(
            ids,
            np.array(ph, np.uint64).reshape(-1, v),
            np.array(coarse, np.int8).reshape(-1, v, _COARSE_DIM),
            np.array(fine, np.uint8).reshape(-1, 3, _FINE, _FINE),
            np.array(aspect, np.float32),
            skipped=skipped,
            **kwargs,
        )

    def __len__(self) -> int:
        return len(self.item_ids)

    def __repr__(self) -> str:
        return (
            f"ImageHashIndex({len(self)} images, radius={self.radius}, "
            f"min_coarse={self.min_coarse}, max_distance={self.max_distance})"
        )

    def __getstate__(self) -> dict:
        return {s: getattr(self, s) for s in self.__slots__}

    def __setstate__(self, state: dict) -> None:
        for s in self.__slots__:
            setattr(self, s, state[s])

    def candidates(self, desc: ImageDescriptors, *, chunk: int = 64) -> np.ndarray:
        """(k, 2) int array of unique (row, image) pairs worth verifying: pHash within
        :attr:`radius` of a crop variant whose aspect ratio and coarse colour layout agree.

        Rows are taken in order of aspect ratio, ``chunk`` at a time, and each chunk is compared
        (XOR + popcount) with the variants of nearby aspect ratio only.
        """
        rows = np.flatnonzero(desc.valid)
        if len(self) == 0 or len(rows) == 0:
            return np.zeros((0, 2), np.int64)
        rows = rows[np.argsort(desc.aspect[rows], kind="stable")]
        min_dot = self.min_coarse * 127 * 127
        found = [np.zeros((0, 2), np.int64)]
        for s in range(0, len(rows), chunk):
            rr = rows[s : s + chunk]
            lo, hi = np.searchsorted(
                self.variant_aspect,
                [desc.aspect[rr[0]] - _ASPECT_TOL_COARSE, desc.aspect[rr[-1]] + _ASPECT_TOL_COARSE],
            )
            dist = _popcount(np.bitwise_xor(desc.phash[rr, None], self.phashes[None, lo:hi]))
            qi, vi = np.nonzero(dist <= self.radius)
            row, vi = rr[qi], vi + lo
            keep = np.abs(desc.aspect[row] - self.variant_aspect[vi]) <= _ASPECT_TOL_COARSE
            row, vi = row[keep], vi[keep]
            dot = np.einsum("kd,kd->k", desc.coarse[row].astype(np.int32), self.coarse[vi].astype(np.int32))
            keep = dot >= min_dot
            found.append(np.stack([row[keep], self.owner[vi[keep]].astype(np.int64)], axis=1))
        return np.unique(np.concatenate(found), axis=0)

    def distances(self, desc: ImageDescriptors, rows: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Distance of image ``desc[rows[i]]`` to benchmark image ``items[i]``, for each i
        (stages 2 and 3 of the module docstring); ``inf`` when no crop has the image's aspect
        ratio. :meth:`query` calls it on :meth:`candidates`; the benchmark script on any pair.
        """
        q = desc.thumbs[rows].transpose(0, 3, 1, 2).astype(np.float32)  # k, 3, 32, 32
        f = self.fine[items].astype(np.float32)  # k, 3, 64, 64
        k = len(rows)
        sx = _crop_scores(q.mean(axis=2), f.mean(axis=2))  # x: (k, P)
        sy = _crop_scores(q.mean(axis=3), f.mean(axis=3))  # y
        tx = np.argsort(-sx, axis=1)[:, :_TOP_AXIS]
        ty = np.argsort(-sy, axis=1)[:, :_TOP_AXIS]
        # joint choice: best sum of scores among the (x, y) crops whose aspect ratio is the image's
        joint = (
            np.take_along_axis(sy, ty, axis=1)[:, :, None] + np.take_along_axis(sx, tx, axis=1)[:, None, :]
        )  # k, y, x
        implied = (
            self.aspect[items][:, None, None] + _ALIGN_ASPECT[tx][:, None, :] - _ALIGN_ASPECT[ty][:, :, None]
        )
        joint[np.abs(desc.aspect[rows][:, None, None] - implied) > _ASPECT_TOL] = -np.inf
        best = np.argsort(-joint.reshape(k, -1), axis=1)[:, :_TOP]  # k, C
        possible = np.take_along_axis(joint.reshape(k, -1), best, axis=1) > -np.inf
        ix = np.take_along_axis(tx, best % _TOP_AXIS, axis=1)
        iy = np.take_along_axis(ty, best // _TOP_AXIS, axis=1)
        q = _BLUR @ q @ _BLUR.T
        # brightness gain: least squares on the best crop, over the image's unsaturated pixels;
        # then the benchmark thumbnail saturates at 255 like a brightened copy does (PIL's
        # Brightness multiplies RGB and clips), before it is resampled
        c0 = _ALIGN_WB[iy[:, 0]][:, None] @ (f @ _ALIGN_WB[ix[:, 0]].transpose(0, 2, 1)[:, None])
        w = (q > _SAT[0]) & (q < _SAT[1])
        gain = (w * q * c0).sum(axis=(1, 2, 3)) / ((w * c0 * c0).sum(axis=(1, 2, 3)) + 1e-6)
        w &= c0 * gain[:, None, None, None] < _SAT[1] - 10  # and again without the edges of saturated areas
        gain = (w * q * c0).sum(axis=(1, 2, 3)) / ((w * c0 * c0).sum(axis=(1, 2, 3)) + 1e-6)
        gain = np.clip(gain, *_GAIN)
        f = np.minimum(f * gain[:, None, None, None], 255)
        # crops[k, c] = Wy f Wx^T per channel, as batched GEMMs
        fx = f.reshape(k, 1, 3 * _FINE, _FINE) @ _ALIGN_WB[ix].transpose(0, 1, 3, 2)  # k, C, 3 * 64, 32
        pred = _ALIGN_WB[iy][:, :, None] @ fx.reshape(k, _TOP, 3, _FINE, _THUMB)  # k, C, 3, 32, 32
        # a brightened copy's thumbnail averages pixels that saturated one by one: it can be darker
        # than the prediction by up to (gain - 1) / gain of it, never lighter
        slack = pred * (np.maximum(gain, 1) - 1)[:, None, None, None, None] / gain[:, None, None, None, None]
        diff = pred - q[:, None]
        diff = np.maximum(-diff, 0) + np.maximum(diff - slack, 0)
        t = _THUMB // _TILE
        tiles = (diff.sum(axis=2) @ _TILE_POOL).reshape(k, _TOP, t, _TILE, t).sum(axis=3)
        dist = tiles.max(axis=(2, 3)) / (3 * _TILE * _TILE)  # k, C: the worst tile
        dist[~possible] = np.inf
        return dist.min(axis=1)

    def query(self, desc: ImageDescriptors, *, chunk: int = 64) -> list[tuple[int, str, float]]:
        """All ``(row, item_id, distance)`` with image ``row`` a copy of a benchmark image.

        ``desc`` is :func:`describe` output; invalid rows never match. Sorted by row, then
        distance (mean absolute RGB difference, 0-255, of the worst 4x4 tile once aligned and
        brightness-matched; <= :attr:`max_distance`). ``chunk`` pairs are verified at a time.
        """
        pairs = self.candidates(desc)
        out: list[tuple[int, str, float]] = []
        for s in range(0, len(pairs), chunk):
            rows, items = pairs[s : s + chunk, 0], pairs[s : s + chunk, 1]
            dist = self.distances(desc, rows, items)
            out.extend(
                (int(r), self.item_ids[i], float(d))
                for r, i, d in zip(rows, items, dist)
                if d <= self.max_distance
            )
        out.sort(key=lambda m: (m[0], m[2]))
        return out
