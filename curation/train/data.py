"""Streaming a mixture into training batches: shards, streams, positions, samples, collation.

**Shards.** :func:`open_mixture` reads ``manifest.json`` (format ``curation.mixture/1``);
:func:`verify_shards` checks, before training, that every shard of the chosen format exists with its
recorded size, and (``data.verify: sha256``) that the shards this rank reads hash to the recorded sha256.
Local folders and ``s3://`` work alike (:mod:`curation.io.fs`).

**Streams.** Each (rank, data-loader worker) pair is one *stream*: ``rank * workers + worker`` of
``world_size * workers``. Shards are cut into *pieces* (whole shards when there are at least as many as
streams, else equal row ranges), dealt round-robin to streams: every row belongs to exactly one stream.
A stream cycles over its pieces epoch after epoch, so every rank always has data and ranks step together.

**Position.** A stream's position is ``(epoch, piece, row)``, the next row it will read. Every batch
carries its stream's position after its last row; the training loop keeps the position of the last
batch it *consumed* from each stream (prefetched batches do not count) and checkpoints those, with the
number of batches consumed. On resume each stream starts at its recorded row, and streams are rotated
across workers so the first batch comes from the stream that was next: the run continues with exactly
the batches it would have seen.

**Samples** (:class:`SampleBuilder`). Stage 0: an image and its caption. Stages 1 to 3: next-token
prediction over text with image and video blocks inline (``<|vision_start|>``, one pad token per visual
token, ``<|vision_end|>``), loss on text only (stage 1 keeps only rows with a picture). ``sft``: the
ChatML template over ``messages``, loss on assistant turns only. Rows that give no sample are skipped
and counted by reason.

    >>> tok = ByteTokenizer()
    >>> tok.encode("hi"), tok.vocab_size
    ([104, 105], 263)
"""

from __future__ import annotations

import io
import json
import logging
import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from torch.utils.data import IterableDataset, get_worker_info

from curation.io import commit
from curation.io import fs as cfs
from curation.io.tar import iter_tar
from curation.target.geometry import smart_resize
from curation.train.config import STAGE_DEFAULTS, ConfigError, DataConfig, VisionConfig

log = logging.getLogger(__name__)

MIXTURE_FORMAT = "curation.mixture/1"
# Qwen's special tokens: looked up in a tokenizer.json, added after its vocabulary when it lacks them.
SPECIALS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
# Columns the samples are built from (any that a shard lacks are read as null).
COLUMNS = ("key", "id", "modality", "text", "image", "texts", "images", "frames", "frame_ts", "messages")
IGNORE = -100  # label of a position without loss
_MEAN, _STD = 0.5, 0.5  # SigLIP's pixel normalisation: [0, 1] -> [-1, 1]


# ---------------------------------------------------------------- tokenizers


class ByteTokenizer:
    """UTF-8 bytes as tokens, then Qwen's specials: the tiny config needs no tokenizer file."""

    source = "bytes"
    sha256 = None

    def __init__(self) -> None:
        self.special = {s: 256 + i for i, s in enumerate(SPECIALS)}
        self.vocab_size = 256 + len(SPECIALS)

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8", "replace"))


class HFTokenizer:
    """A ``tokenizer.json`` through HF ``tokenizers`` (the mixture's own, e.g. Qwen3's); specials by id."""

    def __init__(self, path: str):
        from curation.mix.tokens import Tokenizer

        try:
            tok = Tokenizer.load(path)
        except (FileNotFoundError, ValueError, ImportError) as e:
            raise ConfigError(f"data.tokenizer: {e}") from None
        self.backend = tok.backend
        self.source = tok.source
        self.sha256 = commit.sha256_file(tok.source)
        base = self.backend.get_vocab_size(with_added_tokens=True)
        self.special, extra = {}, 0
        for s in SPECIALS:
            i = self.backend.token_to_id(s)
            if i is None:
                i, extra = base + extra, extra + 1
            self.special[s] = i
        self.vocab_size = max(base, *self.special.values()) + 1

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids


def load_tokenizer(path: str | None) -> ByteTokenizer | HFTokenizer:
    return HFTokenizer(path) if path else ByteTokenizer()


# ---------------------------------------------------------------- mixture and shards


@dataclass(frozen=True)
class Shard:
    index: int
    uri: str
    rows: int
    bytes: int
    sha256: str


