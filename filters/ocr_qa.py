"""``ocr_qa``: turn an image's OCR result into a grounded question-answer conversation (an SFT row).

Keye-VL makes its own OCR training data because open data has too little (Chinese above all). From the
lines the ``ocr`` stage read (text, box, confidence), this stage writes one conversation per image in
the SFT row format of the mixtures (``docs/sft-format.md``, mode ``non_thinking``), with up to four
grounded tasks whose answers follow from the OCR result alone:

- read a region: "What text is in the region [x0, y0, x1, y1]?" -> that line's text;
- count lines: "How many lines of text are in the image?" -> the number of lines read;
- locate a word: "Where is the word "X"? Answer with its bounding box." -> the word's box, cut from its
  line's box in proportion to the characters before it (OCR gives boxes per line, not per word);
- read everything: "Read all the text in the image." -> the lines in reading order.

Boxes are ``[x0, y0, x1, y1]`` in pixels of the original image. Which line and word a question uses is
chosen by a hash of the row id, so the same pool gives the same conversations. Lines below
``min_confidence`` are left out of every question and answer; an image with none left is rejected
(``no_confident_text``). The row becomes ``modality: sft`` with its image in ``images`` and a new
content id; ``meta.ocr_qa_from`` keeps the id it had.

    stages:
      - image_decode: {}
      - ocr: {}
      - text_rich: {min_text_area: 0.01}
      - ocr_qa: {tasks: [read_region, count_lines, locate_word, read_all]}
"""

from __future__ import annotations

import json
import re
from dataclasses import field
from typing import Any, ClassVar

import pyarrow as pa
import pyarrow.compute as pc
import xxhash

from curation.bounds import bounded
from curation.schema import row_id
from curation.stage import Stage, mark_rejected, register
from curation.target.chat import apply_suffix, dump_messages

TASKS = ("read_region", "count_lines", "locate_word", "read_all")
_WORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9'\-]{2,}|[\u3400-\u9fff]{2,}")


def _box(points: list) -> list[int]:
    """Axis-aligned ``[x0, y0, x1, y1]`` around a quadrilateral."""
    xs = [float(p[0]) for p in points]
    ys = [float(p[1]) for p in points]
    return [round(min(xs)), round(min(ys)), round(max(xs)), round(max(ys))]


def word_box(line_box: list[int], text: str, start: int, end: int) -> list[int]:
    """The box of ``text[start:end]`` inside a horizontal line's box, by character position.

    >>> word_box([0, 10, 100, 30], "abcd efgh", 5, 9)
    [56, 10, 100, 30]
    """
    x0, y0, x1, y1 = line_box
    width = (x1 - x0) / max(len(text), 1)
    return [round(x0 + start * width), y0, round(x0 + end * width), y1]


def questions(lines: list[dict], tasks: list[str], seed: int) -> list[tuple[str, str]]:
    """(question, answer) pairs for ``lines`` (each {text, box}); ``seed`` picks the line and word."""
    out = []
    pick = lines[seed % len(lines)]
    for task in tasks:
        if task == "read_region":
            out.append((f"What text is in the region {pick['box']}?", pick["text"]))
        elif task == "count_lines":
            n = len(lines)
            out.append(("How many lines of text are in the image?", f"{n} line{'s' if n != 1 else ''}."))
        elif task == "locate_word":
            words = [
                (m.start(), m.end(), m.group(0), line) for line in lines for m in _WORD.finditer(line["text"])
            ]
            if words:
                start, end, word, line = words[(seed >> 8) % len(words)]
                box = word_box(line["box"], line["text"], start, end)
                out.append(
                    (
                        (
                            f'Where is the word "{word}" in the image? Answer with its bounding box '
                            f"[x0, y0, x1, y1] in pixels."
                        ),
                        str(box),
                    )
                )
        elif task == "read_all":
            out.append(("Read all the text in the image, line by line.", "\n".join(x["text"] for x in lines)))
    return out


