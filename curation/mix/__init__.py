"""Mixture building: token accounting that matches the model, so recipes hit exact token budgets."""

from curation.mix.tokens import (
    Tokenizer,
    VisionConfig,
    row_tokens,
    smart_resize,
    video_tokens,
    visual_tokens,
    visual_tokens_np,
)

__all__ = [
    "Tokenizer",
    "VisionConfig",
    "row_tokens",
    "smart_resize",
    "video_tokens",
    "visual_tokens",
    "visual_tokens_np",
]
