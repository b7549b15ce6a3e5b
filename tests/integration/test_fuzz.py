"""Fuzzing the readers and the recipe loaders with hypothesis: bad input is reported, never fatal.

Properties (issue 9):
- a reader never raises, and every input row comes back: as a row, or as an ``ingest`` reject with a
  reason and a detail that names the file;
- nothing is written outside the output folder (readers write nothing: tar member names such as
  ``../../etc/x.jpg`` are keys, never paths on disk);
- a recipe either loads or raises :class:`RecipeError` naming the file, quickly, without running anything.
- sizes (issue 17): a line, tar member or Parquet value over its limit is a reject with its reason, read past
  without being held; the rest is read exactly as without the limit.

Examples are derandomized, so every run sees the same inputs; ``pytest -m slow`` runs ten times as many.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import json
import os
import signal
import tarfile
import tempfile
import time
from functools import lru_cache
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from curation.io import fs as cfs
from curation.io.readers import INGEST, plan_units, read_unit
from curation.io.tar import TarError, iter_tar
from curation.recipe import SourceSpec, load_pipeline
from curation.schema import ROW_SCHEMA, row_id
from curation.spec import LimitsSpec, RecipeError
from tests.helpers.images import jpeg

COMMON = {"derandomize": True, "deadline": None, "database": None, "suppress_health_check": list(HealthCheck)}
ESCAPE = "zz-fuzz-escape"  # the file name every traversal member aims at: it must appear nowhere


def fuzz(prop, *strategies, examples: int):
    """The property as a fast test and as a ``slow`` one with ten times the examples."""
    fast = settings(max_examples=examples, **COMMON)(given(*strategies)(prop))
    slow = settings(max_examples=examples * 10, **COMMON)(given(*strategies)(prop))
    return fast, pytest.mark.slow(slow)


@contextlib.contextmanager
def time_limit(seconds: float, what: str):
    """Fail (not hang) when ``what`` takes longer: a reader stuck in a loop is a bug too."""

    def alarm(*_):
        raise AssertionError(f"{what} took more than {seconds} s")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@contextlib.contextmanager
def sandbox():
    """``(data folder, output folder, seal)`` inside a fresh folder. Call ``seal()`` once the inputs are
    written: afterwards, nothing was created outside the output folder, and no file named like a traversal
    target exists around it or in the working folder."""
    with tempfile.TemporaryDirectory(prefix="fuzz-") as tmp:
        root = Path(tmp)
        data, out = root / "a" / "b" / "data", root / "a" / "b" / "out"
        data.mkdir(parents=True)
        out.mkdir()
        before: set[str] = set()
        yield data, out, lambda: before.update(tree(root))
        assert before, "seal() the sandbox once its inputs are written"
        created = {p for p in tree(root) - before if not p.startswith(str(out.relative_to(root)))}
        assert not created, f"files created outside the output folder: {sorted(created)[:5]}"
        for d in (root, root / "a", root / "a" / "b", Path.cwd(), Path(tempfile.gettempdir()), Path("/etc")):
            assert not list(d.glob(f"{ESCAPE}*")), f"a traversal target appeared in {d}"


def read_all(spec: SourceSpec) -> list[dict]:
    """Every row of every unit; checks the schema and that each reject names its file."""
    out = []
    with time_limit(60, f"reading {spec.paths}"):
        for unit in plan_units([spec], unit_rows=3):
            for t in read_unit(unit, batch_rows=4):
                assert t.schema == ROW_SCHEMA
                out += t.to_pylist()
    for r in out:
        assert r["id"] and r["source"] == spec.name
        if r["reject_reason"] is not None:
            assert r["reject_stage"] == INGEST and r["reject_reason"].strip()
            assert r["source_uri"] in r["reject_detail"], r["reject_detail"]
    return out


def offsets(rows: list[dict]) -> list[int]:
    return sorted({r["source_offset"] for r in rows})


@lru_cache(maxsize=1)
def media() -> dict[str, bytes]:
    """Good, truncated and random images and videos (one short real video, made once)."""
    from curation.sample.video import make_video

    video = make_video(0, 1, size=(64, 48), seconds=1.0, fps=5)
    img = jpeg(40, 30)
    return {
        "img": img,
        "img_cut": img[: len(img) // 2],
        "png_head": b"\x89PNG\r\n\x1a\n" + bytes(40),
        "video": video,
        "video_cut": video[: len(video) // 3],
        "video_head": video[:200],
        "noise": bytes(range(256)) * 3,
        "empty": b"",
    }


MEDIA = st.sampled_from(["img", "img_cut", "png_head", "video", "video_cut", "video_head", "noise", "empty"])
BLOBS = st.one_of(MEDIA.map(lambda k: media()[k]), st.binary(max_size=300))


# ---------------------------------------------------------------- WebDataset tars

NAMES = st.one_of(
    st.sampled_from(
        [
            "000.jpg",
            "000.txt",
            "000.json",
            "000.mp4",
            "001.jpg",
            "001.txt",
            "001.JPG",
            "002.png",
            "002.txt",
            "dir/003.txt",
            "dir/003.jpg",
            "./004.txt",
            "README",
            "noext",
            "dir/noext",
            ".jpg",
            ".hidden.txt",
            "a.b.c.txt",
            "005..txt",
            "trailing.",
            "sp ace.txt",
            "new\nline.txt",
            "tab\tkey.txt",
            "é" * 60 + ".txt",
            "p" * 150 + ".jpg",
            "d/" * 80 + "deep.txt",
            "C:\\dos\\006.txt",
            "%2e%2e/007.txt",
            f"../../{ESCAPE}.jpg",
            f"../{ESCAPE}.txt",
            f"dir/../../../{ESCAPE}.json",
            f"/tmp/{ESCAPE}.jpg",
            f"/etc/{ESCAPE}.txt",
            f"//{ESCAPE}.txt",
            f"../../../../../../../../tmp/{ESCAPE}.mp4",
            "\udcff\udcfe.txt",
            "\udcff\udcfe.jpg",
            "k\udc80/008.json",
            "\udcc3.mp4",
        ]
    ),
    st.builds(
        lambda k, e: f"{k}.{e}" if e else k,
        st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00/"), max_size=12),
        st.sampled_from(["jpg", "txt", "json", "mp4", "", "tar", "JPG"]),
    ),
)
KINDS = st.sampled_from(
    [tarfile.REGTYPE] * 6
    + [
        tarfile.AREGTYPE,
        tarfile.CONTTYPE,
        tarfile.SYMTYPE,  # links,
        tarfile.LNKTYPE,
        tarfile.CHRTYPE,
        tarfile.BLKTYPE,  # devices
        tarfile.DIRTYPE,
        tarfile.FIFOTYPE,
    ]
)
CONTENT = st.one_of(
    BLOBS,
    st.sampled_from(
        [
            b"a caption",
            b'{"url": "http://x", "n": 1}',
            b"{not json",
            "caf\xe9".encode("latin-1"),
            b"\xff\xfe\x00",
        ]
    ),
)
MEMBERS = st.lists(st.tuples(NAMES, KINDS, CONTENT), max_size=12)


def build_tar(members: list[tuple[str, bytes, bytes]], fmt: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt, encoding="utf-8", errors="surrogateescape") as tar:
        for name, kind, data in members:
            info = tarfile.TarInfo(name)
            # tarfile reads an old-style regular member ("\0") whose 100-byte name field ends in "/" as a
            # folder even when a long name follows; GNU tar and iter_tar go by the long name
            long_name = len(name.encode("utf-8", "surrogateescape")) >= 100
            info.type = tarfile.REGTYPE if kind == tarfile.AREGTYPE and long_name else kind
            if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
                info.linkname = f"../../{ESCAPE}-link"
            if kind in (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE):
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    return buf.getvalue()


def headers(data: bytes) -> list[int]:
    """Offsets of the blocks of ``data`` whose header checksum holds."""
    out = []
    for at in range(0, len(data) - 511, 512):
        h = data[at : at + 512]
        field = h[148:156].split(b"\0", 1)[0].strip()
        if h != bytes(512) and field.isdigit() and int(field, 8) == sum(h) - sum(h[148:156]) + 256:
            out.append(at)
    return out


def with_header(data: bytes, at: int, start: int, value: bytes) -> bytes:
    """``data`` with bytes ``value`` written into the header at ``at`` (from ``start``), checksum fixed."""
    h = bytearray(data[at : at + 512])
    h[start : start + len(value)] = value
    h[148:156] = b" " * 8
    h[148:156] = b"%06o\0 " % sum(h)
    return data[:at] + bytes(h) + data[at + 512 :]


MUTATIONS = st.one_of(
    st.just(("none",)),
    st.tuples(st.just("truncate"), st.floats(0, 1)),
    st.tuples(
        st.just("flip"), st.lists(st.tuples(st.floats(0, 1), st.integers(1, 255)), min_size=1, max_size=8)
    ),
    st.tuples(
        st.just("size"),
        st.floats(0, 1),
        st.sampled_from(
            [
                b"77777777777\0",
                b"\x80" + b"\xff" * 11,
                b"\xff" * 12,
                b"99999999999\0",
                b"-1\0",
                b"00000001000\0",
            ]
        ),
    ),
    st.tuples(st.just("pax"), st.sampled_from([b"0 ", b"-9 ", b"x ", b"99999 ", b"3 "])),
    st.tuples(st.just("append"), st.binary(min_size=1, max_size=1500)),
    st.tuples(st.just("garbage"), st.binary(max_size=3000)),
)


def mutate(data: bytes, m: tuple) -> bytes:
    kind = m[0]
    if kind == "truncate":
        return data[: int(len(data) * m[1])]
    if kind == "flip":
        out = bytearray(data)
        for where, bits in m[1]:
            if out:
                out[min(len(out) - 1, int(len(out) * where))] ^= bits
        return bytes(out)
    if kind == "size" and headers(data):
        hs = headers(data)
        return with_header(data, hs[min(len(hs) - 1, int(len(hs) * m[1]))], 124, m[2])
    if kind == "pax":  # the length of the first pax record: zero, negative, not a number, too long
        at = next((h for h in headers(data) if data[h + 156 : h + 157] in (b"x", b"g")), None)
        if at is None:
            return data
        body = data[at + 512 :]
        return data[: at + 512] + m[1] + body[body.index(b" ") + 1 :]
    if kind == "append":
        return data + m[1]
    if kind == "garbage":
        return m[1]
    return data


def expected_samples(data: bytes) -> tuple[int, bool]:
    """(samples, whether some regular member has no extension) for an undamaged archive, per tarfile."""
    keys, strays = [], False
    with tarfile.open(fileobj=io.BytesIO(data), encoding="utf-8", errors="surrogateescape") as tar:
        for m in tar:
            if not m.isreg():
                continue
            base = m.name.rsplit("/", 1)[-1]
            if "." not in base:
                strays = True
                continue
            key = m.name[: len(m.name) - len(base)] + base.split(".", 1)[0]
            if not keys or keys[-1] != key:
                keys.append(key)
    return len(keys), strays


def _prop_tar(members, fmt, mutation, modality):
    raw = build_tar(members, fmt)
    data = mutate(raw, mutation)
    # the member reader itself: TarError (a ValueError) is its only complaint; small chunks straddle reads
    try:
        with time_limit(30, "iter_tar"):
            got = list(iter_tar(io.BytesIO(data), chunk=700))
        if data == raw:
            with tarfile.open(fileobj=io.BytesIO(raw), encoding="utf-8", errors="surrogateescape") as tar:
                assert [n for n, _ in got] == [m.name for m in tar if m.isreg()]
    except TarError:
        assert data != raw
    with sandbox() as (folder, _, seal):
        (folder / "shard.tar").write_bytes(data)
        seal()
        got = read_all(
            SourceSpec(name="w", format="webdataset", modality=modality, paths=[str(folder / "shard.tar")])
        )
    if data == raw:  # undamaged: one row per sample, and one reject for members that belong to no sample
        n, strays = expected_samples(raw)
        assert offsets(got) == list(range(n + strays)), (n, strays, [r["reject_detail"] for r in got])
        if strays:
            assert got[-1]["reject_reason"] == "malformed_row" and "no extension" in got[-1]["reject_detail"]
    assert len(set(offsets(got))) == len(offsets(got))


test_tar_fuzz, test_tar_fuzz_slow = fuzz(
    _prop_tar,
    MEMBERS,
    st.sampled_from([tarfile.GNU_FORMAT, tarfile.PAX_FORMAT]),
    MUTATIONS,
    st.sampled_from(["image_text", "text", "video"]),
    examples=500,
)


# ---------------------------------------------------------------- Parquet with wrong types

IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
COLUMN_TYPES = [  # (type, cells): wrong types for every field, nulls, nesting, extra columns
    (pa.string(), st.text(max_size=20)),
    (
        pa.string(),
        st.sampled_from([row_id("text", "x"), "text", "image_text", "sft", "video", "../x", "a.b"]),
    ),
    (pa.large_string(), st.text(max_size=5)),
    (pa.int64(), st.integers(-(2**63), 2**63 - 1)),
    (pa.float64(), st.floats()),
    (pa.bool_(), st.booleans()),
    (pa.binary(), BLOBS),
    (
        IMAGE_STRUCT,
        st.fixed_dictionaries({"bytes": st.none() | BLOBS, "path": st.none() | st.text(max_size=8)}),
    ),
    (
        pa.struct([("bytes", pa.string()), ("n", pa.int32())]),
        st.fixed_dictionaries({"bytes": st.none() | st.text(max_size=5), "n": st.none() | st.integers(0, 9)}),
    ),
    (pa.struct([("path", pa.int64())]), st.fixed_dictionaries({"path": st.integers(0, 9)})),
    (pa.list_(pa.string()), st.lists(st.none() | st.text(max_size=6), max_size=3)),
    (pa.list_(pa.binary()), st.lists(st.none() | BLOBS, max_size=3)),
    (pa.list_(pa.int64()), st.lists(st.integers(-9, 9), max_size=3)),
    (
        pa.list_(IMAGE_STRUCT),
        st.lists(
            st.fixed_dictionaries({"bytes": st.none() | BLOBS, "path": st.none() | st.text(max_size=4)}),
            max_size=2,
        ),
    ),
    (
        pa.map_(pa.string(), pa.int64()),
        st.lists(st.tuples(st.text(max_size=3), st.integers(-9, 9)), max_size=2, unique_by=lambda kv: kv[0]),
    ),
    (pa.timestamp("us"), st.datetimes(datetime.datetime(1970, 1, 2), datetime.datetime(2100, 1, 1))),
    (pa.date32(), st.dates(datetime.date(1970, 1, 1), datetime.date(2100, 1, 1))),
    (pa.decimal128(10, 2), st.decimals(-(10**7), 10**7, places=2, allow_nan=False)),
    (pa.null(), st.none()),
    (pa.dictionary(pa.int32(), pa.string()), st.sampled_from(["x", "y"])),
]
COLUMN_NAMES = st.sampled_from(
    [
        "caption",
        "image",
        "text",
        "texts",
        "images",
        "video",
        "url",
        "id",
        "modality",
        "source_offset",
        "meta",
        "frames",
        "messages",
        "",
        "é",
        "x.y",
    ]
)


@st.composite
def tables(draw) -> pa.Table:
    n = draw(st.integers(0, 6))
    cols = {}
    for name in draw(st.lists(COLUMN_NAMES, min_size=1, max_size=5, unique=True)):
        t, values = draw(st.sampled_from(COLUMN_TYPES))
        nulls = draw(st.sampled_from(["some", "none", "all"]))
        cells = [
            None if nulls == "all" or (nulls == "some" and draw(st.booleans())) else draw(values)
            for _ in range(n)
        ]
        cols[name] = pa.array(cells, t)
    return pa.table(cols)


def _fix_modality(fmt: str, modality: str) -> str:
    """The modality a format takes: sft for conversations, mixed for pools."""
    return "sft" if fmt in ("sharegpt", "qa") else "mixed" if fmt == "pool" else modality


def _prop_parquet(table, fmt, modality, group, cut):
    with sandbox() as (folder, _, seal):
        path = folder / "part.parquet"
        pq.write_table(table, path, row_group_size=group)
        whole = path.read_bytes()
        if cut is not None:
            path.write_bytes(whole[: int(len(whole) * cut)])
        seal()
        got = read_all(
            SourceSpec(name="p", format=fmt, modality=_fix_modality(fmt, modality), paths=[str(path)])
        )
    not_a_pool = fmt == "pool" and not {"id", "modality"} <= set(table.column_names)
    if cut is None and not not_a_pool:
        assert offsets(got) == list(range(table.num_rows)), [r["reject_detail"] for r in got]
    else:  # unreadable: said so
        assert got and got[-1]["reject_reason"] == "unreadable_file"


test_parquet_fuzz, test_parquet_fuzz_slow = fuzz(
    _prop_parquet,
    tables(),
    st.sampled_from(["parquet", "parquet", "pool", "sharegpt", "qa"]),
    st.sampled_from(["image_text", "text", "interleaved", "video"]),
    st.integers(1, 4),
    st.none() | st.floats(0, 0.99),
    examples=400,
)


# ---------------------------------------------------------------- JSONL: invalid lines, wrong types, bytes

REFS = st.sampled_from(
    [
        "img.jpg",
        "img_cut.jpg",
        "noise.jpg",
        "video.mp4",
        "video_cut.mp4",
        "video_head.mp4",
        "noise.mp4",
        "empty.mp4",
        "missing.jpg",
        "",
        ".",
        "..",
        "../data",
        "a\x00b.jpg",
        "/dev/null",
        "dir/",
        "~",
        "%s",
        "${x}",
    ]
)


def _json_nest(inner: st.SearchStrategy) -> st.SearchStrategy:
    return st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12) | REFS,
    _json_nest,
    max_leaves=8,
)
KEYS = st.sampled_from(
    [
        "caption",
        "image",
        "text",
        "texts",
        "images",
        "video",
        "url",
        "conversations",
        "messages",
        "question",
        "answer",
        "mode",
        "system",
        "reasoning",
        "code",
        "videos",
    ]
)
CONVERSATION = st.lists(
    st.fixed_dictionaries(
        {"from": st.sampled_from(["human", "gpt", "system", "x", 3]), "value": JSON_VALUES}
    ),
    max_size=3,
)
OBJECTS = st.dictionaries(KEYS, JSON_VALUES | REFS | CONVERSATION, max_size=5)
LINES = st.one_of(
    OBJECTS.map(lambda o: json.dumps(o).encode()),
    OBJECTS.map(lambda o: json.dumps(o, ensure_ascii=False).encode("utf-8")[:-3]),  # cut mid-line
    JSON_VALUES.map(lambda v: json.dumps(v).encode()),  # valid JSON, not an object
    st.binary(max_size=40).filter(lambda b: b"\n" not in b),
    st.sampled_from(
        [
            b"",
            b"   ",
            b"\r",
            b"NaN",
            b"1e999",
            b'{"caption": 1e999}',
            b'{"caption": "\xff\xfe"}',
            b'{"caption": "ok", "caption": 2}',
            b"[" * 5000 + b"]" * 5000,
            b'{"a": ' * 3000 + b"1" + b"}" * 3000,
            b'{"caption": "\\ud800"}',
            b"\xef\xbb\xbf{}",
            b'{"texts": "not a list"}',
            b'{"images": {"a": 1}, "texts": []}',
            b'{"video": 5}',
            b'{"image": ["a.jpg"]}',
        ]
    ),
)


def _prop_jsonl(lines, fmt, modality, ext):
    with sandbox() as (folder, _, seal):
        for name, key in [
            ("img.jpg", "img"),
            ("img_cut.jpg", "img_cut"),
            ("noise.jpg", "noise"),
            ("video.mp4", "video"),
            ("video_cut.mp4", "video_cut"),
            ("video_head.mp4", "video_head"),
            ("noise.mp4", "noise"),
            ("empty.mp4", "empty"),
        ]:
            (folder / name).write_bytes(media()[key])
        path = folder / f"rows.{ext}"
        path.write_bytes(b"\n".join(lines))
        seal()
        got = read_all(
            SourceSpec(name="j", format=fmt, modality=_fix_modality(fmt, modality), paths=[str(path)])
        )
    body = b"\n".join(lines)
    if ext == "jsonl" or not body.lstrip().startswith(b"["):
        want = [i for i, line in enumerate(body.split(b"\n")) if line.rstrip(b"\r").strip()]
        assert offsets(got) == want, [(r["source_offset"], r["reject_detail"]) for r in got]


test_jsonl_fuzz, test_jsonl_fuzz_slow = fuzz(
    _prop_jsonl,
    st.lists(LINES, max_size=8),
    st.sampled_from(["jsonl", "jsonl", "jsonl", "sharegpt", "qa"]),
    st.sampled_from(["image_text", "text", "interleaved", "video"]),
    st.sampled_from(["jsonl", "jsonl", "json"]),
    examples=500,
)


def test_a_whole_file_that_is_a_json_list_of_garbage_is_reported(tmp_path):
    (tmp_path / "c.json").write_bytes(b'[{"conversations": [{"from": "human", "value": "hi"}]}, 3, "x", [')
    got = read_all(SourceSpec(name="s", format="sharegpt", modality="sft", paths=[str(tmp_path / "c.json")]))
    assert [r["reject_reason"] for r in got] == ["unreadable_file"] and "c.json" in got[0]["reject_detail"]


# ---------------------------------------------------------------- source detection (curation audit --corpus)


def _prop_detect(members, mutation, table, cut, lines):
    from curation.io.detect import UndetectedSource, detect_sources

    with sandbox() as (folder, _, seal):
        (folder / "shard.tar").write_bytes(mutate(build_tar(members, tarfile.GNU_FORMAT), mutation))
        pq.write_table(table, folder / "part.parquet")
        whole = (folder / "part.parquet").read_bytes()
        (folder / "part.parquet").write_bytes(whole[: int(len(whole) * cut)] if cut is not None else whole)
        (folder / "rows.jsonl").write_bytes(b"\n".join(lines))
        seal()
        try:
            with time_limit(30, "detecting sources"):
                sources = detect_sources([str(folder)])
        except UndetectedSource as e:  # one line per file, each naming it
            problems = str(e).splitlines()[1:-1]
            assert problems and all(p.startswith(f"  - {folder}/") for p in problems), str(e)
        else:
            assert all(s.paths for s in sources)


test_detect_fuzz, test_detect_fuzz_slow = fuzz(
    _prop_detect,
    MEMBERS,
    MUTATIONS,
    tables(),
    st.none() | st.floats(0, 0.99),
    st.lists(LINES, max_size=3),
    examples=200,
)


# ---------------------------------------------------------------- images and videos: truncated, random bytes


def _prop_media(blob, cut, shots):
    """A damaged video is an ``unreadable_video`` reject of its row (never a crash, never another reason),
    read from a JSONL manifest and from a tar; a damaged image is an ``image_decode`` reject."""
    from curation.filters import registry

    data = blob[: int(len(blob) * cut)] if cut is not None else blob
    with sandbox() as (folder, _, seal):
        (folder / "clip.mp4").write_bytes(data)
        (folder / "v.jsonl").write_text(json.dumps({"caption": "a clip", "video": "clip.mp4"}) + "\n")
        (folder / "v.tar").write_bytes(
            build_tar(
                [("000.mp4", tarfile.REGTYPE, data), ("000.txt", tarfile.REGTYPE, b"a clip")],
                tarfile.GNU_FORMAT,
            )
        )
        seal()
        for name, fmt in (("v.jsonl", "jsonl"), ("v.tar", "webdataset")):
            got = read_all(
                SourceSpec(
                    name="v",
                    format=fmt,
                    modality="video",
                    paths=[str(folder / name)],
                    video={"max_frames": 4, "shots": shots, "timeout_s": 20.0},
                )
            )
            assert got and {r["source_offset"] for r in got} == {0}
            for r in got:
                assert r["reject_reason"] in (None, "unreadable_video"), r["reject_detail"]
                assert (r["frames"] is not None) == (r["reject_reason"] is None)
    stage = registry()["image_decode"]()
    batch = pa.Table.from_pylist(
        [{"id": "0", "modality": "image_text", "image": data, "source_uri": "f.tar", "source_offset": 0}],
        schema=ROW_SCHEMA,
    )
    out = stage(batch).to_pylist()[0]
    if out["reject_reason"] is not None:
        assert out["reject_stage"] == "image_decode" and out["reject_detail"]


test_media_fuzz, test_media_fuzz_slow = fuzz(
    _prop_media, BLOBS, st.none() | st.floats(0, 1), st.booleans(), examples=150
)


def test_a_decoder_bug_is_an_unreadable_video_not_a_crash(tmp_path, monkeypatch):
    """video.py may raise something other than VideoError on a damaged file (AttributeError on some cut mp4s,
    found by this fuzzing): the row is still ``unreadable_video``, and the rest of the file is read."""
    from curation.io import video

    def broken(*_, **__):
        raise AttributeError("'NoneType' object has no attribute 'width'")

    monkeypatch.setattr(video, "sample_frames", broken)
    (tmp_path / "v.jsonl").write_text('{"video": "a.mp4"}\n{"video": "b.mp4"}\n')
    for name in ("a.mp4", "b.mp4"):
        (tmp_path / name).write_bytes(b"\0" * 64)
    got = read_all(SourceSpec(name="v", format="jsonl", modality="video", paths=[str(tmp_path / "v.jsonl")]))
    assert [r["reject_reason"] for r in got] == ["unreadable_video"] * 2
    assert (
        "the decoder failed (AttributeError" in got[0]["reject_detail"] and "a.mp4" in got[0]["reject_detail"]
    )


# ---------------------------------------------------------------- sizes: lines, members, values, limits


def read_limited(spec: SourceSpec, limits: LimitsSpec) -> list[dict]:
    """Every row of every unit read under ``limits``; each offset comes back exactly once."""
    out = []
    with time_limit(60, f"reading {spec.paths}"):
        for unit in plan_units([spec], unit_rows=3, limits=limits):
            for t in read_unit(unit, batch_rows=4):
                out += t.to_pylist()
    assert sorted(r["source_offset"] for r in out) == offsets(out), "an offset came back twice"
    return out


def _prop_lines(limit, lines, chunk):
    """iter_lines is bytes.split with \\r stripped, whatever the chunk size; a line over the limit is
    Skipped."""
    data = b"\n".join(b"x" * n + (b"\r" if cr else b"") for n, cr in lines)
    want = [b"x" * n if n + cr <= limit else cfs.Skipped(n + cr) for n, cr in lines]
    if lines and (lines[-1][0] + lines[-1][1] <= limit) and not lines[-1][0]:
        want.pop()  # a blank last line with no newline after it is no line
    assert list(cfs.iter_lines(io.BytesIO(data), chunk=chunk, max_line=limit)) == want


test_line_length_fuzz, test_line_length_fuzz_slow = fuzz(
    _prop_lines,
    st.integers(1, 40),
    st.lists(st.tuples(st.integers(0, 80), st.booleans()), max_size=12),
    st.integers(1, 50),
    examples=300,
)


def _prop_member_sizes(sizes, limit, declared):
    """A member over the limit is passed over (Skipped) by its header's size, the rest read exactly; a header
    that declares any other size is a TarError or a short read, never memory held for it."""
    members = [
        (f"{k:03d}.{'jpg' if k % 2 else 'txt'}", tarfile.REGTYPE, bytes([k % 251]) * n)
        for k, n in enumerate(sizes)
    ]
    raw = build_tar(members, tarfile.GNU_FORMAT)
    data = raw
    if declared is not None and sizes:  # one header declares another size, up to 8 GiB
        data = with_header(raw, headers(raw)[declared[0] % len(sizes)], 124, b"%011o\0" % declared[1])
    try:
        got = list(iter_tar(io.BytesIO(data), chunk=700, max_member=limit))
    except TarError:
        assert data != raw
        got = None
    if data == raw:
        assert got == [
            (name, body if len(body) <= limit else cfs.Skipped(len(body))) for name, _, body in members
        ]
    with sandbox() as (folder, _, seal):
        (folder / "shard.tar").write_bytes(data)
        seal()
        rows = read_limited(
            SourceSpec(
                name="w", format="webdataset", modality="image_text", paths=[str(folder / "shard.tar")]
            ),
            LimitsSpec(max_member_bytes=limit),
        )
    if data == raw:
        big = [k for k, n in enumerate(sizes) if n > limit]
        assert [r["source_offset"] for r in rows if r["reject_reason"] == "member_too_large"] == big


test_tar_member_size_fuzz, test_tar_member_size_fuzz_slow = fuzz(
    _prop_member_sizes,
    st.lists(st.integers(0, 3000), max_size=6),
    st.integers(1, 2500),
    st.none() | st.tuples(st.integers(0, 5), st.integers(0, 8**11 - 1)),
    examples=100,
)


def _prop_parquet_values(sizes, limit, group, page, dictionary):
    """A row whose value is over the limit is always rejected (value_too_large) with its row group, a row
    group whose footer size is within the limit never is, and every row comes back once."""
    table = pa.table(
        {
            "caption": [f"c{k}" for k in range(len(sizes))],
            "image": [bytes(n) if k % 2 else os.urandom(n) for k, n in enumerate(sizes)],
        }
    )
    with sandbox() as (folder, _, seal):
        path = folder / "part.parquet"
        pq.write_table(
            table,
            path,
            row_group_size=group,
            data_page_size=page,
            write_batch_size=2,
            use_dictionary=dictionary,
            compression="zstd",
        )
        seal()
        rows = read_limited(
            SourceSpec(name="p", format="parquet", modality="image_text", paths=[str(path)]),
            LimitsSpec(max_value_bytes=limit),
        )
        meta = pq.ParquetFile(path).metadata
    assert offsets(rows) == list(range(len(sizes)))
    rejected = {r["source_offset"] for r in rows if r["reject_reason"] == "value_too_large"}
    start = 0
    for rg in range(meta.num_row_groups):
        g = meta.row_group(rg)
        span = set(range(start, start + g.num_rows))
        if any(sizes[k] > limit for k in span):
            assert span <= rejected
        if all(g.column(j).total_uncompressed_size <= limit for j in range(g.num_columns)):
            assert not span & rejected
        start += g.num_rows


test_parquet_value_size_fuzz, test_parquet_value_size_fuzz_slow = fuzz(
    _prop_parquet_values,
    st.lists(st.integers(0, 200_000), max_size=8),
    st.integers(1000, 150_000),
    st.integers(1, 4),
    st.sampled_from([1000, 8192, 1 << 20]),
    st.booleans(),
    examples=60,
)


# ---------------------------------------------------------------- recipes: hostile YAML


def bomb(levels: int, width: int = 9) -> str:
    """The "billion laughs": each anchor is a list of ``width`` aliases of the one before."""
    lines = ['a0: &a0 ["lol"]']
    for i in range(1, levels + 1):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]")
    return "\n".join(lines) + f"\nname: *a{levels}\n"


PWNED = f"{tempfile.gettempdir()}/{ESCAPE}-pwned"
HOSTILE = {
    "python_apply": f"name: !!python/object/apply:os.system ['touch {PWNED}']\n",
    "python_name": "name: !!python/name:os.system\n",
    "python_new": f"name: !!python/object/new:subprocess.Popen [['touch', '{PWNED}']]\n",
    "python_module": "sources: !!python/module:os\n",
    "python_eval_key": f'? !!python/object/apply:builtins.eval [\'open("{PWNED}", "w")\']\n: 1\n',
    "bomb_9": bomb(9),
    "bomb_wide": bomb(4, 200),
    "bomb_in_vars": "vars: {x: &x [1, 2, 3]}\n" + bomb(8).replace("name:", "stages:"),
    "recursive_alias": "sources: &s [*s]\n",
    "recursive_mapping": "output: &o {path: *o}\n",
    "deep_flow": "sources: " + "[" * 5000 + "]" * 5000 + "\n",
    "deep_map": "stages: " + "{a: " * 900 + "1" + "}" * 900 + "\n",
    "deep_block": "".join("  " * i + f"k{i}:\n" for i in range(300)) + "  " * 300 + "1\n",
    "deep_nested_400": "stages: " + "[" * 400 + "]" * 400 + "\n",
    "empty": "",
    "comment_only": "# nothing\n",
    "null": "~\n",
    "list": "- a\n- b\n",
    "scalar": "just a string\n",
    "number": "42\n",
    "binary": "\x00\x01\x02\xff garbage",
    "tabs": "name:\tx\n\tsources: []\n",
    "long_string": "name: " + "x" * 1_000_000 + "\n",
    "long_key": "x" * 100_000 + ": 1\n",
    "dup_keys": "name: a\nname: b\nstages: []\nstages: [image_decode]\n",
    "yes_no_keys": "on: 1\nyes: 2\n1: 3\n2024-01-01: 4\nnull: 5\n",
    "complex_key": "? [a, b]\n: c\n",
    "merge_keys": "base: &b {path: /tmp/x}\noutput: {<<: *b, formats: [parquet]}\n",
    "var_loop": "vars: {a: '${b}', b: '${a}'}\nname: '${a}'\n",
    "var_bomb": "vars: {a: '" + "${a}" * 20 + "'}\nname: '${a}'\n",
    "vars_not_mapping": "vars: 5\nname: '${x}'\n",
    "vars_list": "vars: [a, b]\nname: '${a}'\n",
    "binary_tag": "name: !!binary aGVsbG8=\n",
    "set_tag": "sources: !!set {a, b}\n",
    "timestamps": "name: 2024-01-01 10:00:00\n",
    "unknown_tag": "name: !whatever x\n",
    "document_stream": "name: a\n---\nname: b\n",
    "utf16": "name: x\nsources: 3\n",
    "bom_utf8": "\ufeffname: x\nsources: 3\n",
}


@pytest.fixture(scope="module")
def loaders():
    from curation.mix.recipe import load_mix_recipe

    return {
        "pipeline": lambda p, o=(): load_pipeline(p, list(o), check_paths=False),
        "mixture": lambda p, o=(): load_mix_recipe(p, list(o)),
    }


def check_loads_or_reports(load, path: Path, overrides=(), seconds: float = 10) -> object | None:
    """The recipe's object, or None after a RecipeError that names the file; any other outcome fails."""
    t0 = time.perf_counter()
    try:
        with time_limit(seconds, f"loading {path.name}"):
            return load(path, overrides)
    except RecipeError as e:
        assert str(path) in str(e) and e.problems and all(isinstance(p, str) and p for p in e.problems)
        assert len(str(e)) < 100_000, "the message repeats the input instead of naming the problem"
        return None
    finally:
        assert time.perf_counter() - t0 < seconds


