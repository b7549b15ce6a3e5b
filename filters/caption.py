"""Dense captions: a vision-language model writes a detailed caption of each image or video
(``dense_caption``).

A video is shown as ``frames_per_request`` of its sampled frames, spread over the clip, each after a text part
with its time ("t=3.0 s:"), and described with ``video_prompt``; its reject for nothing to look at is
``missing_frames``.

The Keye-VL recipe synthesizes detailed captions for pre-training. The model sees the image and a prompt
that carries the row's original caption and its OCR text (``ocr`` stage) as hints; it uses the backends
of the VLM judge (``curation.models.vlm``: an OpenAI-compatible server, a vLLM engine in each GPU worker, a
local transformers model).

Every answer is checked before it is kept, because a model that fails does so in a few typical ways:

- ``caption_too_short``: fewer than ``min_words`` words (a refusal, a one-line caption, a cut-off answer);
- ``caption_repetitive``: stuck in a loop; the share of word ``ngram``-grams that repeat an earlier one
  (:func:`curation.target.chat.repetition`, the measure of the SFT filter) is above ``max_repeat``;
- ``caption_echoes_prompt``: the model copied its instructions or hints instead of looking; the *echo* is
  the share of the answer's word ``ngram``-grams (lower-cased ``\\w+`` words) that also occur in the
  prompt as sent (the template filled with the hints). A long original caption or OCR text quoted as
  part of a real description leaves most n-grams new; a restated prompt or a copied hint scores near 1.
- ``caption_failure``: an empty answer (or only a ``<think>`` block).

A failed answer is asked again, up to ``max_attempts`` in all, with the bad answer and a short note of
what was wrong; after the last attempt the row is rejected with that reason and the raw answer in the
detail. ``caption_unreachable`` / ``caption_rejected``: the backend gave no answer after its own retries
(the backend's error in the detail); ``missing_image``: nothing to look at. Rows that already have a
``dense_caption`` are left as they are (not asked, not rejected, no score) unless ``overwrite``.

The score (``score_dense_caption``) is the kept caption's word count: a length, not a quality rank.

Recipe::

    - dense_caption:
        backend: {kind: openai, base_url: "http://127.0.0.1:8000/v1", model: Kwai-Keye/Keye-VL-8B-Preview,
                  max_new_tokens: 512}
        min_words: 20
        prompt: |
          Describe the image in detail.
          Hints, which may be wrong: caption "{caption}", text in it "{ocr_text}".
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import field
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curation.bounds import bounded
from curation.models.vlm import (
    BackendConfig,
    Request,
    Response,
    converse,
    engine_resources,
    image_part,
    make_backend,
)
from curation.stage import ScoreFilter, register, unscored
from curation.target.chat import repetition

log = logging.getLogger(__name__)

DEFAULT_PROMPT = (
    "Describe this image in detail, for training a vision-language model. Cover the main subjects and their "
    "attributes (colours, shapes, sizes, materials, counts), where things are and how they relate, the "
    "setting and background, any visible text, and the style of the image.\n"
    "Write fluent plain prose in one or more paragraphs. Describe only what you can see; do not guess.\n"
    "\n"
    "Hints, which may be wrong or incomplete (use them only where the image confirms them):\n"
    "Original caption: {caption}\n"
    "Text read from the image by OCR: {ocr_text}"
)
VIDEO_PROMPT = (
    "These are frames of a video clip, in order, each after its time in seconds from the start of the video. "
    "Describe the clip in detail, for training a vision-language model: what happens and in what order "
    "(say when, using the times), the subjects and their attributes, how they move, the setting, any visible "
    "text, and how the camera moves.\n"
    "Write fluent plain prose. Describe only what you can see; do not guess.\n"
    "\n"
    "Hints, which may be wrong or incomplete (use them only where the frames confirm them):\n"
    "Original caption: {caption}\n"
    "Text read from the frames by OCR: {ocr_text}"
)
REPAIR = (
    "Your description cannot be used: {problem}. "
    "Write a new, detailed description of the image in your own words."
)
PLACEHOLDERS = ("caption", "ocr_text")
NONE = "(none)"  # what an empty hint reads as in the prompt
MAX_RAW = 2000  # characters of a rejected answer kept in the reject detail

_PLACEHOLDER = re.compile(r"\{(%s)\}" % "|".join(PLACEHOLDERS))  # noqa: UP031 - braces are literal here
_WORD = re.compile(r"\w+")


def fill(template: str, values: dict[str, str]) -> str:
    """The template with each known ``{placeholder}`` replaced; other braces (a JSON example) stay as written.

    >>> fill('Caption: {caption} {"k": 1}', {"caption": "a cat", "ocr_text": ""})
    'Caption: a cat {"k": 1}'
    """
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def echo(answer: str, prompt: str, n: int) -> float:
    """The share of the answer's word ``n``-grams that also occur in the prompt (0 when it has none)."""
    words = _WORD.findall(answer.lower())
    grams = {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}
    if not grams:
        return 0.0
    seen = _WORD.findall(prompt.lower())
    seen = {tuple(seen[i : i + n]) for i in range(len(seen) - n + 1)}
    return len(grams & seen) / len(grams)


