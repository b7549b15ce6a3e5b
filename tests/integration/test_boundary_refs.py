"""Trust boundary: what a row may reference, which schemes it may name, and what a unit that kills its worker
costs.

Each attack is what a hostile corpus row does: point at a secret on the worker (``/proc/self/environ``,
a 0600 file through a symlink, ``..``), at a device or a pipe, or at an endpoint of its own choosing. None may
read the file or reach the endpoint; each is a reject with its own reason that names the row, never the bytes.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation.io import refs
from curation.io.readers import plan_units, read_unit
from curation.recipe import SourceSpec, load_pipeline
from curation.spec import RecipeError
from tests.helpers import ROOT
from tests.helpers.images import jpeg

SECRET = "s3cr3t-v4lue-that-must-never-leak"


def rows(spec: SourceSpec) -> list[dict]:
    return [r for u in plan_units([spec]) for t in read_unit(u) for r in t.to_pylist()]


def leaked(found: list[dict], secret: bytes = SECRET.encode()) -> list[str]:
    """Columns of any row that hold the secret's bytes."""
    out = []
    for r in found:
        for k, v in r.items():
            blobs = v if isinstance(v, list) else [v]
            for b in blobs:
                if isinstance(b, str):
                    b = b.encode()
                if isinstance(b, bytes) and secret in b:
                    out.append(f"{r['source_offset']}:{k}")
    return out


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """A corpus folder next to a 0600 secret outside it, a symlink from inside to it, a FIFO and a good
    image."""
    root = tmp_path / "corpus"
    (root / "images").mkdir(parents=True)
    (root / "images" / "good.jpg").write_bytes(jpeg())
    secret = tmp_path / "credentials"
    secret.write_text(f"[default]\naws_secret_access_key = {SECRET}\n")
    secret.chmod(0o600)
    (root / "images" / "link.jpg").symlink_to(secret)
    (root / "images" / "dirlink").symlink_to(tmp_path, target_is_directory=True)
    os.mkfifo(root / "images" / "fifo.jpg")
    return root


def jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# ---------------------------------------------------------------- references


@pytest.mark.parametrize(
    "ref, reason",
    [
        ("/proc/self/environ", "refused_reference"),
        ("/etc/passwd", "refused_reference"),
        ("file:///etc/passwd", "refused_scheme"),
        ("../../../../../../../etc/hostname", "refused_reference"),
        ("../credentials", "refused_reference"),
        ("images/link.jpg", "refused_reference"),  # a symlink in the corpus to the 0600 file outside it
        ("images/dirlink/credentials", "refused_reference"),  # a symlinked folder
        ("images/fifo.jpg", "refused_reference"),  # a pipe would block the reader forever
        ("/dev/zero", "refused_reference"),
        ("~/.aws/credentials", "refused_reference"),
        ("images/good.jpg\0/etc/passwd", "refused_reference"),
    ],
)
def test_a_row_cannot_make_the_reader_read_outside_its_roots(corpus, ref, reason, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)  # what /proc/self/environ would hand over
    jsonl(
        corpus / "pairs.jsonl",
        [{"caption": "x", "image": ref}, {"caption": "a good one", "image": "images/good.jpg"}],
    )
    got = rows(
        SourceSpec(name="p", format="jsonl", modality="image_text", paths=[str(corpus / "pairs.jsonl")])
    )
    bad, good = got
    assert bad["reject_reason"] == reason, bad["reject_detail"]
    assert bad["image"] is None and "pairs.jsonl#0" in bad["reject_detail"]
    assert not leaked(got)
    assert good["reject_reason"] is None and good["image"] == jpeg()


def test_absolute_paths_need_allow_absolute_and_still_a_root(corpus, tmp_path):
    good = str(corpus / "images" / "good.jpg")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "b.jpg").write_bytes(jpeg(32, 32))
    jsonl(
        corpus / "abs.jsonl",
        [
            {"caption": "a", "image": good},
            {"caption": "b", "image": str(elsewhere / "b.jpg")},
            {"caption": "c", "image": str(tmp_path / "credentials")},
        ],
    )
    base = {"name": "p", "format": "jsonl", "modality": "image_text", "paths": [str(corpus / "abs.jsonl")]}
    assert [r["reject_reason"] for r in rows(SourceSpec(**base))] == ["refused_reference"] * 3
    got = rows(SourceSpec(**base, allow_absolute=True))
    assert [r["reject_reason"] for r in got] == [None, "refused_reference", "refused_reference"]
    got = rows(SourceSpec(**base, allow_absolute=True, media_roots=[str(elsewhere)]))
    assert [r["reject_reason"] for r in got] == [None, None, "refused_reference"]
    assert got[1]["image"] == jpeg(32, 32) and not leaked(got)


