"""Readers: turn source files into canonical rows (:data:`curation.schema.ROW_SCHEMA`).

Work is planned in *units*: one input file, or a range of row groups of a large Parquet file.
A unit is the grain of parallelism, of output sharding and of resume, like an img2dataset shard.
Units are planned on the driver in a deterministic order, so the same recipe gives the same
units, and so the same pool, on a laptop and on a cluster.

Bad input never stops a reader: a row that cannot be read (malformed JSON, text that is not UTF-8,
an image file that is missing, the unreadable tail of a truncated tar) becomes a row rejected by the
``ingest`` stage with a reason and a detail naming the file and offset.

Nor does input larger than the recipe's ``limits:`` (:class:`curation.spec.LimitsSpec`, carried in each
unit): it is found before its memory is spent and rejected with the limit's reason.

==================== ======== ====================================================== ================
limit                default  what it bounds                                         reject reason
==================== ======== ====================================================== ================
``max_media_bytes``  1 GiB    an image or video a row references (size from the fs)  file_too_large
``max_file_bytes``   512 MiB  a file read whole: a ``.json`` list of conversations   file_too_large
``max_member_bytes`` 1 GiB    a tar member (size from its header; read past)         member_too_large
``max_line_bytes``   64 MiB   a JSONL line (read past, never held)                   line_too_long
``max_value_bytes``  256 MiB  a Parquet value: a row group with a larger page (from  value_too_large
                              the page headers) is never decompressed
==================== ======== ====================================================== ================

Formats and the fields they map (``fields:`` in the source overrides the defaults below):

=========== =========== ===================================================================
format      modality    default fields
=========== =========== ===================================================================
webdataset  image_text  text: ``txt``, image: ``jpg;jpeg;png;webp``, meta: ``json``
parquet     image_text  text: ``caption``, image: ``image`` (binary or ``{bytes, path}``)
jsonl       image_text  text: ``caption``, image: ``image`` (path relative to the .jsonl)
jsonl/pq    interleaved texts: ``texts``, images: ``images`` (aligned lists, OBELICS style)
jsonl/pq    video       text: ``caption``, video: ``video`` (path relative to the file, or a URI);
                        keyframes are sampled at ingest (1 fps, at most 32) into ``frames``/``frame_ts``
any         text        text: ``text`` (webdataset: ``txt``)
pool        (per row)   a pool's Parquet shards: rows keep their id, modality and lineage
sharegpt    sft         LLaVA / ShareGPT / OpenAI conversations: ``conversations`` (``{from, value}``
                        turns) or ``messages`` (``{role, content}``), images: ``images;image``, video:
                        ``video;videos``, ``mode``, ``system``; ``<image>`` placeholders become image parts
qa          sft         question/answer tables: ``question``, ``answer``, ``reasoning``, ``analysis``,
                        image: ``image;images``, ``video``, ``code`` (think_with_image), ``mode``, ``system``
=========== =========== ===================================================================

``sharegpt`` and ``qa`` read ``.json`` (one list of records), ``.jsonl`` and ``.parquet`` files and build
the conversation of each record with :mod:`curation.io.conversations` (modes, suffixes, placeholders:
``docs/sft-format.md``). Image and video paths are relative to the file, or to ``fields: {image_root: DIR}``
(itself relative to the file); a video is sampled at ingest like a video row's. ``mode:`` in the source
gives the mode of records that carry none (else it is inferred).
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from curation.io import conversations, pages, refs
from curation.io import fs as cfs
from curation.io.tar import TarError, iter_tar
from curation.recipe import SFT_FORMATS, SourceSpec
from curation.schema import MODALITIES, ROW_SCHEMA, from_rows, json_meta, row_id
from curation.secrets import redact
from curation.spec import LimitsSpec
from curation.target import chat
from curation.target.video import VIDEO_OPTIONS, frame_bounds

log = logging.getLogger(__name__)

INGEST = "ingest"
UNIT_FAILED = "unit_failed"  # reading the unit killed its worker every time it was tried

_DEFAULT_FIELDS: dict[tuple[str, str], dict[str, str]] = {
    ("webdataset", "image_text"): {"text": "txt", "image": "jpg;jpeg;png;webp", "meta": "json"},
    ("webdataset", "text"): {"text": "txt", "meta": "json"},
    ("parquet", "image_text"): {"text": "caption", "image": "image"},
    ("parquet", "interleaved"): {"texts": "texts", "images": "images"},
    ("parquet", "text"): {"text": "text"},
    ("jsonl", "image_text"): {"text": "caption", "image": "image"},
    ("jsonl", "interleaved"): {"texts": "texts", "images": "images"},
    ("jsonl", "text"): {"text": "text"},
    ("jsonl", "video"): {"text": "caption", "video": "video"},
    # video2dataset's layout: <key>.mp4 (or another container) with <key>.txt and <key>.json
    ("webdataset", "video"): {"text": "txt", "video": "mp4;webm;mkv;mov;avi;m4v", "meta": "json"},
    ("parquet", "video"): {"text": "caption", "video": "video"},
    **{(fmt, "sft"): fields for fmt, fields in conversations.SOURCE_FIELDS.items()},
}
VIDEO_UNIT_ROWS = 16  # videos per unit: a video costs ~1000x a text row to read, so units stay small enough
# that a manifest of a few dozen videos still keeps every core busy (a unit is one task); 16 videos of
# sampled frames make a 3-10 MB shard
SFT_UNIT_ROWS = 128  # conversation lines per unit: rows may decode a video, or run code in a later stage


@dataclass(frozen=True)
class Unit:
    """One piece of input work: a file, row groups ``[rg_start, rg_stop)`` of a Parquet file, or lines
    ``[rg_start, rg_stop)`` of a video JSONL manifest (each line costs a video decode)."""

    index: int
    source: str
    format: str
    modality: str
    uri: str
    rg_start: int = 0
    rg_stop: int | None = None
    fields_json: str = "{}"
    on_bad_text: str = "reject"
    mode: str | None = None  # sft: the mode of records that carry none
    video_json: str = "{}"  # how videos are sampled (target.video.VIDEO_OPTIONS, resolved)
    refs_json: str = (
        "{}"  # where media references may point: media_roots, allow_absolute, schemes (curation.io.refs)
    )
    failed: str | None = None  # why reading this unit kills its worker: it is not read again, only reported
    limits_json: str = "{}"  # the recipe's limits: (recipe.LimitsSpec; its defaults where empty)

    @property
    def fields(self) -> dict[str, str]:
        return json.loads(self.fields_json)

    @property
    def video(self) -> dict[str, Any]:
        return {**VIDEO_OPTIONS, **json.loads(self.video_json)}

    @property
    def limits(self) -> LimitsSpec:
        return LimitsSpec(**json.loads(self.limits_json))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def label(self) -> str:
        part = (
            "row groups" if self.format in ("parquet", "pool") or self.uri.endswith(".parquet") else "lines"
        )
        rng = f" {part} {self.rg_start}-{self.rg_stop}" if self.rg_stop is not None else ""
        return f"{self.uri}{rng}"


def plan_units(
    sources: list[SourceSpec], unit_rows: int = 20_000, limits: LimitsSpec | None = None
) -> list[Unit]:
    """Expand every source's paths into units, in recipe order, files sorted."""
    limits = limits or LimitsSpec()
    limits_json = json.dumps(asdict(limits), sort_keys=True)
    units: list[Unit] = []
    for spec in sources:
        fields = dict(_DEFAULT_FIELDS.get((spec.format, spec.modality), {}))
        fields.update(spec.fields)
        fields_json = json.dumps(fields, sort_keys=True)
        files: list[str] = []
        for pattern in spec.paths:
            for f in cfs.expand(pattern, spec.on_bad_name):
                if f not in files:
                    files.append(f)
        for uri in files:
            common = {
                "source": spec.name,
                "format": spec.format,
                "modality": spec.modality,
                "uri": uri,
                "fields_json": fields_json,
                "on_bad_text": spec.on_bad_text,
                "mode": spec.mode,
                "video_json": json.dumps({**VIDEO_OPTIONS, **spec.video}, sort_keys=True),
                "limits_json": limits_json,
                "refs_json": json.dumps(
                    {
                        "roots": spec.media_roots,
                        "allow_absolute": spec.allow_absolute,
                        "schemes": spec.schemes,
                    },
                    sort_keys=True,
                ),
            }
            sft = spec.format in SFT_FORMATS
            if spec.format in ("parquet", "pool") or (sft and uri.endswith(".parquet")):
                for start, stop in _row_group_ranges(uri, unit_rows):
                    units.append(Unit(index=len(units), rg_start=start, rg_stop=stop, **common))
            elif (spec.format == "jsonl" and spec.modality == "video") or (sft and uri.endswith(".jsonl")):
                per_unit = VIDEO_UNIT_ROWS if spec.modality == "video" else SFT_UNIT_ROWS
                for start, stop in _line_ranges(uri, per_unit, limits.max_line_bytes):
                    units.append(Unit(index=len(units), rg_start=start, rg_stop=stop, **common))
            else:
                units.append(Unit(index=len(units), **common))
    return units


