"""Every registered stage, through the same contract (curation.stage).

A stage added to the registry is covered here without being named: it must survive an empty batch and a
batch of nulls in every modality, travel by pickle (Ray ships it to workers that way), fill every column it
declares, read only columns something fills, and, for a score filter, decide on persisted columns alone:
a fresh copy that never scored anything must reach the same decisions from the columns the first copy
wrote. Only a stage with required parameters needs an entry in ``EXAMPLES``.
"""

from __future__ import annotations

import io
import json
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from PIL import Image

from curation.filters import registry
from curation.schema import MODALITIES, ROW_SCHEMA, STAGE_COLUMNS, from_rows
from curation.stage import (
    GlobalFilter,
    IndexedFilter,
    ScoreFilter,
    Stage,
    check_reads,
    unscored,
)
from tests.helpers.clip import TINY_CLIP

REGISTRY = registry()
# A backend nobody listens on: rows without media never reach it, and rows with media fail as unreachable.
DEAD_BACKEND = {"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "m", "max_retries": 0}


@pytest.fixture(scope="module")
def examples(tmp_path_factory) -> dict[str, dict]:
    """Parameters for the stages that cannot be built with none (required ones, or a model to load)."""
    tmp = tmp_path_factory.mktemp("contract")
    bench = tmp / "qa.jsonl"
    bench.write_text(json.dumps({"id": "q1", "question": "What is the boiling point of water at sea level?"}))
    (tmp / "benchmarks.yaml").write_text(
        f"benchmarks:\n  - name: qa\n    paths: ['{bench}']\n    fields: {{id: id, question: question}}\n"
    )
    import torch

    from curation.models.clip import import_open_clip, save_clip

    torch.manual_seed(0)
    clip = import_open_clip().CLIP(**TINY_CLIP).eval()
    ckpt = save_clip(clip, TINY_CLIP, tmp / "tiny.pt", name="tiny-contract")
    from curation.models.vlm import BackendConfig

    return {
        "clip_score": {"model": str(ckpt)},
        "decontaminate": {"benchmarks": str(tmp / "benchmarks.yaml")},
        "vlm_judge": {"backend": BackendConfig(**DEAD_BACKEND), "max_attempts": 1},
        "dense_caption": {"backend": BackendConfig(**DEAD_BACKEND), "max_attempts": 1},
    }


def make(name: str, examples: dict[str, dict]) -> Stage:
    try:
        return REGISTRY[name](**examples.get(name, {}))
    except (TypeError, ValueError) as e:
        pytest.fail(f"stage {name!r} cannot be built from EXAMPLES ({e}): give it example parameters there")


def jpeg(w: int = 48, h: int = 40, colour: str = "red") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), colour).save(buf, "JPEG")
    return buf.getvalue()


def null_batch() -> pa.Table:
    """One row per modality with nothing but its id and modality."""
    return from_rows([{"id": f"null-{m}", "modality": m} for m in MODALITIES])


def real_batch() -> pa.Table:
    """A few well-formed and a few broken rows of every modality."""
    frames = [jpeg(64, 48, c) for c in ("black", "white", "red", "blue")]
    video_meta = json.dumps({"duration": 4.0, "fps": 25, "video_width": 64, "video_height": 48})
    messages = json.dumps(
        [{"role": "user", "content": "What is 2+2? /no_think"}, {"role": "assistant", "content": "4"}]
    )
    rows = [
        {
            "id": "img",
            "modality": "image_text",
            "text": "a red square on a plain background",
            "image": jpeg(),
        },
        {"id": "img-bad", "modality": "image_text", "text": "a broken picture", "image": b"not an image"},
        {"id": "img-none", "modality": "image_text", "text": "no picture at all"},
        {"id": "doc", "modality": "interleaved", "texts": ["a page", None], "images": [None, jpeg(32, 32)]},
        {"id": "txt", "modality": "text", "text": "The quick brown fox jumps over the lazy dog. " * 8},
        {
            "id": "vid",
            "modality": "video",
            "text": "a few colours",
            "frames": frames,
            "frame_ts": [0.0, 1.0, 2.0, 3.0],
            "meta": video_meta,
        },
        {"id": "vid-none", "modality": "video", "text": "no frames"},
        {"id": "sft", "modality": "sft", "messages": messages, "mode": "non_thinking"},
    ]
    for k, r in enumerate(rows):
        r.update(source="contract", source_uri=f"mem://{r['id']}", source_offset=k)
    return from_rows(rows)


def with_reads(stage: Stage, batch: pa.Table, examples: dict[str, dict]) -> pa.Table:
    """``batch`` with the other stages' columns ``stage`` reads added as nulls of their declared types."""
    types = {f.name: f.type for n in STAGES for f in make(n, examples).output_fields()}
    for column in stage.columns_read():
        if column not in batch.column_names:
            batch = batch.append_column(column, pa.nulls(batch.num_rows, types[column]))
    return batch


def run(stage: Stage, batch: pa.Table) -> pa.Table:
    """The stage as the runner calls it: its index first (built over this batch), then the batch."""
    if isinstance(stage, IndexedFilter):
        stage.use_index(stage_index(stage, batch))
    out = stage(batch)
    if isinstance(stage, GlobalFilter):  # the pool-wide decision must accept what the unit pass wrote
        lineage = ["source_uri", "source_offset", "clip_start"]
        decided, facts = stage.decide_global(
            out.select(list(dict.fromkeys([*stage.global_columns, *lineage])))
        )
        assert isinstance(decided, dict) and isinstance(facts, dict)
    return out


# The stages the package ships (tests register stages of their own, e.g. one that always raises).
STAGES = sorted(n for n, cls in REGISTRY.items() if cls.__module__.startswith("curation."))


