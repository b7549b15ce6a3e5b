"""OCR engines behind one small interface: PP-OCR models through RapidOCR (default) or PaddleOCR.

``rapidocr``
    RapidOCR (``pip install 'keye-curation[ocr]'``: ``rapidocr`` 3.10+ and ``onnxruntime``). Its wheel
    ships PP-OCRv6 *small* text detection and recognition models (one recogniser for simplified and
    traditional Chinese, English and Japanese) and the PP-OCR text-line angle classifier (0/180 degrees), run
    with onnxruntime. They are used from the wheel by file path, so nothing is ever downloaded. Give
    ``model_dir`` to use other ONNX models: a folder with one ``*det*.onnx``, one ``*rec*.onnx``, one
    ``*cls*.onnx`` (when the angle classifier is on) and, for a recogniser without its character list inside,
    one ``*.txt`` keys file.
``paddleocr``
    PaddleOCR 3.x on PaddlePaddle (``pip install 'keye-curation[ocr-paddle]'``; paddlepaddle pins an older
    numpy, so it lives in its own environment). PaddleOCR downloads its models at run time unless given
    folders, so ``model_dir`` is required here: a folder holding one PaddleX model folder per model (each with
    its ``inference.yml``), e.g. ``PP-OCRv5_mobile_det/``, ``PP-OCRv5_mobile_rec/`` and
    ``PP-LCNet_x1_0_textline_ori/`` as ``paddleocr`` or ``paddlex`` save them.

:func:`resolve_ocr` finds the model files without loading anything (the driver's pre-flight check and the
lineage in the manifest); :func:`load_ocr` builds the engine once per worker. Either engine runs its own
thread pool with ``threads`` threads, so a stage that asks Ray for ``num_cpus: 2`` uses two cores, not all.

Example::

    engine = load_ocr(resolve_ocr("rapidocr"), OcrOptions(threads=1))
    [lines] = engine.recognise([rgb_array])   # a list of Line, or an Exception for that image
    text = "\\n".join(line.text for line in lines)
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from curation.models import file_sha256

ENGINES = ("rapidocr", "paddleocr")
# (import name, extra) pairs each engine needs; the stage reports the install command for the first
# missing one.
REQUIRES = {
    "rapidocr": (("rapidocr", "ocr"), ("onnxruntime", "ocr")),
    "paddleocr": (("paddleocr", "ocr-paddle"), ("paddle", "ocr-paddle")),
}
LIMIT_TYPES = ("max", "min")


@dataclass(frozen=True)
class Line:
    """One recognised text line: its quadrilateral (4 corners, clockwise from the top-left, in pixels of the
    image given to the engine), its text, the recogniser's confidence (0..1), and the angle classifier's
    verdict (180: the line was upside down and was read turned over; 0 otherwise)."""

    box: tuple[tuple[float, float], ...]
    text: str
    confidence: float
    angle: int = 0


@dataclass(frozen=True)
class OcrModels:
    """Which engine runs which model files, found without loading them. Picklable (a few strings).

    ``files`` maps a role (``det``, ``rec``, ``cls``, ``keys``) to a file (RapidOCR) or a model folder
    (PaddleOCR); ``names`` holds PaddleX model names, which PaddleOCR checks against each folder.
    """

    engine: str
    version: str
    files: dict[str, str] = field(hash=False)
    names: dict[str, str] = field(default_factory=dict, hash=False)

    def lineage(self) -> dict[str, Any]:
        """Engine, version, and every model file's name and sha256 (cached per file, size and mtime)."""
        models = {}
        for role, path in sorted(self.files.items()):
            weights = _weights_file(path)
            name = Path(path).name if weights == path else f"{Path(path).name}/{Path(weights).name}"
            models[role] = {"file": name, "sha256": file_sha256(weights)}
            if role in self.names:
                models[role]["model_name"] = self.names[role]
        out: dict[str, Any] = {"engine": self.engine, "version": self.version, "models": models}
        if self.engine == "rapidocr":
            out["onnxruntime"] = _version("onnxruntime")
        return out