def _line_ranges(uri: str, per_unit: int, max_line: int) -> list[tuple[int, int | None]]:
    """Line ranges of a JSONL file, ``per_unit`` lines each (a manifest of videos is small to count)."""
    try:
        with cfs.open_input(uri) as stream:
            n = sum(1 for _ in cfs.iter_lines(stream, max_line=max_line))
    except OSError as e:  # the reader reports it as an unreadable file
        log.warning("cannot count the lines of %s (%s); it will be reported as unreadable", uri, e)
        return [(0, None)]
    return [(start, min(n, start + per_unit)) for start in range(0, n, per_unit)] or [(0, None)]


def _row_group_ranges(uri: str, unit_rows: int) -> list[tuple[int, int | None]]:
    try:
        with cfs.open_random_access(uri) as f:
            meta = pq.ParquetFile(f).metadata
    except Exception as e:  # noqa: BLE001 - unreadable file: one unit, whose reader reports the error as a reject
        log.warning("cannot read Parquet metadata of %s (%s); it will be reported as unreadable", uri, e)
        return [(0, None)]
    ranges, start, rows = [], 0, 0
    for rg in range(meta.num_row_groups):
        rows += meta.row_group(rg).num_rows
        if rows >= unit_rows:
            ranges.append((start, rg + 1))
            start, rows = rg + 1, 0
    if start < meta.num_row_groups or not ranges:
        ranges.append((start, meta.num_row_groups))
    return ranges


# ---------------------------------------------------------------- reading


def read_unit(unit: Unit, batch_rows: int = 256) -> Iterator[pa.Table]:
    """Yield :data:`ROW_SCHEMA` tables of at most ``batch_rows`` rows for one unit.

    Never raises for bad data: a row whose fields have the wrong types becomes a ``malformed_row``
    reject, and an error the format reader did not expect ends the file with one ``unreadable_file``
    reject naming the offset where reading stopped.
    """
    reader = {
        "webdataset": _read_webdataset,
        "parquet": _read_parquet,
        "jsonl": _read_jsonl,
        "pool": _read_pool,
        "sharegpt": _read_sft,
        "qa": _read_sft,
    }[unit.format]
    make = _RowMaker(unit)
    if unit.failed:  # the runner gave up on it: one reject says so, nothing is read
        yield _table([make.broken(unit.rg_start, UNIT_FAILED, unit.failed)], make)
        return
    rows: list[dict[str, Any]] = []
    next_offset = 0
    try:
        for row in reader(unit):
            rows.append(row)
            next_offset = row.get("_offset", row["source_offset"]) + 1  # pool rows: offset in the shard
            if len(rows) >= batch_rows:
                yield _table(rows, make)
                rows = []
    except Exception as e:  # a reader bug or an exotic file must not stop the run
        log.exception("reading %s stopped at offset %d", unit.label, next_offset)
        rows.append(make.broken(next_offset, "unreadable_file", f"reading stopped: {type(e).__name__}: {e}"))
    if rows:
        yield _table(rows, make)