@pytest.mark.parametrize("name", STAGES)
def test_pickles_with_its_parameters(name, examples):
    stage = make(name, examples)
    copy = pickle.loads(pickle.dumps(stage))
    assert type(copy) is type(stage) and copy.label == stage.label


@pytest.mark.parametrize("name", STAGES)
@pytest.mark.parametrize("batch", [lambda: null_batch().slice(0, 0), null_batch], ids=["empty", "all-null"])
def test_empty_and_null_batches_keep_every_row_and_declared_column(name, batch, examples):
    stage = make(name, examples)
    b = with_reads(stage, batch(), examples)
    out = run(stage, b)
    assert out.num_rows == b.num_rows or name in {"ocr_qa"}  # a generator may add rows, never lose them
    missing = [c for c in (*stage.columns_written(), *ROW_SCHEMA.names) if c not in out.column_names]
    assert not missing, f"{name}: declared columns missing from its output: {missing}"
    for f in stage.output_fields():
        assert out.schema.field(f.name).type == f.type, f"{name}: {f.name} is not {f.type}"
    rejected = pc.is_valid(out["reject_reason"])
    assert pc.all(pc.equal(pc.filter(out["reject_stage"], rejected), stage.label)).as_py() in (True, None)


@pytest.mark.parametrize("name", STAGES)
def test_reads_are_columns_something_fills(name, examples):
    stage = make(name, examples)
    written = {c for n in STAGES for c in make(n, examples).columns_written()}
    readable = {*ROW_SCHEMA.names, *written}
    unknown = [c for c in stage.columns_read() if c not in readable]
    assert not unknown, f"{name} reads {unknown}: neither a row column nor written by any stage"
    problems, _ = check_reads([stage])
    for column in set(stage.columns_read()) & set(STAGE_COLUMNS):  # only a stage fills these: say which
        assert any(column in p and "add " in p for p in problems), problems


@pytest.mark.parametrize("name", [n for n in STAGES if issubclass(REGISTRY[n], ScoreFilter)])
def test_decide_is_a_function_of_persisted_columns(name, examples):
    """A fresh copy, which never scored, decides the same from the columns the first copy persisted."""
    stage = make(name, examples)
    if isinstance(stage, GlobalFilter):
        pytest.skip("decides pool-wide, in decide_global (its own tests)")
    batch = real_batch()
    for column in stage.columns_read():  # run what fills another stage's columns first, as a recipe must
        if column not in batch.column_names or column in STAGE_COLUMNS:
            writer = next(n for n in STAGES if column in make(n, examples).columns_written())
            batch = run(make(writer, examples), batch)
    out = run(stage, batch)
    active = pc.indices_nonzero(stage.applies(batch))
    fresh = pickle.loads(pickle.dumps(make(name, examples)))
    if isinstance(fresh, IndexedFilter):
        fresh.use_index(stage_index(fresh, batch))
    scores = {c: out[c].take(active) for c in stage.columns_written()}
    decided = fresh.decide(batch.take(active), scores)
    reasons = (decided[0] if isinstance(decided, tuple) else decided).to_pylist()
    persisted = out["reject_reason"].take(active).to_pylist()
    for row, mine, theirs in zip(batch["id"].take(active).to_pylist(), reasons, persisted):
        # a row the first copy kept stays kept; a rejected one is rejected for the same reason, unless it
        # was rejected as unscorable (then decide may say anything: it never applies to that row)
        assert theirs is not None or mine is None, f"{name}: {row} kept, but decide() rejects it ({mine})"
        assert mine in (None, theirs) or theirs is not None, (name, row, mine, theirs)


def stage_index(stage: IndexedFilter, batch: pa.Table):
    """The stage's index over ``batch``, as the runner's pre-pass builds it (None: it has its own source)."""
    if not stage.index_columns:
        return stage.build_index(None)
    rows = batch.select(list(stage.index_columns))
    return stage.build_index(rows.append_column("unit", pa.array([0] * batch.num_rows, pa.int64())))


def test_a_filter_that_cannot_score_some_rows_needs_nothing_but_score_and_decide():
    """The shape a newcomer writes: one file, no state on self; unscorable rows are rejected in every mode."""
    from dataclasses import dataclass

    @dataclass
    class WordCount(ScoreFilter):
        name = "word_count_contract"
        reads = ("text",)
        min_words: int = 3

        def score(self, batch):
            words = [None if t is None else float(len(t.split())) for t in batch["text"].to_pylist()]
            why = [None if t is not None else "no_text" for t in batch["text"].to_pylist()]
            detail = [None if w is None else "the row has no text column value" for w in why]
            return {self.score_name: pa.array(words, pa.float64()), **unscored(why, detail)}

        def decide(self, batch, scores):
            short = pc.less(scores[self.score_name], self.min_words)
            return pc.if_else(short, pa.scalar("too_short"), pa.scalar(None, pa.string()))

    b = from_rows(
        [
            {"id": "a", "modality": "text", "text": "one two three four"},
            {"id": "b", "modality": "text", "text": "one two"},
            {"id": "c", "modality": "text"},
        ]
    )
    assert WordCount()(b)["reject_reason"].to_pylist() == [None, "too_short", "no_text"]
    annotated = WordCount(annotate_only=True)(b)
    assert annotated["reject_reason"].to_pylist() == [None, None, "no_text"]
    assert annotated["reject_detail"].to_pylist() == [None, None, "the row has no text column value"]
    cut = WordCount(keep_fraction=0.5)(b)  # the pool-wide cut decides later; the unscorable row is out now
    assert cut["reject_reason"].to_pylist() == [None, None, "no_text"]
    np.testing.assert_array_equal(cut["score_word_count_contract"].to_pylist()[:2], [4.0, 2.0])
