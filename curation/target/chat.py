"""The chat format Keye-VL reads, and what a valid SFT row is: the five modes, their suffixes and tags.

``docs/sft-format.md`` is the contract; this module is its only implementation. The converters of the
``sharegpt`` / ``qa`` source formats (:mod:`curation.io.conversations`), the ``sft_validate`` and
``ocr_qa`` stages, the caption filter's repetition measure and the sample corpus all go through it, so a
suffix or a tag is spelled once.

Why it lives here, on the ground floor (:mod:`curation.target`), and not with the mixture builder: it
says what the model reads, which ingest, filters and mixing all need; nothing in it is about drawing a
mixture. It depends on the standard library only.

Building a row's messages::

    >>> msgs = build_messages(
    ...     "thinking", "What colour is the car?", "Red.", reasoning="The car is red.", n_images=1
    ... )
    >>> msgs[0]["content"][-1]["text"], msgs[1]["content"]
    ('What colour is the car? /think', '<think>The car is red.</think>\\n\\nRed.')

Checking one (``None``: the row is good; otherwise the reject reason and a detail)::

    >>> validate(dump_messages(msgs), "thinking", n_images=1)
    >>> validate(dump_messages(msgs), "non_thinking", n_images=1)[0]
    'mode_suffix_mismatch'
"""

from __future__ import annotations

import ast
import itertools
import json
import re
import zlib
from dataclasses import dataclass
from typing import Any

MODES = ("thinking", "non_thinking", "auto_think", "think_with_image", "video")
ROLES = ("system", "user", "assistant", "tool")
#: Keye-VL's chat format: the last user text ends with the suffix (auto_think has none).
SUFFIXES = {"thinking": "/think", "non_thinking": "/no_think"}
THINK = ("<think>", "</think>")
ANALYSIS = ("<analysis>", "</analysis>")

_TAG = re.compile(r"</?(think|analysis)>")
_SUFFIX = re.compile(r"(?:^|\s)(/think|/no_think)\s*$")
_CODE = re.compile(r"```(?:python|py)[ \t]*\n(.*?)```", re.DOTALL)