@pytest.mark.parametrize("name", sorted(HOSTILE))
@pytest.mark.parametrize("kind", ["pipeline", "mixture"])
def test_hostile_yaml_is_a_recipe_error(tmp_path, loaders, name, kind):
    path = tmp_path / f"{name}.yaml"
    text = HOSTILE[name]
    path.write_bytes(text.encode("utf-16") if name == "utf16" else text.encode("utf-8", "surrogateescape"))
    assert check_loads_or_reports(loaders[kind], path) is None
    assert not os.path.exists(PWNED)


def test_alias_bomb_fails_fast_with_a_clear_message(tmp_path, loaders):
    path = tmp_path / "bomb.yaml"
    path.write_text(bomb(9))
    t0 = time.perf_counter()
    with pytest.raises(RecipeError, match="alias") as info:
        loaders["pipeline"](path)
    assert time.perf_counter() - t0 < 2 and str(path) in str(info.value)
    path.write_text("vars: {a: '" + "${a}" * 20 + "'}\nname: '${a}'\nsources: []\n")
    with pytest.raises(RecipeError, match="refer"):
        loaders["pipeline"](path)


def test_duplicate_and_non_string_keys_are_named(tmp_path, loaders):
    path = tmp_path / "r.yaml"
    path.write_text("name: a\nstages: []\nstages: [image_decode]\n")
    with pytest.raises(RecipeError, match="stages.*twice|twice.*stages"):
        loaders["pipeline"](path)
    path.write_text("on: 1\n")
    with pytest.raises(RecipeError, match="True.*quote|quote.*True"):
        loaders["pipeline"](path)


