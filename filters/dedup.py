"""Exact deduplication by content hash (the row ``id``), across the whole corpus.

Index then query: the runner collects ``(id, unit, source_uri, source_offset)`` of every row in a
parallel pre-pass, :meth:`ExactDedup.build_index` keeps, for each id seen more than once, the copy
that comes first in input order (unit, then offset), and every worker rejects the other copies.
The winner depends only on input order, never on which worker saw what first, so a laptop and a
cluster keep the same rows.
"""

from __future__ import annotations

from typing import Any, ClassVar

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from curation.stage import IndexedFilter, reason_where, register


@register
class ExactDedup(IndexedFilter):
    """Keep the first copy of rows with identical content (modality, text and media bytes).

    Score: how many copies of this row's content exist in the corpus (1 = unique).
    """

    name: ClassVar[str] = "exact_dedup"
    reads: ClassVar[tuple[str, ...]] = ("id",)

    def build_index(self, rows: pa.Table) -> dict[str, Any]:
        df = pl.from_arrow(rows.select(["id", "unit", "source_uri", "source_offset"]))
        dups = (
            df.sort(["unit", "source_offset"])
            .group_by("id", maintain_order=True)
            .agg(pl.len().alias("copies"), pl.col("source_uri").first(), pl.col("source_offset").first())
            .filter(pl.col("copies") > 1)
            .select("id", pl.col("copies").cast(pl.Float64),
                    pl.concat_str([pl.col("source_uri"), pl.lit("#"), pl.col("source_offset").cast(pl.Utf8)]).alias("winner"))
        )
        return {name: dups[name].to_arrow() for name in ("id", "copies", "winner")}

    def use_index(self, index: dict[str, Any]) -> None:
        self._ids = pa.array(index["id"]).cast(pa.string())
        self._copies = pa.array(index["copies"]).cast(pa.float64())
        self._winner = pa.array(index["winner"]).cast(pa.string())

    def score(self, batch):
        pos = pc.index_in(batch["id"], value_set=self._ids)
        self._pos = pos
        return {self.score_name: pc.fill_null(pc.take(self._copies, pos), 1.0)}

    def decide(self, batch, scores):
        here = pc.binary_join_element_wise(batch["source_uri"], pa.scalar("#"),
                                           batch["source_offset"].cast(pa.string()), "")
        winner = pc.take(self._winner, self._pos)
        loser = pc.and_(pc.is_valid(winner), pc.not_equal(winner, here))
        detail = pc.binary_join_element_wise(pa.scalar("duplicate of "), winner, "")
        return reason_where(loser, "duplicate"), detail
