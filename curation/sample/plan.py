"""The corpus plan: which sources there are, how rows split over them and their shards, which row gets
which dirt, and which earlier row a duplicate copies.

Every decision is a pure function of a :class:`CorpusSpec` and a row's coordinates (source, shard,
row), drawn from its own seeded stream (:mod:`curation.sample.seeding`). Plans are cheap, so a shard
that needs another shard's plan (a duplicate picking its original) recomputes it instead of reading
that shard's output: shards can be written in any order by any number of processes.

    >>> spec = CorpusSpec.make(rows=1000, seed=0, shard_rows=1000)
    >>> shard_plan(spec, "wds", 0)[:5]
    ('clean', 'clean', 'clean', 'clean', 'non_english_caption')
"""

from __future__ import annotations

import bisect
import functools
import itertools
import logging
import random
from dataclasses import dataclass

from curation.sample.seeding import _rng

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# Corpus layout and dirt rates
# --------------------------------------------------------------------------------------------

SOURCES = ("wds", "parquet", "jsonl", "interleaved", "text", "video")
IMAGE_TEXT_SOURCES = ("wds", "parquet", "jsonl")
SOURCE_SHARE = {"wds": 0.59, "parquet": 0.15, "jsonl": 0.10, "interleaved": 0.08, "text": 0.05, "video": 0.03}
MAX_VIDEOS = 2000  # videos cost ~45 ms each to encode: past this, wds takes the rest of the rows
BENCH_VIDEOS = (10, 100)  # benchmark videos: bench_items // 5, within these bounds
SOURCE_DIR = {
    "wds": "image_text/wds",
    "parquet": "image_text/parquet",
    "jsonl": "image_text/jsonl",
    "interleaved": "interleaved",
    "text": "text",
    "video": "video",
}
SOURCE_EXT = {
    "wds": ".tar",
    "parquet": ".parquet",
    "jsonl": ".jsonl",
    "interleaved": ".jsonl",
    "text": ".jsonl",
    "video": ".jsonl",
}
SOURCE_URL = {
    "wds": "https://example.com/img/{key}.jpg",
    "parquet": "https://example.org/photos/{key}.jpg",
    "jsonl": "https://example.net/media/{key}.jpg",
    "interleaved": "https://example.com/blog/{key}.html",
    "text": "https://example.com/articles/{key}.html",
    "video": "https://example.com/clips/{key}.mp4",
}
KEY_STRIDE = 10_000  # img2dataset keys: shard * 10000 + row, so a shard holds at most 10000 rows
MIN_ROWS_ALL_KINDS = 100  # from this size on, every dirt kind is guaranteed to occur

_COMMON_IMAGE_TEXT_RATES = {
    "mismatched_caption": 0.05,
    "tiny": 0.02,
    "huge": 0.005,
    "extreme_aspect": 0.02,
    "exact_duplicate": 0.03,
    "near_duplicate": 0.02,
    "corrupt_image": 0.01,
    "truncated_image": 0.01,
    "empty_caption": 0.02,
    "boilerplate_caption": 0.02,
    "repeated_phrase": 0.02,
    "non_english_caption": 0.03,
    "benchmark_copy": 0.01,
}
_NON_UTF8 = {"non_utf8_caption": 0.01}  # Parquet strings are UTF-8 by definition: not there
_JSONL_ONLY = {"malformed_json": 0.01, "missing_image": 0.01}
_TEXT_RATES = {
    "exact_duplicate": 0.03,
    "near_duplicate": 0.03,
    "non_english_caption": 0.03,  # kind names are shared with image-text; `source` tells them apart
    "boilerplate_caption": 0.03,
    "benchmark_copy": 0.01,  # a text QA item embedded in the document (re-cased, re-wrapped, edited)
}
BENCHMARK_RATE = 0.01  # default share of rows planted with a benchmark copy, per source (--benchmark-rate)
RATES: dict[str, dict[str, float]] = {
    "wds": {**_COMMON_IMAGE_TEXT_RATES, **_NON_UTF8},
    "parquet": dict(_COMMON_IMAGE_TEXT_RATES),
    "jsonl": {**_COMMON_IMAGE_TEXT_RATES, **_NON_UTF8, **_JSONL_ONLY},
    "interleaved": {"benchmark_copy": 0.01},  # a quiz post: a VQA image (transformed) next to its question
    "text": dict(_TEXT_RATES),
    # a benchmark video re-encoded (codec, size, rate) and trimmed at both ends; a download cut short; a
    # held still picture; black; bytes that are no video; an empty file; audio only. Not dirt: several
    # shots joined by hard cuts, and text burned into the picture.
    "video": {
        "benchmark_copy": 0.01,
        "truncated_video": 0.03,
        "static_video": 0.04,
        "black_video": 0.03,
        "corrupt_video": 0.02,
        "empty_video": 0.01,
        "audio_only": 0.02,
        "multi_shot": 0.15,
        "burned_text": 0.08,
    },
}
# Kinds placed deliberately (once each) in the first rows of a source so that small corpora
# still contain every kind. The decompression bomb is *only* placed this way: exactly one.
FORCED: dict[str, tuple[str, ...]] = {
    "wds": (*_COMMON_IMAGE_TEXT_RATES, *_NON_UTF8, "decompression_bomb"),
    "jsonl": tuple(_JSONL_ONLY),
    "text": tuple(_TEXT_RATES),
    "interleaved": ("benchmark_copy",),
    "video": (
        "benchmark_copy",
        "truncated_video",
        "static_video",
        "black_video",
        "corrupt_video",
        "empty_video",
        "audio_only",
        "multi_shot",
        "burned_text",
    ),
}
DIRT_KINDS = (
    "clean",
    *_COMMON_IMAGE_TEXT_RATES,
    "non_utf8_caption",
    "decompression_bomb",
    "malformed_json",
    "missing_image",
)
VIDEO_DIRT_KINDS = (
    "truncated_video",
    "static_video",
    "black_video",
    "corrupt_video",
    "empty_video",
    "audio_only",
    "multi_shot",
    "burned_text",
)
ALL_DIRT_KINDS = DIRT_KINDS + VIDEO_DIRT_KINDS