# structured mutations of valid recipes: every key gets wrong types, unknown keys appear, keys vanish

SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(-(2**80), 2**80)
    | st.floats()
    | st.text(max_size=15)
    | st.sampled_from(
        [
            "${corpus}",
            "${nope}",
            "${",
            "auto",
            "2M",
            "1e999M",
            "9" * 400 + "M",
            "-5",
            "0",
            "nan",
            "x" * 5000,
            "~",
            "",
            "a=b",
            "::",
            "s3",
            "image_decode",
            "parquet",
        ]
    )
    | st.dates()
    | st.binary(max_size=8)
)


def _yaml_nest(inner: st.SearchStrategy) -> st.SearchStrategy:
    keys = (
        st.text(max_size=8) | st.integers(0, 3) | st.booleans() | st.dates()
    )  # YAML keys need not be strings
    return st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=3)


VALUES = st.recursive(SCALARS, _yaml_nest, max_leaves=10)


def _pipeline_base(out: str) -> dict:
    return {
        "name": "fuzz",
        "vars": {"corpus": "/nowhere", "out": out},
        "sources": [
            {
                "name": "wds",
                "format": "webdataset",
                "modality": "image_text",
                "paths": ["${corpus}/*.tar"],
                "fields": {"text": "txt"},
            },
            {
                "name": "vid",
                "format": "jsonl",
                "modality": "video",
                "paths": ["${corpus}/v.jsonl"],
                "video": {"fps": 1.0, "shots": True},
            },
        ],
        "stages": [
            {"image_decode": {}},
            {"image_size": {"min_side": 32}},
            "caption_length",
            {"caption_length": {"instance": "doc_length", "modalities": ["text"], "min": 20}},
            {"exact_dedup": {}},
        ],
        "output": {"path": "${out}", "formats": ["parquet"], "shard_rows": 4},
        "execution": {"batch_rows": 8},
    }


