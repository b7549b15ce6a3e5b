"""Global steps stay correct when work is spread over many workers: the exact-dedup index built over id
ranges in parallel tasks, and the pool-wide keep_fraction cut, give the rows of one worker and one index.
(Mixture budgets: tests/integration/mix/test_builder.py::
test_same_recipe_and_seed_give_the_same_bytes_whatever_the_workers.)"""

from __future__ import annotations

import random
from pathlib import Path

import polars as pl
import pyarrow as pa

from curation.filters import registry
from curation.pipeline import run_pipeline
from curation.poolwide import id_ranges
from curation.recipe import load_pipeline

RECIPE = """
name: global
sources:
  - {{name: pairs, format: webdataset, modality: image_text, paths: ["{corpus}/image_text/wds/*.tar"]}}
  - {{name: pq_pairs, format: parquet, modality: image_text,
     paths: ["{corpus}/image_text/parquet/*.parquet"]}}
  - {{name: docs, format: jsonl, modality: text, paths: ["{corpus}/text/*.jsonl"]}}
stages:
  - image_decode: {{}}
  - exact_dedup: {{}}
  - caption_language: {{keep_fraction: 0.6}}
output: {{path: "{out}", shard_rows: 100}}
execution: {execution}
"""


def test_id_ranges_cover_every_id_exactly_once():
    rng = random.Random(0)
    ids = [f"{rng.getrandbits(128):032x}" for _ in range(3000)]
    ids += ["", "0", "00000000", "ffffffff", "ffffffffz", "g", "ZZ", "not-a-hex-id", "7fffffff", "80000000"]
    for parts in (1, 2, 3, 7, 64):
        ranges = id_ranges(parts)
        assert len(ranges) == parts and ranges[0][0] is None and ranges[-1][1] is None
        for i in ids:
            inside = [
                k for k, (lo, hi) in enumerate(ranges) if (lo is None or i >= lo) and (hi is None or i < hi)
            ]
            assert len(inside) == 1, (i, parts, inside)
    # hex digests spread evenly: no range of 7 holds more than twice its share of 3000 random ids
    ranges = id_ranges(7)
    sizes = [
        sum(1 for i in ids[:3000] if (lo is None or i >= lo) and (hi is None or i < hi)) for lo, hi in ranges
    ]
    assert sum(sizes) == 3000 and max(sizes) < 2 * 3000 / 7


def test_exact_dedup_index_merged_from_id_ranges_equals_the_whole_index():
    rng = random.Random(1)
    pool = [f"{rng.getrandbits(128):032x}" for _ in range(400)]
    ids = [rng.choice(pool) for _ in range(2000)]  # about 1,600 repeats
    rows = pa.table(
        {
            "id": ids,
            "unit": [rng.randrange(20) for _ in ids],
            "source_uri": [f"file{rng.randrange(5)}" for _ in ids],
            "source_offset": list(range(len(ids))),
        }
    )
    stage = registry()["exact_dedup"]()
    whole = stage.build_index(rows)

    def as_set(index):
        return set(zip(*(pa.array(index[k]).to_pylist() for k in ("id", "copies", "winner"))))

    for parts in (1, 3, 16):
        pieces = []
        for lo, hi in id_ranges(parts):
            keep = [(lo is None or i >= lo) and (hi is None or i < hi) for i in ids]
            pieces.append(stage.build_index(rows.filter(pa.array(keep))))
        merged = stage.merge_index(pieces)
        assert as_set(merged) == as_set(whole) and len(merged["id"]) == len(whole["id"]) > 300
    assert len(stage.merge_index([])["id"]) == 0


def _outcome(pool: Path) -> tuple[list, dict]:
    """(sorted lineage of kept rows, {reject reason: sorted lineage}): lineage, since copies share an id."""
    kept = pl.read_parquet(pool / "shards" / "*.parquet", columns=["source_uri", "source_offset"])
    rejects = pl.read_parquet(
        pool / "rejects" / "*.parquet", columns=["source_uri", "source_offset", "reject_reason"]
    )
    by_reason = {}
    for reason, group in rejects.group_by("reject_reason"):
        by_reason[reason[0]] = sorted(group.select("source_uri", "source_offset").iter_rows())
    return sorted(kept.iter_rows()), by_reason


