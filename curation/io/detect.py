"""Guess sources from paths: what ``curation audit --corpus PATH...`` reads without a recipe.

A path may be a pool folder (it has ``manifest.json``: its Parquet shards are read), a file, a glob, or
a folder (every data file under it). Each file is recognised by its extension and a look inside:

- ``.tar``: WebDataset; image_text when a sample has an image member, else text.
- ``.parquet``: a pool shard when it has ``id`` and ``modality`` columns; interleaved with list
  columns ``texts``/``images``; image_text with an image column (bytes or ``{bytes, path}``) and a
  caption column; text with a text column. The per-shard metadata Parquet that img2dataset writes next
  to each tar (same name) is skipped.
- ``.jsonl``/``.json``: the keys of the first object decide, the same way (``image`` path column;
  ``video`` path column: video, keyframes sampled at ingest).

Files that are not data (images next to a JSONL, ``.json`` sidecars, stats) are skipped; a data file
whose layout is not recognised is reported with what was found, never guessed.
"""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict

import pyarrow as pa
import pyarrow.parquet as pq

from curation.io import fs as cfs
from curation.io.tar import iter_tar
from curation.recipe import SourceSpec
from curation.spec import LimitsSpec

log = logging.getLogger(__name__)

_LIMITS = LimitsSpec()  # what a look inside may hold: the defaults a detected source is read with

_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_CAPTION_KEYS = ("caption", "text", "txt", "alt", "alt_text", "TEXT")
_TEXT_KEYS = ("text", "content", "raw_content", "caption")
_IMAGE_KEYS = ("image", "jpg", "img", "image_path", "file_name")


class UndetectedSource(ValueError):
    """A path holds data whose layout cannot be recognised; the message says what was found."""


def detect_sources(paths: list[str]) -> list[SourceSpec]:
    """One source per (format, modality, fields) found under ``paths``, in path order."""
    groups: dict[tuple, list[str]] = defaultdict(list)
    problems = []
    for path in paths:
        files = _files(path)
        if not files:
            problems.append(f"{path}: no files")
        tars = {f[:-4] for f in files if f.endswith(".tar")}
        for f in files:
            ext = f.rsplit(".", 1)[-1].lower() if "." in os.path.basename(f) else ""
            if ext == "parquet" and f[: -len(".parquet")] in tars:
                continue  # img2dataset's per-shard metadata beside the tar
            if ext not in ("tar", "parquet", "jsonl", "json", "ndjson"):
                continue
            if ext == "json" and os.path.basename(f) in (
                "manifest.json",
                "stats.json",
                "report.json",
                "corpus.json",
            ):
                continue
            try:
                fmt, modality, fields = _sniff(f, ext)
            except UndetectedSource as e:
                problems.append(str(e))
                continue
            except (
                OSError,
                ValueError,
                RecursionError,
                pa.ArrowException,
            ) as e:  # damaged: a tar cut short...
                problems.append(f"{f}: cannot read it ({type(e).__name__}: {e})")
                continue
            groups[(fmt, modality, json.dumps(fields, sort_keys=True))].append(f)
    if problems:
        raise UndetectedSource(
            "cannot read these as a corpus:\n"
            + "\n".join(f"  - {p}" for p in problems)
            + "\n  (pass the data folders or files only, or use `curation run` with a recipe "
            "that names format, modality and fields)"
        )
    sources = []
    for k, ((fmt, modality, fields), files) in enumerate(groups.items()):
        sources.append(
            SourceSpec(
                name=f"{fmt}_{modality}_{k}",
                format=fmt,
                modality=modality,
                paths=files,
                fields=json.loads(fields),
            )
        )
    return sources


def _files(path: str) -> list[str]:
    fs, p = cfs.filesystem(path)
    if not any(ch in p for ch in "*?["):
        import pyarrow.fs as pafs

        info = fs.get_file_info(p)
        if (
            info.type == pafs.FileType.Directory
            and fs.get_file_info(f"{p}/manifest.json").type == pafs.FileType.File
        ):
            return cfs.expand(cfs.join(path, "shards/*.parquet"))  # a pool: its shards, not its rejects
    return cfs.expand(path)


def _sniff(uri: str, ext: str) -> tuple[str, str, dict[str, str]]:
    if ext == "tar":
        with cfs.open_input(uri) as stream:
            exts = set()
            for k, (name, _) in enumerate(iter_tar(stream, max_member=_LIMITS.max_member_bytes)):
                exts.add(name.rsplit(".", 1)[-1].lower())
                if k >= 20:
                    break
        if exts & set(_IMAGE_EXTS):
            return "webdataset", "image_text", {}
        if "txt" in exts:
            return "webdataset", "text", {}
        raise UndetectedSource(
            f"{uri}: a tar without images or .txt members (found: {_listed(sorted(exts))})"
        )
    if ext == "parquet":
        with cfs.open_random_access(uri) as f:
            schema = pq.ParquetFile(f).schema_arrow
        names = schema.names
        if "id" in names and "modality" in names:
            return "pool", "mixed", {}
        if "texts" in names and "images" in names:
            return "parquet", "interleaved", {}
        image = next(
            (c for c in names if _is_image_type(schema.field(c).type) and c in _IMAGE_KEYS), None
        ) or next((c for c in names if _is_image_type(schema.field(c).type)), None)
        text = next((c for c in _CAPTION_KEYS if c in names), None)
        if image:
            fields = {"image": image}
            if text:
                fields["text"] = text
            return "parquet", "image_text", fields
        text = next((c for c in _TEXT_KEYS if c in names), None)
        if text:
            return "parquet", "text", {"text": text}
        raise UndetectedSource(
            f"{uri}: Parquet with columns {_listed(names[:12])}: no image, texts/images or "
            "text column recognised"
        )
    with cfs.open_input(uri) as stream:
        first = None
        for line in cfs.iter_lines(stream, max_line=_LIMITS.max_line_bytes):
            if not isinstance(line, cfs.Skipped) and line.strip():  # a line too long to hold: the next one
                first = line
                break
    if first is None:
        raise UndetectedSource(f"{uri}: empty")
    try:
        obj = json.loads(first)
    except ValueError as e:
        raise UndetectedSource(f"{uri}: the first line is not JSON ({e})") from None
    if not isinstance(obj, dict):
        raise UndetectedSource(f"{uri}: the first line is a JSON {type(obj).__name__}, not an object")
    keys = list(obj)
    if "texts" in keys and "images" in keys:
        return "jsonl", "interleaved", {}
    if "video" in keys:
        text = next((k for k in _CAPTION_KEYS if k in keys), None)
        return "jsonl", "video", {"video": "video", **({"text": text} if text else {})}
    image = next((k for k in _IMAGE_KEYS if k in keys), None)
    text = next((k for k in _CAPTION_KEYS if k in keys), None)
    if image:
        return "jsonl", "image_text", {"image": image, **({"text": text} if text else {})}
    text = next((k for k in _TEXT_KEYS if k in keys), None)
    if text:
        return "jsonl", "text", {"text": text}
    raise UndetectedSource(
        f"{uri}: JSON objects with keys {_listed(keys[:12])}: no image, texts/images or text key recognised"
    )


def _listed(names: list[str]) -> str:
    """Names found in a file, one line: a name with a newline or other control character is quoted."""
    return ", ".join(n if n.isprintable() else repr(n) for n in names)


def _is_image_type(t: pa.DataType) -> bool:
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return True
    return pa.types.is_struct(t) and any(t.field(i).name == "bytes" for i in range(t.num_fields))