def _mixture_base(out: str) -> dict:
    return {
        "name": "fuzz",
        "vars": {"pools": "/nowhere"},
        "pools": {"demo": "${pools}/demo", "sft": "/x"},
        "tokenizer": "/nowhere/tokenizer.json",
        "seed": 1,
        "markup": {"per_row": 1},
        "vision": {"patch": 14},
        "output": {"path": out, "formats": ["parquet", "webdataset"]},
        "mixtures": {
            "m": {
                "budget": "2M",
                "sources": {
                    "a": {"pool": "demo", "modality": "image_text", "weight": 0.5, "where": "score_x > 0.5"},
                    "b": {
                        "pool": "demo",
                        "mode": ["thinking"],
                        "weight": 0.5,
                        "upsample": True,
                        "max_epochs": 2,
                    },
                },
            }
        },
    }


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, prefix + (i,))


@st.composite
def mutated(draw, base):
    raw = base("/tmp/fuzz-out")
    for _ in range(draw(st.integers(1, 4))):
        paths = [p for p in _paths(raw) if p]
        where = draw(st.sampled_from(paths))
        parent = raw
        for k in where[:-1]:
            parent = parent[k]
        action = draw(st.sampled_from(["replace", "replace", "replace", "unknown", "delete"]))
        if action == "replace":
            parent[where[-1]] = draw(VALUES)
        elif action == "unknown" and isinstance(parent, dict):
            parent[draw(st.text(max_size=8) | st.integers())] = draw(VALUES)
        elif isinstance(parent, dict):
            del parent[where[-1]]
    overrides = draw(
        st.lists(
            st.sampled_from(
                [
                    "vars.corpus=/elsewhere",
                    "name=x",
                    "stages.0=image_decode",
                    "nothing",
                    "a.b.c=1",
                    "vars=5",
                    "sources.9.x=1",
                    "output.formats=[",
                    "x=&a [*a]",
                    "y=" + "[" * 3000,
                    "=",
                    "stages.0.image_size.min_side=",
                    "mixtures.m.budget=1e999M",
                ]
            ),
            max_size=2,
        )
    )
    return raw, overrides


