"""Readers: every format to canonical rows, with lineage, ids, and ingest rejects instead of crashes."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq

from curation.io.readers import plan_units, read_unit
from curation.recipe import SourceSpec
from curation.schema import ROW_SCHEMA, row_id
from tests.helpers.images import jpeg, write_tar


def rows(spec: SourceSpec, **kw) -> list[dict]:
    out = []
    for unit in plan_units([spec], **kw):
        for t in read_unit(unit, batch_rows=3):
            assert t.schema == ROW_SCHEMA
            out += t.to_pylist()
    return out


def test_webdataset_groups_members_by_key_including_folders(tmp_path):
    img = jpeg()
    write_tar(
        tmp_path / "a.tar",
        [
            {"__key__": "dir/x", "jpg": img, "txt": b"first", "json": b'{"url": "http://x"}'},
            {"__key__": "dir/y", "png": img, "txt": b"second"},
            {"__key__": "z", "txt": b"no image"},
        ],
    )
    got = rows(
        SourceSpec(name="w", format="webdataset", modality="image_text", paths=[str(tmp_path / "*.tar")])
    )
    assert [r["text"] for r in got] == ["first", "second", "no image"]
    assert [r["source_offset"] for r in got] == [0, 1, 2]
    assert json.loads(got[0]["meta"]) == {"__key__": "dir/x", "url": "http://x"}
    assert got[1]["image"] == img and got[2]["image"] is None
    assert got[0]["id"] == row_id("image_text", b"first", [img])


def test_truncated_tar_keeps_what_was_read_and_reports_the_rest(tmp_path):
    write_tar(
        tmp_path / "a.tar", [{"__key__": f"{i:03d}", "jpg": jpeg(), "txt": b"caption"} for i in range(6)]
    )
    data = (tmp_path / "a.tar").read_bytes()
    (tmp_path / "a.tar").write_bytes(data[: len(data) // 2])
    got = rows(
        SourceSpec(name="w", format="webdataset", modality="image_text", paths=[str(tmp_path / "a.tar")])
    )
    assert got[-1]["reject_reason"] == "unreadable_file" and "a.tar" in got[-1]["reject_detail"]
    assert all(r["reject_reason"] is None for r in got[:-2])


def test_parquet_units_split_by_row_groups_and_hf_image_structs(tmp_path):
    img = jpeg()
    table = pa.table(
        {
            "caption": [f"c{i}" for i in range(10)],
            "image": [{"bytes": img, "path": f"{i}.jpg"} for i in range(10)],
            "url": [f"u{i}" for i in range(10)],
        }
    )
    pq.write_table(table, tmp_path / "p.parquet", row_group_size=2)
    spec = SourceSpec(name="p", format="parquet", modality="image_text", paths=[str(tmp_path / "p.parquet")])
    units = plan_units([spec], unit_rows=4)
    assert [(u.rg_start, u.rg_stop) for u in units] == [(0, 2), (2, 4), (4, 5)]
    got = rows(spec, unit_rows=4)
    assert [r["source_offset"] for r in got] == list(range(10))
    assert got[3]["text"] == "c3" and got[3]["image"] == img and json.loads(got[3]["meta"]) == {"url": "u3"}


def test_interleaved_jsonl_resolves_images_relative_to_the_file(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.jpg").write_bytes(jpeg())
    docs = [
        {"texts": ["Intro.", None, "After."], "images": [None, "images/a.jpg", None], "url": "d"},
        {"texts": ["x", None], "images": [None, "images/gone.jpg"]},
    ]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(d) for d in docs))
    got = rows(
        SourceSpec(name="d", format="jsonl", modality="interleaved", paths=[str(tmp_path / "d.jsonl")])
    )
    assert got[0]["texts"] == ["Intro.", None, "After."] and got[0]["images"][1] == jpeg()
    assert got[0]["reject_reason"] is None
    assert got[1]["reject_reason"] == "missing_image_file" and "images/gone.jpg" in got[1]["reject_detail"]


def test_unreadable_parquet_becomes_a_reject_not_a_crash(tmp_path):
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 this is not parquet")
    got = rows(SourceSpec(name="p", format="parquet", modality="text", paths=[str(tmp_path / "bad.parquet")]))
    assert len(got) == 1 and got[0]["reject_reason"] == "unreadable_file"


def test_rows_with_wrongly_typed_fields_are_rejected_one_by_one(tmp_path):
    docs = [
        {"texts": ["ok", "fine"], "images": [None, None]},
        {"texts": "not a list", "images": [None]},
        {"texts": [1, {"a": 2}], "images": [None, None]},
        {"texts": ["still", "fine"], "images": [None, None]},
    ]
    (tmp_path / "d.jsonl").write_text("\n".join(__import__("json").dumps(d) for d in docs))
    got = rows(
        SourceSpec(name="d", format="jsonl", modality="interleaved", paths=[str(tmp_path / "d.jsonl")])
    )
    assert [r["reject_reason"] for r in got] == [None, "malformed_row", "malformed_row", None]
    assert "wrong type" in got[1]["reject_detail"] and "d.jsonl#1" in got[1]["reject_detail"]
    assert [r["source_offset"] for r in got] == [0, 1, 2, 3]


def test_video_rows_carry_keyframes_and_name_what_is_wrong(tmp_path):
    import random

    from curation.io.readers import plan_units, read_unit
    from curation.recipe import SourceSpec
    from curation.sample.video import make_video, truncate

    (tmp_path / "clips").mkdir()
    good = make_video(0, 1, seconds=3.0)
    (tmp_path / "clips" / "a.mp4").write_bytes(good)
    (tmp_path / "clips" / "b.mp4").write_bytes(truncate(good, random.Random(1)))
    (tmp_path / "v.jsonl").write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {"caption": "fine", "video": "clips/a.mp4"},
                {"caption": "cut", "video": "clips/b.mp4"},
                {"caption": "gone", "video": "clips/nowhere.mp4"},
            ]
        )
        + "\n"
    )
    spec = SourceSpec(name="v", format="jsonl", modality="video", paths=[str(tmp_path / "v.jsonl")])
    (unit,) = plan_units([spec])
    rows = pa.concat_tables(read_unit(unit)).to_pylist()
    a, b, c = rows
    assert a["reject_reason"] is None and len(a["frames"]) >= 3 and a["frame_ts"][0] == 0.0
    assert a["video"] == str(tmp_path / "clips" / "a.mp4") and json.loads(a["meta"])["duration"] > 2
    assert b["reject_reason"] == "unreadable_video" and "b.mp4" in b["reject_detail"]
    assert c["reject_reason"] == "missing_video_file" and "nowhere.mp4" in c["reject_detail"]
