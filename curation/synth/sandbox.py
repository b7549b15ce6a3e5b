"""Run model- or template-written Python over an image, in a sandbox.

Why: a think-with-image trace (docs/sft-format.md) is only true if its code really ran, and that code
is untrusted. Each snippet runs in a fresh interpreter behind independent layers, so that a hole in one
layer does not open the machine:

1. Process: ``python -I -B`` per snippet (isolated mode: no ``PYTHON*`` variables, no user site), a
   minimal environment, its own session, working folder = a fresh scratch folder. The parent enforces
   the wall-clock limit and kills the whole process group.
2. Kernel, set up by the child before any user code; each layer that applied is named in
   :attr:`SandboxResult.layers`, because containers differ:

   - ``rlimits``: address space (what the preloaded libraries use + ``memory_mb``), CPU seconds, file
     size, 64 open files, no core dumps, no new processes (``RLIMIT_NPROC`` = 0; it binds once the
     child is not root: root ignores it);
   - ``netns``: a new network namespace whose only interface (loopback) is down: no network at all,
     not even 127.0.0.1 (``unshare(CLONE_NEWNET)``; with a user namespace when not root, where allowed);
   - ``uid:65534``: a child started as root becomes ``nobody`` (no capabilities; the scratch folder is
     handed to it), so file permissions apply and forking fails;
   - ``landlock:abiN``: Linux's Landlock LSM lets the process read and write only in the scratch
     folder, execute nothing, and (ABI >= 4) neither connect nor bind TCP, and (ABI >= 6) signal
     nothing outside itself. It also covers file access from C code (FreeType, libc), which the audit
     hook below cannot see.
3. Python (``audit``): a ``sys.addaudithook`` hook, which Python code cannot remove, ends the run at the
   first forbidden event, *inside* the event, so ``try/except`` around an escape does not help: opening,
   listing or modifying any path outside the scratch folder (symlinks and ``..`` resolved; ``os.chdir``
   is refused, so relative paths always start at the scratch folder), every ``socket``, ``subprocess``,
   ``ctypes`` and ``mmap`` event, ``os.fork``/``exec``/``system``/``posix_spawn``/``kill``, loading any
   module not on :data:`ALLOWED_IMPORTS`, and the ways to reach the harness's own state (frames,
   ``gc``, making code objects, ``marshal``, swapping ``__code__``, new audit hooks, tracing). The code
   also gets an ``__import__`` that refuses names off the list (an early, readable refusal; the hook
   is the rule). Threads are refused by ``RLIMIT_NPROC`` (Python 3.11 raises no audit event for them).

What is not stopped, or only by some layers:

- Modules already loaded stay reachable (``Image.os``, ``Image.sys``): what they can *do* is what the
  layers above allow. Metadata of any path (``os.stat``) is visible: neither stat nor Landlock's
  read rules cover it.
- Without Landlock (older kernels, other OSes), files touched by C code and low-level process creation
  (``_posixsubprocess``, which raises no audit event) rely on ``uid:65534`` and ``RLIMIT_NPROC``;
  without ``netns`` and Landlock ABI 4, the network relies on the audit hook alone.
- The audit hook lives in the same process as the code: a CPython memory-safety bug would get past
  it. The kernel layers are what then remains; check ``layers`` where that matters.
- Disk: each file is capped (``RLIMIT_FSIZE``), the number of files only by the time limit.
- A forged verdict: the harness writes its verdict with a random key the code cannot read without the
  frames the hook refuses, so writing to the verdict's file descriptor does not make a run succeed.

Cost, measured end to end for ``result = image`` on a 640x480 image (2-core VM, Python 3.11): 0.17 s
wall and 0.14 s of CPU per snippet, nearly all of it interpreter start and preloading PIL (every plugin)
and numpy; two at a time, 0.09 s per snippet. A fork server would save most of it, at the price of
snippets sharing one long-lived parent; at think-with-image volumes (100k rows) the fresh interpreter
costs about 4 CPU-hours, so it stays.

>>> from PIL import Image
>>> r = run_code("result = image.crop((0, 0, 8, 8)).resize((16, 16))", Image.new("RGB", (32, 32)))
>>> r.ok, r.size
(True, (16, 16))
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

REASONS = ("timeout", "memory", "blocked", "error", "no_output", "bad_output", "bad_input")

# Top-level modules the code may import. They are loaded (with the submodules below) before the code
# runs; once it runs nothing more is read from disk, so a submodule left out here cannot be imported.
ALLOWED_IMPORTS = frozenset({
    "PIL", "numpy", "math", "cmath", "io", "re", "json", "itertools", "functools", "collections",
    "statistics", "random", "string", "textwrap", "typing", "dataclasses", "enum", "operator", "copy",
    "decimal", "fractions", "colorsys", "struct", "bisect", "heapq", "array", "base64", "numbers", "abc",
})
_PRELOAD_PIL = ("Image", "ImageOps", "ImageEnhance", "ImageFilter", "ImageDraw", "ImageChops", "ImageStat",
                "ImageColor", "ImageFont", "ImageMath", "ImageSequence", "ImagePalette", "ImageMorph",
                "ImageTransform")
_PRELOAD_NUMPY = ("numpy.fft", "numpy.linalg", "numpy.random", "numpy.polynomial", "numpy.lib.stride_tricks")

DEFAULT_MAX_OUTPUT_PIXELS = 12_845_056  # 16,384 visual tokens of 28x28 pixels: Keye-VL's max_pixels
MAX_STDOUT = 4096  # characters of the code's printed text kept
NOBODY = 65534
_PNG_MODES = frozenset({"1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"})


@dataclass(frozen=True)
class SandboxResult:
    """What one run produced. ``reason`` is None when ``ok``, else one of :data:`REASONS`."""

    ok: bool
    reason: str | None = None
    detail: str | None = None
    image: bytes | None = None  # the output image as PNG
    size: tuple[int, int] | None = None  # (width, height) of ``image``
    stdout: str = ""  # what the code printed, at most MAX_STDOUT characters
    elapsed: float = 0.0  # wall-clock seconds, interpreter start included
    layers: tuple[str, ...] = ()  # the isolation layers that applied (see the module docstring)


def run_code(
    code: str,
    image: Any,
    *,
    timeout_s: float = 10.0,
    cpu_s: float | None = None,
    memory_mb: int = 512,
    max_output_pixels: int = DEFAULT_MAX_OUTPUT_PIXELS,
    scratch_root: str | None = None,
    audit: bool = True,
) -> SandboxResult:
    """Run ``code`` with ``image`` (encoded bytes or a PIL image) and return its output image.

    The code sees the image as ``image`` (a loaded ``PIL.Image.Image``) and as ``input.png`` in its
    working folder, has ``Image``, ``ImageOps``, ``ImageEnhance``, ``ImageFilter``, ``ImageDraw``, ``np``
    and ``math`` at hand, and returns its result by assigning a PIL image to ``result`` or by saving
    ``output.png``. ``timeout_s`` is wall clock from interpreter start; ``cpu_s`` (default: the same)
    caps CPU seconds; ``memory_mb`` is address space on top of the preloaded libraries. ``audit=False``
    leaves out the Python layer, so tests can show what the kernel layers stop on their own.
    """
    data = image if isinstance(image, (bytes, bytearray, memoryview)) else _encode_png(image)
    start = time.monotonic()
    job_dir = tempfile.mkdtemp(prefix="sandbox-", dir=scratch_root)
    try:
        return _run(bytes(data), job_dir, start, code=code, timeout_s=timeout_s,
                    cpu_s=math.ceil(cpu_s if cpu_s is not None else timeout_s), memory_mb=memory_mb,
                    max_output_pixels=max_output_pixels, audit=audit)
    finally:
        _remove_tree(job_dir)


def _run(data: bytes, job_dir: str, start: float, *, timeout_s: float, cpu_s: int, **job: Any) -> SandboxResult:
    os.chmod(job_dir, 0o711)  # nobody may pass through to the scratch folder, not list or read the rest
    scratch = os.path.join(job_dir, "scratch")
    os.mkdir(scratch, 0o700)
    input_path = os.path.join(scratch, "input.png")
    with open(input_path, "wb") as f:
        f.write(data)
    if os.geteuid() == 0:
        os.chown(scratch, NOBODY, NOBODY)
        os.chown(input_path, NOBODY, NOBODY)
    key = secrets.token_hex(16)
    # The verdict carries the output PNG: room for RGBA at the pixel cap, which also caps scratch files.
    fsize = 4 * job["max_output_pixels"] + (16 << 20)
    with open(os.path.join(job_dir, "log"), "w+b") as log, open(os.path.join(job_dir, "verdict"), "a+b") as verdict:
        job.update(key=key, verdict_fd=verdict.fileno(), cpu_s=cpu_s, fsize=fsize)
        proc = subprocess.Popen(
            [sys.executable, "-I", "-B", os.path.abspath(__file__)], stdin=subprocess.PIPE, stdout=log,
            stderr=subprocess.STDOUT, cwd=scratch, env=_child_env(scratch), pass_fds=(verdict.fileno(),),
            start_new_session=True)
        killed = False
        try:
            proc.communicate(json.dumps(job).encode(), timeout=timeout_s)
        except subprocess.TimeoutExpired:
            killed = True
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # its group: anything it may have started
            except ProcessLookupError:
                pass
            proc.wait()
        elapsed = time.monotonic() - start
        verdict.seek(0)
        header, png = _parse_verdict(verdict.read(), key)
        if header is None:
            log.seek(max(0, log.seek(0, os.SEEK_END) - 2000))
            reason, detail = _classify_exit(proc.returncode, killed, timeout_s, cpu_s, log.read())
            return SandboxResult(False, reason, detail, elapsed=elapsed, layers=("process",))
    layers = ("process", *header.get("layers", ()))
    stdout = str(header.get("stdout") or "")[:MAX_STDOUT]
    reason = header.get("reason")
    if reason is not None:
        return SandboxResult(False, str(reason), header.get("detail"), stdout=stdout, elapsed=elapsed, layers=layers)
    size, problem = _check_png(png, job["max_output_pixels"])
    if problem:
        return SandboxResult(False, "bad_output", problem, stdout=stdout, elapsed=elapsed, layers=layers)
    return SandboxResult(True, image=png, size=size, stdout=stdout, elapsed=elapsed, layers=layers)


def _encode_png(image: Any) -> bytes:
    import io

    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def _child_env(scratch: str) -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": scratch, "TMPDIR": scratch,
            # One BLAS/OpenMP thread: threads count as processes, which the child may not create.
            "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _parse_verdict(raw: bytes, key: str) -> tuple[dict | None, bytes]:
    """The harness's header and PNG: the last record that starts with the run's key; anything the code
    wrote to the descriptor itself lacks the key and is ignored."""
    at = raw.rfind(key.encode())
    if at < 0:
        return None, b""
    end = raw.find(b"\n", at)
    try:
        header = json.loads(raw[at + len(key) + 1:end])
        n = int(header.get("png_len", 0))
    except (ValueError, TypeError, AttributeError):
        return None, b""
    return header, raw[end + 1:end + 1 + n]


def _classify_exit(rc: int, killed: bool, timeout_s: float, cpu_s: int, log: bytes) -> tuple[str, str]:
    """Reason and detail for a child that left no verdict: killed, crashed, or never started the code."""
    if killed:
        return "timeout", f"ran past the wall-clock limit of {timeout_s:g} s"
    if rc < 0:
        sig = -rc
        if sig in (signal.SIGXCPU, signal.SIGKILL):  # SIGKILL: the hard CPU limit, one second later
            return "timeout", f"ran past the CPU limit of {cpu_s} s"
        return "error", f"crashed with {signal.Signals(sig).name}"
    tail = log.decode("utf-8", "replace").strip().splitlines()
    last = tail[-1][:300] if tail else ""
    if "MemoryError" in last:
        return "memory", "MemoryError before the code ran (memory_mb too small?)"
    return "error", f"the sandbox exited with status {rc} and no verdict: {last}"


def _check_png(png: bytes, max_pixels: int) -> tuple[tuple[int, int] | None, str | None]:
    """Re-read the output's header here, outside the sandbox: a PNG within the size limits."""
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(png)) as im:
            fmt, (w, h) = im.format, im.size
    except Exception as e:  # PIL raises many types for bad data
        return None, f"the output is not an image: {type(e).__name__}"
    if fmt != "PNG" or not (0 < w * h <= max_pixels):
        return None, f"the output is a {w}x{h} {fmt}, not a PNG of at most {max_pixels} pixels"
    return (w, h), None


