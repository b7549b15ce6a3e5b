"""The training loop: ``curation train MIXTURE --stage {0,1,2,3,sft}``.

One function, :func:`train`, in the order a run happens:

1. Ranks: under ``torchrun`` (``RANK``/``WORLD_SIZE`` set) one process per GPU joins a process group
   (NCCL on GPUs, Gloo on CPUs); alone, a single process on the GPU if there is one, else the CPU.
2. Everything that can be wrong is checked before the first step, and a run stops with a message naming
   the file or key: the config, the tokenizer, the mixture's manifest and shards (existence, size,
   sha256), whether the mixture has rows the stage learns from, the checkpoint to start from (same
   architecture and tokenizer; for ``resume`` also the same stage, mixture and number of data streams).
3. The model is built (tiny random weights, or SigLIP / Qwen3 weights from ``hf_path`` folders, or a
   checkpoint's), the stage picks what trains (:data:`~curation.train.config.STAGE_DEFAULTS`), AdamW
   gets the trainable parameters (weight decay on matrices only).
4. Steps: ``grad_accum`` micro-batches, linear warmup then cosine decay, gradient clipping. Every step
   logs one JSON line (``log.jsonl``): loss, learning rate, tokens/s, images/s, the share of the step
   spent waiting for data, and a digest of the rows it consumed.
5. Checkpoints every ``ckpt_every`` steps and at the end (``checkpoints/step_NNNNNNNN.pt``: model,
   optimizer, config, step, data position), then ``summary.json`` and the loss curve (``loss.png`` with
   matplotlib, else ``loss.svg``).

Stages: 0 trains the vision tower and the contrastive head; 1 only the projector; 2 everything; 3 the
same at a lower rate decayed to zero; sft everything on conversations. A new stage starts from the
previous one's weights with ``init``; ``resume`` continues an interrupted run exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import pickle
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import xxhash
from torch.utils.data import DataLoader

from curation.io import commit
from curation.train import hf
from curation.train.config import (
    STAGE_DEFAULTS,
    ConfigError,
    TrainConfig,
    architecture_diff,
    from_dict,
    to_dict,
)
from curation.train.data import (
    MixtureStream,
    Position,
    SampleBuilder,
    StreamPlan,
    check_stage_rows,
    load_tokenizer,
    open_mixture,
    plan_pieces,
    verify_shards,
)
from curation.train.model import VLM

log = logging.getLogger(__name__)

CKPT_FORMAT = "curation.train/1"
# Dense bf16 peak of the GPUs people train on, for model FLOPs utilisation (no table entry: not reported).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12}


@dataclass
class Ranks:
    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def _ranks(device: str) -> Ranks:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(f"cuda:{local}" if device == "cuda" and world > 1 else device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Ranks(rank, world, dev)


def _all_ok(ok: bool, ranks: Ranks) -> bool:
    """Whether every rank got through its checks (one rank failing must not leave the others waiting)."""
    if ranks.world == 1:
        return ok
    flag = torch.tensor([0 if ok else 1], device=ranks.device)
    dist.all_reduce(flag)
    return int(flag) == 0


# ---------------------------------------------------------------- checkpoints


def checkpoint_path(path: str) -> Path:
    """A checkpoint file, or the latest one of a run folder (``OUT`` or ``OUT/checkpoints``)."""
    p = Path(path)
    if p.is_dir():
        folder = p / "checkpoints" if (p / "checkpoints").is_dir() else p
        found = sorted(folder.glob("step_*.pt"))
        if not found:
            raise ConfigError(f"{path}: no checkpoints/step_*.pt in this folder")
        return found[-1]
    if not p.is_file():
        raise ConfigError(f"{path}: no such checkpoint file or run folder")
    return p


def load_checkpoint(path: str) -> dict[str, Any]:
    p = checkpoint_path(path)
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as e:
        raise ConfigError(f"{p}: not a readable checkpoint: {e}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise ConfigError(f"{p}: not a checkpoint of this trainer (format {CKPT_FORMAT})")
    ckpt["path"] = str(p)
    return ckpt


def check_compatible(ckpt: dict[str, Any], cfg: TrainConfig, what: str) -> None:
    """Same architecture (every field of vision, lm, contrastive), else a ConfigError listing the
    differences."""
    diff = architecture_diff(ckpt["config"], cfg)
    if diff:
        raise ConfigError(
            f"{what} {ckpt['path']} was trained with another model config (checkpoint vs this run):\n"
            + "\n".join(f"  - {d}" for d in diff)
            + "\nuse the config it was trained with (--config / --set), or a checkpoint of this one"
        )


def write_checkpoint(obj: dict[str, Any], path: Path) -> None:
    """``torch.save`` ``obj`` to ``path`` through a temp file renamed into place
    (:func:`curation.io.commit.open_committed`): a run killed mid-write never leaves half a checkpoint under
    the real name, where ``resume`` and ``init`` would find it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with commit.open_committed(path) as f:
        torch.save(obj, f)


