"""Benchmark registries: which evaluation sets to decontaminate against, and where their fields are.

A registry is YAML, loaded and validated like a pipeline recipe (safe loading, ``--set`` overrides,
``${var}`` interpolation, every problem reported with file and key)::

    vars: {corpus: ./sample}
    benchmarks:
      - name: sample_vqa
        paths: ["${corpus}/benchmark/vqa.parquet"]          # Parquet or JSONL, local or s3://
        fields: {id: item_id, question: question, options: options, answer: answer, image: image}

``fields`` maps the roles below to the file's column names; roles a benchmark does not have are left
out. Images may be bytes, ``{"bytes": ...}`` structs (Hugging Face exports) or paths relative to the file.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from curation.io import fs as cfs
from curation.io import refs
from curation.spec import LimitsSpec, RecipeError, build, check_paths_exist, load_yaml

log = logging.getLogger(__name__)

ROLES = ("id", "question", "options", "answer", "context", "image", "images", "video")
DEFAULT_FIELDS = {
    "id": "id",
    "question": "question",
    "options": "options",
    "answer": "answer",
    "image": "image",
}


@dataclass
class BenchmarkSpec:
    name: str
    paths: list[str]
    fields: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_FIELDS))
    format: str = "auto"  # auto (by extension) | parquet | jsonl
    # Where image and video paths in the benchmark's rows may point (curation.io.refs, as for corpus sources):
    # the benchmark file's folder, these folders or s3:// prefixes; absolute paths only with allow_absolute.
    media_roots: list[str] = field(default_factory=list)
    allow_absolute: bool = False


@dataclass
class BenchmarkItem:
    """One evaluation item, as the matchers see it."""

    benchmark: str
    item_id: str
    question: str
    options: list[str]
    answer: str | None  # the answer text: a letter or index into the options is resolved to the option
    context: str | None
    images: list[bytes]
    video: str | None  # resolved URI of the item's video
    origin: str  # file#row, for reports
    issues: list[str] = field(default_factory=list)  # parts that could not be read (an image, the video)

    @property
    def key(self) -> str:
        """``benchmark:item_id``, unique across a registry."""
        return f"{self.benchmark}:{self.item_id}"

    @property
    def segments(self) -> list[str]:
        """What text matching looks for, one segment per field: context, question, each option, answer.

        Kept apart because a leaked copy puts labels between them ("Options:", "A)", "Answer:"), so
        n-grams spanning two fields of a concatenation would never match.
        """
        parts = [self.context or "", self.question, *self.options]
        if self.answer and self.answer not in self.options:
            parts.append(self.answer)
        return [p for p in parts if p and p.strip()]

    @property
    def text(self) -> str:
        """The segments as one text (for display and near-duplicate matching)."""
        return "\n".join(self.segments)


@dataclass
class NotIndexed:
    """An item, or one part of it, that matching cannot use; listed in audit reports."""

    benchmark: str
    item: str  # item id, or file#row when the row has no id
    part: str  # "item", "text", "image 0", "video", ...
    reason: str

    def __str__(self) -> str:
        return f"{self.benchmark}: {self.item}: {self.part} not indexed: {self.reason}"


def load_benchmarks(
    path: str | Path, overrides: list[str] = (), check_paths: bool = True
) -> list[BenchmarkSpec]:
    """Load and validate a registry; raise :class:`~curation.spec.RecipeError` listing every problem."""
    file = str(path)
    raw = load_yaml(path, overrides, "a mapping with a list of benchmarks")
    problems: list[str] = []
    for key in raw:
        if key not in ("vars", "benchmarks"):
            problems.append(f"{key}: unknown key (expected benchmarks, vars)")
    entries = raw.get("benchmarks")
    if not isinstance(entries, list) or not entries:
        problems.append("benchmarks: expected a non-empty list of {name, paths, fields}")
        entries = []
    specs, names = [], set()
    for i, entry in enumerate(entries):
        spec = build(BenchmarkSpec, entry, f"benchmarks.{i}", problems)
        if spec is None:
            continue
        if spec.name in names:
            problems.append(f"benchmarks.{i}.name: '{spec.name}' is used twice")
        names.add(spec.name)
        for role in spec.fields:
            if role not in ROLES:
                problems.append(f"benchmarks.{i}.fields.{role}: unknown role (expected {', '.join(ROLES)})")
        for role in ("id", "question"):
            if role not in spec.fields:
                problems.append(
                    f"benchmarks.{i}.fields.{role}: required (the column holding the item {role})"
                )
        if spec.format not in ("auto", "parquet", "jsonl"):
            problems.append(f"benchmarks.{i}.format: '{spec.format}' (expected auto, parquet or jsonl)")
        if check_paths:
            check_paths_exist(spec.paths, f"benchmarks.{i}.paths", problems)
        specs.append(spec)
    if problems:
        raise RecipeError(file, problems)
    return specs


def read_items(spec: BenchmarkSpec, problems: list | None = None) -> Iterator[BenchmarkItem]:
    """Yield the items of one benchmark; never raises for bad data.

    Whatever cannot be used goes to ``problems`` as :class:`NotIndexed` (benchmark, item, part, reason):
    a row without an id or question, a row that is not JSON, an image that cannot be read, a file in an
    unknown format or without a column the registry names. Items whose image could not be read are
    still yielded (their text is indexed) with the problem in ``item.issues``.
    """
    problems = problems if problems is not None else []
    for pattern in spec.paths:
        for uri in cfs.expand(pattern):
            fmt = spec.format
            if fmt == "auto":
                ext = uri.rsplit(".", 1)[-1].lower() if "." in uri.rsplit("/", 1)[-1] else ""
                fmt = {
                    "parquet": "parquet",
                    "pq": "parquet",
                    "jsonl": "jsonl",
                    "json": "jsonl",
                    "ndjson": "jsonl",
                }.get(ext)
                if fmt is None:
                    problems.append(
                        NotIndexed(
                            spec.name,
                            uri,
                            "file",
                            f"unknown format '.{ext}' (expected .parquet, "
                            ".jsonl or .json; or set format: parquet|jsonl in the registry)",
                        )
                    )
                    continue
            try:
                rows = (
                    _parquet_rows(uri, spec, problems)
                    if fmt == "parquet"
                    else _jsonl_rows(uri, spec, problems)
                )
                for offset, row in rows:
                    where = f"{uri}#{offset}"
                    try:
                        item = _item(spec, row, uri, offset)
                    except (KeyError, TypeError, ValueError) as e:
                        problems.append(NotIndexed(spec.name, where, "item", str(e)))
                        log.warning("benchmark %s: %s skipped: %s", spec.name, where, e)
                        continue
                    problems += [
                        NotIndexed(spec.name, item.item_id, part, reason)
                        for part, reason in (i.split(": ", 1) for i in item.issues)
                    ]
                    yield item
            except (OSError, ValueError, pa.ArrowException) as e:  # unreadable file, bad Parquet footer
                problems.append(NotIndexed(spec.name, uri, "file", f"cannot read: {e}"))
                log.warning("benchmark %s: cannot read %s: %s", spec.name, uri, e)


def _check_columns(spec: BenchmarkSpec, uri: str, columns: list[str], problems: list) -> bool:
    """Every column the registry names must exist in the file; say which is missing and what there is."""
    missing = [f"fields.{role} -> '{col}'" for role, col in spec.fields.items() if col not in columns]
    if missing:
        problems.append(
            NotIndexed(
                spec.name,
                uri,
                "file",
                f"no column for {', '.join(missing)} (the file has: "
                f"{', '.join(columns[:20])}); fix `fields` in the registry",
            )
        )
        log.warning("benchmark %s: %s lacks %s", spec.name, uri, ", ".join(missing))
    return not missing


def _parquet_rows(uri: str, spec: BenchmarkSpec, problems: list) -> Iterator[tuple[int, dict]]:
    with cfs.open_random_access(uri) as f:
        pf = pq.ParquetFile(f)
        if not _check_columns(spec, uri, pf.schema_arrow.names, problems):
            return
        offset = 0
        for batch in pf.iter_batches(batch_size=256):
            for row in batch.to_pylist():
                yield offset, row
                offset += 1


def _jsonl_rows(uri: str, spec: BenchmarkSpec, problems: list) -> Iterator[tuple[int, dict]]:
    checked = False
    with cfs.open_input(uri) as stream:
        for offset, line in enumerate(cfs.iter_lines(stream, max_line=LimitsSpec().max_line_bytes)):
            if isinstance(line, cfs.Skipped):  # a benchmark file is untrusted too: a giant line is never held
                problems.append(
                    NotIndexed(
                        spec.name,
                        f"{uri}#{offset}",
                        "item",
                        f"a line of {line.size:,} bytes, over limits.max_line_bytes",
                    )
                )
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line.decode("utf-8", "replace"))
                if not isinstance(row, dict):
                    raise ValueError(f"a JSON {type(row).__name__}, not an object")  # noqa: TRY004 - caught below
            except ValueError as e:
                problems.append(NotIndexed(spec.name, f"{uri}#{offset}", "item", f"not a JSON object ({e})"))
                continue
            if not checked:  # JSONL rows may omit null fields: check the required roles on the first row only
                checked = True
                required = {r: c for r, c in spec.fields.items() if r in ("id", "question")}
                if not _check_columns(
                    BenchmarkSpec(spec.name, spec.paths, required), uri, list(row), problems
                ):
                    return
            yield offset, row


_LETTERS = "ABCDEFGHIJ"


def _item(spec: BenchmarkSpec, row: dict[str, Any], uri: str, offset: int) -> BenchmarkItem:
    f = spec.fields

    def get(role: str) -> Any:
        return row.get(f[role]) if role in f else None

    item_id, question = get("id"), get("question")
    if item_id is None or question is None:
        role = "id" if item_id is None else "question"
        raise ValueError(f"no {role} (column '{f[role]}' is empty)")
    if not isinstance(question, str):
        raise TypeError(f"question (column '{f['question']}') is a {type(question).__name__}, not text")
    options = get("options") or []
    if isinstance(options, str):
        options = [options]
    options = [str(o) for o in options]
    answer = get("answer")
    if answer is not None:
        answer = str(answer).strip()
        # MMLU-style exports give the answer as a letter or an index into the options:
        # match on the option text
        if answer in _LETTERS[: len(options)] and len(answer) == 1:
            answer = options[_LETTERS.index(answer)]
        elif (
            answer.isdigit()
            and options
            and int(answer) < len(options)
            and get("answer") is not None
            and not isinstance(get("answer"), str)
        ):
            answer = options[int(answer)]
    context = get("context")
    base = cfs.dirname(uri)
    policy = refs.policy(uri, spec.media_roots, spec.allow_absolute)
    issues: list[str] = []
    raw = ([get("image")] if get("image") is not None else []) + list(get("images") or [])
    images = []
    for k, value in enumerate(raw):
        try:
            data = _image(value, base, policy)
            _check_image(data)
            images.append(data)
        except (OSError, TypeError, ValueError) as e:
            issues.append(f"image {k}: {e}")
    video = get("video")
    if video is not None:
        if isinstance(video, dict):
            video = video.get("path")
        try:
            video = policy.resolve(str(video), base)
            if not cfs.exists(video):
                issues.append(f"video: file not found: {video}")
                video = None
        except refs.RefusedReference as e:
            issues.append(f"video {refs.shown(video)}: {e.reason}: {e}")
            video = None
    return BenchmarkItem(
        benchmark=spec.name,
        item_id=str(item_id),
        question=question,
        options=options,
        answer=answer,
        context=None if context is None else str(context),
        images=images,
        video=video,
        origin=f"{uri}#{offset}",
        issues=issues,
    )


def _image(value: Any, base: str, policy: refs.RefPolicy) -> bytes:
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str):
        try:
            return policy.read(value, base)[1]
        except refs.RefusedReference as e:
            raise ValueError(f"{refs.shown(value)}: {e.reason}: {e}") from None
        except FileNotFoundError:
            raise FileNotFoundError(f"file not found: {cfs.join(base, value)}") from None
    raise TypeError(f"neither bytes nor a path: {type(value).__name__}")


def _check_image(data: bytes) -> None:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)):
            pass  # opening reads the header only; the hasher decodes it
    except (UnidentifiedImageError, Image.DecompressionBombError) as e:
        raise ValueError(f"not a readable image ({e})") from None
