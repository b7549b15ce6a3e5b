"""Visual tokens (curation.target.geometry): the smart_resize rule against hand-computed cases, the
vectorised form against the scalar one, and video frames counted in pairs."""

import math

import numpy as np
import pytest

from curation.target.geometry import smart_resize, video_tokens, visual_tokens, visual_tokens_np

# --- images: the smart_resize rule against hand-computed cases ---------------------------------------


@pytest.mark.parametrize(
    ("size", "resized", "tokens"),
    [
        ((224, 224), (224, 224), 64),  # already multiples of 28: 8 x 8
        ((1000, 700), (1008, 700), 900),  # 35.7 -> 36, 25 -> 25
        ((1, 1), (56, 56), 4),  # scaled up to the 4-token minimum
        ((28, 28), (56, 56), 4),
        ((56, 56), (56, 56), 4),
        ((10, 20), (56, 84), 6),  # scaled up by sqrt(3136 / 200), ceiled: keeps the 1:2 shape
        ((42, 70), (56, 56), 4),  # 1.5 and 2.5 both round to 2: half to even, like the reference's round()
        ((4000, 3000), (4004, 2996), 15301),  # rounds to 11,995,984 px: still under the cap
        ((8000, 6000), (4116, 3080), 16170),  # capped: / sqrt(48e6 / 12,845,056), floored
    ],
)
def test_smart_resize_hand_cases(size, resized, tokens):
    assert smart_resize(*size) == resized
    assert visual_tokens(*size) == tokens
    w, h = resized
    assert w % 28 == 0 and h % 28 == 0
    assert (w // 28) * (h // 28) == tokens


def test_large_images_are_capped_and_small_ones_raised():
    for w, h in [(8000, 6000), (20000, 20000), (30000, 1000), (100000, 800)]:
        assert visual_tokens(w, h) <= 16384
    assert visual_tokens(20000, 20000) >= 16384 * 0.95  # capped, not collapsed
    assert visual_tokens(3, 5) >= 4
    assert visual_tokens(224, 224, max_pixels=56 * 56) == 4  # bounds are parameters
    assert visual_tokens(224, 224, min_pixels=448 * 448) == 256


def test_absurd_aspect_ratio_is_refused():
    with pytest.raises(ValueError, match="aspect ratio must be smaller than 200"):
        visual_tokens(10000, 20)
    with pytest.raises(ValueError, match="aspect ratio must be smaller than 200"):
        visual_tokens_np([224, 10000], [224, 20])
    with pytest.raises(ValueError, match="positive"):
        visual_tokens(0, 10)
    with pytest.raises(ValueError, match="positive"):
        visual_tokens_np([10, 5], [10, 0])
    assert visual_tokens(4000, 20) > 0  # ratio 200 itself is allowed


def test_vectorised_matches_scalar_on_random_sizes():
    rng = np.random.default_rng(0)
    w = np.exp(rng.uniform(0, math.log(30000), 4000)).astype(np.int64) + 1
    h = np.clip((w * np.exp(rng.uniform(-math.log(150), math.log(150), w.size))).astype(np.int64), 1, None)
    # exact multiples of 14 exercise round-half-to-even
    w = np.concatenate([w, 14 * np.arange(1, 200, 2)])
    h = np.concatenate([h, 14 * np.arange(199, 0, -2)])
    keep = np.maximum(w, h) / np.minimum(w, h) <= 200
    w, h = w[keep], h[keep]
    for kw in [{}, {"min_pixels": 128 * 784, "max_pixels": 768 * 784}]:
        got = visual_tokens_np(w, h, **kw)
        assert got.dtype == np.int64
        assert got.tolist() == [visual_tokens(int(a), int(b), **kw) for a, b in zip(w, h)]
    assert visual_tokens_np([], []).tolist() == []
    assert visual_tokens_np(np.array([[224, 56]]), np.array([[224, 56]])).tolist() == [[64, 4]]


def test_aspect_ratio_is_kept_within_rounding():
    rng = np.random.default_rng(1)
    for w, h in rng.integers(100, 12000, size=(500, 2)):
        w, h = int(w), int(h)
        if max(w, h) / min(w, h) > 10:
            continue
        rw, rh = smart_resize(w, h)
        assert rw % 28 == 0 and rh % 28 == 0
        assert 4 <= (rw // 28) * (rh // 28) <= 16384
        # each side is within 28 px of one common scale of the original
        assert abs(math.log(rw / rh) - math.log(w / h)) <= 2 * 28 / (min(rw, rh) - 28)


# --- video ----------------------------------------------------------------------------------------------


def test_video_frames_pair_up():
    per_pair = visual_tokens(640, 360, min_pixels=128 * 784, max_pixels=768 * 784)
    assert per_pair == 299  # 644 x 364
    assert video_tokens((9, 640, 360)) == 5 * 299  # ceil(9 / 2) pairs
    assert video_tokens((8, 640, 360)) == 4 * 299
    assert video_tokens((1, 640, 360)) == 299
    assert video_tokens((0, 640, 360)) == 0
    assert video_tokens([(640, 360)] * 9) == 5 * 299
    assert video_tokens([]) == 0
    assert video_tokens((9, 640, 360), temporal_patch=1) == 9 * 299
    # video bounds: small frames are raised to 128 tokens a pair, large ones held to 768
    assert video_tokens((2, 224, 224)) == 144
    assert video_tokens((2, 3840, 2160)) <= 768
    assert video_tokens((2, 3840, 2160), max_pixels=16384 * 784) == visual_tokens(3840, 2160)
    # per-frame sizes: each pair costs its first frame
    assert video_tokens([(640, 360), (1, 1), (224, 224)]) == 299 + 144
