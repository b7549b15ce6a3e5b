"""Pool folders: sharded Parquet + WebDataset with a manifest, stats and rejects.

See ``docs/pool-format.md`` for the layout. Writes are idempotent and exactly-once per unit:

1. a worker writes every part of a unit (``shards/UUUUU_PPPP.{parquet,tar}``, ``rejects/UUUUU.parquet``)
   under temporary names and renames each into place when complete (:mod:`curation.io.commit`);
2. then it writes ``_work/done/UUUUU.json`` (rows, bytes, sha256 of each part, stage counters), again
   committed whole (:meth:`curation.io.outputs.OutputFolder.commit_done`). That record is the commit.

A rerun skips units that have a done record (their shards are not rewritten) and redoes the others
from scratch; since units, ids and bytes are deterministic, a redone unit overwrites its half-written
parts with identical ones, so no row is lost or duplicated whatever moment the crash came.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from curation.io import commit, outputs
from curation.io import fs as cfs
from curation.schema import REJECT_COLUMNS

log = logging.getLogger(__name__)

FORMAT = "curation.pool/1"
#: What a pool's video rows carry (``output.video``): the sampled frames, the clip's bytes, or both.
VIDEO_PAYLOADS = ("frames", "clip", "both")


# Reject reasons whose row's media bytes are not a decodable image or video of the corpus (or were never
# read).
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
    """``table`` with what ``output.video`` leaves out of video rows nulled: ``video_bytes`` for ``frames``;
    for ``clip``, the ``frames`` of rows that have their clip (``frame_ts`` stays: when the frames were
    sampled)."""
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


# ---------------------------------------------------------------- worker side


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
        self._part: commit.ShardWriter | None = None
        self._rejects: pq.ParquetWriter | None = None
        self._rejects_file: commit.PendingFile | None = None
        self._rejects_rows = 0

    def write(self, table: pa.Table) -> None:
        if not self.formats:  # formats: [] keeps no shards (an audit only wants the rejects)
            return
        table = video_payload(table, self.video)
        start = 0
        while start < table.num_rows:
            if self._part is None:
                self._part = commit.ShardWriter(
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
            self._rejects_file = commit.PendingFile(f"{self.path}/rejects/{self.unit:05d}.parquet", self.fs)
            self._rejects = pq.ParquetWriter(
                self._rejects_file.stream, self.reject_schema, compression="zstd"
            )
        self._rejects.write_table(table)
        self._rejects_rows += table.num_rows

    def abort(self) -> None:
        """After a failure (a full disk): close and delete this unit's temp files, best effort. Committed
        parts stay; the unit has no done record, so a rerun redoes it whole and overwrites them
        identically."""
        if self._part is not None:
            self._part.abort()
        if self._rejects_file is not None:
            self._rejects_file.abort(self._rejects)

    def close(self) -> dict[str, Any]:
        """Commit the last part and the rejects; return this unit's manifest entries."""
        if self._part is not None and self._part.rows:
            self.parts.append(self._part.commit())
        self._part = None
        rejects = None
        if self._rejects is not None:
            self._rejects.close()
            self._rejects_file.commit()
            final = self._rejects_file.path
            rejects = {
                "path": f"rejects/{self.unit:05d}.parquet",
                "rows": self._rejects_rows,
                "bytes": self.fs.get_file_info(final).size,
                "sha256": commit.sha256_file(final, self.fs),
            }
        return {"shards": self.parts, "rejects": rejects, "rejected": self._rejects_rows}


# ---------------------------------------------------------------- driver side


class Pool(outputs.OutputFolder):
    """A pool folder on the driver: its life as an output (:class:`curation.io.outputs.OutputFolder`: resume
    state, done records, temp sweep), and the final manifest."""

    def __init__(self, root: str, recipe_hash: str):
        super().__init__(root, "pool")
        self.recipe_hash = recipe_hash

    def prepare(self, resolved: dict[str, Any], *, overwrite: bool = False) -> None:
        """:meth:`curation.io.outputs.OutputFolder.prepare` with the record of this recipe
        (``_work/recipe.json``: its hash and ``resolved``): a rerun of the same recipe resumes the pool,
        another is refused."""
        super().prepare({"recipe_hash": self.recipe_hash, "recipe": resolved}, overwrite=overwrite, indent=2)

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
        commit.write_bytes(
            f"{self.path}/{name}",
            json.dumps(obj, indent=2, ensure_ascii=False, default=str).encode(),
            self.fs,
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
    """A ``keep_fraction`` cut: rows scoring below ``threshold`` in ``column`` go (or at it, unless their
    lineage key is in ``tied_kept``); rows without a score stay."""

    stage: str
    column: str
    threshold: float
    tied_kept: tuple[str, ...]
    detail: str  # why, for every row it rejects; the row's own score is appended
    reason: str = "below_keep_fraction"

    def select(self, table: pa.Table) -> tuple[pa.Array, list[str], list[str]]:
        """The rows of ``table`` this cut rejects (a boolean mask), with a reason and a detail for each of
        them."""
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
        commit.write_bytes(done, json.dumps(record, sort_keys=True).encode(), fs)
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
        commit.write_bytes(f"{path}/{rel}", buf.getvalue().to_pybytes(), fs)
        record["rejects"] = {
            "path": rel,
            "rows": out.num_rows,
            "bytes": fs.get_file_info(f"{path}/{rel}").size,
            "sha256": commit.sha256_file(f"{path}/{rel}", fs),
        }
    part = commit.ShardWriter(fs, path, f"{entry['name']}-{stage}", schema, formats)
    part.write(video_payload(kept, video))
    record["shard"] = dict(
        part.commit(), **{k: v for k, v in entry.items() if k not in ("name", "rows", "parquet", "tar")}
    )
    return record


def scan_columns(
    fs: pafs.FileSystem,
    files: list[str],
    columns: list[str],
    schema: pa.Schema | None = None,
    batch_rows: int = 1 << 16,
) -> Iterator[pa.RecordBatch]:
    """Batches of ``columns`` from each Parquet file in turn; a column a file lacks (an older pool, an earlier
    cut's rejects) is null, typed by ``schema``. One file's footer is held at a time: a pyarrow dataset over
    the whole pool keeps every file's, about 150 KB each, so 500 MB for a pool of a million rows."""
    for name in files:
        with fs.open_input_file(name) as f:
            pf = pq.ParquetFile(f)
            have = set(pf.schema_arrow.names)
            for b in pf.iter_batches(columns=[c for c in columns if c in have], batch_size=batch_rows):
                if any(c not in have for c in columns):
                    b = pa.RecordBatch.from_arrays(
                        [
                            b.column(c)
                            if c in have
                            else pa.nulls(b.num_rows, schema.field(c).type if schema else None)
                            for c in columns
                        ],
                        names=columns,
                    )
                yield b
