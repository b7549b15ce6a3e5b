"""Perceptual hashes and ImageHashIndex (curation.dedup.image)."""

from __future__ import annotations

import io
import pickle
import random

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from curation import sample as S
from curation.dedup.image import (
    DEFAULT_DHASH_RADIUS,
    DEFAULT_RADIUS,
    INVALID_HASH,
    ImageHashIndex,
    _dct_matrix,
    dhash,
    hamming,
    hash_batch,
    phash,
)

N_ITEMS = 100
N_UNRELATED = 2000


def _enc(img: Image.Image, fmt: str = "JPEG", q: int = 85) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **({"quality": q} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _scale(img: Image.Image, f: float) -> Image.Image:
    return img.resize((max(1, round(img.width * f)), max(1, round(img.height * f))),
                      Image.Resampling.BILINEAR)


def _crop(img: Image.Image, f: float) -> Image.Image:
    w, h = img.size
    dx, dy = round(w * f), round(h * f)
    return img.crop((dx, dy, w - dx, h - dy))


TRANSFORMS = {
    "png->jpeg85": lambda i: _enc(i),
    "jpeg30": lambda i: _enc(i, q=30),
    "jpeg95": lambda i: _enc(i, q=95),
    "resize0.5": lambda i: _enc(_scale(i, 0.5)),
    "resize0.75png": lambda i: _enc(_scale(i, 0.75), "PNG"),
    "resize1.3": lambda i: _enc(_scale(i, 1.3)),
    "resize2": lambda i: _enc(_scale(i, 2.0)),
    "bright0.8": lambda i: _enc(ImageEnhance.Brightness(i).enhance(0.8)),
    "bright1.2": lambda i: _enc(ImageEnhance.Brightness(i).enhance(1.2)),
    "jpeg->png": lambda i: _enc(Image.open(io.BytesIO(_enc(i, q=75))).convert("RGB"), "PNG"),
    "crop2.5%": lambda i: _enc(_crop(i, 0.025)),
}
HARD = {"crop5%": lambda i: _enc(_crop(i, 0.05))}  # measured and reported, weaker guarantee


@pytest.fixture(scope="module")
def bench():
    items = [S.bench_item(1, k) for k in range(N_ITEMS)]
    return [(it["item_id"], it["image"]) for it in items]


@pytest.fixture(scope="module")
def index(bench):
    return ImageHashIndex.build(bench)


@pytest.fixture(scope="module")
def unrelated():
    out = []
    for k in range(N_UNRELATED):
        rng = random.Random(10_000 + k)
        scene = S.make_scene(rng)
        w, h = S._pick_size(rng)
        out.append(_enc(S.draw_scene(scene, w, h)))
    return out


def _recall(index, bench, transform):
    imgs = [Image.open(io.BytesIO(b)).convert("RGB") for _, b in bench]
    ph, dh, ok = hash_batch([transform(i) for i in imgs])
    assert ok.all()
    hits = {(row, iid) for row, iid, _ in index.query(ph, dh, ok)}
    return sum((k, bench[k][0]) in hits for k in range(len(bench))) / len(bench)


def test_dct_matrix_is_orthonormal():
    c = _dct_matrix(32)
    assert np.allclose(c @ c.T, np.eye(32), atol=1e-10)


def test_single_and_batch_agree(bench):
    ph, dh, ok = hash_batch([b for _, b in bench[:10]])
    assert ok.all() and ph.dtype == np.uint64
    for k in range(10):
        assert phash(bench[k][1]) == int(ph[k])
        assert dhash(bench[k][1]) == int(dh[k])
        img = Image.open(io.BytesIO(bench[k][1]))
        assert phash(img) == int(ph[k])
    assert all(0 <= int(h) < 2**64 for h in ph)


def test_batch_never_raises():
    good = _enc(Image.new("RGB", (64, 48), (200, 10, 10)))
    rgba = Image.new("RGBA", (40, 40), (0, 0, 255, 128))
    ph, dh, ok = hash_batch([None, b"", b"not an image", good[: len(good) // 3], good, rgba,
                             S.decompression_bomb_png(20_000)])
    assert ok.tolist() == [False, False, False, ok[3], True, True, False]
    assert (ph[~ok] == INVALID_HASH).all() and (dh[~ok] == INVALID_HASH).all()
    assert hash_batch([])[0].shape == (0,)


def test_hamming_popcount():
    a = np.array([0, 2**64 - 1, 0b1011], dtype=np.uint64)
    assert hamming(a, np.uint64(0)).tolist() == [0, 64, 3]


def test_recall_on_transformed_copies(index, bench):
    recalls = {name: _recall(index, bench, t) for name, t in TRANSFORMS.items()}
    overall = sum(recalls.values()) / len(recalls)
    print("recall per transform:", recalls, "overall", overall)
    assert overall >= 0.95, recalls
    assert min(recalls.values()) >= 0.8, recalls  # crop2.5%: 0.82
    hard = {name: _recall(index, bench, t) for name, t in HARD.items()}
    print(f"recall on 5%-per-edge crops (pHash<={DEFAULT_RADIUS}, dHash<={DEFAULT_DHASH_RADIUS}):", hard)
    assert hard["crop5%"] >= 0.15  # documented limitation; measured 0.25


def test_false_positive_rate(index, unrelated):
    ph, dh, ok = hash_batch(unrelated)
    assert ok.all()
    rows = {row for row, _, _ in index.query(ph, dh, ok)}
    fpr = len(rows) / len(unrelated)
    fpr_phash_only = len({r for r, _, _ in index.query(ph)}) / len(unrelated)
    print(f"FPR any-of-{N_ITEMS}: pHash+dHash {fpr:.4f}, pHash only {fpr_phash_only:.4f}")
    assert fpr <= 0.01
    assert fpr_phash_only > fpr


def test_query_results_and_mask(index, bench):
    ph, dh, ok = hash_batch([b for _, b in bench[:5]] + [None])
    res = index.query(ph, dh, ok)
    assert all(row < 5 for row, _, _ in res)
    for k in range(5):
        assert (k, bench[k][0], 0) in res
    assert res == sorted(res, key=lambda t: (t[0], t[2]))
    ok[0] = False
    assert all(row != 0 for row, _, _ in index.query(ph, dh, ok))
    # chunking does not change the answer
    assert index.query(ph, dh, ok, chunk_elems=7) == index.query(ph, dh, ok)
    assert ImageHashIndex.build([]).query(ph) == []


def test_build_skips_undecodable(bench):
    idx = ImageHashIndex.build([*bench[:3], ("bad", b"junk"), ("none", None)], batch_size=2)
    assert len(idx) == 3 and idx.skipped == ["bad", "none"]


def test_pickle_round_trip(index, bench):
    blob = pickle.dumps(index)
    assert len(blob) < len(index) * 16 + 4096 + sum(len(i) + 8 for i in index.item_ids)
    back = pickle.loads(blob)
    assert np.array_equal(back.phashes, index.phashes) and back.item_ids == index.item_ids
    assert (back.radius, back.dhash_radius) == (index.radius, index.dhash_radius)
    ph, dh, ok = hash_batch([b for _, b in bench[:20]])
    assert back.query(ph, dh, ok) == index.query(ph, dh, ok)
