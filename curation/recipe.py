"""Pipeline recipes: YAML to validated objects.

A recipe is loaded as every recipe kind is (:mod:`curation.spec`: safe YAML, ``--set key=value``
overrides, ``${var}`` references filled from the ``vars`` section), and then validated strictly: sources,
stages (from the registry of :mod:`curation.filters`), output and execution. Every problem is collected
and reported at once, each naming the file, the key and what was expected, before anything is written.

Example::

    name: demo
    vars: {corpus: ./sample, out: ./pools/demo}
    sources:
      - {name: pairs, format: webdataset, modality: image_text, paths: ["${corpus}/image_text/wds/*.tar"]}
    stages:
      - image_decode: {}
      - image_size: {min_side: 32}
    output: {path: "${out}", formats: [parquet, webdataset]}
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from curation.bounds import bounded, out_of_range
from curation.io.conversations import FIELD_OPTIONS, SOURCE_FIELDS
from curation.schema import MODALITIES
from curation.secrets import redact_tree
from curation.spec import LimitsSpec, RecipeError, build, check_credentials, check_paths_exist, load_yaml
from curation.stage import Stage, check_reads, split_at_cuts
from curation.target.chat import MODES
from curation.target.video import VIDEO_OPTIONS

SFT_FORMATS = tuple(SOURCE_FIELDS)  # conversation converters (curation.io.conversations): modality sft
FORMATS = ("webdataset", "parquet", "jsonl", "pool", *SFT_FORMATS)
OUTPUT_FORMATS = ("parquet", "webdataset")

log = logging.getLogger(__name__)


@dataclass
class SourceSpec:
    name: str
    format: str
    modality: str
    paths: list[str]
    fields: dict[str, str] = field(default_factory=dict)
    on_bad_text: str = "reject"  # reject | replace
    on_bad_name: str = "error"  # a file name that is not UTF-8 in the source's folders: error | skip (logged)
    mode: str | None = None  # sft: the cold-start mode of records that carry none (default: inferred)
    video: dict[str, Any] = field(default_factory=dict)  # frame sampling and shot splitting (VIDEO_OPTIONS)
    # Where media references in rows may point (curation.io.refs): the folder of the file holding the row,
    # these folders or s3:// prefixes, and fields.image_root; absolute paths and full URIs in rows only with
    # allow_absolute; remote schemes rows may name.
    media_roots: list[str] = field(default_factory=list)
    allow_absolute: bool = False
    schemes: list[str] = field(default_factory=lambda: ["s3"])


@dataclass
class OutputSpec:
    path: str
    formats: list[str] = field(default_factory=lambda: list(OUTPUT_FORMATS))
    shard_rows: int = bounded(10_000, 1, 10_000_000)
    shard_bytes: int = bounded(1 << 30, 1 << 20, 64 << 30)  # 1 MiB to 64 GiB
    write_rejects: bool = True
    # Rejects keep the bytes of media that did not decode or were refused (curation.io.pool.NO_MEDIA): off,
    # since such bytes can be anything (a file a hostile row pointed at); turn on to debug a decoder.
    reject_media: bool = False
    report: bool = True
    # What video rows carry: frames (JPEG, with frame_ts), clip (the video's bytes, with frame_ts: needs
    # video: {clip: true} on the sources) or both; auto: both where sources keep clips, else frames.
    video: str = "auto"


@dataclass
class ExecutionSpec:
    batch_rows: int = bounded(256, 1, 1_000_000)  # rows per stage call: bounds worker memory
    unit_rows: int = bounded(
        20_000, 1, 100_000_000
    )  # Parquet inputs are split into units of at most this many rows
    num_workers: int | None = bounded(None, 1, 100_000)  # default: the cluster's CPUs
    num_cpus: int | None = bounded(None, 1, 100_000)  # local Ray only: CPUs to start it with (default: all)
    # Rows of index columns one task holds while building a global index that splits by id (exact dedup):
    # bounds that task's memory, whatever the corpus size (about 0.5 KiB a row at its peak).
    index_partition_rows: int = bounded(250_000, 1, 100_000_000)


@dataclass
class PipelineRecipe:
    name: str
    sources: list[SourceSpec]
    stages: list[Stage]
    output: OutputSpec
    execution: ExecutionSpec
    file: str
    resolved: dict[str, Any]  # the recipe after overrides and interpolation, as written next to outputs
    limits: LimitsSpec = field(default_factory=LimitsSpec)

    @property
    def hash(self) -> str:
        return recipe_hash(self.resolved)


def recipe_hash(resolved: dict[str, Any]) -> str:
    """Hash of what determines the pool's content: sources, stages and output layout.

    Execution settings and the output folder are left out, so the same recipe run on a laptop or a
    cluster, into any folder, carries the same hash (and writes the same bytes).
    """
    keyed = {k: v for k, v in resolved.items() if k not in ("execution", "vars", "name")}
    keyed["output"] = {k: v for k, v in keyed.get("output", {}).items() if k != "path"}
    blob = json.dumps(keyed, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ---------------------------------------------------------------- loading


def load_pipeline(path: str | Path, overrides: list[str] = (), check_paths: bool = True) -> PipelineRecipe:
    """Load, override, interpolate and validate a pipeline recipe; raise :class:`RecipeError`."""
    file = str(path)
    return pipeline_from_dict(
        load_yaml(path, overrides, "a mapping with sources, stages and output"), file, check_paths
    )


def pipeline_from_dict(
    raw: dict[str, Any], file: str = "<recipe>", check_paths: bool = True
) -> PipelineRecipe:
    """Validate a pipeline given as a mapping (commands such as ``curation audit`` compose one)."""
    problems: list[str] = []
    check_credentials(raw, "", problems)
    recipe = _validate(raw, file, problems, check_paths)
    if problems:
        raise RecipeError(file, problems)
    return recipe


# ---------------------------------------------------------------- validation

_TOP_KEYS = {"name", "vars", "sources", "stages", "output", "execution", "limits"}


def _validate(raw: dict, file: str, problems: list[str], check_paths: bool) -> PipelineRecipe:
    for key in raw:
        if key not in _TOP_KEYS:
            problems.append(f"{key}: unknown key (expected one of {', '.join(sorted(_TOP_KEYS))})")
    sources = []
    raw_sources = raw.get("sources")
    if not isinstance(raw_sources, list) or not raw_sources:
        problems.append("sources: expected a non-empty list of sources")
        raw_sources = []
    seen_names: set[str] = set()
    for i, s in enumerate(raw_sources):
        spec = build(SourceSpec, s, f"sources.{i}", problems)
        if spec is None:
            continue
        if spec.name in seen_names:
            problems.append(f"sources.{i}.name: '{spec.name}' is used twice; source names must be unique")
        seen_names.add(spec.name)
        if spec.format not in FORMATS:
            problems.append(
                f"sources.{i}.format: '{spec.format}' is not a format (expected one of {', '.join(FORMATS)})"
            )
        if spec.modality not in MODALITIES and not (spec.format == "pool" and spec.modality == "mixed"):
            problems.append(
                f"sources.{i}.modality: '{spec.modality}' (expected one of {', '.join(MODALITIES)})"
            )
        _check_sft_source(spec, f"sources.{i}", problems)
        _check_video_options(spec, f"sources.{i}.video", problems)
        _check_references(spec, f"sources.{i}", problems, check_paths)
        if spec.on_bad_text not in ("reject", "replace"):
            problems.append(f"sources.{i}.on_bad_text: '{spec.on_bad_text}' (expected reject or replace)")
        if spec.on_bad_name not in ("error", "skip"):
            problems.append(f"sources.{i}.on_bad_name: '{spec.on_bad_name}' (expected error or skip)")
        elif check_paths:
            check_paths_exist(spec.paths, f"sources.{i}.paths", problems, spec.on_bad_name)
        sources.append(spec)

    stages = _build_stages(raw.get("stages"), problems)
    if stages:
        try:
            split_at_cuts(stages)
        except ValueError as e:
            problems.append(f"stages: {e}")
    if stages:
        unfilled, maybe = check_reads(stages, pool_source=any(s.format == "pool" for s in sources))
        problems += unfilled
        for warning in maybe:
            log.warning("%s: %s", file, warning)
    output = build(OutputSpec, raw.get("output"), "output", problems)
    if output is not None:
        for fmt in output.formats:
            if fmt not in OUTPUT_FORMATS:
                problems.append(f"output.formats: '{fmt}' (expected a list of {', '.join(OUTPUT_FORMATS)})")
        if "://" in output.path and not output.path.startswith(("s3://", "file://")):
            problems.append(
                f"output.path: '{output.path.split('://', 1)[0]}://' is not a place to write (expected a "
                f"local folder or s3://bucket/prefix)"
            )
        if output.video not in ("auto", "frames", "clip", "both"):
            problems.append(f"output.video: {output.video!r} (expected frames, clip, both or auto)")
        elif output.video == "clip":
            frames_only = [
                s.name for s in sources if s.modality == "video" and not (s.video or {}).get("clip")
            ]
            if frames_only:
                problems.append(
                    f"output.video: clip keeps no frames, but source(s) {', '.join(frames_only)} keep no "
                    "clip: add video: {clip: true} to them, or use output.video: both"
                )
    execution = build(ExecutionSpec, raw.get("execution") or {}, "execution", problems)
    limits = build(LimitsSpec, raw.get("limits") or {}, "limits", problems)
    resolved = redact_tree(
        json.loads(json.dumps(raw, default=str))
    )  # written next to outputs: no credentials
    return PipelineRecipe(
        name=str(raw.get("name") or Path(file).stem),
        sources=sources,
        stages=stages,
        output=output,  # type: ignore[arg-type]
        execution=execution,  # type: ignore[arg-type]
        limits=limits,  # type: ignore[arg-type]
        file=file,
        resolved=resolved,
    )


#: Largest value of each numeric video option: past these a source would decode for days or hold frames in the
#: gigabytes (``max_frames: 1e12``, ``fps: 1e9``), which is never what a recipe meant.
VIDEO_LIMITS: dict[str, float] = {
    "fps": 240,
    "max_frames": 10_000,
    "max_side": 16_384,
    "factor": 1_024,
    "min_pixels": 1 << 28,
    "max_pixels": 1 << 28,
    "shot_threshold": 1,
    "shot_contrast": 1_000,
    "min_shot_s": 86_400,
    "timeout_s": 86_400,
}

X264_PRESETS = (
    "ultrafast",
    "superfast",
    "veryfast",
    "faster",
    "fast",
    "medium",
    "slow",
    "slower",
    "veryslow",
)


def _check_video_options(spec: SourceSpec, where: str, problems: list[str]) -> None:
    if not isinstance(spec.video, dict):
        problems.append(f"{where}: expected a mapping of {', '.join(VIDEO_OPTIONS)}")
        return
    if spec.video and spec.modality not in ("video", "sft"):
        problems.append(f"{where}: applies to video sources (modality video or sft), not {spec.modality}")
    for key, value in spec.video.items():
        if key not in VIDEO_OPTIONS:
            problems.append(f"{where}.{key}: unknown key (expected one of {', '.join(VIDEO_OPTIONS)})")
        elif isinstance(VIDEO_OPTIONS[key], bool):
            if not isinstance(value, bool):
                problems.append(f"{where}.{key}: expected true or false, got {value!r}")
        elif key == "clip_preset":
            if value not in X264_PRESETS:
                problems.append(f"{where}.{key}: expected one of {', '.join(X264_PRESETS)}, got {value!r}")
        elif (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or value < 0
            or (value == 0 and key != "min_shot_s")
        ):
            problems.append(f"{where}.{key}: expected a positive number, got {value!r}")
        elif expected := out_of_range(value, 0, VIDEO_LIMITS[key]):
            problems.append(f"{where}.{key}: expected {expected}, got {value!r}")
        elif key in ("max_side", "factor", "min_pixels", "max_pixels", "max_frames") and value != int(value):
            problems.append(f"{where}.{key}: expected a whole number, got {value!r}")
    o = {**VIDEO_OPTIONS, **{k: v for k, v in spec.video.items() if k in VIDEO_OPTIONS}}
    if (
        all(isinstance(o[k], (int, float)) for k in ("min_pixels", "max_pixels"))
        and o["min_pixels"] > o["max_pixels"]
    ):
        problems.append(f"{where}: min_pixels ({o['min_pixels']}) is above max_pixels ({o['max_pixels']})")
    if spec.video.get("shots") and spec.modality != "video":
        problems.append(f"{where}.shots: shot splitting applies to modality video")


def _check_references(spec: SourceSpec, where: str, problems: list[str], check_paths: bool) -> None:
    """``schemes`` from the allow-list the readers support; ``media_roots`` that are folders (or s3://
    prefixes)."""
    from curation.io.refs import SCHEMES

    for scheme in spec.schemes:
        if scheme not in SCHEMES:
            problems.append(
                f"{where}.schemes: '{scheme}' is not a scheme rows may name (expected a list of "
                f"{', '.join(SCHEMES)}; file:// and schemes whose file systems take options from "
                f"the URI are never allowed)"
            )
    for j, root in enumerate(spec.media_roots):
        if "://" in root and not root.startswith(("s3://", "file://")):
            problems.append(
                f"{where}.media_roots.{j}: '{root}' is neither a local folder nor an s3:// prefix"
            )
        elif check_paths and "://" not in root and not Path(root).expanduser().is_dir():
            problems.append(f"{where}.media_roots.{j}: no folder '{root}'")


def _check_sft_source(spec: SourceSpec, where: str, problems: list[str]) -> None:
    """Conversations come from the sft formats (or a pool); those formats make nothing but sft rows."""
    if spec.format in SFT_FORMATS and spec.modality != "sft":
        problems.append(f"{where}.modality: format {spec.format} makes conversations: use modality: sft")
    if spec.modality == "sft" and spec.format not in (*SFT_FORMATS, "pool"):
        problems.append(
            f"{where}.format: modality sft is read with format {' or '.join(SFT_FORMATS)} "
            f"(or pool, for rows already in the pool schema), not {spec.format}"
        )
    if spec.mode is not None and (spec.modality != "sft" or spec.mode not in MODES):
        problems.append(f"{where}.mode: '{spec.mode}' (expected one of {', '.join(MODES)}, on an sft source)")
    if spec.format in SFT_FORMATS:
        known = (*SOURCE_FIELDS[spec.format], *FIELD_OPTIONS)
        for key in spec.fields:
            if key not in known:
                problems.append(
                    f"{where}.fields.{key}: unknown field for format {spec.format} "
                    f"(expected one of {', '.join(known)})"
                )


def _build_stages(raw_stages: Any, problems: list[str]) -> list[Stage]:
    from curation.filters import registry as stage_registry
    from curation.io.outputs import name_problem

    registry = stage_registry()
    if not isinstance(raw_stages, list):
        problems.append("stages: expected a list like [- image_decode: {}, - image_size: {min_side: 32}]")
        return []
    stages, labels = [], set()
    for i, entry in enumerate(raw_stages):
        if isinstance(entry, str):
            entry = {entry: {}}
        if not isinstance(entry, dict) or len(entry) != 1:
            problems.append(
                f"stages.{i}: expected a mapping with one stage name, like '- image_size: {{min_side: 32}}'"
            )
            continue
        ((name, params),) = entry.items()
        cls = registry.get(name)
        if cls is None:
            problems.append(
                f"stages.{i}: unknown stage '{name}' (known: {', '.join(sorted(registry))}; "
                f"`curation stages` lists them with their parameters)"
            )
            continue
        stage = build(cls, params if params is not None else {}, f"stages.{i}.{name}", problems)
        if stage is None:
            continue
        kf = getattr(stage, "keep_fraction", None)
        if kf is not None and not getattr(stage, "ranks", False):
            problems.append(
                f"stages.{i}.{name}.keep_fraction: '{name}' scores are not a quality ranking; keep_fraction "
                f"applies to stages whose higher score is better (e.g. clip_score, caption_language)"
            )
        elif kf is not None and not 0 < kf <= 1:
            problems.append(f"stages.{i}.{name}.keep_fraction: expected a fraction in (0, 1], got {kf:g}")
        label_problem = name_problem(stage.label, f"stages.{i}.{name}.instance")  # it names files in the pool
        if label_problem:
            problems.append(label_problem)
        if stage.label in labels:
            problems.append(
                f"stages.{i}.{name}: a second '{stage.label}' needs its own name: add instance: <name>"
            )
        labels.add(stage.label)
        stages.append(stage)
    return stages
