"""Tests for curation.sample: determinism, layout contract, dirt ground truth, memory."""

from __future__ import annotations

import hashlib
import io
import json
import struct
import subprocess
import sys
import tarfile
import textwrap
from collections import Counter
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest
from PIL import Image

from curation.sample import DIRT_KINDS, FORCED, write_sample_corpus

IMAGE_TEXT_FILES = ("image_text/wds", "image_text/parquet", "image_text/jsonl")


def _sha_tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sample") / "c200"
    write_sample_corpus(out, rows=200, seed=7, shard_rows=50, workers=2, progress=False)  # wds: 3 shards
    return out


@pytest.fixture(scope="module")
def truth(corpus: Path) -> pl.DataFrame:
    return pl.read_parquet(corpus / "truth.parquet")


@pytest.fixture(scope="module")
def samples(corpus: Path) -> dict[tuple[str, str], dict]:
    """(file, key) -> {"image": bytes|None, "caption": bytes|None, "meta": dict} for image-text rows."""
    out: dict[tuple[str, str], dict] = {}
    for tar_path in sorted((corpus / "image_text/wds").glob("*.tar")):
        rel = str(tar_path.relative_to(corpus))
        with tarfile.open(tar_path) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                rec = out.setdefault((rel, key), {"image": None, "caption": None, "meta": None})
                data = tar.extractfile(m).read()
                if ext in ("jpg", "png"):
                    rec["image"] = data
                elif ext == "txt":
                    rec["caption"] = data
                else:
                    rec["meta"] = json.loads(data)
    for pq_path in sorted((corpus / "image_text/parquet").glob("*.parquet")):
        rel = str(pq_path.relative_to(corpus))
        for row in pl.read_parquet(pq_path).iter_rows(named=True):
            caption = None if row["caption"] is None else row["caption"].encode()
            out[(rel, row["key"])] = {"image": row["image"], "caption": caption, "meta": row}
    for jl_path in sorted((corpus / "image_text/jsonl").glob("*.jsonl")):
        rel = str(jl_path.relative_to(corpus))
        for raw in jl_path.read_bytes().splitlines():
            try:
                row = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                continue
            img = jl_path.parent / row["image"]
            caption = None if row.get("caption") is None else row["caption"].encode()
            out[(rel, row["key"])] = {
                "image": img.read_bytes() if img.exists() else None,
                "caption": caption,
                "meta": row,
            }
    return out