@dataclass
class Mixture:
    path: str
    manifest: dict[str, Any]
    format: str
    shards: list[Shard]

    @property
    def recipe_hash(self) -> str | None:
        return self.manifest.get("recipe_hash")

    def modality_rows(self) -> dict[str, int]:
        """Rows per modality, from the manifest (or the shards' modality column when it has none)."""
        if isinstance(self.manifest.get("modalities"), dict):
            return {k: int(v.get("rows", 0)) for k, v in self.manifest["modalities"].items()}
        counts: Counter[str] = Counter()
        for s in self.shards:
            counts.update(r["modality"] for r in _read_rows(s, self.format, 0, s.rows, ("modality",)))
        return dict(counts)


def open_mixture(path: str, fmt: str) -> Mixture:
    """Read a mixture folder's manifest and its shards of format ``fmt``; raise ConfigError naming the
    problem."""
    if not path:
        raise ConfigError("no mixture given: curation train MIXTURE_FOLDER --stage ...")
    manifest_uri = cfs.join(path, "manifest.json")
    try:
        manifest = json.loads(cfs.read_bytes(manifest_uri))
    except FileNotFoundError:
        raise ConfigError(
            f"{manifest_uri}: not found: is {path} a mixture folder written by `curation mix`?"
        ) from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"{manifest_uri}: cannot read it: {e}") from None
    if manifest.get("format") != MIXTURE_FORMAT:
        raise ConfigError(
            f"{manifest_uri}: format is {manifest.get('format')!r}, not {MIXTURE_FORMAT!r} "
            "(a pool folder? build a mixture from it with `curation mix`)"
        )
    key = "tar" if fmt == "webdataset" else "parquet"
    shards, problems = [], []
    for i, entry in enumerate(manifest.get("shards") or []):
        if key not in entry:
            problems.append(
                f"shard {entry.get('name', i)} has no {fmt} file in the manifest "
                f"(set data.format to {'parquet' if key == 'tar' else 'webdataset'})"
            )
            continue
        f = entry[key]
        shards.append(Shard(i, cfs.join(path, f["path"]), int(entry["rows"]), int(f["bytes"]), f["sha256"]))
    if not shards and not problems:
        problems.append("the manifest lists no shards")
    if problems:
        raise ConfigError(f"mixture {path}:\n" + "\n".join(f"  - {p}" for p in problems))
    return Mixture(path, manifest, fmt, shards)


def verify_shards(mixture: Mixture, verify: str = "sha256", hashed: set[int] | None = None) -> None:
    """Check every shard exists with its recorded size and (``verify: sha256``) that the shards in ``hashed``
    (all when None) hash to the recorded sha256; one ConfigError listing every problem.

    ``size`` checks sizes only, ``none`` existence only. Each rank hashes only the shards it reads.
    """
    problems = []
    for s in mixture.shards:
        fs, p = cfs.filesystem(s.uri)
        info = fs.get_file_info(p)
        if info.type.name == "NotFound":
            problems.append(
                f"{s.uri}: missing (listed in manifest.json; rebuild the mixture with `curation mix`, "
                "which resumes and rewrites missing shards)"
            )
        elif verify != "none" and info.size != s.bytes:
            problems.append(
                f"{s.uri}: {info.size} bytes, the manifest says {s.bytes} (truncated or replaced)"
            )
        elif verify == "sha256" and (hashed is None or s.index in hashed):
            digest = commit.sha256_file(p, fs)
            if digest != s.sha256:
                problems.append(
                    f"{s.uri}: sha256 {digest[:12]}... differs from the manifest's "
                    f"{s.sha256[:12]}... (the file changed after the mixture was written)"
                )
    if problems:
        raise ConfigError(f"mixture {mixture.path}:\n" + "\n".join(f"  - {p}" for p in problems))


def check_stage_rows(mixture: Mixture, stage: str) -> None:
    """Fail before training when the mixture has no row of any modality the stage learns from."""
    spec = STAGE_DEFAULTS[stage]
    have = {k: v for k, v in mixture.modality_rows().items() if v}
    if not any(m in have for m in spec.needs):
        found = ", ".join(f"{k} ({v} rows)" for k, v in sorted(have.items())) or "no rows"
        hint = {
            "sft": "build one from a cold-start pool: curation mix mixtures/coldstart.yaml",
            "0": "stage 0 learns from image-text pairs: curation mix mixtures/stage0_vision.yaml",
        }.get(stage, "use a mixture with images, video or interleaved documents")
        raise ConfigError(
            f"mixture {mixture.path}: stage {stage} ({spec.what}) needs rows of "
            f"{' or '.join(spec.needs)}, and it holds {found}; {hint}"
        )