@register
class OcrQA(Stage):
    """Turn OCR lines into a grounded question-answer conversation (SFT row, mode non_thinking)."""

    name: ClassVar[str] = "ocr_qa"
    reads: ClassVar[tuple[str, ...]] = ("image", "ocr_lines")
    writes: ClassVar[tuple[str, ...]] = ("modality", "messages", "mode", "images", "id")
    default_modalities: ClassVar[tuple[str, ...]] = ("image_text",)

    ocr: str = "ocr"  # the ocr stage instance whose <ocr>_lines column to read
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    min_confidence: float = bounded(0.8, 0, 1)  # lines read less surely are left out of questions and answers
    # images with more lines (dense documents) keep only the first ones
    max_lines: int = bounded(30, 1, 10_000)

    def __post_init__(self) -> None:
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown or not self.tasks:
            raise ValueError(f"tasks: expected some of {', '.join(TASKS)}, got {self.tasks}")

    def columns_read(self) -> tuple[str, ...]:
        return ("image", f"{self.ocr}_lines")

    def __call__(self, batch: pa.Table) -> pa.Table:
        column = f"{self.ocr}_lines"
        if column not in batch.column_names:
            raise ValueError(
                f"ocr_qa needs the '{column}' column: put an '{self.ocr}' stage before it "
                f"(or set ocr: to its instance name)"
            )
        mask = self.applies(batch)
        idx = pc.indices_nonzero(mask).to_pylist()
        if not idx:
            return batch
        rows = batch.take(pa.array(idx, pa.int64())).to_pylist()
        cols = {
            c: batch.column(c).to_pylist()
            for c in ("id", "modality", "messages", "mode", "images", "image", "text", "meta")
        }
        rejected, reasons, details = [], [], []
        for i, row in zip(idx, rows):
            problem, result = self._convert(row, column)
            if problem:
                rejected.append(i)
                reasons.append(problem[0])
                details.append(problem[1])
                continue
            for k, v in result.items():
                cols[k][i] = v
        for k, values in cols.items():
            batch = batch.set_column(
                batch.schema.get_field_index(k), k, pa.array(values, batch.schema.field(k).type)
            )
        if rejected:
            batch = mark_rejected(
                batch,
                pa.array(rejected, pa.int64()),
                self.label,
                pa.array(reasons, pa.string()),
                pa.array(details, pa.string()),
            )
        return batch

    def _convert(self, row: dict[str, Any], column: str) -> tuple[tuple[str, str] | None, dict[str, Any]]:
        if not row.get("image"):
            return ("missing_image", "no image bytes"), {}
        try:
            raw = json.loads(row.get(column) or "[]")
        except ValueError as e:
            return ("bad_ocr_lines", f"{column} is not JSON: {e}"), {}
        lines = [
            {"text": str(x["text"]).strip(), "box": _box(x["box"])}
            for x in raw
            if isinstance(x, dict)
            and x.get("text")
            and x.get("box")
            and float(x.get("confidence", 0)) >= self.min_confidence
            and str(x["text"]).strip()
        ]
        if not lines:
            return ("no_confident_text", f"no line read with confidence >= {self.min_confidence}"), {}
        lines = lines[: self.max_lines]
        seed = xxhash.xxh3_64_intdigest(row["id"].encode())
        qa = questions(lines, self.tasks, seed)
        messages: list[dict] = []
        for k, (q, a) in enumerate(qa):
            content: Any = [{"type": "image", "index": 0}, {"type": "text", "text": q}] if k == 0 else q
            messages += [{"role": "user", "content": content}, {"role": "assistant", "content": a}]
        apply_suffix(messages, "non_thinking")
        text = dump_messages(messages)
        meta = json.loads(row["meta"]) if row.get("meta") else {}
        meta["ocr_qa_from"] = row["id"]
        if row.get("text"):
            meta["caption"] = row["text"]
        return None, {
            "id": row_id("sft", text, [row["image"]]),
            "modality": "sft",
            "messages": text,
            "mode": "non_thinking",
            "images": [row["image"]],
            "image": None,
            "text": None,
            "meta": json.dumps(meta, sort_keys=True, ensure_ascii=False),
        }
