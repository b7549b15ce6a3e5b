"""CLIP score throughput: the stage against the bare model forward on the same images.

On the image-text rows of a generated sample corpus (every kind of dirt included):

- ``bare``: the model alone, on batches decoded and preprocessed beforehand: ``encode_images`` plus
  ``encode_texts`` per batch, the most the stage could do on this device;
- ``stage``: ``clip_score`` called in this process on the reader's batches: decoding, preprocessing and
  tokenising included, with ``decode_threads`` threads decoding ahead of the model;
- ``stage_inline``: the same with ``decode_threads: 0`` (decoding in the calling thread, no overlap);
- ``pipeline``: ``curation run``'s code path (:func:`curation.pipeline.run_pipeline`, local Ray) over the
  corpus with ``clip_score`` as the only stage: reading and writing shards included.

``ratio`` = stage images/s over bare images/s (the overlap's target: 0.8 or more on CPU). The default
model is a random-weight ViT-B-32 (the compute of a real one; no download), saved to a checkpoint in
``--work``; ``--model`` takes any spec (``ViT-L-14:datacomp_xl_s13b_b90k`` where the weights are cached).

    python benchmarks/bench_clip.py --rows 2000
    python benchmarks/bench_clip.py --rows 20000 --device cuda --precision fp16 --batch-size 256 --num-cpus 16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc


def corpus(work: Path, rows: int) -> Path:
    from curation.sample import write_sample_corpus

    root = work / f"corpus-{rows}"
    if not (root / "corpus.json").exists():
        write_sample_corpus(root, rows=rows, seed=0, progress=False)
    return root


def random_checkpoint(work: Path, arch: str) -> str:
    import torch

    from curation.models.clip import import_open_clip, save_clip

    path = work / f"random-{arch}.pt"
    if not path.exists():
        torch.manual_seed(0)
        save_clip(import_open_clip().create_model(arch), arch, path)
    return str(path)


def recipe_dict(root: Path, out: Path, stage: dict, batch_rows: int, num_cpus: int | None) -> dict:
    sources = [
        {
            "name": n,
            "format": f,
            "modality": "image_text",
            "paths": [str(root / "image_text" / n / f"*{ext}")],
        }
        for n, f, ext in (
            ("wds", "webdataset", ".tar"),
            ("parquet", "parquet", ".parquet"),
            ("jsonl", "jsonl", ".jsonl"),
        )
    ]
    return {
        "name": "bench_clip",
        "sources": sources,
        "stages": [{"clip_score": stage}],
        "output": {"path": str(out), "formats": ["parquet"], "report": False},
        "execution": {"batch_rows": batch_rows, "num_cpus": num_cpus},
    }


def read_batches(recipe) -> list[pa.Table]:
    """The batches the runner's workers would get, read once (ingest rejects dropped)."""
    from curation.io.readers import plan_units, read_unit

    out = []
    for unit in plan_units(recipe.sources, recipe.execution.unit_rows):
        for t in read_unit(unit, recipe.execution.batch_rows):
            out.append(t.filter(pc.is_null(t["reject_reason"])))
    return [t for t in out if t.num_rows]


def bare_forward(stage, batches: list[pa.Table], batch_size: int, repeat: int) -> dict:
    """Model time only: every decodable image preprocessed and every caption tokenised beforehand, on the
    device; then encode_image + encode_text per batch."""
    import torch

    clip = stage._clip
    images, texts = [], []
    for t in batches:
        for data, text in zip(t["image"].to_pylist(), t["text"].to_pylist()):
            pixels, err = stage._load(data) if data is not None else (None, "missing")
            if err is None and text and text.strip():
                images.append(pixels)
                texts.append(text)
    # on the device already: the forward alone, no transfer
    chunks = [
        (clip.pixels(images[s : s + batch_size]), clip.tokenizer(texts[s : s + batch_size]).to(clip.device))
        for s in range(0, len(images), batch_size)
    ]

    def once():
        with torch.inference_mode(), clip._autocast():
            for pixels, tokens in chunks:
                i = clip.model.encode_image(pixels, normalize=True)
                t = clip.model.encode_text(tokens, normalize=True)
                (i * t).sum(-1).float().cpu()  # the stage brings scores back too

    once()  # warm-up (CUDA kernels, allocator)
    best = min(_timed(once) for _ in range(repeat))
    return {"images": len(images), "seconds": round(best, 3), "images_per_s": round(len(images) / best, 1)}


