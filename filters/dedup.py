"""Exact deduplication by content hash (the row ``id``), and near-duplicate videos, across the whole corpus.

Index then query: the runner collects ``(id, unit, source_uri, source_offset)`` of every row in a
parallel pre-pass, :meth:`ExactDedup.build_index` keeps, for each id seen more than once, the copy
that comes first in input order (unit, then offset), and every worker rejects the other copies.
Copies share their id, so the index is built over id ranges in parallel tasks (``splits_by_id``) and
no process holds the whole corpus's ids; the merged index holds the duplicated ids only.
The winner depends only on input order, never on which worker saw what first, so a laptop and a
cluster keep the same rows.
"""

from __future__ import annotations

from typing import Any, ClassVar

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from curation.bounds import bounded
from curation.stage import GlobalFilter, IndexedFilter, reason_where, register


@register
class ExactDedup(IndexedFilter):
    """Keep the first copy of rows with identical content (modality, text and media bytes).

    Score: how many copies of this row's content exist in the corpus (1 = unique).
    """

    name: ClassVar[str] = "exact_dedup"
    reads: ClassVar[tuple[str, ...]] = ("id", "source_uri", "source_offset")
    splits_by_id: ClassVar[bool] = True  # copies share their id: each id range is deduplicated on its own

    def build_index(self, rows: pa.Table) -> dict[str, Any]:
        df = pl.from_arrow(rows.select(["id", "unit", "source_uri", "source_offset"]))
        dups = (
            df.sort(["unit", "source_offset"])
            .group_by("id", maintain_order=True)
            .agg(pl.len().alias("copies"), pl.col("source_uri").first(), pl.col("source_offset").first())
            .filter(pl.col("copies") > 1)
            .select(
                "id",
                pl.col("copies").cast(pl.Float64),
                pl.concat_str(
                    [pl.col("source_uri"), pl.lit("#"), pl.col("source_offset").cast(pl.Utf8)]
                ).alias("winner"),
            )
        )
        return {name: dups[name].to_arrow() for name in ("id", "copies", "winner")}

    def merge_index(self, parts: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            name: pa.concat_arrays([pa.array([], typ)] + [pa.array(p[name]).cast(typ) for p in parts])
            for name, typ in (("id", pa.string()), ("copies", pa.float64()), ("winner", pa.string()))
        }

    def use_index(self, index: dict[str, Any]) -> None:
        self._ids = pa.array(index["id"]).cast(pa.string())
        self._copies = pa.array(index["copies"]).cast(pa.float64())
        self._winner = pa.array(index["winner"]).cast(pa.string())

    def score(self, batch):
        pos = pc.index_in(batch["id"], value_set=self._ids)
        return {self.score_name: pc.fill_null(pc.take(self._copies, pos), 1.0)}

    def decide(self, batch, scores):
        """A row is a copy unless it is its content's first occurrence (the index's winner)."""
        here = pc.binary_join_element_wise(
            batch["source_uri"], pa.scalar("#"), batch["source_offset"].cast(pa.string()), ""
        )
        winner = pc.take(self._winner, pc.index_in(batch["id"], value_set=self._ids))
        loser = pc.and_(pc.is_valid(winner), pc.not_equal(winner, here))
        detail = pc.binary_join_element_wise(pa.scalar("duplicate of "), winner, "")
        return reason_where(loser, "duplicate"), detail