def _table(rows: list[dict[str, Any]], make: _RowMaker) -> pa.Table:
    try:
        return from_rows(rows)
    except (pa.ArrowException, TypeError, ValueError, OverflowError):
        fixed = []
        for r in rows:  # find the offending rows; keep every other one as it is
            try:
                from_rows([r])
                fixed.append(r)
            except (pa.ArrowException, TypeError, ValueError, OverflowError) as e:
                offset = r.get(
                    "_offset", r["source_offset"]
                )  # a pool row's own source_offset may be the culprit
                fixed.append(make.broken(offset, "malformed_row", f"a field has the wrong type: {e}"))
        return from_rows(fixed)


_WANT = {"text": "text", "image": "image bytes (or a {bytes, path} struct)", "video": "a path or URI"}


class _RowMaker:
    """Builds canonical row dicts for one unit (ids, lineage, ingest rejects)."""

    def __init__(self, unit: Unit):
        self.unit = unit
        self.fields = unit.fields
        self.limits = unit.limits
        self.base = cfs.dirname(unit.uri)  # relative references start here
        opts = json.loads(unit.refs_json)
        root = self.fields.get("image_root")
        if root and unit.format in SFT_FORMATS:  # the recipe's own folder for this source's images
            self.base = _resolve(self.base, root)
        self.refs = refs.policy(
            unit.uri,
            opts.get("roots", ()),
            opts.get("allow_absolute", False),
            opts.get("schemes", refs.SCHEMES),
            extra=(self.base,),
        )

    def resolve(self, ref: Any) -> str:
        """A media reference as an absolute path or URI; :class:`refs.RefusedReference` where it may not
        point."""
        return self.refs.resolve(ref, self.base)

    def read(self, ref: Any) -> bytes:
        """The bytes of a media reference, read only where the source's policy allows."""
        return self.refs.read(ref, self.base, self.limits.max_media_bytes)[1]

    def rows(self, offset: int, **kw: Any) -> list[dict[str, Any]]:
        """The row, or with ``video: {shots: true}`` on a video source, one row per shot of its video."""
        opts = self.unit.video
        if not (
            self.unit.modality == "video" and opts.get("shots") and kw.get("video") and not kw.get("reason")
        ):
            return [self.row(offset, **kw)]
        kw.pop("reason", None), kw.pop("detail", None)  # both None: checked above
        video, data, reason, detail = self._fetch_video(offset, kw.pop("video"), kw.pop("video_bytes", None))
        meta = kw.pop("meta", None)
        if not reason:
            shots, clips, meta, reason, detail = self._shots(offset, video, meta, data)
        if reason:
            return [
                self.row(offset, video=video, meta=meta, reason=reason, detail=detail, _located=True, **kw)
            ]
        out = []
        for j, shot in enumerate(shots):
            extra = {"clip_ext": "mp4", "clip": clips[j].how} if clips else {}
            r = self.row(
                offset,
                video=video,
                meta=dict(meta, shot=j, shots=len(shots), cut_score=shot.cut_score, **extra),
                _frames=(shot.frames, shot.ts),
                _located=True,
                **kw,
            )
            r["clip_start"], r["clip_end"] = round(shot.start, 6), round(shot.end, 6)
            r["video_bytes"] = clips[j].data if clips else None
            out.append(r)  # its id comes from its caption and its own frames: identical shots are duplicates
        return out

    def _fetch_video(
        self, offset: int, ref: Any, data: bytes | None
    ) -> tuple[Any, bytes | None, str | None, str | None]:
        """``(location, bytes, reject reason, detail)`` of a row's video. Bytes in hand keep their label (a
        tar member, a Parquet row); a reference is resolved under the source's roots, then read."""
        where = f"{self.unit.uri}#{offset}"
        if (
            data is not None
        ):  # the label only names it (a Parquet struct's path: resolved like a reference if it may)
            try:
                return (self.resolve(ref) if ref and "#" not in ref else ref), data, None, None
            except refs.RefusedReference:
                return _cut(ref), data, None, None
        if not ref:
            return None, None, "missing_video_file", f"{where}: no video reference"
        location = _cut(ref)
        try:
            location = self.resolve(ref)
            return location, refs.fetch(location, self.limits.max_media_bytes), None, None
        except refs.RefusedReference as e:
            return _cut(ref), None, e.reason, f"{where}: video {refs.shown(ref)}: {e}"
        except (OSError, ValueError) as e:
            return location, None, "missing_video_file", f"{where}: cannot read {refs.shown(ref)}: {e}"

    @staticmethod
    def _facts(meta: dict | None, v: Any) -> dict[str, Any]:
        """``meta`` with the probed header facts of a video (a VideoInfo or VideoFrames)."""
        return dict(
            meta or {},
            duration=v.duration,
            video_width=v.width,
            video_height=v.height,
            codec=v.codec,
            fps=v.fps,
            has_audio=v.audio,
        )

    def _shots(self, offset: int, uri: str, meta: dict | None, data: bytes):
        """(shots, their clips or None, meta, reject reason, detail) of a video's bytes."""
        from curation.io.video import VideoError, encode_clips, sample_shots

        where = f"{self.unit.uri}#{offset}"
        o = self.unit.video
        try:
            info, shots = sample_shots(
                data,
                fps=o["fps"],
                max_frames=o["max_frames"],
                **frame_bounds(o),
                threshold=o["shot_threshold"],
                contrast=o["shot_contrast"],
                min_shot_s=o["min_shot_s"],
                name=uri,
                timeout_s=o["timeout_s"],
            )
            clips = (
                encode_clips(
                    data,
                    [(s.start, s.end) for s in shots],
                    name=uri,
                    preset=o["clip_preset"],
                    timeout_s=o["timeout_s"],
                )
                if o["clip"]
                else None
            )
        except VideoError as e:
            return None, None, meta, "unreadable_video", f"{where}: {e}"
        except Exception as e:  # the decoder tripped over a damaged file (a decoder bug): still unreadable
            log.exception("decoding %s failed", uri)
            return None, None, meta, "unreadable_video", _decoder_failed(where, uri, e)
        return shots, clips, self._facts(meta, info), None, None

    def row(
        self,
        offset: int,
        *,
        text: bytes | str | None = None,
        image: bytes | None = None,
        texts: list | None = None,
        images: list | None = None,
        meta: dict | None = None,
        reason: str | None = None,
        detail: str | None = None,
        video: str | None = None,
        messages: str | None = None,
        mode: str | None = None,
        video_bytes: bytes | None = None,
        _frames: tuple[list[bytes], list[float]] | None = None,
        _located: bool = False,
    ) -> dict[str, Any]:
        """One canonical row; raises TypeError naming the field when a value has a type no row can hold."""
        m = self.unit.modality
        for key, value, want in (
            ("text", text, (str, bytes)),
            ("image", image, bytes),
            ("video", video, str),
        ):
            if value is not None and not isinstance(value, want):
                raise TypeError(
                    f"'{self.fields.get(key, key)}' must be {_WANT[key]}, got {type(value).__name__}"
                )
        frames = frame_ts = None
        clip = None
        if _frames is not None:  # a shot: sampled by rows()
            frames, frame_ts = _frames
        elif reason is None and not _located and (m == "video" or (m == "sft" and video)):
            video, frames, frame_ts, meta, reason, detail, clip = self._video(
                offset, video, meta, video_bytes
            )
        elif (
            video and not _located and video_bytes is None
        ):  # a row rejected already: its reference, as named
            video = _cut(video)
        if m == "video":
            rid = row_id(m, text, frames or [video.encode() if video else None])
        elif m == "interleaved":
            joined = "\x1e".join("" if t is None else t for t in (texts or []))
            rid = row_id(m, joined, images or [])
        elif m == "sft":  # docs/sft-format.md: messages and images (then the video's frames, if any)
            rid = row_id(m, messages, [*(images or []), *(frames or ([video.encode()] if video else []))])
        else:
            rid = row_id(m, text, [image] if image is not None else [])
        if isinstance(text, bytes):
            text, bad = _decode_text(text)
            if bad and reason is None and self.unit.on_bad_text == "reject":
                reason, detail = "text_not_utf8", f"{self.unit.uri}#{offset}: {bad}"
        return {
            "id": rid,
            "source": self.unit.source,
            "modality": m,
            "text": text,
            "image": image,
            "texts": texts,
            "images": images,
            "meta": json_meta(meta),
            "video": video,
            "frames": frames,
            "frame_ts": frame_ts,
            "video_bytes": clip,
            "messages": messages,
            "mode": mode,
            "source_uri": self.unit.uri,
            "source_offset": offset,
            "reject_stage": INGEST if reason else None,
            "reject_reason": reason,
            "reject_detail": redact(detail) if detail else None,  # a row's URI may carry credentials
        }

    def _video(self, offset: int, ref: Any, meta: dict | None, data: bytes | None = None):
        """Keyframes of the row's video: (its location, frames, ts, meta, reject reason, detail, the file's
        bytes when the source keeps clips)."""
        from curation.io.video import VideoError, sample_frames

        where = f"{self.unit.uri}#{offset}"
        uri, data, reason, detail = self._fetch_video(offset, ref, data)
        if reason:
            return uri, None, None, meta, reason, detail, None
        o = self.unit.video
        try:
            vf = sample_frames(
                data,
                fps=o["fps"],
                max_frames=o["max_frames"],
                **frame_bounds(o),
                name=uri,
                timeout_s=o["timeout_s"],
            )
        except VideoError as e:
            return uri, None, None, meta, "unreadable_video", f"{where}: {e}", None
        except Exception as e:  # the decoder tripped over a damaged file (a decoder bug): still unreadable
            log.exception("decoding %s failed", uri)
            return uri, None, None, meta, "unreadable_video", _decoder_failed(where, uri, e), None
        meta = self._facts(meta, vf)
        keep = bool(o["clip"]) and self.unit.modality == "video"
        if keep:
            meta["clip_ext"] = vf.ext
        return uri, vf.frames, vf.ts, meta, None, None, data if keep else None

    def guarded(
        self,
        offset: int,
        build: Callable[..., list[dict[str, Any]]],
        *args: Any,
        raw: bytes | str | None = None,
    ) -> list[dict[str, Any]]:
        """``build(*args)``'s rows, or one ``malformed_row`` reject when a field has a shape they cannot take
        (a number where a caption belongs, a path with a NUL byte): one bad row never ends its file."""
        try:
            return build(*args)
        except (TypeError, ValueError, AttributeError, KeyError, OverflowError, RecursionError) as e:
            return [
                self.broken(
                    offset, "malformed_row", f"a field has the wrong type: {type(e).__name__}: {e}", raw
                )
            ]
        except cfs.TooLarge as e:  # a referenced file over its limit, found before it was read
            return [self.broken(offset, e.reason, str(e), raw)]

    def broken(self, offset: int, reason: str, detail: str, raw: bytes | str | None = None) -> dict[str, Any]:
        """A row that could not be read at all: kept (as a reject) so it is counted and visible."""
        text = raw.decode("utf-8", "replace")[:2000] if isinstance(raw, bytes) else raw
        r = self.row(offset, text=text, reason=reason, detail=f"{self.unit.uri}#{offset}: {detail}")
        r["id"] = row_id("broken", f"{self.unit.uri}#{offset}")
        return r