def _prop_recipe(kind, case):
    raw, overrides = case
    from curation.mix.recipe import load_mix_recipe

    load = {
        "pipeline": lambda p, o: load_pipeline(p, list(o), check_paths=False),
        "mixture": lambda p, o: load_mix_recipe(p, list(o)),
    }[kind]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "recipe.yaml"
        path.write_text(yaml.safe_dump(raw, allow_unicode=True))
        check_loads_or_reports(load, path, overrides)
        assert not os.path.exists("/tmp/fuzz-out")


test_pipeline_recipe_fuzz, test_pipeline_recipe_fuzz_slow = fuzz(
    _prop_recipe, st.just("pipeline"), mutated(_pipeline_base), examples=150
)
test_mixture_recipe_fuzz, test_mixture_recipe_fuzz_slow = fuzz(
    _prop_recipe, st.just("mixture"), mutated(_mixture_base), examples=150
)


# numbers a recipe sets, by kind: every value is a recipe or a RecipeError, never an exception
NUMERIC_KEYS = {
    "pipeline": [
        "output.shard_rows",
        "output.shard_bytes",
        "execution.batch_rows",
        "execution.unit_rows",
        "execution.num_workers",
        "execution.index_partition_rows",
        "stages.1.image_size.min_side",
        "stages.0.image_decode.max_pixels",
        "stages.0.image_decode.resources.num_cpus",
        "stages.0.image_decode.resources.concurrency",
        "sources.1.video.fps",
        "sources.1.video.max_frames",
        "sources.1.video.timeout_s",
        "sources.1.video.min_shot_s",
    ],
    "mixture": [
        "mixtures.m.budget",
        "mixtures.m.sources.a.weight",
        "mixtures.m.sources.b.max_epochs",
        "output.shard_rows",
        "execution.batch_rows",
        "seed",
        "vision.patch",
        "markup.per_row",
    ],
}
NUMBERS = (st.integers() | st.integers(-(10**30), 10**30) | st.floats()).map(
    lambda v: yaml.safe_dump(v, default_flow_style=True).split("\n")[0]
) | st.sampled_from(
    [
        ".inf",
        "-.inf",
        ".nan",
        "1e999",
        "1.0e+999",
        "99999999999999999999999",
        "-0",
        "0x7fffffffffffffff",
        "1e12M",
    ]
)


