"""Benchmark decontamination as a pipeline stage: drop rows that contain evaluation items.

The index (:class:`curation.dedup.index.BenchmarkIndex`) is built once, on the driver, from a benchmark
registry (``pipelines/benchmarks.yaml``); the runner puts it in the object store and every worker
queries the same copy, so a match anywhere in the corpus is found. Only the driver reads the
registry's files. ``curation audit`` runs this stage over a corpus and turns its rejects into a report.
"""

from __future__ import annotations

import json
import logging
from dataclasses import field
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa

from curation.dedup.index import MatchConfig
from curation.io import refs
from curation.schema import message_texts
from curation.stage import IndexedFilter, register, required

log = logging.getLogger(__name__)

MAX_MATCHES_PER_ROW = 20  # kept in the row's detail; the score column always holds the best


def row_text(text: str | None, texts: list | None, messages: str | None) -> str:
    """Everything a row says, for text matching: its text, interleaved texts and SFT message text."""
    parts = [text] if text else []
    parts += [t for t in (texts or []) if t]
    if messages:
        try:
            parts += message_texts(messages)
        except ValueError:  # not a message list: match what is there
            parts.append(messages)
    return "\n\n".join(parts)


def _keyframes(uri: str, data: bytes | None, policy: refs.RefPolicy) -> tuple[list[bytes], list[float]]:
    """Frames of a video the row holds as a clip or only points to, as the readers sample them; none if it
    cannot be read. A path is read only under the stage's ``media_roots`` (a row is untrusted)."""
    from curation.io.video import VideoError, sample_frames
    from curation.target.video import VIDEO_OPTIONS as o
    from curation.target.video import frame_bounds

    try:
        data = data if data is not None else policy.read(uri, "/")[1]
        vf = sample_frames(data, fps=o["fps"], max_frames=o["max_frames"], **frame_bounds(o), name=uri)
    except (OSError, VideoError, refs.RefusedReference) as e:
        log.warning("decontaminate: cannot sample %s, its video is not matched: %s", refs.shown(uri), e)
        return [], []
    return vf.frames, vf.ts


@register
class Decontaminate(IndexedFilter):
    """Reject rows that contain a benchmark item: text, image, video or (image, question) pair.

    Reason ``contaminated:<benchmark>`` (the benchmark of the strongest match). The detail is JSON: the
    row's matches, strongest first, each ``{benchmark, benchmark_item, modality, method, score}``.
    ``score_decontaminate`` holds the strongest match's score (0 = none); ``decontaminate_matches`` the
    same JSON on kept rows too, so ``annotate_only: true`` audits without dropping anything.
    """

    name: ClassVar[str] = "decontaminate"
    reads: ClassVar[tuple[str, ...]] = (
        "text",
        "texts",
        "messages",
        "image",
        "images",
        "frames",
        "frame_ts",
        "video",
        "video_bytes",
    )
    index_columns: ClassVar[tuple[str, ...]] = ()  # the index comes from the registry: no corpus pre-pass

    benchmarks: str = required("the benchmark registry YAML, e.g. pipelines/benchmarks.yaml")
    registry_set: list[str] = field(default_factory=list)  # --set style overrides for the registry
    match: MatchConfig = field(default_factory=MatchConfig)  # thresholds; see docs/decontamination.md
    # A video row with neither frames nor clip (a pool row written with output.video: clip elsewhere) is
    # sampled from its path only under these folders or s3:// prefixes (default: none, it is not matched).
    media_roots: list[str] = field(default_factory=list)

    @property
    def matches_name(self) -> str:
        return f"{self.label}_matches"

    def output_fields(self) -> list[pa.Field]:
        return [pa.field(self.score_name, pa.float64()), pa.field(self.matches_name, pa.string())]

    def build_index(self, rows: pa.Table | None):
        from curation.dedup.index import BenchmarkIndex

        self.index = BenchmarkIndex.build(
            self.benchmarks, self.registry_set, self.match
        )  # the driver keeps it
        return self.index

    def use_index(self, index: Any) -> None:
        self._index = index

    def score(self, batch: pa.Table) -> dict[str, pa.Array]:
        cols = {c: batch[c].to_pylist() for c in self.reads}
        n = batch.num_rows
        texts = [row_text(cols["text"][i], cols["texts"][i], cols["messages"][i]) for i in range(n)]
        images = [
            ([cols["image"][i]] if cols["image"][i] is not None else [])
            + [x for x in (cols["images"][i] or []) if x is not None]
            for i in range(n)
        ]
        frames = [cols["frames"][i] or [] for i in range(n)]
        ts = [cols["frame_ts"][i] or [] for i in range(n)]
        policy = refs.RefPolicy(tuple(refs.normalize_root(r) for r in self.media_roots), allow_absolute=True)
        for i in range(n):  # a row with only its clip, or a path to its video: sample its keyframes now
            if not frames[i] and (cols["video"][i] or cols["video_bytes"][i]):
                frames[i], ts[i] = _keyframes(cols["video"][i] or "", cols["video_bytes"][i], policy)
        found = self._index.match_rows(texts, images, frames, ts)
        best = np.array([m[0].score if m else 0.0 for m in found])
        details = [json.dumps([x.to_dict() for x in m[:MAX_MATCHES_PER_ROW]]) if m else None for m in found]
        return {self.score_name: pa.array(best), self.matches_name: pa.array(details, pa.string())}

    def decide(self, batch, scores):
        """Every row with a match: ``contaminated:<benchmark of the strongest>``, the matches as
        the detail."""
        matches = scores[self.matches_name]
        reasons = [
            None if m is None else f"contaminated:{json.loads(m)[0]['benchmark']}"
            for m in matches.to_pylist()
        ]
        return pa.array(reasons, pa.string()), matches
