"""Token accounting that matches the model, so a mixture recipe can hit an exact token budget.

Keye-VL reads an image as SigLIP 14-pixel patches whose 2x2 neighbourhoods the MLP projector merges
into one LLM token, after a Qwen2-VL-style resize to multiples of 28 pixels; a video is a run of such
frames merged in temporal pairs; text goes through the Qwen3 tokenizer. Budgets counted any other way
(bytes, words, a fixed cost per image) drift from what the trainer sees by tens of percent.

    >>> visual_tokens(224, 224)
    64
    >>> video_tokens((8, 224, 224))   # 4 frame pairs, each raised to the video minimum: 12 x 12 tokens
    576
"""

from __future__ import annotations

import io
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Integral
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curation.schema import conform, message_texts

log = logging.getLogger(__name__)

PATCH = 14
MERGE = 2
_UNIT = PATCH * MERGE  # 28: one visual token covers a 28x28 pixel square
MIN_PIXELS = 4 * _UNIT * _UNIT  # 4 tokens: Keye-VL's default lower bound per image
MAX_PIXELS = 16384 * _UNIT * _UNIT  # 16,384 tokens: its default upper bound per image
# Video frames are bounded tighter than images (qwen-vl-utils' VIDEO_MIN_PIXELS / VIDEO_MAX_PIXELS):
# between 128 and 768 tokens per temporal pair of frames.
VIDEO_MIN_PIXELS = 128 * _UNIT * _UNIT
VIDEO_MAX_PIXELS = 768 * _UNIT * _UNIT
TEMPORAL_PATCH = 2
MAX_RATIO = 200  # the reference refuses longer/shorter side ratios above this


def _check_ratio(width: float, height: float, max_ratio: float) -> None:
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    ratio = max(width, height) / min(width, height)
    if ratio > max_ratio:
        raise ValueError(
            f"absolute aspect ratio must be smaller than {max_ratio}, got {ratio} ({width}x{height})"
        )


def smart_resize(
    width: int,
    height: int,
    *,
    patch: int = PATCH,
    merge: int = MERGE,
    min_pixels: int = MIN_PIXELS,
    max_pixels: int = MAX_PIXELS,
    max_ratio: float = MAX_RATIO,
) -> tuple[int, int]:
    """The ``(width, height)`` the model resizes an image to: Qwen2-VL's ``smart_resize`` rule.

    Each side is rounded to the nearest multiple of ``patch * merge`` (28), at least 28. If the area is
    then above ``max_pixels``, both sides are divided by ``sqrt(h * w / max_pixels)`` and floored to
    multiples of 28; if below ``min_pixels``, multiplied by ``sqrt(min_pixels / (h * w))`` and ceiled.
    So the aspect ratio is kept as closely as 28-pixel steps allow. Note the argument order is
    (width, height), unlike the reference's (height, width).

    Worked example, a 1000x700 photo: 1000/28 = 35.7 rounds to 36 (1008 px), 700/28 = 25 (700 px);
    1008 x 700 lies within the default bounds, so it costs 36 x 25 = 900 tokens.

    >>> smart_resize(1000, 700)
    (1008, 700)
    """
    _check_ratio(width, height, max_ratio)
    f = patch * merge
    h_bar = max(f, round(height / f) * f)
    w_bar = max(f, round(width / f) * f)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(f, math.floor(height / beta / f) * f)
        w_bar = max(f, math.floor(width / beta / f) * f)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / f) * f
        w_bar = math.ceil(width * beta / f) * f
    return int(w_bar), int(h_bar)


