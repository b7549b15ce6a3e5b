"""`curation audit` end to end against a plain single-process loop over the same corpus and benchmark.

Both read every row of every source and run the same decontaminate stage (same index, same code): the
audit as a Ray Data job (local Ray, all cores), the baseline as a `for` loop over units in this process.
Reports rows/s, the ratio, and recall / false positives of the audit against the corpus's truth.parquet.

    python benchmarks/bench_audit.py --rows 50000 --out bench-out/audit
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import polars as pl

ROOT = Path(__file__).resolve().parent.parent
REGISTRY = str(ROOT / "pipelines" / "benchmarks.yaml")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=50_000)
    ap.add_argument("--seed", type=int, default=2)
    ap.add_argument("--out", default="bench-out/audit")
    args = ap.parse_args()

    from curation.audit import run_audit
    from curation.filters import registry
    from curation.io.detect import detect_sources
    from curation.io.readers import plan_units, read_unit
    from curation.sample import write_sample_corpus

    out = Path(args.out)
    corpus = out / f"corpus-{args.rows}-{args.seed}"
    if not (corpus / "corpus.json").exists():
        write_sample_corpus(corpus, rows=args.rows, seed=args.seed)
    paths = [str(corpus / d) for d in ("image_text", "interleaved", "text", "video")]
    overrides = [f"vars.corpus={corpus}"]

    t0 = time.perf_counter()
    result = run_audit(
        REGISTRY, paths, str(out / "audit"), registry_set=overrides, overwrite=True, progress=False
    )
    audit_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    stage = registry()["decontaminate"](benchmarks=REGISTRY, registry_set=overrides)
    stage.setup()
    stage.use_index(stage.build_index(None))
    rows = loop_hits = 0
    for unit in plan_units(detect_sources(paths)):
        for batch in read_unit(unit):
            rows += batch.num_rows
            loop_hits += stage(batch)["reject_stage"].to_pylist().count("decontaminate")
    loop_s = time.perf_counter() - t0

    truth = pl.read_parquet(corpus / "truth.parquet")
    found = {
        (m["source_uri"], m["source_offset"])
        for b in result.data["benchmarks"].values()
        for m in b["matches"]
    }
    hit = [(f"{corpus.resolve()}/{f}", o) in found for f, o in zip(truth["file"], truth["offset"])]
    truth = truth.with_columns(pl.Series("hit", hit))
    plants = truth.filter(pl.col("dirt") == "benchmark_copy")
    others = truth.filter(pl.col("dirt") != "benchmark_copy")
    report = {
        "rows": rows,
        "audit_s": round(audit_s, 2),
        "loop_s": round(loop_s, 2),
        "audit_rows_per_s": round(rows / audit_s),
        "loop_rows_per_s": round(rows / loop_s),
        "speedup": round(loop_s / audit_s, 2),
        "contaminated_rows": {"audit": result.data["rows_contaminated"], "loop": loop_hits},
        "recall": round(plants["hit"].mean(), 4),
        "plants": plants.height,
        "false_positives": int(others["hit"].sum()),
        "other_rows": others.height,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
