"""Pool folders: sharded Parquet + WebDataset with a manifest, stats and rejects.

See ``docs/pool-format.md`` for the layout. Writes are idempotent and exactly-once per unit:

1. a worker writes every part of a unit (``shards/UUUUU_PPPP.{parquet,tar}``, ``rejects/UUUUU.parquet``)
   under temporary names and renames each into place when complete;
2. then it writes ``_work/done/UUUUU.json`` (rows, bytes, sha256 of each part, stage counters), again
   by temp-and-rename. That record is the commit.

A rerun skips units that have a done record (their shards are not rewritten) and redoes the others
from scratch; since units, ids and bytes are deterministic, a redone unit overwrites its half-written
parts with identical ones, so no row is lost or duplicated whatever moment the crash came.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import tarfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from curation.io import fs as cfs
from curation.io import outputs
from curation.schema import REJECT_COLUMNS

log = logging.getLogger(__name__)

FORMAT = "curation.pool/1"
_JSON_SKIP = {"image", "images", "frames", "video_bytes", *REJECT_COLUMNS}
_MAGIC = [
    (b"\xff\xd8\xff", "jpg"),
    (b"\x89PNG", "png"),
    (b"GIF8", "gif"),
    (b"BM", "bmp"),
    (b"II*\x00", "tif"),
    (b"MM\x00*", "tif"),
]


def image_ext(data: bytes, fmt: str | None = None) -> str:
    """File extension for encoded image bytes (img2dataset uses .jpg; we keep the real format)."""
    if fmt:
        return {"jpeg": "jpg", "tiff": "tif"}.get(fmt.lower(), fmt.lower())
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return next((ext for magic, ext in _MAGIC if data.startswith(magic)), "bin")


def sha256_file(fs: pafs.FileSystem, path: str) -> str:
    h = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def sweep_temp(fs: pafs.FileSystem, path: str, label: str) -> int:
    """Delete the temp files (``*.tmp-<tag>``) under ``path`` that no task will rename any more: those of a
    worker killed mid-write (Ray retried its task, which wrote its own), or of a failed unit whose store went
    away before it could delete them. Call it when no task of this job is running. No manifest lists them."""
    stale = [
        i.path
        for i in fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
        if i.type == pafs.FileType.File and ".tmp-" in i.base_name
    ]
    for name in stale:
        with contextlib.suppress(FileNotFoundError):
            fs.delete_file(name)
    if stale:
        log.info("removed %d temp file(s) left by killed or failed writers in %s", len(stale), label)
    return len(stale)


def _commit_bytes(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, path)


# ---------------------------------------------------------------- worker side


def _discard(fs: pafs.FileSystem, handles, paths: list[str]) -> None:
    """Close ``handles`` and delete ``paths``, best effort: after a full disk, closing may fail too."""
    for handle in handles:
        with contextlib.suppress(Exception):
            if handle is not None:
                handle.close()
    for path in paths:
        with contextlib.suppress(OSError):
            if fs.get_file_info(path).type == pafs.FileType.File:
                fs.delete_file(path)


class _Part:
    """One shard being written: a Parquet file and a tar with the same rows, under temp names."""

    def __init__(self, fs, root: str, name: str, schema: pa.Schema, formats: list[str], key: str = "id"):
        # key: the column naming each sample in the tar (mixtures repeat a row across epochs, so they key
        # by a column that adds the epoch)
        self.fs, self.root, self.name, self.schema, self.formats, self.key = (
            fs,
            root,
            name,
            schema,
            formats,
            key,
        )
        self.tmp_tag = uuid.uuid4().hex[:8]
        self.rows = 0
        self.bytes = 0
        self._pq = self._tar = self._tar_stream = None
        if "parquet" in formats:
            self._pq_stream = fs.open_output_stream(self._tmp("parquet"))
            self._pq = pq.ParquetWriter(self._pq_stream, schema, compression="zstd")
        if "webdataset" in formats:
            self._tar_stream = fs.open_output_stream(self._tmp("tar"))
            self._tar = tarfile.open(fileobj=self._tar_stream, mode="w", format=tarfile.USTAR_FORMAT)

    def abort(self) -> None:
        """Close and delete this part's temp files, best effort."""
        _discard(
            self.fs,
            (self._pq, self._tar, getattr(self, "_pq_stream", None), self._tar_stream),
            [self._tmp(ext) for ext in ("parquet", "tar")],
        )

    def _final(self, ext: str) -> str:
        return f"{self.root}/shards/{self.name}.{ext}"

    def _tmp(self, ext: str) -> str:
        return f"{self._final(ext)}.tmp-{self.tmp_tag}"

    def write(self, table: pa.Table) -> None:
        if self._pq is not None:
            self._pq.write_table(table, row_group_size=max(1, min(table.num_rows, 1024)))
        if self._tar is not None:
            for row in table.to_pylist():
                for member, data in _wds_members(row):
                    info = tarfile.TarInfo(f"{row[self.key]}.{member}")
                    info.size, info.mtime, info.mode = len(data), 0, 0o644
                    self._tar.addfile(info, io.BytesIO(data))
        self.rows += table.num_rows
        self.bytes += table.nbytes

    def commit(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"name": self.name, "rows": self.rows}
        if self._pq is not None:
            self._pq.close()
            self._pq_stream.close()
        if self._tar is not None:
            self._tar.close()
            self._tar_stream.close()
        for ext, key in (("parquet", "parquet"), ("tar", "webdataset")):
            if key in self.formats:
                self.fs.move(self._tmp(ext), self._final(ext))
                path = self._final(ext)
                entry[ext] = {
                    "path": f"shards/{self.name}.{ext}",
                    "bytes": self.fs.get_file_info(path).size,
                    "sha256": sha256_file(self.fs, path),
                }
        return entry


