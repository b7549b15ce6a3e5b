"""Video ingest through ``curation run`` against ffmpeg decoding the same files to null, in one run.

    python benchmarks/bench_video_pipeline.py [--videos 120] [--size 640x360] [--seconds 10] [--cores 2]
                                              [--shots] [--clip] [--preset ultrafast|veryfast]
                                              [--work /tmp/bench-video-pipeline]

The corpus: ``--videos`` encoded videos (``curation.sample.video``: a camera panning over drawn scenes,
h264/mp4 at 30 fps, ``--size``, ``--seconds`` long; with ``--shots`` each is three scenes joined by hard
cuts) and a JSONL manifest pointing at them. ``--clip`` also keeps each video (or each shot) in the pool: a
shot is copied packet for packet when it starts and ends on keyframes, else re-encoded from its cut.
``--preset``: the x264 preset the corpus is encoded with: ``ultrafast`` (default) has no scene-cut detection,
so no keyframe at the cuts (every shot re-encoded); ``veryfast`` places one at each hard cut, as web encoders
do (shots copied).

- ``ffmpeg``: ``ffmpeg -threads 1 -i X -f null -`` for every file, ``--cores`` processes at a time: decoding
  alone, the baseline the issue names.
- ``pipeline``: ``run_pipeline`` over the manifest with ``video_motion`` as its one stage, on a local Ray of
  ``--cores`` CPUs: read, probe, decode in order, sample 1 frame a second (or split into shots and sample
  each), JPEG-encode, score motion, write Parquet + WebDataset shards. Ray start-up is excluded (a cluster is
  already running in production); the pool is written from scratch each round.

Both process the same bytes; the ratio is ffmpeg's seconds over the pipeline's (target: at least 0.8).
Frames sampled per second and video seconds per second are reported for the pipeline. Best of ``--runs``.
Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from curation.sample.video import _X264, _encode, video_frames


def write_corpus(
    root: Path, n: int, size: tuple[int, int], seconds: float, shots: bool, preset: str = "ultrafast"
) -> list[Path]:
    clips = root / "clips"
    clips.mkdir(parents=True, exist_ok=True)
    paths, lines = [], []
    for i in range(n):
        path = clips / f"{i:05d}.mp4"
        if not path.exists():
            parts = 3 if shots else 1
            frames = []
            for j in range(parts):
                part, _, _ = video_frames(11, i * 4 + j, size=size, seconds=seconds / parts, fps=30)
                frames += list(part)
            path.write_bytes(
                _encode(frames, *size, 30, "libx264", "mp4", dict(_X264, crf="23", preset=preset))
            )
        paths.append(path)
        lines.append(json.dumps({"video": f"clips/{path.name}", "caption": f"video {i}"}))
    (root / "videos.jsonl").write_text("\n".join(lines) + "\n")
    return paths


def ffmpeg_null(ffmpeg: str, paths: list[Path], cores: int) -> float:
    def one(p: Path) -> None:
        subprocess.run([ffmpeg, "-v", "error", "-threads", "1", "-i", str(p), "-f", "null", "-"], check=True)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(cores) as pool:
        list(pool.map(one, paths))
    return time.perf_counter() - t0


def pipeline(root: Path, out: Path, shots: bool, clip: bool) -> tuple[float, dict]:
    from curation.pipeline import run_pipeline
    from curation.recipe import pipeline_from_dict

    shutil.rmtree(out, ignore_errors=True)
    raw = {
        "name": "bench-video",
        "sources": [
            {
                "name": "videos",
                "format": "jsonl",
                "modality": "video",
                "paths": [str(root / "videos.jsonl")],
                "video": {"shots": shots, "clip": clip},
            }
        ],
        "stages": [{"video_motion": {"min_motion": 0.0}}],
        "output": {"path": str(out), "report": False},
    }
    result = run_pipeline(pipeline_from_dict(raw), progress=False)
    return result.stats["elapsed_s"], result.stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--videos", type=int, default=120)
    ap.add_argument("--size", default="640x360")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--cores", type=int, default=os.cpu_count())
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--shots", action="store_true", help="three shots per video, split at ingest")
    ap.add_argument("--clip", action="store_true", help="keep the video (each shot re-encoded) in the pool")
    ap.add_argument(
        "--preset",
        default="ultrafast",
        choices=["ultrafast", "veryfast"],
        help="x264 preset of the corpus: veryfast places keyframes at the cuts",
    )
    ap.add_argument("--work", default="/tmp/bench-video-pipeline")
    args = ap.parse_args()
    ffmpeg = shutil.which("ffmpeg")
    if not ffmpeg:
        raise SystemExit("needs the ffmpeg CLI (apt-get install ffmpeg)")
    size = tuple(int(x) for x in args.size.split("x"))
    root = Path(args.work) / (
        f"corpus-{args.videos}-{args.size}-{args.seconds:g}{'-shots' if args.shots else ''}-{args.preset}"
    )
    t0 = time.perf_counter()
    paths = write_corpus(root, args.videos, size, args.seconds, args.shots, args.preset)
    made = time.perf_counter() - t0

    import ray

    ray.init(num_cpus=args.cores, object_store_memory=1 << 30, include_dashboard=False, log_to_driver=False)
    best_ff, best_pipe, stats = float("inf"), float("inf"), {}
    for _ in range(args.runs):  # alternate, so both see the same machine
        best_ff = min(best_ff, ffmpeg_null(ffmpeg, paths, args.cores))
        seconds, s = pipeline(root, Path(args.work) / "pool", args.shots, args.clip)
        if seconds < best_pipe:
            best_pipe, stats = seconds, s
    ray.shutdown()
    import polars as pl

    pool = pl.read_parquet(
        Path(args.work) / "pool" / "shards" / "*.parquet", columns=["frame_ts", "clip_start", "meta"]
    )
    how = pool["meta"].str.json_path_match("$.clip").value_counts().to_dicts() if args.clip else []
    frames = int(pool["frame_ts"].list.len().sum())
    video_s = args.videos * args.seconds
    print(
        json.dumps(
            {
                "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                "videos": args.videos,
                "size": args.size,
                "seconds_each": args.seconds,
                "fps": 30,
                "shots": args.shots,
                "clip": args.clip,
                "cores": args.cores,
                "corpus_build_s": round(made, 1),
                "ffmpeg_null_s": round(best_ff, 2),
                "pipeline_s": round(best_pipe, 2),
                "ratio_vs_ffmpeg": round(best_ff / best_pipe, 3),
                "pipeline_rows": pool.height,
                "frames_sampled": frames,
                "preset": args.preset,
                "clips": {str(d["meta"]): d["count"] for d in how},
                "frames_sampled_per_s": round(frames / best_pipe, 1),
                "video_s_per_s": round(video_s / best_pipe, 1),
                "ffmpeg_video_s_per_s": round(video_s / best_ff, 1),
                "stage_seconds": {st["name"]: st["seconds"] for st in stats.get("stages", [])},
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
