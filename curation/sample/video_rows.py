"""The corpus's video source: JSONL rows (key, caption, video path, url) with the clips beside them.

Clips are made by :mod:`curation.sample.video`. Most are clean panning videos (a fifth of them in webm
or mkv instead of mp4); dirt and other kinds, labelled in ``truth.parquet``: benchmark videos re-encoded
and trimmed, downloads cut short, still pictures, black, bytes that are no video, empty files, audio
only, and (not dirt) several shots joined by hard cuts and text burned into the picture.
"""

from __future__ import annotations

import json
from pathlib import Path

from curation.io.video import probe
from curation.sample.benchmarks import bench_video
from curation.sample.plan import KEY_STRIDE, SOURCE_DIR, SOURCE_URL, CorpusSpec, shard_plan
from curation.sample.seeding import _rng
from curation.sample.truth import ShardResult, _truth
from curation.sample.video import (
    make_audio_only,
    make_black,
    make_burned_text,
    make_multi_shot,
    make_static,
    make_video,
    other_container,
    reencode,
    truncate,
)
from curation.sample.vocabulary import load

_VOCAB = load("video_rows")
_VIDEO_CAPTIONS: tuple[str, ...] = _VOCAB["captions"]
_VIDEO_OVERLAYS: tuple[str, ...] = _VOCAB["overlays"]


def write_video_shard(out: Path, spec: CorpusSpec, shard: int) -> ShardResult:
    """Video rows as JSONL (key, caption, video path, url) with the mp4 files in ``clips/``."""
    rel = spec.path("video", shard)
    res = ShardResult("video", shard, spec.shard_len("video", shard), files=[rel])
    folder = (out / rel).parent
    with open(out / rel, "w", encoding="utf-8") as f:
        for i, kind in enumerate(shard_plan(spec, "video", shard)):
            rng = _rng(spec.seed, "video-row", shard, i)
            key = spec.key(shard, i)
            bench = None
            if kind == "benchmark_copy":
                k = rng.randrange(spec.bench_videos)
                data = bench_video(spec.seed, k)
                duration = probe(data).duration or 3.0
                start, end = rng.uniform(0, 0.3) * duration, duration * (1 - rng.uniform(0, 0.3))
                data, bench = reencode(data, rng, start_s=start, end_s=end), f"vid-{k + 1:04d}"
            idx, ext = shard * KEY_STRIDE + i, "mp4"
            caption = rng.choice(_VIDEO_CAPTIONS)
            if kind == "benchmark_copy":
                pass
            elif kind == "static_video":
                data = make_static(spec.seed, idx)
            elif kind == "black_video":
                data = make_black(spec.seed, idx)
            elif kind == "corrupt_video":
                data = rng.randbytes(rng.randint(500, 4000))
            elif kind == "empty_video":
                data = b""
            elif kind == "audio_only":
                data = make_audio_only(spec.seed, idx)
            elif kind == "multi_shot":
                data = make_multi_shot(spec.seed, idx, rng.randint(2, 3))
            elif kind == "burned_text":
                words = rng.sample(_VIDEO_OVERLAYS, 2)
                data, caption = (
                    make_burned_text(spec.seed, idx, " ".join(words)),
                    f"{caption} Text on screen.",
                )
            else:
                data = make_video(spec.seed, idx)
                if kind == "truncated_video":
                    data = truncate(data, rng)
                elif video_container(spec, shard, i) != "mp4":  # web video comes in other containers too
                    data, ext = other_container(data, video_container(spec, shard, i))
            clip = f"clips/{key}.{ext}"
            (folder / clip).write_bytes(data)
            f.write(
                json.dumps(
                    {
                        "key": key,
                        "caption": caption,
                        "video": clip,
                        "url": SOURCE_URL["video"].format(key=key),
                    }
                )
                + "\n"
            )
            res.truth.append(_truth(rel, i, key, "video", kind, None, bench))
    return res


def video_container(spec: CorpusSpec, shard: int, i: int) -> str:
    """File extension of a clean video row: a fifth are webm (VP9) or mkv (h264 in Matroska), the rest mp4."""
    r = _rng(spec.seed, "video-container", shard, i).random()
    return "webm" if r < 0.1 else "mkv" if r < 0.2 else "mp4"


def _clips(spec: CorpusSpec, kind: str) -> list[str]:
    """Paths (relative to the corpus) of the video source's clips of one dirt kind, in order."""
    return [
        f"{SOURCE_DIR['video']}/clips/{spec.key(sh, i)}."
        f"{video_container(spec, sh, i) if kind == 'clean' else 'mp4'}"
        for sh in range(spec.n_shards("video"))
        for i, k in enumerate(shard_plan(spec, "video", sh))
        if k == kind
    ]
