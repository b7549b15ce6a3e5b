"""The benchmark index: every matcher over every benchmark of a registry, built once, queried per batch.

``BenchmarkIndex.build(registry)`` reads the registry's items on the driver and builds

- text: n-gram containment over each item's segments (question, context, each option, answer), so a
  question pasted into a long page is found, and MinHash LSH for near-copies of whole items;
- images: perceptual hashes of every item image (resized, re-encoded, cropped, brightened copies);
- video: hashes of keyframes sampled densely from every item video (re-encoded, trimmed copies);
- the (image, question) pair: an image match whose row also carries the item's question names that
  item, which tells apart VQA items sharing one image or one template question.

The whole object is numpy arrays and short lists: ``ray.put(index)`` stores one copy in the object
store and every worker queries that copy, so a match anywhere in the corpus is found and nothing is
rebuilt per worker. ``match_rows`` returns, per row, a list of :class:`Match` in the stable shape the
audit report uses (``benchmark``, ``benchmark_item``, ``modality``, ``method``, ``score``).

Thresholds live in :class:`MatchConfig`, each with the reason for its default (docs/decontamination.md).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from curation.bounds import bounded
from curation.dedup.registry import BenchmarkItem, NotIndexed, load_benchmarks, read_items

log = logging.getLogger(__name__)

#: Method names as they appear in reports (``matches[].method``); stable.
METHODS = (
    "text_containment",
    "text_minhash",
    "image_hash",
    "image_question",
    "video_keyframes",
    "video_question",
)


@dataclass
class MatchConfig:
    """Thresholds of every matcher. Defaults and the reasons for them are in docs/decontamination.md.

    text_threshold: share of an item's word n-grams found in the row (containment relative to the
        item). 0.5: a verbatim copy scores ~1.0 and a copy with one word in 15 changed stays above 0.5;
        two different items from one template stay below it.
    ngram: words per n-gram. 5: benchmark questions are often 8-30 words, and each changed word
        removes up to n n-grams; five consecutive words of ordinary text are already specific.
    min_tokens: items with fewer words are not text-indexed (listed as not indexed). 4: "what is
        this?" appears verbatim in ordinary text and proves nothing.
    min_ngrams: an item is text-indexed only if one of its parts has this many word n-grams (7 words
        at n=5). 3: a single 5-gram such as "what colour is the circle" repeats across template items
        and across the web; alone it proves nothing (such items still match with their image).
    minhash_threshold: estimated Jaccard of word-bigram sets for a near-copy of a whole item. 0.8.
    minhash_max_tokens: rows longer than this skip MinHash (Jaccard against a long document is ~0;
        containment covers them). 2000.
    image_max_distance: largest verified image distance (0-255 scale, the worst 4x4 tile's mean RGB
        difference after crop alignment and a brightness fit) that counts as a copy. 12: copies resized,
        re-encoded, cropped up to 10% and brightened stay below it, unrelated drawings above (see
        curation.dedup.image for the measurements).
    question_threshold: containment of the item's question alone in the row's text for an image
        match to count as the (image, question) pair. 0.6.
    video_min_score: share of a row's sampled frames that must match one benchmark video, in
        temporal order (see curation.dedup.video).
    """

    text_threshold: float = bounded(0.5, 0, 1)
    ngram: int = bounded(5, 1, 64)
    min_tokens: int = bounded(4, 0, 100_000)
    min_ngrams: int = bounded(3, 0, 100_000)
    minhash_threshold: float = bounded(0.8, 0, 1)
    minhash_max_tokens: int = bounded(2000, 1, 10_000_000)
    image_max_distance: float = bounded(12.0, 0, 64)  # bits of a 64-bit perceptual hash
    question_threshold: float = bounded(0.6, 0, 1)
    video_min_score: float = bounded(0.5, 0, 1)


@dataclass
class Match:
    """One piece of evidence that a corpus row contains a benchmark item."""

    benchmark: str
    benchmark_item: str
    modality: str  # text | image | image+text | video
    method: str  # one of METHODS
    score: float  # 0..1, higher is stronger; per method (containment, Jaccard, hash similarity, frame share)
    detail: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _split(key: str) -> tuple[str, str]:
    benchmark, _, item = key.partition(":")
    return benchmark, item


class BenchmarkIndex:
    """All matchers for one registry; see the module docstring."""

    def __init__(self, items: list[BenchmarkItem], not_indexed: list[NotIndexed], config: MatchConfig):
        from curation.dedup.image import ImageHashIndex
        from curation.dedup.text import ContainmentIndex, NearDupIndex, tokens

        t0 = time.perf_counter()
        self.config = config
        c = config
        self.benchmarks: dict[str, dict[str, Any]] = {}
        for it in items:
            self.benchmarks.setdefault(it.benchmark, {"items": 0, "with_images": 0, "with_video": 0})
            b = self.benchmarks[it.benchmark]
            b["items"] += 1
            b["with_images"] += bool(it.images)
            b["with_video"] += bool(it.video)
        self.not_indexed = list(not_indexed)
        # An item whose longest segment gives fewer than `min_ngrams` n-grams ("What colour is the circle?")
        # proves nothing by its text alone: template questions repeat across items. It is matched through
        # its image or video (the pair), and listed as not text-indexed.
        longest = {it.key: max((len(tokens(seg)) for seg in it.segments), default=0) for it in items}
        short = {k for k, n_tok in longest.items() if n_tok - c.ngram + 1 < c.min_ngrams}
        # Items whose matchable text is the same as another item's of their benchmark ("What word is written
        # on the sign?" over different images) cannot be told apart by text: they match through their media.
        text_of: dict[tuple[str, str], list[str]] = {}
        for it in items:
            if it.key not in short:
                key = " | ".join(" ".join(t) for seg in it.segments if len(t := tokens(seg)) >= c.ngram)
                text_of.setdefault((it.benchmark, key), []).append(it.key)
        shared = {k: len(keys) for keys in text_of.values() if len(keys) > 1 for k in keys}
        media_only = short | set(shared)
        self.text = ContainmentIndex(
            [(it.key, it.segments) for it in items if it.key not in media_only],
            n=c.ngram,
            threshold=c.text_threshold,
            min_tokens=c.min_tokens,
        )
        self.neardup = NearDupIndex(
            [
                (it.key, it.text)
                for it in items
                if it.key not in media_only and len(tokens(it.text)) >= c.min_tokens
            ],
            threshold=c.minhash_threshold,
        )
        self.image = ImageHashIndex.build(
            [(it.key, im) for it in items for im in it.images], max_distance=c.image_max_distance
        )
        self.video = self._video_index([(it.key, it.video) for it in items if it.video])
        # The question alone, per item with an image or a video: the pair check runs on image/video matches.
        self.questions = {it.key: it.question for it in items if it.images or it.video}
        self.items = (
            items  # on the driver only (reports show them); never shipped to workers, see __getstate__
        )
        for key in self.text.skipped:
            b, item = _split(key)
            self.not_indexed.append(NotIndexed(b, item, "text", f"fewer than {c.min_tokens} words"))
        for key in sorted(short):
            b, item = _split(key)
            self.not_indexed.append(
                NotIndexed(
                    b,
                    item,
                    "text",
                    f"no text part has {c.ngram + c.min_ngrams - 1} words (too short to identify the "
                    "item alone; its image or video, with the question, still matches)",
                )
            )
        for key, count in sorted(shared.items()):
            b, item = _split(key)
            self.not_indexed.append(
                NotIndexed(
                    b,
                    item,
                    "text",
                    f"the same text as {count - 1} other item(s) of {b}: text alone cannot tell them "
                    "apart (its image or video, with the question, still matches)",
                )
            )
        text_keys = set(self.text.ids)
        for it in items:
            if it.key not in text_keys and not it.images and not it.video:
                self.not_indexed.append(
                    NotIndexed(
                        it.benchmark,
                        it.item_id,
                        "item",
                        "nothing to match on (text too short, no readable image or video)",
                    )
                )
        self.build_seconds = time.perf_counter() - t0
        log.info(
            "benchmark index: %d items in %d benchmarks, %d images, %d videos, %d not indexed (%.1fs)",
            len(items),
            len(self.benchmarks),
            len(self.image),
            len(self.video or ()),
            len(self.not_indexed),
            self.build_seconds,
        )

    def _video_index(self, videos: list[tuple[str, str]]):
        if not videos:
            return None
        from curation.dedup.video import VideoHashIndex
        from curation.io import fs as cfs

        return VideoHashIndex.build((key, cfs.read_bytes(v) if cfs.is_uri(v) else v) for key, v in videos)

    @classmethod
    def build(
        cls, registry: str | Path, overrides: Sequence[str] = (), config: MatchConfig | None = None
    ) -> BenchmarkIndex:
        """Read every benchmark of a registry YAML and index it (on the driver, once)."""
        problems: list[NotIndexed] = []
        items = [
            it for spec in load_benchmarks(registry, list(overrides)) for it in read_items(spec, problems)
        ]
        return cls(items, problems, config or MatchConfig())

    # ------------------------------------------------------------------ queries

    def match_rows(
        self,
        texts: Sequence[str | None],
        images: Sequence[Sequence[bytes]],
        frames: Sequence[Sequence[bytes]] | None = None,
        frame_ts: Sequence[Sequence[float]] | None = None,
    ) -> list[list[Match]]:
        """Matches for each row: its text, its images, its video frames (any may be empty)."""

        c = self.config
        n = len(texts)
        out: list[dict[tuple[str, str], Match]] = [{} for _ in range(n)]

        def add(i: int, m: Match) -> None:
            k = (m.benchmark + ":" + m.benchmark_item, m.method)
            if k not in out[i] or out[i][k].score < m.score:
                out[i][k] = m

        doc, item, score = self.text.scan(texts)  # the whole batch at once, vectorised
        for i, j, sc in zip(doc.tolist(), item.tolist(), score.tolist()):
            add(i, Match(*_split(self.text.ids[j]), "text", "text_containment", round(sc, 4)))
        if len(self.neardup):  # whole-item near-copies; long rows skip it (containment covers them)
            short = [
                i
                for i, text in enumerate(texts)
                if text
                and len(text) <= 12 * c.minhash_max_tokens
                and len(text.split()) <= c.minhash_max_tokens
            ]  # a word count at C speed
            for i, found in zip(short, self.neardup.query_batch([texts[i] for i in short])):
                for key, score in found:
                    add(i, Match(*_split(key), "text", "text_minhash", round(score, 4)))

        owners = [i for i, ims in enumerate(images) for _ in ims]
        blobs = [b for ims in images for b in ims]
        if blobs and len(self.image):
            from curation.dedup.image import describe

            for j, key, dist in self.image.query(describe(blobs)):
                i = owners[j]
                score = round(1.0 - dist / 255.0, 4)
                add(
                    i,
                    Match(
                        *_split(key), "image", "image_hash", score, {"image_distance": round(float(dist), 2)}
                    ),
                )
                self._pair(i, key, score, texts[i], add, "image")

        if frames is not None and self.video is not None:
            for i, fr in enumerate(frames):
                if fr:
                    for key, score in self.video.query(
                        list(fr), list(frame_ts[i]), min_score=c.video_min_score
                    ):
                        add(i, Match(*_split(key), "video", "video_keyframes", round(score, 4)))
                        self._pair(i, key, score, texts[i], add, "video")
        return [sorted(d.values(), key=lambda m: -m.score) for d in out]

    def _pair(self, i: int, key: str, media_score: float, text: str | None, add, modality: str) -> None:
        """The (media, question) pair: the matched item's own question is in the row's text too."""
        question = self.questions.get(key)
        if not question or not text:
            return
        q = question_containment(question, text, self.config.ngram)
        if q >= self.config.question_threshold:
            add(
                i,
                Match(
                    *_split(key),
                    f"{modality}+text",
                    "image_question" if modality == "image" else "video_question",
                    round(min(media_score, q), 4),
                    {"question_containment": round(q, 4)},
                ),
            )

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["items"] = []  # the item texts and images are for the driver's report, not for matching
        return state

    def summary(self) -> dict[str, Any]:
        """Per benchmark: items and how many carry images/video; what could not be indexed."""
        return {
            "benchmarks": self.benchmarks,
            "not_indexed": [asdict(x) for x in self.not_indexed],
            "config": asdict(self.config),
            "build_seconds": round(self.build_seconds, 3),
        }


def question_containment(question: str, text: str, n: int) -> float:
    """Share of the question's word n-grams (n shrunk to its length if shorter) found in ``text``."""
    from curation.dedup.text import ngrams, tokens

    q = tokens(question)
    if not q:
        return 0.0
    k = min(n, len(q))
    qg = ngrams(q, k)
    return float(np.isin(qg, ngrams(tokens(text), k)).mean()) if len(qg) else 0.0
