"""Token accounting that matches the model, so a mixture recipe can hit an exact token budget.

Text goes through the model's own tokenizer (Qwen3's ``tokenizer.json``, :class:`Tokenizer`); images and
videos cost what :mod:`curation.target.geometry` says the vision tower makes of them; :class:`Markup` adds
the tokens the training template puts around content. :func:`row_tokens` counts whole pool batches.
The geometry itself (patch, merge, resize bounds) is the model's input contract and lives on the ground
floor; what is here is about budgets: counting rows of a pool for the mixture builder.

    >>> row_tokens(table, Tokenizer.load("/models/Keye-VL-8B"))["total"]   # doctest: +SKIP
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curation.schema import conform, message_texts
from curation.target.geometry import VisionConfig

log = logging.getLogger(__name__)


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
        """Tokens of each text (int64); ``None`` and ``""`` count 0. Batched: Rust runs them in parallel."""
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
