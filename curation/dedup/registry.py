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

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pyarrow.parquet as pq

from curation.io import fs as cfs
from curation.recipe import RecipeError, build, check_paths_exist, load_yaml

log = logging.getLogger(__name__)

ROLES = ("id", "question", "options", "answer", "context", "image", "images", "video")
DEFAULT_FIELDS = {"id": "id", "question": "question", "options": "options", "answer": "answer", "image": "image"}


@dataclass
class BenchmarkSpec:
    name: str
    paths: list[str]
    fields: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_FIELDS))
    format: str = "auto"  # auto (by extension) | parquet | jsonl


@dataclass
class BenchmarkItem:
    """One evaluation item, as the matchers see it."""

    benchmark: str
    item_id: str
    question: str
    options: list[str]
    answer: str | None
    context: str | None
    images: list[bytes]
    video: str | None
    origin: str  # file#row, for reports

    @property
    def text(self) -> str:
        """What text matching looks for: the question with its context, options and answer."""
        parts = [self.context or "", self.question, " ".join(self.options), self.answer or ""]
        return "\n".join(p for p in parts if p)


def load_benchmarks(path: str | Path, overrides: list[str] = (), check_paths: bool = True) -> list[BenchmarkSpec]:
    """Load and validate a registry; raise :class:`~curation.recipe.RecipeError` listing every problem."""
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
                problems.append(f"benchmarks.{i}.fields.{role}: required (the column holding the item {role})")
        if spec.format not in ("auto", "parquet", "jsonl"):
            problems.append(f"benchmarks.{i}.format: '{spec.format}' (expected auto, parquet or jsonl)")
        if check_paths:
            check_paths_exist(spec.paths, f"benchmarks.{i}.paths", problems)
        specs.append(spec)
    if problems:
        raise RecipeError(file, problems)
    return specs


def read_items(spec: BenchmarkSpec, problems: list[str] | None = None) -> Iterator[BenchmarkItem]:
    """Yield the items of one benchmark. A broken row is skipped and described in ``problems``
    (file, row, what is wrong) instead of stopping the audit."""
    problems = problems if problems is not None else []
    for pattern in spec.paths:
        for uri in cfs.expand(pattern):
            fmt = spec.format if spec.format != "auto" else ("jsonl" if uri.endswith((".jsonl", ".json")) else "parquet")
            rows = _parquet_rows(uri) if fmt == "parquet" else _jsonl_rows(uri, problems)
            for offset, row in rows:
                try:
                    yield _item(spec, row, uri, offset)
                except (KeyError, TypeError, ValueError, OSError) as e:
                    problems.append(f"{spec.name}: {uri}#{offset}: skipped, {e}")
                    log.warning("benchmark %s: %s#%d skipped: %s", spec.name, uri, offset, e)


def _parquet_rows(uri: str) -> Iterator[tuple[int, dict]]:
    with cfs.open_random_access(uri) as f:
        offset = 0
        for batch in pq.ParquetFile(f).iter_batches(batch_size=256):
            for row in batch.to_pylist():
                yield offset, row
                offset += 1


def _jsonl_rows(uri: str, problems: list[str]) -> Iterator[tuple[int, dict]]:
    with cfs.open_input(uri) as stream:
        for offset, line in enumerate(cfs.iter_lines(stream)):
            if not line.strip():
                continue
            try:
                yield offset, json.loads(line.decode("utf-8", "replace"))
            except ValueError as e:
                problems.append(f"{uri}#{offset}: not JSON ({e}); skipped")


def _item(spec: BenchmarkSpec, row: dict[str, Any], uri: str, offset: int) -> BenchmarkItem:
    f = spec.fields

    def get(role: str) -> Any:
        return row.get(f[role]) if role in f else None

    item_id, question = get("id"), get("question")
    if item_id is None or question is None:
        raise ValueError(f"no {'id' if item_id is None else 'question'} (column '{f['id' if item_id is None else 'question']}')")
    options = get("options") or []
    if isinstance(options, str):
        options = [options]
    images = [get("image")] if get("image") is not None else []
    images += list(get("images") or [])
    base = cfs.dirname(uri)
    return BenchmarkItem(
        benchmark=spec.name, item_id=str(item_id), question=str(question), options=[str(o) for o in options],
        answer=None if get("answer") is None else str(get("answer")), context=get("context"),
        images=[_image(x, base) for x in images], video=get("video"), origin=f"{uri}#{offset}",
    )


def _image(value: Any, base: str) -> bytes:
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str):
        return cfs.read_bytes(cfs.join(base, value))
    raise TypeError(f"an image is neither bytes nor a path: {type(value).__name__}")