# ---------------------------------------------------------------- setup


def resolve(cfg: TrainConfig, tokenizer_vocab: int) -> TrainConfig:
    """Fill what the config leaves open: architectures from ``hf_path`` checkpoints, the vocabulary size."""
    cfg = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision), lm=dataclasses.replace(cfg.lm))
    if cfg.vision.hf_path:
        cfg.vision = dataclasses.replace(cfg.vision, **hf.siglip_vision_config(cfg.vision.hf_path))
    if cfg.lm.hf_path:
        cfg.lm = dataclasses.replace(cfg.lm, **hf.qwen3_config(cfg.lm.hf_path))
        if cfg.lm.vocab_size < tokenizer_vocab:
            raise ConfigError(
                f"lm.hf_path: the model embeds {cfg.lm.vocab_size} tokens, the tokenizer needs "
                f"{tokenizer_vocab} (with its special tokens): set data.tokenizer to the model's own"
            )
    elif not cfg.lm.vocab_size:
        cfg.lm.vocab_size = tokenizer_vocab
    elif cfg.lm.vocab_size < tokenizer_vocab:
        raise ConfigError(
            f"lm.vocab_size: {cfg.lm.vocab_size} is smaller than the tokenizer's {tokenizer_vocab}"
        )
    return cfg


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup over ``warmup_steps``, then cosine from the peak down to ``min_lr_ratio`` of it."""
    spec = STAGE_DEFAULTS[cfg.stage]
    peak = spec.lr if cfg.optim.lr is None else cfg.optim.lr
    floor = peak * (spec.min_lr_ratio if cfg.optim.min_lr_ratio is None else cfg.optim.min_lr_ratio)
    warm = cfg.optim.warmup_steps
    if step < warm:
        return peak * (step + 1) / warm
    progress = (step - warm) / max(1, cfg.steps - warm)
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * min(1.0, progress)))


def set_trainable(model: VLM, stage: str) -> list[str]:
    """Freeze everything, then unfreeze the stage's modules; returns their names."""
    trains = STAGE_DEFAULTS[stage].trains
    model.requires_grad_(False)
    for name in trains:
        getattr(model, name).requires_grad_(True)
    return list(trains)


def make_optimizer(model: VLM, cfg: TrainConfig) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    rest = [p for p in params if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.optim.weight_decay},
        {"params": rest, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        groups,
        lr=lr_at(0, cfg),
        betas=(cfg.optim.beta1, cfg.optim.beta2),
        fused=next(model.parameters()).is_cuda,
    )


def _load_hf_weights(model: VLM, cfg: TrainConfig) -> None:
    for part, path, load in (
        ("vision", cfg.vision.hf_path, hf.siglip_vision_weights),
        ("lm", cfg.lm.hf_path, hf.qwen3_weights),
    ):
        if path:
            missing, unexpected = getattr(model, part).load_state_dict(load(path), strict=False)
            if missing or unexpected:
                raise ConfigError(
                    f"{part}.hf_path {path}: weights do not fit (missing {missing[:5]}, "
                    f"unexpected {unexpected[:5]})"
                )
            log.info("%s: weights from %s", part, path)