def _prop_numbers(kind, data):
    """Numeric overrides load to a recipe whose numbers fit in 64 bits and are finite, or to a RecipeError."""
    from curation.bounds import fits
    from curation.mix.recipe import load_mix_recipe

    pairs = data.draw(
        st.lists(st.tuples(st.sampled_from(NUMERIC_KEYS[kind]), NUMBERS), min_size=1, max_size=3)
    )
    raw = (_pipeline_base if kind == "pipeline" else _mixture_base)("/tmp/fuzz-out")
    load = {
        "pipeline": lambda p, o: load_pipeline(p, list(o), check_paths=False),
        "mixture": lambda p, o: load_mix_recipe(p, list(o)),
    }[kind]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "recipe.yaml"
        path.write_text(yaml.safe_dump(raw))
        recipe = check_loads_or_reports(load, path, [f"{key}={value}" for key, value in pairs])
        assert recipe is None or fits(recipe.resolved)


test_numeric_override_fuzz, test_numeric_override_fuzz_slow = fuzz(
    _prop_numbers, st.sampled_from(["pipeline", "mixture"]), st.data(), examples=200
)


def _prop_text(kind, text):
    from curation.mix.recipe import load_mix_recipe

    load = {
        "pipeline": lambda p, o: load_pipeline(p, list(o), check_paths=False),
        "mixture": lambda p, o: load_mix_recipe(p, list(o)),
    }[kind]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "recipe.yaml"
        path.write_bytes(text)
        check_loads_or_reports(load, path)


