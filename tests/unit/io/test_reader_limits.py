"""Readers are bounded (issue 17, DESIGN.md trust boundary): bytes per file, line, tar member and Parquet
value have limits, and what is over one is a reject with a reason, found before the memory is spent. Bad file
names are named, and can be skipped.

Limits here are small (a 1,000-byte line is "too long") so that every case is cheap; an 8 GiB sparse file
costs no disk and shows a file is refused by its size, unread.
"""

from __future__ import annotations

import io
import json
import logging
import os
import resource
import tarfile
import tracemalloc

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation.io import fs as cfs
from curation.io.detect import detect_sources
from curation.io.readers import plan_units, read_unit
from curation.io.tar import iter_tar
from curation.recipe import SourceSpec, pipeline_from_dict
from curation.spec import LimitsSpec, RecipeError
from tests.helpers.images import jpeg, write_tar

SPARSE = 8 << 30


def sparse(path, size: int = SPARSE):
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def rows(spec: SourceSpec, limits: LimitsSpec | None = None, **kw) -> list[dict]:
    out = []
    for unit in plan_units([spec], limits=limits, **kw):
        for t in read_unit(unit, batch_rows=3):
            out += t.to_pylist()
    return out


def rejects(got: list[dict]) -> dict[int, str]:
    return {r["source_offset"]: r["reject_reason"] for r in got if r["reject_reason"]}


class Blocks:
    """A stream of the given blocks, as pyarrow streams give them (``read(n)`` ignores ``n`` here)."""

    def __init__(self, blocks):
        self.blocks = iter(blocks)

    def read(self, n: int = -1) -> bytes:
        return next(self.blocks, b"")


# ---------------------------------------------------------------- JSONL lines


@pytest.mark.parametrize("chunk", [1, 3, 7, 64, 1 << 20])
def test_iter_lines_splits_like_bytes_split_at_any_chunk_size(chunk):
    data = b'{"a": 1}\r\n\n  \nxyz\n' + b"q" * 200 + b"\nlast\r"
    got = list(cfs.iter_lines(io.BytesIO(data), chunk=chunk))
    assert got == [b'{"a": 1}', b"", b"  ", b"xyz", b"q" * 200, b"last"]
    assert list(cfs.iter_lines(io.BytesIO(b"a\n  "), chunk=chunk)) == [b"a"]  # a blank tail is no line


@pytest.mark.parametrize("chunk", [1, 5, 999, 1000, 1001, 4096])
def test_a_line_over_the_limit_is_skipped_and_counted_so_line_numbers_stay_right(chunk):
    data = b"a" * 1000 + b"\n" + b"b" * 1001 + b"\r\nshort\n" + b"c" * 5000 + b"\n\n" + b"d" * 3000
    got = list(cfs.iter_lines(io.BytesIO(data), chunk=chunk, max_line=1000))
    assert got == [b"a" * 1000, cfs.Skipped(1002), b"short", cfs.Skipped(5000), b"", cfs.Skipped(3000)]


def test_a_long_line_is_never_held():
    """60 MB in one line, with a 1,000-byte limit: memory stays at a block or two."""
    block = b"x" * (1 << 20)
    tracemalloc.start()
    try:
        got = list(cfs.iter_lines(Blocks([block] * 60 + [b"x\nok\n"]), max_line=1000))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert got == [cfs.Skipped(60 * len(block) + 1), b"ok"]
    assert peak < 8 << 20, peak


class Counted(bytes):
    """A block that counts the bytes ``tail + block`` copies (the old reader re-copied its growing tail)."""

    copied = 0

    def __radd__(self, other: bytes) -> bytes:
        Counted.copied += len(other) + len(self)
        return bytes(other) + bytes(self)


def test_a_line_across_many_blocks_is_copied_a_bounded_number_of_times():
    Counted.copied = 0
    blocks = [Counted(b"y" * 1000) for _ in range(2000)] + [Counted(b"\n")]
    (line,) = cfs.iter_lines(Blocks(blocks))
    assert line == b"y" * 2_000_000
    assert Counted.copied <= 2 * len(line)  # linear: no more than twice the line, however many blocks