def model_flops(model: VLM, batch: dict[str, Any]) -> float:
    """Training FLOPs of a micro-batch: 6 x parameters x tokens for each tower, plus attention scores."""
    v, lm = model.vision.cfg, model.lm.cfg
    n_vit = sum(p.numel() for p in model.vision.layers.parameters())
    n_lm = sum(p.numel() for p in model.lm.layers.parameters()) + lm.dim * lm.vocab_size
    patches = int(batch["patch_mask"].sum())
    flops = 6 * n_vit * patches + 12 * v.layers * v.dim * patches * batch["patch_mask"].shape[1]
    if batch["kind"] == "lm":
        b, n = batch["input_ids"].shape
        flops += 6 * n_lm * b * n + 12 * lm.layers * lm.heads * lm.head_dim * b * n * n / 2
    return float(flops)


# ---------------------------------------------------------------- the run


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run one stage; returns the summary also written to ``OUT/summary.json``."""
    ranks = _ranks(cfg.device)
    torch.manual_seed(cfg.seed)
    spec = STAGE_DEFAULTS[cfg.stage]
    out = Path(cfg.out)
    try:
        # -- everything that can fail, before the first step
        tokenizer = load_tokenizer(cfg.data.tokenizer)
        cfg = resolve(cfg, tokenizer.vocab_size)
        start = None
        if cfg.resume or cfg.init:
            start = load_checkpoint(cfg.resume or cfg.init)
            check_compatible(start, cfg, "resume" if cfg.resume else "init")
            if start["tokenizer"]["vocab_size"] != tokenizer.vocab_size or (
                start["tokenizer"]["sha256"] != tokenizer.sha256
            ):
                raise ConfigError(
                    f"{start['path']} was trained with tokenizer {start['tokenizer']['source']} "
                    f"({start['tokenizer']['vocab_size']} ids), this run uses {tokenizer.source} "
                    f"({tokenizer.vocab_size} ids): set data.tokenizer to the same file"
                )
        workers = cfg.data.num_workers
        n_streams = ranks.world * max(1, workers)
        mixture = open_mixture(cfg.mixture, cfg.data.format)
        pieces = plan_pieces(mixture.shards, n_streams)
        empty = [s for s, p in enumerate(pieces) if not p]
        if empty:
            raise ConfigError(
                f"mixture {cfg.mixture}: {sum(s.rows for s in mixture.shards)} rows cannot feed "
                f"{n_streams} data streams (ranks x workers): use fewer data.num_workers"
            )
        mine = {
            i
            for s in range(ranks.rank * max(1, workers), (ranks.rank + 1) * max(1, workers))
            for i, _, _ in pieces[s]
        }
        verify_shards(mixture, cfg.data.verify, hashed=mine)
        check_stage_rows(mixture, cfg.stage)
        tok_sha = (mixture.manifest.get("tokenizer") or {}).get("sha256")
        if ranks.main and tok_sha and tok_sha != tokenizer.sha256:
            log.warning(
                "the mixture's budgets were counted with tokenizer %s; this run tokenizes with %s, so "
                "its token counts differ from the manifest's",
                mixture.manifest["tokenizer"].get("source"),
                tokenizer.source,
            )
        plan = StreamPlan(ranks.rank, ranks.world, workers, pieces)
        step0 = 0
        if cfg.resume:
            d = start["data"]
            if start["stage"] != cfg.stage:
                raise ConfigError(
                    f"resume {start['path']}: a stage {start['stage']} run cannot continue as stage "
                    f"{cfg.stage} (start the new stage from it with --init)"
                )
            if start["mixture"]["recipe_hash"] != mixture.recipe_hash:
                raise ConfigError(
                    f"resume {start['path']}: it trained on mixture {start['mixture']['path']} "
                    f"(recipe {start['mixture']['recipe_hash']}), not {cfg.mixture} "
                    f"(recipe {mixture.recipe_hash})"
                )
            if d["n_streams"] != n_streams:
                raise ConfigError(
                    f"resume {start['path']}: it read {d['n_streams']} data streams (ranks x workers: "
                    f"{d['world_size']} x {max(1, d['workers'])}), this run has {n_streams}: "
                    "resume with the same number of ranks and data.num_workers"
                )
            step0 = int(start["step"])
            if step0 >= cfg.steps:
                raise ConfigError(
                    f"resume {start['path']}: already at step {step0}; set steps above it to go on"
                )
            plan.start = {int(k): Position(*v) for k, v in d["streams"].items()}
            plan.consumed = int(d["consumed"])
        ok, err = True, None
    except ConfigError as e:
        ok, err = False, e
    if not _all_ok(ok, ranks):
        if ranks.world > 1:
            dist.destroy_process_group()
        raise err or ConfigError("another rank failed its checks before training (see its log)")

    # -- model and optimizer
    model = VLM(cfg)
    if start is not None:
        model.load_state_dict(start["model"])
    else:
        _load_hf_weights(model, cfg)
    model.to(ranks.device)
    trains = set_trainable(model, cfg.stage)
    opt = make_optimizer(model, cfg)
    if cfg.resume:
        opt.load_state_dict(start["optimizer"])
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if ranks.main:
        log.info(
            "stage %s (%s): training %s, %s of %s parameters; %d rank(s) on %s, %d data stream(s)",
            cfg.stage,
            spec.what,
            "+".join(trains),
            f"{n_train:,}",
            f"{sum(p.numel() for p in model.parameters()):,}",
            ranks.world,
            ranks.device,
            n_streams,
        )
    ddp = model
    if ranks.world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=cfg.stage != "1")
    use_bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and ranks.device.type == "cuda")
    peak = next(
        (
            v
            for k, v in PEAK_FLOPS.items()
            if ranks.device.type == "cuda" and k in torch.cuda.get_device_name(ranks.device)
        ),
        None,
    )

    # -- data
    threads = torch.get_num_threads()
    if (
        ranks.device.type == "cpu" and workers
    ):  # leave the data workers their cores: oversubscribed, steps stall
        torch.set_num_threads(max(1, min(threads, (os.cpu_count() or 1) - workers)))
    builder = SampleBuilder(cfg.stage, tokenizer, cfg.data, cfg.vision, cfg.contrastive.max_text)
    dataset = MixtureStream(mixture, plan, builder, cfg.data.batch_size)
    loader = DataLoader(
        dataset,
        batch_size=None,
        num_workers=workers,
        pin_memory=ranks.device.type == "cuda",
        prefetch_factor=4 if workers else None,
        persistent_workers=False,
    )
    batches = iter(loader)
    own = {plan.rank * plan.per_rank + w for w in range(plan.per_rank)}
    positions = {s: p for s, p in plan.start.items() if s in own}  # checkpoints gather each rank's own
    consumed = plan.consumed
    skipped: dict[str, int] = {}

    # -- steps
    if ranks.main:
        out.mkdir(parents=True, exist_ok=True)
        commit.write_text(out / "config.json", json.dumps(to_dict(cfg), indent=2))
    # a resumed run goes on with its log; a new run into the same folder starts a new one
    log_file = (out / "log.jsonl").open("a" if cfg.resume else "w") if ranks.main else None
    records: list[dict[str, Any]] = []
    ckpt_file = None
    model.train()
    t_run = time.perf_counter()
    for step in range(step0, cfg.steps):
        lr = lr_at(step, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        t0 = time.perf_counter()
        wait = loss_sum = 0.0
        counts = {"tokens": 0, "images": 0, "frames": 0}
        digest = xxhash.xxh3_64()
        flops = 0.0
        for micro in range(cfg.optim.grad_accum):
            tw = time.perf_counter()
            batch = next(batches)
            wait += time.perf_counter() - tw
            consumed += 1
            positions[batch["stream"]] = Position(*batch["position"])
            for k, v in batch["skipped"].items():
                skipped[k] = skipped.get(k, 0) + v
            for k in counts:
                counts[k] += batch[k]
            digest.update("\n".join(batch["keys"]).encode())
            if peak:
                flops += model_flops(model, batch)
            batch = {
                k: v.to(ranks.device, non_blocking=True) if torch.is_tensor(v) else v
                for k, v in batch.items()
            }
            sync = ranks.world == 1 or micro == cfg.optim.grad_accum - 1
            with (
                ddp.no_sync() if not sync else contextlib.nullcontext(),
                torch.autocast(ranks.device.type, dtype=torch.bfloat16, enabled=use_bf16),
            ):
                loss = ddp(batch) / cfg.optim.grad_accum
            loss.backward()
            loss_sum += float(loss.detach())
        if cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(
                [p for p in model.parameters() if p.requires_grad], cfg.optim.grad_clip
            )
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ranks.device.type == "cuda":
            torch.cuda.synchronize(ranks.device)
        step_s = time.perf_counter() - t0
        stats = torch.tensor(
            [loss_sum, counts["tokens"], counts["images"] + counts["frames"], wait, flops],
            dtype=torch.float64,
            device=ranks.device,
        )
        if ranks.world > 1:
            dist.all_reduce(stats)
        loss_v = float(stats[0]) / ranks.world
        rec = {
            "step": step + 1,
            "stage": cfg.stage,
            "loss": round(loss_v, 6),
            "lr": lr,
            "tokens": int(stats[1]),
            "images": int(stats[2]),
            "step_s": round(step_s, 5),
            "tokens_per_s": round(float(stats[1]) / step_s, 1),
            "images_per_s": round(float(stats[2]) / step_s, 2),
            "data_wait_share": round(float(stats[3]) / ranks.world / step_s, 4),
            "batch": digest.hexdigest(),
        }
        if peak:
            rec["mfu"] = round(float(stats[4]) / step_s / (peak * ranks.world), 4)
        records.append(rec)
        if ranks.main:
            log_file.write(json.dumps(rec) + "\n")
            log_file.flush()
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
                log.info(
                    "step %d/%d  loss %.4f  lr %.2e  %.0f tok/s  %.1f img/s  data wait %.0f%%",
                    step + 1,
                    cfg.steps,
                    loss_v,
                    lr,
                    rec["tokens_per_s"],
                    rec["images_per_s"],
                    100 * rec["data_wait_share"],
                )
        last = step + 1 == cfg.steps
        if last or (cfg.ckpt_every and (step + 1) % cfg.ckpt_every == 0):
            ckpt_file = save_checkpoint(
                model, opt, cfg, step + 1, positions, consumed, plan, tokenizer, mixture, ranks, out
            )
    del batches  # stops the data-loader workers now, not whenever the iterator is collected
    if log_file:
        log_file.close()
    torch.set_num_threads(threads)
    summary = {}
    if ranks.main:
        summary = _summary(cfg, records, skipped, ckpt_file, time.perf_counter() - t_run, n_train, out)
        commit.write_text(out / "summary.json", json.dumps(summary, indent=2))
    if ranks.world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return summary


def save_checkpoint(
    model: VLM,
    opt: torch.optim.Optimizer,
    cfg: TrainConfig,
    step: int,
    positions: dict[int, Position],
    consumed: int,
    plan: StreamPlan,
    tokenizer: Any,
    mixture: Any,
    ranks: Ranks,
    out: Path,
) -> Path:
    """Rank 0 writes model, optimizer, config, step and every stream's position (gathered from all ranks)."""
    streams = {str(k): v.as_list() for k, v in positions.items()}
    if ranks.world > 1:
        gathered: list[Any] = [None] * ranks.world
        dist.all_gather_object(gathered, streams)
        streams = {k: v for g in gathered for k, v in g.items()}
    path = out / "checkpoints" / f"step_{step:08d}.pt"
    if ranks.main:
        write_checkpoint(
            {
                "format": CKPT_FORMAT,
                "config": to_dict(cfg),
                "stage": cfg.stage,
                "step": step,
                "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                "optimizer": opt.state_dict(),
                "data": {
                    "streams": streams,
                    "n_streams": plan.world_size * plan.per_rank,
                    "world_size": plan.world_size,
                    "workers": plan.workers,
                    "consumed": consumed,
                },
                "tokenizer": {
                    "source": tokenizer.source,
                    "sha256": tokenizer.sha256,
                    "vocab_size": tokenizer.vocab_size,
                },
                "mixture": {"path": mixture.path, "recipe_hash": mixture.recipe_hash},
            },
            path,
        )
        log.info("checkpoint: %s", path)
    return path


