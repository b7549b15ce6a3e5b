"""Cold-start SFT rows: the rules of each mode (``docs/sft-format.md``) and degenerate repetition.

The rules themselves live in :mod:`curation.target.chat` (one place for the modes' formats); this
stage applies them to ``modality == "sft"`` rows and turns them into reject reasons.
"""

from __future__ import annotations

from typing import ClassVar

import pyarrow as pa
import pyarrow.compute as pc

from curation.bounds import bounded
from curation.stage import ScoreFilter, register
from curation.target.chat import check_row, degenerate


@register
class SftValidate(ScoreFilter):
    """Reject conversations that break their mode's format or loop: one reason per row, the first rule hit.

    Rules, in order: ``unknown_mode``; ``bad_messages`` (not a JSON list of role/content messages, an
    unknown role, roles out of order, last turn not the assistant's); ``image_ref_out_of_range`` (an
    image part whose index is not in ``images``); ``video_part_without_frames``;
    ``unbalanced_think_tags`` (``<think>``/``<analysis>`` unclosed, nested or stray);
    ``mode_suffix_mismatch`` (thinking needs `` /think``, non_thinking `` /no_think``, auto_think none);
    thinking ``missing_think``; non_thinking ``unexpected_think``; auto_think ``missing_analysis``;
    think_with_image (after the ``think_with_image`` stage ran the code) ``no_input_image``, ``no_code``,
    ``code_does_not_parse``, ``missing_think``, ``no_tool_turn``, ``no_tool_image``; video
    ``no_video_part``; ``empty_answer`` (nothing after the think/analysis blocks); then
    ``degenerate_repetition``.

    Score: the worst share of word ``ngram``-grams that repeat an earlier one in the same assistant turn
    (fenced code left out). Defaults: above ``max_repeat = 0.3`` a turn is a loop (sentences repeated
    whole score 0.8-0.95; ordinary replies and reasoning rarely repeat 8 words in a row, and every clean
    row of the sample corpus scores 0). Character loops ("!!!!...", "hahaha...") have
    no words to repeat: a turn of at least ``min_bytes = 256`` bytes that zlib compresses below
    ``min_compression = 0.1`` of its size (prose: 0.3-0.6) is rejected as well.
    """

    name: ClassVar[str] = "sft_validate"
    reads: ClassVar[tuple[str, ...]] = ("messages", "mode", "images", "frames")
    default_modalities: ClassVar[tuple[str, ...]] = ("sft",)

    ngram: int = bounded(8, 1, 64)
    max_repeat: float = bounded(0.3, 0, 1)
    min_compression: float = bounded(0.1, 0, 1)
    min_bytes: int = bounded(256, 0, 1_073_741_824)

    def __post_init__(self):
        if self.ngram < 2:
            raise ValueError("ngram: expected 2 or more (words per n-gram)")

    def score(self, batch: pa.Table) -> dict[str, pa.Array]:
        return {self.score_name: pa.array([v.repeat for v in self._verdicts(batch)], pa.float64())}

    def decide(self, batch, scores):
        """The rules and both repetition thresholds, from ``messages`` itself: the compression ratio and the
        turn that repeats are measured again (cheap beside a model) rather than carried over from score()."""
        reasons, details = [], []
        for v in self._verdicts(batch):
            found = (
                (v.reason, v.detail)
                if v.reason
                else degenerate(
                    v, ngram=self.ngram, max_repeat=self.max_repeat, min_compression=self.min_compression
                )
            )
            reasons.append(found[0] if found else None)
            details.append(found[1] if found else None)
        return pa.array(reasons, pa.string()), pa.array(details, pa.string())

    def _verdicts(self, batch: pa.Table) -> list:
        n_images = pc.fill_null(pc.list_value_length(batch["images"]), 0).to_pylist()
        n_frames = pc.fill_null(pc.list_value_length(batch["frames"]), 0).to_pylist()
        return [
            check_row(m, mode, ni, nf, ngram=self.ngram, min_bytes=self.min_bytes)
            for m, mode, ni, nf in zip(
                batch["messages"].to_pylist(), batch["mode"].to_pylist(), n_images, n_frames
            )
        ]