def visual_tokens(
    width: int,
    height: int,
    *,
    patch: int = PATCH,
    merge: int = MERGE,
    min_pixels: int = MIN_PIXELS,
    max_pixels: int = MAX_PIXELS,
    max_ratio: float = MAX_RATIO,
) -> int:
    """LLM tokens one image costs: ``(H / 28) * (W / 28)`` after :func:`smart_resize`.

    The 1000x700 photo of :func:`smart_resize` costs 900; a 56x56 (or 1x1) image costs the minimum, 4;
    a 10x20 one is scaled up keeping its shape, to 56x84 = 6 tokens; an 8000x6000 scan is scaled down
    to 4116x3080 = 16,170 tokens, under the 16,384 cap.

    >>> visual_tokens(1000, 700), visual_tokens(56, 56), visual_tokens(10, 20), visual_tokens(8000, 6000)
    (900, 4, 6, 16170)
    """
    w, h = smart_resize(
        width,
        height,
        patch=patch,
        merge=merge,
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        max_ratio=max_ratio,
    )
    f = patch * merge
    return (w // f) * (h // f)


def visual_tokens_np(
    widths: Any,
    heights: Any,
    *,
    patch: int = PATCH,
    merge: int = MERGE,
    min_pixels: int = MIN_PIXELS,
    max_pixels: int = MAX_PIXELS,
    max_ratio: float = MAX_RATIO,
) -> np.ndarray:
    """:func:`visual_tokens` over arrays of sizes (int64 result), for whole batches at once.

    The same float operations in the same order as the scalar rule (numpy's ``round`` rounds half to
    even, like Python's), so both agree exactly; the scalar one stays as the readable reference.
    """
    w = np.asarray(widths, dtype=np.float64)
    h = np.asarray(heights, dtype=np.float64)
    if w.shape != h.shape:
        raise ValueError(f"widths and heights differ in shape: {w.shape} vs {h.shape}")
    if w.size == 0:
        return np.zeros(w.shape, np.int64)
    bad = np.flatnonzero(~((w > 0) & (h > 0)))
    if bad.size:
        i = bad[0]
        raise ValueError(f"image size must be positive, got {w.flat[i]:g}x{h.flat[i]:g} at index {i}")
    ratio = np.maximum(w, h) / np.minimum(w, h)
    bad = np.flatnonzero(ratio > max_ratio)
    if bad.size:
        i = bad[0]
        raise ValueError(
            f"absolute aspect ratio must be smaller than {max_ratio}, got {ratio.flat[i]} "
            f"({w.flat[i]:g}x{h.flat[i]:g} at index {i})"
        )
    f = float(patch * merge)
    h_bar = np.maximum(f, np.round(h / f) * f)
    w_bar = np.maximum(f, np.round(w / f) * f)
    area = h_bar * w_bar
    big = area > max_pixels
    small = ~big & (area < min_pixels)
    with np.errstate(divide="ignore", invalid="ignore"):
        down = np.sqrt((h * w) / max_pixels)
        up = np.sqrt(min_pixels / (h * w))
        h_bar = np.where(big, np.maximum(f, np.floor(h / down / f) * f), h_bar)
        w_bar = np.where(big, np.maximum(f, np.floor(w / down / f) * f), w_bar)
        h_bar = np.where(small, np.ceil(h * up / f) * f, h_bar)
        w_bar = np.where(small, np.ceil(w * up / f) * f, w_bar)
    return ((h_bar / f).astype(np.int64) * (w_bar / f).astype(np.int64)).reshape(w.shape)


def video_tokens(
    frames: tuple[int, int, int] | Sequence[tuple[int, int]],
    *,
    temporal_patch: int = TEMPORAL_PATCH,
    patch: int = PATCH,
    merge: int = MERGE,
    min_pixels: int = VIDEO_MIN_PIXELS,
    max_pixels: int = VIDEO_MAX_PIXELS,
    max_ratio: float = MAX_RATIO,
) -> int:
    """LLM tokens a video's sampled frames cost.

    ``frames`` is ``(n_frames, width, height)`` or a list of per-frame ``(width, height)``. Frames merge
    in groups of ``temporal_patch`` (2): ``ceil(n / 2)`` groups (an odd last frame is padded, as the
    reference repeats it), each costing :func:`visual_tokens` of its first frame under the video bounds
    (default 128 to 768 tokens per group: tighter than images, since a video has many frames).

    Worked example: 9 frames of 640x360 make 5 pairs; 640x360 rounds to 644x364 = 23 x 13 = 299
    tokens, within bounds, so the video costs 5 x 299 = 1495 tokens.

    >>> video_tokens((9, 640, 360)), video_tokens([(640, 360)] * 9)
    (1495, 1495)
    """
    kw = {
        "patch": patch,
        "merge": merge,
        "min_pixels": min_pixels,
        "max_pixels": max_pixels,
        "max_ratio": max_ratio,
    }
    if len(frames) == 3 and all(isinstance(x, Integral) for x in frames):
        n, width, height = frames  # type: ignore[misc]
        if n < 0:
            raise ValueError(f"n_frames must be >= 0, got {n}")
        return 0 if n == 0 else -(-n // temporal_patch) * visual_tokens(width, height, **kw)
    sizes = list(frames)[::temporal_patch]
    return sum(visual_tokens(w, h, **kw) for w, h in sizes)  # type: ignore[misc]


@dataclass(frozen=True)
class VisionConfig:
    """How the vision tower turns pixels into LLM tokens (Keye-VL defaults)."""

    patch: int = PATCH  # SigLIP patch side in pixels
    merge: int = MERGE  # the projector merges merge x merge patches into one token
    min_pixels: int = MIN_PIXELS  # per image: 4 tokens
    max_pixels: int = MAX_PIXELS  # per image: 16,384 tokens
    video_min_pixels: int = VIDEO_MIN_PIXELS  # per temporal group of frames: 128 tokens
    video_max_pixels: int = VIDEO_MAX_PIXELS  # per temporal group of frames: 768 tokens
    temporal_patch: int = TEMPORAL_PATCH  # frames merged along time
    max_ratio: float = MAX_RATIO

    def image_tokens(self, widths: Any, heights: Any) -> np.ndarray:
        return visual_tokens_np(
            widths,
            heights,
            patch=self.patch,
            merge=self.merge,
            min_pixels=self.min_pixels,
            max_pixels=self.max_pixels,
            max_ratio=self.max_ratio,
        )

    def frame_tokens(self, widths: Any, heights: Any) -> np.ndarray:
        """Tokens of one temporal group of frames of these sizes."""
        return visual_tokens_np(
            widths,
            heights,
            patch=self.patch,
            merge=self.merge,
            min_pixels=self.video_min_pixels,
            max_pixels=self.video_max_pixels,
            max_ratio=self.max_ratio,
        )


class Tokenizer:
    """Counts text tokens with a Hugging Face ``tokenizers`` tokenizer (the model's ``tokenizer.json``).

    Truncation and padding that a ``tokenizer.json`` may carry are switched off: they would cap or
    inflate counts.

    >>> tok = Tokenizer.load("/models/Keye-VL-8B")        # doctest: +SKIP
    >>> tok.count(["hello world", None]).tolist()         # doctest: +SKIP
    [2, 0]
    """

    def __init__(self, backend: Any, source: str):
        backend.no_truncation()
        backend.no_padding()
        self.backend = backend
        self.source = source
        # encode_batch_fast (tokenizers >= 0.21) skips character offsets, which counting never needs.
        self._encode = getattr(backend, "encode_batch_fast", backend.encode_batch)

    def __repr__(self) -> str:
        return f"Tokenizer({self.source!r})"

    @classmethod
    def load(cls, name_or_path: str | Path, *, allow_download: bool = False) -> Tokenizer:
        """From a ``tokenizer.json`` file, a folder holding one, or (``allow_download=True``) a hub name."""
        try:
            from tokenizers import Tokenizer as HFTokenizer
        except ImportError as e:  # declared as the `mix` extra; never installed at run time
            raise ImportError("token counting needs 'tokenizers': pip install 'keye-curation[mix]'") from e
        path = Path(name_or_path).expanduser()
        if path.is_dir():
            path = path / "tokenizer.json"
            if not path.is_file():
                raise FileNotFoundError(f"no tokenizer.json in folder {path.parent}")
        if path.is_file():
            try:
                return cls(HFTokenizer.from_file(str(path)), str(path))
            except Exception as e:
                raise ValueError(f"cannot load tokenizer from {path}: {e}") from e
        if not allow_download:
            raise FileNotFoundError(
                f"{str(name_or_path)!r} is neither a tokenizer.json file nor a folder holding one "
                "(pass allow_download=True to fetch it from the Hugging Face hub)"
            )
        try:
            return cls(HFTokenizer.from_pretrained(str(name_or_path)), str(name_or_path))
        except Exception as e:
            raise ValueError(f"cannot load tokenizer {str(name_or_path)!r} from the hub: {e}") from e

    def count(
        self, texts: Sequence[str | None], *, add_special_tokens: bool = False, batch_size: int = 4096
    ) -> np.ndarray:
        """Tokens of each text (int64); ``None`` and ``""`` count 0. Batched: the Rust side runs in parallel."""
        out = np.zeros(len(texts), np.int64)
        idx = [i for i, t in enumerate(texts) if t]
        for start in range(0, len(idx), batch_size):
            chunk = idx[start : start + batch_size]
            encs = self._encode([texts[i] for i in chunk], add_special_tokens=add_special_tokens)
            out[chunk] = [len(e.ids) for e in encs]
        return out


def _video_dims(meta: str) -> tuple[int, int] | None:
    try:
        m = json.loads(meta)
    except ValueError:
        return None
    if not isinstance(m, dict):
        return None
    w, h = m.get("video_width"), m.get("video_height")
    return (int(w), int(h)) if w and h else None


def _header_size(blob: bytes, row: str) -> tuple[int, int]:
    """(width, height) from an encoded image's header; PIL decodes no pixels until asked."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(blob)) as im:
            return im.size
    except Exception as e:
        raise ValueError(f"row {row}: cannot read the image header: {e}") from e


def _per_row(n: int, rows: Sequence[int] | np.ndarray, values: np.ndarray) -> np.ndarray:
    if len(rows) == 0:
        return np.zeros(n, np.int64)
    # float64 sums of integers are exact below 2**53 tokens, far above any one row
    return np.bincount(np.asarray(rows, np.int64), weights=values, minlength=n).astype(np.int64)


@dataclass(frozen=True)
class Markup:
    """Tokens the training template adds around content, which no column holds.

    Keye-VL (Qwen3's ChatML) wraps each message as ``<|im_start|>ROLE\n ... <|im_end|>\n`` (5 tokens) and
    each image or video as ``<|vision_start|> ... <|vision_end|>`` (2 tokens); a pre-training document
    ends with one end-of-text token. The defaults count none of it (content only); the shipped recipes
    set Keye-VL's values.
    """

    per_row: int = 0  # e.g. 1: the end-of-text token after each document
    per_message: int = 0  # e.g. 5: ChatML role header and end of turn
    per_image: int = 0  # e.g. 2: vision start and end tokens around each image's patches
    per_video: int = 0  # e.g. 2: the same around a video's frames


def row_tokens(
    table: pa.Table, tokenizer: Tokenizer, vision: VisionConfig | None = None, markup: Markup | None = None
) -> dict[str, np.ndarray]:
    """Per-row ``text_tokens``, ``visual_tokens`` and ``total`` (int64 arrays) of a :data:`ROW_SCHEMA` table.

    Text: ``text``, every string of ``texts`` (interleaved documents), and the text parts of ``messages``
    (SFT; content a string or a list of ``{"type": "text", "text": ...}`` parts), plus the template's
    ``markup`` tokens (per row, per message, per image and per video; none by default).
    Visual: ``image`` at its ``width``/``height`` when both are set, else at its header size; every
    entry of ``images`` at its header size; ``frames`` as one video of ``len(frames)`` frames at the
    first frame's header size. Image and video parts in ``messages`` refer to these columns, so they
    are not counted twice. A ``video`` reference without sampled ``frames`` costs 0 (logged).
    """
    vision = vision or VisionConfig()
    table = conform(table)
    n = table.num_rows
    ids = table.column("id").to_pylist()

    # Text: gather every piece with its row, count all at once (one batched tokenizer call).
    rows: list[int] = []
    pieces: list[str] = []
    for i, t in enumerate(table.column("text").to_pylist()):
        if t:
            rows.append(i)
            pieces.append(t)
    texts = table.column("texts").combine_chunks()
    rows.extend(pc.list_parent_indices(texts).to_numpy().tolist())
    pieces.extend(pc.list_flatten(texts).to_pylist())
    n_messages = np.zeros(n, np.int64)
    for i, m in enumerate(table.column("messages").to_pylist()):
        if m:
            try:
                found = message_texts(m)
            except ValueError as e:
                raise ValueError(f"row {ids[i]}: {e}") from e
            rows.extend([i] * len(found))
            pieces.extend(found)
            if markup is not None and markup.per_message:
                n_messages[i] = len(json.loads(m))
    text_tokens = _per_row(n, rows, tokenizer.count(pieces))

    # Images: the single image (declared size first), then every entry of `images`.
    img_rows, widths, heights = [], [], []
    ws = table.column("width").to_pylist()
    hs = table.column("height").to_pylist()
    for i, blob in enumerate(table.column("image").to_pylist()):
        if blob is None:
            continue
        w, h = (ws[i], hs[i]) if ws[i] and hs[i] else _header_size(blob, ids[i])
        img_rows.append(i)
        widths.append(w)
        heights.append(h)
    for i, blobs in enumerate(table.column("images").to_pylist()):
        for blob in blobs or ():
            if blob is not None:
                w, h = _header_size(blob, ids[i])
                img_rows.append(i)
                widths.append(w)
                heights.append(h)
    visual = _per_row(n, img_rows, vision.image_tokens(widths, heights).astype(np.float64))

    # Video: ceil(n_frames / temporal_patch) groups at the first frame's size.
    vid_rows, groups, widths, heights = [], [], [], []
    frames = table.column("frames").to_pylist()
    missing = 0
    stamps = table.column("frame_ts").to_pylist() if "frame_ts" in table.column_names else [None] * n
    metas = table.column("meta").to_pylist() if "meta" in table.column_names else [None] * n
    for i, (fr, ref) in enumerate(zip(frames, table.column("video").to_pylist())):
        if fr:
            w, h = _header_size(fr[0], ids[i])
            vid_rows.append(i)
            groups.append(-(-len(fr) // vision.temporal_patch))
            widths.append(w)
            heights.append(h)
        elif ref and stamps[i] and metas[i] and (dims := _video_dims(metas[i])):
            # a pool that keeps the clip, not the frames (output.video: clip): as many frames as were sampled,
            # at the video's own size (the model's resize bounds apply to it as to sampled frames)
            vid_rows.append(i)
            groups.append(-(-len(stamps[i]) // vision.temporal_patch))
            widths.append(dims[0])
            heights.append(dims[1])
        elif ref:
            missing += 1
    if missing:
        log.warning("%d video rows have no sampled frames: counted as 0 visual tokens", missing)
    if vid_rows:
        per_video = vision.frame_tokens(widths, heights) * np.asarray(groups, np.int64)
        visual = visual + _per_row(n, vid_rows, per_video.astype(np.float64))

    if markup is not None:
        n_images = np.bincount(np.asarray(img_rows, np.int64), minlength=n)  # a row may hold several
        n_videos = np.zeros(n, np.int64)
        n_videos[vid_rows] = 1
        text_tokens = (
            text_tokens
            + markup.per_row
            + markup.per_message * n_messages
            + markup.per_image * n_images
            + markup.per_video * n_videos
        )
    return {"text_tokens": text_tokens, "visual_tokens": visual, "total": text_tokens + visual}