def _loads(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


# ------------------------------------------------------------------------------------------
# determinism


def test_byte_identical_for_any_worker_count(tmp_path: Path, corpus: Path) -> None:
    again = tmp_path / "again"
    write_sample_corpus(again, rows=200, seed=7, shard_rows=50, workers=1, progress=False)
    assert _sha_tree(again) == _sha_tree(corpus)


def test_seed_changes_output_and_rerun_replaces(tmp_path: Path) -> None:
    out = tmp_path / "c"
    write_sample_corpus(out, rows=100, seed=1, workers=2, progress=False)
    first = _sha_tree(out)
    write_sample_corpus(out, rows=100, seed=2, workers=2, progress=False)  # rerun into the same folder
    second = _sha_tree(out)
    data_files = {f for f in first if "/images/" not in f and "/clips/" not in f}  # names depend on the seed
    assert data_files <= second.keys()
    assert first["image_text/wds/00000.tar"] != second["image_text/wds/00000.tar"]


def test_refuses_foreign_non_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        write_sample_corpus(tmp_path, rows=100, progress=False)


# ------------------------------------------------------------------------------------------
# dirt and truth


@pytest.mark.parametrize("rows", [100, 200])
def test_every_dirt_kind_appears(tmp_path: Path, corpus: Path, rows: int) -> None:
    out = corpus
    if rows != 200:
        out = tmp_path / "c"
        write_sample_corpus(out, rows=rows, workers=2, progress=False)
    t = pl.read_parquet(out / "truth.parquet")
    image_text = set(t.filter(pl.col("source").is_in(["wds", "parquet", "jsonl"]))["dirt"].to_list())
    assert set(DIRT_KINDS) <= image_text
    assert set(FORCED["text"]) <= set(t.filter(pl.col("source") == "text")["dirt"].to_list())
    assert t.filter(pl.col("dirt") == "decompression_bomb").height == 1


def test_truth_matches_corpus_json(corpus: Path, truth: pl.DataFrame) -> None:
    summary = json.loads((corpus / "corpus.json").read_text())
    assert truth.height == summary["rows"] == 200
    assert dict(Counter(truth["source"].to_list())) == summary["sources"]
    counts = Counter(truth["dirt"].to_list())
    assert {k: v for k, v in summary["dirt"].items() if v} == dict(counts)
    for src, per_kind in summary["dirt_by_source"].items():
        assert dict(Counter(truth.filter(pl.col("source") == src)["dirt"].to_list())) == per_kind
    for f in summary["files"]:
        assert (corpus / f).is_file(), f
    assert truth.schema["offset"] == pl.Int64
    dups = truth.filter(pl.col("dirt").is_in(["exact_duplicate", "near_duplicate"]))
    assert dups["dup_of"].null_count() == 0
    assert truth.filter(pl.col("dirt") == "benchmark_copy")["bench_item"].null_count() == 0


def test_exact_duplicates_are_byte_identical(truth: pl.DataFrame, samples: dict, corpus: Path) -> None:
    rows = truth.filter(pl.col("dirt") == "exact_duplicate").iter_rows(named=True)
    for row in rows:
        file, key = row["dup_of"].split("#")
        if row["source"] == "text":
            docs = {json.loads(line)["id"]: json.loads(line)["text"] for line in (corpus / file).open()}
            assert docs[row["key"]] == docs[key]
            continue
        dup, orig = samples[(row["file"], row["key"])], samples[(file, key)]
        assert dup["image"] == orig["image"]
        assert dup["caption"] == orig["caption"]
        orig_dirt = truth.filter((pl.col("file") == file) & (pl.col("key") == key))["dirt"].item()
        assert orig_dirt == "clean"


def test_near_duplicates_are_re_encodings(truth: pl.DataFrame, samples: dict) -> None:
    near = truth.filter((pl.col("dirt") == "near_duplicate") & (pl.col("source") != "text"))
    rows = list(near.iter_rows(named=True))
    assert rows
    for row in rows:
        dup, orig = samples[(row["file"], row["key"])], samples[tuple(row["dup_of"].split("#"))]
        assert dup["image"] != orig["image"]
        a, b = _loads(dup["image"]), _loads(orig["image"])
        assert 0.75 <= a.width / b.width <= 1.25


def test_small_corpora(tmp_path: Path) -> None:
    for rows in (1, 7, 99):
        summary = write_sample_corpus(tmp_path / str(rows), rows=rows, workers=2, progress=False)
        assert sum(summary["sources"].values()) == rows
        assert pl.read_parquet(tmp_path / str(rows) / "truth.parquet").height == rows


def test_images_decode_as_truth_says(truth: pl.DataFrame, samples: dict) -> None:
    checked = Counter()
    for row in truth.filter(pl.col("source").is_in(["wds", "parquet", "jsonl"])).iter_rows(named=True):
        rec = samples.get((row["file"], row["key"]))
        dirt = row["dirt"]
        if dirt in ("malformed_json", "non_utf8_caption") and row["source"] == "jsonl":
            assert rec is None  # the line does not parse / decode
            continue
        if dirt == "missing_image":
            assert rec["image"] is None
            continue
        if dirt == "decompression_bomb":
            continue
        if dirt in ("corrupt_image", "truncated_image"):
            with pytest.raises(OSError):  # PIL: UnidentifiedImageError / "image file is truncated"
                _loads(rec["image"])
        else:
            img = _loads(rec["image"])
            if "width" in rec["meta"]:  # JSONL records carry no size
                assert img.size == (rec["meta"]["width"], rec["meta"]["height"]), row
            if dirt == "tiny":
                assert min(img.size) < 32
            elif dirt == "huge":
                assert max(img.size) > 4096
            elif dirt == "extreme_aspect":
                assert max(img.size) / min(img.size) > 4
            elif dirt == "clean":
                assert 64 <= min(img.size) and max(img.size) <= 512
                assert max(img.size) / min(img.size) <= 2.01
        checked[dirt] += 1
    assert checked["clean"] > 50 and checked["tiny"] and checked["huge"]


def test_caption_dirt(truth: pl.DataFrame, samples: dict) -> None:
    for row in truth.filter(pl.col("source").is_in(["wds", "parquet"])).iter_rows(named=True):
        caption = samples[(row["file"], row["key"])]["caption"]
        if row["dirt"] == "non_utf8_caption":
            with pytest.raises(UnicodeDecodeError):
                caption.decode("utf-8")
        elif row["dirt"] == "empty_caption":
            assert caption is None or not caption.strip()
        elif row["dirt"] == "repeated_phrase":
            words = caption.decode().split()
            assert len(words) >= 6 and len(set(words)) <= 2
        elif caption is not None:
            caption.decode("utf-8")


def test_decompression_bomb(truth: pl.DataFrame, samples: dict) -> None:
    row = truth.filter(pl.col("dirt") == "decompression_bomb").row(0, named=True)
    assert row["source"] == "wds"
    data = samples[(row["file"], row["key"])]["image"]
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width * height > 89_478_485
    assert len(data) < 1_000_000
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(data))


