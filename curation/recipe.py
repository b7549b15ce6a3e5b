"""Pipeline recipes: YAML to validated objects.

A recipe is loaded with ``yaml.safe_load`` (never the full loader: recipes come from other people),
``--set key=value`` overrides are applied to the raw tree, ``${var}`` references are filled from the
``vars`` section, and then everything is validated strictly. Every problem is collected and reported
at once, each naming the file, the key and what was expected, before anything is written.

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

import dataclasses
import hashlib
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from curation.bounds import bounded, fits, out_of_range
from curation.mix.coldstart import FIELD_OPTIONS, MODES, SOURCE_FIELDS
from curation.schema import MODALITIES
from curation.secrets import has_userinfo, redact, redact_tree
from curation.stage import Stage, load_registry

SFT_FORMATS = tuple(SOURCE_FIELDS)  # conversation converters (curation.mix.coldstart): modality sft
FORMATS = ("webdataset", "parquet", "jsonl", "pool", *SFT_FORMATS)
OUTPUT_FORMATS = ("parquet", "webdataset")


class RecipeError(ValueError):
    """A recipe is invalid. ``str()`` lists every problem, one per line (each cut to 500 characters: a
    problem quotes the value it found, which may be a megabyte of text)."""

    def __init__(self, file: str, problems: list[str]):
        self.file = file
        self.problems = problems
        super().__init__(f"invalid recipe {file}:\n" + "\n".join(f"  - {_cut(p)}" for p in problems))


def _cut(text: str, limit: int = 500) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text) - limit:,} more characters)"


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
    # Rejects keep the bytes of media that did not decode or were refused (curation.io.pool.NO_MEDIA): off, since
    # such bytes can be anything (a file a hostile row pointed at); turn on to debug a decoder.
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
class LimitsSpec:
    """How many bytes one piece of input may cost a reader (``limits:``; DESIGN.md, trust boundary). Each is
    checked before the memory is spent (a file's size from the file system, a tar member's from its header,
    a Parquet page's from its header); what is over becomes an ``ingest`` reject with the reason in brackets.
    Tar, JSONL and Parquet files are streamed, so they are bounded per member, line and value, not as wholes.
    """

    # a file read whole: a .json list of records (parsing costs several times its size) [file_too_large]
    max_file_bytes: int = 512 << 20
    # one image or video a row references: held whole while it is decoded; an hour of 1080p H.264 fits
    max_media_bytes: int = 1 << 30  # [file_too_large]
    max_member_bytes: int = 1 << 30  # one tar member: a shard's video is held whole too [member_too_large]
    max_line_bytes: int = 64 << 20  # one JSONL line: inline base64 images stay well under it [line_too_long]
    # one Parquet value, uncompressed: a page (which holds it) over this is never decompressed, so a
    # 33 KB file cannot make a worker inflate a 1 GiB value [value_too_large]
    max_value_bytes: int = 256 << 20

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not 1 <= value <= MAX_LIMIT:
                raise ValueError(f"{f.name} must be between 1 and {MAX_LIMIT:,} bytes, got {value:,}")


MAX_LIMIT = 1 << 40  # a limit above 1 TiB is no limit at all: a typo


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

MAX_VALUES = 100_000  # values in a recipe with its aliases expanded: real recipes hold a few hundred
MAX_DEPTH = 50  # levels of nesting
MAX_CHARS = 1 << 20  # characters of a string after ${var} interpolation


class _SafeLoader(yaml.SafeLoader):
    """``yaml.safe_load``'s loader (plain data only, no Python tags), refusing a key given twice in one
    mapping: YAML keeps the last one silently, so a second ``stages:`` would drop the first."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # <<: *base merges keys: an override there is meant
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)) or key is None:
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping",
                        node.start_mark,
                        f"found the key {key!r} twice",
                        key_node.start_mark,
                    )
                seen.add(key)
        return super().construct_mapping(node, deep)


def _load_text(data: bytes | str) -> Any:
    """Plain data from YAML; raises ``yaml.YAMLError``, or ValueError for nesting Python cannot follow."""
    try:
        return yaml.load(data, Loader=_SafeLoader)  # a SafeLoader: plain data, never Python objects
    except RecursionError:
        raise ValueError(f"nested more deeply than {MAX_DEPTH} levels") from None


