"""Committed writes: how every file meant to be read back is written, so that a reader (another job, a rerun,
a person) finds either the whole file or none of it, never half of one.

- **Whole files** (:func:`write_bytes`, :func:`write_text`): manifests, stats, reports, done records, the
  output marker. Locally the bytes go to a temporary name in the same folder (``NAME.tmp-<8 hex>``, see
  :func:`temp_path`) and are renamed into place: a rename within one folder is atomic. On ``s3://`` they go
  up in a single put under the real key: an object appears whole or not at all, and a copy would cost a second
  request and leave a temporary object behind when the store goes away between the two.
- **Streamed files** (:class:`PendingFile`, :func:`open_committed`): shards, checkpoints, index and bucket
  files, written piece by piece. Always under a temporary name, on ``s3://`` too (pyarrow completes an upload
  when its stream is closed, even after the writer failed half way, so the real key would get half a file),
  then moved into place once complete.
- **Temp files left behind** by a worker that was killed mid-write, or whose store went away before it could
  delete them, are removed by :func:`sweep_temp` once no task of the job runs; nothing lists them.
- **Digests** (:func:`sha256_file`) read in chunks: shards and checkpoints can be larger than memory.

Which folders a job may write, and their life as outputs (claim, resume, done records), is
:mod:`curation.io.outputs`; this module knows files, not owners.

Example::

    write_text("pools/demo/report.json", json.dumps(data))
    with open_committed("runs/a/checkpoints/step_00000100.pt") as f:
        torch.save(state, f)
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import tarfile
import uuid
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from curation.io import fs as cfs
from curation.schema import REJECT_COLUMNS

log = logging.getLogger(__name__)

#: What every temporary name carries (``NAME.tmp-<8 hex>``): how :func:`sweep_temp` recognises one.
TEMP_MARK = ".tmp-"


def _resolve(path: str | os.PathLike, fs: pafs.FileSystem | None) -> tuple[pafs.FileSystem, str]:
    """``(fs, path)``: ``path`` inside ``fs`` when one is given, else a local path or ``s3://`` URI."""
    return (fs, str(path)) if fs is not None else cfs.filesystem(str(path))


def temp_path(path: str) -> str:
    """A temporary name for ``path`` in its own folder (a rename never crosses file systems), unique per
    writer: a task Ray retries while the killed one's file is still there writes its own."""
    return f"{path}{TEMP_MARK}{uuid.uuid4().hex[:8]}"


def write_bytes(path: str | os.PathLike, data: bytes, fs: pafs.FileSystem | None = None) -> None:
    """Write ``data`` to ``path`` (a local path or ``s3://`` URI; with ``fs``, a path inside it) so that it is
    never seen half written: a temp file renamed into place locally, a single put on ``s3://``."""
    fs, path = _resolve(path, fs)
    if not isinstance(fs, pafs.LocalFileSystem):
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    tmp = temp_path(path)
    try:
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        fs.move(tmp, path)
    except BaseException:
        _discard(fs, (), [tmp])
        raise


def write_text(path: str | os.PathLike, text: str, fs: pafs.FileSystem | None = None) -> None:
    """:func:`write_bytes` of ``text`` in UTF-8."""
    write_bytes(path, text.encode("utf-8"), fs)


class PendingFile:
    """A file being streamed under a temporary name: write to :attr:`stream`, then :meth:`commit` (move it
    into place) or :meth:`abort` (delete it). For files too large for memory, or written over many calls (a
    unit's rejects); :func:`open_committed` wraps one in a ``with`` block."""

    def __init__(self, path: str | os.PathLike, fs: pafs.FileSystem | None = None):
        self.fs, self.path = _resolve(path, fs)
        self.tmp = temp_path(self.path)
        self.stream = self.fs.open_output_stream(self.tmp)

    def commit(self) -> None:
        """Close the stream and move the file into place. Close a writer wrapped around the stream first (a
        ``ParquetWriter``, a ``TarFile``): closing it writes its footer, not closing the stream."""
        self.stream.close()
        self.fs.move(self.tmp, self.path)

    def abort(self, *writers: Any) -> None:
        """After a failure (a full disk): close ``writers`` and the stream and delete the temp file, best
        effort (closing may fail too); what is left is swept by :func:`sweep_temp`."""
        _discard(self.fs, (*writers, self.stream), [self.tmp])