def _remove_tree(path: str) -> None:
    """Delete the job folder, even where the code made its own folders unreadable."""
    def retry(func, p, _exc):
        try:
            os.chmod(os.path.dirname(p), 0o700)
            if os.path.isdir(p) and not os.path.islink(p):
                os.chmod(p, 0o700)
            func(p)
        except OSError as e:
            log.warning("sandbox: cannot remove %s: %s", p, e)
    shutil.rmtree(path, onerror=retry)


# ------------------------------------------------------------------ the child (python -I sandbox.py)

class _Capture:
    """``sys.stdout`` for the code: keeps the first ``limit`` characters."""

    def __init__(self, limit: int):
        self.parts: list[str] = []
        self.room = limit

    def write(self, s: str) -> int:
        s = str(s)
        if self.room > 0:
            self.parts.append(s[:self.room])
            self.room -= len(self.parts[-1])
        return len(s)

    def flush(self) -> None:
        pass

    def getvalue(self) -> str:
        return "".join(self.parts)


def _child_main() -> None:
    """Read the job, confine this process, run the code, write one verdict, exit without cleanup."""
    job = json.loads(sys.stdin.buffer.read())
    key, fd = job.pop("key"), job["verdict_fd"]

    def emit(header: dict, png: bytes = b"") -> None:
        data = memoryview(key.encode() + b" " + json.dumps(dict(header, png_len=len(png))).encode() + b"\n" + png)
        while data:
            data = data[os.write(fd, data):]

    import warnings

    warnings.simplefilter("ignore")  # showing a warning reads source files; they would not be readable
    scratch = os.path.realpath(os.getcwd())
    names = _preload()
    layers = _confine(job, scratch)
    image, problem = _load_input()
    if problem:
        emit({"reason": "bad_input", "detail": problem, "layers": layers})
        os._exit(0)
    builtins_ = None
    if job["audit"]:
        layers.append("audit")
        sys.addaudithook(_make_hook(scratch, layers, emit))
        builtins_ = _user_builtins()
    header, png = _run_user(job["code"], image, names, builtins_, job)
    emit(dict(header, layers=layers), png)
    os._exit(0)


