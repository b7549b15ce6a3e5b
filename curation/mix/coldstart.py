"""The five cold-start modes in one place: what each mode's conversation looks like, converters that
build it from the formats people have, and validators that check it.

``docs/sft-format.md`` is the contract; this module is its only implementation. Readers
(``format: sharegpt`` / ``format: qa``), the ``sft_validate`` stage, the sample corpus and the
mixture builder all go through it, so a suffix or a tag is spelled once.

Building a row's messages::

    >>> msgs = build_messages("thinking", "What colour is the car?", "Red.", reasoning="The car is red.", n_images=1)
    >>> msgs[0]["content"][-1]["text"], msgs[1]["content"]
    ('What colour is the car? /think', '<think>The car is red.</think>\\n\\nRed.')

Checking one (``None``: the row is good; otherwise the reject reason and a detail)::

    >>> validate(dump_messages(msgs), "thinking", n_images=1)
    >>> validate(dump_messages(msgs), "non_thinking", n_images=1)[0]
    'mode_suffix_mismatch'
"""

from __future__ import annotations

import ast
import base64
import itertools
import json
import re
import zlib
from dataclasses import dataclass, field
from typing import Any

MODES = ("thinking", "non_thinking", "auto_think", "think_with_image", "video")
ROLES = ("system", "user", "assistant", "tool")
#: Keye-VL's chat format: the last user text ends with the suffix (auto_think has none).
SUFFIXES = {"thinking": "/think", "non_thinking": "/no_think"}
THINK = ("<think>", "</think>")
ANALYSIS = ("<analysis>", "</analysis>")

# Role names of LLaVA / ShareGPT / OpenAI / llama-factory data, mapped to ours.
ROLE_ALIASES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "model": "assistant",
    "system": "system",
    "tool": "tool",
    "observation": "tool",
    "function": "tool",
    "ipython": "tool",
}

#: Record fields each converter reads, by source format (a source's ``fields:`` overrides them; ``a;b``
#: means the first of ``a`` and ``b`` the record has). ``image_root`` (not set by default) is the folder
#: that image and video paths are relative to, itself relative to the source file.
SOURCE_FIELDS = {
    "sharegpt": {
        "conversations": "conversations",
        "messages": "messages",
        "images": "images;image",
        "video": "video;videos",
        "mode": "mode",
        "system": "system",
    },
    "qa": {
        "question": "question",
        "answer": "answer",
        "reasoning": "reasoning",
        "analysis": "analysis",
        "image": "image;images",
        "video": "video",
        "code": "code",
        "mode": "mode",
        "system": "system",
    },
}
FIELD_OPTIONS = ("image_root",)

_TAG = re.compile(r"</?(think|analysis)>")
_SUFFIX = re.compile(r"(?:^|\s)(/think|/no_think)\s*$")
_CODE = re.compile(r"```(?:python|py)[ \t]*\n(.*?)```", re.DOTALL)
_PLACEHOLDER = re.compile(r"(<image>|<video>)")


class ConversionError(ValueError):
    """A source record that cannot become a conversation; ``reason`` is the ingest reject reason."""

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
        return f"a system turn after the conversation started (turn {roles.index('system', len(roles) - len(body))})"
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


# ---------------------------------------------------------------- converters (source records to messages)


@dataclass
class Converted:
    """A source record as a conversation: messages, mode, and the media the messages refer to.

    ``images`` holds references as the record gave them (bytes, ``{bytes, path}`` structs, paths, data
    URIs) in index order; the reader loads them. ``used`` names the record keys consumed (the rest is meta).
    """

    messages: list[dict]
    mode: str
    images: list[Any] = field(default_factory=list)
    video: str | None = None
    used: set[str] = field(default_factory=set)


def _pick(record: dict, names: str | None) -> tuple[str | None, Any]:
    """The first of ``names`` (``a;b;c``) the record has a non-null value for: ``(key, value)``."""
    for name in (names or "").split(";"):
        if name and record.get(name) is not None:
            return name, record[name]
    return None, None