def test_dedup_index_and_quantile_cut_are_the_same_over_many_workers_and_index_parts(ray_local, tmp_path):
    from curation.sample import write_sample_corpus

    corpus = tmp_path / "corpus"
    write_sample_corpus(
        corpus, rows=800, seed=9, shard_rows=40, progress=False
    )  # files of 40 rows: many units

    def run(name: str, execution: str) -> tuple[list, dict]:
        recipe = tmp_path / f"{name}.yaml"
        recipe.write_text(RECIPE.format(corpus=corpus, out=tmp_path / name, execution=execution))
        result = run_pipeline(load_pipeline(recipe), progress=False)
        return _outcome(tmp_path / name), result.stats["rows_in"]

    one, rows = run("one", "{num_workers: 1, index_partition_rows: 1000000}")
    # four concurrent tasks, and the dedup index built in id ranges of at most 40 rows: 15 or more parts
    many, rows_many = run("many", "{num_workers: 4, index_partition_rows: 40}")
    three, _ = run("three", "{num_workers: 3, index_partition_rows: 250}")  # duplicates fall in every range
    assert many == one == three and rows_many == rows > 600
    kept, rejects = one
    assert len(rejects["duplicate"]) > 5 and len(rejects["below_keep_fraction"]) > 50 and len(kept) > 100
    assert len(list((tmp_path / "many" / "_work" / "index").glob("*.parquet"))) > 12  # one per unit


def test_index_partition_rows_is_checked(tmp_path, sample_corpus):
    import pytest

    from curation.spec import RecipeError

    recipe = tmp_path / "bad.yaml"
    recipe.write_text(
        RECIPE.format(corpus=sample_corpus, out=tmp_path / "p", execution="{index_partition_rows: 0}")
    )
    with pytest.raises(
        RecipeError, match="execution.index_partition_rows: expected a positive integer between 1 and"
    ):
        load_pipeline(recipe)


def test_score_histograms_stream_over_the_pool_and_count_every_row(tmp_path):
    """stats.json's histograms read the pool a batch at a time: edges from a strided sample, counts of every
    row."""
    import numpy as np
    import pyarrow.parquet as pq

    from curation.stats import histograms

    stage = registry()["caption_length"]()
    col = stage.score_name
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(50, 10, 150_000), [10_000.0]])  # one outlier
    for sub in ("shards", "rejects"):
        (tmp_path / sub).mkdir()
    for i, chunk in enumerate(np.array_split(values, 7)):
        scores = pa.array(chunk).cast(pa.float64())
        if i == 3:  # nulls: rows the stage did not score
            scores = pa.array([None if j % 5 == 0 else v for j, v in enumerate(chunk.tolist())], pa.float64())
        pq.write_table(
            pa.table({col: scores}), tmp_path / ("rejects" if i == 6 else "shards") / f"{i:05d}.parquet"
        )
    seen = np.concatenate(
        [pq.read_table(f)[col].drop_null().to_numpy() for f in sorted(tmp_path.rglob("*.parquet"))]
    )
    h = histograms([stage], str(tmp_path), bins=20, sample=1000)[stage.label][col]
    assert sum(h["counts"]) == len(seen) and h["max"] == 10_000.0 and h["min"] == seen.min()
    lo, hi = h["edges"][0], h["edges"][-1]
    assert (
        20 < lo < 30 and 70 < hi < 80
    )  # near the 0.5% and 99.5% quantiles of the bulk, not stretched to 10,000
    assert h["outside_range"] == int(((seen < lo) | (seen > hi)).sum()) > 0
    assert h["counts"] == np.histogram(np.clip(seen, lo, hi), bins=20, range=(lo, hi))[0].tolist()
    assert histograms([stage], str(tmp_path), bins=20, sample=1000) == histograms(
        [stage], str(tmp_path), bins=20, sample=1000
    )