def _preload() -> dict[str, Any]:
    """Import everything the code may use (see ALLOWED_IMPORTS); return the names the code starts with."""
    import importlib

    import numpy
    from PIL import Image

    for name in _PRELOAD_PIL:
        importlib.import_module(f"PIL.{name}")
    Image.init()  # every format plugin
    for name in (*_PRELOAD_NUMPY, *sorted(ALLOWED_IMPORTS - {"PIL", "numpy"})):
        importlib.import_module(name)
    mods = sys.modules
    return {"Image": Image, "ImageOps": mods["PIL.ImageOps"], "ImageEnhance": mods["PIL.ImageEnhance"],
            "ImageFilter": mods["PIL.ImageFilter"], "ImageDraw": mods["PIL.ImageDraw"], "np": numpy,
            "math": mods["math"]}


# Linux constants; Landlock's syscall numbers are the same on every architecture.
_CLONE_NEWNET, _CLONE_NEWUSER = 0x40000000, 0x10000000
_PR_GET_DUMPABLE, _PR_SET_NO_NEW_PRIVS = 3, 38
_SYS_LANDLOCK_CREATE_RULESET, _SYS_LANDLOCK_ADD_RULE, _SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446
# WRITE_FILE, READ_FILE, READ_DIR, REMOVE_DIR, REMOVE_FILE, MAKE_DIR, MAKE_REG, MAKE_SYM, REFER, TRUNCATE
_LL_SCRATCH = sum(1 << b for b in (1, 2, 3, 4, 5, 7, 8, 12, 13, 14))