def _read_rows(
    shard: Shard, fmt: str, start: int, stop: int, columns: tuple[str, ...] = COLUMNS
) -> Iterator[dict[str, Any]]:
    """Rows ``start:stop`` of a shard as dicts (only ``columns``), reading as little of it as the format
    allows."""
    if fmt == "parquet":
        with cfs.open_random_access(shard.uri) as f:
            pf = pq.ParquetFile(f)
            have = [c for c in columns if c in pf.schema_arrow.names]
            first = 0
            for g in range(pf.metadata.num_row_groups):
                n = pf.metadata.row_group(g).num_rows
                if first + n > start and first < stop:
                    table = pf.read_row_group(g, columns=have)
                    lo, hi = max(start - first, 0), min(stop - first, n)
                    for row in table.slice(lo, hi - lo).to_pylist():
                        yield {c: row.get(c) for c in columns}
                first += n
                if first >= stop:
                    return
        return
    index = -1
    with cfs.open_input(shard.uri) as stream:
        for row in _tar_rows(stream):
            index += 1
            if index >= stop:
                return
            if index >= start:
                yield {c: row.get(c) for c in columns}


def _tar_rows(stream) -> Iterator[dict[str, Any]]:
    """Rows of a mixture's WebDataset shard (``curation.io.pool`` members: ``.json``, ``.txt``, the image,
    ``.img{i}.*`` per position of ``images``, ``.frame{NNN}.*`` per frame, the video file)."""
    key, row, images, frames = None, {}, {}, {}

    def emit() -> dict[str, Any]:
        out = dict(row)
        if images:
            n = max(len(out.get("texts") or ()), max(images) + 1)
            out["images"] = [images.get(i) for i in range(n)]
        if frames:
            out["frames"] = [frames[i] for i in sorted(frames)]
        return out

    for name, data in iter_tar(stream):
        k, _, suffix = name.partition(".")
        if k != key:
            if key is not None:
                yield emit()
            key, row, images, frames = k, {"key": k}, {}, {}
        if suffix == "json":
            row.update(json.loads(data))
        elif suffix == "txt":
            row["text"] = data.decode("utf-8", "replace")
        elif suffix.startswith("img") and suffix[3:].split(".")[0].isdigit():
            images[int(suffix[3:].split(".")[0])] = data
        elif suffix.startswith("frame") and suffix[5:].split(".")[0].isdigit():
            frames[int(suffix[5:].split(".")[0])] = data
        elif suffix.lower() in ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tiff"):
            row["image"] = data
    if key is not None:
        yield emit()


# ---------------------------------------------------------------- streams and positions


def plan_pieces(shards: list[Shard], n_streams: int) -> list[list[tuple[int, int, int]]]:
    """Per stream, its pieces ``(shard index, first row, end row)``: disjoint, covering every row once.

    >>> s = [Shard(0, "a", 10, 0, ""), Shard(1, "b", 4, 0, "")]
    >>> plan_pieces(s, 2)
    [[(0, 0, 10)], [(1, 0, 4)]]
    >>> plan_pieces(s, 4)
    [[(0, 0, 5)], [(0, 5, 10)], [(1, 0, 2)], [(1, 2, 4)]]
    """
    parts = max(1, math.ceil(n_streams / len(shards)))
    pieces = []
    for s in shards:
        step = math.ceil(s.rows / parts)
        pieces += [(s.index, a, min(a + step, s.rows)) for a in range(0, s.rows, step)] if step else []
    out: list[list[tuple[int, int, int]]] = [[] for _ in range(n_streams)]
    for j, piece in enumerate(pieces):
        out[j % n_streams].append(piece)
    return out


@dataclass
class Position:
    """The next row a stream reads: row ``row`` of piece ``piece`` in pass ``epoch`` over its pieces."""

    epoch: int = 0
    piece: int = 0
    row: int = 0

    def as_list(self) -> list[int]:
        return [self.epoch, self.piece, self.row]