@register
class VideoNearDedup(GlobalFilter):
    """Keep one copy of videos that show the same footage: re-uploads, re-encodes (another codec, size or frame
    rate), and copies trimmed at either end or cut from a longer video.

    In the unit pass every video row's sampled frames get a 64-bit pHash and dHash (``<label>_phash``,
    ``<label>_dhash``, one per frame of ``frames``, null for a frame that does not decode; kept in the pool
    for later dedup and decontamination). Then, over the whole pool, pairs of videos whose frames match at one
    time offset are found (:func:`curation.dedup.video.near_duplicate_pairs`: band candidates, then the
    temporal check), linked into clusters, and one video per cluster stays: ``keep: longest`` (default; then
    the larger frame size, then input order), ``largest`` (frame size first) or ``first`` (input order). The
    others are rejected ``near_duplicate``, naming the one kept and the match that linked them.

    Score: the number of frames hashed (a row with fewer than 2 is never matched: one frame is an image).
    Defaults measured with ``benchmarks/bench_video_dedup.py`` on the sample corpus's synthetic videos
    (fast-moving drawings: the hard case for 1-fps frames): see BENCHMARKS.md.
    """  # noqa: E501 - the first line is the summary `curation stages` prints: kept as it was

    name: ClassVar[str] = "video_near_dedup"
    reads: ClassVar[tuple[str, ...]] = ("frames", "frame_ts")
    default_modalities: ClassVar[tuple[str, ...]] = ("video",)

    radius: int = bounded(14, 0, 64)  # pHash bits that may differ for two frames to match
    dhash_radius: int = bounded(18, 0, 64)  # ... and dHash bits
    min_matches: int = bounded(2, 1, 10_000)  # frames matching at one time offset
    min_score: float = bounded(0.5, 0, 1)  # ... as a share of the frames that could overlap
    offset_tolerance: float = bounded(0.5, 0.01, 3600)  # seconds: width of an offset bin
    keep: str = "longest"  # longest, largest or first
    # a pHash band shared by more videos than this proposes no pairs (flat frames)
    max_bucket: int = bounded(256, 1, 1_000_000_000)
    band_bits: int | None = None  # 16 or 32; default: 16 up to 250,000 frames in the pool, then 32

    def __post_init__(self):
        if self.keep not in KEEP_RULES:
            raise ValueError(f"keep: expected one of {', '.join(KEEP_RULES)}, got {self.keep!r}")
        if not (0 <= self.radius <= 64 and 0 <= self.dhash_radius <= 64):
            raise ValueError("radius and dhash_radius: expected a number of bits, 0 to 64")
        if not (0 < self.min_score <= 1) or self.min_matches < 1 or self.offset_tolerance <= 0:
            raise ValueError("min_score: expected a share in (0, 1]; min_matches >= 1; offset_tolerance > 0")

    @property
    def hash_names(self) -> tuple[str, str]:
        return f"{self.label}_phash", f"{self.label}_dhash"

    @property
    def global_columns(self) -> tuple[str, ...]:
        return ("frame_ts", "clip_start", "clip_end", "meta", *self.hash_names)

    def output_fields(self) -> list[pa.Field]:
        return [
            pa.field(self.score_name, pa.float64()),
            *(pa.field(n, pa.list_(pa.uint64())) for n in self.hash_names),
        ]

    def score(self, batch):
        from curation.dedup.image import hash_batch

        frames = [f or [] for f in batch["frames"].to_pylist()]
        ph, dh, ok = hash_batch([x for f in frames for x in f])  # one DCT for the whole batch
        ph_out, dh_out, counts, at = [], [], [], 0
        for f in frames:
            span = slice(at, at + len(f))
            at += len(f)
            ph_out.append([int(p) if v else None for p, v in zip(ph[span], ok[span])])
            dh_out.append([int(d) if v else None for d, v in zip(dh[span], ok[span])])
            counts.append(float(ok[span].sum()))
        return {
            self.score_name: pa.array(counts, pa.float64()),
            self.hash_names[0]: pa.array(ph_out, pa.list_(pa.uint64())),
            self.hash_names[1]: pa.array(dh_out, pa.list_(pa.uint64())),
        }

    def decide_global(self, rows):
        import json

        import numpy as np

        from curation.dedup.video import clusters, near_duplicate_pairs
        from curation.io.pool import lineage_keys

        keys = lineage_keys(rows)
        ts_all, ph_all, dh_all = (rows[c].to_pylist() for c in ("frame_ts", *self.hash_names))
        phs, dhs, tss = [], [], []
        for ts, ph, dh in zip(ts_all, ph_all, dh_all):
            ok = [i for i, (p, t) in enumerate(zip(ph or [], ts or [])) if p is not None and t is not None]
            phs.append(np.array([ph[i] for i in ok], np.uint64))
            dhs.append(np.array([dh[i] for i in ok], np.uint64))
            tss.append(np.array([ts[i] for i in ok], np.float64))
        pairs, facts = near_duplicate_pairs(
            phs,
            dhs,
            tss,
            radius=self.radius,
            dhash_radius=self.dhash_radius,
            offset_tolerance=self.offset_tolerance,
            min_matches=self.min_matches,
            min_score=self.min_score,
            max_bucket=self.max_bucket,
            band_bits=self.band_bits,
        )
        root = clusters(len(keys), ((a, b) for a, b, _, _ in pairs))
        # what each video is worth keeping: longer, then larger, then earlier in input order
        starts, ends, metas = (rows[c].to_pylist() for c in ("clip_start", "clip_end", "meta"))
        length, pixels = [], []
        for s, e, m, ts in zip(starts, ends, metas, tss):
            meta = json.loads(m) if m else {}
            length.append(
                e - s
                if s is not None and e is not None
                else meta.get("duration") or (float(ts[-1] - ts[0]) if len(ts) > 1 else 0.0)
            )
            pixels.append((meta.get("video_width") or 0) * (meta.get("video_height") or 0))
        order = sorted(range(len(keys)), key=lambda i: keys[i])
        position = {i: p for p, i in enumerate(order)}
        rank = {
            "longest": lambda i: (-length[i], -pixels[i], position[i]),
            "largest": lambda i: (-pixels[i], -length[i], position[i]),
            "first": lambda i: (position[i],),
        }[self.keep]
        members: dict[int, list[int]] = {}
        for i, r in enumerate(root):
            members.setdefault(int(r), []).append(i)
        link: dict[int, tuple[int, float, float]] = {}  # a member -> (partner, score, offset): why it is in
        for a, b, score, offset in pairs:
            for x, y, off in ((a, b, offset), (b, a, -offset)):
                if x not in link or score > link[x][1]:
                    link[x] = (y, score, off)
        rejected: dict[str, tuple[str, str]] = {}
        sizes = []
        for group in members.values():
            if len(group) < 2:
                continue
            sizes.append(len(group))
            winner = min(group, key=rank)
            for i in group:
                if i != winner:
                    partner, score, off = link[i]
                    rejected[keys[i]] = (
                        "near_duplicate",
                        (
                            f"near duplicate of {keys[winner]} "
                            f"(kept: {self.keep}; a cluster of {len(group)} videos): "
                            f"{score:.0%} of its frames match {keys[partner]} at {off:+.2f} s"
                        ),
                    )
        facts.update(verified_pairs=len(pairs), clusters=len(sizes), largest_cluster=max(sizes, default=0))
        return rejected, facts


KEEP_RULES = ("longest", "largest", "first")
