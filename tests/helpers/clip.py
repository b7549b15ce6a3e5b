"""The tiny CLIP the tests build with random weights (open_clip, no download)."""

from __future__ import annotations

# A ViT and a text transformer of two layers each: 3.4M parameters, most of them the token embedding.
TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