# ------------------------------------------------------------------------------------------
# formats


def test_webdataset_reads_tars(corpus: Path, truth: pl.DataFrame) -> None:
    import webdataset as wds

    for tar_path in sorted((corpus / "image_text/wds").glob("*.tar")):
        rel = str(tar_path.relative_to(corpus))
        expected = truth.filter(pl.col("file") == rel).sort("offset")
        got = list(wds.WebDataset(str(tar_path), shardshuffle=False, empty_check=False))
        assert [s["__key__"] for s in got] == expected["key"].to_list()
        for s, dirt in zip(got, expected["dirt"].to_list()):
            assert ("jpg" in s) != ("png" in s)
            meta = json.loads(s["json"])
            assert meta["status"] == "success" and meta["url"].endswith(f"{s['__key__']}.jpg")
            assert ("txt" in s) or dirt == "empty_caption"
        with tarfile.open(tar_path) as tar:
            members = tar.getmembers()
            assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 and m.uname == "" for m in members)
            names = [m.name for m in members]
            assert names == sorted(names)
        meta = pl.read_parquet(tar_path.with_suffix(".parquet"))
        assert meta.columns == ["key", "caption", "url", "width", "height", "status"]
        assert meta["key"].to_list() == expected["key"].to_list()


def test_parquet_image_text_schema_and_row_groups(tmp_path: Path, corpus: Path) -> None:
    df = pl.read_parquet(corpus / "image_text/parquet/00000.parquet")
    assert df.schema == {
        "key": pl.String,
        "caption": pl.String,
        "image": pl.Binary,
        "url": pl.String,
        "width": pl.Int32,
        "height": pl.Int32,
    }
    out = tmp_path / "rg"
    write_sample_corpus(out, rows=1800, workers=2, progress=False)  # 270 parquet rows
    md = pq.ParquetFile(out / "image_text/parquet/00000.parquet").metadata
    assert [md.row_group(i).num_rows for i in range(md.num_row_groups)] == [250, 20]


def test_small_shards_keep_keys_and_offsets(tmp_path: Path) -> None:
    out = tmp_path / "s"
    summary = write_sample_corpus(out, rows=150, shard_rows=40, workers=2, progress=False)
    assert summary["shards"]["wds"] == 3
    t = pl.read_parquet(out / "truth.parquet").filter(pl.col("file") == "image_text/wds/00001.tar")
    assert t["key"].to_list()[:2] == ["000010000", "000010001"] and t["offset"].to_list()[:2] == [0, 1]
    assert set(DIRT_KINDS) <= set(pl.read_parquet(out / "truth.parquet")["dirt"].to_list())