def test_jsonl_line_too_long_is_a_reject_naming_file_and_line_and_later_offsets_hold(tmp_path):
    lines = [
        json.dumps({"text": "first"}),
        json.dumps({"text": "x" * 5000}),
        "",
        json.dumps({"text": "third"}),
        "not json",
        json.dumps({"text": "y" * 2000}),
    ]
    (tmp_path / "a.jsonl").write_text("\n".join(lines))  # the last line has no newline
    spec = SourceSpec(name="t", format="jsonl", modality="text", paths=[str(tmp_path / "a.jsonl")])
    got = rows(spec, LimitsSpec(max_line_bytes=1000))
    assert rejects(got) == {1: "line_too_long", 4: "malformed_row", 5: "line_too_long"}
    assert [r["text"] for r in got if not r["reject_reason"]] == ["first", "third"]
    assert [r["source_offset"] for r in got if not r["reject_reason"]] == [0, 3]
    long = next(r for r in got if r["source_offset"] == 1)
    assert f"{tmp_path / 'a.jsonl'}#1" in long["reject_detail"]
    assert "limits.max_line_bytes" in long["reject_detail"]
    assert "xxxx" not in (long["text"] or "")  # the line itself was never read into the row
    assert rejects(rows(spec)) == {4: "malformed_row"}  # the default limit (64 MiB) lets them through


def test_line_limit_holds_for_conversations_and_video_manifests(tmp_path):
    conv = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
    big = dict(conv, pad="p" * 3000)
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(x) for x in (conv, big, conv)) + "\n")
    spec = SourceSpec(name="c", format="sharegpt", modality="sft", paths=[str(tmp_path / "c.jsonl")])
    got = rows(spec, LimitsSpec(max_line_bytes=1000))
    assert rejects(got) == {1: "line_too_long"} and len(got) == 3

    (tmp_path / "v.jsonl").write_text(json.dumps({"video": "v" * 3000 + ".mp4"}) + "\n")
    spec = SourceSpec(name="v", format="jsonl", modality="video", paths=[str(tmp_path / "v.jsonl")])
    assert rejects(rows(spec, LimitsSpec(max_line_bytes=1000))) == {0: "line_too_long"}


# ---------------------------------------------------------------- files read whole


def test_read_bytes_refuses_a_sparse_8_gib_file_by_its_size_without_reading_it(tmp_path):
    path = str(sparse(tmp_path / "huge.jpg"))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(cfs.TooLarge) as e:
        cfs.read_bytes(path, limit=1 << 20)
    assert e.value.reason == "file_too_large" and "8,589,934,592 bytes" in str(e.value)
    assert "limits.max_media_bytes" in str(e.value)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 256 << 10  # KiB: nothing was read
    small = tmp_path / "s.bin"
    small.write_bytes(b"z" * 1000)
    assert cfs.read_bytes(str(small), limit=1000) == b"z" * 1000
    with pytest.raises(cfs.TooLarge):
        cfs.read_bytes(str(small), limit=999)


def test_a_file_longer_than_its_size_said_is_still_capped():
    """A file that grew after its size was taken, or a file system that reports none, is read on to the
    limit."""
    assert cfs.read_capped(io.BytesIO(b"x" * 50), size=10, limit=100) == b"x" * 50
    assert cfs.read_capped(io.BytesIO(b"x" * 50), size=0, limit=20) == b"x" * 21  # one over: too large
    assert cfs.read_capped(io.BytesIO(b"x" * 50), size=50, limit=50) == b"x" * 50


def test_a_sparse_image_referenced_by_a_row_is_a_file_too_large_reject(tmp_path):
    sparse(tmp_path / "huge.jpg")
    (tmp_path / "ok.jpg").write_bytes(jpeg())
    (tmp_path / "a.jsonl").write_text(
        json.dumps({"caption": "big", "image": "huge.jpg"})
        + "\n"
        + json.dumps({"caption": "fine", "image": "ok.jpg"})
        + "\n"
    )
    spec = SourceSpec(name="j", format="jsonl", modality="image_text", paths=[str(tmp_path / "a.jsonl")])
    got = rows(spec)  # the default max_media_bytes (1 GiB) already refuses 8 GiB
    assert rejects(got) == {0: "file_too_large"}
    assert "huge.jpg" in got[0]["reject_detail"] and "limits.max_media_bytes" in got[0]["reject_detail"]
    assert got[1]["image"] == jpeg()


