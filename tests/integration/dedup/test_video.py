"""Near-duplicate videos within a corpus: the pair search, clusters, and the pool-wide stage."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from curation.dedup.video import clusters, frame_hashes, near_duplicate_pairs
from curation.io.video import sample_frames
from curation.sample.video import make_video, reencode, transcode


def _hashes(videos: list[bytes]):
    return zip(
        *(frame_hashes(vf.frames, vf.ts) for vf in (sample_frames(v, fps=1, max_frames=32) for v in videos))
    )


@pytest.fixture(scope="module")
def originals() -> list[bytes]:
    return [make_video(51, i, seconds=6.0) for i in range(24)]


def test_copies_are_paired_at_their_offset_and_unrelated_videos_are_not(originals) -> None:
    rng = random.Random(3)
    copies = {
        0: reencode(originals[0], rng),  # another codec, size, maybe frame rate
        1: transcode(originals[1], start=2.0),  # its last 4 s: the copy's t=0 is the original's t=2
        2: transcode(originals[2], scale=0.5, end=4.0),  # smaller, first 4 s
        3: transcode(originals[3], codec="mpeg4", fmt="avi", options={"qscale": "12"}),
    }
    videos = originals + list(copies.values())
    pairs, facts = near_duplicate_pairs(*map(list, _hashes(videos)))
    found = {(a, b): (score, offset) for a, b, score, offset in pairs}
    want = {(i, len(originals) + k) for k, i in enumerate(copies)}
    assert set(found) == want, (found, facts)
    assert (
        facts["candidate_pairs"] < len(videos) * (len(videos) - 1) / 2 / 4
    )  # not all pairs: band candidates
    # offsets: seconds to add to the first video's timestamps to land on the second's
    assert found[(1, len(originals) + 1)][1] == pytest.approx(-2.0, abs=0.5)
    assert found[(0, len(originals))][1] == pytest.approx(0.0, abs=0.5)
    assert all(score >= 0.5 for score, _ in found.values())


def test_flat_frames_propose_no_pairs() -> None:
    """Videos whose frames hash alike everywhere (black) fill one band bucket: it is skipped, not paired."""
    flat = np.zeros(5, np.uint64)
    P = [flat.copy() for _ in range(10)]
    T = [np.arange(5, dtype=float) for _ in range(10)]
    pairs, facts = near_duplicate_pairs(P, P, T, max_bucket=4)
    assert pairs == [] and facts["skipped_buckets"] == 4 and facts["candidate_pairs"] == 0
    assert len(near_duplicate_pairs(P, P, T)[0]) == 45  # with room in the bucket they are alike: all paired


def test_clusters_link_transitively() -> None:
    assert clusters(6, [(0, 3), (3, 5), (1, 2)]).tolist() == [0, 1, 1, 0, 4, 0]
    assert clusters(3, []).tolist() == [0, 1, 2]


def test_stage_keeps_the_longest_copy_and_runs_later_stages_on_the_rest(
    ray_local, tmp_path, originals
) -> None:
    from curation.pipeline import run_pipeline
    from curation.recipe import load_pipeline

    corpus = tmp_path / "videos"
    corpus.mkdir()
    rows = []
    for i in range(8):
        (corpus / f"v{i}.mp4").write_bytes(originals[i])
        rows.append({"video": f"v{i}.mp4", "caption": f"original {i}"})
    # v0: a shorter re-encoded copy listed first; v1: a smaller copy; v2: two copies, one a cut from its
    # middle
    copies = {
        "c0.mp4": transcode(originals[0], end=4.0, codec="mpeg4", fmt="mp4", options={"qscale": "8"}),
        "c1.mp4": transcode(originals[1], scale=0.5),
        "c2a.mp4": transcode(originals[2], start=1.0, end=5.0),
        "c2b.mp4": reencode(originals[2], random.Random(5)),
    }
    for name, data in copies.items():
        (corpus / name).write_bytes(data)
    rows = [{"video": "c0.mp4", "caption": "copy"}, *rows] + [
        {"video": n, "caption": "copy"} for n in list(copies)[1:]
    ]
    (corpus / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = tmp_path / "dedup.yaml"
    recipe.write_text(f"""
name: dedup
sources:
  - {{name: clips, format: jsonl, modality: video, paths: ["{corpus}/m.jsonl"]}}
stages:
  - video_near_dedup: {{}}
  - video_motion: {{}}
output: {{path: "{tmp_path / "pool"}", report: false, shard_rows: 4}}
""")
    result = run_pipeline(load_pipeline(recipe), progress=False)
    pool = Path(result.pool)
    kept = pl.read_parquet(pool / "shards" / "*.parquet")
    rejects = pl.read_parquet(pool / "rejects" / "*.parquet")
    assert kept.height + rejects.height == len(rows)  # nothing lost, nothing twice
    assert kept["video"].n_unique() == kept.height
    near = rejects.filter(pl.col("reject_reason") == "near_duplicate")
    out = {Path(v).name for v in near["video"]}
    # v0 (6 s) beats its 4 s copy; c1 is smaller than v1 (same length); c2a is shorter; of v2 and c2b (the
    # same length) the larger stays, v2 unless the re-encode kept its size, then the earlier one in input
    # order
    assert {"c0.mp4", "c1.mp4", "c2a.mp4"} <= out and len(out & {"v2.mp4", "c2b.mp4"}) == 1 and len(out) == 4
    detail = near.filter(pl.col("video").str.ends_with("c0.mp4"))["reject_detail"][0]
    assert "near duplicate of" in detail and "#1" in detail and "cluster of 2" in detail  # v0 is line 1
    # the hashes are kept in the pool, one per sampled frame
    assert all(len(p) == len(f) for p, f in zip(kept["video_near_dedup_phash"], kept["frames"]))
    # the stage after the cut ran on the rows kept only
    motion = next(s for s in result.stats["stages"] if s["name"] == "video_motion")
    assert motion["rows_in"] == len(rows) - 4
    cut = next(s for s in result.stats["stages"] if s["name"] == "video_near_dedup (pool-wide)")
    assert cut["drops"] == {"near_duplicate": 4} and cut["clusters"] == 3 and cut["largest_cluster"] == 3
    assert result.manifest["totals"]["rows"] == kept.height

    # a rerun into the same folder finds everything done and changes nothing
    again = run_pipeline(load_pipeline(recipe), progress=False)
    assert again.manifest["totals"] == result.manifest["totals"]
    assert pl.read_parquet(pool / "shards" / "*.parquet").sort("id").equals(kept.sort("id"))


def test_keep_rule_is_checked(tmp_path) -> None:
    from curation.filters.dedup import VideoNearDedup

    with pytest.raises(ValueError, match="keep: expected one of longest, largest, first"):
        VideoNearDedup(keep="best")
    assert VideoNearDedup().cuts and VideoNearDedup(keep="first").keep == "first"