@register
class DenseCaption(ScoreFilter):
    """Ask a VLM for a detailed caption of each image; keep it in ``dense_caption`` when it passes the checks.

    Reasons: ``caption_too_short``, ``caption_repetitive``, ``caption_echoes_prompt``, ``caption_failure``
    (after ``max_attempts``; detail: what was wrong and the raw answer), ``caption_unreachable`` /
    ``caption_rejected`` (the backend's error), ``missing_image``.
    """

    name: ClassVar[str] = "dense_caption"
    reads: ClassVar[tuple[str, ...]] = (
        "modality",
        "text",
        "image",
        "images",
        "frames",
        "frame_ts",
    )  # and, when an earlier stage filled them, ocr_text (a hint in the prompt) and dense_caption (kept)
    writes: ClassVar[tuple[str, ...]] = ("dense_caption",)
    default_modalities: ClassVar[tuple[str, ...]] = ("image_text", "video")

    backend: BackendConfig = field(
        default_factory=lambda: BackendConfig(
            base_url="http://127.0.0.1:8000/v1", model="Kwai-Keye/Keye-VL-8B-Preview", max_new_tokens=512
        )
    )
    prompt: str = (
        DEFAULT_PROMPT  # placeholders: {caption} (the row's text), {ocr_text}; empty hints read "(none)"
    )
    video_prompt: str = VIDEO_PROMPT  # for video rows, after the frames (each preceded by "t=1.0 s:")
    frames_per_request: int = bounded(8, 1, 256)  # video: frames sent, spread evenly over the clip
    min_words: int = bounded(20, 0, 10_000)  # fewer words: caption_too_short
    ngram: int = bounded(8, 1, 64)  # words per n-gram, for max_repeat and max_echo
    # share of n-grams repeating an earlier one; above: caption_repetitive
    max_repeat: float = bounded(0.2, 0, 1)
    # share of n-grams found in the prompt as sent; above: caption_echoes_prompt
    max_echo: float = bounded(0.5, 0, 1)
    max_attempts: int = bounded(2, 1, 20)  # asks per row while the answer fails a check
    overwrite: bool = False  # ask again for rows that already have a dense_caption
    # larger images are downscaled before sending (0: send as they are)
    max_image_side: int = bounded(1024, 0, 16_384)

    def __post_init__(self):
        if self.max_attempts < 1 or self.min_words < 0 or self.ngram < 2 or self.max_image_side < 0:
            raise ValueError(
                "max_attempts must be positive, ngram 2 or more, min_words and max_image_side not negative"
            )
        if self.frames_per_request < 1:
            raise ValueError("frames_per_request: expected a positive number of frames")
        if not (0 <= self.max_repeat <= 1 and 0 <= self.max_echo <= 1):
            raise ValueError("max_repeat and max_echo: expected shares between 0 and 1")
        for key in ("prompt", "video_prompt"):
            unknown = set(re.findall(r"\{([A-Za-z_]\w*)\}", getattr(self, key))) - set(PLACEHOLDERS)
            if unknown:
                raise ValueError(
                    f"{key}: unknown placeholder(s) {', '.join(f'{{{u}}}' for u in sorted(unknown))} "
                    f"(known: {', '.join(f'{{{p}}}' for p in PLACEHOLDERS)})"
                )
        if self.modalities is not None and set(self.modalities) - {"image_text", "video"}:
            raise ValueError(f"modalities: dense_caption handles image_text and video, got {self.modalities}")
        self.resources = engine_resources(self.backend, self.resources)
        self._backend = None

    # ------------------------------------------------------------ hooks

    def check_requirements(self) -> None:
        make_backend(self.backend).check_requirements()

    def preflight(self) -> None:
        make_backend(self.backend).preflight()

    def lineage(self) -> dict[str, Any]:
        prompts = json.dumps(
            {"template": self.prompt, "video_template": self.video_prompt, "repair": REPAIR}, sort_keys=True
        )
        return {
            **make_backend(self.backend).lineage(),
            "prompt_sha256": hashlib.sha256(prompts.encode()).hexdigest(),
            "max_new_tokens": self.backend.max_new_tokens,
            "temperature": self.backend.temperature,
            "min_words": self.min_words,
            "ngram": self.ngram,
            "max_repeat": self.max_repeat,
            "max_echo": self.max_echo,
        }

    def setup(self) -> None:
        if self._backend is None:
            self._backend = make_backend(self.backend)
            self._backend.setup()

    def __getstate__(self):  # a worker builds its own backend in setup(); threads and models do not travel
        return {**self.__dict__, "_backend": None}

    def applies(self, batch: pa.Table) -> pa.Array:
        """Also skips rows that already have a dense caption, unless ``overwrite``."""
        mask = super().applies(batch)
        if self.overwrite:
            return mask
        return pc.and_(mask, pc.equal(pc.utf8_length(pc.fill_null(batch["dense_caption"], "")), 0))

    def __call__(self, batch: pa.Table) -> pa.Table:
        out = super().__call__(batch)  # writes dense_caption for the rows asked, null elsewhere
        kept = pc.coalesce(out["dense_caption"], batch["dense_caption"])  # rows not asked keep theirs
        return out.set_column(out.schema.get_field_index("dense_caption"), "dense_caption", kept)

    # ------------------------------------------------------------ captioning

    def score(self, batch: pa.Table) -> dict[str, pa.Array]:
        self.setup()
        n = batch.num_rows
        cols = {c: batch[c].to_pylist() for c in (*self.reads, "ocr_text")}
        words = np.full(n, np.nan)
        captions: list[str | None] = [None] * n
        failed: list[str | None] = [None] * n
        detail: list[str | None] = [None] * n
        requests: dict[int, Request] = {}
        prompts: dict[int, str] = {}
        for i in range(n):
            hints = {
                "caption": (cols["text"][i] or "").strip() or NONE,
                "ocr_text": (cols["ocr_text"][i] or "").strip() or NONE,
            }
            if cols["modality"][i] == "video":
                parts = self._frame_parts(cols["frames"][i] or [], cols["frame_ts"][i] or [])
                if not parts:
                    failed[i] = "missing_frames"
                    continue
                prompts[i] = fill(self.video_prompt, hints)
            else:
                image = cols["image"][i] or next((x for x in cols["images"][i] or [] if x is not None), None)
                if image is None:
                    failed[i] = "missing_image"
                    continue
                parts = [image_part(image, self.max_image_side)]
                prompts[i] = fill(self.prompt, hints)
            requests[i] = Request(
                [{"role": "user", "content": [*parts, {"type": "text", "text": prompts[i]}]}]
            )

        def answer(i: int, resp: Response, may_retry: bool) -> Request | None:
            if resp.error is not None:
                failed[i], detail[i] = f"caption_{resp.error_kind or 'unreachable'}", resp.error
                return None
            text = re.sub(r"<think>.*?(</think>|$)", "", resp.text or "", flags=re.DOTALL).strip()
            problem = self.check(text, prompts[i])
            if problem is None:
                captions[i], words[i] = text, len(text.split())
                failed[i] = detail[i] = None
                return None
            reason, what = problem
            failed[i] = reason
            detail[i] = f"{what}; answer: {(resp.text or '(empty answer)')[:MAX_RAW]}"
            return _repaired(requests[i], resp, what) if may_retry else None

        converse(self._backend, requests, self.max_attempts, answer)
        errors = sum(r is not None and r.startswith("caption_") for r in failed)
        if errors:
            log.info(
                "%s: %d of %d rows got no usable caption in %d attempt(s)",
                self.label,
                errors,
                n,
                self.max_attempts,
            )
        # every reject is a row without a usable caption: nothing is left for decide() to threshold
        return {
            "dense_caption": pa.array(captions, pa.string()),
            self.score_name: pa.array(words, mask=np.isnan(words)),
            **unscored(failed, detail),
        }

    def _frame_parts(self, frames: list[bytes], ts: list[float]) -> list[dict[str, Any]]:
        """Up to ``frames_per_request`` frames spread evenly over the clip, each after its time ("t=3.0 s:"),
        so the model can say when things happen (Keye-VL ties positions to absolute time)."""
        if not frames:
            return []
        pick = np.unique(
            np.linspace(0, len(frames) - 1, min(self.frames_per_request, len(frames))).round().astype(int)
        )
        parts: list[dict[str, Any]] = []
        for k in pick:
            if len(ts) == len(frames):
                parts.append({"type": "text", "text": f"t={ts[k]:.1f} s:"})
            parts.append(image_part(frames[k], self.max_image_side))
        return parts

    def check(self, text: str, prompt: str) -> tuple[str, str] | None:
        """``(reason, what was wrong)`` for an answer that fails a check, None for a usable caption."""
        if not text:
            return "caption_failure", "the answer is empty"
        n_words = len(text.split())
        if n_words < self.min_words:
            return "caption_too_short", f"it has {n_words} words, at least {self.min_words} are needed"
        share, _ = repetition(text, self.ngram)
        if share > self.max_repeat:
            return (
                "caption_repetitive",
                f"it repeats itself ({share:.0%} of its {self.ngram}-word phrases are repeats)",
            )
        copied = echo(text, prompt, self.ngram)
        if copied > self.max_echo:
            return (
                "caption_echoes_prompt",
                f"it copies the prompt ({copied:.0%} of its {self.ngram}-word phrases)",
            )
        return None


def _repaired(request: Request, answer: Response, problem: str) -> Request:
    """The chat so far, the failed answer, and what was wrong with it."""
    return Request(
        [
            *request.messages,
            {"role": "assistant", "content": answer.text or ""},
            {"role": "user", "content": REPAIR.format(problem=problem)},
        ]
    )