#: What a pool's video rows carry (``output.video``): the sampled frames, the clip's bytes, or both.
VIDEO_PAYLOADS = ("frames", "clip", "both")


# Reject reasons whose row's media bytes are not a decodable image or video of the corpus (or were never read).
NO_MEDIA = frozenset(
    {
        "undecodable",
        "decompression_bomb",
        "unreadable_video",
        "unreadable_file",
        "malformed_row",
        "refused_reference",
        "refused_scheme",
        "unit_failed",
    }
)
_MEDIA_COLUMNS = ("image", "images", "video_bytes")


def without_media(table: pa.Table) -> pa.Table:
    """``table`` with the media bytes of rows rejected for a :data:`NO_MEDIA` reason set to null."""
    drop = pc.fill_null(pc.is_in(table["reject_reason"], pa.array(sorted(NO_MEDIA))), False)
    if not pc.any(drop).as_py():
        return table
    for name in _MEDIA_COLUMNS:
        if name in table.column_names:
            col = table[name]
            table = table.set_column(
                table.schema.get_field_index(name),
                name,
                pc.if_else(drop, pa.nulls(len(table), col.type), col),
            )
    return table


def video_payload(table: pa.Table, payload: str) -> pa.Table:
    """``table`` with what ``output.video`` leaves out of video rows nulled: ``video_bytes`` for ``frames``; for
    ``clip``, the ``frames`` of rows that have their clip (``frame_ts`` stays: when the frames were sampled)."""
    import pyarrow.compute as pc

    if payload == "both" or "video_bytes" not in table.column_names or not table.num_rows:
        return table
    if payload == "frames":
        if table["video_bytes"].null_count == table.num_rows:
            return table
        i = table.schema.get_field_index("video_bytes")
        return table.set_column(
            i, table.schema.field(i), pa.nulls(table.num_rows, table.schema.field(i).type)
        )
    has_clip = pc.is_valid(table["video_bytes"])
    if not pc.any(has_clip).as_py():
        return table
    i = table.schema.get_field_index("frames")
    frames = pc.if_else(has_clip, pa.nulls(table.num_rows, table.schema.field(i).type), table["frames"])
    return table.set_column(i, table.schema.field(i), frames)


