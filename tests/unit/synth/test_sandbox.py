"""The think-with-image sandbox: image code runs; every escape attempt is stopped; the verdict cannot be
forged; where a required kernel layer is missing it refuses to run.

Each run is one fresh interpreter in bubblewrap (0.2-0.5 s). The escape attempts run four ways: with
every layer (the audit hook stops them first and names the operation), with the audit hook left out
(the kernel layers alone), with Landlock left out too, and from a worker that is not root. In every
case the attempt must fail and the secret's bytes must never come back.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from curation.synth import sandbox
from curation.synth.sandbox import MAX_STDOUT, SandboxUnavailable, check_sandbox, run_code
from tests.helpers import ROOT

RED_BOX = (8, 8, 24, 20)  # 16 x 12
SECRET = "AKIAHUNTER2-aws-secret-7f3c"
WORKER_UID = 1000  # the simulated non-root worker


def picture() -> Image.Image:
    """64 x 48: a horizontal grey gradient with a red box at RED_BOX."""
    a = np.tile(np.linspace(0, 255, 64, dtype=np.uint8), (48, 1))
    img = Image.fromarray(np.stack([a, a, a], axis=-1))
    img.paste((255, 0, 0), RED_BOX)
    return img


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def decode(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    assert im.format == "PNG"
    return im.convert("RGB")


def run(code: str, **kw):
    return run_code(textwrap.dedent(code), png(picture()), **kw)


def blocked(r, *words: str) -> None:
    assert not r.ok and r.reason == "blocked", (r.reason, r.detail)
    assert r.image is None
    for w in words:
        assert w in r.detail, (w, r.detail)


@pytest.fixture(scope="module")
def layers() -> tuple[str, ...]:
    r = run("result = image")
    assert r.ok, r.detail
    return r.layers


# ------------------------------------------------------------------ what the code may do


def test_crop_zoom_and_print(layers):
    r = run(f"""
        box = image.crop({RED_BOX})
        print("cropped", box.size)
        result = box.resize((box.width * 2, box.height * 2))
    """)
    assert r.ok, r.detail
    assert r.size == (32, 24)
    out = decode(r.image)
    assert out.size == (32, 24) and set(out.getdata()) == {(255, 0, 0)}
    assert r.stdout == "cropped (16, 12)\n"
    assert {"process", "bwrap", "rlimits", "seccomp", "audit"} <= set(r.layers)
    assert f"uid:{sandbox.NOBODY}" in r.layers or f"userns:{sandbox.NOBODY}" in r.layers


def test_rotate_with_numpy_matches_pil_here():
    r = run("""
        a = np.array(image.rotate(90, expand=True))
        a[0, 0] = (0, 255, 0)
        result = Image.fromarray(a)
    """)
    assert r.ok, r.detail
    expected = np.array(picture().rotate(90, expand=True))
    expected[0, 0] = (0, 255, 0)
    assert r.size == (48, 64)
    assert np.array_equal(np.array(decode(r.image)), expected)


def test_output_png_file_and_input_png_from_jpeg(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    buf = io.BytesIO()
    picture().save(buf, "JPEG", quality=95)
    r = run_code(
        textwrap.dedent("""
        seen = Image.open("input.png")
        print(seen.format, seen.size, image.size)
        ImageEnhance.Contrast(image).enhance(2.0).save("output.png")
    """),
        buf.getvalue(),
    )
    assert r.ok, r.detail
    assert list(tmp_path.iterdir()) == []  # nothing on the host: the scratch folder was a tmpfs
    assert r.stdout == "PNG (64, 48) (64, 48)\n"  # the JPEG was handed over as input.png, a PNG
    decoded = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    assert np.array_equal(np.array(decode(r.image)), np.array(ImageEnhance.Contrast(decoded).enhance(2.0)))


def test_stdout_is_truncated():
    r = run("print('x' * 100000)\nresult = image")
    assert r.ok and len(r.stdout) == MAX_STDOUT


@pytest.mark.parametrize(
    "code, reason, words",
    [
        ("x = 1", "no_output", ["result"]),
        ("result = 42", "bad_output", ["int"]),
        ("result = Image.new('L', (5000, 5000))", "bad_output", ["5000x5000"]),
        ("a = 1\nb = a / 0", "error", ["ZeroDivisionError", "line 2"]),
    ],
)
def test_failures_of_the_code(code, reason, words):
    r = run(code, max_output_pixels=4096 * 4096 // 2)
    assert not r.ok and r.reason == reason and r.image is None
    assert all(w in r.detail for w in words), r.detail


def test_endless_code_times_out():
    r = run("while True:\n    pass", timeout_s=8, cpu_s=1)  # CPU limit first
    assert not r.ok and r.reason == "timeout" and "CPU" in r.detail
    r = run("Image.sys.modules['time'].sleep(60)", timeout_s=1.5)  # no CPU used: the wall clock
    assert not r.ok and r.reason == "timeout" and "wall-clock" in r.detail
    assert r.elapsed < 1.5 + 10


@pytest.mark.parametrize("code", ["x = bytearray(8 * 2**30)", "a = np.ones((40000, 40000))"])
def test_huge_allocations_hit_the_memory_limit(code):
    r = run(code, memory_mb=256)
    assert not r.ok and r.reason == "memory", (r.reason, r.detail)


def test_hostile_scratch_trees_vanish_with_the_sandbox(tmp_path, monkeypatch):
    """3,000 nested folders, unreadable folders, links out: the old cleanup crashed (recursion) and rejected
    the batch. The scratch is a tmpfs in the sandbox's mount namespace: it goes with the process."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    deep = """
        os = Image.os
        fd = os.open(".", os.O_RDONLY)
        for i in range(3000):
            os.mkdir("d", dir_fd=fd)
            fd2 = os.open("d", os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = fd2
        os.mkdir("locked")
        os.mkdir("locked/inner")
        os.chmod("locked", 0)
        os.symlink("/usr", "link-out")
        result = image
    """
    r = run(deep, audit=False)
    assert r.ok, (r.reason, r.detail)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ escapes with every layer (audit first)


@pytest.fixture
def targets():
    """What the attempts go after: a worker's credentials (0600) and home, a TCP listener on loopback and a
    pathname unix socket (as Ray's raylet and plasma sockets are), all reachable by the worker's uid."""
    base = Path(tempfile.mkdtemp(prefix="sandbox-targets-"))
    base.chmod(0o755)
    home = base / "home"
    (home / ".aws").mkdir(parents=True)
    creds = home / ".aws" / "credentials"
    creds.write_text(f"[default]\naws_secret_access_key = {SECRET}\n")
    creds.chmod(0o600)
    sock_dir = base / "ray"
    sock_dir.mkdir()
    sock_dir.chmod(0o777)
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(str(sock_dir / "raylet"))
    os.chmod(sock_dir / "raylet", 0o777)
    unix.listen()
    unix.settimeout(0.2)
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen()
    tcp.settimeout(0.2)
    if os.geteuid() == 0:  # the worker's own files, for the non-root runs
        for p in (home, home / ".aws", creds):
            os.chown(p, WORKER_UID, WORKER_UID)
    t = {
        "home": str(home),
        "creds": str(creds),
        "unix": str(sock_dir / "raylet"),
        "tcp": tcp.getsockname()[1],
        "tcp_sock": tcp,
        "unix_sock": unix,
    }
    yield t
    tcp.close()
    unix.close()
    shutil.rmtree(base)


def connected(t: dict) -> list[str]:
    """Which listeners got a connection."""
    got = []
    for name in ("tcp_sock", "unix_sock"):
        try:
            conn, _ = t[name].accept()
        except (TimeoutError, BlockingIOError):
            continue
        conn.close()
        got.append(name)
    return got


# The attempts, as model code would write them: through modules that are already loaded, and libc.
LIBC = "libc = Image.sys.modules['ctypes'].CDLL(None, use_errno=True)\n"
ATTEMPTS = {
    "read_credentials": "print(open({creds!r}).read())\nresult = image",
    "write_pth": "open({home!r} + '/evil.pth', 'w').write('import os')\nresult = image",
    "list_home": "print(Image.os.listdir({home!r}))\nresult = image",
    "tcp": "import socket\nsocket.create_connection(('127.0.0.1', {tcp}), timeout=2)",
    "tcp_libc": LIBC
    + "s = libc.socket(2, 1, 0)\naddr = (2).to_bytes(2, 'little') + ({tcp}).to_bytes(2, 'big')"
    " + bytes([127, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0])\nprint(libc.connect(s, addr, 16))\nresult = image",
    "unix_libc": LIBC
    + "import struct\ns = libc.socket(1, 1, 0)\naddr = struct.pack('<H108s', 1, {unix!r}.encode())\n"
    "print(libc.connect(s, addr, 110))\nresult = image",
    "sysv_shm": LIBC + "print(libc.shmget(0, 1 << 20, 0o1600))\nresult = image",
    "memfd": "fd = Image.os.memfd_create('keep')\nImage.os.ftruncate(fd, 1 << 30)\nresult = image",
    "fork": "pid = Image.os.fork()\nif pid == 0:\n    Image.os._exit(0)\nresult = image",
    "thread": (
        "import threading\nt = Image.sys.modules['threading'].Thread(target=print)\nt.start()\nresult = image"
    ),
    "exec": "Image.os.execv('/usr/bin/true', ['true'])",
}


LANDLOCK_COVERS = ("read_credentials", "write_pth", "list_home", "tcp_libc", "unix_libc", "exec")


def attempt_code(name: str, t: dict) -> str:
    return ATTEMPTS[name].format(**t)


def assert_contained(name: str, r: dict | object, t: dict) -> None:
    """Attempt ``name`` did not succeed, left nothing behind, and its secret is in no output."""
    get = r.get if isinstance(r, dict) else lambda k: getattr(r, k)
    assert not get("ok"), (name, get("reason"), get("detail"), get("stdout"))
    assert get("reason") in ("blocked", "error"), (name, get("reason"), get("detail"))
    assert SECRET not in (get("stdout") or "") + (get("detail") or ""), name
    assert not os.path.exists(os.path.join(t["home"], "evil.pth")), name
    assert connected(t) == [], name


def test_escapes_are_blocked_with_every_layer(targets):
    t = targets
    expected = {
        "read_credentials": ["open", t["creds"], "reading"],
        "write_pth": ["open", "evil.pth", "writing"],
        "list_home": ["os.listdir", t["home"]],
        "tcp": ["import of 'socket'"],
        "tcp_libc": ["ctypes"],
        "unix_libc": ["ctypes"],
        "sysv_shm": ["ctypes"],
        "memfd": [],
        "fork": ["os.fork"],
        "thread": [],
        "exec": ["os.exec"],
    }
    for name in ATTEMPTS:
        r = run_code(attempt_code(name, t), png(picture()))
        assert_contained(name, r, t)
        blocked(r, *expected[name])


def test_attempts_work_outside_the_sandbox(targets):
    """The attempts are real: run by plain Python as the same user, they read the secret and connect."""
    t = targets
    code = (
        "import ctypes, types\nfrom PIL import Image\nImage.sys.modules['ctypes'] = ctypes\nimage = None\n"
        + attempt_code("read_credentials", t)
        + "\n"
        + attempt_code("unix_libc", t)
        + "\n"
        + attempt_code("tcp_libc", t)
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert SECRET in out.stdout, out.stderr
    assert sorted(connected(t)) == ["tcp_sock", "unix_sock"]


def kernel_only(name: str, t: dict, **kw):
    return run_code(attempt_code(name, t), png(picture()), audit=False, **kw)


def test_kernel_layers_alone_stop_every_attempt(targets):
    """No audit hook: bwrap's namespaces, the uid, Landlock and seccomp stop the same attempts."""
    for name in ATTEMPTS:
        r = kernel_only(name, targets)
        assert "audit" not in r.layers
        assert_contained(name, r, targets)
    # seccomp's kill is a verdict the code cannot catch: the parent names it
    blocked(kernel_only("memfd", targets), "seccomp")
    blocked(kernel_only("unix_libc", targets), "seccomp")


def test_without_landlock_the_other_layers_still_hold(targets, monkeypatch):
    monkeypatch.setenv(sandbox.DISABLE_ENV, "landlock")
    assert not any(x.startswith("landlock") for x in check_sandbox().layers)
    for name in LANDLOCK_COVERS:  # the others do not involve Landlock: seccomp kills them first
        r = kernel_only(name, targets)
        assert not any(x.startswith("landlock") for x in r.layers)
        assert_contained(name, r, targets)
    # the worker's environment is not in the sandbox's /proc: bwrap does not stay inside as PID 1
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    r = run(
        "out = []\nfor p in ('/proc/1/environ', '/proc/self/environ'):\n"
        "    out.append(open(p, 'rb').read())\n"
        "print(out)\nresult = image",
        audit=False,
    )
    assert SECRET not in r.stdout + (r.detail or "")


RUN_AS = r"""
import json, sys
sys.path[:0] = json.loads(sys.argv[1])
from curation.synth.sandbox import run_code, check_sandbox
from PIL import Image
out = {"check": list(check_sandbox().missing), "runs": {}}
if not out["check"]:
    for name, code in json.loads(sys.stdin.read()).items():
        r = run_code(code, Image.new("RGB", (16, 16)), audit=False)
        out["runs"][name] = {k: getattr(r, k) for k in ("ok", "reason", "detail", "stdout", "layers")}
print(json.dumps(out))
"""


def run_as_worker(codes: dict[str, str]) -> dict:
    """``run_code`` for each snippet, in a process of uid WORKER_UID (as a Ray worker that is not root)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to become another user")
    paths = [str(ROOT), *sandbox._site_dirs()]
    for python in (sys.executable, "/usr/bin/python3"):  # one that uid can run, of the same minor version
        try:
            probe = subprocess.run(
                [
                    python,
                    "-I",
                    "-c",
                    (
                        "import sys, json; sys.path[:0] = json.loads(sys.argv[1]); "
                        "import numpy, PIL, pyseccomp; print(sys.version_info[:2])"
                    ),
                    json.dumps(paths),
                ],
                user=WORKER_UID,
                group=WORKER_UID,
                extra_groups=[],
                capture_output=True,
                text=True,
                check=False,
            )
        except OSError:  # not executable by that uid
            continue
        if probe.returncode == 0 and probe.stdout.strip() == str(sys.version_info[:2]):
            break
    else:
        pytest.skip(f"no Python {sys.version_info[:2]} that uid {WORKER_UID} can run")
    proc = subprocess.run(
        [python, "-I", "-c", RUN_AS, json.dumps(paths)],
        input=json.dumps(codes),
        user=WORKER_UID,
        group=WORKER_UID,
        extra_groups=[],
        capture_output=True,
        text=True,
        timeout=300,
        cwd="/",
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


def test_non_root_worker_is_contained_or_refuses(targets):
    """A worker that is not root: bwrap maps it to nobody in a user namespace. Its own 0600 credentials,
    its home and its sockets are out of reach; or, where it cannot make namespaces, nothing runs."""
    out = run_as_worker({name: attempt_code(name, targets) for name in ATTEMPTS})
    if out["check"]:  # refused: the message says what is missing
        assert any("bwrap" in m or "namespace" in m for m in out["check"]), out["check"]
        return
    assert set(out["runs"]) == set(ATTEMPTS)
    for name, r in out["runs"].items():
        assert f"userns:{sandbox.NOBODY}" in r["layers"], r["layers"]
        assert_contained(name, r, targets)


# ------------------------------------------------------------------ the audit hook cannot be switched off


def test_rule_sets_replaced_through_main_change_nothing(targets):
    """The 2024 escape: replace the harness's module-global rules, then read what they used to stop."""
    switch_off = """
        main = Image.sys.modules['__main__']
        main._PATH_EVENTS = {{}}
        main._DENIED_PREFIXES = ('nothing.',)
        main._DENIED = frozenset()
        main.ALLOWED_IMPORTS = frozenset({{'socket', 'ctypes', 'subprocess'}})
        main._FRAME_ATTRS = frozenset()
        main.SCRATCH = '/'
        b = Image.sys.modules['builtins']
        b.type = lambda o: str
        b.len = lambda o: 0
        b.MemoryError = b.BaseException = KeyError
        Image.os.path.realpath = lambda p, **k: '/scratch/x'
        Image.os.lstat = Image.os.readlink = None
    """
    for name, words in (
        ("read_credentials", ["open", targets["creds"]]),
        ("list_home", ["os.listdir"]),
        ("tcp", ["import of 'socket'"]),
        ("unix_libc", ["ctypes"]),
        ("fork", ["os.fork"]),
    ):
        r = run(textwrap.dedent(switch_off.format()) + attempt_code(name, targets))
        assert_contained(name, r, targets)
        blocked(r, *words)


# ------------------------------------------------------------------ the verdict cannot be forged


def test_a_blocked_run_stays_blocked_whatever_the_code_patched():
    """The issue's forgery: patch what the harness used to sign its verdict, then do something blocked."""
    forge = """
        import json
        os = Image.os
        real_write = os.write
        ok = json.dumps({"ok": True, "reason": None, "png_len": 0})
        def fake_write(fd, data):
            return real_write(fd, data.replace(b"blocked", b"final\\x00\\x00"))
        os.write = fake_write
        os._exit = lambda status: None
        json.dumps = lambda *a, **k: ok
        Image.sys.modules['builtins'].BaseException = KeyError
        Image.sys.excepthook = lambda *a: os.write(1, b"ok")
    """
    blocked(run(forge + "\n        print(open('/etc/passwd').read())"), "/etc/passwd")
    blocked(run(forge + "\n        Image.os.listdir('/')"), "os.listdir")


def test_forged_records_and_exits_do_not_make_a_success():
    # records written to every descriptor lack the run's key; exiting 0 leaves no final record
    for tail in ("raise ValueError('not ok')", "Image.os._exit(0)", "Image.os._exit(10)"):
        r = run(f"""
            fake = b"x 5 0\\nfinal\\x00\\x00\\x00\\x00"
            for fd in range(64):
                try:
                    Image.os.write(fd, fake)
                except OSError:
                    pass
            print('{{"ok": true}}')
            {tail}
        """)
        assert not r.ok and r.reason == "error" and r.image is None, (tail, r.reason, r.detail)
    r = run("raise ValueError('not ok')", audit=False)
    assert not r.ok and "not ok" in r.detail


def test_signal_handlers_cannot_be_installed():
    """A handler would run the code's Python inside the harness's verdict path: seccomp refuses it."""
    r = run(
        "s = Image.sys.modules['signal']\ns.signal(s.SIGALRM, lambda *a: None)\nresult = image", audit=False
    )
    assert not r.ok and r.reason == "error" and "Operation not permitted" in r.detail, r.detail


def test_harness_state_is_out_of_reach():
    blocked(run("try:\n    1 / 0\nexcept Exception as e:\n    f = e.__traceback__.tb_frame"), "tb_frame")
    blocked(run("Image.sys._getframe(1)"), "sys._getframe")
    blocked(run("f = lambda: 0\nf.__code__ = (lambda: 1).__code__"), "__code__")
    blocked(run("Image.sys.modules['gc'].get_objects()"), "gc.get_objects")


def test_other_python_level_refusals():
    blocked(run("import subprocess"), "import of 'subprocess'")
    blocked(run("Image.sys.modules['subprocess'].run(['id'])"), "subprocess.Popen", "'id'")
    blocked(run("Image.os.kill(1, 0)"), "os.kill")
    blocked(run("Image.os.symlink('/etc/passwd', 'x')\nprint(open('x').read())"), "os.symlink", "/etc/passwd")
    blocked(run("Image.os.chdir('/')"), "os.chdir")
    blocked(run("print(open('../' * 12 + 'etc/passwd').read())"), "(/etc/passwd)")
    blocked(run("import numpy._core._internal as i\ni.ctypes.CDLL(None)"), "ctypes.dlopen")
    r = run("try:\n    data = open('/etc/passwd').read()\nexcept Exception:\n    data = ''\nresult = image")
    blocked(r, "/etc/passwd")  # catching the refusal does not help


# ------------------------------------------------------------------ a missing layer: refuse, say why


@pytest.mark.parametrize(
    "layer, words", [("bwrap", ["apt-get install bubblewrap"]), ("seccomp", ["pyseccomp", "libseccomp"])]
)
def test_missing_required_layer_refuses(monkeypatch, tmp_path, layer, words):
    monkeypatch.setenv(sandbox.DISABLE_ENV, layer)
    check = check_sandbox()
    assert not check.ok and any(all(w in m for w in words) for m in check.missing), check.missing
    marker = tmp_path / "ran"
    with pytest.raises(SandboxUnavailable, match=layer):
        run_code(f"open({str(marker)!r}, 'w')", png(picture()), audit=False)
    assert not marker.exists()


def test_bwrap_that_cannot_make_namespaces_refuses(monkeypatch, tmp_path):
    fake = tmp_path / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    try:
        check = check_sandbox(refresh=True)
        assert not check.ok and "No permissions to create new namespace" in check.missing[0]
        assert "user namespaces" in check.missing[0]  # how to fix it
        with pytest.raises(SandboxUnavailable, match="namespace"):
            run("result = image")
    finally:
        monkeypatch.undo()
        assert check_sandbox(refresh=True).ok


def test_a_layer_the_harness_cannot_apply_refuses(monkeypatch):
    """The harness re-checks inside: a seccomp program the kernel rejects stops it before the code runs."""
    monkeypatch.setattr(sandbox, "_seccomp_program", lambda: b"\0" * 8)
    with pytest.raises(SandboxUnavailable, match="seccomp"):
        run("result = image")


def test_the_stage_refuses_before_reading_data(monkeypatch):
    from curation.filters import registry
    from curation.stage import NotReady

    stage = registry()["think_with_image"]()
    stage.preflight()  # every layer here
    monkeypatch.setenv(sandbox.DISABLE_ENV, "bwrap")
    with pytest.raises(NotReady, match="apt-get install bubblewrap"):
        stage.preflight()
