"""Benchmark decontamination as a pipeline stage: drop rows that contain evaluation items.

The index is built once, on the driver, from a benchmark registry (``pipelines/benchmarks.yaml``):
n-gram containment over each item's text (question, options, answer) and perceptual hashes of its
images. The runner puts it in the object store and every worker queries the same index, so a match
anywhere in the corpus is found. Only the driver reads the registry's files.
"""

from __future__ import annotations

from dataclasses import field
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa

from curation.stage import IndexedFilter, register


@register
class Decontaminate(IndexedFilter):
    """Reject rows containing benchmark items: text n-gram containment or a perceptual-hash image match.

    Score: the largest containment of any benchmark item's text in the row (1.0 = the whole item is
    there). ``score_decontaminate_image`` holds the pHash distance of the closest matching benchmark
    image (null when none is within the radius). Details name the benchmark and item.
    """

    name: ClassVar[str] = "decontaminate"
    reads: ClassVar[tuple[str, ...]] = ("text", "texts", "image", "images")
    index_columns: ClassVar[tuple[str, ...]] = ()  # the index comes from the registry: no corpus pre-pass

    benchmarks: str = ""  # registry YAML
    registry_set: list[str] = field(default_factory=list)  # --set style overrides for the registry
    text_threshold: float = 0.5  # containment relative to the item; see curation.dedup.text
    ngram: int = 5
    min_tokens: int = 4
    image_radius: int = 10  # pHash Hamming radius; with dhash_radius, measured FPR 0.65% (BENCHMARKS.md)
    dhash_radius: int = 8

    def __post_init__(self):
        if not self.benchmarks:
            raise ValueError("benchmarks: required (a registry YAML, e.g. pipelines/benchmarks.yaml)")

    def output_fields(self) -> list[pa.Field]:
        return [pa.field(self.score_name, pa.float64()), pa.field(f"{self.score_name}_image", pa.float64())]

    def build_index(self, rows: pa.Table | None) -> dict[str, Any]:
        from curation.dedup.image import ImageHashIndex
        from curation.dedup.registry import load_benchmarks, read_items
        from curation.dedup.text import ContainmentIndex

        texts, images, problems = [], [], []
        for spec in load_benchmarks(self.benchmarks, self.registry_set):
            for item in read_items(spec, problems):
                key = f"{item.benchmark}:{item.item_id}"
                texts.append((key, item.text))
                images += [(key, im) for im in item.images]
        text_index = ContainmentIndex(texts, n=self.ngram, threshold=self.text_threshold, min_tokens=self.min_tokens)
        image_index = ImageHashIndex.build(images, radius=self.image_radius, dhash_radius=self.dhash_radius)
        return {"text": text_index, "image": image_index, "items": len(texts), "problems": problems}

    def use_index(self, index: dict[str, Any]) -> None:
        self._text, self._image = index["text"], index["image"]

    def score(self, batch: pa.Table) -> dict[str, pa.Array]:
        from curation.dedup.image import hash_batch

        n = batch.num_rows
        text_score = np.zeros(n)
        self._hits: list[str | None] = [None] * n
        reasons: list[str | None] = [None] * n
        singles, multi_t, multi_i = (batch[c].to_pylist() for c in ("text", "texts", "images"))
        for i in range(n):
            doc = " ".join(t for t in ([singles[i]] + (multi_t[i] or [])) if t)
            if doc:
                found = self._text.query(doc)
                if found:
                    key, text_score[i] = found[0]
                    reasons[i], self._hits[i] = "benchmark_text", f"{key} (text containment {text_score[i]:.2f})"
        # every image of every row, hashed in one batch
        owners, blobs = [], []
        for i, img in enumerate(batch["image"].to_pylist()):
            for b in ([img] if img is not None else []) + [x for x in (multi_i[i] or []) if x is not None]:
                owners.append(i)
                blobs.append(b)
        image_dist = np.full(n, np.nan)
        if blobs:
            ph, dh, ok = hash_batch(blobs)
            for j, key, dist in self._image.query(ph, dh, ok):
                i = owners[j]
                if np.isnan(image_dist[i]) or dist < image_dist[i]:
                    image_dist[i] = dist
                    if reasons[i] is None or reasons[i] == "benchmark_image":
                        reasons[i], self._hits[i] = "benchmark_image", f"{key} (image pHash distance {dist})"
        self._reasons = reasons
        return {self.score_name: pa.array(text_score),
                f"{self.score_name}_image": pa.array(image_dist, mask=np.isnan(image_dist))}

    def decide(self, batch, scores):
        return pa.array(self._reasons, pa.string()), pa.array(self._hits, pa.string())