def test_conversation_images_videos_and_image_root_are_confined(corpus):
    (corpus / "sft").mkdir()
    jsonl(
        corpus / "sft" / "qa.jsonl",
        [
            {"question": "What is shown?", "answer": "A circle.", "image": "good.jpg"},
            {"question": "What is shown?", "answer": "A circle.", "image": "../../credentials"},
            {"question": "What is shown?", "answer": "A circle.", "image": "/proc/self/environ"},
            {"question": "What happens?", "answer": "Nothing.", "video": "../../credentials"},
        ],
    )
    got = rows(
        SourceSpec(
            name="q",
            format="qa",
            modality="sft",
            paths=[str(corpus / "sft" / "qa.jsonl")],
            fields={"image_root": "../images"},
        )
    )
    assert [r["reject_reason"] for r in got] == [
        None,
        "refused_reference",
        "refused_reference",
        "refused_reference",
    ]
    assert got[0]["images"] == [jpeg()] and not leaked(got)


def test_video_references_in_jsonl_and_parquet_are_confined(corpus):
    jsonl(
        corpus / "v.jsonl",
        [{"caption": "v", "video": "/etc/passwd"}, {"caption": "v", "video": "../credentials"}],
    )
    got = rows(SourceSpec(name="v", format="jsonl", modality="video", paths=[str(corpus / "v.jsonl")]))
    assert [r["reject_reason"] for r in got] == ["refused_reference"] * 2 and not leaked(got)
    pq.write_table(
        pa.table(
            {
                "caption": ["a", "b"],
                "video": [
                    {"bytes": None, "path": "/proc/self/environ"},
                    {"bytes": None, "path": "images/link.jpg"},
                ],
            }
        ),
        corpus / "v.parquet",
    )
    got = rows(
        SourceSpec(
            name="v",
            format="parquet",
            modality="video",
            paths=[str(corpus / "v.parquet")],
            video={"shots": True},
        )
    )
    assert [r["reject_reason"] for r in got] == ["refused_reference"] * 2 and not leaked(got)


def test_benchmark_files_are_confined_too(corpus, tmp_path):
    from curation.dedup.registry import BenchmarkSpec, read_items

    jsonl(
        corpus / "bench.jsonl",
        [
            {
                "id": "a",
                "question": "What is in the picture here?",
                "image": "images/link.jpg",
                "video": "/etc/passwd",
            }
        ],
    )
    problems: list = []
    (item,) = read_items(
        BenchmarkSpec(
            "b",
            [str(corpus / "bench.jsonl")],
            {"id": "id", "question": "question", "image": "image", "video": "video"},
        ),
        problems,
    )
    assert item.images == [] and item.video is None
    assert any("refused_reference" in i for i in item.issues) and SECRET not in json.dumps(item.issues)


# ---------------------------------------------------------------- schemes


@pytest.fixture
def listener():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    srv.settimeout(0.5)
    yield srv
    srv.close()


def test_a_row_never_chooses_an_endpoint_or_a_scheme(corpus, listener):
    port = listener.getsockname()[1]
    refs_ = [
        f"gs://bkt/obj.jpg?endpoint_override=127.0.0.1:{port}&scheme=http",
        f"s3://bkt/obj.jpg?endpoint_override=127.0.0.1:{port}",
        "abfs://container@account.dfs.core.windows.net/x.jpg",
        f"http://127.0.0.1:{port}/x.jpg",
        "hdfs://namenode/x.jpg",
        f"s3://user:{SECRET}@bkt/x.jpg",
    ]
    jsonl(corpus / "remote.jsonl", [{"caption": "r", "image": r} for r in refs_])
    got = rows(
        SourceSpec(
            name="r",
            format="jsonl",
            modality="image_text",
            paths=[str(corpus / "remote.jsonl")],
            allow_absolute=True,
            media_roots=["s3://bkt"],
        )
    )
    assert [r["reject_reason"] for r in got] == ["refused_scheme"] * len(refs_), [
        r["reject_detail"] for r in got
    ]
    assert SECRET not in json.dumps([r["reject_detail"] for r in got])
    with pytest.raises(socket.timeout):
        listener.accept()  # nobody connected


