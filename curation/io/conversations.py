"""Source conversations as the target chat format: the ``sharegpt`` and ``qa`` formats of ``modality: sft``.

LLaVA (``conversations`` of ``{from, value}``), ShareGPT/OpenAI (``messages`` of ``{role, content}``) and
question/answer tables become messages of one of the five modes (:mod:`curation.target.chat`), with the
media they refer to; :mod:`curation.io.readers` reads the records and loads the media.

Why it lives in ``io/`` and not with the chat format: it is about the formats people's data comes in
(role aliases, field names, ``<image>`` placeholders, inline image references), which only ingest and the
recipe's checks of a source's ``fields:`` need. The format it produces, and its errors, are the
contract's (:class:`curation.target.chat.ConversionError`).

    >>> conv = from_qa({"question": "What colour is the car?", "answer": "Red."}, SOURCE_FIELDS["qa"])
    >>> conv.mode, conv.messages[0]["content"]
    ('non_thinking', 'What colour is the car? /no_think')
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass, field
from typing import Any

from curation.target.chat import (
    MODES,
    ConversionError,
    apply_suffix,
    build_messages,
    infer_mode,
    role_problem,
)

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
_PLACEHOLDER = re.compile(r"(<image>|<video>)")

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