def _decoder_failed(where: str, uri: str, e: Exception) -> str:
    """The detail of a video whose decoder raised something other than VideoError."""
    return f"{where}: {uri}: the decoder failed ({type(e).__name__}: {e})"


def _decode_text(raw: bytes) -> tuple[str, str | None]:
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError as e:
        return raw.decode("utf-8", "replace"), f"not UTF-8 ({e.reason} at byte {e.start})"


def _read_webdataset(unit: Unit) -> Iterator[dict[str, Any]]:
    """Samples of a tar: consecutive members that share a key (``dir/key.ext``). Member names are never
    paths on disk here, so ``../`` or absolute names are only odd keys. A member without an extension
    belongs to no sample: they are reported together in one ``malformed_row`` reject after the samples.
    A sample with a member over ``limits.max_member_bytes`` (passed over unread) is a ``member_too_large``
    reject."""
    make = _RowMaker(unit)
    f = make.fields
    image_exts = f.get("image", "").split(";") if f.get("image") else []
    video_exts = f.get("video", "").split(";") if f.get("video") else []
    offset = 0
    current_key, members, doubled, strays = None, {}, [], []

    def emit() -> list[dict[str, Any]]:
        key = _printable(current_key)  # a name that is not UTF-8 still makes a readable key
        over = sorted(e for e, data in members.items() if isinstance(data, cfs.Skipped))
        if over:  # passed over unread
            problem = cfs.TooLarge.over(
                "member_too_large",
                f"member {key}.{over[0]}",
                members[over[0]].size,
                "max_member_bytes",
                make.limits.max_member_bytes,
            )
            return [make.broken(offset, problem.reason, str(problem))]
        text = members.get(f["text"]) if "text" in f else None
        image = next((members[e] for e in image_exts if e in members), None)
        meta = {"__key__": key}
        if f.get("meta") in members:
            try:
                extra = json.loads(members[f["meta"]])
            except (ValueError, UnicodeDecodeError, RecursionError):
                extra = None
            if isinstance(extra, dict):
                meta.update(extra)
            else:
                meta["meta_unparsed"] = True
        if doubled:
            return [
                make.row(
                    offset,
                    text=text,
                    image=image,
                    meta=meta,
                    reason="malformed_row",
                    detail=f"{unit.uri}#{offset}: sample '{key}' has more than one "
                    f"{'/'.join(sorted(set(doubled)))} member: which one is meant is ambiguous",
                )
            ]
        if unit.modality != "video":
            return [make.row(offset, text=text, image=image, meta=meta)]
        ext = next((e for e in video_exts if e in members), None)
        if ext is None:
            return [
                make.row(
                    offset,
                    text=text,
                    meta=meta,
                    reason="missing_video_file",
                    detail=f"{unit.uri}#{offset}: sample '{key}' has no "
                    f"{'/'.join(video_exts)} member (it has: {', '.join(sorted(members))})",
                )
            ]
        # The row points at the member; its frames are sampled from the bytes in hand.
        return make.rows(
            offset, text=text, meta=meta, video=f"{unit.uri}#{key}.{ext}", video_bytes=members[ext]
        )

    def stray() -> dict[str, Any]:
        names = ", ".join(repr(_printable(n)) for n in strays[:3]) + (", ..." if len(strays) > 3 else "")
        return make.broken(
            offset,
            "malformed_row",
            f"{len(strays)} member(s) with no extension belong to no "
            f"sample (WebDataset names members <key>.<ext>): {names}",
        )

    try:
        with cfs.open_input(unit.uri) as stream:
            for name, data in iter_tar(stream, max_member=make.limits.max_member_bytes):
                base = name.rsplit("/", 1)[-1]
                if "." not in base:
                    strays.append(name)
                    continue
                key, ext = base.split(".", 1)
                key = name[: len(name) - len(base)] + key
                if key != current_key:
                    if current_key is not None:
                        yield from make.guarded(offset, emit)
                        offset += 1
                    current_key, members, doubled = key, {}, []
                if ext.lower() in members:
                    doubled.append(ext.lower())
                members[ext.lower()] = data
    except (TarError, OSError) as e:
        if current_key is not None:
            yield from make.guarded(offset, emit)
            offset += 1
        samples = offset
        if strays:
            yield stray()
            offset += 1
        yield make.broken(offset, "unreadable_file", f"tar unreadable after {samples} samples: {e}")
        return
    if current_key is not None:
        yield from make.guarded(offset, emit)
        offset += 1
    if strays:
        yield stray()


