"""OCR: read the text in images with PP-OCR models (``ocr``), then keep or route text-rich images
(``text_rich``).

``ocr`` annotates; it rejects only rows it cannot read. Per row it writes:

- ``ocr_text``: the lines in reading order (rows top to bottom, each row left to right; lines on one row
  joined by a space, or by nothing between two CJK characters; rows by newlines; images of a document by a
  blank line);
- ``<label>_lines``: JSON ``[{"box": [[x, y] x 4], "text": ..., "confidence": ...}, ...]`` in the same order,
  boxes in pixels of the stored image (no EXIF rotation applied); lines of a document carry ``"image": j``;
- ``score_<label>``: the text-area ratio, the share of the image covered by the union of the line boxes
  (of all a document's pixels, for a document); 0 when there is no text;
- ``<label>_confidence``: the recogniser's mean confidence per character, null without text;
- ``<label>_status``: ``text``, ``no_text`` (nothing read: a valid annotation, not a reject), ``too_small``
  (shorter side below ``min_side``: not given to the engine, which cannot read text there), or ``no_image``
  (a document without images).

Videos: ``frames_per_video`` of the sampled frames, spread over the clip, are read; ``score_<label>`` is then
the text-overlay ratio (the share of those frames' pixels under text: burned-in subtitles, captions, logos),
text held over several frames is written once, and line entries carry ``"image": <frame index>``. Keep
``text_rich`` for images; for videos, ``text_rich: {modalities: [video], min_text_area: 0, max_text_area:
0.1}`` drops clips that are mostly overlay. A video without frames is rejected as ``missing_frames``.

Rejects (counted by reason in ``stats.json``): ``missing_image``, ``undecodable`` (bytes that do not decode;
the detail names a document's image) and ``ocr_error`` (the engine raised on that image; the detail has the
message). One bad image never stops the run or costs the other rows of its batch.

Rotated text: upside-down lines (180 degrees) are turned by the angle classifier (``angle: true``); lines
running vertically (text rotated by 90 degrees) are cut out and turned upright by PP-OCR's crop step before
recognition (and then checked by the angle classifier), so they read too, at some cost in accuracy.

Engines, models and the threads they use: :mod:`curation.models.ocr`. The engine runs on
``resources.num_cpus`` threads (at least one), so Ray's CPU accounting holds.

``text_rich`` reads what ``ocr`` wrote (name the ``ocr`` instance with ``ocr:`` if it has its own name) and
decides, the first failing rule giving the reason: ``too_small_for_ocr``, ``no_image``, ``no_text``,
``low_confidence`` (mean confidence below ``min_confidence``), ``text_area_below_min``,
``text_area_above_max``. Its score is the text-area ratio, so ``keep_fraction: 0.2`` keeps the fifth of the
pool with the most text. It always writes ``is_<label>`` (true: text-rich). With ``route: true`` it
rejects nothing and only that column routes: a mixture source selects the text-rich rows with
``where: "is_text_rich"`` and a captioning source the others, from one pool.

Example::

    stages:
      - image_decode: {}
      - ocr: {resources: {num_cpus: 1}}
      - text_rich: {min_text_area: 0.02, min_confidence: 0.8, route: true}
"""

from __future__ import annotations

import io
import json
import unicodedata
import warnings
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image, ImageDraw

from curation.bounds import bounded
from curation.models.ocr import mean_confidence
from curation.stage import NotReady, ScoreFilter, first_reason, reason_where, register, unscored

AREA_GRID = 512  # text area is measured on a mask whose longer side is at most this many cells


