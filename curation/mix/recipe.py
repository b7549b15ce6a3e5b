"""Mixture recipes: YAML to validated objects (``curation mix mixtures/NAME.yaml``).

A mixture recipe names pools (folders written by ``curation run``), how to count tokens (the model's
tokenizer and vision settings), and one or more mixtures, each with a budget and the sources that
share it. Loading is as strict as for pipelines (:mod:`curation.spec`): every problem is reported at
once, naming the file and key, before anything is read or written.

Example::

    name: stage2
    vars: {pools: ./pools, out: ./mixtures-out, tokenizer: /models/Keye-VL-8B}
    pools: {demo: "${pools}/demo"}
    tokenizer: ${tokenizer}
    markup: {per_row: 1, per_message: 5, per_image: 2, per_video: 2}   # template tokens no column holds
    seed: 0
    output: {path: "${out}", formats: [parquet, webdataset]}
    mixtures:
      stage2:
        budget: 2M                       # tokens; 2M = 2,000,000; or "auto": as much as the pools give
        sources:
          captions: {pool: demo, modality: image_text, weight: 0.6}
          text:     {pool: demo, modality: text, weight: 0.4, upsample: true, max_epochs: 3}

A source selects rows of its pool by ``modality``, ``mode`` and a ``where`` predicate (polars SQL over
the pool's columns, e.g. ``"score_caption_language > 0.9"``), all of which must hold. It takes either a
``weight`` (its share of the mixture's budget, after sources with their own ``budget``) or a ``budget``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from curation.bounds import bounded, fits
from curation.io.outputs import name_problem
from curation.mix.tokens import Markup
from curation.recipe import OUTPUT_FORMATS
from curation.schema import MODALITIES
from curation.secrets import redact_tree
from curation.spec import RecipeError, build, load_yaml
from curation.target.chat import MODES
from curation.target.geometry import VisionConfig

UNITS = ("tokens", "rows")
WEIGHT_TOLERANCE = 1e-6
_SUFFIX = {"k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}
MAX_AMOUNT = 10**15  # tokens or rows: a thousand times the largest training runs, and far inside 64 bits
_AMOUNT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMbBgGtT]?)\s*$")


@dataclass
class MixSource:
    """One source of a mixture: which rows of which pool, and how much of them."""

    pool: str
    modality: list[str] = field(default_factory=list)  # any of these modalities (empty: all)
    mode: list[str] = field(default_factory=list)  # any of these cold-start modes (empty: all)
    where: str | None = None  # polars SQL predicate over the pool's columns
    weight: float | None = bounded(None, 0, 1)  # share of the mixture budget left after sources with a budget
    budget: Any = None  # tokens (or rows, with unit: rows); int or "20M"
    upsample: bool = False  # may rows repeat when the pool holds less than the share?
    max_epochs: float = bounded(4.0, 1, 1_000)  # with upsample: at most this many passes over the source
    prefer: str | None = None  # numeric column: take the highest first (annealing on the best rows)


@dataclass
class Mixture:
    name: str
    budget: int | None  # None: "auto", as much as the pools give at the sources' proportions
    unit: str
    sources: dict[str, MixSource]


@dataclass
class MixOutput:
    path: str
    formats: list[str] = field(default_factory=lambda: list(OUTPUT_FORMATS))
    shard_rows: int = bounded(5000, 1, 10_000_000)
    report: bool = True


@dataclass
class MixExecution:
    batch_rows: int = bounded(2048, 1, 1_000_000)  # rows per token-counting batch
    num_workers: int | None = bounded(None, 1, 100_000)  # default: the cluster's CPUs
    num_cpus: int | None = bounded(None, 1, 100_000)  # local Ray only


@dataclass
class MixRecipe:
    name: str
    pools: dict[str, str]
    tokenizer: str
    allow_download: bool
    vision: VisionConfig
    markup: Markup
    seed: int
    mixtures: list[Mixture]
    output: MixOutput
    execution: MixExecution
    file: str
    resolved: dict[str, Any]

    @property
    def hash(self) -> str:
        """What determines the bytes: everything but the output folder, execution settings and vars."""
        keyed = {k: v for k, v in self.resolved.items() if k not in ("execution", "vars", "name")}
        keyed["output"] = {k: v for k, v in keyed.get("output", {}).items() if k != "path"}
        blob = json.dumps(keyed, sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def parse_amount(value: Any) -> int | None:
    """``2000000``, ``"2M"``, ``"1.5B"``, ``"330k"`` -> int (powers of 1000); None if it is not one, or is
    past :data:`MAX_AMOUNT`."""
    amount = _amount(value)
    return amount if amount is None or amount <= MAX_AMOUNT else None


def _amount(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        m = _AMOUNT.match(value.replace("_", "").replace(",", ""))
        if m:
            try:
                return round(float(m.group(1)) * _SUFFIX.get(m.group(2).lower(), 1))
            except OverflowError:  # more digits than a float holds: no budget is that large
                return None
    return None


_TOP_KEYS = {
    "name",
    "vars",
    "pools",
    "tokenizer",
    "allow_download",
    "vision",
    "markup",
    "seed",
    "mixtures",
    "output",
    "execution",
}
_MIXTURE_KEYS = {"budget", "unit", "sources"}


def load_mix_recipe(path: str | Path, overrides: list[str] = ()) -> MixRecipe:
    """Load, override, interpolate and validate a mixture recipe; raise :class:`RecipeError`."""
    file = str(path)
    return mix_recipe_from_dict(
        load_yaml(path, overrides, "a mapping with pools, tokenizer and mixtures"), file
    )


def mix_recipe_from_dict(raw: dict[str, Any], file: str = "<mixture recipe>") -> MixRecipe:
    problems: list[str] = []
    for key in raw:
        if key not in _TOP_KEYS:
            problems.append(f"{key}: unknown key (expected one of {', '.join(sorted(_TOP_KEYS))})")

    pools = raw.get("pools")
    if not isinstance(pools, dict) or not pools:
        problems.append("pools: expected a mapping of pool names to folders, e.g. {demo: ./pools/demo}")
        pools = {}
    for name, where in pools.items():
        if not isinstance(where, str) or not where:
            problems.append(f"pools.{name}: expected the folder of a pool (local or s3://), got {where!r}")

    tokenizer = raw.get("tokenizer")
    if not isinstance(tokenizer, str) or not tokenizer:
        problems.append(
            "tokenizer: required: a tokenizer.json, a folder holding one, or a Hugging Face name "
            "(with allow_download: true)"
        )
    allow_download = raw.get("allow_download", False)
    if not isinstance(allow_download, bool):
        problems.append(f"allow_download: expected true or false, got {allow_download!r}")
    vision = build(VisionConfig, raw.get("vision") or {}, "vision", problems)
    for key, value in dataclasses.asdict(vision or VisionConfig()).items():
        if not value > 0:  # token counts divide by these
            problems.append(f"vision.{key}: expected a positive number, got {value!r}")
    markup = build(Markup, raw.get("markup") or {}, "markup", problems)
    for key, value in dataclasses.asdict(markup or Markup()).items():
        if value < 0:
            problems.append(f"markup.{key}: expected a number of tokens (0 or more), got {value!r}")
    seed = raw.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool) or not fits(seed):
        problems.append(f"seed: expected an integer of at most 64 bits, got {seed!r}")

    output = build(MixOutput, raw.get("output"), "output", problems)
    if output is not None:
        for fmt in output.formats:
            if fmt not in OUTPUT_FORMATS:
                problems.append(f"output.formats: '{fmt}' (expected a list of {', '.join(OUTPUT_FORMATS)})")
        if not output.formats:
            problems.append("output.formats: expected at least one of parquet, webdataset")
        if output.shard_rows < 1:
            problems.append("output.shard_rows: expected a positive integer")
    execution = build(MixExecution, raw.get("execution") or {}, "execution", problems)

    mixtures = []
    raw_mixtures = raw.get("mixtures")
    if not isinstance(raw_mixtures, dict) or not raw_mixtures:
        problems.append("mixtures: expected a mapping of mixture names to {budget, sources}")
        raw_mixtures = {}
    for name, spec in raw_mixtures.items():
        mix = _mixture(str(name), spec, pools, problems)
        if mix is not None:
            mixtures.append(mix)
    if problems:
        raise RecipeError(file, problems)
    return MixRecipe(
        name=str(raw.get("name") or Path(file).stem),
        pools=dict(pools),
        tokenizer=tokenizer,
        allow_download=allow_download,
        vision=vision,
        markup=markup,
        seed=seed,
        mixtures=mixtures,
        output=output,
        execution=execution,
        file=file,
        resolved=redact_tree(json.loads(json.dumps(raw, default=str))),
    )


def _mixture(name: str, spec: Any, pools: dict, problems: list[str]) -> Mixture | None:
    where = f"mixtures.{name}"
    if problem := name_problem(name, where):  # the mixture's folder: '..' would be output.path's parent
        problems.append(problem)
    if not isinstance(spec, dict):
        problems.append(f"{where}: expected a mapping with budget and sources")
        return None
    n_before = len(problems)
    for key in spec:
        if key not in _MIXTURE_KEYS:
            problems.append(
                f"{where}.{key}: unknown key (expected one of {', '.join(sorted(_MIXTURE_KEYS))})"
            )
    unit = spec.get("unit", "tokens")
    if unit not in UNITS:
        problems.append(f"{where}.unit: '{unit}' (expected tokens or rows)")
    raw_budget = spec.get("budget", "auto")
    budget = None if raw_budget == "auto" else parse_amount(raw_budget)
    if raw_budget != "auto" and (budget is None or budget <= 0):
        problems.append(
            f"{where}.budget: expected a positive number of {unit} (like 2000000 or 2M) or auto, "
            f"got {raw_budget!r}"
        )
    raw_sources = spec.get("sources")
    if not isinstance(raw_sources, dict) or not raw_sources:
        problems.append(
            f"{where}.sources: expected a mapping of source names to {{pool, weight or budget, ...}}"
        )
        return None
    sources: dict[str, MixSource] = {}
    for sname, sspec in raw_sources.items():
        src = _source(f"{where}.sources.{sname}", sspec, pools, problems)
        if src is not None:
            sources[str(sname)] = src
    if len(problems) > n_before:
        return None

    weighted = {k: s for k, s in sources.items() if s.weight is not None}
    fixed = {k: s for k, s in sources.items() if s.budget is not None}
    if weighted:
        total = sum(s.weight for s in weighted.values())
        if abs(total - 1.0) > WEIGHT_TOLERANCE:
            parts = " + ".join(f"{k} {s.weight:g}" for k, s in weighted.items())
            problems.append(
                f"{where}.sources: weights sum to {total:g} ({parts}); they must sum to 1 "
                f"(they share what the budget leaves after sources with their own budget)"
            )
    if budget is None and weighted and fixed:
        problems.append(
            f"{where}: with budget: auto, give every source a weight or every source a budget "
            f"(weighted: {', '.join(weighted)}; budgeted: {', '.join(fixed)})"
        )
    if budget is not None:
        taken = sum(s.budget for s in fixed.values())
        if taken > budget:
            problems.append(
                f"{where}.budget: {budget:,} {unit} is less than the sources' own budgets "
                f"({taken:,}: {', '.join(f'{k} {s.budget:,}' for k, s in fixed.items())})"
            )
        elif weighted and taken == budget:
            problems.append(
                f"{where}.budget: the sources' own budgets use all {budget:,} {unit}, leaving "
                f"nothing for the weighted sources ({', '.join(weighted)})"
            )
        elif not weighted and taken != budget:
            problems.append(
                f"{where}.budget: {budget:,} {unit} but the sources' budgets add up to {taken:,}; "
                f"make them agree, add a weighted source, or leave out budget"
            )
    elif not weighted and not fixed:
        problems.append(f"{where}.sources: give each source a weight or a budget")
    return Mixture(name=name, budget=budget if raw_budget != "auto" else None, unit=unit, sources=sources)


def _source(where: str, spec: Any, pools: dict, problems: list[str]) -> MixSource | None:
    if isinstance(spec, dict):
        spec = dict(spec)
        for key in ("modality", "mode"):  # one value where a list is expected
            if isinstance(spec.get(key), str):
                spec[key] = [spec[key]]
    src = build(MixSource, spec, where, problems)
    if src is None:
        return None
    ok = True
    if src.pool not in pools:
        problems.append(f"{where}.pool: unknown pool '{src.pool}' (pools: {', '.join(pools) or 'none'})")
        ok = False
    for m in src.modality:
        if m not in MODALITIES:
            problems.append(
                f"{where}.modality: unknown modality '{m}' (expected any of {', '.join(MODALITIES)})"
            )
            ok = False
    for m in src.mode:
        if m not in MODES:
            problems.append(f"{where}.mode: unknown mode '{m}' (expected any of {', '.join(MODES)})")
            ok = False
    if (src.weight is None) == (src.budget is None):
        problems.append(f"{where}: give exactly one of weight (a share of the mixture) or budget (an amount)")
        ok = False
    if src.weight is not None and not src.weight > 0:
        problems.append(f"{where}.weight: expected a positive share, got {src.weight:g}")
        ok = False
    if src.budget is not None:
        amount = parse_amount(src.budget)
        if amount is None or amount <= 0:
            problems.append(
                f"{where}.budget: expected a positive amount like 330000 or 330k, got {src.budget!r}"
            )
            ok = False
        src.budget = amount
    if src.where is not None:
        import polars as pl

        try:
            pl.sql_expr(src.where)
        except Exception as e:  # noqa: BLE001 - polars raises several kinds for bad SQL
            problems.append(
                f"{where}.where: not a valid SQL predicate ({str(e).splitlines()[0]}): {src.where!r}"
            )
            ok = False
    return src if ok else None


def resolved_source(src: MixSource) -> dict[str, Any]:
    """A source as written to manifests."""
    return {k: v for k, v in dataclasses.asdict(src).items() if v not in (None, [], False) or k == "upsample"}