# --------------------------------------------------------------------------------------------
# Plans: which row gets which dirt
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CorpusSpec:
    """Everything a worker needs to produce any shard (small, hashable, picklable)."""

    seed: int
    rows: int
    shard_rows: int
    source_rows: tuple[tuple[str, int], ...]
    bench_items: int
    bench_rate: float = BENCHMARK_RATE

    @classmethod
    def make(cls, rows: int, seed: int, shard_rows: int, bench_rate: float = BENCHMARK_RATE) -> CorpusSpec:
        others = {s: round(rows * SOURCE_SHARE[s]) for s in SOURCES if s != "wds"}
        others["video"] = min(others["video"], MAX_VIDEOS)
        if rows >= MIN_ROWS_ALL_KINDS:  # room for every guaranteed kind, plus a clean first row
            others = {s: max(n, len(FORCED.get(s, ())) + 1) for s, n in others.items()}
        counts = {"wds": rows - sum(others.values()), **others}
        bench = max(20, min(500, rows // 100))
        return cls(seed, rows, shard_rows, tuple((s, counts[s]) for s in SOURCES), bench, bench_rate)

    @property
    def bench_videos(self) -> int:
        return max(BENCH_VIDEOS[0], min(BENCH_VIDEOS[1], self.bench_items // 5))

    def rates(self, source: str) -> dict[str, float]:
        """Dirt rates of a source, with this corpus's benchmark-copy rate."""
        rates = dict(RATES[source])
        if "benchmark_copy" in rates:
            rates["benchmark_copy"] = self.bench_rate
        return rates

    def n(self, source: str) -> int:
        return dict(self.source_rows)[source]

    def n_shards(self, source: str) -> int:
        return -(-self.n(source) // self.shard_rows)

    def shard_len(self, source: str, shard: int) -> int:
        return min(self.shard_rows, self.n(source) - shard * self.shard_rows)

    def path(self, source: str, shard: int) -> str:
        return f"{SOURCE_DIR[source]}/{shard:05d}{SOURCE_EXT[source]}"

    @staticmethod
    def key(shard: int, i: int) -> str:
        return f"{shard * KEY_STRIDE + i:09d}"


@functools.lru_cache(maxsize=16)
def _forced_kinds(spec: CorpusSpec, source: str) -> dict[int, str]:
    """Source-global row index -> kind, for kinds that must occur at least once.

    Placed in the first rows of the source, never on a shard's first row (that row stays clean
    so every duplicate has an earlier clean original in its own shard).
    """
    kinds = FORCED.get(source, ()) if spec.rows >= MIN_ROWS_ALL_KINDS else ()
    if not kinds:
        return {}
    window = min(spec.n(source), max(spec.shard_rows, 4 * len(kinds)))
    eligible = [g for g in range(window) if g % spec.shard_rows]
    if len(eligible) < len(kinds):
        logger.warning("%s: room for %d of %d guaranteed dirt kinds", source, len(eligible), len(kinds))
    rng = _rng(spec.seed, source, "forced")
    positions = rng.sample(eligible, min(len(eligible), len(kinds)))
    return dict(zip(positions, kinds))


@functools.lru_cache(maxsize=64)
def shard_plan(spec: CorpusSpec, source: str, shard: int) -> tuple[str, ...]:
    """The dirt kind of every row of one shard; cheap, so other shards can recompute it."""
    rates = spec.rates(source)
    kinds = list(rates)
    cum = list(itertools.accumulate(rates.values()))
    rng = _rng(spec.seed, source, shard)
    n = spec.shard_len(source, shard)
    plan = ["clean"] * n
    for i in range(1, n):
        k = bisect.bisect_right(cum, rng.random())
        if k < len(kinds):
            plan[i] = kinds[k]
    base = shard * spec.shard_rows
    for g, kind in _forced_kinds(spec, source).items():
        if base <= g < base + n:
            plan[g - base] = kind
    return tuple(plan)


def _pick_original(
    spec: CorpusSpec, source: str, shard: int, i: int, rng: random.Random
) -> tuple[str, int, int]:
    """An earlier clean row to duplicate: same shard, or an earlier shard of the same family.

    "Earlier" follows the canonical order wds < parquet < jsonl, then shard, then row. Text
    duplicates stay within the text source.
    """
    family = IMAGE_TEXT_SOURCES if source in IMAGE_TEXT_SOURCES else (source,)
    before = [(src, spec.n_shards(src)) for src in family[: family.index(source)]] + [(source, shard)]
    n_earlier = sum(n for _, n in before)
    src, sh, limit = source, shard, i
    if n_earlier and rng.random() < 0.4:
        k = rng.randrange(n_earlier)  # index into the earlier shards without listing them
        for src, n in before:
            if k < n:
                sh = k
                break
            k -= n
        limit = spec.shard_len(src, sh)
    plan = shard_plan(spec, src, sh)
    return src, sh, rng.choice([j for j in range(limit) if plan[j] == "clean"])
