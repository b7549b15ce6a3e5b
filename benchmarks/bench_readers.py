"""What bounding the readers costs (issue 17): the JSONL line reader on one huge line and on ordinary lines,
and the JSONL and Parquet readers end to end. Run it under this tree, then under a baseline to compare:

    python benchmarks/bench_readers.py --out bench-out/readers
    git archive HEAD curation | tar -x -C /tmp/base &&
        PYTHONPATH=/tmp/base python benchmarks/bench_readers.py --out bench-out/readers

Inputs are made once under ``--out`` (about 3 x ``--mb`` MB): one JSONL line of ``--mb`` MB, ``--mb`` MB of
1-2 KB JSONL lines, and a Parquet file of the same lines (pyarrow's defaults: zstd off, one large row group).
Each timing is the best of ``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def make_inputs(out: Path, mb: int) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "long": out / f"long-{mb}.jsonl",
        "lines": out / f"lines-{mb}.jsonl",
        "parquet": out / f"lines-{mb}.parquet",
    }
    if not paths["long"].exists():
        paths["long"].write_text(json.dumps({"text": "x" * (mb << 20)}) + "\n")
    if not paths["lines"].exists():
        rng, texts, size = random.Random(0), [], 0
        words = ["data", "image", "caption", "model", "token", "river", "city", "light", "green", "table"]
        while size < mb << 20:
            text = " ".join(rng.choice(words) for _ in range(rng.randint(170, 340)))
            texts.append(text)
            size += len(text) + 12
        paths["lines"].write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        pq.write_table(pa.table({"text": texts}), paths["parquet"])
    return paths


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default="bench-out/readers")
    ap.add_argument(
        "--skip-long", action="store_true", help="leave out the one long line (the old reader takes minutes)"
    )
    args = ap.parse_args()

    from curation.io import fs as cfs
    from curation.io.readers import plan_units, read_unit
    from curation.recipe import SourceSpec

    paths = make_inputs(Path(args.out), args.mb)

    def lines(path: Path) -> None:
        with cfs.open_input(str(path)) as stream:
            for _ in cfs.iter_lines(stream):
                pass

    def rows(fmt: str, path: Path) -> None:
        for unit in plan_units([SourceSpec(name="b", format=fmt, modality="text", paths=[str(path)])]):
            for _ in read_unit(unit):
                pass

    result = {} if args.skip_long else {"iter_lines_one_line_s": best(lambda: lines(paths["long"]), 1)}
    result |= {
        "iter_lines_short_lines_s": best(lambda: lines(paths["lines"]), args.repeat),
        "read_jsonl_s": best(lambda: rows("jsonl", paths["lines"]), args.repeat),
        "read_parquet_s": best(lambda: rows("parquet", paths["parquet"]), args.repeat),
        "mb": args.mb,
    }
    print(json.dumps({k: round(v, 3) for k, v in result.items()}, indent=1))


if __name__ == "__main__":
    main()