def _summary(
    cfg: TrainConfig,
    records: list[dict[str, Any]],
    skipped: dict[str, int],
    ckpt: Path | None,
    seconds: float,
    n_train: int,
    out: Path,
) -> dict[str, Any]:
    """Totals of the run; throughput leaves out the first step (worker start-up, first allocations)."""
    steady = records[1:] or records
    step_s = sum(r["step_s"] for r in steady)
    summary = {
        "stage": cfg.stage,
        "steps": records[-1]["step"] if records else 0,
        "seconds": round(seconds, 2),
        "trainable_parameters": n_train,
        "first_loss": records[0]["loss"] if records else None,
        "last_loss": records[-1]["loss"] if records else None,
        "tokens_per_s": round(sum(r["tokens"] for r in steady) / step_s, 1) if step_s else None,
        "images_per_s": round(sum(r["images"] for r in steady) / step_s, 2) if step_s else None,
        "data_wait_share": round(sum(r["data_wait_share"] * r["step_s"] for r in steady) / step_s, 4)
        if step_s
        else None,
        "skipped_rows": skipped,
        "checkpoint": str(ckpt) if ckpt else None,
    }
    if any("mfu" in r for r in steady):
        summary["mfu"] = round(sum(r.get("mfu", 0) * r["step_s"] for r in steady) / step_s, 4)
    summary["plot"] = str(plot_loss(_read_log(out / "log.jsonl"), out))
    return summary