def load_yaml(path: str | Path, overrides: list[str] = (), what: str = "a mapping") -> dict[str, Any]:
    """Read a YAML mapping safely, apply ``--set`` overrides and fill ``${var}`` from ``vars``.

    Shared by every recipe kind (pipelines, benchmark registries); raises :class:`RecipeError`. Besides
    bad YAML, it refuses what no recipe needs and a hostile file uses: a key given twice, keys that are not
    strings (``on:``/``yes:`` read as true), aliases that expand past :data:`MAX_VALUES` values ("billion
    laughs") or contain themselves, nesting past :data:`MAX_DEPTH`, and variables that expand without end.
    """
    file = str(path)
    try:
        data = Path(path).read_bytes()  # bytes: YAML detects UTF-8/16 itself and reports bad encodings
    except OSError as e:
        raise RecipeError(file, [f"cannot read the file: {e.strerror}"]) from None
    try:
        raw = _load_text(data)
    except (yaml.YAMLError, ValueError) as e:
        raise RecipeError(file, [f"not valid YAML: {e}"]) from None
    if not isinstance(raw, dict):
        raise RecipeError(file, [f"expected {what}, got {_kind(raw)}"])
    problems: list[str] = []
    for item in overrides:
        _apply_override(raw, item, problems)
    if not problems:
        _check_shape(raw, problems)
    if problems:
        raise RecipeError(file, problems)
    variables = raw.get("vars") or {}
    if not isinstance(variables, dict):
        problems.append(
            f"vars: expected a mapping of names to values, like {{corpus: ./sample}}, got {_kind(variables)}"
        )
        variables = {}
    raw = _interpolate(raw, variables, "", problems)
    _check_credentials(raw, "", problems)
    if problems:
        raise RecipeError(file, problems)
    return raw


def _check_credentials(node: Any, where: str, problems: list[str]) -> None:
    """A problem for each string holding a URI with ``user:password@``: the recipe is copied next to every output
    (and shared), so credentials belong in the environment or a profile. The message masks them."""
    if isinstance(node, (dict, list)):
        for k, v in node.items() if isinstance(node, dict) else enumerate(node):
            _check_credentials(v, f"{where}.{k}".lstrip("."), problems)
    elif isinstance(node, str) and has_userinfo(node):
        problems.append(
            f"{where}: a URI with credentials in it ({redact(node)!r}): put credentials in the "
            "environment or a profile (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE, a "
            "backend's api_key_env), not in the URI"
        )


class _ShapeError(Exception):
    """The problem that ends :func:`_check_shape`'s walk: the rest of the tree cannot be trusted."""


def _check_shape(raw: dict, problems: list[str]) -> None:
    """Problems with the shape of the tree itself (see :func:`load_yaml`); sizes count every use of an alias."""
    sizes: dict[int, int] = {}
    keys: set[str] = set()

    def size(node: Any, where: str, depth: int, inside: set[int]) -> int:
        if not isinstance(node, (dict, list)):
            return 1
        if id(node) in inside:
            raise _ShapeError(
                f"{where or 'the top level'}: an alias (*name) refers to a structure that contains it"
            )
        if id(node) in sizes:
            return sizes[id(node)]
        if depth > MAX_DEPTH:
            raise _ShapeError(f"{where}: nested more deeply than {MAX_DEPTH} levels")
        inside.add(id(node))
        total = 1
        for k, v in node.items() if isinstance(node, dict) else enumerate(node):
            here = f"{where}.{k}".lstrip(".")
            if isinstance(node, dict) and not isinstance(k, str) and here not in keys:
                keys.add(here)
                problems.append(
                    f"{here}: the key {k!r} is not a string (YAML reads yes/no/on/off as booleans, "
                    f"and numbers and dates as such): quote it"
                )
            total += size(v, here, depth + 1, inside)
            if total > MAX_VALUES:
                raise _ShapeError(
                    f"{where or 'the recipe'}: more than {MAX_VALUES:,} values once its aliases "
                    "(*name) are expanded: a recipe needs far fewer (is it an alias bomb?)"
                )
        inside.discard(id(node))
        sizes[id(node)] = total
        return total

    try:
        size(raw, "", 0, set())
    except _ShapeError as e:
        problems.append(str(e))