def _string(value: Any, what: str) -> str | None:
    """A text field: None stays None, numbers become text, anything else is a malformed record."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise ConversionError("malformed_row", f"'{what}' must be text, got {type(value).__name__}")


def _mode_of(record: dict, fields: dict[str, str], default_mode: str | None) -> tuple[str | None, str | None]:
    key, mode = _pick(record, fields.get("mode"))
    if mode is None:
        return key, default_mode
    if mode not in MODES:
        raise ConversionError("unknown_mode", f"'{key}' is {mode!r} (expected one of {', '.join(MODES)})")
    return key, mode


def _media_list(value: Any) -> list[Any]:
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]


def _split_placeholders(text: str) -> list[dict]:
    """``"<image>\\nWhat is this?"`` -> an image placeholder part, then the text part."""
    out = []
    for piece in _PLACEHOLDER.split(text):
        if piece in ("<image>", "<video>"):
            out.append({"type": piece[1:-1], "_slot": True})
        elif piece.strip():
            out.append({"type": "text", "text": piece.strip()})
    return out


def _ref(part: dict, *keys: str) -> Any:
    for k in keys:
        v = part.get(k)
        if isinstance(v, dict):  # OpenAI image_url: {"url": ...}
            v = v.get("url")
        if v is not None:
            return v
    return None


def _parts(content: Any, turn: int) -> list[dict]:
    """Content in any of the usual shapes as our parts; media parts without an index are marked
    ``_slot`` (a placeholder, to be given the next image) or carry ``_ref`` (an inline reference)."""
    if content is None:
        return []
    if isinstance(content, str):
        return _split_placeholders(content)
    if not isinstance(content, list):
        raise ConversionError(
            "malformed_row",
            f"turn {turn}: content must be text or a list of parts, got {type(content).__name__}",
        )
    out: list[dict] = []
    for part in content:
        if isinstance(part, str):
            out += _split_placeholders(part)
            continue
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            out += _split_placeholders(_string(part.get("text"), f"turn {turn} text") or "")
        elif kind in ("image", "image_url"):
            index, ref = part.get("index"), _ref(part, "image", "image_url", "url", "path")
            if index is not None and (not isinstance(index, int) or isinstance(index, bool)):
                raise ConversionError(
                    "malformed_row", f"turn {turn}: image index {index!r} is not an integer"
                )
            out.append(
                {"type": "image", "index": index}
                if index is not None
                else {"type": "image", "_ref": ref}
                if ref is not None
                else {"type": "image", "_slot": True}
            )
        elif kind == "video":
            ref = _ref(part, "video", "url", "path")
            out.append(
                {"type": "video", "_ref": ref} if ref is not None else {"type": "video", "_slot": True}
            )
        else:
            raise ConversionError("malformed_row", f"turn {turn}: unknown content part {str(part)[:80]}")
    return out


def _place_media(messages: list[dict], images: list[Any], video: Any) -> tuple[list[Any], str | None]:
    """Give placeholder parts their media, as LLaVA does; returns (image references in index order, video).

    The i-th image placeholder is ``images[i]``; explicit ``{"type": "image", "index": k}`` parts are
    kept as they are (they already refer to ``images``); inline references are appended after the
    record's images. A record with images (or a video) but no placeholder gets them at the start of
    its first user turn. One video per row. LLaVA-Video writes ``<image>`` for its video: a record
    with a video, no images and one ``<image>`` placeholder means the video.
    """
    parts = [p for m in messages for p in m["content"]]
    img_slots = [p for p in parts if p["type"] == "image" and p.get("_slot")]
    vid_parts = [p for p in parts if p["type"] == "video"]
    if video is not None and not images and not vid_parts and len(img_slots) == 1:
        img_slots[0]["type"] = "video"
        vid_parts, img_slots = img_slots, []
    explicit = any(p["type"] == "image" and p.get("index") is not None for p in parts)
    if img_slots and len(img_slots) != len(images):
        raise ConversionError(
            "placeholder_mismatch", f"{len(img_slots)} <image> placeholder(s) for {len(images)} image(s)"
        )
    refs = list(images)
    for i, p in enumerate(img_slots):
        p.pop("_slot")
        p["index"] = i
    for p in parts:
        if p["type"] == "image" and "_ref" in p:
            p["index"] = len(refs)
            refs.append(p.pop("_ref"))
    first_user = next((m for m in messages if m["role"] == "user"), None)
    lead: list[dict] = []
    if images and not img_slots and not explicit:
        lead += [{"type": "image", "index": i} for i in range(len(images))]
    inline = [p.pop("_ref") for p in vid_parts if "_ref" in p]
    if len(vid_parts) > 1 or (inline and video is not None):
        raise ConversionError("too_many_videos", "more than one video (a row holds one)")
    video = inline[0] if inline else video
    if vid_parts and video is None:
        raise ConversionError("placeholder_mismatch", "a video placeholder but no video")
    for p in vid_parts:
        p.pop("_slot", None)
    if video is not None and not vid_parts:
        lead.append({"type": "video"})
    if lead:
        if first_user is None:
            raise ConversionError("bad_role_order", "media but no user turn to put them in")
        first_user["content"][:0] = lead
    return refs, video


def _finish(messages: list[dict]) -> None:
    """Content with one text part and nothing else becomes a plain string (the doc's example form)."""
    for m in messages:
        c = m["content"]
        if not c:
            m["content"] = ""
        elif len(c) == 1 and c[0]["type"] == "text":
            m["content"] = c[0]["text"]


def from_conversation(record: dict, fields: dict[str, str], default_mode: str | None = None) -> Converted:
    """A LLaVA (``conversations`` of ``{from, value}``) or ShareGPT/OpenAI (``messages`` of ``{role,
    content}``) record as a conversation.

    ``<image>`` placeholders become image parts in place (see :func:`_place_media`); the mode comes
    from the record's ``mode`` field, else ``default_mode`` (the source's), else :func:`infer_mode`;
    the mode's suffix is added to the last user text. Raises :class:`ConversionError`.
    """
    used: set[str] = set()
    key, turns = _pick(record, fields.get("conversations"))
    if turns is None:
        key, turns = _pick(record, fields.get("messages"))
    if turns is None:
        raise ConversionError(
            "empty_conversation",
            f"no '{fields.get('conversations')}' or '{fields.get('messages')}' in the record",
        )
    if not isinstance(turns, list):
        raise ConversionError("malformed_row", f"'{key}' must be a list of turns, got {type(turns).__name__}")
    if not turns:
        raise ConversionError("empty_conversation", f"'{key}' is an empty list")
    used.add(key)
    messages: list[dict] = []
    skey, system = _pick(record, fields.get("system"))
    if system is not None:
        used.add(skey)
        messages.append({"role": "system", "content": [{"type": "text", "text": _string(system, skey)}]})
    for j, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise ConversionError("malformed_row", f"turn {j} is not an object: {str(turn)[:80]}")
        raw_role = turn.get("from", turn.get("role"))
        role = ROLE_ALIASES.get(str(raw_role).lower()) if isinstance(raw_role, str) else None
        if role is None:
            raise ConversionError(
                "unknown_role",
                f"turn {j}: role {raw_role!r} (expected one of {', '.join(sorted(ROLE_ALIASES))})",
            )
        messages.append({"role": role, "content": _parts(turn.get("value", turn.get("content")), j)})
    ikey, images = _pick(record, fields.get("images"))
    vkey, video = _pick(record, fields.get("video"))
    used |= {k for k in (ikey, vkey) if k}
    videos = _media_list(video)
    if len(videos) > 1:
        raise ConversionError("too_many_videos", f"'{vkey}' lists {len(videos)} videos; a row holds one")
    refs, video = _place_media(messages, _media_list(images), videos[0] if videos else None)
    _finish(messages)
    mkey, mode = _mode_of(record, fields, default_mode)
    used |= {mkey} - {None}
    mode = mode or infer_mode(messages)
    problem = role_problem(messages, mode)
    if problem:
        raise ConversionError("bad_role_order", problem)
    apply_suffix(messages, mode)
    return Converted(messages, mode, refs, _video_ref(video), used)


def _video_ref(video: Any) -> str | None:
    if video is None or isinstance(video, str):
        return video
    raise ConversionError("malformed_row", f"a video must be a path or URI, got {type(video).__name__}")


def from_qa(record: dict, fields: dict[str, str], default_mode: str | None = None) -> Converted:
    """A question/answer table row (question, answer, reasoning, analysis, image, video, code, mode)
    as a conversation.

    Mode: the row's ``mode``, else ``default_mode``, else inferred: code makes think_with_image, a
    video video, an analysis auto_think, a reasoning thinking, else non_thinking. A missing answer
    becomes an empty one (the validator rejects it as ``empty_answer``).
    """
    got: dict[str, Any] = {}
    used: set[str] = set()
    for name in ("question", "answer", "reasoning", "analysis", "code", "system", "image", "video"):
        key, value = _pick(record, fields.get(name))
        if key:
            used.add(key)
        got[name] = value if name in ("image", "video") else _string(value, key or name)
        if name in ("reasoning", "analysis", "code") and got[name] is not None and not got[name].strip():
            got[name] = None  # an empty optional column is an absent one
    if not (got["question"] or "").strip():
        raise ConversionError("empty_conversation", f"no question in '{fields.get('question')}'")
    videos = _media_list(got["video"])
    if len(videos) > 1:
        raise ConversionError("too_many_videos", f"{len(videos)} videos; a row holds one")
    mkey, mode = _mode_of(record, fields, default_mode)
    used |= {mkey} - {None}
    if mode is None:
        mode = (
            "think_with_image"
            if got["code"]
            else "video"
            if videos
            else "auto_think"
            if got["analysis"]
            else "thinking"
            if got["reasoning"]
            else "non_thinking"
        )
    # The question may carry its own <image> placeholders: it goes through the same placement as LLaVA's.
    messages = build_messages(
        mode,
        got["question"],
        got["answer"] or "",
        reasoning=got["reasoning"],
        analysis=got["analysis"],
        code=got["code"],
        system=got["system"],
    )
    for m in messages:
        m["content"] = (
            _parts(m["content"], 0) if m["role"] == "user" else [{"type": "text", "text": m["content"]}]
        )
    refs, video = _place_media(messages, _media_list(got["image"]), videos[0] if videos else None)
    _finish(messages)
    return Converted(messages, mode, refs, _video_ref(video), used)


def image_bytes(ref: Any) -> bytes | None:
    """Bytes of an inline image reference (bytes, ``{bytes, path}`` struct, data URI); None for a path."""
    if isinstance(ref, (bytes, bytearray, memoryview)):
        return bytes(ref)
    if isinstance(ref, dict):
        return bytes(ref["bytes"]) if ref.get("bytes") is not None else None
    if isinstance(ref, str) and ref.startswith("data:"):
        header, _, payload = ref.partition(",")
        return base64.b64decode(payload) if header.endswith(";base64") else payload.encode()
    return None


def image_path(ref: Any) -> str | None:
    """The path or URI of an image reference that must be read from storage."""
    if isinstance(ref, str) and not ref.startswith("data:"):
        return ref
    if isinstance(ref, dict) and ref.get("bytes") is None and isinstance(ref.get("path"), str):
        return ref["path"]
    return None


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
    """think_with_image after execution: image in, code that parses, its tool turn with an image, an answer."""
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