def test_a_sparse_video_is_a_file_too_large_reject(tmp_path):
    sparse(tmp_path / "huge.mp4")
    (tmp_path / "v.jsonl").write_text(json.dumps({"caption": "c", "video": "huge.mp4"}) + "\n")
    spec = SourceSpec(name="v", format="jsonl", modality="video", paths=[str(tmp_path / "v.jsonl")])
    got = rows(spec)
    assert rejects(got) == {0: "file_too_large"}


def test_a_sparse_json_list_of_conversations_is_refused_unread(tmp_path):
    sparse(tmp_path / "huge.json")
    spec = SourceSpec(name="s", format="sharegpt", modality="sft", paths=[str(tmp_path / "huge.json")])
    got = rows(spec)  # the default max_file_bytes (512 MiB)
    assert rejects(got) == {0: "file_too_large"} and "limits.max_file_bytes" in got[0]["reject_detail"]


# ---------------------------------------------------------------- tar members


def tar_with(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize("chunk", [512, 700, 1 << 20])
def test_a_tar_member_over_the_limit_is_passed_over_by_its_header_size(chunk):
    data = tar_with(
        [("a.txt", b"one"), ("b.jpg", b"j" * 5000), ("b.txt", b"two"), ("l" * 200 + ".txt", b"3")]
    )
    got = list(iter_tar(io.BytesIO(data), chunk=chunk, max_member=1000))
    assert got == [
        ("a.txt", b"one"),
        ("b.jpg", cfs.Skipped(5000)),
        ("b.txt", b"two"),
        ("l" * 200 + ".txt", b"3"),
    ]


def test_a_webdataset_sample_with_a_member_over_the_limit_is_a_reject(tmp_path):
    write_tar(
        tmp_path / "a.tar",
        [
            {"__key__": "0", "jpg": jpeg(), "txt": b"ok"},
            {"__key__": "1", "jpg": b"\xff" * 5000, "txt": b"big"},
            {"__key__": "2", "jpg": jpeg(), "txt": b"ok too"},
        ],
    )
    spec = SourceSpec(name="w", format="webdataset", modality="image_text", paths=[str(tmp_path / "a.tar")])
    got = rows(spec, LimitsSpec(max_member_bytes=4000))
    assert rejects(got) == {1: "member_too_large"}
    assert "member 1.jpg" in got[1]["reject_detail"] and "limits.max_member_bytes" in got[1]["reject_detail"]
    assert [r["text"] for r in got if not r["reject_reason"]] == ["ok", "ok too"]


# ---------------------------------------------------------------- Parquet values


def bomb(path, value_bytes: int = 64 << 20, extra_groups: int = 1) -> None:
    """One row group with a value of ``value_bytes`` zeros (a few KB compressed), then small ones."""
    with pq.ParquetWriter(
        path, pa.schema([("caption", pa.string()), ("image", pa.binary())]), compression="zstd"
    ) as w:
        w.write_table(pa.table({"caption": ["boom"], "image": [bytes(value_bytes)]}))
        for k in range(extra_groups):
            w.write_table(pa.table({"caption": [f"c{k}", f"d{k}"], "image": [jpeg(), jpeg()]}))


def test_a_parquet_bomb_is_rejected_from_its_page_headers_without_decompressing(tmp_path):
    path = tmp_path / "bomb.parquet"
    bomb(path)
    assert os.path.getsize(path) < 100_000
    spec = SourceSpec(name="p", format="parquet", modality="image_text", paths=[str(path)])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    got = rows(spec, LimitsSpec(max_value_bytes=1 << 20))
    grew_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert rejects(got) == {0: "value_too_large"}
    assert "column 'image'" in got[0]["reject_detail"] and "limits.max_value_bytes" in got[0]["reject_detail"]
    assert [r["text"] for r in got[1:]] == ["c0", "d0"] and [r["source_offset"] for r in got] == [0, 1, 2]
    assert grew_kib < 32 << 10  # well under the 64 MiB value
    got = rows(spec, LimitsSpec(max_value_bytes=128 << 20))  # raised: read as it is
    assert not rejects(got) and len(got[0]["image"]) == 64 << 20


def test_parquet_bombs_are_rejected_for_pools_and_conversations_too(tmp_path):
    with pq.ParquetWriter(
        tmp_path / "qa.parquet",
        pa.schema([("question", pa.string()), ("answer", pa.string())]),
        compression="zstd",
    ) as w:
        w.write_table(pa.table({"question": ["q"], "answer": ["a" * (4 << 20)]}))
        w.write_table(pa.table({"question": ["q2"], "answer": ["fine"]}))
    spec = SourceSpec(name="q", format="qa", modality="sft", paths=[str(tmp_path / "qa.parquet")])
    got = rows(spec, LimitsSpec(max_value_bytes=1 << 20))
    assert rejects(got) == {0: "value_too_large"} and len(got) == 2

    pool = pa.table(
        {"id": ["a" * 32, "b" * 32], "modality": ["text", "text"], "text": ["z" * (4 << 20), "ok"]}
    )
    pq.write_table(pool, tmp_path / "shard.parquet", compression="zstd", row_group_size=1)
    spec = SourceSpec(name="pool", format="pool", modality="mixed", paths=[str(tmp_path / "shard.parquet")])
    got = rows(spec, LimitsSpec(max_value_bytes=1 << 20))
    assert rejects(got) == {0: "value_too_large"} and got[1]["text"] == "ok"


def test_a_large_row_group_of_small_values_is_read(tmp_path):
    """The footer puts the row group over the limit, but its pages (and so its values) are all under it."""
    table = pa.table(
        {"caption": [f"c{i}" for i in range(400)], "image": [os.urandom(2000) for _ in range(400)]}
    )
    pq.write_table(
        table,
        tmp_path / "p.parquet",
        compression="zstd",
        data_page_size=16 << 10,
        write_batch_size=4,
        use_dictionary=False,
    )
    meta = pq.ParquetFile(tmp_path / "p.parquet").metadata
    assert meta.num_row_groups == 1 and meta.row_group(0).column(1).total_uncompressed_size > 500_000
    spec = SourceSpec(name="p", format="parquet", modality="image_text", paths=[str(tmp_path / "p.parquet")])
    got = rows(spec, LimitsSpec(max_value_bytes=100_000))
    assert not rejects(got) and len(got) == 400


# ---------------------------------------------------------------- file names


@pytest.fixture
def bad_names(tmp_path):
    (tmp_path / "good.jsonl").write_text('{"text": "a"}\n')
    (tmp_path / "sub").mkdir()
    with open(os.path.join(os.fsencode(tmp_path), b"sub", b"bad\xff.jsonl"), "wb") as f:
        f.write(b'{"text": "b"}\n')
    return tmp_path


def test_a_file_name_that_is_not_utf8_is_named_and_the_way_to_skip_it_said(bad_names):
    for pattern in (str(bad_names), f"{bad_names}/**/*.jsonl", f"{bad_names}/*/*.jsonl"):
        with pytest.raises(cfs.BadFileName) as e:
            cfs.expand(pattern)
        assert "bad\\xff.jsonl" in str(e.value) and "on_bad_name: skip" in str(e.value)
    raw = {
        "sources": [{"name": "t", "format": "jsonl", "modality": "text", "paths": [str(bad_names)]}],
        "stages": [],
        "output": {"path": str(bad_names / "out")},
    }
    with pytest.raises(RecipeError) as e:
        pipeline_from_dict(raw)
    assert "sources.0.paths.0" in str(e.value) and "bad\\xff.jsonl" in str(e.value)


def test_names_that_are_not_utf8_can_be_skipped_and_are_logged_with_a_count(bad_names, caplog):
    with caplog.at_level(logging.WARNING, logger="curation.io.fs"):
        assert cfs.expand(str(bad_names), "skip") == [str(bad_names / "good.jsonl")]
    assert "skipped 1 file name(s)" in caplog.text and "bad\\xff.jsonl" in caplog.text
    raw = {
        "sources": [
            {
                "name": "t",
                "format": "jsonl",
                "modality": "text",
                "paths": [str(bad_names)],
                "on_bad_name": "skip",
            }
        ],
        "stages": [],
        "output": {"path": str(bad_names / "out")},
    }
    recipe = pipeline_from_dict(raw)
    units = plan_units(recipe.sources, limits=recipe.limits)
    assert [u.uri for u in units] == [str(bad_names / "good.jsonl")]
    raw["sources"][0]["on_bad_name"] = "ignore"
    with pytest.raises(RecipeError, match="on_bad_name: 'ignore'"):
        pipeline_from_dict(raw)


# ---------------------------------------------------------------- the limits: section


def test_limits_have_defaults_overrides_and_reach_every_unit(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "a"}\n')
    raw = {
        "sources": [
            {"name": "t", "format": "jsonl", "modality": "text", "paths": [str(tmp_path / "a.jsonl")]}
        ],
        "stages": [],
        "output": {"path": str(tmp_path / "out")},
    }
    assert pipeline_from_dict(raw).limits == LimitsSpec()
    assert LimitsSpec().max_line_bytes == 64 << 20 and LimitsSpec().max_value_bytes == 256 << 20
    recipe = pipeline_from_dict({**raw, "limits": {"max_line_bytes": 1000}})
    assert recipe.limits == LimitsSpec(max_line_bytes=1000)
    (unit,) = plan_units(recipe.sources, limits=recipe.limits)
    assert unit.limits == LimitsSpec(max_line_bytes=1000)
    assert plan_units(recipe.sources)[0].limits == LimitsSpec()  # defaults when none are given
    detected = pipeline_from_dict({**raw, "sources": [vars(s) for s in detect_sources([str(tmp_path)])]})
    assert detected.limits == LimitsSpec()  # `curation audit` composes its recipe this way


@pytest.mark.parametrize(
    "value, expected",
    [
        (0, "between 1 and"),
        (-1, "between 1 and"),
        (1 << 60, "between 1 and"),
        ("big", "expected an integer"),
        (True, "expected an integer"),
        (1.5, "expected an integer"),
    ],
)
def test_limits_out_of_range_are_recipe_errors_naming_the_key(tmp_path, value, expected):
    (tmp_path / "a.jsonl").write_text('{"text": "a"}\n')
    raw = {
        "sources": [
            {"name": "t", "format": "jsonl", "modality": "text", "paths": [str(tmp_path / "a.jsonl")]}
        ],
        "stages": [],
        "output": {"path": str(tmp_path / "out")},
        "limits": {"max_line_bytes": value},
    }
    with pytest.raises(RecipeError) as e:
        pipeline_from_dict(raw)
    assert "max_line_bytes" in str(e.value) and expected in str(e.value)
    raw["limits"] = {"max_lines": 3}
    with pytest.raises(RecipeError, match="limits.max_lines: unknown key"):
        pipeline_from_dict(raw)


def test_a_benchmark_file_line_over_the_limit_is_listed_not_held(tmp_path, monkeypatch):
    """Benchmark exports are untrusted too: a giant JSONL line is passed over and listed as not indexed."""
    from types import SimpleNamespace

    from curation.dedup import registry

    monkeypatch.setattr(registry, "LimitsSpec", lambda: SimpleNamespace(max_line_bytes=200))
    path = tmp_path / "b.jsonl"
    path.write_text(
        json.dumps({"id": "big", "question": "x" * 500})
        + "\n"
        + json.dumps({"id": "ok", "question": "What colour is the sky on a clear day?"})
        + "\n"
    )
    problems: list = []
    items = list(registry.read_items(registry.BenchmarkSpec("b", [str(path)]), problems))
    assert [it.item_id for it in items] == ["ok"]
    assert any("over limits.max_line_bytes" in p.reason for p in problems), problems