def check_paths_exist(paths: list[str], where: str, problems: list[str], on_bad_name: str = "error") -> None:
    """One problem per path (local glob or ``s3://`` URI) that matches no file, or holds a file name that is not
    UTF-8 (unless ``on_bad_name`` is ``skip``)."""
    from curation.io.fs import expand

    for j, p in enumerate(paths):
        try:
            if not expand(p, on_bad_name):
                problems.append(
                    f"{where}.{j}: no file matches '{p}' (check the path, "
                    f"or pass --set vars.<name>=... if it comes from a variable)"
                )
        except (OSError, ValueError) as e:  # ValueError: a NUL byte in the path
            problems.append(f"{where}.{j}: cannot list {p!r}: {e}")


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
    _check_credentials(raw, "", problems)
    recipe = _validate(raw, file, problems, check_paths)
    if problems:
        raise RecipeError(file, problems)
    return recipe


def _apply_override(tree: dict, item: str, problems: list[str]) -> None:
    """``a.b.0.c=value``: value is parsed as a YAML scalar/flow (``--set output.formats=[parquet]``)."""
    if "=" not in item:
        problems.append(f"--set {item}: expected key=value, for example --set vars.corpus=/data/sample")
        return
    key, _, value = item.partition("=")
    parts = key.strip().split(".")
    node: Any = tree
    for i, part in enumerate(parts[:-1]):
        nxt = _child(node, part)
        if nxt is None:
            if isinstance(node, dict):
                nxt = node[part] = {}
            else:
                problems.append(f"--set {key}: '{'.'.join(parts[: i + 1])}' does not exist")
                return
        node = nxt
    try:
        parsed = _load_text(value) if value.strip() else ""
    except (yaml.YAMLError, ValueError):
        parsed = value
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            problems.append(f"--set {key}: '{last}' is not an index of a list of {len(node)}")
            return
        node[int(last)] = parsed
    elif isinstance(node, dict):
        node[last] = parsed
    else:
        problems.append(f"--set {key}: '{'.'.join(parts[:-1])}' is a value, not a mapping or list")


def _child(node: Any, part: str) -> Any:
    if isinstance(node, dict):
        return node.get(part)
    if isinstance(node, list) and part.isdigit() and int(part) < len(node):
        return node[int(part)]
    return None


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _interpolate(node: Any, variables: dict, where: str, problems: list[str]) -> Any:
    if isinstance(node, dict):
        return {
            k: (v if k == "vars" else _interpolate(v, variables, f"{where}.{k}".lstrip("."), problems))
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_interpolate(v, variables, f"{where}.{i}", problems) for i, v in enumerate(node)]
    if isinstance(node, str):

        def sub(m: re.Match) -> str:
            if m.group(1) not in variables:
                problems.append(
                    f"{where}: unknown variable ${{{m.group(1)}}} (define it under vars:, "
                    f"or pass --set vars.{m.group(1)}=...)"
                )
                return m.group(0)
            return str(variables[m.group(1)])

        for _ in range(10):  # variables may refer to variables
            names = [m.group(1) for m in _VAR.finditer(node)]
            if len(node) + sum(len(str(variables.get(n, ""))) for n in names) > MAX_CHARS:
                problems.append(
                    f"{where}: its variables expand to more than {MAX_CHARS:,} characters "
                    f"(do they refer to themselves?)"
                )
                return node
            expanded = _VAR.sub(sub, node)
            if expanded == node:
                return node
            node = expanded
        if any(m.group(1) in variables for m in _VAR.finditer(node)):
            problems.append(
                f"{where}: variables refer to each other in a loop (or more than 10 deep): {node[:80]!r}"
            )
        return node
    return node


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
        from curation.runner import split_at_cuts

        try:
            split_at_cuts(stages)
        except ValueError as e:
            problems.append(f"stages: {e}")
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


#: ``sources.<i>.video`` keys: how ingest samples a source's videos (curation.io.video), with their defaults.
VIDEO_OPTIONS: dict[str, Any] = {
    "fps": 1.0,  # frames sampled per second
    "max_frames": 32,  # per video (or per shot): a longer one is sampled evenly over its length
    "max_side": 384,  # longer side of a sampled frame, pixels (before rounding to factor)
    "factor": 28,  # frame sides are multiples of this (14-pixel patches merged 2x2); 1 keeps the exact shape
    "min_pixels": 3136,  # frame area bounds, as the model's smart_resize applies them (4 visual tokens)
    "max_pixels": 602112,  # ... and 768 tokens (the model's per-frame video bound)
    "shots": False,  # split at hard cuts: one row per shot (clip_start/clip_end), frames sampled per shot
    "shot_threshold": 0.07,  # mean absolute frame difference (0..1) that can make a cut
    "shot_contrast": 3.0,  # ... when it is this many times the shot's recent frame differences
    "min_shot_s": 1.0,  # shorter shots join their neighbour
    "timeout_s": 300.0,  # a video whose decoding takes longer is rejected (unreadable_video), not waited on
    "clip": False,  # keep the video in the row (video_bytes): the file, or each shot re-encoded from its cut
    "clip_preset": "veryfast",  # x264 preset for re-encoded shots: ultrafast is 2.5x faster, files 2x larger
}