def _read_log(path: Path) -> list[dict[str, Any]]:
    """The whole run's log (a resumed run appends to it); a step logged twice keeps its last line."""
    by_step = {}
    for line in path.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            by_step[rec["step"]] = rec
    return [by_step[k] for k in sorted(by_step)]


def plot_loss(records: list[dict[str, Any]], out: Path) -> Path:
    """``loss.png`` through matplotlib when installed, else ``loss.svg`` drawn here (no dependency)."""
    steps = [r["step"] for r in records]
    losses = [r["loss"] for r in records]
    title = f"stage {records[0]['stage']}: loss" if records else "loss"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        path = out / "loss.svg"
        path.write_text(_svg(steps, losses, title))
        return path
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, losses)
    ax.set(xlabel="step", ylabel="loss", title=title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out / "loss.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _svg(xs: list[float], ys: list[float], title: str, w: int = 600, h: int = 350) -> str:
    left, right, top, bottom = 60, 20, 30, 40
    if not xs:
        xs, ys = [0, 1], [0, 0]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * (w - left - right)

    def py(y: float) -> float:
        return h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom)

    points = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in zip(xs, ys))
    ticks = "".join(
        f'<text x="{left - 6}" y="{py(v):.1f}" text-anchor="end" dominant-baseline="middle">{v:.3g}</text>'
        f'<line x1="{left}" x2="{w - right}" y1="{py(v):.1f}" y2="{py(v):.1f}" stroke="#ddd"/>'
        for v in (y0, (y0 + y1) / 2, y1)
    )
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" '
        f'font-size="11">\n<rect width="100%" height="100%" fill="white"/>\n{ticks}\n'
        f'<polyline fill="none" stroke="#1f77b4" stroke-width="1.5" points="{points}"/>\n'
        f'<text x="{w / 2}" y="18" text-anchor="middle" font-size="13">{title}</text>\n'
        f'<text x="{w / 2}" y="{h - 8}" text-anchor="middle">step {x0:g} to {x1:g}</text>\n</svg>\n'
    )


@torch.no_grad()
def evaluate(checkpoint: str, mixture: str, stage: str, batches: int = 4) -> float:
    """Mean loss of a checkpoint on the first ``batches`` batches of a mixture (one stream, in order).

    The same rows every time, so checkpoints compare: a stage's start and end, or merged models against
    the ones merged. Data settings (tokenizer, sequence length, pixel bounds, batch size) are the
    checkpoint's own.
    """
    ckpt = load_checkpoint(checkpoint)
    cfg = from_dict(ckpt["config"], ckpt["path"])
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    mix = open_mixture(mixture, cfg.data.format)
    verify_shards(mix, "size")
    check_stage_rows(mix, stage)
    model = VLM(cfg)
    model.load_state_dict(ckpt["model"])
    model.eval()
    builder = SampleBuilder(stage, tokenizer, cfg.data, cfg.vision, cfg.contrastive.max_text)
    stream = MixtureStream(mix, StreamPlan(0, 1, 0, plan_pieces(mix.shards, 1)), builder, cfg.data.batch_size)
    losses = [float(model(batch)) for batch, _ in zip(stream, range(batches))]
    return sum(losses) / len(losses)
