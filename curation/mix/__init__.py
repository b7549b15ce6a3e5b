"""Mixture building: token accounting that matches the model, so recipes hit exact token budgets."""

from curation.mix.tokens import Markup, Tokenizer, row_tokens

__all__ = ["Markup", "Tokenizer", "row_tokens"]