def _printable(name: str) -> str:
    """A tar member name as text: bytes that were not UTF-8 (kept as surrogates) become U+FFFD."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _open_parquet(unit: Unit):
    """``(handle, ParquetFile, row groups of the unit, offset of its first row)``, or an error message."""
    try:
        handle = cfs.open_random_access(unit.uri)
        pf = pq.ParquetFile(handle)
    except Exception as e:  # noqa: BLE001 - any failure to open it is reported as an unreadable file
        return f"not a readable Parquet file: {e}"
    stop = unit.rg_stop if unit.rg_stop is not None else pf.metadata.num_row_groups
    offset = sum(pf.metadata.row_group(i).num_rows for i in range(unit.rg_start))
    return handle, pf, list(range(unit.rg_start, stop)), offset


def _parquet_batches(
    make: _RowMaker, handle, pf: pq.ParquetFile, groups: list[int], offset: int, **kw: Any
) -> Iterator[tuple[int, pa.RecordBatch | dict[str, Any]]]:
    """``(offset of its first row, record batch)`` over the unit's row groups; for each row of a row group
    that may hold a value over ``limits.max_value_bytes``, ``(offset, reject)`` instead: that row group is
    never decompressed."""
    limit, local = make.limits.max_value_bytes, not cfs.is_uri(make.unit.uri)
    too_large = {
        rg: why for rg in groups if (why := _too_large(handle, pf.metadata.row_group(rg), limit, local))
    }
    run: list[int] = []  # row groups read together, so that batches span them as before
    for rg in [*groups, None]:
        if rg is not None and rg not in too_large:
            run.append(rg)
            continue
        for batch in pf.iter_batches(row_groups=run, **kw) if run else ():
            yield offset, batch
            offset += batch.num_rows
        run = []
        if rg is not None:
            for _ in range(pf.metadata.row_group(rg).num_rows):
                yield offset, make.broken(offset, "value_too_large", f"row group {rg}: {too_large[rg]}")
                offset += 1


def _too_large(handle, group, limit: int, local: bool) -> str | None:
    """Why a row group (``RowGroupMetaData``) must not be decompressed: a column with a page (so perhaps a
    value) of more than ``limit`` bytes uncompressed. A chunk the footer puts under the limit is walked only
    in a local file (where it is cheap), and there a page header that cannot be read is left to pyarrow."""
    for j in range(group.num_columns):
        column = group.column(j)
        claimed = column.total_uncompressed_size
        if claimed <= limit and not local:
            continue
        try:
            page = pages.largest_page(handle, column)
        except ValueError as e:
            if claimed <= limit:
                continue
            return f"column '{column.path_in_schema}' claims {claimed:,} bytes uncompressed, and {e}"
        if page > limit:
            return (
                f"column '{column.path_in_schema}' has a page of {page:,} bytes uncompressed, over "
                f"limits.max_value_bytes ({limit:,}): raise it in the recipe to read it"
            )
    return None


def _read_parquet(unit: Unit) -> Iterator[dict[str, Any]]:
    make = _RowMaker(unit)
    f = make.fields
    opened = _open_parquet(unit)
    if isinstance(opened, str):
        yield make.broken(0, "unreadable_file", opened)
        return
    handle, pf, groups, offset = opened
    with handle:
        mapped = {f.get(k) for k in ("text", "image", "texts", "images", "video")} - {None}
        meta_cols = [
            c
            for c in pf.schema_arrow.names
            if c not in mapped and not pa.types.is_binary(pf.schema_arrow.field(c).type)
        ]
        try:
            for first, batch in _parquet_batches(make, handle, pf, groups, offset, batch_size=1024):
                offset = first
                if isinstance(batch, dict):  # a reject
                    yield batch
                    continue
                cols = batch.to_pydict()
                for i in range(batch.num_rows):
                    yield from make.guarded(offset, _parquet_rows, make, f, cols, meta_cols, i, offset)
                    offset += 1
        except Exception as e:  # noqa: BLE001 - a corrupt page: report where, keep what was read
            yield make.broken(offset, "unreadable_file", f"Parquet read failed after row {offset}: {e}")


def _parquet_rows(
    make: _RowMaker, f: dict, cols: dict, meta_cols: list[str], i: int, offset: int
) -> list[dict]:
    meta = {c: cols[c][i] for c in meta_cols if cols[c][i] is not None}
    images = _col(cols, f.get("images"), i)
    video, video_bytes = _video_value(_col(cols, f.get("video"), i), make.unit.uri, offset)
    return make.rows(
        offset,
        text=_col(cols, f.get("text"), i),
        image=_image_bytes(_col(cols, f.get("image"), i)),
        texts=_col(cols, f.get("texts"), i),
        images=[_image_bytes(x) for x in images] if images is not None else None,
        meta=meta,
        video=video,
        video_bytes=video_bytes,
    )


_POOL_COLUMNS = [
    f.name for f in ROW_SCHEMA if f.name not in ("reject_stage", "reject_reason", "reject_detail")
]


def _read_pool(unit: Unit) -> Iterator[dict[str, Any]]:
    """Shards of a pool (or any Parquet in the row schema): rows keep their id, modality and lineage."""
    make = _RowMaker(unit)
    opened = _open_parquet(unit)
    if isinstance(opened, str):
        yield make.broken(0, "unreadable_file", opened)
        return
    handle, pf, groups, offset = opened
    with handle:
        names = pf.schema_arrow.names
        if "id" not in names or "modality" not in names:
            yield make.broken(
                0,
                "unreadable_file",
                "not a pool shard (no 'id' and 'modality' columns); "
                "read it with format: parquet and a modality instead",
            )
            return
        columns = [c for c in _POOL_COLUMNS if c in names]
        try:
            for first, batch in _parquet_batches(
                make, handle, pf, groups, offset, batch_size=256, columns=columns
            ):
                offset = first
                if isinstance(batch, dict):  # a reject
                    yield batch
                    continue
                for row in batch.to_pylist():
                    problem = _pool_row_problem(row)
                    if problem:
                        yield make.broken(offset, "malformed_row", problem)
                        offset += 1
                        continue
                    row.setdefault("source_uri", unit.uri)
                    row["source_uri"] = row["source_uri"] or unit.uri
                    if row.get("source_offset") is None:
                        row["source_offset"] = offset
                    row.update(
                        source=row.get("source") or unit.source,
                        reject_stage=None,
                        reject_reason=None,
                        reject_detail=None,
                        _offset=offset,
                    )
                    yield row
                    offset += 1
        except Exception as e:  # noqa: BLE001 - a corrupt page: report where, keep what was read
            yield make.broken(offset, "unreadable_file", f"Parquet read failed after row {offset}: {e}")


_POOL_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _pool_row_problem(row: dict[str, Any]) -> str | None:
    """Why a pool row cannot be taken as it is: its id names its members in WebDataset shards (so ``../x``
    or ``a.b`` must not pass), and a modality no stage knows would slip past every filter."""
    rid, modality = row.get("id"), row.get("modality")
    if not isinstance(rid, str) or not _POOL_ID.fullmatch(rid):
        return (
            f"id {str(rid)[:80]!r} is not a row id (1 to 64 letters, digits, '_' or '-': it names the "
            "sample's members in WebDataset shards)"
        )
    if modality not in MODALITIES:
        return f"modality {str(modality)[:80]!r} is not one of {', '.join(MODALITIES)}"
    return None


def _col(cols: dict, name: str | None, i: int) -> Any:
    return cols[name][i] if name and name in cols else None


def _video_value(value: Any, uri: str, offset: int) -> tuple[str | None, bytes | None]:
    """A Parquet ``video`` cell: a path or URI, the file's bytes, or a ``{"bytes", "path"}`` struct. Bytes
    stored in the table get a reference to their row (``file.parquet#row<N>``)."""
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        return (path or f"{uri}#row{offset}", data) if data else (path, None)
    if isinstance(value, (bytes, bytearray)):
        return f"{uri}#row{offset}", bytes(value)
    return value, None


def _image_bytes(value: Any) -> bytes | None:
    """Accept raw bytes or the Hugging Face ``{"bytes": ..., "path": ...}`` image struct."""
    if isinstance(value, dict):
        return value.get("bytes")
    return value


def _json_lines(unit: Unit, stream) -> Iterator[tuple[int, dict | Exception, str | None, bytes]]:
    """``(offset, object, UTF-8 problem, raw line)`` for the non-blank lines of the unit's line range;
    a line that is not a JSON object comes with the ``ValueError`` in place of the object, and a line
    over ``limits.max_line_bytes`` (never held) with a :class:`curation.io.fs.TooLarge`."""
    max_line = unit.limits.max_line_bytes
    for offset, raw in enumerate(cfs.iter_lines(stream, max_line=max_line)):
        if offset < unit.rg_start:
            continue
        if unit.rg_stop is not None and offset >= unit.rg_stop:
            break
        if isinstance(raw, cfs.Skipped):
            too_long = cfs.TooLarge.over("line_too_long", "the line", raw.size, "max_line_bytes", max_line)
            yield offset, too_long, None, b""
            continue
        if not raw.strip():
            continue  # blank lines are not rows (offsets stay line numbers)
        text_of_line, bad = _decode_text(raw)
        try:
            obj = json.loads(text_of_line)
            if not isinstance(obj, dict):
                raise ValueError(f"expected a JSON object, got {type(obj).__name__}")  # noqa: TRY004 - caught below
        except ValueError as e:
            obj = e
        except RecursionError:
            obj = ValueError("nested too deeply to parse")
        yield offset, obj, bad, raw


def _line_reject(make: _RowMaker, offset: int, problem: Exception, raw: bytes) -> dict[str, Any]:
    """The reject of a line that is no record: too long to read, or not a JSON object."""
    if isinstance(problem, cfs.TooLarge):
        return make.broken(offset, problem.reason, str(problem))
    return make.broken(offset, "malformed_row", f"not a JSON object: {problem}", raw)


def _read_jsonl(unit: Unit) -> Iterator[dict[str, Any]]:
    make = _RowMaker(unit)
    f = make.fields
    base = cfs.dirname(unit.uri)
    try:
        stream = cfs.open_input(unit.uri)
    except OSError as e:
        yield make.broken(0, "unreadable_file", str(e))
        return
    with stream:
        for offset, obj, bad, raw in _json_lines(unit, stream):
            if isinstance(obj, Exception):
                yield _line_reject(make, offset, obj, raw)
                continue
            yield from make.guarded(offset, _jsonl_rows, make, f, base, offset, obj, bad, raw=raw)


def _jsonl_rows(
    make: _RowMaker, f: dict, base: str, offset: int, obj: dict, bad_text: str | None
) -> list[dict]:
    unit = make.unit
    mapped = {f.get(k) for k in ("text", "image", "texts", "images", "video")}
    meta = {k: v for k, v in obj.items() if k not in mapped}
    reason = detail = None
    if bad_text and unit.on_bad_text == "reject":
        reason, detail = "text_not_utf8", f"{unit.uri}#{offset}: {bad_text}"
    missing: list[str] = []
    refused: list[str] = []

    def load(ref: Any) -> bytes | None:
        if ref is None:
            return None
        try:
            return make.read(ref)
        except refs.RefusedReference as e:
            refused.append(f"{e.reason}: image {refs.shown(ref)}: {e}")
        except (OSError, ValueError):
            missing.append(str(ref))
        return None

    for key in ("texts", "images"):
        if key in f and obj.get(f[key]) is not None and not isinstance(obj[f[key]], list):
            raise TypeError(f"'{f[key]}' must be a list, got {type(obj[f[key]]).__name__}")
    text = obj.get(f["text"]) if "text" in f else None
    image = load(obj.get(f["image"])) if "image" in f else None
    texts = obj.get(f["texts"]) if "texts" in f else None
    images = [load(x) for x in obj.get(f["images"]) or []] if "images" in f else None
    if refused and reason is None:
        reason, why = refused[0].split(": ", 1)
        detail = f"{unit.uri}#{offset}: {why}"
    if missing and reason is None:
        reason, detail = "missing_image_file", f"{unit.uri}#{offset}: cannot read {', '.join(missing[:3])}"
    if text is not None and not isinstance(text, str):
        text = json.dumps(text, ensure_ascii=False)
    video = obj.get(f["video"]) if "video" in f else None
    if video is not None and not isinstance(video, str):
        raise TypeError(f"'{f['video']}' must be a path or URI, got {type(video).__name__}")
    return make.rows(
        offset,
        text=text,
        image=image,
        texts=texts,
        images=images,
        meta=meta,
        reason=reason,
        detail=detail,
        video=video,
    )


# ---------------------------------------------------------------- SFT conversations (sharegpt, qa)


def _read_sft(unit: Unit) -> Iterator[dict[str, Any]]:
    """Records of a ``sharegpt`` or ``qa`` source as SFT rows (:mod:`curation.io.conversations` converts).

    A record that cannot become a conversation (no turns, an unknown role or mode, roles out of order,
    placeholders that do not match the images, a suffix that contradicts the mode) is an ingest reject
    with the converter's reason; a missing image file is ``missing_image_file`` and keeps the messages.
    """
    make = _RowMaker(unit)
    convert = conversations.from_conversation if unit.format == "sharegpt" else conversations.from_qa
    for offset, record, broken in _sft_records(unit, make):
        if broken is not None:
            yield broken
            continue
        yield from make.guarded(offset, _sft_row, make, convert, record, offset)


def _sft_row(make: _RowMaker, convert, record: dict, offset: int) -> list[dict[str, Any]]:
    try:
        conv = convert(record, make.fields, make.unit.mode)
        images, reason, why = _load_images(conv.images, make)
    except chat.ConversionError as e:
        return [make.broken(offset, e.reason, e.detail, _raw_record(record))]
    detail = f"{make.unit.uri}#{offset}: {why}" if reason else None
    meta = {
        k: v
        for k, v in record.items()
        if k not in conv.used and v is not None and not isinstance(v, (bytes, bytearray))
    }
    return [
        make.row(
            offset,
            messages=chat.dump_messages(conv.messages),
            mode=conv.mode,
            images=images or None,
            meta=meta,
            video=conv.video or None,
            reason=reason,
            detail=detail,
        )
    ]


def _resolve(base: str, ref: str) -> str:
    path = cfs.join(base, ref)
    return path if cfs.is_uri(path) else os.path.normpath(path)


def _cut(ref: Any, limit: int = 1000) -> str:
    """A reference as the row keeps it when it was not followed: text, at most ``limit`` characters."""
    text = ref if isinstance(ref, str) else repr(ref)
    return text[:limit]


def _load_images(references: list[Any], make: _RowMaker) -> tuple[list[bytes | None], str | None, str | None]:
    """Bytes of every image reference (inline bytes, structs, data URIs, or paths read where the source's
    policy allows), and the reject reason and why for those that could not be read (a refusal first)."""
    images: list[bytes | None] = []
    missing: list[str] = []
    refused: tuple[str, str] | None = None
    for ref in references:
        data = conversations.image_bytes(ref)
        path = conversations.image_path(ref) if data is None else None
        if data is None and path is None:
            raise chat.ConversionError(
                "malformed_row",
                f"an image reference must be bytes, a path or a data URI, got {type(ref).__name__}",
            )
        if path is not None:
            try:
                data = make.read(path)
            except refs.RefusedReference as e:
                refused = refused or (e.reason, f"image {refs.shown(path)}: {e}")
            except (OSError, ValueError):
                missing.append(path)
        images.append(data)
    if refused:
        return images, *refused
    if missing:
        return images, "missing_image_file", f"cannot read {', '.join(missing[:3])}"
    return images, None, None


def _raw_record(record: Any) -> str:
    return json.dumps(record, ensure_ascii=False, default=lambda v: f"<{type(v).__name__}>")[:2000]


def _sft_records(unit: Unit, make: _RowMaker) -> Iterator[tuple[int, dict | None, dict | None]]:
    """``(offset, record, None)`` for each record of the unit, or ``(offset, None, reject row)`` where a
    record cannot be read. ``.parquet``: rows; ``.json``: a list of records (or JSON lines, if the file
    does not start with ``[``); anything else: JSON lines."""
    if unit.uri.endswith(".parquet"):
        opened = _open_parquet(unit)
        if isinstance(opened, str):
            yield 0, None, make.broken(0, "unreadable_file", opened)
            return
        handle, pf, groups, offset = opened
        with handle:
            try:
                for first, batch in _parquet_batches(make, handle, pf, groups, offset, batch_size=256):
                    offset = first
                    if isinstance(batch, dict):  # a reject
                        yield offset, None, batch
                        continue
                    for record in batch.to_pylist():
                        yield offset, record, None
                        offset += 1
            except Exception as e:  # noqa: BLE001 - a corrupt page: report where, keep what was read
                yield (
                    offset,
                    None,
                    make.broken(offset, "unreadable_file", f"Parquet read failed after row {offset}: {e}"),
                )
        return
    try:
        if unit.uri.endswith(".json"):
            data = cfs.read_bytes(unit.uri, make.limits.max_file_bytes, "max_file_bytes")
            stream = io.BytesIO(data)
        else:
            data, stream = b"", cfs.open_input(unit.uri)
    except (OSError, FileNotFoundError) as e:
        yield 0, None, make.broken(0, "unreadable_file", str(e))
        return
    except cfs.TooLarge as e:  # read whole, and parsed into several times its size: never started
        yield 0, None, make.broken(0, e.reason, str(e))
        return
    if data.lstrip()[:1] == b"[":
        try:
            records = json.loads(data)
        except (ValueError, RecursionError) as e:
            yield 0, None, make.broken(0, "unreadable_file", f"not a valid JSON list of records: {e}")
            return
        for offset, record in enumerate(records):
            if isinstance(record, dict):
                yield offset, record, None
            else:
                yield (
                    offset,
                    None,
                    make.broken(
                        offset,
                        "malformed_row",
                        f"expected a JSON object, got {type(record).__name__}",
                        _raw_record(record),
                    ),
                )
        return
    with stream:
        for offset, obj, bad, raw in _json_lines(unit, stream):
            if isinstance(obj, Exception):
                yield offset, None, _line_reject(make, offset, obj, raw)
            elif bad and unit.on_bad_text == "reject":
                yield offset, None, make.broken(offset, "text_not_utf8", bad, raw)
            else:
                yield offset, obj, None