def _wds_members(row: dict[str, Any]) -> list[tuple[str, bytes]]:
    meta = {k: v for k, v in row.items() if k not in _JSON_SKIP and v is not None}
    members = []
    if row.get("image") is not None:
        members.append((image_ext(row["image"], row.get("image_format")), row["image"]))
    for i, img in enumerate(row.get("images") or []):
        if img is not None:
            members.append((f"img{i}.{image_ext(img)}", img))
    for i, frame in enumerate(row.get("frames") or []):  # timestamps are in the .json (frame_ts)
        if frame is not None:
            members.append((f"frame{i:03d}.{image_ext(frame)}", frame))
    if row.get("video_bytes"):  # video2dataset's member: <key>.mp4 (or the source's own container)
        ext = (json.loads(row["meta"]).get("clip_ext") if row.get("meta") else None) or "mp4"
        members.append((ext, row["video_bytes"]))
    members.append(("json", json.dumps(meta, ensure_ascii=False, sort_keys=True).encode()))
    if row.get("text") is not None:
        members.append(("txt", row["text"].encode("utf-8", "replace")))
    return sorted(members)


@dataclass
class UnitSink:
    """Writes one unit's kept rows (in parts of at most ``shard_rows`` rows / ``shard_bytes``) and rejects."""

    root: str
    unit: int
    schema: pa.Schema  # shards
    reject_schema: pa.Schema  # rejects: the shard columns plus reject_stage/reason/detail
    formats: list[str]
    shard_rows: int = 10_000
    shard_bytes: int = 1 << 30
    write_rejects: bool = True
    video: str = "both"  # what video rows keep in the shards (VIDEO_PAYLOADS); rejects keep everything
    reject_media: bool = False  # keep the bytes of media that did not decode in the rejects (see reject())
    parts: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self):
        self.fs, self.path = cfs.filesystem(self.root)
        self._part: _Part | None = None
        self._rejects: pq.ParquetWriter | None = None
        self._rejects_rows = 0
        self._rejects_tmp = f"{self.path}/rejects/{self.unit:05d}.parquet.tmp-{uuid.uuid4().hex[:8]}"

    def write(self, table: pa.Table) -> None:
        if not self.formats:  # formats: [] keeps no shards (an audit only wants the rejects)
            return
        table = video_payload(table, self.video)
        start = 0
        while start < table.num_rows:
            if self._part is None:
                self._part = _Part(
                    self.fs, self.path, f"{self.unit:05d}_{len(self.parts):04d}", self.schema, self.formats
                )
            room = self.shard_rows - self._part.rows
            chunk = table.slice(start, room)
            self._part.write(chunk)
            start += chunk.num_rows
            if self._part.rows >= self.shard_rows or self._part.bytes >= self.shard_bytes:
                self.parts.append(self._part.commit())
                self._part = None

    def reject(self, table: pa.Table) -> None:
        """Append rejected rows. The bytes of media that did not decode or were never read (:data:`NO_MEDIA`)
        are left out unless ``reject_media``: they may be anything at all, not an image of the corpus."""
        if not self.write_rejects or not table.num_rows:
            self._rejects_rows += table.num_rows
            return
        if not self.reject_media:
            table = without_media(table)
        if self._rejects is None:
            self._rejects_stream = self.fs.open_output_stream(self._rejects_tmp)
            self._rejects = pq.ParquetWriter(self._rejects_stream, self.reject_schema, compression="zstd")
        self._rejects.write_table(table)
        self._rejects_rows += table.num_rows

    def abort(self) -> None:
        """After a failure (a full disk): close and delete this unit's temp files, best effort. Committed parts
        stay; the unit has no done record, so a rerun redoes it whole and overwrites them identically."""
        if self._part is not None:
            self._part.abort()
        _discard(self.fs, (self._rejects, getattr(self, "_rejects_stream", None)), [self._rejects_tmp])

    def close(self) -> dict[str, Any]:
        """Commit the last part and the rejects; return this unit's manifest entries."""
        if self._part is not None and self._part.rows:
            self.parts.append(self._part.commit())
        self._part = None
        rejects = None
        if self._rejects is not None:
            self._rejects.close()
            self._rejects_stream.close()
            final = f"{self.path}/rejects/{self.unit:05d}.parquet"
            self.fs.move(self._rejects_tmp, final)
            rejects = {
                "path": f"rejects/{self.unit:05d}.parquet",
                "rows": self._rejects_rows,
                "bytes": self.fs.get_file_info(final).size,
                "sha256": sha256_file(self.fs, final),
            }
        return {"shards": self.parts, "rejects": rejects, "rejected": self._rejects_rows}