def test_s3_references_must_lie_under_an_s3_root(corpus):
    p = refs.policy(str(corpus / "x.jsonl"), ["s3://bkt/images"], allow_absolute=True)
    assert p.resolve("s3://bkt/images/a/b.jpg", str(corpus)) == "s3://bkt/images/a/b.jpg"
    for bad in (
        "s3://bkt/other/x.jpg",
        "s3://bkt/images/../other/x.jpg",
        "s3://other/images/x.jpg",
        "s3://bkt/imagesX/x.jpg",
    ):
        with pytest.raises(refs.RefusedReference):
            p.resolve(bad, str(corpus))
    with pytest.raises(refs.RefusedReference) as e:
        refs.policy("s3://bkt/corpus/x.jsonl").resolve("../../other/x.jpg", "s3://bkt/corpus")
    assert e.value.reason == "refused_reference"
    assert (
        refs.policy("s3://bkt/corpus/x.jsonl").resolve("img/x.jpg", "s3://bkt/corpus")
        == "s3://bkt/corpus/img/x.jpg"
    )


def test_recipes_refuse_schemes_with_file_systems_of_their_own(tmp_path):
    from curation.io import fs as cfs

    with pytest.raises(ValueError, match="unsupported location"):
        cfs.filesystem("gs://bkt/x?endpoint_override=127.0.0.1:1")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "sources:\n  - {name: a, format: jsonl, modality: text, paths: ['gs://b/x.jsonl'],"
        " schemes: [s3, gs], media_roots: ['hdfs://nn/x']}\nstages: []\noutput: {path: 'abfs://c/out'}\n"
    )
    with pytest.raises(RecipeError) as e:
        load_pipeline(recipe)
    text = str(e.value)
    for key in ("sources.0.schemes", "sources.0.media_roots.0", "sources.0.paths.0", "output.path"):
        assert key in text, text


# ---------------------------------------------------------------- rejects and crashing units


def test_rejects_do_not_keep_the_bytes_of_media_that_did_not_decode(tmp_path, ray_local):
    from curation.pipeline import run_pipeline

    corpus = tmp_path / "c"
    (corpus / "images").mkdir(parents=True)
    (corpus / "images" / "notes.jpg").write_text(f"not an image: {SECRET}")
    (corpus / "images" / "ok.jpg").write_bytes(jpeg())
    jsonl(
        corpus / "p.jsonl",
        [
            {"caption": "one two three", "image": "images/notes.jpg"},
            {"caption": "four five six", "image": "images/ok.jpg"},
        ],
    )
    recipe = tmp_path / "r.yaml"
    for keep in (False, True):
        recipe.write_text(
            f"sources:\n  - {{name: p, format: jsonl, modality: image_text, paths: ['{corpus}/p.jsonl']}}\n"
            f"stages: [image_decode: {{}}]\n"
            f"output: {{path: '{tmp_path}/pool{keep}', reject_media: {str(keep).lower()}}}\n"
            "execution: {num_workers: 1}\n"
        )
        run_pipeline(load_pipeline(recipe), progress=False)
        rej = pq.read_table(next((tmp_path / f"pool{keep}" / "rejects").glob("*.parquet"))).to_pylist()
        assert [r["reject_reason"] for r in rej] == ["undecodable"]
        assert (rej[0]["image"] is not None) is keep


def test_a_unit_that_kills_its_worker_costs_that_unit_once_not_the_run(tmp_path, ray_local):
    """Every task that reads the poisoned unit aborts its process (as the Azure SDK did on one abfs:// row):
    Ray retries a finite number of times, the other units finish, and the poisoned one is recorded as
    failed."""
    import ray.cloudpickle

    from curation import runner

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    for name in ("a", "poison", "b", "c"):
        (tmp_path / f"{name}.jsonl").write_text('{"text": "hello"}\n')
    units = plan_units(
        [SourceSpec(name="t", format="jsonl", modality="text", paths=[str(tmp_path / "*.jsonl")])]
    )
    attempts = tmp_path / "attempts"
    out = list(runner.map_units(units, _abort_on_poison, {"log": str(attempts)}, workers=2, tasks=2))
    records = [json.loads(r) for b in out for r in b["record"]]
    by_uri = {Path(r["uri"]).stem: r for r in records}
    assert set(by_uri) == {"a", "b", "c", "poison"}
    assert by_uri["poison"]["failed"] and "its rows are left out" in by_uri["poison"]["failed"]
    assert all(by_uri[k]["failed"] is None for k in "abc")
    tries = attempts.read_text().split()
    assert (
        tries.count("poison") == runner.TASK_RETRIES + 1 + 2
    )  # the plan's tries, then alone: a try and a retry