YAML_TEXT = st.one_of(
    st.binary(max_size=200),
    st.text(st.sampled_from(list("ab:-[]{}&*!|>'\"#%@`,? \n\t0.~")), max_size=80).map(str.encode),
)
test_yaml_text_fuzz, test_yaml_text_fuzz_slow = fuzz(
    _prop_text, st.sampled_from(["pipeline", "mixture"]), YAML_TEXT, examples=400
)


def _prop_paths(name):
    from curation.spec import check_paths_exist

    with sandbox() as (folder, _, seal):
        (folder / "x.tar").write_bytes(b"")
        seal()
        problems: list[str] = []
        check_paths_exist([f"{folder}/{name}"], "sources.0.paths", problems)
        assert all(p.startswith("sources.0.paths.0: ") for p in problems)


test_source_paths_fuzz, test_source_paths_fuzz_slow = fuzz(
    _prop_paths,
    st.text(st.characters(blacklist_characters=":/"), max_size=10)
    | st.sampled_from(["\x00", "*\x00", "[", "[!", "]", "**", "*.tar", "x.tar", "~", "\\", "?"]),
    examples=100,
)


# ---------------------------------------------------------------- end to end: the nastiest inputs in one run


def test_run_survives_the_nastiest_inputs(ray_local, tmp_path):
    """A run over a tar with traversal, link, device, stray and duplicate members cut short, Parquet with int
    captions, broken JSONL lines and a pool shard with hostile ids: it completes, every bad row is counted by
    reason, and nothing lands outside the pool folder (nor as a traversal member inside its tars)."""
    from curation.pipeline import run_pipeline

    corpus, out = tmp_path / "corpus", tmp_path / "pool"
    corpus.mkdir()
    img, reg = jpeg(64, 48), tarfile.REGTYPE
    members = [
        ("000.jpg", reg, img),
        ("000.txt", reg, b"A red circle on white."),
        (f"../../{ESCAPE}.jpg", reg, img),
        (f"../../{ESCAPE}.txt", reg, b"escape"),
        (f"/tmp/{ESCAPE}.jpg", reg, img),
        ("link.jpg", tarfile.SYMTYPE, b""),
        ("hard.jpg", tarfile.LNKTYPE, b""),
        ("dev.jpg", tarfile.CHRTYPE, b""),
        ("README", reg, b"x"),  # a member of no sample
        ("001.jpg", reg, img[:200]),
        ("001.txt", reg, b"A truncated picture."),
        ("002.jpg", reg, img),
        ("002.jpg", reg, img),
        ("002.txt", reg, b"Twice."),  # two images: ambiguous
        ("003.jpg", reg, img),
        ("003.txt", reg, b"cut"),
    ]
    data = build_tar(members, tarfile.GNU_FORMAT)
    (corpus / "a.tar").write_bytes(data[: headers(data)[-1] + 520])  # cut inside the last member
    pq.write_table(
        pa.table({"caption": pa.array([1, None, 3], pa.int64()), "image": [img, b"junk", None]}),
        corpus / "b.parquet",
    )
    (corpus / "c.jsonl").write_bytes(
        b'{"caption": "fine words here", "image": "x.jpg"}\n{broken\n\xff\xfe\n' + b"[" * 5000 + b"\n"
    )
    (corpus / "x.jpg").write_bytes(img)
    pq.write_table(
        pa.table(
            {
                "id": [row_id("text", "pool words"), f"../../{ESCAPE}", "", None],  # ids name tar
                "modality": ["text", "text", "text", "smell"],  # members of the pool's shards
                "text": ["Some words from a pool.", "escape", "empty id", "no id"],
            }
        ),
        corpus / "d.parquet",
    )
    sources = [
        {"name": f"s{k}", "format": fmt, "modality": modality, "paths": [str(corpus / name)]}
        for k, (fmt, modality, name) in enumerate(
            [
                ("webdataset", "image_text", "a.tar"),
                ("parquet", "image_text", "b.parquet"),
                ("jsonl", "image_text", "c.jsonl"),
                ("pool", "mixed", "d.parquet"),
            ]
        )
    ]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "name": "nasty",
                "sources": sources,
                "output": {"path": str(out)},
                "stages": [{"image_decode": {}}, {"caption_length": {"min": 2}}],
            }
        )
    )
    before = tree(tmp_path)
    result = run_pipeline(load_pipeline(recipe), progress=False)
    stats = json.loads((out / "stats.json").read_text())
    assert stats == result.stats and stats["rows_in"] == 8 + 3 + 4 + 4  # tar: 6 samples, stray, the cut tail
    ingest = next(s for s in stats["stages"] if s["name"] == INGEST)
    # stray and duplicate members, two int captions, three bad lines, three bad pool rows; the cut tar
    assert ingest["drops"] == {"malformed_row": 10, "unreadable_file": 1}
    rejects = pa.concat_tables(
        pq.read_table(p) for p in sorted((out / "rejects").rglob("*.parquet"))
    ).to_pylist()
    assert (
        sum(s["rows_in"] - s["rows_out"] for s in stats["stages"]) == len(rejects) == stats["rows_rejected"]
    )
    assert all(r["reject_reason"] for r in rejects) and stats["rows_out"] >= 1
    assert all(r["source_uri"] in r["reject_detail"] for r in rejects if r["reject_stage"] == INGEST)
    for shard in (out / "shards").glob("*.tar"):  # no traversal member in what the run wrote
        with tarfile.open(shard) as tar:
            assert not [n for n in tar.getnames() if n.startswith("/") or ".." in n.split("/")]
    outside = {p for p in tree(tmp_path) - before if not p.startswith("pool")}
    assert not outside, outside
    for d in (tmp_path, tmp_path.parent, Path.cwd(), Path(tempfile.gettempdir())):
        assert not list(d.glob(f"{ESCAPE}*"))