@register
class Ocr(ScoreFilter):
    """Recognise text lines in images with PP-OCR models (RapidOCR by default, PaddleOCR with local models).

    Parameters: ``engine`` (``rapidocr`` or ``paddleocr``), ``model_dir`` (see :mod:`curation.models.ocr`;
    default for RapidOCR: the PP-OCRv6 models inside its wheel), ``angle`` (the text-line angle classifier),
    ``min_side`` (images whose shorter side is below it are annotated ``too_small`` and not read),
    ``retry_below`` (RapidOCR: a line read with less confidence is read again turned over, 180 degrees, and
    the more confident reading kept; 0: never),
    ``det_limit_side_len``/``det_limit_type`` (the detector's input size: by default the longer side is scaled
    down to 960 pixels; ``min`` scales the shorter side up instead, for small text in small images, at several
    times the cost), ``min_line_confidence`` (lines the recogniser is less sure of are dropped).
    """

    name: ClassVar[str] = "ocr"
    reads: ClassVar[tuple[str, ...]] = ("image", "images", "frames")
    writes: ClassVar[tuple[str, ...]] = ("ocr_text",)
    default_modalities: ClassVar[tuple[str, ...]] = ("image_text", "interleaved", "video")

    engine: str = "rapidocr"
    model_dir: str | None = None
    angle: bool = True
    min_side: int = bounded(16, 1, 16_384)
    det_limit_side_len: int = bounded(960, 32, 16_384)
    det_limit_type: str = "max"
    min_line_confidence: float = bounded(0.5, 0, 1)
    retry_below: float = bounded(0.9, 0, 1)
    # video rows: frames read, spread over the clip (entries carry "image": frame index)
    frames_per_video: int = bounded(3, 1, 256)

    def __post_init__(self):
        from curation.models.ocr import ENGINES, LIMIT_TYPES

        problems = []
        if self.engine not in ENGINES:
            problems.append(f"engine: expected one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.det_limit_type not in LIMIT_TYPES:
            problems.append(
                f"det_limit_type: expected one of {', '.join(LIMIT_TYPES)}, got {self.det_limit_type!r}"
            )
        if self.min_side < 1 or self.det_limit_side_len < 32:
            problems.append("min_side must be positive and det_limit_side_len at least 32")
        for key in ("min_line_confidence", "retry_below"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                problems.append(f"{key}: expected 0..1, got {getattr(self, key)}")
        if self.frames_per_video < 1:
            problems.append("frames_per_video: expected a positive number of frames")
        if problems:
            raise ValueError("; ".join(problems))
        self._models = None  # resolved model files (preflight on the driver, setup on workers)
        self._engine = None

    def __getstate__(self):  # shipped to workers before setup; never with a loaded engine
        return {k: v for k, v in self.__dict__.items() if k != "_engine"}

    def __setstate__(self, state):
        self.__dict__.update(state, _engine=None)

    @property
    def lines_name(self) -> str:
        return f"{self.label}_lines"

    @property
    def confidence_name(self) -> str:
        return f"{self.label}_confidence"

    @property
    def status_name(self) -> str:
        return f"{self.label}_status"

    @property
    def outcome_column(self) -> str:
        return self.status_name

    def output_fields(self) -> list[pa.Field]:
        return [
            pa.field(self.score_name, pa.float64()),
            pa.field(self.lines_name, pa.string()),
            pa.field(self.confidence_name, pa.float64()),
            pa.field(self.status_name, pa.string()),
        ]

    # ------------------------------------------------------------ driver: before any data is read

    @property
    def requires(self) -> tuple[tuple[str, str], ...]:  # type: ignore[override]  # the engine's packages
        from curation.models.ocr import REQUIRES

        return REQUIRES[self.engine]

    def preflight(self) -> None:
        """The engine's model files are there (no model is loaded)."""
        try:
            self._models = self._resolve()
        except (FileNotFoundError, ValueError) as e:
            raise NotReady(f"stage '{self.label}': {e}") from e

    def lineage(self) -> dict[str, Any]:
        return self._resolve().lineage()

    def _resolve(self):
        from curation.models.ocr import resolve_ocr

        if self._models is None:
            self._models = resolve_ocr(self.engine, self.model_dir, self.angle)
        return self._models

    # ------------------------------------------------------------ workers

    def setup(self) -> None:
        from curation.models.ocr import OcrOptions, load_ocr

        opts = OcrOptions(
            threads=max(1, round(self.resources.num_cpus)),
            angle=self.angle,
            det_limit_side_len=self.det_limit_side_len,
            det_limit_type=self.det_limit_type,
            min_line_confidence=self.min_line_confidence,
            retry_below=self.retry_below,
        )
        self._engine = load_ocr(self._resolve(), opts)

    def score(self, batch: pa.Table) -> dict[str, pa.Array]:
        if self._engine is None:
            self.setup()
        n = batch.num_rows
        modality = batch["modality"].to_pylist()
        singles, multis = batch["image"].to_pylist(), batch["images"].to_pylist()
        frames = batch["frames"].to_pylist()
        failed: list[str | None] = [None] * n
        detail: list[str | None] = [None] * n
        texts: list[str | None] = [None] * n
        lines: list[str | None] = [None] * n
        status: list[str | None] = [None] * n
        ratio, conf = np.full(n, np.nan), np.full(n, np.nan)
        for i in range(n):
            if modality[i] == "interleaved":
                images = [(j, d) for j, d in enumerate(multis[i] or []) if d is not None]
            elif modality[i] == "video":  # text overlays: a few frames spread over the clip
                fr = frames[i] or []
                if not fr:
                    failed[i] = "missing_frames"
                    continue
                picks = np.unique(np.linspace(0, len(fr) - 1, min(self.frames_per_video, len(fr))).round())
                images = [(int(k), fr[int(k)]) for k in picks]
            elif singles[i] is None:
                failed[i] = "missing_image"
                continue
            else:
                images = [(None, singles[i])]
            error, row = self._read(images, once=modality[i] == "video")
            if error:
                failed[i], detail[i] = error
            texts[i], lines[i], status[i] = row.get("text"), row.get("lines"), row.get("status")
            ratio[i], conf[i] = row.get("ratio", np.nan), row.get("confidence", np.nan)
        return {
            self.score_name: pa.array(ratio, mask=np.isnan(ratio)),
            "ocr_text": pa.array(texts, pa.string()),
            self.lines_name: pa.array(lines, pa.string()),
            self.confidence_name: pa.array(conf, mask=np.isnan(conf)),
            self.status_name: pa.array(status, pa.string()),
            **unscored(failed, detail),
        }

    def _read(
        self, images: list[tuple[int | None, bytes]], once: bool = False
    ) -> tuple[tuple[str, str] | None, dict[str, Any]]:
        """One row's images (position in the document or None, bytes), read one at a time (a batch of large
        images is never decoded at once): ((reason, detail), {}) or (None, the row's annotation). ``once``: a
        line already read from an earlier image is not repeated in the text (video frames)."""
        found, entries, parts = [], [], []
        seen: set[str] = set()
        text_px = px = 0.0
        small = False
        for j, data in images:
            where = "" if j is None else f"image {j}: "
            rgb, err = _decode(data)
            if err:
                return ("undecodable", f"{where}{err}"), {}
            h, w = rgb.shape[:2]
            if min(w, h) < self.min_side:
                small = True
                continue
            [res] = self._engine.recognise([rgb])
            if isinstance(res, Exception):
                return ("ocr_error", f"{where}{type(res).__name__}: {res}"[:490]), {}
            px += w * h
            text_px += text_area([ln.box for ln in res], w, h) * w * h
            rows = reading_order(res)
            lines = [_join_row([ln.text for ln in row]) for row in rows]
            if once:  # video: a subtitle or logo held over several frames is written once
                lines = [x for x in lines if x not in seen and not seen.add(x)]
            if lines:
                parts.append("\n".join(lines))
            for ln in (x for row in rows for x in row):
                found.append(ln)
                entry = {
                    "box": [[round(x, 1), round(y, 1)] for x, y in ln.box],
                    "text": ln.text,
                    "confidence": round(ln.confidence, 4),
                }
                entries.append(entry if j is None else {**entry, "image": j})
        if not px:
            return None, {"status": "too_small" if small else "no_image"}
        row = {"ratio": text_px / px, "lines": json.dumps(entries, ensure_ascii=False)}
        if not found:
            return None, {**row, "text": "", "status": "no_text"}
        return None, {
            **row,
            "text": "\n\n".join(parts),
            "confidence": mean_confidence(found),
            "status": "text",
        }


def _decode(data: bytes) -> tuple[np.ndarray | None, str | None]:
    """(RGB uint8 array, None) or (None, the error) for one encoded image."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                return np.asarray(img.convert("RGB")), None
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad data
        return None, f"{type(e).__name__}: {e}"[:300]


def text_area(boxes: list, width: int, height: int) -> float:
    """Share of a ``width`` x ``height`` image covered by the union of the quadrilaterals ``boxes``.

    Overlapping boxes count once: the boxes are filled into a mask of at most ``AREA_GRID`` cells a side.

    >>> text_area([((0, 0), (50, 0), (50, 10), (0, 10))], 100, 20)
    0.25
    """
    if not boxes or width <= 0 or height <= 0:
        return 0.0
    scale = min(1.0, AREA_GRID / max(width, height))
    gw, gh = max(1, round(width * scale)), max(1, round(height * scale))
    mask = Image.new("1", (gw, gh), 0)
    draw = ImageDraw.Draw(mask)
    for box in boxes:
        # PIL fills a polygon's edges inclusively: shrink by half a cell so a box covers its own cells only
        pts = [(x * scale, y * scale) for x, y in box]
        cx, cy = sum(p[0] for p in pts) / len(pts), sum(p[1] for p in pts) / len(pts)
        draw.polygon([(x - 0.5 if x > cx else x, y - 0.5 if y > cy else y) for x, y in pts], fill=1)
    return float(np.count_nonzero(np.asarray(mask))) / (gw * gh)


def reading_order(lines: list) -> list[list]:
    """Lines (with a ``box`` and an ``angle``) grouped into rows, top to bottom, each row left to right.

    A line joins the row above when its vertical centre is within half a line height of that row's: PP-OCR
    splits one visual line at wide gaps, and a row must read as one. When most of the text was read turned
    over (the angle classifier found it upside down), the image is upside down: it reads bottom to top, right
    to left.
    """
    turned = sum(len(ln.text) for ln in lines if ln.angle == 180)
    sign = -1.0 if 2 * turned > sum(len(ln.text) for ln in lines) else 1.0

    def span(ln):
        ys = [sign * p[1] for p in ln.box]
        return min(ys), max(ys)

    rows: list[list] = []
    centre = height = 0.0
    for ln in sorted(lines, key=lambda ln: sum(span(ln)) / 2):
        y0, y1 = span(ln)
        c, h = (y0 + y1) / 2, y1 - y0
        if rows and abs(c - centre) <= 0.5 * min(h, height):
            rows[-1].append(ln)
        else:
            rows.append([ln])
            centre, height = c, h
    return [sorted(r, key=lambda ln: min(sign * p[0] for p in ln.box)) for r in rows]


def _join_row(texts: list[str]) -> str:
    """Texts of one row, left to right: apart by a space, but not between two CJK characters."""
    out = texts[0]
    for t in texts[1:]:
        out += ("" if _wide(out[-1:]) and _wide(t[:1]) else " ") + t
    return out


def _wide(ch: str) -> bool:
    """A CJK (wide) character: written without spaces between words."""
    return bool(ch) and unicodedata.east_asian_width(ch) in ("W", "F")


@register
class TextRich(ScoreFilter):
    """Keep (or, with ``route: true``, only mark) images with enough confidently read text.

    Needs ``ocr`` earlier in the pipeline (``ocr:`` names its instance). Rules, in order: the image was read
    (``too_small_for_ocr``, ``no_image``), it has text (``no_text``), the mean confidence is at least
    ``min_confidence`` (``low_confidence``), the text-area ratio is within ``min_text_area`` ..
    ``max_text_area`` (``text_area_below_min``, ``text_area_above_max``: a page scan is all text, a photo
    with a street sign very little). Writes ``score_<label>`` (the text-area ratio) and ``is_<label>``.
    """

    name: ClassVar[str] = "text_rich"
    reads: ClassVar[tuple[str, ...]] = (
        "score_ocr",
        "ocr_confidence",
        "ocr_status",
    )  # of the stage named by ocr:
    default_modalities: ClassVar[tuple[str, ...]] = ("image_text", "interleaved")
    ranks: ClassVar[bool] = True  # more text is richer: keep_fraction keeps the most text-rich share

    ocr: str = "ocr"
    min_text_area: float = bounded(0.02, 0, 1)
    max_text_area: float = bounded(1.0, 0, 1)
    min_confidence: float = bounded(0.8, 0, 1)
    route: bool = False

    def __post_init__(self):
        if not 0.0 <= self.min_text_area <= self.max_text_area <= 1.0:
            raise ValueError(
                f"min_text_area and max_text_area: expected 0 <= min <= max <= 1, got "
                f"{self.min_text_area} and {self.max_text_area}"
            )
        if not 0.0 <= self.min_confidence <= 1.0:
            raise ValueError(f"min_confidence: expected 0..1, got {self.min_confidence}")

    @property
    def flag_name(self) -> str:
        return f"is_{self.label}"

    def output_fields(self) -> list[pa.Field]:
        return [pa.field(self.score_name, pa.float64()), pa.field(self.flag_name, pa.bool_())]

    def columns_read(self) -> tuple[str, ...]:
        return (f"score_{self.ocr}", f"{self.ocr}_confidence", f"{self.ocr}_status")

    def preflight(self) -> None:
        if self.keep_fraction is not None and self.route:
            raise ValueError("route: true marks rows and keep_fraction rejects them: give one")

    def _columns(self, batch: pa.Table) -> tuple[pa.Array, pa.Array, pa.Array]:
        names = (f"score_{self.ocr}", f"{self.ocr}_confidence", f"{self.ocr}_status")
        missing = [c for c in names if c not in batch.column_names]
        if missing:
            raise ValueError(
                f"stage '{self.label}' needs the columns of an '{self.ocr}' stage earlier in the "
                f"pipeline (missing: {', '.join(missing)}); add - ocr: {{}} before it, or set ocr: "
                f"to that stage's instance name"
            )
        return tuple(batch[c] for c in names)

    def score(self, batch):
        area, _, _ = self._columns(batch)
        reasons = self._reasons(batch)
        return {self.score_name: area, self.flag_name: pc.is_null(reasons)}

    def _reasons(self, batch: pa.Table) -> pa.Array:
        area, confidence, status = self._columns(batch)
        return first_reason(
            reason_where(pc.equal(status, "too_small"), "too_small_for_ocr"),
            reason_where(pc.equal(status, "no_image"), "no_image"),
            reason_where(pc.or_kleene(pc.equal(status, "no_text"), pc.is_null(status)), "no_text"),
            reason_where(pc.less(confidence, self.min_confidence), "low_confidence"),
            reason_where(pc.less(area, self.min_text_area), "text_area_below_min"),
            reason_where(pc.greater(area, self.max_text_area), "text_area_above_max"),
        )

    def decide(self, batch, scores):
        if self.route:
            return pa.nulls(batch.num_rows, pa.string())
        return self._reasons(batch)
