"""Secrets never print: credentials from the environment, a profile file, URI userinfo or a query string are
masked in every message, log line, traceback and resolved recipe (curation.secrets)."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from curation import secrets
from curation.io.fs import storage_problem
from curation.recipe import load_pipeline
from curation.spec import RecipeError

SECRET = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"  # the shape of an AWS secret key: "/" and "+" included
KEY_ID = "AKIAIOSFODNN7EXAMPLE"


@pytest.fixture
def installed():
    """secrets.install() in this process, undone afterwards."""
    saved = logging.getLogRecordFactory(), sys.excepthook, threading.excepthook
    secrets.install()
    yield
    logging.setLogRecordFactory(saved[0])
    sys.excepthook, threading.excepthook = saved[1], saved[2]


def test_redact_masks_uri_userinfo():
    assert secrets.redact(f"s3://{KEY_ID}:{SECRET}@bucket/pool") == "s3://***@bucket/pool"
    assert (
        secrets.redact("endpoint http://admin:hunter2hunter2@10.0.0.5:8333/x")
        == "endpoint http://***@10.0.0.5:8333/x"
    )
    # pyarrow quotes an s3:// URI without its scheme
    assert SECRET not in secrets.redact(f"got a URI: '{KEY_ID}:{SECRET}@bucket/pool/_work'")
    for harmless in (
        "s3://bucket/a@2x.jpg",
        "http://host:8080/v1",
        "mail bob@example.com",
        "--set key=value",
    ):
        assert secrets.redact(harmless) == harmless


def test_redact_masks_environment_values(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("MY_VLM_API_KEY", "sk-live-0123456789")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://admin:pw-in-endpoint@127.0.0.1:9000")
    text = secrets.redact(
        f"refused {KEY_ID} / {SECRET}; key sk-live-0123456789; via admin:pw-in-endpoint@127.0.0.1"
    )
    for value in (SECRET, KEY_ID, "sk-live-0123456789", "pw-in-endpoint"):
        assert value not in text
    secrets.remember("a-key-from-any-variable")
    assert secrets.redact("Bearer? no: a-key-from-any-variable") == "Bearer? no: ***"


def test_redact_masks_profile_file_values(monkeypatch, tmp_path):
    creds = tmp_path / "credentials"
    creds.write_text(
        f"[default]\naws_access_key_id = {KEY_ID}\naws_secret_access_key = {SECRET}\n"
        "[other]\naws_session_token = FwoGZXIvYXdzEXAMPLETOKEN\n"
    )
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds))
    text = secrets.redact(f"{SECRET} {KEY_ID} FwoGZXIvYXdzEXAMPLETOKEN")
    assert text == "*** *** ***"
    creds.write_text("not an ini file at all [[[")  # a broken profile masks nothing and raises nothing
    assert secrets.redact("plain") == "plain"


def test_redact_masks_secret_query_parameters():
    url = "https://b.s3.amazonaws.com/k?X-Amz-Credential=AKIA%2F1&X-Amz-Signature=abc123&X-Amz-Date=2024&token=t0k&sig=s"
    assert secrets.redact(url) == (
        "https://b.s3.amazonaws.com/k?X-Amz-Credential=***&X-Amz-Signature=***"
        "&X-Amz-Date=2024&token=***&sig=***"
    )
    assert secrets.redact("Authorization: Bearer sk-abcdef") == "Authorization: Bearer ***"


def test_log_records_and_their_exceptions_are_redacted(installed, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    out = io.StringIO()
    handler = logging.StreamHandler(out)  # added after install(): the record is masked where it is made
    log = logging.getLogger("test_secrets")
    log.addHandler(handler)
    try:
        log.warning("writing to %s", f"s3://{KEY_ID}:{SECRET}@bucket/x")
        try:
            raise OSError(f"the server said: bad signature for secret {SECRET}")
        except OSError:
            log.exception("storage failed")
    finally:
        log.removeHandler(handler)
    text = out.getvalue()
    assert SECRET not in text and KEY_ID not in text
    assert "s3://***@bucket/x" in text and "OSError: the server said: bad signature for secret ***" in text


def test_storage_problem_masks_the_secret(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://admin:pw-in-endpoint@127.0.0.1:9000")
    msg = storage_problem(f"s3://{KEY_ID}:{SECRET}@bucket/pool", OSError(f"AccessDenied for {SECRET}"))
    assert SECRET not in msg and KEY_ID not in msg and "pw-in-endpoint" not in msg
    assert "refused the credentials" in msg


def _cli(*args: str, env: dict[str, str], cwd: Path, code: str | None = None) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and not k.startswith("AWS_")}
    full.update(env, CI="1")
    cmd = [sys.executable, "-c", code] if code else [sys.executable, "-m", "curation.cli", *args]
    return subprocess.run(cmd, env=full, cwd=cwd, capture_output=True, text=True, timeout=300, check=False)


def test_credentials_in_the_output_uri_are_a_recipe_error_that_does_not_echo_them(tiny_recipe, tmp_path):
    r = _cli(
        "run",
        str(tiny_recipe),
        "-q",
        "--set",
        f"output.path=s3://{KEY_ID}:{SECRET}@bucket/pool",
        env={},
        cwd=tmp_path,
    )
    assert r.returncode == 2, r.stderr
    assert "output.path: a URI with credentials in it ('s3://***@bucket/pool')" in r.stderr
    assert "Traceback" not in r.stderr
    for value in (SECRET, KEY_ID):
        assert value not in r.stdout + r.stderr


def test_credentials_in_a_source_or_a_variable_are_refused(tiny_recipe):
    with pytest.raises(RecipeError) as e:
        load_pipeline(tiny_recipe, [f"vars.corpus=s3://{KEY_ID}:{SECRET}@bucket/corpus"])
    assert "vars.corpus: a URI with credentials" in str(e.value)
    assert "sources.0.paths.0: a URI with credentials" in str(e.value)
    assert SECRET not in str(e.value) and KEY_ID not in str(e.value)


def test_an_escaping_traceback_is_redacted(tmp_path):
    code = (
        "from curation import secrets\nsecrets.install()\n"
        f"raise RuntimeError('cannot open s3://{KEY_ID}:x@b/k with ' + 'SEKRET' + '-VALUE-123')"
    )
    r = _cli(env={"AWS_SECRET_ACCESS_KEY": "SEKRET-VALUE-123"}, cwd=tmp_path, code=code)
    assert r.returncode == 1
    assert (
        "Traceback (most recent call last)" in r.stderr
        and "RuntimeError: cannot open s3://***@b/k with ***" in r.stderr
    )
    assert "SEKRET-VALUE-123" not in r.stderr and KEY_ID not in r.stderr


def test_the_resolved_recipe_next_to_the_pool_holds_no_secret(ray_local, tiny_recipe, tmp_path, monkeypatch):
    from curation.pipeline import run_pipeline

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    recipe = load_pipeline(
        tiny_recipe, [f"vars.note=signed https://h/x?X-Amz-Signature=sig0123456 key {SECRET}"]
    )
    assert recipe.resolved["vars"]["note"] == "signed https://h/x?X-Amz-Signature=*** key ***"
    result = run_pipeline(recipe, progress=False)
    written = [
        p for p in Path(result.pool).rglob("*") if p.is_file() and p.suffix in (".json", ".html", ".txt")
    ]
    assert any(p.name == "manifest.json" for p in written)
    for p in written:
        text = p.read_text(errors="replace")
        assert SECRET not in text and "sig0123456" not in text, p


def _log_a_uri(batch, uri: str):
    import logging as lg

    import numpy as np

    lg.getLogger("curation.test").warning("worker saw %s", uri)
    return {"n": np.array([len(batch["item"])])}


def test_what_a_ray_worker_logs_is_redacted(ray_local):
    """Worker logs are files people share: a task of ours masks credentials before its first log line."""
    import ray
    import ray.cloudpickle

    from curation.runner import map_items

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    uri = f"s3://AKIAWORKERKEY:{SECRET}-worker@bucket/x"
    assert (
        sum(
            int(b["n"].sum()) for b in map_items([{"a": i} for i in range(4)], _log_a_uri, {"uri": uri}, 2, 2)
        )
        == 4
    )
    logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path())
    text = "".join(p.read_text(errors="replace") for p in logs.glob("worker-*") if p.is_file())
    assert "worker saw s3://***@bucket/x" in text
    assert f"{SECRET}-worker" not in text
