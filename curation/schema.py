"""The row: one Arrow schema for every modality.

Every reader yields tables in :data:`ROW_SCHEMA`; every stage reads and appends columns of it;
every sink writes it. Keeping one schema (nulls where a modality has no value) is what lets Ray
Data concatenate blocks from different sources and lets polars read a whole pool at once.
Stages add ``score_<name>`` columns (float64) on top; see :func:`score_column`.

The ``id`` is content-derived (128-bit xxh3 of modality, text and media bytes), so the same sample
has the same id in Parquet and WebDataset, on a laptop and on a cluster, and exact duplicates share it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import pyarrow as pa
import xxhash

MODALITIES = ("image_text", "interleaved", "video", "text", "sft")

ROW_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("source", pa.string()),
        pa.field("modality", pa.string()),
        pa.field("text", pa.string()),
        pa.field("image", pa.binary()),
        pa.field("image_format", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("texts", pa.list_(pa.string())),
        pa.field("images", pa.list_(pa.binary())),
        pa.field("video", pa.string()),
        pa.field("frames", pa.list_(pa.binary())),
        pa.field("frame_ts", pa.list_(pa.float64())),
        # A clip of ``video`` (a shot, with ``video: {shots: true}`` on the source): its span in seconds of
        # the source video; frame_ts stay absolute (seconds of the source), so start at clip_start.
        pa.field("clip_start", pa.float64()),
        pa.field("clip_end", pa.float64()),
        # The video itself, with ``video: {clip: true}`` on the source: the file's bytes, or a shot re-encoded
        # (H.264 MP4) from its cut; its extension in meta.clip_ext. Frames are kept beside it.
        pa.field("video_bytes", pa.binary()),
        pa.field("messages", pa.string()),
        pa.field("mode", pa.string()),
        pa.field("meta", pa.string()),
        pa.field("ocr_text", pa.string()),
        pa.field("dense_caption", pa.string()),
        pa.field("lang", pa.string()),
        pa.field("source_uri", pa.string()),
        pa.field("source_offset", pa.int64()),
        pa.field("recipe_hash", pa.string()),
        # Set when a stage rejects a row. Rows are never dropped mid-pipeline: they travel with their
        # reason to the end, where the sink splits them into shards and rejects.
        pa.field("reject_stage", pa.string()),
        pa.field("reject_reason", pa.string()),
        pa.field("reject_detail", pa.string()),
    ]
)

REJECT_COLUMNS = ("reject_stage", "reject_reason", "reject_detail")

# Row columns no reader fills: stages write them (image_decode the size and format, ocr the text,
# caption_language the language, dense_caption the caption). A stage that reads one needs its writer earlier
# in the recipe (curation.stage.check_reads), or a pool source that carries it.
STAGE_COLUMNS = ("image_format", "width", "height", "ocr_text", "dense_caption", "lang")


def score_column(stage_name: str) -> str:
    """Name of the persisted score column of a stage: thresholds change without recomputing it."""
    return f"score_{stage_name}"


def row_id(modality: str, text: bytes | str | None = None, media: Iterable[bytes | None] = ()) -> str:
    """128-bit content hash (32 hex chars) of a row's modality, text and media bytes.

    >>> row_id("text", "hello") == row_id("text", b"hello")
    True
    """
    h = xxhash.xxh3_128()
    h.update(modality.encode())
    h.update(b"\x00")
    if text is not None:
        h.update(text.encode("utf-8", "surrogateescape") if isinstance(text, str) else text)
    for blob in media:
        h.update(b"\x01")
        if blob is not None:
            h.update(len(blob).to_bytes(8, "little"))
            h.update(blob)
    return h.hexdigest()


def from_rows(rows: list[dict[str, Any]]) -> pa.Table:
    """Build a :data:`ROW_SCHEMA` table from dicts; missing keys become nulls.

    Most columns are null for any one source; building those as null arrays directly makes this about
    3x faster than converting every list (it is on the read path of every row).
    """
    n = len(rows)
    cols = []
    for f in ROW_SCHEMA:
        values = [r.get(f.name) for r in rows]
        cols.append(pa.array(values, f.type) if any(v is not None for v in values) else pa.nulls(n, f.type))
    return pa.Table.from_arrays(cols, schema=ROW_SCHEMA)


def conform(table: pa.Table, schema: pa.Schema = ROW_SCHEMA) -> pa.Table:
    """``table`` with exactly ``schema``'s columns in its order: missing ones added as nulls, others cast."""
    cols = []
    for f in schema:
        if f.name not in table.column_names:
            cols.append(pa.nulls(table.num_rows, f.type))
        else:
            col = table.column(f.name)
            cols.append(col if col.type == f.type else col.cast(f.type))
    return pa.Table.from_arrays(cols, schema=schema)


def json_meta(obj: dict[str, Any] | None) -> str | None:
    """Serialise source metadata for the ``meta`` column (sorted keys: stable bytes, stable ids)."""
    if not obj:
        return None
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str)


def message_texts(messages: str) -> list[str]:
    """Text parts of an SFT ``messages`` JSON list (string contents and ``{"type": "text"}`` parts).

    Image and video parts are not text: they refer to the row's own media columns. Raises ValueError for
    JSON that is not a list of messages.

    >>> message_texts('[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Why?"}]}]')
    ['Why?']
    """
    try:
        msgs = json.loads(messages)
    except json.JSONDecodeError as e:
        raise ValueError(f"messages is not JSON: {e}") from e
    if not isinstance(msgs, list):
        raise ValueError(f"messages must be a JSON list, got {type(msgs).__name__}")  # noqa: TRY004 (bad data)
    out = []
    for m in msgs:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, str):
            out.append(content)
        elif isinstance(content, list):
            out.extend(
                p["text"]
                for p in content
                if isinstance(p, dict)
                and p.get("type") == "text"
                and isinstance(p.get("text"), str)
                and p["text"]
            )
    return out
