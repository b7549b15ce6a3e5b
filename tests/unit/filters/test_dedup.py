"""Exact dedup (filters/dedup.py) against an index built from id, unit and source position."""

from __future__ import annotations

import pyarrow as pa

from curation.schema import from_rows
from tests.helpers.batches import reasons, stage


def test_exact_dedup_keeps_the_first_copy_in_input_order():
    s = stage("exact_dedup")
    index_rows = pa.table(
        {
            "id": ["a", "b", "a", "c", "a"],
            "unit": [1, 0, 0, 2, 1],
            "source_uri": ["u1", "u0", "u0", "u2", "u1"],
            "source_offset": [5, 0, 9, 0, 2],
        }
    )
    s.use_index(s.build_index(index_rows))
    b = from_rows(
        [
            {"id": i, "modality": "text", "source_uri": u, "source_offset": o}
            for i, u, o in [("a", "u1", 5), ("b", "u0", 0), ("a", "u0", 9), ("a", "u1", 2)]
        ]
    )
    out = s(b)
    assert reasons(out) == ["duplicate", None, None, "duplicate"]
    assert out["reject_detail"].to_pylist()[0] == "duplicate of u0#9"
    assert out["score_exact_dedup"].to_pylist() == [3.0, 1.0, 3.0, 3.0]