@contextlib.contextmanager
def open_committed(path: str | os.PathLike, fs: pafs.FileSystem | None = None) -> Iterator[Any]:
    """A writable stream whose file appears at ``path`` when the block ends, or not at all if it raises.

    Example::

        with open_committed(f"{root}/_work/index/00007.parquet") as f:
            pq.write_table(table, f)
    """
    pending = PendingFile(path, fs)
    try:
        yield pending.stream
    except BaseException:
        pending.abort()
        raise
    pending.commit()


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


def sweep_temp(fs: pafs.FileSystem, path: str, label: str) -> int:
    """Delete the temp files (``*.tmp-<tag>``) under ``path`` that no task will rename any more: those of a
    worker killed mid-write (Ray retried its task, which wrote its own), or of a failed unit whose store went
    away before it could delete them. Call it when no task of this job is running. No manifest lists them."""
    stale = [
        i.path
        for i in fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
        if i.type == pafs.FileType.File and TEMP_MARK in i.base_name
    ]
    for name in stale:
        with contextlib.suppress(FileNotFoundError):
            fs.delete_file(name)
    if stale:
        log.info("removed %d temp file(s) left by killed or failed writers in %s", len(stale), label)
    return len(stale)


def sha256_file(path: str | os.PathLike, fs: pafs.FileSystem | None = None) -> str:
    """Hex sha256 of a file, read 1 MiB at a time: shards and checkpoints can be larger than memory."""
    fs, path = _resolve(path, fs)
    h = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------- shards

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


class ShardWriter:
    """One shard of a pool or mixture being written: ``shards/NAME.parquet`` and ``shards/NAME.tar``
    (WebDataset, img2dataset member names; see docs/pool-format.md) with the same rows, under temporary names
    until :meth:`commit` moves both into place and returns the shard's manifest entry (rows, bytes, sha256).

    ``root``: the output folder inside ``fs``; ``formats``: ``parquet`` and/or ``webdataset``; ``key``: the
    column naming each sample in the tar (mixtures repeat a row across epochs, so they key by a column that
    adds the epoch)."""

    def __init__(
        self,
        fs: pafs.FileSystem,
        root: str,
        name: str,
        schema: pa.Schema,
        formats: list[str],
        key: str = "id",
    ):
        self.fs, self.root, self.name, self.formats, self.key = fs, root, name, formats, key
        self.rows = 0
        self.bytes = 0
        self._pq = self._tar = self._pq_file = self._tar_file = None
        if "parquet" in formats:
            self._pq_file = PendingFile(self._final("parquet"), fs)
            self._pq = pq.ParquetWriter(self._pq_file.stream, schema, compression="zstd")
        if "webdataset" in formats:
            self._tar_file = PendingFile(self._final("tar"), fs)
            # closed by commit() or abort(), calls apart: no with block fits
            self._tar = tarfile.open(  # noqa: SIM115
                fileobj=self._tar_file.stream, mode="w", format=tarfile.USTAR_FORMAT
            )

    def _final(self, ext: str) -> str:
        return f"{self.root}/shards/{self.name}.{ext}"

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

    def abort(self) -> None:
        """Close and delete this shard's temp files, best effort."""
        if self._pq_file is not None:
            self._pq_file.abort(self._pq)
        if self._tar_file is not None:
            self._tar_file.abort(self._tar)

    def commit(self) -> dict[str, Any]:
        """Finish both files, move them into place; return ``{"name", "rows", "parquet"?, "tar"?}`` (each file
        with its ``path`` relative to the folder, ``bytes`` and ``sha256``)."""
        entry: dict[str, Any] = {"name": self.name, "rows": self.rows}
        if self._pq is not None:
            self._pq.close()
        if self._tar is not None:
            self._tar.close()
        for ext, pending in (("parquet", self._pq_file), ("tar", self._tar_file)):
            if pending is not None:
                pending.commit()
                entry[ext] = {
                    "path": f"shards/{self.name}.{ext}",
                    "bytes": self.fs.get_file_info(pending.path).size,
                    "sha256": sha256_file(pending.path, self.fs),
                }
        return entry
