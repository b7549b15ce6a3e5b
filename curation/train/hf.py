"""Real weights: a SigLIP vision tower and a Qwen3 language model from local Hugging Face checkpoints.

The model's modules carry the names of Hugging Face's ``SiglipVisionModel`` and ``Qwen3ForCausalLM``
where they correspond, so loading is a rename: SigLIP's stride-14 patch convolution becomes the
patch matmul (same weights, flattened), its learned position grid the ``learned_grid`` table (resized
to each image as ``interpolate_pos_encoding`` does), and Qwen3's ``model.`` prefix goes. Architecture
fields come from the checkpoint's ``config.json`` and replace the configured ones.

- With ``vision.rope_2d: false`` the tower computes exactly what SigLIP does; Keye-VL adds 2D rotary
  positions on top (the default here) and lets stage 0 adapt the encoder to them.
- On text, 3D M-RoPE with t = h = w is Qwen3's 1D RoPE, so the decoder computes exactly what Qwen3 does.
- Only local folders load (``local_files_only``): nothing is downloaded.

    >>> sd = qwen3_weights("/models/Qwen3-8B")           # doctest: +SKIP
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

from curation.train.config import ConfigError


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise ConfigError(
            "loading Hugging Face weights needs transformers: pip install 'keye-curation[train]'"
        ) from None
    if importlib.util.find_spec("torchvision") is not None:  # transformers imports it when present
        from curation.models.torch_compat import ensure_torchvision

        ensure_torchvision()
    return transformers


def _config(path: str, key: str) -> Any:
    tf = _transformers()
    try:
        return tf.AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"{key}: {path} is not a Hugging Face checkpoint folder with a config.json: {e}"
        ) from None


def siglip_vision_config(path: str) -> dict[str, Any]:
    """VisionConfig fields of a SigLIP checkpoint (a ``SiglipVisionModel`` or a whole ``SiglipModel``)."""
    c = _config(path, "vision.hf_path")
    if c.model_type == "siglip":
        c = c.vision_config
    if c.model_type != "siglip_vision_model":
        raise ConfigError(f"vision.hf_path: {path} holds a {c.model_type!r} model, not SigLIP")
    if c.hidden_act != "gelu_pytorch_tanh":
        raise ConfigError(f"vision.hf_path: activation {c.hidden_act!r} is not SigLIP's gelu_pytorch_tanh")
    return {
        "dim": c.hidden_size,
        "layers": c.num_hidden_layers,
        "heads": c.num_attention_heads,
        "mlp_dim": c.intermediate_size,
        "patch": c.patch_size,
        "learned_grid": c.image_size // c.patch_size,
        "norm_eps": c.layer_norm_eps,
    }


def siglip_vision_weights(path: str) -> dict[str, torch.Tensor]:
    """A SigLIP vision tower's weights under :class:`curation.train.model.VisionTower`'s names."""
    tf = _transformers()
    model = tf.SiglipVisionModel.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    out = {}
    for key, value in model.state_dict().items():
        key = key.removeprefix("vision_model.")
        if key == "embeddings.patch_embedding.weight":  # (dim, 3, 14, 14): a conv of stride 14 is a matmul
            out["patch_embedding.weight"] = value.reshape(value.shape[0], -1)
        elif key.startswith("embeddings."):
            out[key.removeprefix("embeddings.")] = value
        elif key.startswith("encoder."):
            out[key.removeprefix("encoder.")] = value
        elif key.startswith("post_layernorm."):
            out[key] = value
        # head.* (the attention-pooling head) is not part of the tower the projector reads
    return out


def qwen3_config(path: str) -> dict[str, Any]:
    """LMConfig fields of a Qwen3 checkpoint."""
    c = _config(path, "lm.hf_path")
    if c.model_type != "qwen3":
        raise ConfigError(f"lm.hf_path: {path} holds a {c.model_type!r} model, not Qwen3")
    rope = getattr(c, "rope_parameters", None) or {"rope_type": "default", "rope_theta": c.rope_theta}
    if rope.get("rope_type", "default") != "default":
        raise ConfigError(
            f"lm.hf_path: rope scaling {rope.get('rope_type')!r} is not supported (default RoPE only)"
        )
    if c.hidden_act != "silu" or c.attention_bias:
        raise ConfigError(
            f"lm.hf_path: {path} is not a standard Qwen3 (activation {c.hidden_act}, "
            f"attention bias {c.attention_bias})"
        )
    return {
        "dim": c.hidden_size,
        "layers": c.num_hidden_layers,
        "heads": c.num_attention_heads,
        "kv_heads": c.num_key_value_heads,
        "head_dim": c.head_dim or c.hidden_size // c.num_attention_heads,
        "mlp_dim": c.intermediate_size,
        "rope_theta": float(rope["rope_theta"]),
        "norm_eps": c.rms_norm_eps,
        "tie_embeddings": bool(c.tie_word_embeddings),
        "vocab_size": c.vocab_size,
    }


def qwen3_weights(path: str) -> dict[str, torch.Tensor]:
    """A Qwen3 causal LM's weights under :class:`curation.train.model.LanguageModel`'s names."""
    tf = _transformers()
    model = tf.Qwen3ForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    tied = model.config.tie_word_embeddings
    return {
        k.removeprefix("model."): v
        for k, v in model.state_dict().items()
        if not (tied and k == "lm_head.weight")
    }