def test_jsonl_image_text(corpus: Path, truth: pl.DataFrame) -> None:
    path = corpus / "image_text/jsonl/00000.jsonl"
    lines = path.read_bytes().split(b"\n")[:-1]
    t = truth.filter(pl.col("file") == "image_text/jsonl/00000.jsonl").sort("offset")
    assert len(lines) == t.height
    for raw, row in zip(lines, t.iter_rows(named=True)):
        if row["dirt"] == "malformed_json":
            with pytest.raises(json.JSONDecodeError):
                json.loads(raw)
            continue
        if row["dirt"] == "non_utf8_caption":
            with pytest.raises(UnicodeDecodeError):
                raw.decode("utf-8")
            continue
        rec = json.loads(raw)
        assert rec["key"] == row["key"]
        assert (path.parent / rec["image"]).exists() == (row["dirt"] != "missing_image")


def test_interleaved_documents(corpus: Path) -> None:
    n = 0
    for line in (corpus / "interleaved/00000.jsonl").open(encoding="utf-8"):
        doc = json.loads(line)
        assert doc["id"].startswith("doc-") and doc["url"]
        assert len(doc["texts"]) == len(doc["images"])
        assert all((t is None) != (i is None) for t, i in zip(doc["texts"], doc["images"]))
        paragraphs = [t for t in doc["texts"] if t is not None]
        images = [i for i in doc["images"] if i is not None]
        assert 2 <= len(paragraphs) <= 6 and 1 <= len(images) <= 3
        for rel in images:
            _loads((corpus / "interleaved" / rel).read_bytes())
        n += 1
    assert n == 16


def test_text_documents(corpus: Path, truth: pl.DataFrame) -> None:
    docs = [json.loads(line) for line in (corpus / "text/00000.jsonl").open(encoding="utf-8")]
    kinds = dict(
        zip(
            truth.filter(pl.col("source") == "text")["key"].to_list(),
            truth.filter(pl.col("source") == "text")["dirt"].to_list(),
        )
    )
    for doc in docs:
        assert doc["id"].startswith("txt-") and doc["url"]
        if kinds[doc["id"]] in ("clean", "exact_duplicate"):
            assert 50 <= len(doc["text"].split()) <= 400


def test_benchmark(corpus: Path) -> None:
    df = pl.read_parquet(corpus / "benchmark/vqa.parquet")
    assert df.columns == ["item_id", "question", "answer", "options", "image"]
    assert df.height == 20 and df["item_id"][0] == "vqa-0001"
    assert df.schema["options"] == pl.List(pl.String)
    jsonl = [json.loads(line) for line in (corpus / "benchmark/vqa.jsonl").open(encoding="utf-8")]
    for row, rec in zip(df.iter_rows(named=True), jsonl):
        assert rec["item_id"] == row["item_id"] and rec["answer"] == row["answer"]
        assert row["answer"] in row["options"] and len(row["options"]) == 4
        assert (corpus / "benchmark" / rec["image"]).read_bytes() == row["image"]
        assert _loads(row["image"]).format == "PNG"


# ------------------------------------------------------------------------------------------
# cold-start SFT sources


