"""CLIP score: cosine similarity of an image and its text under an open_clip model (DataComp-style filtering).

What is compared with what:

- ``image_text``: the image with its caption (``text``).
- ``interleaved``: every image with its *nearest text* in document order: the non-empty text whose
  position is closest to the image's; on a tie (a text just before and just after), the text *before*
  the image, the paragraph that introduces it (the layout of the sample corpus and of most blog posts).
  The row's score is the *mean* over its images; each image's score is in ``<label>_parts``.
- ``video``: every sampled frame (``frames``) with the caption; the row's score is the mean, or the max
  with ``video_reduce: max`` (an action that shows in a few frames); per-frame scores in ``<label>_parts``.

Decoding and preprocessing run on ``decode_threads`` threads, ``PREFETCH`` batches ahead of the model
(JPEG decoding in Pillow releases the GIL), so the forward pass does not wait on them while CPUs are free.
"""

from __future__ import annotations

import bisect
import functools
import io
import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from curation.bounds import bounded
from curation.stage import NotReady, ScoreFilter, reason_where, register, required, unscored

log = logging.getLogger(__name__)

MAX_DETAIL = 283  # characters of an unreadable image's error kept in the reject detail
PREFETCH = 2  # batches being decoded while the model runs one; more only holds memory
DEVICES = ("auto", "cpu", "cuda")
REDUCERS = ("mean", "max")


