"""The stage protocol: a callable over a ``pyarrow.Table`` batch.

A stage runs unchanged inside a Ray Data task or actor, in a plain loop, or in a test. It declares
its YAML name, the columns it reads and writes, the modalities it applies to, the resources it wants
and the optional packages it needs. Heavy imports and model loads go in :meth:`Stage.setup`, which
runs once per worker. What a stage ``reads`` is checked against what the sources and the stages before it
provide when the recipe loads (:func:`check_reads`).

A :class:`ScoreFilter` computes first and decides second. :meth:`~ScoreFilter.score` returns every column
to persist, and for the rows it could not score, why (:func:`unscored`); :meth:`~ScoreFilter.decide` is a
pure function of persisted columns and parameters, never of state kept on ``self`` between the two. So a
threshold can change without recomputing a score, ``annotate_only`` keeps every row it scored, and a row
that could not be scored is rejected with its reason in every mode (also under ``keep_fraction``, whose
pool-wide cut would otherwise pass a row without a score unseen).
Rejected rows are not dropped: they keep flowing with ``reject_stage`` / ``reject_reason`` set,
later stages skip them, and the sink writes them to ``rejects/``. Every drop is therefore counted
by stage and reason, and nothing vanishes.

Example (a complete filter that cannot score some rows)::

    @register
    class CaptionLength(ScoreFilter):
        name = "caption_length"
        reads = ("text",)
        min: int = 1
        def score(self, batch):
            text = batch["text"]
            return {
                self.score_name: pc.utf8_length(text).cast(pa.float64()),
                **unscored(reason_where(pc.is_null(text), "no_text")),
            }
        def decide(self, batch, scores):
            return reason_where(pc.less(scores[self.score_name], self.min), "too_short")
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curation.bounds import bounded
from curation.schema import ROW_SCHEMA, STAGE_COLUMNS, score_column

log = logging.getLogger(__name__)

# Keys of :meth:`ScoreFilter.score`'s result that are not columns: why rows could not be scored (null: scored)
# and a detail for each. The base class takes them out and rejects those rows (see :func:`unscored`).
UNSCORED = "__unscored_reason__"
UNSCORED_DETAIL = "__unscored_detail__"


def unscored(
    reasons: pa.Array | list[str | None], details: pa.Array | list[str | None] | None = None
) -> dict:
    """Entries for :meth:`ScoreFilter.score`'s result: per row, why it could not be scored (null: it was),
    and a detail each (what to do, which image). Spread them into the returned dict::

        return {self.score_name: values, **unscored(reasons, details)}

    The base class rejects those rows with these reasons whatever the mode (``annotate_only``,
    ``keep_fraction``), before :meth:`~ScoreFilter.decide` sees the rest.
    """
    out = {UNSCORED: pa.array(reasons, pa.string()) if isinstance(reasons, list) else reasons}
    if details is not None:
        out[UNSCORED_DETAIL] = pa.array(details, pa.string()) if isinstance(details, list) else details
    return out


def required(help: str) -> Any:
    """A stage parameter a recipe must give (no default): ``benchmarks: str = required("registry YAML")``.

    Recipes that leave it out fail to load, naming the stage and the key; so does constructing the stage in
    Python without it (:func:`register` checks after ``__init__``).
    """
    return field(default=None, metadata={"required": True, "help": help})


@dataclass
class Resources:
    """What one worker of a stage needs (Ray resources).

    Stages run fused in one task per unit, which asks for the largest ``num_cpus`` and ``num_gpus`` of
    its stages; ``concurrency`` caps how many such tasks run at once (a model-backed stage that may not
    have more copies than that: memory, an endpoint's rate limit). A model is loaded once per worker
    process (``setup``) and reused by every task that process runs.
    """

    num_cpus: float = bounded(1.0, 0.01, 1_024)  # fractions share a CPU between light stages
    num_gpus: float = bounded(0.0, 0, 64)
    concurrency: int | None = bounded(None, 1, 10_000)


class NotReady(RuntimeError):
    """A stage cannot run here (a package, weights, an endpoint or a GPU is missing); found before any
    data is read, and the message says what to do."""


class MissingDependency(NotReady):
    """An optional package a stage needs is not installed; the message has the install command."""


@dataclass
class Stage:
    """Base of every stage. Subclasses are dataclasses whose fields are the YAML parameters."""

    name: ClassVar[str]
    reads: ClassVar[tuple[str, ...]] = ()
    writes: ClassVar[tuple[str, ...]] = ()
    requires: ClassVar[tuple[tuple[str, str], ...]] = ()  # (import name, extra) pairs
    default_modalities: ClassVar[tuple[str, ...] | None] = None  # None = every modality

    # Parameters every stage accepts.
    instance: str | None = field(
        default=None, metadata={"help": "name of this instance (default: the stage name)"}
    )
    modalities: list[str] | None = field(
        default=None, metadata={"help": "modalities to apply to (default: the stage's own)"}
    )
    resources: Resources = field(
        default_factory=Resources, metadata={"help": "num_cpus, num_gpus, concurrency"}
    )

    @property
    def label(self) -> str:
        """The name this instance reports under (stats, reject_stage, score column)."""
        return self.instance or self.name

    def check_requirements(self) -> None:
        for module, extra in self.requires:
            try:
                importlib.import_module(module)
            except ImportError as e:
                raise MissingDependency(
                    f"stage '{self.name}' needs the '{module}' package: pip install 'keye-curation[{extra}]'"
                ) from e

    def preflight(self) -> None:
        """Checks on the driver before any data is read: weights exist, an endpoint answers, a GPU is there.

        Raise ``MissingDependency`` or ``ValueError`` with a message that says what to do. Cheap: no model
        is loaded here.
        """

    def lineage(self) -> dict[str, Any]:
        """What a reader of the pool must know to reproduce this stage's scores: model name, checkpoint
        sha256, prompt hash. Written to the pool's manifest under ``stages``."""
        return {}

    def setup(self) -> None:
        """Load models and heavy imports; called once per worker before the first batch."""

    @property
    def outcome_column(self) -> str | None:
        """A column whose values this stage sets on the rows it processed, counted by value in the stats
        (``outcomes``) beside the drops: what happened to rows it kept (OCR: text, no_text, too_small)."""
        return None

    def output_fields(self) -> list[pa.Field]:
        """Columns this stage adds beyond :data:`ROW_SCHEMA`: always present after it ran, so every
        batch of a pipeline has the same schema."""
        return []

    def columns_read(self) -> tuple[str, ...]:
        """The columns this instance needs to find filled: :attr:`reads`, plus any its parameters name
        (a stage that reads another stage's output). Checked when the recipe loads (:func:`check_reads`)."""
        return self.reads

    def columns_written(self) -> tuple[str, ...]:
        """The columns this stage fills: :attr:`writes` (row columns) and :meth:`output_fields`."""
        return (*self.writes, *(f.name for f in self.output_fields()))

    def __call__(self, batch: pa.Table) -> pa.Table:  # pragma: no cover - abstract
        raise NotImplementedError

    def applies(self, batch: pa.Table) -> pa.Array:
        """Boolean mask: rows not yet rejected and of a modality this stage handles."""
        mask = pc.is_null(batch["reject_reason"])
        modalities = self.modalities if self.modalities is not None else self.default_modalities
        if modalities is not None:
            mask = pc.and_(mask, pc.is_in(batch["modality"], pa.array(list(modalities), pa.string())))
        return mask


@dataclass
class ScoreFilter(Stage):
    """Compute score columns, then turn them into reject reasons (``None`` = keep)."""

    # Score filters whose score ranks quality (higher is better) may keep a fraction of the whole dataset
    # instead of applying their per-row rule: the runner cuts at the global quantile after every row
    # is scored.
    ranks: ClassVar[bool] = False

    annotate_only: bool = field(
        default=False, metadata={"help": "write scores; reject only the rows that could not be scored"}
    )
    keep_fraction: float | None = field(
        default=None,
        metadata={
            "help": "keep this top fraction of all rows scored, pool-wide, instead of the per-row rule"
        },
    )

    @property
    def score_name(self) -> str:
        return score_column(self.label)

    @property
    def cuts(self) -> bool:
        """Whether this stage decides only once every row is scored, pool-wide (``keep_fraction``, or a
        :class:`GlobalFilter`): the unit pass stops after it and the stages after it run on what it keeps."""
        return self.keep_fraction is not None

    def output_fields(self) -> list[pa.Field]:
        return [pa.field(self.score_name, pa.float64())]

    def score(self, batch: pa.Table) -> dict[str, pa.Array]:
        """Columns to persist, computed over ``batch`` (only the rows this stage applies to), and for the rows
        that could not be scored, why (``**unscored(reasons, details)``). Everything :meth:`decide` needs
        must be among the columns returned or already in the batch."""
        raise NotImplementedError

    def decide(self, batch: pa.Table, scores: dict[str, pa.Array]) -> pa.Array | tuple[pa.Array, pa.Array]:
        """A string array of reject reasons (null = keep), optionally with a detail string array.

        A pure function of ``batch`` (the rows scored), ``scores`` (the columns :meth:`score` persisted) and
        the stage's parameters: no state from :meth:`score` on ``self``, so it gives the same answer on a
        pool read back. The default keeps every row scored (an annotator whose only rejects are the rows it
        could not score)."""
        return pa.nulls(batch.num_rows, pa.string())

    def __call__(self, batch: pa.Table) -> pa.Table:
        active_idx = pc.indices_nonzero(self.applies(batch))
        active = batch.take(active_idx)
        scores = dict(self.score(active)) if active.num_rows else {}
        failed, failed_detail = scores.pop(UNSCORED, None), scores.pop(UNSCORED_DETAIL, None)
        types = {f.name: f.type for f in self.output_fields()}
        types.update((f.name, f.type) for f in ROW_SCHEMA)
        for name, arr in scores.items():
            values = _scatter(arr, active_idx, batch.num_rows).cast(types.get(name, arr.type))
            batch = _set_column(batch, name, values)
        for f in self.output_fields():
            if f.name not in batch.column_names:
                batch = batch.append_column(f, pa.nulls(batch.num_rows, f.type))
        if not active.num_rows:
            return batch
        if failed is not None:  # in every mode: no later decision could keep a row on a score it lacks
            batch = mark_rejected(batch, active_idx, self.label, failed, failed_detail)
        if self.annotate_only or self.cuts:
            return batch  # decided later, over the whole pool (curation.cuts), or not at all
        decided = self.decide(active, scores)
        reasons, detail = decided if isinstance(decided, tuple) else (decided, None)
        return mark_rejected(batch, active_idx, self.label, reasons, detail)


@dataclass
class IndexedFilter(ScoreFilter):
    """A filter that needs a view of the whole dataset before it can decide (index, then query).

    The runner reads :attr:`index_columns` of every row in a parallel pre-pass (cheap: no decoding),
    hands the concatenated table to :meth:`build_index` once (or, with :attr:`splits_by_id`, one id range
    at a time in parallel tasks, then :meth:`merge_index`), ships the result to every
    worker through the object store, and calls :meth:`use_index` there before the first batch. So a
    match anywhere in the corpus is found, and the index is never rebuilt per worker. A filter whose
    index comes from elsewhere (benchmarks) declares no index columns and gets ``None``.
    """

    index_columns: ClassVar[tuple[str, ...]] = ("id", "source_uri", "source_offset")
    # True when rows with different ids never interact: then the index of the whole corpus is
    # :meth:`merge_index` of indexes built over disjoint id ranges, and the runner builds those in parallel
    # tasks of at most ``execution.index_partition_rows`` rows, so no process ever holds every row.
    splits_by_id: ClassVar[bool] = False

    def build_index(self, rows: pa.Table | None) -> Any:
        raise NotImplementedError

    def merge_index(self, parts: list[Any]) -> Any:
        """The index of the union of disjoint id ranges, from their indexes (when :attr:`splits_by_id`)."""
        raise NotImplementedError

    def use_index(self, index: Any) -> None:
        raise NotImplementedError


@dataclass
class GlobalFilter(ScoreFilter):
    """A filter that decides over the whole pool once every row has been scored: clusters of near-duplicates,
    where which copy stays depends on all the others.

    In the unit pass :meth:`score` writes per-row columns (hashes, sizes); then the runner reads
    :attr:`global_columns` of every row that reached the stage back from the pool, calls
    :meth:`decide_global` once on the driver, records its decision under ``_work/global`` (a rerun applies
    the same one) and moves the rows it rejects to the rejects, shard by shard, without ever rewriting a shard
    in place (:func:`curation.io.pool.cut_shard`). The stages after it run on the rows it keeps.
    """

    global_columns: ClassVar[tuple[str, ...]] = ()

    @property
    def cuts(self) -> bool:
        return True

    def decide_global(self, rows: pa.Table) -> tuple[dict[str, tuple[str, str]], dict[str, Any]]:
        """``rows``: :attr:`global_columns` plus the lineage columns (``source_uri``, ``source_offset``,
        ``clip_start``) of every row scored. Returns the rows to reject, by lineage key
        (:func:`curation.io.pool.lineage_keys`), as ``(reason, detail)``, and facts for the stats."""
        raise NotImplementedError


def reason_where(condition: pa.Array, reason: str) -> pa.Array:
    """``reason`` where ``condition`` is true, null elsewhere (nulls in condition keep the row)."""
    return pc.if_else(pc.fill_null(condition, False), pa.scalar(reason), pa.scalar(None, pa.string()))


def first_reason(*reasons: pa.Array) -> pa.Array:
    """Combine reason arrays: the first non-null reason per row wins."""
    return pc.coalesce(*reasons)


def mark_rejected(
    batch: pa.Table, positions: pa.Array, stage: str, reasons: pa.Array, detail: pa.Array | None = None
) -> pa.Table:
    """Set reject columns at ``positions`` (indices into ``batch``) where ``reasons`` is not null."""
    n = batch.num_rows
    full_reason = _scatter(reasons, positions, n)
    hit = pc.is_valid(full_reason)
    if not pc.any(hit).as_py():
        return batch
    batch = _set_column(batch, "reject_reason", pc.coalesce(batch["reject_reason"], full_reason))
    stage_arr = pc.if_else(hit, pa.scalar(stage), pa.scalar(None, pa.string()))
    batch = _set_column(batch, "reject_stage", pc.coalesce(batch["reject_stage"], stage_arr))
    if detail is not None:
        mine = pc.if_else(
            hit, _scatter(detail, positions, n), pa.scalar(None, pa.string())
        )  # rejected rows only
        batch = _set_column(batch, "reject_detail", pc.coalesce(batch["reject_detail"], mine))
    return batch


def _scatter(values: pa.Array, positions: pa.Array, n: int) -> pa.Array:
    """Place ``values`` at ``positions`` of a length-``n`` array of nulls."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if len(positions) == n:
        return values
    # Inverse permutation: index into values for each output slot, null where not active.
    lookup = np.full(n, -1, dtype=np.int64)
    lookup[positions.to_numpy(zero_copy_only=False)] = np.arange(len(positions))
    return values.take(pa.array(lookup, mask=lookup < 0))


def _set_column(batch: pa.Table, name: str, values: pa.Array) -> pa.Table:
    idx = batch.schema.get_field_index(name)
    if idx >= 0:
        return batch.set_column(idx, name, values)
    return batch.append_column(name, values)


# ---------------------------------------------------------------- registry

REGISTRY: dict[str, type[Stage]] = {}


def register(cls: type[Stage]) -> type[Stage]:
    """Class decorator: make a stage available to recipes under ``cls.name``."""
    existing = REGISTRY.get(cls.name)
    if existing is not None and existing.__qualname__ != cls.__qualname__:
        raise ValueError(f"two stages are registered as '{cls.name}': {existing} and {cls}")
    # Subclasses inherit __dataclass_fields__, so always (re)apply dataclass to pick up their own fields.
    cls = dataclass(cls)
    needed = [f.name for f in dataclasses.fields(cls) if f.metadata.get("required")]
    if needed:
        init = cls.__init__

        def __init__(self, *args, **kwargs):
            init(self, *args, **kwargs)
            missing = [n for n in needed if getattr(self, n) in (None, "")]
            if missing:
                raise ValueError(f"{', '.join(missing)}: required (stage '{cls.name}')")

        cls.__init__ = __init__
    REGISTRY[cls.name] = cls
    return cls


def check_reads(stages: list[Stage], pool_source: bool = False) -> tuple[list[str], list[str]]:
    """What each stage reads against what is filled before it: (problems, warnings).

    Readers fill the row's columns except :data:`~curation.schema.STAGE_COLUMNS` (``width``, ``ocr_text``...),
    which only stages write; each stage adds what it writes for the stages after it. A column nothing fills
    before the stage that reads it would reach it as nulls (``image_size`` without ``image_decode`` keeps
    every row), so it is a problem; with a ``pool`` source (which carries whatever its own pipeline wrote) it
    is a warning.
    """
    filled = {f.name for f in ROW_SCHEMA} - set(STAGE_COLUMNS)
    problems: list[str] = []
    warnings: list[str] = []
    for i, stage in enumerate(stages):
        unfilled = [c for c in stage.columns_read() if c not in filled]
        if unfilled:
            what = (
                f"stages.{i} ({stage.label}): reads {', '.join(unfilled)}, which no source fills and no "
                f"stage before it writes"
            )
            writers = sorted({n for n, cls in REGISTRY.items() for c in unfilled if c in cls.writes})
            if pool_source:
                warnings.append(f"{what}: it must come from the pool source")
            else:
                hint = f"add {' or '.join(writers)} before it" if writers else "add the stage that writes it"
                problems.append(f"{what} ({hint})")
        filled.update(stage.columns_written())
    return problems, warnings


def describe(cls: type[Stage]) -> dict[str, Any]:
    """Parameters with defaults, for ``curation stages`` and error messages."""
    out = {}
    for f in dataclasses.fields(cls):
        default = (
            f.default
            if f.default is not dataclasses.MISSING
            else (f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        )
        out[f.name] = dataclasses.asdict(default) if dataclasses.is_dataclass(default) else default
        if f.metadata.get("required"):
            out[f.name] = "(required)"
    return out


# ---------------------------------------------------------------- stage order


def split_at_cuts(stages: list[Stage]) -> tuple[list[Stage], dict[str, list[Stage]]]:
    """The stages of the unit pass, and the stages after each pool-wide cut (up to the next cut).

    A global cut (``keep_fraction``, near-duplicate clusters) is known only once every row has been scored, so
    the unit pass stops at the first such stage; the stages after it run on the rows the cut keeps, shard by
    shard (an expensive VLM judge after DataComp's "top 30%" CLIP cut sees 30% of the rows, not all of them).
    A pure function of the stages: the recipe checks the order with it when it loads (``ValueError`` for an
    indexing stage after a cut), the runner plans its passes with it.
    """
    cuts = [i for i, s in enumerate(stages) if isinstance(s, ScoreFilter) and s.cuts]
    if not cuts:
        return list(stages), {}
    for s in stages[cuts[0] + 1 :]:
        if isinstance(s, IndexedFilter) and s.index_columns:
            raise ValueError(
                f"stage '{s.label}' indexes the whole corpus before filtering it, so it must come before "
                f"'{stages[cuts[0]].label}', whose cut runs after every row is scored: "
                f"move it up the stages list"
            )
    bounds = cuts + [len(stages) - 1]
    return (
        list(stages[: cuts[0] + 1]),
        {stages[c].label: list(stages[c + 1 : nxt + 1]) for c, nxt in zip(cuts, bounds[1:])},
    )