def test_sft_sources_match_their_truth(corpus: Path) -> None:
    from curation.sample import SFT_DIRT, SFT_FILES

    summary = json.loads((corpus / "corpus.json").read_text())["sft"]
    t = pl.read_parquet(corpus / summary["truth"])
    assert t.height == summary["rows"] and 60 <= t.height <= 1500
    assert dict(Counter(t["source"].to_list())) == summary["rows_by_source"]
    assert dict(Counter(t.filter(pl.col("dirt") == "clean")["mode"].to_list())) == summary["clean_by_mode"]
    for source, kinds in SFT_DIRT.items():
        present = set(t.filter(pl.col("source") == source)["dirt"].to_list())
        assert set(kinds) - {"truncated_video"} <= present, source
    assert t.filter(pl.col("dirt") == "infinite_loop").height == 1  # each costs the sandbox's timeout
    assert (
        t.filter(pl.col("dirt") == "clean")["stage"].null_count()
        == t.filter(pl.col("dirt") == "clean").height
    )
    llava = json.loads((corpus / SFT_FILES["llava"]).read_text())
    assert [r["id"] for r in llava] == t.filter(pl.col("source") == "llava")["key"].to_list()
    qa = pl.read_parquet(corpus / SFT_FILES["qa"])
    assert qa.columns == ["id", "question", "answer", "reasoning", "analysis", "image", "mode"]
    assert qa["image"].null_count() < qa.height  # some rows show an image


def test_think_with_image_code_brings_out_the_detail(corpus: Path) -> None:
    """The clean tasks' code runs on their image (here in-process: it is the generator's own template code)
    and returns an enlarged, turned or sharpened crop; the dirty code is what the sandbox must stop."""
    from curation.sample import SFT_FILES

    t = pl.read_parquet(corpus / "sft/truth.parquet").filter(pl.col("source") == "think_with_image")
    kinds = dict(zip(t["key"].to_list(), t["dirt"].to_list()))
    path = corpus / SFT_FILES["think_with_image"]
    ran = 0
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if kinds[rec["id"]] != "clean":
            if kinds[rec["id"]] in ("reads_file", "opens_socket"):
                assert "/etc/passwd" in rec["code"] or "socket" in rec["code"]
            continue
        image = Image.open(path.parent / rec["image"]).convert("RGB")
        scope = {"image": image}
        exec(compile(rec["code"], rec["id"], "exec"), scope)  # noqa: S102 - the generator's template code
        assert isinstance(scope["result"], Image.Image)
        assert scope["result"].width * scope["result"].height > 2 * 24 * 24  # enlarged, not a bare crop
        ran += 1
    assert ran == t.filter(pl.col("dirt") == "clean").height > 0


def test_video_qa_rows_point_at_clean_clips(corpus: Path, truth: pl.DataFrame) -> None:
    from curation.sample import SFT_FILES

    keys = set(truth.filter((pl.col("source") == "video") & (pl.col("dirt") == "clean"))["key"])
    clean = {f"video/clips/{p.name}" for p in (corpus / "video" / "clips").iterdir() if p.stem in keys}
    assert clean and {p.rsplit(".", 1)[1] for p in clean} <= {"mp4", "webm", "mkv"}
    path = corpus / SFT_FILES["video_qa"]
    t = pl.read_parquet(corpus / "sft/truth.parquet").filter(pl.col("source") == "video_qa")
    kinds = dict(zip(t["key"].to_list(), t["dirt"].to_list()))
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    pairs = set()
    for rec in rows:
        clip = str((path.parent / rec["video"]).resolve().relative_to(corpus.resolve()))
        if kinds[rec["id"]] == "clean":
            assert clip in clean
            pairs.add((clip, rec["question"]))
    assert len(pairs) == sum(1 for k in kinds.values() if k == "clean")  # no accidental duplicate


# ------------------------------------------------------------------------------------------
# memory


def test_memory_stays_flat(tmp_path: Path) -> None:
    """20k rows: neither the parent nor a worker may grow by more than ~300 MB."""
    script = textwrap.dedent(f"""
        import json, resource
        from curation.sample import write_sample_corpus
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        write_sample_corpus({str(tmp_path / "m")!r}, rows=20000, workers=2, progress=False)
        print(json.dumps({{"base": base, "self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                          "children": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}}))
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    kb = json.loads(res.stdout.strip().splitlines()[-1])
    assert kb["self"] - kb["base"] < 300 * 1024, kb
    assert kb["children"] - kb["base"] < 300 * 1024, kb