def _abort_on_poison(batch, log: str):
    import numpy as np

    from curation.io.readers import Unit

    out = []
    for item in batch["item"]:
        unit = Unit(**json.loads(item))
        if "poison" in unit.uri and not unit.failed:
            with open(log, "a") as f:
                f.write("poison\n")
            os.abort()
        out.append(json.dumps({"uri": unit.uri, "failed": unit.failed}))
    return {"record": np.array(out, dtype=object)}


def test_a_failed_unit_is_one_reject_that_says_what_happened(tmp_path):
    from dataclasses import replace

    (tmp_path / "a.jsonl").write_text('{"text": "hello"}\n' * 5)
    (unit,) = plan_units(
        [SourceSpec(name="t", format="jsonl", modality="text", paths=[str(tmp_path / "a.jsonl")])]
    )
    got = [r for t in read_unit(replace(unit, failed="the worker died: SIGABRT")) for r in t.to_pylist()]
    assert len(got) == 1 and got[0]["reject_reason"] == "unit_failed" and "SIGABRT" in got[0]["reject_detail"]


def test_a_non_root_reader_is_confined_the_same_way(tmp_path):
    """The policy does not lean on file permissions: as an unprivileged user the same references are
    refused."""
    import shutil
    import tempfile

    if os.geteuid() != 0:
        pytest.skip("needs root to switch to another user")
    top = Path(tempfile.mkdtemp(prefix="refs-nonroot-"))  # pytest's tmp folders are closed to other users
    try:
        _non_root_case(top)
    finally:
        shutil.rmtree(top)


def _non_root_case(top: Path) -> None:
    os.chmod(top, 0o755)
    corpus = top / "corpus"
    corpus.mkdir(mode=0o755)
    (top / "credentials").write_text(SECRET)
    os.chmod(top / "credentials", 0o644)  # readable by anyone: only the policy stands in the way
    jsonl(corpus / "pairs.jsonl", [{"caption": "x", "image": r} for r in ("/etc/passwd", "../credentials")])
    code = (
        f"import json, sys; sys.path.insert(0, {str(ROOT)!r});"
        "from tests.integration.test_boundary_refs import rows;"
        f"from curation.recipe import SourceSpec;"
        f"print(json.dumps([r['reject_reason'] for r in rows(SourceSpec(name='p', format='jsonl', "
        f"modality='image_text', paths=[{str(corpus / 'pairs.jsonl')!r}]))]))"
    )
    proc = subprocess.run(
        ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd="/",
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1]) == ["refused_reference"] * 2


# ---------------------------------------------------------------- fuzzing


_PARTS = [
    "..",
    ".",
    "",
    "images",
    "good.jpg",
    "link.jpg",
    "dirlink",
    "credentials",
    "fifo.jpg",
    "~",
    "proc",
    "self",
    "environ",
    "etc",
    "passwd",
    "dev",
    "zero",
    "%2e%2e",
    "a b",
    "\\..\\",
    "é",
    "s3:",
    "file:",
    "gs:",
    "bkt",
    "?x=1",
    "#frag",
    "user:pw@bkt",
    "C:",
    "//",
]


def test_fuzzed_references_never_resolve_outside_a_root(corpus, tmp_path):
    """Whatever a row writes, ``resolve`` either refuses or names a path under a root, and reading it never
    returns the secret."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    policies = [
        refs.policy(str(corpus / "x.jsonl")),
        refs.policy(str(corpus / "x.jsonl"), [str(corpus / "images")], allow_absolute=True),
        refs.policy(str(corpus / "x.jsonl"), ["s3://bkt/images"], allow_absolute=True),
    ]
    roots = [refs.normalize_root(str(corpus))]
    prefixes = st.sampled_from(
        ["", "/", "./", "file://", "s3://", "gs://", str(corpus) + "/", str(tmp_path) + "/"]
    )
    refs_ = st.builds(
        lambda p, parts: p + "/".join(parts), prefixes, st.lists(st.sampled_from(_PARTS), max_size=8)
    )

    @settings(
        max_examples=400,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(refs_ | st.text(max_size=40))
    def check(ref):
        for p in policies:
            try:
                target = p.resolve(ref, str(corpus))
            except refs.RefusedReference as e:
                assert e.reason in ("refused_reference", "refused_scheme")
                continue
            if target.startswith("s3://"):
                assert target.startswith("s3://bkt/images/") and ".." not in target.split("/")
                continue
            assert any(target == r or target.startswith(r + "/") for r in roots + list(p.roots)), target
            assert os.path.realpath(target) == target
            try:
                data = refs.fetch(target, limit=1 << 20)
            except (OSError, refs.RefusedReference):
                continue
            assert SECRET.encode() not in data

    check()