@dataclass
class StreamPlan:
    """Which streams this rank owns and where each starts."""

    rank: int
    world_size: int
    workers: int  # data-loader workers per rank (0 counts as 1 stream, read in the main process)
    pieces: list[list[tuple[int, int, int]]]  # per global stream
    start: dict[int, Position] = field(default_factory=dict)  # global stream -> position (default: the start)
    consumed: int = 0  # micro-batches this rank consumed before (resume): rotates streams over workers

    @property
    def per_rank(self) -> int:
        return max(1, self.workers)

    def stream_of(self, worker: int) -> int:
        return self.rank * self.per_rank + (worker + self.consumed) % self.per_rank


# ---------------------------------------------------------------- media


def load_frame(
    blob: bytes, patch: int, merge: int, min_pixels: int, max_pixels: int, size: tuple[int, int] | None = None
) -> np.ndarray:
    """Decode an image, resize it to the 28-multiple size :func:`smart_resize` gives (or ``size``): (H, W, 3)
    uint8."""
    from PIL import Image

    with Image.open(io.BytesIO(blob)) as im:
        im = im.convert("RGB")
        if size is None:
            size = smart_resize(
                im.width, im.height, patch=patch, merge=merge, min_pixels=min_pixels, max_pixels=max_pixels
            )
        if im.size != size:
            im = im.resize(size, Image.Resampling.BICUBIC)
        return np.asarray(im)


