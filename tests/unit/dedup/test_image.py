"""Perceptual hashes, copy descriptors and ImageHashIndex (curation.dedup.image).

The accuracy tests plant edited copies of the sample benchmark's images (``tests/helpers/image_edits.py``
says which edits) and query unrelated corpus-like drawings.
"""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
from PIL import Image

from curation import sample as S
from curation.dedup.image import (
    INVALID_HASH,
    ImageHashIndex,
    _dct_matrix,
    describe,
    dhash,
    hamming,
    hash_batch,
    phash,
)
from tests.helpers.image_edits import TRANSFORMS, bench_images, copies, encode, unrelated

N_ITEMS = 300
N_UNRELATED = 2000


def recall(index: ImageHashIndex, bench: list[tuple[str, bytes]], blobs: list[bytes]) -> float:
    desc = describe(blobs)
    assert desc.valid.all()
    hits = {(row, iid) for row, iid, _ in index.query(desc)}
    return sum((k, iid) in hits for k, (iid, _) in enumerate(bench)) / len(bench)


@pytest.fixture(scope="module")
def bench():
    return bench_images(N_ITEMS)


@pytest.fixture(scope="module")
def index(bench):
    return ImageHashIndex.build(bench)


# --------------------------------------------------------------------------------------------
# 64-bit hashes (video frames use them)
# --------------------------------------------------------------------------------------------


def test_dct_matrix_is_orthonormal():
    c = _dct_matrix(32)
    assert np.allclose(c @ c.T, np.eye(32), atol=1e-10)


def test_single_and_batch_agree(bench):
    ph, dh, ok = hash_batch([b for _, b in bench[:10]])
    assert ok.all() and ph.dtype == np.uint64
    for k in range(10):
        assert phash(bench[k][1]) == int(ph[k])
        assert dhash(bench[k][1]) == int(dh[k])
        assert phash(Image.open(io.BytesIO(bench[k][1]))) == int(ph[k])


def test_batch_never_raises():
    good = encode(Image.new("RGB", (64, 48), (200, 10, 10)))
    rgba = Image.new("RGBA", (40, 40), (0, 0, 255, 128))
    bomb = S.decompression_bomb_png(20_000)
    inputs = [None, b"", b"not an image", good[: len(good) // 3], good, rgba, bomb]
    ph, dh, ok = hash_batch(inputs)
    assert ok.tolist() == [False, False, False, ok[3], True, True, False]
    assert (ph[~ok] == INVALID_HASH).all() and (dh[~ok] == INVALID_HASH).all()
    assert hash_batch([])[0].shape == (0,)
    desc = describe(inputs)
    assert desc.valid.tolist() == [False, False, False, desc.valid[3], True, True, False]
    assert (desc.thumbs[~desc.valid] == 0).all() and (desc.phash[~desc.valid] == INVALID_HASH).all()
    assert len(describe([])) == 0


def test_hamming_popcount():
    a = np.array([0, 2**64 - 1, 0b1011], dtype=np.uint64)
    assert hamming(a, np.uint64(0)).tolist() == [0, 64, 3]


# --------------------------------------------------------------------------------------------
# Copy detection
# --------------------------------------------------------------------------------------------


def test_describe_takes_bytes_or_decoded_images(bench):
    png = bench[0][1]
    from_bytes, from_pil = describe([png]), describe([Image.open(io.BytesIO(png))])
    assert np.array_equal(from_bytes.thumbs, from_pil.thumbs)
    assert from_bytes.phash[0] == from_pil.phash[0] and from_bytes.aspect[0] == from_pil.aspect[0]


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_recall_on_edited_copies(index, bench, name):
    r = recall(index, bench, copies(bench, name))
    print(f"recall {name}: {r:.4f}")
    assert r >= 0.99


def test_false_positive_rate(index):
    """Unrelated drawings of the same kinds: the same-colour sign with other words is the hard case."""
    desc = describe(unrelated(N_UNRELATED, 10_000))
    rows = {row for row, _, _ in index.query(desc)}
    fpr = len(rows) / N_UNRELATED
    print(f"FPR any-of-{len(index)}: {fpr:.4%} ({len(rows)} of {N_UNRELATED})")
    assert fpr <= 0.001


def test_query_results_and_mask(index, bench):
    desc = describe([b for _, b in bench[:5]] + [None])
    res = index.query(desc)
    assert all(row < 5 for row, _, _ in res)
    for k in range(5):
        assert (k, bench[k][0]) in {(row, iid) for row, iid, _ in res}
    assert res == sorted(res, key=lambda t: (t[0], t[2]))
    assert all(d <= index.max_distance for *_, d in res)
    desc.valid[0] = False
    assert all(row != 0 for row, _, _ in index.query(desc))
    # chunking does not change the answer
    assert index.query(desc, chunk=1) == index.query(desc)
    assert np.array_equal(index.candidates(desc, chunk=1), index.candidates(desc))
    assert ImageHashIndex.build([]).query(desc) == []


def test_build_skips_undecodable(bench):
    idx = ImageHashIndex.build([*bench[:3], ("bad", b"junk"), ("none", None)])
    assert len(idx) == 3 and idx.skipped == ["bad", "none"]


def test_pickle_round_trip(index, bench):
    blob = pickle.dumps(index)
    assert len(blob) < len(index) * 15_000 + 4096 + sum(len(i) + 8 for i in index.item_ids)
    back = pickle.loads(blob)
    assert np.array_equal(back.fine, index.fine) and np.array_equal(back.phashes, index.phashes)
    assert back.item_ids == index.item_ids
    params = ("radius", "min_coarse", "max_distance")
    assert [getattr(back, p) for p in params] == [getattr(index, p) for p in params]
    desc = describe([b for _, b in bench[:20]])
    assert back.query(desc) == index.query(desc)
