"""The think-with-image sandbox: image code runs; every escape attempt is stopped and classified.

Each case is one fresh interpreter (about 0.2 s). Escapes are tried twice over: with every layer (the
audit hook stops them first and names the operation), and with the audit hook left out, to show the
kernel layers stop the same attempts on their own.
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

from curation.synth.sandbox import MAX_STDOUT, run_code

RED_BOX = (8, 8, 24, 20)  # 16 x 12


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


@pytest.fixture
def tcp_server():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    srv.settimeout(0.3)
    yield srv
    srv.close()


def got_connection(srv: socket.socket) -> bool:
    try:
        conn, _ = srv.accept()
    except TimeoutError:
        return False
    conn.close()
    return True


# ------------------------------------------------------------------ what the code may do

def test_crop_zoom_and_print():
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
    assert {"process", "rlimits", "audit"} <= set(r.layers)


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


def test_output_png_file_and_input_png_from_jpeg(tmp_path):
    buf = io.BytesIO()
    picture().save(buf, "JPEG", quality=95)
    r = run_code(textwrap.dedent("""
        seen = Image.open("input.png")
        print(seen.format, seen.size, image.size)
        ImageEnhance.Contrast(image).enhance(2.0).save("output.png")
    """), buf.getvalue(), scratch_root=str(tmp_path))
    assert r.ok, r.detail
    assert list(tmp_path.iterdir()) == []  # the scratch folder is gone
    assert r.stdout == "PNG (64, 48) (64, 48)\n"  # the JPEG was handed over as input.png, a PNG
    decoded = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    assert np.array_equal(np.array(decode(r.image)), np.array(ImageEnhance.Contrast(decoded).enhance(2.0)))


def test_stdout_is_truncated():
    r = run("print('x' * 100000)\nresult = image")
    assert r.ok and len(r.stdout) == MAX_STDOUT


@pytest.mark.parametrize("code, reason, words", [
    ("x = 1", "no_output", ["result"]),
    ("result = 42", "bad_output", ["int"]),
    ("result = Image.new('L', (5000, 5000))", "bad_output", ["5000x5000"]),
    ("a = 1\nb = a / 0", "error", ["ZeroDivisionError", "line 2"]),
])
def test_failures_of_the_code(code, reason, words):
    r = run(code, max_output_pixels=4096 * 4096 // 2)
    assert not r.ok and r.reason == reason and r.image is None
    assert all(w in r.detail for w in words), r.detail


# ------------------------------------------------------------------ escapes, all layers

def test_network_is_blocked(tcp_server):
    port = tcp_server.getsockname()[1]
    blocked(run(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)"), "import of 'socket'")
    # around the import allowlist: import machinery reached through an already loaded module
    r = run(f"s = Image.sys.modules['importlib'].import_module('socket')\n"
            f"s.create_connection(('127.0.0.1', {port}), timeout=2)")
    blocked(r)
    assert not got_connection(tcp_server)


def test_dns_is_blocked():
    blocked(run("import socket\nprint(socket.getaddrinfo('localhost', 80))"), "import of 'socket'")


def test_reading_outside_scratch(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("hunter2-secret")
    r = run(f"print(open({str(secret)!r}).read())\nresult = image")
    blocked(r, "open", str(secret), "reading")
    assert "hunter2" not in r.stdout
    blocked(run("print(open('/etc/passwd').read())"), "/etc/passwd")
    blocked(run("print(open('../' * 12 + 'etc/passwd').read())"), "(/etc/passwd)")
    blocked(run("print(open('../verdict', 'rb').read())"), "verdict")  # the harness's own files
    blocked(run("print(Image.os.listdir('/'))"), "os.listdir /")


def test_writing_and_deleting_outside_scratch(tmp_path):
    target = tmp_path / "pwned.txt"
    blocked(run(f"open({str(target)!r}, 'w').write('x')"), "open", "writing")
    assert not target.exists()
    keep = tmp_path / "keep.txt"
    keep.write_text("keep")
    blocked(run(f"Image.os.remove({str(keep)!r})"), "os.remove", str(keep))
    blocked(run(f"Image.os.rename({str(keep)!r}, 'stolen')"), "os.rename")
    assert keep.read_text() == "keep"


def test_symlink_out_of_scratch():
    blocked(run("Image.os.symlink('/etc/passwd', 'x')\nprint(open('x').read())"), "os.symlink", "/etc/passwd")
    blocked(run("Image.os.chdir('/')"), "os.chdir")


def test_processes_are_blocked():
    blocked(run("Image.os.fork()"), "os.fork")
    blocked(run("import subprocess"), "import of 'subprocess'")
    blocked(run("Image.sys.modules['subprocess'].run(['id'])"), "subprocess.Popen", "'id'")
    blocked(run("Image.os.system('id')"), "os.system")
    blocked(run("Image.os.kill(1, 0)"), "os.kill")


def test_native_code_is_blocked():
    blocked(run("import ctypes"), "import of 'ctypes'")
    # numpy imported ctypes for itself: reachable through an allowed module, still refused
    blocked(run("import numpy._core._internal as i\ni.ctypes.CDLL(None)"), "ctypes.dlopen")
    blocked(run("Image.sys.modules['ctypes'].pythonapi.Py_GetVersion()"), "ctypes.dlsym")


def test_catching_the_refusal_does_not_help():
    r = run("""
        try:
            data = open('/etc/passwd').read()
        except Exception:
            data = ''
        result = image
    """)
    blocked(r, "/etc/passwd")


def test_harness_state_is_out_of_reach():
    blocked(run("try:\n    1 / 0\nexcept Exception as e:\n    f = e.__traceback__.tb_frame"), "tb_frame")
    blocked(run("Image.sys._getframe(1)"), "sys._getframe")
    blocked(run("f = lambda: 0\nf.__code__ = (lambda: 1).__code__"), "__code__")
    # writing a verdict to every descriptor does not make a failing run succeed: it lacks the run's key
    r = run("""
        import json
        fake = json.dumps({"reason": None, "png_len": 0}).encode()
        for fd in range(64):
            try:
                Image.os.write(fd, b"key " + fake + b"\\n")
            except OSError:
                pass
        print('{"ok": true}')
        raise ValueError("not ok")
    """)
    assert not r.ok and r.reason == "error" and "not ok" in r.detail


def test_endless_code_times_out():
    r = run("while True:\n    pass", timeout_s=3, cpu_s=1)  # CPU limit first
    assert not r.ok and r.reason == "timeout" and "CPU" in r.detail
    assert r.elapsed < 3 + 10
    r = run("Image.sys.modules['time'].sleep(60)", timeout_s=1.5)  # no CPU used: the wall clock
    assert not r.ok and r.reason == "timeout" and "wall-clock" in r.detail
    assert r.elapsed < 1.5 + 10


@pytest.mark.parametrize("code", ["x = bytearray(8 * 2**30)", "a = np.ones((40000, 40000))"])
def test_huge_allocations_hit_the_memory_limit(code):
    r = run(code, memory_mb=256)
    assert not r.ok and r.reason == "memory", (r.reason, r.detail)


# ------------------------------------------------------------------ escapes, kernel layers alone

@pytest.fixture
def open_dir():
    """A folder anyone may read and write (so file permissions stop nothing), under the system temp folder."""
    path = Path(tempfile.mkdtemp())
    path.chmod(0o777)
    yield path
    shutil.rmtree(path)


def test_kernel_layers_alone_stop_files_and_processes(open_dir, layers):
    if not any(x.startswith("landlock") for x in layers):
        pytest.skip(f"Landlock is not available here (layers: {layers})")
    secret = open_dir / "secret.txt"
    secret.write_text("hunter2-secret")
    secret.chmod(0o666)
    target, marker = open_dir / "pwned.txt", open_dir / "exec-ran"
    attempts = {
        "read": f"print(open({str(secret)!r}).read())",
        "symlink": f"import os\nos.symlink({str(secret)!r}, 'x')\nprint(open('x').read())",
        "write": f"open({str(target)!r}, 'w').write('x')",
        "delete": f"import os\nos.remove({str(secret)!r})",
        "exec": f"import subprocess\nsubprocess.run(['/bin/sh', '-c', 'touch {marker}'])",
        "fork": "import os\nif os.fork() == 0:\n    os._exit(0)",
    }
    for name, code in attempts.items():
        r = run(code, audit=False)
        assert "audit" not in r.layers
        assert not r.ok and r.reason == "error", (name, r.reason, r.detail)
        assert "hunter2" not in r.stdout, name
    assert secret.read_text() == "hunter2-secret" and not target.exists() and not marker.exists()


PROBE = r"""
import ctypes, json, os, resource, socket, struct, sys
from curation.synth.sandbox import _confine
scratch, tcp, udp, outside, uid = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
if uid:  # not root from here on: the user-namespace path
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    ctypes.CDLL(None).prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE, as a process started by that user is
out = {"layers": _confine({"memory_mb": 256, "cpu_s": 5, "fsize": 1 << 20}, scratch)}

