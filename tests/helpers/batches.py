"""One stage call on a few inline rows: the batch, the registered stage, and the reasons it gave."""

from __future__ import annotations

import pyarrow as pa

from curation.filters import registry
from curation.schema import from_rows


def batch(*rows, modality="image_text") -> pa.Table:
    """``rows`` as a table of the row schema, with ids and source positions 0, 1, ..."""
    return from_rows(
        [
            {"id": str(i), "modality": modality, "source_uri": "mem", "source_offset": i, **r}
            for i, r in enumerate(rows)
        ]
    )


def stage(name, **params):
    """The registered stage ``name`` with ``params``, set up."""
    s = registry()[name](**params)
    s.setup()
    return s


def reasons(table: pa.Table) -> list[str | None]:
    return table["reject_reason"].to_pylist()