def patchify(pixels: np.ndarray, patch: int, merge: int) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 3) uint8 -> patches (P, 3 * patch * patch) normalised, in merge-block order, and their
    (row, col).

    Merge-block order: the ``merge x merge`` patches under one LLM token are consecutive, blocks row by row,
    so the projector merges with a reshape and LLM tokens come out row by row.
    """
    h, w, _ = pixels.shape
    gh, gw = h // patch, w // patch
    x = (pixels.astype(np.float32) / 255.0 - _MEAN) / _STD
    x = x.transpose(2, 0, 1).reshape(3, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.transpose(1, 4, 2, 5, 0, 3, 6).reshape(gh * gw, 3 * patch * patch)
    by, bx, dy, dx = np.meshgrid(
        np.arange(gh // merge), np.arange(gw // merge), np.arange(merge), np.arange(merge), indexing="ij"
    )
    rc = np.stack([(by * merge + dy).ravel(), (bx * merge + dx).ravel()], axis=1)
    return np.ascontiguousarray(x), rc


# ---------------------------------------------------------------- samples


@dataclass
class Visual:
    frames: list[tuple[np.ndarray, np.ndarray]]  # per frame: patches, (row, col)
    grid: tuple[int, int]  # patches per frame: rows, columns
    image: bool  # an image (else video frames)


@dataclass
class Sample:
    ids: list[int]
    targets: list[bool]  # token i is a training target (predicted from token i - 1)
    pos: list[list[float]]  # (t, h, w) per token
    visuals: list[Visual]
    key: str


class _Seq:
    """A token sequence under construction with its M-RoPE positions and visual blocks."""

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.targets: list[bool] = []
        self.pos: list[list[float]] = [[], [], []]
        self.next = 0.0
        self.visuals: list[Visual] = []
        self.blocks: list[tuple[int, int]] = []  # [start, end) of each visual block, vision_start to end

    def text(self, ids: list[int], train: bool) -> None:
        for i in ids:
            self.ids.append(i)
            self.targets.append(train)
            for axis in self.pos:
                axis.append(self.next)
            self.next += 1

    def visual(self, vis: Visual, times: list[float] | None, sp: dict[str, int], merge: int) -> None:
        """A vision block. ``times``: per temporal group, seconds since the video's first frame (None:
        image)."""
        start = len(self.ids)
        self.text([sp["<|vision_start|>"]], False)
        th, tw = vis.grid[0] // merge, vis.grid[1] // merge
        pad = sp["<|image_pad|>"] if vis.image else sp["<|video_pad|>"]
        s, top = self.next, self.next
        for t in times if times is not None else [0.0]:
            for r in range(th):
                for c in range(tw):
                    self.ids.append(pad)
                    self.targets.append(False)
                    self.pos[0].append(s + t)
                    self.pos[1].append(s + r)
                    self.pos[2].append(s + c)
            top = max(top, s + t, s + th - 1, s + tw - 1)
        self.next = top + 1
        self.text([sp["<|vision_end|>"]], False)
        self.visuals.append(vis)
        self.blocks.append((start, len(self.ids)))

    def cut(self, seq_len: int) -> bool:
        """Keep at most ``seq_len`` tokens, never part of a visual block; whether anything was cut."""
        if len(self.ids) <= seq_len:
            return False
        end = seq_len
        for k, (a, b) in enumerate(self.blocks):
            if b > seq_len:
                end = min(end, a)
                del self.visuals[k:]
                break
        self.ids, self.targets = self.ids[:end], self.targets[:end]
        self.pos = [axis[:end] for axis in self.pos]
        return True


class SampleBuilder:
    """Turns a mixture row into a sample for one stage; returns a skip reason when the row gives none."""

    def __init__(
        self,
        stage: str,
        tokenizer: ByteTokenizer | HFTokenizer,
        data: DataConfig,
        vision: VisionConfig,
        max_text: int,
    ):
        self.stage, self.tok, self.data, self.vision, self.max_text = stage, tokenizer, data, vision, max_text
        self.sp = tokenizer.special

    # -- media
    def image(self, blob: bytes) -> Visual:
        v, d = self.vision, self.data
        pixels = load_frame(blob, v.patch, v.merge, d.min_pixels, d.max_pixels)
        return Visual(
            [patchify(pixels, v.patch, v.merge)],
            (pixels.shape[0] // v.patch, pixels.shape[1] // v.patch),
            True,
        )

    def video(self, frames: list[bytes], ts: list[float] | None) -> tuple[Visual, list[float]]:
        """At most ``max_frames`` frames spread evenly, all at the first frame's resized size; the time
        of each temporal group (its first frame) in seconds since the first kept frame."""
        v, d = self.vision, self.data
        ts = list(ts) if ts and len(ts) == len(frames) else [float(i) for i in range(len(frames))]
        keep = np.unique(np.linspace(0, len(frames) - 1, min(len(frames), d.max_frames)).round().astype(int))
        first = load_frame(frames[keep[0]], v.patch, v.merge, d.video_min_pixels, d.video_max_pixels)
        size = (first.shape[1], first.shape[0])
        pixels = [first] + [load_frame(frames[i], v.patch, v.merge, 0, 0, size) for i in keep[1:]]
        times = [ts[i] - ts[keep[0]] for i in keep[:: v.temporal_patch]]
        vis = Visual(
            [patchify(p, v.patch, v.merge) for p in pixels], (size[1] // v.patch, size[0] // v.patch), False
        )
        return vis, times

    def _visual(self, seq: _Seq, vis: Visual, times: list[float] | None = None) -> None:
        scaled = None if times is None else [t * self.data.tokens_per_second for t in times]
        seq.visual(vis, scaled, self.sp, self.vision.merge)

    # -- rows
    def build(self, row: dict[str, Any]) -> Sample | dict[str, Any] | str:
        """A :class:`Sample` (stages 1-3, sft), a contrastive pair dict (stage 0), or a skip reason."""
        try:
            return self._build(row)
        except (OSError, ValueError, SyntaxError) as e:  # PIL raises all three on bad image bytes
            log.debug("row %s: %s", row.get("key") or row.get("id"), e)
            return "unreadable_media"

    def _build(self, row: dict[str, Any]) -> Sample | dict[str, Any] | str:
        modality = row.get("modality")
        key = row.get("key") or row.get("id") or ""
        if self.stage == "0":
            if modality != "image_text" or not row.get("image") or not row.get("text"):
                return "not_an_image_text_pair"
            ids = self.tok.encode(row["text"])[: self.max_text]
            return {"visual": self.image(row["image"]), "text": ids, "key": key} if ids else "empty_caption"
        if self.stage == "sft" and modality != "sft":
            return "not_a_conversation"
        seq = _Seq()
        eot = self.sp["<|endoftext|>"]
        if modality == "sft":
            reason = self._chat(seq, row)
            if reason:
                return reason
        elif modality in ("image_text", "video"):
            if modality == "image_text" and row.get("image"):
                self._visual(seq, self.image(row["image"]))
            elif modality == "video" and row.get("frames"):
                self._visual(seq, *self.video(row["frames"], row.get("frame_ts")))
            if row.get("text"):
                seq.text(self.tok.encode(row["text"]) + [eot], True)
        elif modality == "interleaved":
            texts, images = row.get("texts") or [], row.get("images") or []
            for i in range(max(len(texts), len(images))):
                if i < len(images) and images[i]:
                    self._visual(seq, self.image(images[i]))
                elif i < len(texts) and texts[i]:
                    seq.text(self.tok.encode(("\n" if i else "") + texts[i]), True)
            seq.text([eot], True)
        elif modality == "text" and row.get("text"):
            seq.text(self.tok.encode(row["text"]) + [eot], True)
        if self.stage == "1" and not seq.visuals:
            return "no_picture_to_align"
        cut = seq.cut(self.data.seq_len)
        if not any(seq.targets[1:]):
            return "longer_than_seq_len" if cut else "nothing_to_learn"
        return Sample(seq.ids, seq.targets, seq.pos, seq.visuals, key)

    def _chat(self, seq: _Seq, row: dict[str, Any]) -> str | None:
        """ChatML: ``<|im_start|>ROLE\\n CONTENT <|im_end|>\\n`` per message; loss on assistant content and
        end."""
        try:
            messages = json.loads(row.get("messages") or "")
        except json.JSONDecodeError:
            return "bad_messages"
        if not isinstance(messages, list) or not messages:
            return "bad_messages"
        images = row.get("images") or []
        nl = self.tok.encode("\n")
        for m in messages:
            if not isinstance(m, dict):
                return "bad_messages"
            role = str(m.get("role", "user"))
            train = role == "assistant"
            seq.text([self.sp["<|im_start|>"]] + self.tok.encode(role) + nl, False)
            content = m.get("content")
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else content or []
            for part in parts:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and part.get("text"):
                    seq.text(self.tok.encode(part["text"]), train)
                elif kind == "image":
                    idx = part.get("index", 0)
                    if not isinstance(idx, int) or not 0 <= idx < len(images) or not images[idx]:
                        return "image_ref_out_of_range"
                    self._visual(seq, self.image(images[idx]))
                elif kind == "video":
                    if not row.get("frames"):
                        return "video_part_without_frames"
                    self._visual(seq, *self.video(row["frames"], row.get("frame_ts")))
            seq.text([self.sp["<|im_end|>"]], train)
            seq.text(nl, False)
        return None


# ---------------------------------------------------------------- batches


def _visual_tensors(visuals: list[Visual]) -> dict[str, torch.Tensor]:
    """Frames of every visual item, padded to the longest: what the vision tower takes."""
    frames = [f for v in visuals for f in v.frames]
    grids = [v.grid for v in visuals for _ in v.frames]
    width = frames[0][0].shape[1] if frames else 0
    p = max((f[0].shape[0] for f in frames), default=0)
    patches = np.zeros((len(frames), p, width), np.float32)
    rc = np.zeros((len(frames), p, 2), np.int64)
    mask = np.zeros((len(frames), p), bool)
    for i, (x, pos) in enumerate(frames):
        patches[i, : len(x)] = x
        rc[i, : len(x)] = pos
        mask[i, : len(x)] = True
    items, first = [], 0
    for v in visuals:
        items.append((first, len(v.frames), *v.grid))
        first += len(v.frames)
    return {
        "patches": torch.from_numpy(patches),
        "patch_rc": torch.from_numpy(rc),
        "patch_mask": torch.from_numpy(mask),
        "frame_grid": torch.tensor(grids, dtype=torch.long).view(-1, 2),
        "visuals": torch.tensor(items, dtype=torch.long).view(-1, 4),
    }


def collate(samples: list[Any], special: dict[str, int]) -> dict[str, Any]:
    """A batch dict of tensors (right-padded) from samples of one kind, plus counts for the throughput log."""
    pad_id = special["<|endoftext|>"]
    if isinstance(samples[0], dict):  # stage 0 pairs
        visuals = [s["visual"] for s in samples]
        n = max(len(s["text"]) for s in samples)
        ids = torch.full((len(samples), n), pad_id, dtype=torch.long)
        mask = torch.zeros((len(samples), n), dtype=torch.bool)
        for i, s in enumerate(samples):
            ids[i, : len(s["text"])] = torch.tensor(s["text"])
            mask[i, : len(s["text"])] = True
        batch = {"kind": "contrastive", "text_ids": ids, "text_mask": mask, **_visual_tensors(visuals)}
        batch["tokens"] = int(mask.sum()) + sum(v.grid[0] * v.grid[1] for v in visuals)  # captions + patches
    else:
        n = max(len(s.ids) for s in samples)
        ids = torch.full((len(samples), n), pad_id, dtype=torch.long)
        labels = torch.full((len(samples), n), IGNORE, dtype=torch.long)
        pos = torch.zeros((3, len(samples), n), dtype=torch.float32)
        for i, s in enumerate(samples):
            t = torch.tensor(s.ids)
            ids[i, : len(t)] = t
            target = torch.tensor(s.targets[1:], dtype=torch.bool)
            labels[i, : len(t) - 1] = torch.where(target, t[1:], IGNORE)
            pos[:, i, : len(t)] = torch.tensor(s.pos)
            # pad positions continue the sequence, so padding never shares a position with a real token
            pos[:, i, len(t) :] = pos[:, i, len(t) - 1].max() + 1 + torch.arange(n - len(t))
        visuals = [v for s in samples for v in s.visuals]
        slots = torch.isin(ids, torch.tensor([special["<|image_pad|>"], special["<|video_pad|>"]]))
        batch = {
            "kind": "lm",
            "input_ids": ids,
            "labels": labels,
            "position_ids": pos,
            "visual_slots": slots,
            **_visual_tensors(visuals),
        }
        batch["tokens"] = sum(len(s.ids) for s in samples)
        batch["targets"] = int((labels != IGNORE).sum())
    batch["images"] = sum(1 for v in visuals if v.image)
    batch["frames"] = sum(len(v.frames) for v in visuals if not v.image)
    batch["keys"] = [s["key"] if isinstance(s, dict) else s.key for s in samples]
    return batch


class MixtureStream(IterableDataset):
    """Batches of one stage from this rank's streams of a mixture (one stream per data-loader worker).

    Each batch also carries ``stream``, ``position`` (after its last row: where to resume) and ``skipped``
    (rows skipped since the previous batch of the stream, by reason).
    """

    def __init__(self, mixture: Mixture, plan: StreamPlan, builder: SampleBuilder, batch_size: int):
        super().__init__()
        self.mixture, self.plan, self.builder, self.batch_size = mixture, plan, builder, batch_size

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        stream = self.plan.stream_of(info.id if info else 0)
        pos = self.plan.start.get(stream, Position())
        rows_in_stream = sum(b - a for _, a, b in self.plan.pieces[stream])
        samples, skipped, barren = [], Counter(), 0
        for row, after in self.rows(stream, pos):
            s = self.builder.build(row)
            if isinstance(s, str):
                skipped[s] += 1
                barren += 1
                if barren > rows_in_stream:  # a whole pass without one sample: it would loop forever
                    raise RuntimeError(
                        f"stream {stream}: none of its {rows_in_stream} rows gives a stage "
                        f"{self.builder.stage} sample (skipped: {dict(skipped)})"
                    )
                continue
            barren = 0
            samples.append(s)
            if len(samples) == self.batch_size:
                batch = collate(samples, self.builder.sp)
                batch.update(stream=stream, position=after.as_list(), skipped=dict(skipped))
                yield batch
                samples, skipped = [], Counter()

    def rows(self, stream: int, pos: Position) -> Iterator[tuple[dict[str, Any], Position]]:
        """Rows of the stream from ``pos`` on, forever (epoch after epoch), with the position after each."""
        pieces = self.plan.pieces[stream]
        epoch, first_piece, first_row = pos.epoch, pos.piece, pos.row
        while True:
            yielded = False
            for p in range(first_piece, len(pieces)):
                shard_index, start, stop = pieces[p]
                shard = self.mixture.shards[shard_index]
                for k, row in enumerate(_read_rows(shard, self.mixture.format, start + first_row, stop)):
                    yielded = True
                    yield row, Position(epoch, p, first_row + k + 1)
                first_row = 0
            if not yielded and first_piece == 0:
                raise RuntimeError(f"stream {stream} read no rows in a whole pass over its pieces {pieces}")
            epoch, first_piece = epoch + 1, 0
            log.info(
                "stream %d: epoch %d of its %d rows begins", stream, epoch, sum(b - a for _, a, b in pieces)
            )