def attempt(name, fn):
    try:
        out[name] = fn()
    except Exception as e:
        out[name] = "refused: " + repr(e)

def tcp_connect():
    s = socket.socket()
    s.settimeout(2)
    s.connect(("127.0.0.1", tcp))
    return "connected"

attempt("tcp", tcp_connect)
attempt("udp", lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"dns?", ("127.0.0.1", udp)))
attempt("outside", lambda: open(outside).read())
attempt("scratch", lambda: open(os.path.join(scratch, "f"), "w").write("ok") and open(os.path.join(scratch, "f")).read())
print(json.dumps(out))
"""


@pytest.mark.parametrize("uid", [0, 4242], ids=["root", "user"])
def test_kernel_layers_alone_stop_the_network(tmp_path, open_dir, tcp_server, uid):
    """The socket module loaded, no audit hook: only the network namespace and Landlock stand. As root,
    and as an ordinary user (a user namespace around the network one; the scratch folder stays usable)."""
    if uid and os.geteuid() != 0:
        pytest.skip("needs root to become another user")
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.settimeout(0.3)
    scratch = open_dir / "scratch"
    scratch.mkdir()
    if os.geteuid() == 0:  # to the user the sandbox runs as, as run_code hands it over
        os.chown(scratch, uid or 65534, uid or 65534)
    secret = open_dir / "secret.txt"
    secret.write_text("hunter2-secret")
    secret.chmod(0o666)
    proc = subprocess.run([sys.executable, "-c", PROBE, str(scratch), str(tcp_server.getsockname()[1]),
                           str(udp.getsockname()[1]), str(secret), str(uid)],
                          check=False, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    if "netns" not in out["layers"]:
        pytest.skip(f"no network namespace here (layers: {out['layers']})")
    assert out["tcp"].startswith("refused") and out["udp"].startswith("refused"), out
    assert not got_connection(tcp_server)
    with pytest.raises(TimeoutError):
        udp.recvfrom(64)
    udp.close()
    assert out["scratch"] == "ok"
    if any(x.startswith("landlock") for x in out["layers"]):
        assert out["outside"].startswith("refused"), out