class ConversionError(ValueError):
    """Messages that cannot be put in the chat format (a source record, or what a stage built); ``reason`` is
    the reject reason (at ingest, the ``ingest`` stage's)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


# ---------------------------------------------------------------- building (the doc's table, as code)


def dump_messages(messages: list[dict]) -> str:
    """The ``messages`` column: JSON, UTF-8 kept (stable bytes, so stable row ids)."""
    return json.dumps(messages, ensure_ascii=False)


def assistant_text(answer: str, reasoning: str | None = None, analysis: str | None = None) -> str:
    """``<analysis>A</analysis>\\n\\n<think>R</think>\\n\\nANSWER``, each block only when given."""
    blocks = []
    if analysis is not None:
        blocks.append(f"{ANALYSIS[0]}{analysis.strip()}{ANALYSIS[1]}")
    if reasoning is not None:
        blocks.append(f"{THINK[0]}{reasoning.strip()}{THINK[1]}")
    return "\n\n".join([*blocks, answer.strip()])


def code_turn(code: str, reasoning: str | None = None) -> str:
    """The think_with_image assistant turn: ``<think>R</think>`` then one fenced python block."""
    fence = f"```python\n{code.strip(chr(10))}\n```"
    return f"{THINK[0]}{reasoning.strip()}{THINK[1]}\n\n{fence}" if reasoning is not None else fence


def build_messages(
    mode: str,
    question: str,
    answer: str,
    *,
    reasoning: str | None = None,
    analysis: str | None = None,
    code: str | None = None,
    n_images: int = 0,
    video: bool = False,
    system: str | None = None,
) -> list[dict]:
    """One question and its answer as the messages of ``mode`` (the doc's table, row by row).

    Images (``images[0..n_images)``) and the video go before the question, as LLaVA puts them.
    ``reasoning`` is used by thinking, auto_think, video (optional) and think_with_image (the code
    turn's ``<think>``); non_thinking drops it. A think_with_image row comes out in its pre-execution
    form: user, assistant with the code, assistant with the answer (the stage inserts the tool turn).
    """
    if mode not in MODES:
        raise ConversionError("unknown_mode", f"mode '{mode}' (expected one of {', '.join(MODES)})")
    media = [{"type": "image", "index": i} for i in range(n_images)] + ([{"type": "video"}] if video else [])
    messages: list[dict] = [{"role": "system", "content": system}] if system else []
    messages.append(
        {"role": "user", "content": [*media, {"type": "text", "text": question}] if media else question}
    )
    if mode == "think_with_image" and code is not None:
        messages.append({"role": "assistant", "content": code_turn(code, reasoning)})
        messages.append({"role": "assistant", "content": answer.strip()})
    elif mode == "non_thinking":
        messages.append({"role": "assistant", "content": assistant_text(answer)})
    elif mode == "auto_think":
        messages.append({"role": "assistant", "content": assistant_text(answer, reasoning, analysis)})
    else:  # thinking, video, think_with_image without code (the validator says no_code)
        messages.append({"role": "assistant", "content": assistant_text(answer, reasoning)})
    apply_suffix(messages, mode)
    return messages


# ---------------------------------------------------------------- reading messages back


def text_of(content: Any) -> str:
    """The text of a message's content (text parts joined with newlines; media parts skipped)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            p["text"]
            for p in content
            if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        )
    return ""


def parts_of(content: Any) -> list[dict]:
    return [p for p in content if isinstance(p, dict)] if isinstance(content, list) else []


def last_user_text(messages: list[dict]) -> str | None:
    """The last text of the last user turn (where the mode suffix goes), or None."""
    for m in reversed(messages):
        if m.get("role") == "user":
            content = m.get("content")
            if isinstance(content, str):
                return content
            texts = [
                p["text"]
                for p in parts_of(content)
                if p.get("type") == "text" and isinstance(p.get("text"), str)
            ]
            return texts[-1] if texts else None
    return None


def mode_suffix(text: str | None) -> str | None:
    """``/think``, ``/no_think`` or None: the suffix ``text`` ends with (a word of its own)."""
    m = _SUFFIX.search(text or "")
    return m.group(1) if m else None


def suffix_problem(messages: list[dict], mode: str) -> str | None:
    """Why the last user text's suffix does not fit ``mode`` (None: it fits).

    thinking needs ``/think``, non_thinking ``/no_think``, auto_think none; think_with_image and video
    are not chosen by a suffix and may carry either or none.
    """
    found = mode_suffix(last_user_text(messages))
    want = SUFFIXES.get(mode)
    if want is not None and found != want:
        return f"{mode} needs the last user text to end with ' {want}', " + (
            f"it ends with '{found}'" if found else "it has no suffix"
        )
    if mode == "auto_think" and found:
        return f"auto_think takes no suffix (the model decides), the last user text ends with '{found}'"
    return None


def apply_suffix(messages: list[dict], mode: str) -> None:
    """Add the mode's suffix to the last user text, in place (never twice).

    Raises :class:`ConversionError` (``mode_suffix_mismatch``) when the text already carries another one.
    """
    want = SUFFIXES.get(mode)
    if want is not None and mode_suffix(last_user_text(messages)) is None:
        user = next((m for m in reversed(messages) if m.get("role") == "user"), None)
        if user is None:
            return  # no user turn: the role check reports it
        content = user.get("content")
        if isinstance(content, str):
            user["content"] = f"{content.rstrip()} {want}" if content.strip() else want
        else:
            texts = [
                p for p in parts_of(content) if p.get("type") == "text" and isinstance(p.get("text"), str)
            ]
            if texts:
                texts[-1]["text"] = (
                    f"{texts[-1]['text'].rstrip()} {want}" if texts[-1]["text"].strip() else want
                )
            else:
                content.append({"type": "text", "text": want})
    problem = suffix_problem(messages, mode)
    if problem:
        raise ConversionError("mode_suffix_mismatch", problem)


@dataclass
class Reply:
    """An assistant turn taken apart: ``<analysis>``, ``<think>`` (None when absent) and the answer."""

    analysis: str | None
    reasoning: str | None
    answer: str


def split_reply(text: str) -> Reply:
    """Leading ``<analysis>`` and ``<think>`` blocks, in that order, then the answer."""
    rest = text.strip()
    blocks: dict[str, str | None] = {"analysis": None, "think": None}
    for name, (open_, close) in (("analysis", ANALYSIS), ("think", THINK)):
        if rest.startswith(open_) and close in rest:
            inner, _, rest = rest[len(open_) :].partition(close)
            blocks[name] = inner.strip()
            rest = rest.strip()
    return Reply(blocks["analysis"], blocks["think"], rest)


def tag_problem(text: str) -> str | None:
    """Why the ``<think>``/``<analysis>`` tags of ``text`` are not balanced (None: they are).

    Every open tag needs its close tag, blocks do not nest, and a close tag needs an open one.
    """
    open_tag = None
    for m in _TAG.finditer(text):
        tag, closing = m.group(1), m.group(0).startswith("</")
        if closing and open_tag != tag:
            return f"'{m.group(0)}' at character {m.start()} closes no open <{tag}>"
        if not closing and open_tag is not None:
            return f"'<{tag}>' at character {m.start()} opens inside <{open_tag}>"
        open_tag = None if closing else tag
    return f"<{open_tag}> is never closed" if open_tag else None


def code_blocks(text: str) -> list[str]:
    """The fenced ```` ```python ```` blocks of an assistant turn."""
    return _CODE.findall(text)


def strip_code(text: str) -> str:
    return _CODE.sub(" ", text)


def infer_mode(messages: list[dict]) -> str:
    """A conversation's mode when the source does not say: a video part makes it video; a reply that
    opens with ``<analysis>`` auto_think; a ``<think>`` anywhere in a reply thinking; else non_thinking."""
    if any(p.get("type") == "video" for m in messages for p in parts_of(m.get("content"))):
        return "video"
    replies = [text_of(m.get("content")) for m in messages if m.get("role") == "assistant"]
    if replies and replies[-1].lstrip().startswith(ANALYSIS[0]):
        return "auto_think"
    if any(THINK[0] in r for r in replies):
        return "thinking"
    return "non_thinking"


def role_problem(messages: list[dict], mode: str | None = None) -> str | None:
    """Why the roles of a conversation make no sense as training data (None: they do).

    System turns only at the start; then a user turn; a user turn is answered by an assistant; a tool
    turn follows an assistant (or tool) turn; the last turn is the assistant's. Two assistant turns in a
    row only in think_with_image (its pre-execution form: code, then answer).
    """
    roles = [m.get("role") for m in messages]
    body = roles[next((i for i, r in enumerate(roles) if r != "system"), len(roles)) :]
    if "system" in body:
        turn = roles.index("system", len(roles) - len(body))
        return f"a system turn after the conversation started (turn {turn})"
    if not body:
        return "no user or assistant turn"
    if body[0] != "user":
        return f"the conversation starts with {_a(body[0])} turn, not a user turn"
    allowed = {"user": {"assistant"}, "assistant": {"user", "tool"}, "tool": {"assistant", "tool"}}
    if mode == "think_with_image":
        allowed["assistant"] = {"user", "tool", "assistant"}
    offset = len(roles) - len(body)
    for i, (a, b) in enumerate(itertools.pairwise(body)):
        if b not in allowed[a]:
            return f"turn {offset + i + 1} is {_a(b)} turn after {_a(a)} turn"
    if body[-1] != "assistant":
        return f"the last turn is {_a(body[-1])} turn, not the assistant's"
    return None


def _a(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


# ---------------------------------------------------------------- validators


def repetition(text: str, n: int = 8) -> tuple[float, int]:
    """``(share, grams)``: the share of word ``n``-grams of ``text`` that repeat an earlier one.

    A reply stuck in a loop ("Let me check again. ... Let me check again. ...") repeats whole sentences,
    so most of its 8-grams are repeats; ordinary prose and reasoning, even with set phrases, almost never
    repeat 8 words in a row.
    """
    words = text.lower().split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0.0, 0
    return 1.0 - len(set(grams)) / len(grams), len(grams)


def compression_ratio(text: str) -> float:
    """zlib-compressed size over raw size: prose is 0.3-0.6, a character loop ("!!!!", "hahaha") < 0.05."""
    raw = text.encode("utf-8", "surrogatepass")
    return len(zlib.compress(raw, 9)) / len(raw) if raw else 1.0


@dataclass
class Verdict:
    """What :func:`check_row` found: a rule's reason (None: every rule passed) and the repetition stats."""

    reason: str | None = None
    detail: str | None = None
    repeat: float = 0.0  # worst share of repeated word n-grams over assistant turns (code blocks left out)
    repeat_turn: int | None = None
    compression: float = 1.0  # lowest compression ratio over assistant turns of at least min_bytes
    compression_turn: int | None = None


def _messages(messages: str | None) -> tuple[list[dict] | None, str | None]:
    """Parse and check the shape of a ``messages`` column value: (messages, None) or (None, problem)."""
    if messages is None:
        return None, "messages is null"
    try:
        msgs = json.loads(messages)
    except ValueError as e:
        return None, f"not JSON: {e}"
    if not isinstance(msgs, list) or not msgs:
        return None, "not a non-empty JSON list of messages"
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            return None, f"message {i} is not an object with role and content"
        if m["role"] not in ROLES:
            return None, f"message {i}: unknown role {m['role']!r} (expected one of {', '.join(ROLES)})"
        c = m["content"]
        if isinstance(c, str):
            continue
        if not isinstance(c, list):
            return None, f"message {i}: content must be text or a list of parts"
        for p in c:
            kind = p.get("type") if isinstance(p, dict) else None
            if kind == "text" and isinstance(p.get("text"), str):
                continue
            if kind == "image" and isinstance(p.get("index"), int) and not isinstance(p["index"], bool):
                continue
            if kind == "video":
                continue
            return None, f"message {i}: bad content part {str(p)[:80]}"
    return msgs, None


def _final_reply(msgs: list[dict]) -> tuple[int, Reply]:
    i = len(msgs) - 1
    return i, split_reply(text_of(msgs[i]["content"]))


def _twi_problem(msgs: list[dict]) -> tuple[str, str] | None:
    """think_with_image after execution: image in, code that parses, its tool turn with an image, answer."""
    if not any(p.get("type") == "image" for m in msgs if m["role"] == "user" for p in parts_of(m["content"])):
        return "no_input_image", "no user turn shows an image to think with"
    code_turns = [
        (i, code_blocks(text_of(m["content"]))) for i, m in enumerate(msgs) if m["role"] == "assistant"
    ]
    code_turns = [(i, blocks) for i, blocks in code_turns if blocks]
    if not code_turns:
        return "no_code", "no assistant turn holds a ```python block"
    for i, blocks in code_turns:
        for code in blocks:
            try:
                ast.parse(code)
            except SyntaxError as e:
                return "code_does_not_parse", f"message {i}: {e.msg} (code line {e.lineno})"
    first = code_turns[0][0]
    if split_reply(text_of(msgs[first]["content"])).reasoning in (None, ""):
        return "missing_think", f"message {first}: the code turn has no <think>"
    for i, _ in code_turns:
        if i + 1 >= len(msgs) or msgs[i + 1]["role"] != "tool":
            return "no_tool_turn", f"message {i}: the code's output (a tool turn) does not follow it"
        if not any(p.get("type") == "image" for p in parts_of(msgs[i + 1]["content"])):
            return "no_tool_image", f"message {i + 1}: the tool turn holds no image"
    return None


def check_row(
    messages: str | None,
    mode: str | None,
    n_images: int = 0,
    n_frames: int = 0,
    *,
    ngram: int = 8,
    min_bytes: int = 256,
) -> Verdict:
    """Apply every structural rule to one row and measure repetition; thresholds are the caller's.

    Rules, in order (the first that fails names the reason): ``unknown_mode``, ``bad_messages`` (not a
    JSON list of role/content messages, unknown role, roles out of order, last turn not the assistant's),
    ``image_ref_out_of_range``, ``video_part_without_frames``, ``unbalanced_think_tags``,
    ``mode_suffix_mismatch``, then per mode: thinking ``missing_think``; non_thinking
    ``unexpected_think``; auto_think ``missing_analysis``; think_with_image ``no_input_image``,
    ``no_code``, ``code_does_not_parse``, ``missing_think``, ``no_tool_turn``, ``no_tool_image``;
    video ``no_video_part``; then ``empty_answer``.
    """
    v = Verdict()
    msgs, problem = _messages(messages)
    if msgs is not None:
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            text = strip_code(text_of(m["content"]))
            share, grams = repetition(text, ngram)
            if grams >= ngram and share > v.repeat:
                v.repeat, v.repeat_turn = share, i
            if len(text.encode("utf-8", "surrogatepass")) >= min_bytes:
                ratio = compression_ratio(text)
                if ratio < v.compression:
                    v.compression, v.compression_turn = ratio, i
    found = _rule(msgs, problem, mode, n_images, n_frames)
    if found:
        v.reason, v.detail = found
    return v


def _rule(
    msgs: list[dict] | None, problem: str | None, mode: str | None, n_images: int, n_frames: int
) -> tuple[str, str] | None:
    if mode not in MODES:
        return "unknown_mode", f"mode {mode!r} (expected one of {', '.join(MODES)})"
    if msgs is None:
        return "bad_messages", problem or "no messages"
    problem = role_problem(msgs, mode)
    if problem:
        return "bad_messages", problem
    for i, m in enumerate(msgs):
        for p in parts_of(m["content"]):
            if p["type"] == "image" and not 0 <= p["index"] < n_images:
                return (
                    "image_ref_out_of_range",
                    f"message {i} refers to image {p['index']}, the row has {n_images}",
                )
            if p["type"] == "video" and n_frames == 0:
                return "video_part_without_frames", f"message {i} has a video part but the row has no frames"
    for i, m in enumerate(msgs):
        if m["role"] == "assistant":
            problem = tag_problem(text_of(m["content"]))
            if problem:
                return "unbalanced_think_tags", f"message {i}: {problem}"
    problem = suffix_problem(msgs, mode)
    if problem:
        return "mode_suffix_mismatch", problem
    last, reply = _final_reply(msgs)
    if mode == "thinking" and not reply.reasoning:
        return "missing_think", f"message {last}: the reply does not open with a non-empty <think> block"
    if mode == "non_thinking":
        for i, m in enumerate(msgs):
            if m["role"] == "assistant" and _TAG.search(text_of(m["content"])):
                return "unexpected_think", f"message {i}: a non_thinking reply holds think or analysis tags"
    if mode == "auto_think" and not reply.analysis:
        return (
            "missing_analysis",
            f"message {last}: the reply does not open with a non-empty <analysis> block",
        )
    if mode == "think_with_image":
        found = _twi_problem(msgs)
        if found:
            return found
    if mode == "video" and not any(p["type"] == "video" for m in msgs for p in parts_of(m["content"])):
        return "no_video_part", 'a video row without a {"type": "video"} part'
    if not reply.answer:
        return "empty_answer", f"message {last}: no answer after the think/analysis blocks"
    return None


def validate(
    messages: str | None,
    mode: str | None,
    n_images: int = 0,
    n_frames: int = 0,
    *,
    ngram: int = 8,
    max_repeat: float = 0.3,
    min_compression: float = 0.1,
    min_bytes: int = 256,
) -> tuple[str, str] | None:
    """``(reason, detail)`` when a row breaks a rule of its mode or degenerates into repetition; None if good.

    ``degenerate_repetition``: an assistant turn (code blocks left out) where more than ``max_repeat`` of
    the word ``ngram``-grams repeat an earlier one, or whose zlib compression ratio is below
    ``min_compression`` (turns of at least ``min_bytes`` bytes: character loops have no words to repeat).
    """
    v = check_row(messages, mode, n_images, n_frames, ngram=ngram, min_bytes=min_bytes)
    if v.reason:
        return v.reason, v.detail or ""
    return degenerate(v, ngram=ngram, max_repeat=max_repeat, min_compression=min_compression)


def degenerate(
    v: Verdict, *, ngram: int, max_repeat: float, min_compression: float
) -> tuple[str, str] | None:
    """The repetition thresholds applied to a :class:`Verdict` (a separate step: thresholds change freely)."""
    if v.repeat > max_repeat:
        return "degenerate_repetition", (
            f"message {v.repeat_turn}: {v.repeat:.0%} of word {ngram}-grams repeat (max {max_repeat:.0%})"
        )
    if v.compression < min_compression:
        return "degenerate_repetition", (
            f"message {v.compression_turn}: compresses to {v.compression:.1%} of "
            f"its size (min {min_compression:.0%})"
        )
    return None