@register
class ClipScore(ScoreFilter):
    """Score image-text agreement with an open_clip model; reject below an absolute or a relative bar.

    ``model``: a spec (``curation.models.clip``): ``ViT-B-32:datacomp_xl_s13b_b90k``, ``ARCH:/path.pt``, a
    path written by ``save_clip`` or ``local-dir:/folder``. Weights are never downloaded unless
    ``allow_download: true``; a missing file, an uncached tag or a GPU that is not there stops the run before
    any data is read.

    Thresholds (at most one; neither = score only, the row is kept):

    - ``min_score``: reject rows whose cosine similarity is below it, reason ``score_below_min``
      (OpenAI ViT-B/32 pairs are commonly cut at 0.28 in LAION; the bar depends on the model).
    - ``keep_fraction``: keep the best fraction of the *whole* dataset (DataComp's "top 30%": 0.3). The cut
      needs the global quantile: the runner computes it once every row is scored and rejects the rest
      (``below_keep_fraction``); this stage rejects nothing for a low score.

    Rows that cannot be scored are rejected whatever the thresholds: ``no_image`` (no image, no image in a
    document, no sampled frame), ``no_caption`` (empty text, a document without text) and
    ``unreadable_image`` (bytes that do not decode; the detail names the image or frame). ``annotate_only:
    true`` keeps every row. Columns: ``score_<label>`` (float64, -1..1) and ``<label>_parts`` (per image or
    frame, for documents and videos).
    """

    name: ClassVar[str] = "clip_score"
    reads: ClassVar[tuple[str, ...]] = ("text", "image", "texts", "images", "frames")
    default_modalities: ClassVar[tuple[str, ...]] = ("image_text", "interleaved", "video")
    requires: ClassVar[tuple[tuple[str, str], ...]] = (("torch", "clip"), ("open_clip", "clip"))

    ranks: ClassVar[bool] = True  # a higher score is a better pair: keep_fraction applies

    model: str = required(
        "the CLIP model: ARCH:TAG (e.g. ViT-B-32:datacomp_xl_s13b_b90k), ARCH:/path/to/weights.pt, "
        "a checkpoint written by curation.models.clip.save_clip, or local-dir:/path/to/open_clip/folder"
    )
    min_score: float | None = bounded(None, -1, 1)  # absolute cosine threshold
    batch_size: int = bounded(64, 1, 4096)  # images per forward pass
    device: str = "auto"  # auto: cuda when resources.num_gpus > 0, else cpu
    precision: str = "fp32"  # fp16 / bf16: autocast (GPUs)
    # threads decoding ahead of the model; None: resources.num_cpus; 0: inline
    decode_threads: int | None = bounded(None, 0, 256)
    allow_download: bool = False  # let open_clip fetch a tag's weights (on the driver, before any data)
    cache_dir: str | None = None  # open_clip's download cache (default: Hugging Face's and ~/.cache/clip)
    video_reduce: str = "mean"  # frames -> row score: mean or max

    def __post_init__(self):
        from curation.models.clip import PRECISIONS

        problems = []
        if self.min_score is not None and self.keep_fraction is not None:
            problems.append("min_score and keep_fraction: give one threshold, not both")
        if self.min_score is not None and not -1.0 <= self.min_score <= 1.0:
            problems.append(f"min_score: a cosine similarity is in -1..1, got {self.min_score}")
        if self.batch_size < 1:
            problems.append(f"batch_size: expected a positive integer, got {self.batch_size}")
        if self.decode_threads is not None and self.decode_threads < 0:
            problems.append(f"decode_threads: expected 0 or more, got {self.decode_threads}")
        for key, allowed in (("device", DEVICES), ("precision", PRECISIONS), ("video_reduce", REDUCERS)):
            if getattr(self, key) not in allowed:
                problems.append(f"{key}: expected one of {', '.join(allowed)}, got {getattr(self, key)!r}")
        if problems:
            raise ValueError("; ".join(problems))
        self._weights = None  # the spec resolved by preflight, on the driver
        self._clip = None
        self._pool = None

    def __getstate__(self):  # shipped to workers before setup; never with a model or threads
        return {k: v for k, v in self.__dict__.items() if k not in ("_clip", "_pool")}

    def __setstate__(self, state):
        self.__dict__.update(state, _clip=None, _pool=None)

    @property
    def parts_name(self) -> str:
        return f"{self.label}_parts"

    def output_fields(self) -> list[pa.Field]:
        return [pa.field(self.score_name, pa.float64()), pa.field(self.parts_name, pa.list_(pa.float64()))]

    # ------------------------------------------------------------ driver: before any data is read

    def check_requirements(self) -> None:
        from curation.models.torch_compat import ensure_torchvision

        try:  # importing open_clip imports torchvision, which needs the fix on CPU builds of torch
            ensure_torchvision()
        except ImportError:
            pass  # reported below, with the install command
        super().check_requirements()

    def preflight(self) -> None:
        """The weights resolve (downloaded now if allowed), and a GPU stage has a CUDA build of torch."""
        import torch

        from curation.models.clip import resolve_clip

        wants_gpu = self.resources.num_gpus > 0
        if self.device == "cuda" and not wants_gpu:
            raise NotReady(
                f"stage '{self.label}': device: cuda needs resources.num_gpus > 0 (Ray gives a "
                f"worker a GPU only when the stage asks for one)"
            )
        if wants_gpu and torch.version.cuda is None and torch.version.hip is None:
            raise NotReady(
                f"stage '{self.label}' asks for resources.num_gpus: {self.resources.num_gpus:g} but "
                f"torch {torch.__version__} is a CPU build and cannot use a GPU; install a CUDA build "
                f"of torch, or set resources.num_gpus: 0 to score on CPU"
            )
        if wants_gpu and not torch.cuda.is_available():
            log.warning(
                "stage %s: no GPU visible on the driver; the workers' GPUs are checked when Ray starts",
                self.label,
            )
        try:
            self._weights = resolve_clip(self.model, self.allow_download, self.cache_dir)
        except (FileNotFoundError, ValueError) as e:
            raise NotReady(f"stage '{self.label}': {e}") from e

    def lineage(self) -> dict[str, Any]:
        from curation.models.clip import resolve_clip

        weights = self._weights or resolve_clip(self.model, self.allow_download, self.cache_dir)
        return {"model": weights.name, "checkpoint_sha256": weights.sha256(), "precision": self.precision}

    # ------------------------------------------------------------ workers

    def setup(self) -> None:
        import torch

        device = self.device
        if device == "auto":
            device = "cuda" if self.resources.num_gpus > 0 else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise NotReady(
                f"stage '{self.label}': this worker has no usable GPU (torch {torch.__version__}, "
                f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})"
            )
        from curation.models.clip import resolve_clip

        # resolved again here: a tag's weights are in this node's cache, which is not the driver's
        weights = resolve_clip(self.model, self.allow_download, self.cache_dir)
        stat = os.stat(weights.checkpoint)  # a checkpoint rewritten in place is a new model
        self._clip = _shared_model(weights, device, self.precision, (stat.st_size, stat.st_mtime_ns))
        threads = (
            self.decode_threads if self.decode_threads is not None else max(1, round(self.resources.num_cpus))
        )
        self._pool = (
            ThreadPoolExecutor(threads, thread_name_prefix=f"{self.label}-decode") if threads else None
        )
        side = min(self._clip.image_size)
        self._draft = (side, side)

    def score(self, batch: pa.Table) -> dict[str, pa.Array]:
        if self._clip is None:
            self.setup()
        n = batch.num_rows
        cols = {c: batch[c].to_pylist() for c in ("modality", *self.reads)}
        failed: list[str | None] = [None] * n
        detail: list[str | None] = [None] * n
        images: list[bytes] = []  # one entry per (image, text) pair
        pair_text: list[str] = []
        pair_row: list[int] = []
        for i in range(n):
            pairs, failed[i], detail[i] = self._pairs(cols, i)
            for data, text in pairs:
                images.append(data)
                pair_text.append(text)
                pair_row.append(i)
        sims, bad = self._similarities(images, pair_text)
        scores = np.full(n, np.nan)
        parts: list[list[float] | None] = [None] * n
        by_row: dict[int, list[int]] = {}
        for k, i in enumerate(pair_row):
            by_row.setdefault(i, []).append(k)
        for i, ks in by_row.items():
            unreadable = [(j, bad[k]) for j, k in enumerate(ks) if bad[k] is not None]
            if unreadable:
                j, err = unreadable[0]
                what = {"interleaved": f"image {j}: ", "video": f"frame {j}: "}.get(cols["modality"][i], "")
                failed[i], detail[i] = "unreadable_image", f"{what}{err}"[:MAX_DETAIL]
                continue
            values = sims[ks]
            if cols["modality"][i] == "image_text":
                scores[i] = values[0]
            else:
                parts[i] = values.tolist()
                scores[i] = (
                    values.max()
                    if cols["modality"][i] == "video" and self.video_reduce == "max"
                    else values.mean()
                )
        return {
            self.score_name: pa.array(scores, mask=np.isnan(scores)),
            self.parts_name: pa.array(parts, pa.list_(pa.float64())),
            **unscored(failed, detail),
        }

    def decide(self, batch, scores):
        if self.min_score is None:
            return pa.nulls(batch.num_rows, pa.string())
        score = scores[self.score_name]
        below = pc.less(score, self.min_score)
        detail = [None if s is None else f"{s:.4f} < {self.min_score:g}" for s in score.to_pylist()]
        return reason_where(below, "score_below_min"), pc.if_else(
            pc.fill_null(below, False), pa.array(detail, pa.string()), pa.scalar(None, pa.string())
        )

    def _pairs(self, cols: dict[str, list], i: int) -> tuple[list[tuple[bytes, str]], str | None, str | None]:
        """The (image bytes, text) pairs of row ``i``; or none, the reason it cannot be scored and
        a detail."""
        modality = cols["modality"][i]
        if modality == "interleaved":
            texts, images = cols["texts"][i] or [], cols["images"][i] or []
            text_pos = [p for p, t in enumerate(texts) if _has_text(t)]
            image_pos = [p for p, d in enumerate(images) if d is not None]
            if not image_pos:
                return [], "no_image", "the document has no image"
            if not text_pos:
                return [], "no_caption", "the document has no text"
            return [(images[p], texts[nearest_text(text_pos, p)]) for p in image_pos], None, None
        if not _has_text(cols["text"][i]):
            return [], "no_caption", None
        if modality == "video":
            frames = [f for f in cols["frames"][i] or [] if f is not None]
            if not frames:
                return [], "no_image", "no sampled frames"
            return [(f, cols["text"][i]) for f in frames], None, None
        if cols["image"][i] is None:
            return [], "no_image", None
        return [(cols["image"][i], cols["text"][i])], None, None

    def _similarities(self, images: list[bytes], texts: list[str]) -> tuple[np.ndarray, list[str | None]]:
        """Cosine similarity of every (image, text) pair, and the decode error of each image (None: fine).

        Images are decoded ``PREFETCH`` batches ahead of the model on the thread pool; the texts are
        encoded while the first batches decode.
        """
        import torch

        sims = np.full(len(images), np.nan)
        errors: list[str | None] = [None] * len(images)
        if not images:
            return sims, errors
        bs = self.batch_size
        starts = range(0, len(images), bs)
        pending: dict[int, list] = {}

        def submit(b: int) -> None:
            if self._pool is not None and b < len(starts):
                pending[b] = [self._pool.submit(self._load, d) for d in images[starts[b] : starts[b] + bs]]

        for b in range(PREFETCH):
            submit(b)
        unique = list(dict.fromkeys(texts))
        text_emb = torch.cat([self._clip.encode_texts(unique[s : s + bs]) for s in range(0, len(unique), bs)])
        position = {t: j for j, t in enumerate(unique)}
        text_idx = torch.as_tensor([position[t] for t in texts])
        for b, start in enumerate(starts):
            submit(b + PREFETCH)
            loaded = (
                [f.result() for f in pending.pop(b)]
                if self._pool is not None
                else [self._load(d) for d in images[start : start + bs]]
            )
            ok = []
            for k, (pixels, err) in enumerate(loaded, start):
                if err is None:
                    ok.append((k, pixels))
                else:
                    errors[k] = err
            if not ok:
                continue
            idx = [k for k, _ in ok]
            emb = self._clip.encode_images(self._clip.pixels([p for _, p in ok]))
            sims[idx] = (emb * text_emb[text_idx[idx].to(emb.device)]).sum(-1).double().cpu().numpy()
        return np.clip(sims, -1.0, 1.0), errors

    def _load(self, data: bytes) -> tuple[Any, str | None]:
        """(the image resized and cropped, uint8, None) or (None, why the bytes are not an image). Runs on
        the pool: Pillow only, which releases the GIL while it decodes and resizes."""
        try:
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > Image.MAX_IMAGE_PIXELS:
                return None, f"{w}x{h} is above Pillow's decompression-bomb limit"
            img.draft(
                img.mode, self._draft
            )  # JPEG: decode at the smallest 1/2^k scale still >= the model's size
            return self._clip.prepare(img), None
        except Exception as e:  # noqa: BLE001 - Pillow raises many types for bad data
            return None, _ADDRESS.sub("", f"{type(e).__name__}: {e}")


@functools.lru_cache(maxsize=2)
def _shared_model(weights, device: str, precision: str, version: tuple[int, int]):
    """One copy of a model per worker process: later jobs (and other instances) on the same file reuse it."""
    from curation.models.clip import load_clip

    return load_clip(weights.spec, device=device, precision=precision, weights=weights)


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")  # object addresses: reject details must not vary between runs


def _has_text(text: str | None) -> bool:
    return bool(text and text.strip())


def nearest_text(text_positions: list[int], image_position: int) -> int:
    """The text position closest to ``image_position``; on a tie the one before it.

    ``text_positions`` is sorted and not empty.

    >>> nearest_text([0, 2, 5], 1), nearest_text([0, 2, 5], 4), nearest_text([3], 0)
    (0, 5, 3)
    """
    k = bisect.bisect_left(text_positions, image_position)
    before = text_positions[k - 1] if k > 0 else None
    after = text_positions[k] if k < len(text_positions) else None
    if after is None or (before is not None and image_position - before <= after - image_position):
        return before
    return after