# ---------------------------------------------------------------- driver side


class Pool:
    """A pool folder on the driver: resume state, and the final manifest."""

    def __init__(self, root: str, recipe_hash: str):
        self.root = root
        self.recipe_hash = recipe_hash
        self.fs, self.path = cfs.filesystem(root)

    def exists(self) -> bool:
        return self.fs.get_file_info(f"{self.path}/_work/recipe.json").type == pafs.FileType.File

    def prepare(self, resolved: dict[str, Any], overwrite: bool = False) -> None:
        """Create the folder, or check that an existing one was written by the same recipe; ``overwrite``
        empties an earlier output of this tool first (:func:`curation.io.outputs.claim`). Call it holding the
        output's lock (:func:`curation.io.outputs.lock`).

        Raises ``FileExistsError`` for a pool of another recipe, :class:`curation.io.outputs.OutputError` for a
        folder this tool did not write, :class:`curation.io.fs.StorageError` when the location cannot be read
        or written (a missing bucket, refused credentials, a read-only disk)."""
        with cfs.writing(self.root):
            self._prepare(resolved, overwrite)

    def _prepare(self, resolved: dict[str, Any], overwrite: bool) -> None:
        outputs.claim(self.root, "pool", overwrite)
        if self.exists():
            with self.fs.open_input_stream(f"{self.path}/_work/recipe.json") as f:
                previous = json.loads(f.read())
            if previous.get("recipe_hash") != self.recipe_hash:
                raise FileExistsError(
                    f"{self.root} holds a pool from a different recipe (hash {previous.get('recipe_hash')}, "
                    f"this one is {self.recipe_hash}); write to another folder or pass --overwrite"
                )
            self.sweep_temp()
        cfs.make_dirs(self.root, ("shards", "rejects", "_work/done", "_work/index"))
        _commit_bytes(
            self.fs,
            f"{self.path}/_work/recipe.json",
            json.dumps({"recipe_hash": self.recipe_hash, "recipe": resolved}, indent=2).encode(),
        )

    def sweep_temp(self) -> None:
        """Before resuming, and once every task is done: see :func:`sweep_temp`."""
        sweep_temp(self.fs, self.path, self.root)

    def done_path(self, unit: int) -> str:
        return f"{self.path}/_work/done/{unit:05d}.json"

    def done_records(self) -> dict[int, dict[str, Any]]:
        sel = pafs.FileSelector(f"{self.path}/_work/done", allow_not_found=True)
        out = {}
        for info in self.fs.get_file_info(sel):
            if info.path.endswith(".json"):
                with self.fs.open_input_stream(info.path) as f:
                    rec = json.loads(f.read())
                out[rec["unit"]] = rec
        return out

    def write_manifest(
        self,
        resolved: dict[str, Any],
        records: list[dict[str, Any]],
        replaced: dict[str, dict[str, Any]] | None = None,
        extra_rejects: list[dict] = (),
        lineage: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """``replaced``: shard entries rewritten after the unit pass (by name); ``extra_rejects``: their
        rejects files; ``lineage``: per stage, what reproduces its scores (models, prompts)."""
        replaced = replaced or {}
        shards = [dict(replaced.get(s["name"], s), unit=r["unit"]) for r in records for s in r["shards"]]
        rejects = [r["rejects"] for r in records if r.get("rejects")] + list(extra_rejects)
        total_bytes = sum(s[k]["bytes"] for s in shards for k in ("parquet", "tar") if k in s)
        manifest = {
            "format": FORMAT,
            "recipe": resolved,
            "recipe_hash": self.recipe_hash,
            "shards": shards,
            "rejects": rejects,
            "units": [
                {"unit": r["unit"], "uri": r["uri"], "source": r["source"], "errors": r.get("errors", [])}
                for r in records
            ],
            "stages": lineage or {},
            "totals": {
                "rows": sum(s["rows"] for s in shards),
                "rejected": sum(r["rejected"] for r in records) + sum(r["rows"] for r in extra_rejects),
                "shards": len(shards),
                "bytes": total_bytes,
            },
        }
        self.write_json("manifest.json", manifest)
        return manifest

    def write_json(self, name: str, obj: Any) -> None:
        _commit_bytes(
            self.fs,
            f"{self.path}/{name}",
            json.dumps(obj, indent=2, ensure_ascii=False, default=str).encode(),
        )


def commit_done(root: str, record: dict[str, Any]) -> None:
    """Write a unit's done record: the commit point of that unit."""
    fs, path = cfs.filesystem(root)
    _commit_bytes(
        fs, f"{path}/_work/done/{record['unit']:05d}.json", json.dumps(record, sort_keys=True).encode()
    )


def lineage_keys(table: pa.Table) -> list[str]:
    """``source_uri#source_offset`` per row (``@clip_start`` added for a shot of a video): unique per input
    row, unlike ids, which exact duplicates share."""
    starts = (
        table["clip_start"].to_pylist() if "clip_start" in table.column_names else [None] * table.num_rows
    )
    return [
        f"{u}#{o}" if c is None else f"{u}#{o}@{c:.3f}"
        for u, o, c in zip(table["source_uri"].to_pylist(), table["source_offset"].to_pylist(), starts)
    ]


@dataclass(frozen=True)
class ThresholdCut:
    """A ``keep_fraction`` cut: rows scoring below ``threshold`` in ``column`` go (or at it, unless their lineage
    key is in ``tied_kept``); rows without a score stay."""

    stage: str
    column: str
    threshold: float
    tied_kept: tuple[str, ...]
    detail: str  # why, for every row it rejects; the row's own score is appended
    reason: str = "below_keep_fraction"

    def select(self, table: pa.Table) -> tuple[pa.Array, list[str], list[str]]:
        """The rows of ``table`` this cut rejects (a boolean mask), with a reason and a detail for each of them."""
        import pyarrow.compute as pc

        keys = pa.array(lineage_keys(table), pa.string())
        col = table[self.column]
        tie_out = pc.and_(
            pc.equal(col, self.threshold),
            pc.invert(pc.is_in(keys, pa.array(list(self.tied_kept), pa.string()))),
        )
        low = pc.fill_null(pc.or_(pc.less(col, self.threshold), tie_out), False)
        scores = col.filter(low).to_pylist()
        return low, [self.reason] * len(scores), [f"{self.detail}; this row {x:.4f}" for x in scores]


@dataclass(frozen=True)
class KeyCut:
    """A pool-wide decision made row by row (near-duplicate clusters): the rows whose lineage key
    (:func:`lineage_keys`) is in ``rejected`` go, with that ``(reason, detail)``."""

    stage: str
    rejected: dict[str, tuple[str, str]]

    def select(self, table: pa.Table) -> tuple[pa.Array, list[str], list[str]]:
        hits = [self.rejected.get(k) for k in lineage_keys(table)]
        return (
            pa.array([h is not None for h in hits], pa.bool_()),
            [h[0] for h in hits if h is not None],
            [h[1] for h in hits if h is not None],
        )


def cut_shard(
    root: str,
    entry: dict[str, Any],
    cut: ThresholdCut | KeyCut,
    schema: pa.Schema,
    reject_schema: pa.Schema,
    formats: list[str],
    tail: Callable[[pa.Table], tuple[pa.Table, dict]] | None = None,
    video: str = "both",
) -> dict[str, Any]:
    """Move the rows of a shard that a pool-wide ``cut`` rejects to a rejects file, run ``tail`` on the rows
    kept; return the record.

    ``tail``: the stages after this cut (up to the next one), so that an expensive stage placed after a
    ``keep_fraction`` filter sees only the rows the cut kept. It gets the kept rows with the reject columns
    (``reject_schema``), returns them with its own rejects marked, and its counters (``record["counters"]``).

    Never in place: the rows rejected here go to ``rejects/g_<stage>_<shard>.parquet``, the kept ones to a
    new shard ``<shard>-<stage>``, then ``_work/global/<stage>/<shard>.json`` commits both, and only then is
    the old shard deleted. A rerun finds the record (and finishes the deletion) or, without one, the old
    shard still whole and redoes it identically: a crash at any point never loses or duplicates a row.
    ``video``: what video rows keep in the new shard (:func:`video_payload`), for the pool's last cut.
    """
    fs, path = cfs.filesystem(root)
    done = f"{path}/_work/global/{cut.stage}/{entry['name']}.json"
    if fs.get_file_info(done).type == pafs.FileType.File:
        with fs.open_input_stream(done) as f:
            record = json.loads(f.read())
    else:
        record = _cut_unrecorded(fs, path, entry, cut, schema, reject_schema, formats, tail, video)
        fs.create_dir(f"{path}/_work/global/{cut.stage}", recursive=True)
        _commit_bytes(fs, done, json.dumps(record, sort_keys=True).encode())
    if record["shard"]["name"] != entry["name"]:
        for kind in ("parquet", "tar"):
            old = f"{path}/{entry[kind]['path']}" if kind in entry else None
            if old and fs.get_file_info(old).type == pafs.FileType.File:
                fs.delete_file(old)
    return record


def _cut_unrecorded(fs, path, entry, cut, schema, reject_schema, formats, tail, video) -> dict[str, Any]:
    import pyarrow.compute as pc

    stage = cut.stage
    with fs.open_input_file(f"{path}/{entry['parquet']['path']}") as f:
        table = pq.read_table(f)
    low, reasons, details = cut.select(table)
    record: dict[str, Any] = {
        "name": entry["name"],
        "shard": entry,
        "rejects": None,
        "moved": 0,
        "counters": {},
    }
    moved = table.filter(low)
    if not moved.num_rows and tail is None and video_payload(table, video) is table:
        return record  # nothing changes: the shard stays as it is
    moved = moved.append_column("reject_stage", pa.array([stage] * moved.num_rows, pa.string()))
    moved = moved.append_column("reject_reason", pa.array(reasons, pa.string()))
    moved = moved.append_column("reject_detail", pa.array(details, pa.string()))
    rejects = [moved.select(reject_schema.names).cast(reject_schema)] if moved.num_rows else []
    kept = table.filter(pc.invert(low))
    if tail is not None:
        for name in REJECT_COLUMNS:
            kept = kept.append_column(name, pa.nulls(kept.num_rows, pa.string()))
        kept, record["counters"] = tail(kept.select(reject_schema.names).cast(reject_schema))
        later = pc.is_valid(kept["reject_reason"])
        if pc.any(later).as_py():
            rejects.append(kept.filter(later))
        kept = kept.filter(pc.invert(later)).select(schema.names)
    record["moved"] = moved.num_rows
    record["moved_reasons"] = {r: reasons.count(r) for r in sorted(set(reasons))}
    if rejects:
        out = pa.concat_tables(rejects)
        rel = f"rejects/g_{stage}_{entry['name']}.parquet"
        buf = pa.BufferOutputStream()
        pq.write_table(out, buf, compression="zstd")
        _commit_bytes(fs, f"{path}/{rel}", buf.getvalue().to_pybytes())
        record["rejects"] = {
            "path": rel,
            "rows": out.num_rows,
            "bytes": fs.get_file_info(f"{path}/{rel}").size,
            "sha256": sha256_file(fs, f"{path}/{rel}"),
        }
    part = _Part(fs, path, f"{entry['name']}-{stage}", schema, formats)
    part.write(video_payload(kept, video))
    record["shard"] = dict(
        part.commit(), **{k: v for k, v in entry.items() if k not in ("name", "rows", "parquet", "tar")}
    )
    return record
