"""The trainer's configuration: one dataclass tree with commented defaults (the tiny CPU model).

A run is ``TrainConfig``; YAML files and ``--set a.b=c`` overrides fill it with the same strict rules
as every recipe of the project (:func:`curation.spec.build`): an unknown key or a wrong type is an
error naming the key. The defaults train a model small enough for a laptop CPU (a ViT of 4 layers at
width 64, a decoder of 4 layers at width 128, bytes as tokens): nothing to download.

    >>> cfg = load_config(None, ["stage=1", "lm.layers=2", "optim.lr=1e-3"])
    >>> cfg.stage, cfg.lm.layers, cfg.optim.lr
    ('1', 2, 0.001)

Real weights: ``vision.hf_path`` (a SigLIP checkpoint folder) and ``lm.hf_path`` (a Qwen3 one) take
their architecture from the checkpoint's ``config.json`` (see :mod:`curation.train.hf`).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from curation.bounds import bounded
from curation.spec import RecipeError, apply_override, build, load_yaml
from curation.target.geometry import MERGE, PATCH, TEMPORAL_PATCH

STAGES = ("0", "1", "2", "3", "sft")


class ConfigError(ValueError):
    """A training run cannot start: bad configuration, input or checkpoint. Raised before the first step."""


@dataclass
class VisionConfig:
    """The vision tower (a ViT over 14-pixel patches at any resolution) and the projector after it."""

    patch: int = PATCH  # pixels per patch side (SigLIP: 14)
    merge: int = MERGE  # the projector merges merge x merge neighbouring patches into one LLM token
    temporal_patch: int = TEMPORAL_PATCH  # video frames are merged in groups of this many (as mixtures count)
    dim: int = bounded(64, 1, 65_536)  # width (SigLIP-400M: 1152)
    layers: int = bounded(4, 1, 1024)
    heads: int = bounded(4, 1, 1024)
    mlp_dim: int = bounded(256, 1, 262_144)
    rope_2d: bool = True  # 2D rotary positions (patch row, column) inside attention: any resolution
    learned_grid: int = 0  # >0: a learned grid x grid position table, resized to each image (SigLIP's)
    norm_eps: float = 1e-6
    projector_dim: int = bounded(256, 1, 262_144)  # hidden width of the projector's MLP
    hf_path: str | None = None  # SigLIP checkpoint folder: its architecture and weights replace the above


@dataclass
class LMConfig:
    """The causal decoder (Qwen3's layout: RMSNorm, GQA with q/k norms, SwiGLU) with 3D M-RoPE."""

    dim: int = bounded(128, 1, 65_536)
    layers: int = bounded(4, 1, 1024)
    heads: int = bounded(4, 1, 1024)
    kv_heads: int = bounded(2, 1, 1024)  # grouped-query attention
    head_dim: int = bounded(32, 2, 4096)
    mlp_dim: int = bounded(384, 1, 262_144)
    rope_theta: float = 10000.0
    mrope_section: list[int] = field(default_factory=list)  # rotary pairs for (t, h, w); empty: 1/4, 3/8, 3/8
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    vocab_size: int = 0  # 0: from the tokenizer (its vocabulary plus the specials it lacks)
    hf_path: str | None = None  # Qwen3 checkpoint folder: its architecture and weights replace the above


@dataclass
class ContrastiveConfig:
    """Stage 0's text tower and heads: SigLIP's sigmoid loss between image and caption embeddings."""

    text_layers: int = 2  # a small bidirectional encoder over the caption tokens (width: vision.dim)
    embed_dim: int = 64  # shared embedding width of both heads
    max_text: int = 64  # caption tokens kept
    init_scale: float = 10.0  # SigLIP's initial logit scale t' = log(10) and bias -10
    init_bias: float = -10.0


@dataclass
class DataConfig:
    """How rows become samples: tokenizer, pixel bounds, sequence length, streaming."""

    format: str = "parquet"  # which shards of the mixture to stream: parquet or webdataset
    tokenizer: str | None = None  # tokenizer.json (or a folder holding one); None: built-in bytes + specials
    # tokens per sample (text + visual); longer samples are cut at a block boundary
    seq_len: int = bounded(256, 1, 1_048_576)
    batch_size: int = bounded(8, 1, 65_536)  # samples per micro-batch, per rank
    num_workers: int = bounded(1, 0, 256)  # DataLoader processes per rank (0: read in the training process)
    verify: str = "sha256"  # before training, check each shard's sha256 (or only its size, or none)
    min_pixels: int = 4 * 28 * 28  # per image: at least 4 LLM tokens
    max_pixels: int = 64 * 28 * 28  # per image: at most 64 LLM tokens (Keye-VL: 16,384)
    video_min_pixels: int = 4 * 28 * 28  # per frame of a video
    video_max_pixels: int = 16 * 28 * 28  # per frame (Keye-VL: 768 tokens per frame pair)
    max_frames: int = bounded(8, 1, 10_000)  # frames kept per video, spread evenly over the sampled ones
    # M-RoPE temporal positions per second of video (Qwen2.5-VL's 2)
    tokens_per_second: float = bounded(2.0, 0, 1000)


@dataclass
class OptimConfig:
    """AdamW with linear warmup then cosine decay to ``min_lr_ratio`` of the peak."""

    lr: float | None = bounded(None, 1e-12, 10)  # None: the stage's default (STAGE_DEFAULTS)
    min_lr_ratio: float | None = bounded(None, 0, 1)  # None: the stage's default (0 when annealing)
    warmup_steps: int = bounded(5, 0, 10_000_000)
    # on matrices only; norms, biases and embeddings of position get none
    weight_decay: float = bounded(0.1, 0, 10)
    beta1: float = bounded(0.9, 0, 1)
    beta2: float = bounded(0.95, 0, 1)
    grad_clip: float = bounded(1.0, 0, 1_000_000)
    grad_accum: int = bounded(1, 1, 100_000)  # micro-batches per optimizer step


@dataclass
class TrainConfig:
    stage: str = "2"  # 0, 1, 2, 3 or sft
    mixture: str = ""  # mixture folder (manifest.json + shards/), local or s3://
    out: str = "runs/train"  # checkpoints, log.jsonl, loss plot
    steps: int = bounded(40, 1, 10_000_000)  # optimizer steps
    seed: int = 0
    device: str = "auto"  # auto (cuda when present), cpu, cuda, cuda:1
    dtype: str = "auto"  # auto (bfloat16 autocast on cuda, float32 on cpu), float32, bfloat16
    log_every: int = bounded(1, 1, 10_000_000)
    ckpt_every: int = bounded(0, 0, 10_000_000)  # 0: a checkpoint at the end only
    init: str | None = (
        None  # start from this checkpoint's weights (an earlier stage); fresh optimizer and data
    )
    resume: str | None = None  # continue this run's checkpoint: weights, optimizer, step, data position
    vision: VisionConfig = field(default_factory=VisionConfig)
    lm: LMConfig = field(default_factory=LMConfig)
    contrastive: ContrastiveConfig = field(default_factory=ContrastiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)


@dataclass(frozen=True)
class StageSpec:
    """What a stage trains, its default learning rate and decay floor, and the rows it needs."""

    trains: tuple[str, ...]  # top-level modules of the model with requires_grad
    lr: float
    min_lr_ratio: float
    needs: tuple[str, ...]  # modalities of which the mixture must hold at least one row
    what: str


STAGE_DEFAULTS: dict[str, StageSpec] = {
    "0": StageSpec(
        ("vision", "contrastive"),
        1e-3,
        0.1,
        ("image_text",),
        "vision encoder, contrastive (sigmoid loss) on image-text pairs",
    ),
    "1": StageSpec(
        ("projector",),
        2e-3,
        0.1,
        ("image_text", "interleaved", "video", "text", "sft"),
        "cross-modal alignment: only the projector trains",
    ),
    "2": StageSpec(
        ("vision", "projector", "lm"),
        1e-3,
        0.1,
        ("image_text", "interleaved", "video", "text", "sft"),
        "multi-task pre-training: every parameter trains",
    ),
    "3": StageSpec(
        ("vision", "projector", "lm"),
        3e-4,
        0.0,
        ("image_text", "interleaved", "video", "text", "sft"),
        "annealing: lower learning rate decayed to zero, high-quality mixture",
    ),
    "sft": StageSpec(
        ("vision", "projector", "lm"),
        5e-4,
        0.1,
        ("sft",),
        "cold-start SFT: conversations, loss on assistant turns only",
    ),
}


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """A :class:`TrainConfig` from an optional YAML file and ``key=value`` overrides; raises ConfigError."""
    file = str(path) if path else "<defaults>"
    try:
        if path:
            raw = load_yaml(path, overrides, "a mapping of training settings")
        else:
            raw, problems = {}, []
            for item in overrides:
                apply_override(raw, item, problems)
            if problems:
                raise RecipeError(file, problems)
    except RecipeError as e:
        raise ConfigError(str(e).replace("invalid recipe", "invalid training config")) from None
    raw.pop("vars", None)
    _numbers(raw, TrainConfig)
    problems: list[str] = []
    cfg = build(TrainConfig, raw, "config", problems)
    if cfg is not None:
        problems += check(cfg)
    if problems:
        raise ConfigError(f"invalid training config {file}:\n" + "\n".join(f"  - {p}" for p in problems))
    return cfg


def _numbers(raw: Any, cls: type) -> None:
    """YAML reads ``1e-3`` as a string (it wants ``1.0e-3``) and ``stage: 0`` as a number: take each as
    the field's type."""
    if not isinstance(raw, dict):
        return
    hints = typing.get_type_hints(cls)
    for key, value in raw.items():
        hint = hints.get(key)
        if hint is None:
            continue
        if dataclasses.is_dataclass(hint):
            _numbers(value, hint)
        elif hint is str and isinstance(value, int) and not isinstance(value, bool):
            raw[key] = str(value)
        elif float in (hint, *typing.get_args(hint)) and isinstance(value, str):
            try:
                raw[key] = float(value)
            except ValueError:
                pass


def check(cfg: TrainConfig) -> list[str]:
    """Problems with values that have the right type but cannot work together."""
    p = []
    if cfg.stage not in STAGES:
        p.append(f"config.stage: '{cfg.stage}' (expected one of {', '.join(STAGES)})")
    if cfg.data.format not in ("parquet", "webdataset"):
        p.append(f"config.data.format: '{cfg.data.format}' (expected parquet or webdataset)")
    if cfg.dtype not in ("auto", "float32", "bfloat16"):
        p.append(f"config.dtype: '{cfg.dtype}' (expected auto, float32 or bfloat16)")
    if cfg.data.verify not in ("sha256", "size", "none"):
        p.append(f"config.data.verify: '{cfg.data.verify}' (expected sha256, size or none)")
    if cfg.vision.dim % cfg.vision.heads:
        p.append(
            f"config.vision.dim: {cfg.vision.dim} is not a multiple of vision.heads ({cfg.vision.heads})"
        )
    if cfg.vision.rope_2d and (cfg.vision.dim // cfg.vision.heads) % 4:
        p.append("config.vision: 2D rotary positions need a head width (dim / heads) divisible by 4")
    if cfg.lm.heads % cfg.lm.kv_heads:
        p.append(f"config.lm.heads: {cfg.lm.heads} is not a multiple of lm.kv_heads ({cfg.lm.kv_heads})")
    if cfg.lm.head_dim % 2:
        p.append("config.lm.head_dim: expected an even number (rotary positions rotate pairs)")
    if cfg.lm.mrope_section and sum(cfg.lm.mrope_section) != cfg.lm.head_dim // 2:
        p.append(
            f"config.lm.mrope_section: {cfg.lm.mrope_section} must have 3 parts summing to "
            f"lm.head_dim / 2 = {cfg.lm.head_dim // 2}"
        )
    if cfg.lm.mrope_section and len(cfg.lm.mrope_section) != 3:
        p.append("config.lm.mrope_section: expected 3 numbers (t, h, w)")
    if cfg.init and cfg.resume:
        p.append("config: set init (start a new stage from weights) or resume (continue a run), not both")
    return p


def mrope_section(lm: LMConfig) -> list[int]:
    """Rotary frequency pairs per axis (t, h, w): the configured split, else Qwen2-VL's 1/4, 3/8, 3/8."""
    if lm.mrope_section:
        return list(lm.mrope_section)
    half = lm.head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def to_dict(cfg: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(raw: dict[str, Any], where: str = "checkpoint") -> TrainConfig:
    problems: list[str] = []
    cfg = build(TrainConfig, raw, "config", problems)
    if cfg is None:
        raise ConfigError(
            f"{where}: its training config does not load:\n" + "\n".join(f"  - {p}" for p in problems)
        )
    return cfg


#: The parts of a config that decide the model's parameters: two checkpoints merge, and a checkpoint loads,
#: only when these agree (weight paths are where weights came from, not what they are).
ARCH_SECTIONS = ("vision", "lm", "contrastive")


def architecture(cfg: TrainConfig | dict[str, Any]) -> dict[str, Any]:
    d = to_dict(cfg) if isinstance(cfg, TrainConfig) else cfg
    return {f"{s}.{k}": v for s in ARCH_SECTIONS for k, v in d[s].items() if k != "hf_path"}


def architecture_diff(a: TrainConfig | dict[str, Any], b: TrainConfig | dict[str, Any]) -> list[str]:
    """``key: a vs b`` for every architecture field that differs."""
    x, y = architecture(a), architecture(b)
    return [f"{k}: {x.get(k)!r} vs {y.get(k)!r}" for k in sorted(set(x) | set(y)) if x.get(k) != y.get(k)]