def frame_bounds(options: dict[str, Any]) -> dict[str, int]:
    """The frame-size keyword arguments of :func:`curation.io.video.sample_frames` from resolved video options."""
    return {k: int(options[k]) for k in ("max_side", "factor", "min_pixels", "max_pixels")}


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
    """``schemes`` from the allow-list the readers support; ``media_roots`` that are folders (or s3:// prefixes)."""
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
    from curation.io.outputs import name_problem

    registry = load_registry()
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


def build(cls: type, raw: Any, where: str, problems: list[str]) -> Any:
    """Instantiate dataclass ``cls`` from a mapping, checking keys and types; None (and a problem) on error."""
    if not isinstance(raw, dict):
        problems.append(f"{where}: expected a mapping, got {_kind(raw)}")
        return None
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    kwargs, ok = {}, True
    for key, value in raw.items():
        if key not in fields:
            problems.append(f"{where}.{key}: unknown key (expected one of {', '.join(sorted(fields))})")
            ok = False
            continue
        hint = hints[key]
        if dataclasses.is_dataclass(
            hint
        ):  # nested parameters (resources, match thresholds), checked the same way
            res = build(hint, value, f"{where}.{key}", problems)
            ok &= res is not None
            kwargs[key] = res
            continue
        converted, err = _check_type(value, hint)
        if err:
            problems.append(f"{where}.{key}: expected {err}, got {_kind(value)} {value!r}")
            ok = False
        elif "range" in fields[key].metadata and isinstance(converted, (int, float)):
            if expected := out_of_range(converted, *fields[key].metadata["range"]):
                problems.append(f"{where}.{key}: expected {expected}, got {value!r}")
                ok = False
        kwargs[key] = converted
    for name, f in fields.items():
        if name not in raw and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            problems.append(f"{where}.{name}: required key is missing")
            ok = False
    if not ok:
        return None
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        problems.append(f"{where}: {e}")
        return None


def _check_type(value: Any, hint: Any) -> tuple[Any, str | None]:
    """Return (value converted, None) or (value, description of what was expected)."""
    if not fits(value):  # whatever the type: no integer past 64 bits, no .inf or .nan (curation.bounds)
        return value, "64-bit integers and finite numbers" if isinstance(value, (dict, list)) else (
            "a finite number" if isinstance(value, float) else "an integer of at most 64 bits"
        )
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None, None
        errs = []
        for a in args:
            if a is type(None):
                continue
            v, err = _check_type(value, a)
            if err is None:
                return v, None
            errs.append(err)
        return value, " or ".join(errs)
    if hint is Any:
        return value, None
    if hint is bool:
        return (value, None) if isinstance(value, bool) else (value, "true or false")
    if hint is int:
        return (
            (value, None) if isinstance(value, int) and not isinstance(value, bool) else (value, "an integer")
        )
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value), None
        return value, "a number"
    if hint is str:
        return (value, None) if isinstance(value, str) else (value, "a string")
    if origin is list:
        (item,) = args or (Any,)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]  # a single item where a list is expected: accept it
        if not isinstance(value, list):
            return value, f"a list of {_hint_name(item)}"
        out = []
        for v in value:
            cv, err = _check_type(v, item)
            if err:
                return value, f"a list of {_hint_name(item)}"
            out.append(cv)
        return out, None
    if origin is dict:
        kt, vt = args or (Any, Any)
        if not isinstance(value, dict):
            return value, "a mapping"
        for v in value.values():
            if _check_type(v, vt)[1]:
                return value, f"a mapping of {_hint_name(vt)}"
        return value, None
    return value, None


def _hint_name(hint: Any) -> str:
    return {str: "strings", int: "integers", float: "numbers", bool: "booleans"}.get(hint, str(hint))


def _kind(value: Any) -> str:
    return {
        dict: "a mapping",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        type(None): "nothing",
    }.get(type(value), type(value).__name__)