def stage_run(stage, batches: list[pa.Table], repeat: int) -> dict:
    """The stage over every batch; images/s counts the images it scored (as bare does), not rejects."""
    stage(batches[0])  # warm-up
    best = min(_timed(lambda: [stage(t) for t in batches]) for _ in range(repeat))
    scored = sum(len(t) - stage(t)[stage.score_name].null_count for t in batches)
    n = sum(t.num_rows for t in batches)
    return {"rows": n, "scored": scored, "seconds": round(best, 3), "images_per_s": round(scored / best, 1)}


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=2000, help="sample corpus size (about 80%% image-text rows)")
    ap.add_argument("--model", help="a CLIP spec; default: a random-weight --arch saved to --work")
    ap.add_argument("--arch", default="ViT-B-32")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "bf16"))
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--batch-rows", type=int, default=256, help="rows per stage call (execution.batch_rows)")
    ap.add_argument("--decode-threads", type=int, default=None, help="default: the stage's num_cpus")
    ap.add_argument("--num-cpus", type=int, default=1, help="the stage's resources.num_cpus")
    ap.add_argument("--repeat", type=int, default=2, help="timed passes of bare and stage runs (best kept)")
    ap.add_argument("--no-pipeline", action="store_true", help="skip the run through Ray")
    ap.add_argument("--work", default="/tmp/bench_clip")
    args = ap.parse_args()

    import torch

    from curation.recipe import pipeline_from_dict
    from curation.stage import Resources

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    root = corpus(work, args.rows)
    spec = args.model or random_checkpoint(work, args.arch)
    gpus = 1 if args.device == "cuda" else 0
    params = {
        "model": spec,
        "batch_size": args.batch_size,
        "device": args.device,
        "precision": args.precision,
        "resources": {"num_cpus": args.num_cpus, "num_gpus": gpus},
    }
    if args.decode_threads is not None:
        params["decode_threads"] = args.decode_threads
    recipe = pipeline_from_dict(
        recipe_dict(root, work / "pool", params, args.batch_rows, None), check_paths=False
    )
    [stage] = recipe.stages
    stage.check_requirements()
    stage.preflight()
    batches = read_batches(recipe)
    stage.setup()
    result = {
        "benchmark": "clip_score",
        "model": stage.lineage()["model"],
        "device": args.device,
        "precision": args.precision,
        "batch_size": args.batch_size,
        "decode_threads": stage._pool._max_workers if stage._pool else 0,
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
        "machine": platform.processor() or platform.machine(),
        "bare": bare_forward(stage, batches, args.batch_size, args.repeat),
        "stage": stage_run(stage, batches, args.repeat),
    }
    inline = type(stage)(
        **{
            **{k: getattr(stage, k) for k in ("model", "batch_size", "device", "precision")},
            "decode_threads": 0,
            "resources": Resources(args.num_cpus, gpus),
        }
    )
    inline.setup()
    result["stage_inline"] = stage_run(inline, batches, args.repeat)
    result["ratio"] = round(result["stage"]["images_per_s"] / result["bare"]["images_per_s"], 3)
    result["ratio_inline"] = round(result["stage_inline"]["images_per_s"] / result["bare"]["images_per_s"], 3)
    if not args.no_pipeline:
        from curation.pipeline import run_pipeline

        recipe = pipeline_from_dict(recipe_dict(root, work / "pool", params, args.batch_rows, os.cpu_count()))
        t0 = time.perf_counter()
        run = run_pipeline(recipe, overwrite=True, progress=False)
        clip = next(s for s in run.stats["stages"] if s["name"] == "clip_score")
        result["pipeline"] = {
            "rows": run.stats["rows_in"],
            "elapsed_s": run.stats["elapsed_s"],
            "rows_per_s": run.stats["rows_per_s"],
            "clip_stage_seconds": clip["seconds"],
            "wall_with_ray_start_s": round(time.perf_counter() - t0, 2),
            "drops": clip["drops"],
        }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