def _confine(job: dict, scratch: str) -> list[str]:
    """Apply the kernel layers that this machine allows; return their names."""
    import ctypes
    import resource

    layers = []
    linux = sys.platform.startswith("linux")
    libc = ctypes.CDLL(None, use_errno=True)
    root = os.geteuid() == 0
    if linux and _unshare_network(libc, root):
        layers.append("netns")
    limits = [(resource.RLIMIT_AS, _vm_size() + (job["memory_mb"] << 20)),
              (resource.RLIMIT_CPU, job["cpu_s"], job["cpu_s"] + 1),  # SIGXCPU, then SIGKILL
              (resource.RLIMIT_FSIZE, job["fsize"]), (resource.RLIMIT_NOFILE, 64), (resource.RLIMIT_CORE, 0)]
    for which, soft, *hard in limits:
        resource.setrlimit(which, (soft, hard[0] if hard else soft))
    layers.append("rlimits")
    ruleset, abi = _landlock_ruleset(libc, scratch) if linux else (None, 0)  # opens scratch while still root
    if root:
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
        layers.append(f"uid:{NOBODY}")
    resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
    if ruleset is not None:
        libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
        if libc.syscall(_SYS_LANDLOCK_RESTRICT_SELF, ruleset, 0) == 0:
            layers.append(f"landlock:abi{abi}")
        os.close(ruleset)
    return layers


