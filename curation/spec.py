"""YAML to validated dataclasses: what every recipe kind shares (pipelines, mixtures, benchmark registries,
the trainer's config).

A file is loaded with a safe loader (plain data only: recipes come from other people), ``--set key=value``
overrides are applied to the raw tree, ``${var}`` references are filled from the ``vars`` section
(:func:`load_yaml`), and :func:`build` turns each mapping into a dataclass, checking every key and type.
Problems are collected, not raised one by one, so :class:`RecipeError` reports them all at once, each naming
the file, the key and what was expected.

Example::

    @dataclass
    class BenchmarkSpec:
        name: str
        paths: list[str]

    raw = load_yaml("benchmarks.yaml", ["vars.corpus=/data"])
    problems: list[str] = []
    specs = [build(BenchmarkSpec, b, f"benchmarks.{i}", problems) for i, b in enumerate(raw["benchmarks"])]
    if problems:
        raise RecipeError("benchmarks.yaml", problems)

It sits below the readers, the filters and the benchmark registry that use it, so it imports nothing of the
package but :mod:`curation.bounds` and :mod:`curation.secrets` (and :mod:`curation.io.fs` to check paths).
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from curation.bounds import fits, out_of_range
from curation.secrets import has_userinfo, redact


class RecipeError(ValueError):
    """A recipe is invalid. ``str()`` lists every problem, one per line (each cut to 500 characters: a
    problem quotes the value it found, which may be a megabyte of text)."""

    def __init__(self, file: str, problems: list[str]):
        self.file = file
        self.problems = problems
        super().__init__(f"invalid recipe {file}:\n" + "\n".join(f"  - {_cut(p)}" for p in problems))


def _cut(text: str, limit: int = 500) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text) - limit:,} more characters)"


# ---------------------------------------------------------------- limits
# A pipeline recipe's ``limits:`` section lives here, below the recipe that carries it, because the readers
# and the benchmark registry (curation.dedup.registry, which the filters use) bound their reads with it.


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
        apply_override(raw, item, problems)
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
    check_credentials(raw, "", problems)
    if problems:
        raise RecipeError(file, problems)
    return raw


def check_credentials(node: Any, where: str, problems: list[str]) -> None:
    """A problem for each string holding a URI with ``user:password@``: the recipe is copied next to every
    output (and shared), so credentials belong in the environment or a profile. The message masks them."""
    if isinstance(node, (dict, list)):
        for k, v in node.items() if isinstance(node, dict) else enumerate(node):
            check_credentials(v, f"{where}.{k}".lstrip("."), problems)
    elif isinstance(node, str) and has_userinfo(node):
        problems.append(
            f"{where}: a URI with credentials in it ({redact(node)!r}): put credentials in the "
            "environment or a profile (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE, a "
            "backend's api_key_env), not in the URI"
        )


class _ShapeError(Exception):
    """The problem that ends :func:`_check_shape`'s walk: the rest of the tree cannot be trusted."""


def _check_shape(raw: dict, problems: list[str]) -> None:
    """Problems with the shape of the tree itself (see :func:`load_yaml`); sizes count every use of an
    alias."""
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
    """One problem per path (local glob or ``s3://`` URI) that matches no file, or holds a file name that is
    not UTF-8 (unless ``on_bad_name`` is ``skip``)."""
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


def apply_override(tree: dict, item: str, problems: list[str]) -> None:
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


# ---------------------------------------------------------------- building


def build(cls: type, raw: Any, where: str, problems: list[str]) -> Any:
    """Instantiate dataclass ``cls`` from a mapping, checking keys and types; None (and a problem) on
    error."""
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
        elif (
            "range" in fields[key].metadata
            and isinstance(converted, (int, float))
            and (expected := out_of_range(converted, *fields[key].metadata["range"]))
        ):
            problems.append(f"{where}.{key}: expected {expected}, got {value!r}")
            ok = False
        kwargs[key] = converted
    for name, f in fields.items():
        if f.metadata.get("required") and raw.get(name) in (None, ""):  # a stage's required(...) parameter
            problems.append(f"{where}.{name}: required key is missing ({f.metadata['help']})")
            ok = False
        elif (
            name not in raw and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ):
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
        _, vt = args or (Any, Any)
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
