"""VLM judge: a vision-language model rates each sample, and the rating is kept as a score.

The Keye-VL recipe uses VLM discriminators next to CLIP scores: a model looks at the image and reads the
caption, and judges alignment, correctness, detail and usefulness. Here the model answers a rubric prompt
with JSON ``{"score": 1-5, "reason": "..."}``; the score persists (``score_vlm_judge``) with the reason
(``vlm_judge_reason``), and ``min_score`` decides, so a threshold changes without asking the model again.

An answer that does not parse is asked again (the bad answer goes back with a request for the JSON only)
up to ``max_attempts`` times, then the row is rejected as ``judge_failure`` with the raw text in the
detail. A backend that gives no answer after its own retries rejects the row as ``judge_unreachable``
(connection, timeout, 429/5xx) or ``judge_rejected`` (the backend refused the request). Nothing passes
silently and nothing stops the run.

Recipe::

    - vlm_judge:
        backend: {kind: openai, base_url: "http://127.0.0.1:8000/v1", model: Kwai-Keye/Keye-VL-8B-Preview}
        min_score: 3
        modalities: [image_text, interleaved, video]

Prompt templates fill ``{caption}`` (the row's text; an interleaved document's texts joined),
``{num_images}`` and ``{timestamps}`` (video frame times); other braces, like a JSON example, stay as
written. Media parts come first in the message, then the prompt.
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
from curation.stage import ScoreFilter, reason_where, register, unscored

log = logging.getLogger(__name__)

_ANSWER = (
    'Answer with only a JSON object, no other text: {"score": <integer from 1 to 5>, '
    '"reason": "<one short sentence>"}'
)

_RUBRIC = """Rate the sample from 1 to 5 for training a vision-language model:
5 = accurate, specific and detailed; clearly useful to learn from
4 = accurate and useful, with small omissions
3 = roughly right but vague, generic or partly unverifiable
2 = mostly wrong, boilerplate (ads, file names, SEO text) or only loosely related
1 = unrelated, false, spam or unreadable"""

DEFAULT_PROMPTS = {
    "image_text": (
        "You judge image-caption pairs for a vision-language training set. Look at the image, then read its "
        "caption.\n"
        "Judge how well the caption matches the image, whether it is correct, how much true detail it gives, "
        "and how useful the pair is.\n"
        "\n"
        "Caption: {caption}\n"
        "\n"
        f"{_RUBRIC}\n"
        "\n"
        f"{_ANSWER}"
    ),
    "interleaved": (
        "You judge interleaved image-text documents (the {num_images} image(s) and texts above, in order) "
        "for a vision-language training set.\n"
        "Judge whether the images and the surrounding text belong together, whether the text is coherent and "
        "informative, and how useful the document is.\n"
        "\n"
        f"{_RUBRIC}\n"
        "\n"
        f"{_ANSWER}"
    ),
    "video": (
        "You judge video-caption pairs for a vision-language training set. Above are {num_images} frames "
        "sampled from the video at {timestamps} seconds.\n"
        "Judge how well the caption describes what happens in the video, whether it is correct, how much "
        "true detail it gives (actions, order of events), and how useful the pair is.\n"
        "\n"
        "Caption: {caption}\n"
        "\n"
        f"{_RUBRIC}\n"
        "\n"
        f"{_ANSWER}"
    ),
}
REPAIR = (
    "Your answer could not be read ({error}). Reply again with only the JSON object, nothing else: "
    '{{"score": <number from {lo:g} to {hi:g}>, "reason": "<one short sentence>"}}'
)
PLACEHOLDERS = ("caption", "num_images", "timestamps")
_PLACEHOLDER = re.compile(r"\{(%s)\}" % "|".join(PLACEHOLDERS))  # noqa: UP031 - braces are literal here
MAX_RAW = 2000  # characters of an unparsed answer kept in the reject detail


_SCORE_KEYS = ("score", "rating")


class ParseError(ValueError):
    """An answer without a usable score."""


def parse_judgement(text: str, lo: float = 1, hi: float = 5) -> tuple[float, str]:
    """(score, reason) from a model's answer; ParseError says why not.

    Strict JSON first; then a JSON object inside prose or a code fence; then ``Score: 4`` lines or an
    answer that is only the number (``4``, ``4/5``). A ``<think>...</think>`` block (Keye's thinking mode)
    is skipped. The score must lie in [lo, hi]; ``rating`` is read as ``score``.

    >>> parse_judgement('Sure! ```json\\n{"score": 4, "reason": "matches"}\\n```')
    (4.0, 'matches')
    >>> parse_judgement("Score: 2/5\\nReason: the caption is an advert.")
    (2.0, 'the caption is an advert.')
    """
    text = re.sub(r"<think>.*?(</think>|$)", "", text or "", flags=re.DOTALL).strip()
    if not text:
        raise ParseError("empty answer")
    found = None
    for obj in _json_objects(text):
        if isinstance(obj, dict) and any(k.lower() in _SCORE_KEYS for k in obj):
            found = {("score" if k.lower() in _SCORE_KEYS else k.lower()): v for k, v in obj.items()}
            break
        if isinstance(obj, (int, float)) and not isinstance(obj, bool):  # the answer is just the number
            found = {"score": obj}
            break
    if found is None:
        m = re.search(
            r"\b(?:score|rating)\b\W{0,3}\s*(-?\d+(?:\.\d+)?)", text, re.IGNORECASE
        ) or re.fullmatch(r"\W*(-?\d+(?:\.\d+)?)\s*(?:/\s*\d+)?\W*", text)  # "4/5", "**4**."
        if m is None:
            raise ParseError("no score in the answer")
        r = re.search(r"\breason\b\W{0,3}\s*(.+)", text, re.IGNORECASE)
        found = {"score": m.group(1), "reason": r.group(1).strip().strip('"') if r else ""}
    score = found["score"]
    if isinstance(score, bool) or not isinstance(score, (int, float, str)):
        raise ParseError(f"score is not a number: {score!r}")
    try:
        score = float(score)
    except ValueError:
        raise ParseError(f"score is not a number: {score!r}") from None
    if not lo <= score <= hi:  # also rejects NaN
        raise ParseError(f"score {score:g} is outside [{lo:g}, {hi:g}]")
    reason = found.get("reason")
    return score, reason.strip() if isinstance(reason, str) else (
        "" if reason is None else json.dumps(reason)
    )


def _json_objects(text: str):
    """The whole text as JSON, then every JSON object that starts at a ``{`` in it, in order."""
    try:
        yield json.loads(text)
    except ValueError:
        pass
    decoder = json.JSONDecoder()
    for m in re.finditer(r"\{", text):
        try:
            yield decoder.raw_decode(text, m.start())[0]
        except ValueError:
            continue


@register
class VLMJudge(ScoreFilter):
    """Ask a VLM whether each sample is good; keep the 1-5 score and reason; reject below ``min_score``.

    Reasons: ``score_below_min`` (detail: the model's reason), ``judge_failure`` (no parsable score after
    ``max_attempts``; detail: the last raw answer), ``judge_unreachable`` and ``judge_rejected`` (the
    backend's error), ``missing_image`` / ``missing_frames`` (nothing to look at).
    """

    name: ClassVar[str] = "vlm_judge"
    reads: ClassVar[tuple[str, ...]] = ("text", "image", "texts", "images", "frames", "frame_ts")
    default_modalities: ClassVar[tuple[str, ...]] = ("image_text",)
    ranks: ClassVar[bool] = True  # higher is better: keep_fraction may cut at a pool-wide quantile

    backend: BackendConfig = field(
        default_factory=lambda: BackendConfig(
            base_url="http://127.0.0.1:8000/v1", model="Kwai-Keye/Keye-VL-8B-Preview"
        )
    )
    prompt: str | None = None  # one template for every modality (default: a rubric per modality)
    min_score: float = 3.0
    score_range: list[float] = field(default_factory=lambda: [1.0, 5.0])  # a valid answer's score lies here
    max_attempts: int = bounded(2, 1, 20)  # asks per row while the answer does not parse
    # interleaved: the first N images; video: N frames spread over its length
    images_per_request: int = bounded(4, 1, 64)
    # larger images are downscaled before sending (0: send as they are)
    max_image_side: int = bounded(1024, 0, 16_384)

    def __post_init__(self):
        if self.max_attempts < 1 or self.images_per_request < 1 or self.max_image_side < 0:
            raise ValueError(
                "max_attempts and images_per_request must be positive, max_image_side not negative"
            )
        if len(self.score_range) != 2 or self.score_range[0] >= self.score_range[1]:
            raise ValueError(f"score_range: expected [low, high] with low < high, got {self.score_range}")
        for modality in self._modalities():
            if self.prompt is None and modality not in DEFAULT_PROMPTS:
                raise ValueError(
                    f"modalities: no default prompt for {modality!r} (have {', '.join(DEFAULT_PROMPTS)}); "
                    f"give a prompt"
                )
        unknown = set(re.findall(r"\{([A-Za-z_]\w*)\}", self.prompt or "")) - set(PLACEHOLDERS)
        if unknown:
            raise ValueError(
                f"prompt: unknown placeholder(s) {', '.join(f'{{{u}}}' for u in sorted(unknown))} "
                f"(known: {', '.join(f'{{{p}}}' for p in PLACEHOLDERS)})"
            )
        self.resources = engine_resources(self.backend, self.resources)
        self._backend = None

    @property
    def reason_name(self) -> str:
        return f"{self.label}_reason"

    def output_fields(self) -> list[pa.Field]:
        return [pa.field(self.score_name, pa.float64()), pa.field(self.reason_name, pa.string())]

    def _modalities(self) -> list[str]:
        return list(self.modalities if self.modalities is not None else self.default_modalities)

    def _template(self, modality: str) -> str:
        return self.prompt if self.prompt is not None else DEFAULT_PROMPTS[modality]

    # ------------------------------------------------------------ hooks

    def check_requirements(self) -> None:
        make_backend(self.backend).check_requirements()

    def preflight(self) -> None:
        make_backend(self.backend).preflight()

    def lineage(self) -> dict[str, Any]:
        templates = {m: self._template(m) for m in sorted(self._modalities())}
        prompts = json.dumps({"templates": templates, "repair": REPAIR}, sort_keys=True)
        return {
            **make_backend(self.backend).lineage(),
            "prompt_sha256": hashlib.sha256(prompts.encode()).hexdigest(),
            "max_new_tokens": self.backend.max_new_tokens,
            "temperature": self.backend.temperature,
            "score_range": list(self.score_range),
        }

    def setup(self) -> None:
        if self._backend is None:
            self._backend = make_backend(self.backend)
            self._backend.setup()

    def __getstate__(self):  # a worker builds its own backend in setup(); threads and models do not travel
        return {**self.__dict__, "_backend": None}

    # ------------------------------------------------------------ scoring

    def score(self, batch: pa.Table) -> dict[str, pa.Array]:
        self.setup()
        n = batch.num_rows
        cols = {c: batch[c].to_pylist() for c in ("modality", *self.reads)}
        scores, reasons = np.full(n, np.nan), [None] * n
        failed: list[str | None] = [None] * n
        detail: list[str | None] = [None] * n
        requests: dict[int, Request] = {}
        for i in range(n):
            req = self._request({c: v[i] for c, v in cols.items()})
            if isinstance(req, str):
                failed[i] = req
            else:
                requests[i] = req
        lo, hi = self.score_range

        def answer(i: int, resp: Response, may_retry: bool) -> Request | None:
            if resp.error is not None:
                failed[i], detail[i] = f"judge_{resp.error_kind or 'unreachable'}", resp.error
                return None
            try:
                scores[i], reasons[i] = parse_judgement(resp.text, lo, hi)
            except ParseError as e:
                failed[i], detail[i] = "judge_failure", (resp.text or "(empty answer)")[:MAX_RAW]
                return _repaired(requests[i], resp, str(e), lo, hi) if may_retry else None
            failed[i] = detail[i] = None
            return None

        converse(self._backend, requests, self.max_attempts, answer)
        unparsed = sum(r == "judge_failure" for r in failed)
        if unparsed:
            log.info(
                "%s: %d of %d answers did not parse after %d attempt(s)",
                self.label,
                unparsed,
                n,
                self.max_attempts,
            )
        return {
            self.score_name: pa.array(scores, mask=np.isnan(scores)),
            self.reason_name: pa.array(reasons, pa.string()),
            **unscored(failed, detail),
        }

    def decide(self, batch, scores):
        """Below ``min_score``: ``score_below_min``, with the model's own reason as the detail."""
        below = pc.less(scores[self.score_name], self.min_score)
        return reason_where(below, "score_below_min"), scores[self.reason_name]

    def _request(self, row: dict[str, Any]) -> Request | str:
        """The chat for one row, or a reject reason when there is nothing to look at."""
        modality = row["modality"]
        caption = row["text"] or ""
        fill = {"caption": caption, "num_images": "0", "timestamps": ""}
        parts: list[dict[str, Any]] = []
        if modality == "interleaved":
            shown, omitted = 0, 0
            for text, image in zip(row["texts"] or [], row["images"] or []):
                if image is not None and shown < self.images_per_request:
                    parts.append(image_part(image, self.max_image_side))
                    shown += 1
                elif image is not None:
                    omitted += 1
                if text:
                    parts.append({"type": "text", "text": text})
            if omitted:
                parts.append({"type": "text", "text": f"({omitted} more image(s) not shown)"})
            fill.update(caption="\n\n".join(t for t in row["texts"] or [] if t), num_images=str(shown))
        elif modality == "video":
            frames, ts = row["frames"] or [], row["frame_ts"] or []
            if not frames:
                return "missing_frames"
            pick = np.unique(
                np.linspace(0, len(frames) - 1, min(self.images_per_request, len(frames))).round().astype(int)
            )
            parts = [image_part(frames[k], self.max_image_side) for k in pick]
            fill.update(
                num_images=str(len(pick)),
                timestamps=", ".join(f"{ts[k]:.1f}" for k in pick) if len(ts) == len(frames) else "unknown",
            )
        else:
            images = (
                [row["image"]]
                if row["image"] is not None
                else [x for x in row["images"] or [] if x is not None]
            )
            if not images:
                return "missing_image"
            parts = [image_part(x, self.max_image_side) for x in images[: self.images_per_request]]
            fill["num_images"] = str(len(parts))
        prompt = _PLACEHOLDER.sub(lambda m: fill[m.group(1)], self._template(modality))
        return Request([{"role": "user", "content": [*parts, {"type": "text", "text": prompt}]}])


def _repaired(request: Request, answer: Response, error: str, lo: float, hi: float) -> Request:
    """The chat so far, the unreadable answer, and a request for the JSON alone."""
    return Request(
        [
            *request.messages,
            {"role": "assistant", "content": answer.text or ""},
            {"role": "user", "content": REPAIR.format(error=error, lo=lo, hi=hi)},
        ]
    )
