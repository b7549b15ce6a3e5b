"""Model merging: average the weights of checkpoints (``curation merge CKPT... --out FILE``).

Keye-VL anneals copies of one model on mixtures of different data ratios and averages their parameters
into the released model. Averaging is only meaningful between checkpoints of one architecture, so
checkpoints whose model configs differ are refused with the differing keys; so are checkpoints made
with different tokenizers (the same ids would mean different tokens). Optional ``weights`` give a
weighted average (normalised to sum to 1).

The merged file is a checkpoint like any other (``init`` starts a stage from it), without optimizer
state or data position, and records what it was merged from.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from curation.train.config import ConfigError, architecture_diff
from curation.train.train import CKPT_FORMAT, load_checkpoint, write_checkpoint

log = logging.getLogger(__name__)


def merge_checkpoints(paths: list[str], out: str, weights: list[float] | None = None) -> dict[str, Any]:
    """Average the model weights of ``paths`` into ``out``; returns the merged checkpoint."""
    if len(paths) < 2:
        raise ConfigError("merge needs at least two checkpoints")
    if weights is not None and (
        len(weights) != len(paths) or any(w < 0 for w in weights) or not sum(weights)
    ):
        raise ConfigError(
            f"--weights: expected {len(paths)} non-negative numbers, not all zero; got {weights}"
        )
    ckpts = [load_checkpoint(p) for p in paths]
    first = ckpts[0]
    for c in ckpts[1:]:
        diff = architecture_diff(first["config"], c["config"])
        if diff:
            raise ConfigError(
                f"cannot merge {c['path']} with {first['path']}: their model configs differ:\n"
                + "\n".join(f"  - {d}" for d in diff)
            )
        if c["tokenizer"] != first["tokenizer"]:
            raise ConfigError(
                f"cannot merge {c['path']} with {first['path']}: trained with different tokenizers "
                f"({c['tokenizer']['source']} vs {first['tokenizer']['source']})"
            )
    share = [w / sum(weights) for w in weights] if weights else [1 / len(ckpts)] * len(ckpts)
    merged = {}
    for name, tensor in first["model"].items():
        if tensor.is_floating_point():
            acc = torch.zeros_like(tensor, dtype=torch.float64)
            for c, s in zip(ckpts, share):
                acc += s * c["model"][name].double()
            merged[name] = acc.to(tensor.dtype)
        else:  # integer buffers, if any: identical across checkpoints of one architecture
            merged[name] = tensor.clone()
    result = {
        "format": CKPT_FORMAT,
        "config": first["config"],
        "stage": "merged",
        "step": 0,
        "model": merged,
        "optimizer": None,
        "data": None,
        "tokenizer": first["tokenizer"],
        "mixture": {"path": None, "recipe_hash": None},
        "merged_from": [
            {"path": c["path"], "stage": c["stage"], "step": c["step"], "weight": s, "mixture": c["mixture"]}
            for c, s in zip(ckpts, share)
        ],
    }
    write_checkpoint(result, Path(out))
    log.info("merged %d checkpoints into %s", len(ckpts), out)
    return result