def _unshare_network(libc: Any, root: bool) -> bool:
    """Move into a new network namespace. Root can do it directly; anyone else needs a new user
    namespace too, in which the process keeps its own uid and gid (so the scratch folder stays its own)."""
    if root:
        return libc.unshare(_CLONE_NEWNET) == 0
    uid, gid = os.geteuid(), os.getegid()
    # A non-dumpable process (after a setuid) cannot write its own id maps: stay out rather than unmapped.
    if libc.prctl(_PR_GET_DUMPABLE, 0, 0, 0, 0) != 1 or libc.unshare(_CLONE_NEWUSER | _CLONE_NEWNET) != 0:
        return False
    for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
        with open(f"/proc/self/{name}", "w") as f:  # mapping one's own ids is always allowed
            f.write(text)
    return True


def _vm_size() -> int:
    """Bytes of address space in use (the preloaded libraries): the memory limit comes on top."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    except (OSError, StopIteration):  # no /proc: not Linux
        return 0


def _landlock_ruleset(libc: Any, scratch: str) -> tuple[int | None, int]:
    """A Landlock ruleset fd (read-write in scratch, nothing else, no TCP, scoped signals and abstract
    sockets) and the ABI version; (None, 0) where the kernel has no Landlock."""
    import ctypes
    import struct

    abi = libc.syscall(_SYS_LANDLOCK_CREATE_RULESET, None, 0, 1)  # 1: LANDLOCK_CREATE_RULESET_VERSION
    if abi < 1:
        return None, 0
    fs = (1 << 13) - 1 | (abi >= 2) << 13 | (abi >= 3) << 14 | (abi >= 5) << 15
    attr = ctypes.create_string_buffer(struct.pack("=QQQ", fs, 0b11 if abi >= 4 else 0, 0b11 if abi >= 6 else 0))
    ruleset = libc.syscall(_SYS_LANDLOCK_CREATE_RULESET, attr, 24, 0)
    if ruleset < 0:
        return None, 0
    dfd = os.open(scratch, os.O_PATH | os.O_CLOEXEC)
    rule = ctypes.create_string_buffer(struct.pack("=Qi", _LL_SCRATCH & fs, dfd))  # landlock_path_beneath_attr
    ok = libc.syscall(_SYS_LANDLOCK_ADD_RULE, ruleset, 1, rule, 0) == 0  # 1: LANDLOCK_RULE_PATH_BENEATH
    os.close(dfd)
    if not ok:
        os.close(ruleset)
        return None, 0
    return ruleset, abi


def _load_input() -> tuple[Any, str | None]:
    """The decoded input image; ``input.png`` rewritten as PNG when it arrived in another format."""
    from PIL import Image

    try:
        with Image.open("input.png") as im:
            im.load()
            fmt = im.format
            img = im if im.mode in _PNG_MODES else im.convert("RGBA" if "A" in im.getbands() else "RGB")
        if fmt != "PNG":
            img.save("input.png", "PNG")
        return img, None
    except MemoryError:
        return None, "the input image does not fit in memory_mb"
    except Exception as e:  # PIL raises many types for bad data
        return None, f"the input image does not decode: {_describe(e)}"


# Events on paths, allowed inside the scratch folder: the positions of their path arguments.
_PATH_EVENTS = {
    "os.listdir": (0,), "os.scandir": (0,), "os.walk": (0,), "os.fwalk": (0,), "os.getxattr": (0,),
    "os.listxattr": (0,), "glob.glob": (0,), "glob.glob/2": (0, 2), "pathlib.Path.glob": (0,),
    "pathlib.Path.rglob": (0,), "os.mkdir": (0,), "os.rmdir": (0,), "os.remove": (0,), "os.rename": (0, 1),
    "os.symlink": (0, 1), "os.link": (0, 1), "os.truncate": (0,), "os.chmod": (0,), "os.chown": (0,),
    "os.utime": (0,), "os.chflags": (0,), "os.setxattr": (0,), "os.removexattr": (0,), "shutil.copyfile": (0, 1),
    "shutil.copymode": (0, 1), "shutil.copystat": (0, 1), "shutil.copytree": (0, 1), "shutil.move": (0, 1),
    "shutil.rmtree": (0,), "shutil.chown": (0,), "shutil.make_archive": (0, 2), "shutil.unpack_archive": (0, 1),
}
# Whole families: network, processes, native code, memory maps, limits, threads, introspection,
# making code objects (code.__new__, marshal).
_DENIED_PREFIXES = ("os.", "shutil.", "socket.", "subprocess.", "ctypes.", "mmap.", "fcntl.", "resource.",
                    "signal.", "_thread.", "gc.", "marshal.", "code.", "pdb.", "webbrowser.", "http.",
                    "urllib.", "ftplib.", "smtplib.", "poplib.", "imaplib.", "nntplib.", "telnetlib.",
                    "sqlite3.", "syslog.", "pickle.", "ensurepip.", "sandbox.")
_DENIED = frozenset({"sys.addaudithook", "sys.settrace", "sys.setprofile", "sys._getframe", "sys._current_frames",
                     "sys._current_exceptions", "builtins.breakpoint"})
_FRAME_ATTRS = frozenset({"tb_frame", "gi_frame", "cr_frame", "ag_frame", "f_back"})
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC


def _make_hook(scratch: str, layers: list[str], emit: Any):
    """The audit hook. A forbidden event writes the ``blocked`` verdict and ends the process on the spot."""
    import pathlib

    realpath, getcwd, sep = os.path.realpath, os.getcwd, os.sep
    exit_now = os._exit
    plain_paths = (pathlib.PosixPath, pathlib.PurePosixPath)

    def stop(reason: str, what: str) -> None:
        emit({"reason": reason, "detail": what[:300], "layers": layers})
        exit_now(0)

    def outside(path: str | None) -> bool:
        return path is not None and path != scratch and not path.startswith(scratch + sep)

    def resolve(obj: Any) -> str | None:
        """The real path of a path argument; None for a file descriptor or an absent argument."""
        if obj is None or type(obj) is int:
            return None
        # Exact types only: a str subclass or a PathLike could answer the hook and the call differently.
        if type(obj) is str:
            path = obj
        elif type(obj) is bytes:
            path = os.fsdecode(obj)
        elif type(obj) in plain_paths:
            path = str(obj)
        else:
            stop("blocked", f"a path of type {type(obj).__name__}")
        return realpath(path if path.startswith(sep) else getcwd() + sep + path)

    def check(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = (tuple(args) + (None, None))[:3]
            real = resolve(path)
            if outside(real):
                write = bool((flags if type(flags) is int else 0) & _WRITE_FLAGS) or (
                    type(mode) is str and any(c in mode for c in "wax+"))
                shown = path if type(path) is str and path == real else f"{_show(path)} ({real})"
                stop("blocked", f"open {shown} for {'writing' if write else 'reading'}")
        elif event in _PATH_EVENTS:
            for i in _PATH_EVENTS[event]:
                real = resolve(args[i]) if i < len(args) else None
                if outside(real):
                    stop("blocked", f"{event} {real}")
        elif event == "import":
            name = args[0] if args and type(args[0]) is str else "?"
            if name.partition(".")[0].lstrip("_") not in ALLOWED_IMPORTS:
                stop("blocked", f"import of '{name}'")
        elif event == "sandbox.import":
            stop("blocked", f"import of '{args[0]}'")
        elif event == "object.__getattr__":  # a frame leads to the harness's state
            if len(args) > 1 and args[1] in _FRAME_ATTRS:
                stop("blocked", f"{event} {args[1]}")
        elif event in ("object.__setattr__", "object.__delattr__"):  # swapping a function's code
            if len(args) > 1 and args[1] == "__code__":
                stop("blocked", f"{event} __code__")
        elif event in _DENIED or event.startswith(_DENIED_PREFIXES):
            stop("blocked", f"{event} {', '.join(_show(a) for a in args)}".strip())

    def hook(event: str, args: tuple) -> None:
        try:
            check(event, args)
        except MemoryError:
            stop("memory", f"MemoryError during {event}")
        except BaseException as e:  # the hook must not fail open
            stop("blocked", f"{event} (the sandbox could not check it: {type(e).__name__})")

    return hook


def _show(arg: Any) -> str:
    """An audit argument for a detail, without running code the sandboxed program defined."""
    if arg is None or type(arg) in (str, bytes, int, float, bool):
        return repr(arg)[:120]
    if type(arg) is tuple and len(arg) <= 4 and all(type(a) in (str, int) for a in arg):
        return repr(arg)
    return f"<{type(arg).__name__}>"


def _user_builtins() -> dict[str, Any]:
    """Builtins for the code: no debugger or console helpers, and an ``__import__`` that refuses
    modules off ALLOWED_IMPORTS through the hook (``sandbox.import`` ends the run there)."""
    import builtins

    real_import, audit = builtins.__import__, sys.audit

    def guarded_import(name, globals=None, locals=None, fromlist=(), level=0):
        if level or name.partition(".")[0] not in ALLOWED_IMPORTS:
            audit("sandbox.import", "." * level + name)
        return real_import(name, globals, locals, fromlist, level)

    names = dict(builtins.__dict__)
    for name in ("breakpoint", "input", "help", "exit", "quit", "copyright", "credits", "license"):
        names.pop(name, None)
    names["__import__"] = guarded_import
    return names


def _run_user(code: str, image: Any, names: dict, builtins_: dict | None, job: dict) -> tuple[dict, bytes]:
    """Execute the code; return the verdict header and the output PNG."""
    import io
    import types

    from PIL import Image

    out = _Capture(MAX_STDOUT)
    module = types.ModuleType("__sandbox__")  # a real module: dataclasses and pickle look classes up there
    sys.modules[module.__name__] = module
    env = module.__dict__
    env.update(image=image, **names)
    if builtins_ is not None:
        env["__builtins__"] = builtins_
    sys.stdout = out
    try:
        exec(compile(code, "<sandbox>", "exec"), env)  # noqa: S102 (what the sandbox is for)
    except MemoryError:
        return {"reason": "memory", "detail": f"MemoryError: more than memory_mb={job['memory_mb']}",
                "stdout": out.getvalue()}, b""
    except BaseException as e:  # the code's own failure, whatever it raised
        return {"reason": "error", "detail": _describe(e), "stdout": out.getvalue()}, b""
    finally:
        sys.stdout = sys.__stdout__
    header = {"stdout": out.getvalue()}
    try:
        result = env.get("result")
        if result is None and os.path.lexists("output.png"):
            result = Image.open("output.png")
            result.load()
        if result is None:
            return dict(header, reason="no_output", detail="the code neither set `result` nor saved output.png"), b""
        if not isinstance(result, Image.Image):
            return dict(header, reason="bad_output", detail=f"result is a {type(result).__name__}, not a PIL image"), b""
        w, h = result.size
        if not (w >= 1 and h >= 1 and w * h <= job["max_output_pixels"]):
            return dict(header, reason="bad_output",
                        detail=f"result is {w}x{h}: more than max_output_pixels={job['max_output_pixels']}"), b""
        if result.mode not in _PNG_MODES:
            result = result.convert("RGBA" if "A" in result.getbands() else "RGB")
        buf = io.BytesIO()
        result.save(buf, "PNG")
    except MemoryError:
        return dict(header, reason="memory", detail="MemoryError while saving the result"), b""
    except Exception as e:  # a broken result: PIL raises many types
        return dict(header, reason="bad_output", detail=_describe(e)), b""
    return header, buf.getvalue()


def _describe(e: BaseException) -> str:
    """``Type: message (line N)`` for an exception, N being the line of the code's top-level statement."""
    try:
        msg = str(e)
    except Exception:  # a message that cannot be shown
        msg = ""
    line = e.lineno if isinstance(e, SyntaxError) else None
    tb = e.__traceback__.tb_next if e.__traceback__ is not None else None  # [0] is the harness's exec
    if line is None and tb is not None:
        line = tb.tb_lineno
    text = f"{type(e).__name__}: {msg}" if msg else type(e).__name__
    return text[:300] + (f" (line {line})" if line else "")


if __name__ == "__main__":
    _child_main()