def _weights_file(path: str) -> str:
    """The file whose bytes are the model: the file itself, or a PaddleX folder's parameters."""
    return str(Path(path) / "inference.pdiparams") if os.path.isdir(path) else path


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def resolve_ocr(engine: str = "rapidocr", model_dir: str | None = None, angle: bool = True) -> OcrModels:
    """Find the models ``engine`` will run; raises FileNotFoundError or ValueError saying what to do.

    Cheap: reads a folder listing (and, for PaddleOCR, each model's ``inference.yml``), loads no model.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine: expected one of {', '.join(ENGINES)}, got {engine!r}")
    if engine == "rapidocr":
        return _resolve_rapidocr(model_dir, angle)
    return _resolve_paddleocr(model_dir, angle)


def _resolve_rapidocr(model_dir: str | None, angle: bool) -> OcrModels:
    spec = importlib.util.find_spec("rapidocr")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "engine rapidocr: the 'rapidocr' package is not installed: pip install 'keye-curation[ocr]'"
        )
    folder = (
        Path(model_dir).expanduser()
        if model_dir
        else Path(next(iter(spec.submodule_search_locations))) / "models"
    )
    where = f"model_dir {folder}" if model_dir else f"the rapidocr package's models folder {folder}"
    if not folder.is_dir():
        raise FileNotFoundError(f"engine rapidocr: {where} does not exist")
    onnx = sorted(p for p in folder.iterdir() if p.suffix == ".onnx")
    files: dict[str, str] = {}
    for role in ("det", "rec", "cls") if angle else ("det", "rec"):
        found = [p for p in onnx if role in p.stem.lower().replace("-", "_").split("_")]
        if len(found) != 1:
            what = "no" if not found else f"{len(found)} ({', '.join(p.name for p in found)})"
            hint = "; or set angle: false to run without the angle classifier" if role == "cls" else ""
            raise FileNotFoundError(
                f"engine rapidocr: {where} has {what} *{role}*.onnx model, expected one{hint}"
            )
        files[role] = str(found[0].resolve())
    keys = sorted(folder.glob("*.txt"))
    if len(keys) == 1:  # a recogniser's character list, for a model without it in its metadata
        files["keys"] = str(keys[0].resolve())
    return OcrModels("rapidocr", _version("rapidocr") or "unknown", files)


def _resolve_paddleocr(model_dir: str | None, angle: bool) -> OcrModels:
    if not model_dir:
        raise ValueError(
            "engine paddleocr: model_dir is required (PaddleOCR downloads models at run time "
            "otherwise): a folder holding the PaddleX model folders, e.g. PP-OCRv5_mobile_det/, "
            "PP-OCRv5_mobile_rec/ and PP-LCNet_x1_0_textline_ori/"
        )
    import yaml

    folder = Path(model_dir).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"engine paddleocr: model_dir {folder} does not exist")
    files: dict[str, str] = {}
    names: dict[str, str] = {}
    for sub in sorted(p for p in folder.iterdir() if (p / "inference.yml").is_file()):
        with open(sub / "inference.yml", encoding="utf-8") as f:
            name = ((yaml.safe_load(f) or {}).get("Global") or {}).get("model_name") or sub.name
        role = (
            "det"
            if name.endswith("_det")
            else "rec"
            if name.endswith("_rec")
            else ("cls" if "textline_ori" in name else None)
        )
        if role is None:
            continue
        if role in files:
            raise ValueError(
                f"engine paddleocr: model_dir {folder} has two {role} models: {names[role]} and {name}"
            )
        if not (sub / "inference.pdiparams").is_file():
            raise FileNotFoundError(
                f"engine paddleocr: {sub} has no inference.pdiparams (an incomplete download?)"
            )
        files[role], names[role] = str(sub.resolve()), name
    needed = ("det", "rec", "cls") if angle else ("det", "rec")
    missing = [r for r in needed if r not in files]
    if missing:
        examples = {
            "det": "PP-OCRv5_mobile_det",
            "rec": "PP-OCRv5_mobile_rec",
            "cls": "PP-LCNet_x1_0_textline_ori",
        }
        raise FileNotFoundError(
            f"engine paddleocr: model_dir {folder} has no {', '.join(missing)} model folder "
            f"(a folder with an inference.yml naming e.g. {', '.join(examples[r] for r in missing)})"
            + (
                "; or set angle: false to run without the text-line orientation model"
                if missing == ["cls"]
                else ""
            )
        )
    if not angle:
        files.pop("cls", None)
        names.pop("cls", None)
    return OcrModels("paddleocr", _version("paddleocr") or "unknown", files, names)


@dataclass
class OcrOptions:
    """How an engine runs (the stage's parameters)."""

    threads: int = 1  # engine threads (onnxruntime intra-op, OpenCV, Paddle's CPU math library)
    angle: bool = (
        True  # text-line angle classifier: lines upside down (180 degrees) are turned before recognition
    )
    det_limit_side_len: int = 960  # detector input size, with det_limit_type:
    det_limit_type: str = (
        "max"  # max: scale the longer side down to det_limit_side_len; min: the shorter side up
    )
    min_line_confidence: float = 0.5  # lines recognised below this are dropped by the engine
    # RapidOCR: a line read with less confidence than this is read again turned over (180 degrees) and the
    # more confident reading kept. The angle classifier sees a long line squeezed into 192 pixels and often
    # gets it wrong, both ways; re-reading only the doubtful lines costs little. 0: never. (PaddleOCR:
    # not applied.)
    retry_below: float = 0.9


class OcrEngine:
    """``recognise(images)``: per image (an RGB ``uint8`` array, H x W x 3), its lines in the engine's order,
    or the exception that image raised: one bad image never fails the others."""

    models: OcrModels

    def recognise(self, images: Sequence[np.ndarray]) -> list[list[Line] | Exception]:
        out: list[list[Line] | Exception] = []
        for img in images:
            try:
                out.append(self._one(img))
            except Exception as e:  # noqa: BLE001 - an engine error belongs to its image, not the batch
                out.append(e)
        return out

    def _one(self, rgb: np.ndarray) -> list[Line]:  # pragma: no cover - abstract
        raise NotImplementedError


def mean_confidence(lines: Sequence[Line]) -> float:
    """The recogniser's confidence per character (a long line weighs more than a stray mark);
    0 without text."""
    chars = sum(max(1, len(ln.text)) for ln in lines)
    return sum(max(1, len(ln.text)) * ln.confidence for ln in lines) / chars if lines else 0.0


class RapidOcrEngine(OcrEngine):
    def __init__(self, models: OcrModels, opts: OcrOptions):
        import cv2
        from rapidocr import RapidOCR

        self.models = models
        self._retry_below = opts.retry_below
        threads = max(1, min(int(opts.threads), os.cpu_count() or 1))
        cv2.setNumThreads(threads)  # OpenCV's resizes and warps: the same share of cores as the models
        if "keys" not in models.files:
            _check_rec_characters(models.files["rec"])
        params: dict[str, Any] = {
            # "The text detection result is empty" is a result here, not a warning
            "Global.log_level": "error",
            "Global.use_cls": opts.angle,
            "Det.model_path": models.files["det"],
            "Det.limit_side_len": opts.det_limit_side_len,
            "Det.limit_type": opts.det_limit_type,
            "Rec.model_path": models.files["rec"],
            "EngineConfig.onnxruntime.intra_op_num_threads": threads,
            "EngineConfig.onnxruntime.inter_op_num_threads": 1,
        }
        if opts.angle:
            params["Cls.model_path"] = models.files["cls"]
        if "keys" in models.files:
            params["Rec.rec_keys_path"] = models.files["keys"]
        self._ocr = RapidOCR(params=params)
        self._min_confidence = opts.min_line_confidence
        # RapidOCR loads each model on first use; load them all now, so a broken file fails setup(),
        # not a row.
        self._ocr._load_det_model()
        self._ocr._load_rec_model()
        if opts.angle:
            self._ocr._load_cls_model()

    def _one(self, rgb: np.ndarray) -> list[Line]:
        from rapidocr.utils.process_img import map_boxes_to_original

        # RapidOCR's own steps, as its __call__ runs them, but keeping the angle classifier's verdict per line
        # (its __call__ drops it). Arrays go in as BGR, OpenCV's order.
        img, record = self._ocr.preprocess_img(np.ascontiguousarray(rgb[:, :, ::-1]))
        det, cls, rec, crops = self._ocr.run_ocr_steps(img, record)
        if det.boxes is None or rec.txts is None:
            return []
        boxes = map_boxes_to_original(det.boxes, record, *rgb.shape[:2])
        texts, scores = list(rec.txts), [float(s) for s in rec.scores]
        if cls.cls_res is not None:  # what the classifier turned: "180" above its threshold
            thresh = self._ocr.text_cls.cls_thresh
            angles = [180 if "180" in label and score > thresh else 0 for label, score in cls.cls_res]
        else:
            angles = [0] * len(texts)
        self._reread(cls.img_list if cls.img_list is not None else crops, texts, scores, angles)
        return [
            Line(tuple((float(x), float(y)) for x, y in box), text, score, angle)
            for box, text, score, angle in zip(boxes, texts, scores, angles)
            if text.strip() and score >= self._min_confidence
        ]

    def _reread(
        self, crops: list[np.ndarray], texts: list[str], scores: list[float], angles: list[int]
    ) -> None:
        """Read the doubtful lines' crops turned over; keep the more confident reading (in place)."""
        import cv2
        from rapidocr.ch_ppocr_rec import TextRecInput

        doubtful = [k for k, s in enumerate(scores) if s < self._retry_below]
        if not doubtful:
            return
        again = self._ocr.text_rec(TextRecInput(img=[cv2.rotate(crops[k], cv2.ROTATE_180) for k in doubtful]))
        for k, text, score in zip(doubtful, again.txts, again.scores):
            if float(score) > scores[k]:
                texts[k], scores[k], angles[k] = text, float(score), 180 - angles[k]


def _check_rec_characters(rec: str) -> None:
    """A recogniser without its character list in its metadata makes RapidOCR download a keys file: refuse."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    meta = (
        ort.InferenceSession(rec, opts, providers=["CPUExecutionProvider"])
        .get_modelmeta()
        .custom_metadata_map
    )
    if "character" not in meta:
        raise FileNotFoundError(
            f"engine rapidocr: the recogniser {rec} has no character list inside; put its keys "
            f"file (one character a line, *.txt) next to it"
        )


class PaddleOcrEngine(OcrEngine):
    def __init__(self, models: OcrModels, opts: OcrOptions):
        # PaddleX otherwise checks that its model hosts answer when it is imported; every model here is local.
        os.environ.setdefault("PADDLE_PDX_DISABLE_MODEL_SOURCE_CHECK", "True")
        from paddleocr import PaddleOCR

        self.models = models
        self._min_confidence = (
            opts.min_line_confidence
        )  # applied here: PaddleX's own filter leaves the angles unfiltered
        kwargs: dict[str, Any] = {}
        if opts.angle:
            kwargs.update(
                textline_orientation_model_name=models.names["cls"],
                textline_orientation_model_dir=models.files["cls"],
            )
        self._ocr = PaddleOCR(
            text_detection_model_name=models.names["det"],
            text_detection_model_dir=models.files["det"],
            text_recognition_model_name=models.names["rec"],
            text_recognition_model_dir=models.files["rec"],
            use_doc_orientation_classify=False,
            use_doc_unwarping=False,
            use_textline_orientation=opts.angle,
            text_det_limit_side_len=opts.det_limit_side_len,
            text_det_limit_type=opts.det_limit_type,
            text_rec_score_thresh=0.0,
            device="cpu",
            cpu_threads=max(1, int(opts.threads)),
            **kwargs,
        )

    def _one(self, rgb: np.ndarray) -> list[Line]:
        [res] = self._ocr.predict(np.ascontiguousarray(rgb[:, :, ::-1]))  # PaddleX takes arrays as BGR
        # textline_orientation_angles: 0 or 180 per line, -1 without the orientation model
        angles = list(res.get("textline_orientation_angles") or []) or [0] * len(res["rec_texts"])
        return [
            Line(
                tuple((float(x), float(y)) for x, y in np.asarray(poly).reshape(-1, 2)),
                str(text),
                float(score),
                max(0, int(angle)),
            )
            for poly, text, score, angle in zip(res["rec_polys"], res["rec_texts"], res["rec_scores"], angles)
            if text.strip() and score >= self._min_confidence
        ]


def load_ocr(models: OcrModels, opts: OcrOptions | None = None) -> OcrEngine:
    """Build the engine ``models`` names (once per worker: loading takes a fraction of a second)."""
    opts = opts or OcrOptions()
    if opts.det_limit_type not in LIMIT_TYPES:
        raise ValueError(
            f"det_limit_type: expected one of {', '.join(LIMIT_TYPES)}, got {opts.det_limit_type!r}"
        )
    cls = RapidOcrEngine if models.engine == "rapidocr" else PaddleOcrEngine
    return cls(models, opts)
