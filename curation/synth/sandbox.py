"""Run model- or template-written Python over an image, in a sandbox that fails closed.

Why: a think-with-image trace (docs/sft-format.md) is only true if its code really ran, and that code
is untrusted (docs/sandbox.md is the threat model). Each snippet runs in a fresh interpreter that the
kernel confines; the Python-level hook is defence in depth, never the barrier. The layers, in the order
they apply; :attr:`SandboxResult.layers` names those that did:

1. ``bwrap`` (bubblewrap, required): new mount, network, IPC, PID, UTS and (when not root) user
   namespaces, ``--die-with-parent``, ``--new-session``, an empty environment, no capabilities. The
   file system is read-only binds of ``/usr``, the interpreter's prefix, the site folders PIL, numpy and
   this file come from, a private ``/proc`` and minimal ``/dev``; the only writable place is
   ``/scratch``, a tmpfs of bounded size that disappears with the sandbox (nothing to clean up on the
   host). No ``/home``, ``/root``, ``/etc``, ``/tmp``, no host sockets, no network interface but a
   loopback that is down.
2. A separate unprivileged uid (required): as root, bwrap runs without a user namespace and the
   harness drops to ``nobody`` for real (``uid:65534``, no capabilities left); otherwise bwrap maps the
   caller to ``nobody`` in a new user namespace that may not make more (``userns:65534``).
3. ``rlimits`` (required): address space (the preloaded libraries + ``memory_mb``), CPU seconds, file
   size, 64 open files, no core dumps, no new processes.
4. ``landlock:abiN`` (when the kernel has it): read and write only in ``/scratch``, execute nothing,
   no TCP (ABI >= 4), signals and abstract sockets scoped to the sandbox (ABI >= 6). A second file
   system layer: the mount namespace already holds nothing else worth reading.
5. ``seccomp`` (required): a libseccomp filter built in the parent (``pyseccomp``) kills the process
   on any socket call of any family, SysV IPC, ``memfd_create``, new processes or threads, ``execve``,
   namespaces, mounts, ``ptrace`` and the other kernel interfaces in :data:`_SECCOMP_KILL`; installing
   signal handlers fails (EPERM), so no Python code can run from a signal.
6. ``audit`` (Python, defence in depth): a ``sys.addaudithook`` hook ends the run at the first
   forbidden event, *inside* the event, so ``try/except`` does not help: paths outside ``/scratch``,
   sockets, processes, ``ctypes``, imports off :data:`ALLOWED_IMPORTS`, frames, ``gc``, code objects.
   Everything it reads is bound in closures before the code runs, so replacing module globals
   (``sys.modules['__main__']``), module attributes (``os.write``) or builtins does not change it.

Failing closed: :func:`check_sandbox` probes the layers once per process (the think_with_image stage
calls it before any data is read); :func:`run_code` raises :class:`SandboxUnavailable`, with what is
missing and how to fix it, instead of running code where a required layer is missing. The harness
re-checks inside: a required layer that does not apply ends it before the code runs, and the parent
raises the same error.

The verdict: the parent decides it, from what the code cannot change. A run succeeds only when the
harness reported that confinement held, then exited 0 with a final record under the run's key, and
the parent re-reads the PNG. A block by the hook writes its record and leaves with a status of its own
(through ``os._exit`` bound before the code ran), seccomp kills with SIGSYS, and any ``blocked`` record
wins over whatever follows, so a blocked or failed run never comes back as a success, whatever the code
patched. Limits: ``CURATION_SANDBOX_DISABLE=landlock`` (tests only) leaves Landlock out;
``...=bwrap`` or ``seccomp`` makes them count as missing, so tests can see the refusal.

Cost, end to end for ``result = image.crop(...)`` on a 640x480 image (benchmarks/bench_sandbox.py,
2-core VM under load from other work, Python 3.11): 0.27 s of CPU per snippet, against 0.32 s for the
sandbox before bwrap and seccomp and 0.26 s for a plain ``python -I`` doing the same work; bwrap itself
is about 0.03 s. Nearly all of it is interpreter start and preloading PIL and numpy; docs/sandbox.md
has the table, wall times included.

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
import selectors
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

REASONS = ("timeout", "memory", "blocked", "error", "no_output", "bad_output", "bad_input")

# Top-level modules the code may import. They are loaded (with the submodules below) before the code
# runs; once it runs nothing more is read from disk, so a submodule left out here cannot be imported.
ALLOWED_IMPORTS = frozenset(
    {
        "PIL",
        "numpy",
        "math",
        "cmath",
        "io",
        "re",
        "json",
        "itertools",
        "functools",
        "collections",
        "statistics",
        "random",
        "string",
        "textwrap",
        "typing",
        "dataclasses",
        "enum",
        "operator",
        "copy",
        "decimal",
        "fractions",
        "colorsys",
        "struct",
        "bisect",
        "heapq",
        "array",
        "base64",
        "numbers",
        "abc",
    }
)
_PRELOAD_PIL = (
    "Image",
    "ImageOps",
    "ImageEnhance",
    "ImageFilter",
    "ImageDraw",
    "ImageChops",
    "ImageStat",
    "ImageColor",
    "ImageFont",
    "ImageMath",
    "ImageSequence",
    "ImagePalette",
    "ImageMorph",
    "ImageTransform",
)
_PRELOAD_NUMPY = ("numpy.fft", "numpy.linalg", "numpy.random", "numpy.polynomial", "numpy.lib.stride_tricks")

DEFAULT_MAX_OUTPUT_PIXELS = 12_845_056  # 16,384 visual tokens of 28x28 pixels: Keye-VL's max_pixels
MAX_STDOUT = 4096  # characters of the code's printed text kept
NOBODY = 65534
SCRATCH = "/scratch"  # the code's working folder inside the sandbox: a tmpfs of bounded size
DISABLE_ENV = "CURATION_SANDBOX_DISABLE"  # tests only: comma-separated layers to treat as absent
_PNG_MODES = frozenset({"1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"})

# The harness's exit statuses. Anything else (the code's own os._exit, a signal) is a failure too.
_EXIT_OK, _EXIT_FAILED, _EXIT_BLOCKED, _EXIT_SETUP = 0, 10, 11, 12

# System calls that kill the process (the parent reports ``blocked``): sockets of every family (TCP,
# unix, netlink, packet), SysV IPC and memfd (memory outside RLIMIT_AS), new processes and threads,
# other programs, namespaces and mounts, other processes' memory, and kernel interfaces image code has
# no use for. Names this architecture does not have are skipped.
_SECCOMP_KILL = (
    "socket",
    "socketpair",
    "socketcall",
    "connect",
    "bind",
    "listen",
    "accept",
    "accept4",
    "ipc",
    "shmget",
    "shmat",
    "shmctl",
    "shmdt",
    "msgget",
    "msgsnd",
    "msgrcv",
    "msgctl",
    "semget",
    "semop",
    "semtimedop",
    "semctl",
    "memfd_create",
    "memfd_secret",
    "fork",
    "vfork",
    "clone",
    "clone3",
    "execve",
    "execveat",
    "unshare",
    "setns",
    "mount",
    "umount2",
    "pivot_root",
    "chroot",
    "move_mount",
    "open_tree",
    "fsopen",
    "fsmount",
    "fsconfig",
    "fspick",
    "mount_setattr",
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "pidfd_open",
    "pidfd_getfd",
    "process_madvise",
    "kcmp",
    "userfaultfd",
    "bpf",
    "perf_event_open",
    "keyctl",
    "add_key",
    "request_key",
    "personality",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "open_by_handle_at",
    "name_to_handle_at",
    "fanotify_init",
    "kexec_load",
    "kexec_file_load",
    "init_module",
    "finit_module",
    "delete_module",
    "syslog",
    "acct",
    "swapon",
    "swapoff",
    "reboot",
    "quotactl",
)
# Refused with EPERM: a signal handler would run the code's Python between any two of the harness's
# bytecodes, with the harness's frame in hand. glibc's abort() and libraries' setjmp never need it.
_SECCOMP_EPERM = ("rt_sigaction", "sigaction", "signal")


class SandboxUnavailable(RuntimeError):
    """A layer the sandbox requires is missing here, so nothing was run; the message says what to do."""


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


@dataclass(frozen=True)
class SandboxCheck:
    """What :func:`check_sandbox` found: the layers a run gets here, and the required ones missing."""

    layers: tuple[str, ...]
    missing: tuple[str, ...]  # each names the layer, why it is missing, and how to fix it

    @property
    def ok(self) -> bool:
        return not self.missing

    def message(self) -> str:
        return "the think-with-image sandbox cannot run here: " + "; ".join(self.missing)


def run_code(
    code: str,
    image: Any,
    *,
    timeout_s: float = 10.0,
    cpu_s: float | None = None,
    memory_mb: int = 512,
    max_output_pixels: int = DEFAULT_MAX_OUTPUT_PIXELS,
    audit: bool = True,
) -> SandboxResult:
    """Run ``code`` with ``image`` (encoded bytes or a PIL image) and return its output image.

    The code sees the image as ``image`` (a loaded ``PIL.Image.Image``) and as ``input.png`` in its
    working folder, has ``Image``, ``ImageOps``, ``ImageEnhance``, ``ImageFilter``, ``ImageDraw``, ``np``
    and ``math`` at hand, and returns its result by assigning a PIL image to ``result`` or by saving
    ``output.png``. ``timeout_s`` is wall clock from interpreter start; ``cpu_s`` (default: the same)
    caps CPU seconds; ``memory_mb`` is address space on top of the preloaded libraries (the scratch
    tmpfs, sized for the output, comes on top). ``audit=False`` leaves out the Python layer, so tests can
    show what the kernel layers stop on their own.

    Raises :class:`SandboxUnavailable` where a required layer is missing: the code is never run then.
    """
    check = check_sandbox()
    if not check.ok:
        raise SandboxUnavailable(check.message())
    data = image if isinstance(image, (bytes, bytearray, memoryview)) else _encode_png(image)
    return _launch(
        code,
        bytes(data),
        timeout_s=timeout_s,
        cpu_s=math.ceil(cpu_s if cpu_s is not None else timeout_s),
        memory_mb=memory_mb,
        max_output_pixels=max_output_pixels,
        audit=audit,
    )


_checked: dict[tuple, SandboxCheck] = {}
_check_lock = threading.Lock()


def check_sandbox(*, refresh: bool = False) -> SandboxCheck:
    """Which layers a run gets on this machine, and which required ones are missing (with the fix).

    Required: bubblewrap able to make its namespaces (user namespaces when not root), a separate uid,
    rlimits, and seccomp (``pyseccomp`` with libseccomp). Landlock is used where the kernel has it: the
    mount namespace already confines the file system. Probed once per process by running a trivial
    snippet through every layer (about as long as one snippet).
    """
    key = (os.environ.get(DISABLE_ENV, ""), os.geteuid())
    with _check_lock:
        if refresh or key not in _checked:
            check = _checked[key] = _probe()
            if check.ok:
                log.info("sandbox: layers %s", ", ".join(check.layers))
            else:
                log.warning("%s", check.message())
        return _checked[key]


def _probe() -> SandboxCheck:
    missing = []
    if _bwrap() is None:
        missing.append("bwrap: bubblewrap is not installed (apt-get install bubblewrap)")
    try:
        _seccomp_program()
    except (ImportError, OSError, RuntimeError, ValueError) as e:
        missing.append(
            f"seccomp: the filter cannot be built ({e}); pip install pyseccomp, and the libseccomp2 "
            "library (apt-get install libseccomp2)"
        )
    if missing:
        return SandboxCheck((), tuple(missing))
    try:
        r = _launch(
            "result = image",
            _encode_png(_tiny_image()),
            timeout_s=30,
            cpu_s=30,
            memory_mb=256,
            max_output_pixels=64,
            audit=True,
        )
    except SandboxUnavailable as e:
        return SandboxCheck((), (str(e),))
    if not r.ok:
        return SandboxCheck(
            r.layers, (f"probe: a trivial snippet failed in the sandbox: {r.reason}: {r.detail}",)
        )
    return SandboxCheck(r.layers, ())


def _disabled() -> frozenset[str]:
    return frozenset(x.strip() for x in os.environ.get(DISABLE_ENV, "").split(",") if x.strip())


def _bwrap() -> str | None:
    if "bwrap" in _disabled():
        return None
    return shutil.which("bwrap") or (os.access("/usr/bin/bwrap", os.X_OK) and "/usr/bin/bwrap") or None


_program: list[bytes] = []


def _seccomp_program() -> bytes:
    """The seccomp filter as BPF, built once by libseccomp here, loaded by the harness (see _SECCOMP_KILL)."""
    if "seccomp" in _disabled():
        raise RuntimeError(f"disabled by {DISABLE_ENV}")
    if not _program:
        import tempfile

        import pyseccomp as sc

        f = sc.SyscallFilter(sc.ALLOW)
        f.set_attr(sc.Attr.ACT_BADARCH, sc.KILL_PROCESS)  # 32-bit and x32 system calls: killed too
        for action, names in ((sc.KILL_PROCESS, _SECCOMP_KILL), (sc.ERRNO(1), _SECCOMP_EPERM)):
            for name in names:
                if sc.resolve_syscall(sc.Arch.NATIVE, name) != -1:  # -1: not on this architecture
                    f.add_rule(action, name)
        with tempfile.TemporaryFile() as out:
            f.export_bpf(out)
            out.seek(0)
            _program.append(out.read())
    return _program[0]


def _launch(
    code: str,
    data: bytes,
    *,
    timeout_s: float,
    cpu_s: int,
    memory_mb: int,
    max_output_pixels: int,
    audit: bool,
) -> SandboxResult:
    """One sandboxed run: start bwrap, exchange the job and the verdict, decide the verdict here."""
    start = time.monotonic()
    key = secrets.token_hex(16)
    # Each file may hold the output at the pixel cap (RGBA); scratch holds two of them and the input.
    fsize = 4 * max_output_pixels + (16 << 20)
    job = {
        "key": key,
        "code": code,
        "cpu_s": cpu_s,
        "memory_mb": memory_mb,
        "fsize": fsize,
        "max_output_pixels": max_output_pixels,
        "audit": audit,
        "root": os.geteuid() == 0,
        "landlock": "landlock" not in _disabled(),
        "paths": _site_dirs(),
        "seccomp": _seccomp_program().hex(),
    }
    argv = _bwrap_argv(_bwrap() or "bwrap", root=job["root"], scratch_bytes=2 * fsize + 2 * len(data))
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            env=_BWRAP_ENV,
        )  # not the worker's secrets
    except OSError as e:
        raise SandboxUnavailable(f"bwrap: cannot start {argv[0]}: {e} (apt-get install bubblewrap)") from e
    # The verdict stream carries a PNG of at most the pixel cap; anything much larger is the code's doing.
    cap = 5 * max_output_pixels + (1 << 20)
    out, err, timed_out, overflow = _exchange(
        proc, json.dumps(job).encode() + b"\n" + data, start + timeout_s, cap
    )
    elapsed = time.monotonic() - start
    records = _records(out, key.encode())
    if not any(kind == "ready" for kind, *_ in records):
        if timed_out:  # the code never ran: a machine too slow or too busy for this limit
            return SandboxResult(
                False,
                "timeout",
                f"the sandbox did not start within {timeout_s:g} s",
                elapsed=elapsed,
                layers=("process",),
            )
        raise SandboxUnavailable(_setup_failure(records, proc.returncode, err))
    ready = next(r[4] for r in records if r[0] == "ready").split(",")
    layers = ("process", "bwrap", *ready, *(("audit",) if audit else ()))  # the hook goes in after "ready"
    final = [r for r in records if r[0] in ("final", "blocked")]
    last = final[-1] if final else None
    stdout = last[3][:MAX_STDOUT] if last else ""
    blocked = next((r for r in records if r[0] == "blocked"), None)

    def fail(reason: str, detail: str) -> SandboxResult:
        return SandboxResult(False, reason, detail, stdout=stdout, elapsed=elapsed, layers=layers)

    if blocked is not None or proc.returncode == _EXIT_BLOCKED:  # a block wins over anything after it
        return fail(blocked[1] if blocked else "blocked", blocked[2] if blocked else "a forbidden operation")
    if timed_out:
        return fail("timeout", f"ran past the wall-clock limit of {timeout_s:g} s")
    if overflow:
        return fail("bad_output", f"the code wrote more than {cap} bytes to the verdict channel")
    rc = proc.returncode
    if rc > 128:  # bwrap reports a signal as 128 + its number
        sig = rc - 128
        if sig == signal.SIGSYS:
            return fail(
                "blocked",
                "a system call the sandbox forbids (seccomp: sockets, IPC, memfd, processes, "
                "threads, namespaces, ...)",
            )
        if sig in (
            signal.SIGXCPU,
            signal.SIGKILL,
        ):  # the CPU limit (the parent's own kill is a timeout above)
            return fail("timeout", f"ran past the CPU limit of {cpu_s} s")
        return fail("error", f"crashed with {_signal_name(sig)}")
    if last is None or rc not in (_EXIT_OK, _EXIT_FAILED):
        tail = err.decode("utf-8", "replace").strip().splitlines()
        if tail and "MemoryError" in tail[-1]:
            return fail("memory", "MemoryError outside the code (memory_mb too small?)")
        return fail(
            "error",
            f"the sandbox exited with status {rc} and no verdict" + (f": {tail[-1][:300]}" if tail else ""),
        )
    _, reason, detail, _, _, png = last
    if rc != _EXIT_OK or reason:  # the harness's failure: its reason, never a success
        return fail(reason if reason in REASONS else "error", detail or f"exited with status {rc}")
    size, problem = _check_png(png, max_output_pixels)
    if problem:
        return fail("bad_output", problem)
    return SandboxResult(True, image=png, size=size, stdout=stdout, elapsed=elapsed, layers=layers)


def _setup_failure(records: list, rc: int | None, err: bytes) -> str:
    """Why the sandbox never reached the code, and what to do: bwrap's own message or the harness's."""
    setup = next((r[2] for r in records if r[0] == "setup"), None)
    if setup:
        return f"the sandbox could not apply a required layer: {setup}"
    text = err.decode("utf-8", "replace").strip()
    last = text.splitlines()[-1][:300] if text else f"exit status {rc}"
    hint = ""
    if last.startswith("bwrap:"):
        hint = (
            " (bubblewrap needs unprivileged user namespaces when not root: "
            "sysctl user.max_user_namespaces>0, kernel.unprivileged_userns_clone=1, "
            "and on Ubuntu kernel.apparmor_restrict_unprivileged_userns=0 "
            "or an AppArmor profile for bwrap; inside a container, a seccomp profile that allows unshare)"
        )
    return f"the sandbox did not start: {last}{hint}"


def _signal_name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


def _exchange(
    proc: subprocess.Popen, data: bytes, deadline: float, cap: int
) -> tuple[bytes, bytes, bool, bool]:
    """Feed the job on stdin, read the verdict stream (stdout, at most ``cap`` bytes) and the end of the
    log (stderr) until the sandbox exits or the deadline passes; then make sure it is gone.
    Returns (verdict stream, log tail, timed out, over the cap)."""
    sel = selectors.DefaultSelector()
    os.set_blocking(proc.stdin.fileno(), False)
    sel.register(proc.stdin, selectors.EVENT_WRITE)
    sel.register(proc.stdout, selectors.EVENT_READ)
    sel.register(proc.stderr, selectors.EVENT_READ)
    pending, out, err = memoryview(data), bytearray(), bytearray()
    timed_out = overflow = False
    try:
        while len(sel.get_map()) and not overflow:
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            for key, _ in sel.select(left):
                if key.fileobj is proc.stdin:
                    try:
                        pending = pending[os.write(key.fd, pending[: 1 << 16]) :]
                    except BlockingIOError:
                        continue
                    except BrokenPipeError:  # the sandbox is gone: its status says why
                        pending = pending[:0]
                    if not pending:
                        sel.unregister(proc.stdin)
                        proc.stdin.close()
                    continue
                chunk = os.read(key.fd, 1 << 16)
                if not chunk:
                    sel.unregister(key.fileobj)
                elif key.fileobj is proc.stdout:
                    out += chunk
                    overflow = len(out) > cap
                else:
                    err += chunk
                    del err[:-4096]
        if not timed_out and not overflow:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                timed_out = True
    finally:
        sel.close()
        if proc.poll() is None:
            proc.kill()  # bwrap: its PID namespace, and everything in it, dies with it
        proc.wait()
        for f in (proc.stdin, proc.stdout, proc.stderr):
            f.close()
    return bytes(out), bytes(err), timed_out, overflow


def _records(out: bytes, key: bytes) -> list[tuple[str, str, str, str, str, bytes]]:
    """The harness's records in the verdict stream, in order: (kind, reason, detail, stdout, layers, png).
    Bytes the code wrote to the stream itself lack the run's key and are skipped."""
    found, at = [], out.find(key)
    while at >= 0:
        end = out.find(b"\n", at)
        try:
            head_len, png_len = (int(x) for x in out[at + len(key) : end].split())
        except ValueError:
            at = out.find(key, at + 1)
            continue
        head, png = out[end + 1 : end + 1 + head_len], out[end + 1 + head_len : end + 1 + head_len + png_len]
        fields = head.decode("utf-8", "replace").split("\x00")
        if len(fields) == 5 and len(png) == png_len:
            found.append((*fields, png))
        at = out.find(key, end + 1 + head_len + png_len)
    return found


_BWRAP_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}


def _bwrap_argv(bwrap: str, *, root: bool, scratch_bytes: int) -> list[str]:
    # --as-pid-1: no bwrap process in the sandbox whose /proc entries (environment, memory) it could read
    argv = [
        bwrap,
        "--as-pid-1",
        "--die-with-parent",
        "--new-session",
        "--clearenv",
        "--cap-drop",
        "ALL",
        "--unshare-ipc",
        "--unshare-pid",
        "--unshare-net",
        "--unshare-uts",
        "--unshare-cgroup-try",
    ]
    if root:  # no user namespace: the harness drops to the real uid nobody, and with it these two
        argv += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        argv += ["--unshare-user", "--uid", str(NOBODY), "--gid", str(NOBODY), "--disable-userns"]
    for name, value in (
        ("PATH", "/usr/bin"),
        ("LANG", "C.UTF-8"),
        ("HOME", SCRATCH),
        ("TMPDIR", SCRATCH),
        # One BLAS/OpenMP thread: the code may not start threads, and seccomp kills on clone.
        ("OPENBLAS_NUM_THREADS", "1"),
        ("OMP_NUM_THREADS", "1"),
        ("MKL_NUM_THREADS", "1"),
    ):
        argv += ["--setenv", name, value]
    argv += _mounts()
    argv += [
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        "--perms",
        "0777",
        "--size",
        str(scratch_bytes),
        "--tmpfs",
        SCRATCH,
        "--remount-ro",
        "/dev",
        "--remount-ro",
        "/",
        "--chdir",
        SCRATCH,
        os.path.realpath(sys.executable),
        "-I",
        "-B",
        "-S",
        os.path.realpath(__file__),
    ]
    return argv


_mount_cache: list[list[str]] = []


def _mounts() -> list[str]:
    """bwrap arguments for the read-only file system, each at its own path: /usr (and the /lib, /bin
    links), the interpreter's prefix, the site folders of PIL, numpy and this file. Nothing else."""
    if not _mount_cache:
        args = ["--ro-bind", "/usr", "/usr"]
        for name in ("/bin", "/lib", "/lib32", "/lib64", "/libx32", "/sbin"):
            if os.path.islink(name):
                args += ["--symlink", os.readlink(name), name]
            elif os.path.isdir(name):
                args += ["--ro-bind", name, name]
        sources = [os.path.realpath(sys.base_prefix), *_site_dirs(), os.path.realpath(__file__)]
        kept: list[str] = ["/usr"]
        for src in sorted(set(sources), key=len):
            if not any(src == k or src.startswith(k.rstrip("/") + "/") for k in kept):
                kept.append(src)
                args += ["--ro-bind", src, src]
        _mount_cache.append(args)
    return _mount_cache[0]


def _site_dirs() -> list[str]:
    """The folders PIL and numpy are imported from (the harness puts them on its sys.path)."""
    import importlib.util

    dirs = []
    for name in ("PIL", "numpy"):
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.origin:
            raise SandboxUnavailable(f"the sandbox needs the '{name}' package")
        site = os.path.dirname(os.path.dirname(os.path.realpath(spec.origin)))
        if site not in dirs:
            dirs.append(site)
    return dirs


def _encode_png(image: Any) -> bytes:
    import io

    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def _tiny_image() -> Any:
    from PIL import Image

    return Image.new("RGB", (8, 8))


def _check_png(png: bytes, max_pixels: int) -> tuple[tuple[int, int] | None, str | None]:
    """Re-read the output's header here, outside the sandbox: a PNG within the size limits."""
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(png)) as im:
            fmt, (w, h) = im.format, im.size
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad data
        return None, f"the output is not an image: {type(e).__name__}"
    if fmt != "PNG" or not (0 < w * h <= max_pixels):
        return None, f"the output is a {w}x{h} {fmt}, not a PNG of at most {max_pixels} pixels"
    return (w, h), None


# ------------------------------------------------------------------ the harness (inside bwrap)


class _Capture:
    """``sys.stdout`` for the code: keeps the first ``limit`` characters."""

    def __init__(self, limit: int):
        self.parts: list[str] = []
        self.room = limit

    def write(self, s: str) -> int:
        s = str(s)
        if self.room > 0:
            self.parts.append(s[: self.room])
            self.room -= len(self.parts[-1])
        return len(s)

    def flush(self) -> None:
        pass

    def getvalue(self) -> str:
        return "".join(self.parts)


def _verdict_channel(key: str) -> tuple[Callable[..., None], Callable[..., None]]:
    """``emit`` writes one record to the parent, ``finish`` writes one and exits with a status.

    Everything they use is bound here, before the code runs: the code can replace ``os.write``,
    ``os._exit``, ``json`` or builtins, not these locals. The verdict descriptor is a private copy of
    stdout; fd 1 then goes to the log, like fd 2."""
    import gc

    fd = os.dup(1)
    os.dup2(2, 1)
    write, exit_now, gc_off, length, text = os.write, os._exit, gc.disable, len, str
    prefix = key.encode()

    def emit(
        kind: str, reason: str = "", detail: str = "", stdout: str = "", layers: str = "", png: bytes = b""
    ) -> None:
        fields = [
            text.replace(text.__str__(f), "\x00", "\ufffd") for f in (kind, reason, detail, stdout, layers)
        ]
        head = text.encode("\x00".join(fields), "utf-8", "replace")
        data = memoryview(prefix + b" %d %d\n" % (length(head), length(png)) + head + png)
        while length(data):
            data = data[write(fd, data) :]

    def finish(status: int, kind: str, *fields: Any, **named: Any) -> None:
        gc_off()  # no finalizer of the code's objects runs between here and the exit
        try:
            emit(kind, *fields, **named)
        finally:
            exit_now(status)

    return emit, finish


def _child_main() -> None:
    """Read the job, confine this process, run the code, leave one verdict and an exit status."""
    stdin = sys.stdin.buffer
    job = json.loads(stdin.readline())
    data = stdin.read()
    emit, finish = _verdict_channel(job["key"])
    caught = BaseException  # bound now: the code may rebind the builtin
    try:
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # no Python handler left for a signal to run
        import warnings

        warnings.simplefilter("ignore")  # showing a warning reads source files; they would not be readable
        sys.path[:0] = job["paths"]
        names = _preload()
        layers = _confine(job)
    except caught as e:
        finish(_EXIT_SETUP, "setup", "", f"{type(e).__name__}: {e}")
    emit("ready", layers=",".join(layers))
    try:
        image, problem = _load_input(data)
        if problem:
            finish(_EXIT_FAILED, "final", "bad_input", problem, "", ",".join(layers))
        builtins_ = None
        if job["audit"]:
            layers.append("audit")
            sys.addaudithook(_make_hook(finish, ",".join(layers)))
            builtins_ = _user_builtins()
        reason, detail, stdout, png = _run_user(job["code"], image, names, builtins_, job)
        finish(
            _EXIT_OK if reason is None else _EXIT_FAILED,
            "final",
            reason or "",
            detail or "",
            stdout,
            ",".join(layers),
            png,
        )
    except caught as e:  # the harness itself failed after the code ran: never a success
        finish(_EXIT_FAILED, "final", "error", f"the sandbox failed: {type(e).__name__}", "", "")


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
    return {
        "Image": Image,
        "ImageOps": mods["PIL.ImageOps"],
        "ImageEnhance": mods["PIL.ImageEnhance"],
        "ImageFilter": mods["PIL.ImageFilter"],
        "ImageDraw": mods["PIL.ImageDraw"],
        "np": numpy,
        "math": mods["math"],
    }


# Linux constants; Landlock's syscall numbers are the same on every architecture.
_PR_SET_NO_NEW_PRIVS, _PR_SET_SECCOMP, _SECCOMP_MODE_FILTER = 38, 22, 2
_SYS_LANDLOCK_CREATE_RULESET, _SYS_LANDLOCK_ADD_RULE, _SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446
# WRITE_FILE, READ_FILE, READ_DIR, REMOVE_DIR, REMOVE_FILE, MAKE_DIR, MAKE_REG, MAKE_SYM, REFER, TRUNCATE
_LL_SCRATCH = sum(1 << b for b in (1, 2, 3, 4, 5, 7, 8, 12, 13, 14))


def _confine(job: dict) -> list[str]:
    """Apply the in-process layers: rlimits, the uid drop (root), Landlock, seccomp. A required one that
    does not apply raises, and the code never runs."""
    import ctypes
    import resource

    libc = ctypes.CDLL(None, use_errno=True)
    threads = len(os.listdir("/proc/self/task"))  # read now: Landlock hides /proc below
    if threads != 1:
        raise RuntimeError(f"{threads} threads: a seccomp filter would cover only one")
    limits = [
        (resource.RLIMIT_AS, _vm_size() + (job["memory_mb"] << 20)),
        (resource.RLIMIT_CPU, job["cpu_s"]),  # SIGKILL (as PID 1 the harness would ignore SIGXCPU)
        (resource.RLIMIT_FSIZE, job["fsize"]),
        (resource.RLIMIT_NOFILE, 64),
        (resource.RLIMIT_CORE, 0),
    ]
    for which, soft, *hard in limits:
        resource.setrlimit(which, (soft, hard[0] if hard else soft))
    layers = ["rlimits"]
    ruleset, abi = _landlock_ruleset(libc) if job["landlock"] else (None, 0)
    if job["root"]:  # bwrap ran as root without a user namespace: become nobody for real
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
        layers.append(f"uid:{NOBODY}")
    else:
        layers.append(f"userns:{os.geteuid()}")
    if os.getresuid() != (NOBODY,) * 3 or os.getresgid() != (NOBODY,) * 3:
        raise PermissionError(f"still uid {os.getresuid()}, gid {os.getresgid()}, not {NOBODY}")
    resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
    if libc.prctl(
        _PR_SET_NO_NEW_PRIVS, ctypes.c_ulong(1), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0)
    ):
        raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS")
    if ruleset is not None:
        if libc.syscall(_SYS_LANDLOCK_RESTRICT_SELF, ruleset, 0) == 0:
            layers.append(f"landlock:abi{abi}")
        os.close(ruleset)
    _load_seccomp(libc, bytes.fromhex(job["seccomp"]))
    layers.append("seccomp")
    return layers


def _load_seccomp(libc: Any, program: bytes) -> None:
    """Install the parent's BPF program on this process (one thread, checked: the filter covers it all)."""
    import ctypes

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    code = ctypes.create_string_buffer(program, len(program))
    prog = SockFprog(len(program) // 8, ctypes.addressof(code))
    if libc.prctl(
        _PR_SET_SECCOMP,
        ctypes.c_ulong(_SECCOMP_MODE_FILTER),
        ctypes.byref(prog),
        ctypes.c_ulong(0),
        ctypes.c_ulong(0),
    ):
        raise OSError(ctypes.get_errno(), "seccomp: the filter did not load")


def _vm_size() -> int:
    """Bytes of address space in use (the preloaded libraries): the memory limit comes on top."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))


def _landlock_ruleset(libc: Any) -> tuple[int | None, int]:
    """A Landlock ruleset fd (read-write in scratch, nothing else, no TCP, scoped signals and abstract
    sockets) and the ABI version; (None, 0) where the kernel has no Landlock."""
    import ctypes
    import struct

    abi = libc.syscall(_SYS_LANDLOCK_CREATE_RULESET, None, 0, 1)  # 1: LANDLOCK_CREATE_RULESET_VERSION
    if abi < 1:
        return None, 0
    fs = (1 << 13) - 1 | (abi >= 2) << 13 | (abi >= 3) << 14 | (abi >= 5) << 15
    attr = ctypes.create_string_buffer(
        struct.pack("=QQQ", fs, 0b11 if abi >= 4 else 0, 0b11 if abi >= 6 else 0)
    )
    ruleset = libc.syscall(_SYS_LANDLOCK_CREATE_RULESET, attr, 24, 0)
    if ruleset < 0:
        return None, 0
    dfd = os.open(SCRATCH, os.O_PATH | os.O_CLOEXEC)
    rule = ctypes.create_string_buffer(
        struct.pack("=Qi", _LL_SCRATCH & fs, dfd)
    )  # landlock_path_beneath_attr
    ok = libc.syscall(_SYS_LANDLOCK_ADD_RULE, ruleset, 1, rule, 0) == 0  # 1: LANDLOCK_RULE_PATH_BENEATH
    os.close(dfd)
    if not ok:
        os.close(ruleset)
        return None, 0
    return ruleset, abi


def _load_input(data: bytes) -> tuple[Any, str | None]:
    """The decoded input image, also written to ``input.png`` (as PNG whatever it arrived as)."""
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            fmt = im.format
            img = im if im.mode in _PNG_MODES else im.convert("RGBA" if "A" in im.getbands() else "RGB")
        if fmt == "PNG":
            with open("input.png", "wb") as f:
                f.write(data)
        else:
            img.save("input.png", "PNG")
        return img, None
    except MemoryError:
        return None, "the input image does not fit in memory_mb"
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad data
        return None, f"the input image does not decode: {_describe(e)}"


# Events on paths, allowed inside the scratch folder: the positions of their path arguments.
_PATH_EVENTS = {
    "os.listdir": (0,),
    "os.scandir": (0,),
    "os.walk": (0,),
    "os.fwalk": (0,),
    "os.getxattr": (0,),
    "os.listxattr": (0,),
    "glob.glob": (0,),
    "glob.glob/2": (0, 2),
    "pathlib.Path.glob": (0,),
    "pathlib.Path.rglob": (0,),
    "os.mkdir": (0,),
    "os.rmdir": (0,),
    "os.remove": (0,),
    "os.rename": (0, 1),
    "os.symlink": (0, 1),
    "os.link": (0, 1),
    "os.truncate": (0,),
    "os.chmod": (0,),
    "os.chown": (0,),
    "os.utime": (0,),
    "os.chflags": (0,),
    "os.setxattr": (0,),
    "os.removexattr": (0,),
    "shutil.copyfile": (0, 1),
    "shutil.copymode": (0, 1),
    "shutil.copystat": (0, 1),
    "shutil.copytree": (0, 1),
    "shutil.move": (0, 1),
    "shutil.rmtree": (0,),
    "shutil.chown": (0,),
    "shutil.make_archive": (0, 2),
    "shutil.unpack_archive": (0, 1),
}
# Whole families: network, processes, native code, memory maps, limits, threads, introspection,
# making code objects (code.__new__, marshal).
_DENIED_PREFIXES = (
    "os.",
    "shutil.",
    "socket.",
    "subprocess.",
    "ctypes.",
    "mmap.",
    "fcntl.",
    "resource.",
    "signal.",
    "_thread.",
    "gc.",
    "marshal.",
    "code.",
    "pdb.",
    "webbrowser.",
    "http.",
    "urllib.",
    "ftplib.",
    "smtplib.",
    "poplib.",
    "imaplib.",
    "nntplib.",
    "telnetlib.",
    "sqlite3.",
    "syslog.",
    "pickle.",
    "ensurepip.",
    "sandbox.",
)
_DENIED = frozenset(
    {
        "sys.addaudithook",
        "sys.settrace",
        "sys.setprofile",
        "sys._getframe",
        "sys._current_frames",
        "sys._current_exceptions",
        "builtins.breakpoint",
    }
)
_FRAME_ATTRS = frozenset({"tb_frame", "gi_frame", "cr_frame", "ag_frame", "f_back"})
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC


def _make_hook(finish: Callable[..., None], layers: str) -> Callable[[str, tuple], None]:
    """The audit hook. A forbidden event writes the ``blocked`` verdict and ends the process on the spot.

    Every rule, function and builtin it uses is a local bound here, before the code runs: replacing
    this module's globals (reachable as ``sys.modules['__main__']``), ``os``/``posixpath`` attributes or
    builtins changes nothing it reads. Paths are resolved by a small resolver on ``os.lstat`` and
    ``os.readlink`` (C functions, bound), not ``os.path.realpath`` (Python, patchable)."""
    path_events, denied, denied_prefixes = dict(_PATH_EVENTS), _DENIED, _DENIED_PREFIXES
    allowed, frame_attrs, write_flags, scratch = ALLOWED_IMPORTS, _FRAME_ATTRS, _WRITE_FLAGS, SCRATCH
    lstat, readlink, fs_encoding = os.lstat, os.readlink, sys.getfilesystemencoding()
    type_, len_, str_, bytes_, int_, tuple_, repr_ = type, len, str, bytes, int, tuple, repr
    memory_error, base_exception = MemoryError, BaseException

    def stop(reason: str, what: str) -> None:
        finish(_EXIT_BLOCKED, "blocked", reason, what[:300], "", layers)

    def show(arg: Any) -> str:
        """An argument for a detail, without running code the sandboxed program defined."""
        if arg is None or type_(arg) in (str_, bytes_, int_, float, bool):
            return repr_(arg)[:120]
        if type_(arg) is tuple_ and len_(arg) <= 4 and all(type_(a) in (str_, int_) for a in arg):
            return repr_(arg)
        return f"<{type_(arg).__name__}>"

    def resolve(obj: Any) -> str | None:
        """Where a path argument leads ('..' and symlinks followed); None for a descriptor or nothing."""
        if obj is None or type_(obj) is int_:
            return None
        if type_(obj) is bytes_:
            obj = bytes_.decode(obj, fs_encoding, "surrogateescape")
        elif (
            type_(obj) is not str_
        ):  # a subclass or a PathLike could answer the hook and the call differently
            stop("blocked", f"a path of type {type_(obj).__name__}")
        todo = (obj if obj.startswith("/") else scratch + "/" + obj).split("/")[::-1]
        done: list[str] = []
        hops = 0
        while todo:
            name = todo.pop()
            if name in ("", "."):
                continue
            if name == "..":
                if done:
                    done.pop()
                continue
            here = "/" + "/".join(done + [name])
            try:
                is_link = lstat(here).st_mode & 0o170000 == 0o120000
            except OSError:  # not there (yet): taken as written
                is_link = False
            if is_link and hops < 40:
                hops += 1
                target = readlink(here)
                if target.startswith("/"):
                    done = []
                todo.extend(target.split("/")[::-1])
            else:
                done.append(name)
        return "/" + "/".join(done)

    def outside(path: str | None) -> bool:
        return path is not None and path != scratch and not path.startswith(scratch + "/")

    def check(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = (tuple_(args) + (None, None))[:3]
            real = resolve(path)
            if outside(real):
                write = bool((flags if type_(flags) is int_ else 0) & write_flags) or (
                    type_(mode) is str_ and any(c in mode for c in "wax+")
                )
                shown = path if type_(path) is str_ and path == real else f"{show(path)} ({real})"
                stop("blocked", f"open {shown} for {'writing' if write else 'reading'}")
        elif event in path_events:
            for i in path_events[event]:
                real = resolve(args[i]) if i < len_(args) else None
                if outside(real):
                    stop("blocked", f"{event} {real}")
        elif event == "import":
            name = args[0] if args and type_(args[0]) is str_ else "?"
            if name.partition(".")[0].lstrip("_") not in allowed:
                stop("blocked", f"import of '{name}'")
        elif event == "sandbox.import":
            stop("blocked", f"import of '{show(args[0])[1:-1]}'")
        elif event == "object.__getattr__":  # a frame leads to the harness's state
            if len_(args) > 1 and args[1] in frame_attrs:
                stop("blocked", f"{event} {args[1]}")
        elif event in ("object.__setattr__", "object.__delattr__"):  # swapping a function's code
            if len_(args) > 1 and args[1] == "__code__":
                stop("blocked", f"{event} __code__")
        elif event in denied or event.startswith(denied_prefixes):
            stop("blocked", f"{event} {', '.join(show(a) for a in args)}".strip())

    def hook(event: str, args: tuple) -> None:
        try:
            check(event, args)
        except memory_error:
            stop("memory", f"MemoryError during {event}")
        except base_exception as e:  # the hook must not fail open
            stop("blocked", f"{event} (the sandbox could not check it: {type_(e).__name__})")

    return hook


def _user_builtins() -> dict[str, Any]:
    """Builtins for the code: no debugger or console helpers, and an ``__import__`` that refuses
    modules off ALLOWED_IMPORTS through the hook (``sandbox.import`` ends the run there)."""
    import builtins

    real_import, audit, allowed = builtins.__import__, sys.audit, ALLOWED_IMPORTS

    def guarded_import(name, globals=None, locals=None, fromlist=(), level=0):
        if level or name.partition(".")[0] not in allowed:
            audit("sandbox.import", "." * level + name)
        return real_import(name, globals, locals, fromlist, level)

    names = dict(builtins.__dict__)
    for name in ("breakpoint", "input", "help", "exit", "quit", "copyright", "credits", "license"):
        names.pop(name, None)
    names["__import__"] = guarded_import
    return names


def _run_user(
    code: str, image: Any, names: dict, builtins_: dict | None, job: dict
) -> tuple[str | None, str | None, str, bytes]:
    """Execute the code; return (reason, detail, stdout, output PNG), reason None for a success.

    Success needs the line after ``exec`` to be reached: an exception the harness fails to catch
    (the code may rebind names it uses) ends the process without a final record, a failure."""
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
    caught, memory_error, stdout = BaseException, MemoryError, sys.stdout
    sys.stdout = out
    try:
        exec(compile(code, "<sandbox>", "exec"), env)  # noqa: S102 (what the sandbox is for)
    except memory_error:
        return "memory", f"MemoryError: more than memory_mb={job['memory_mb']}", out.getvalue(), b""
    except caught as e:  # the code's own failure, whatever it raised
        return "error", _describe(e), out.getvalue(), b""
    finally:
        sys.stdout = stdout
    printed = out.getvalue()
    try:
        result = env.get("result")
        if result is None and os.path.lexists("output.png"):
            result = Image.open("output.png")
            result.load()
        if result is None:
            return "no_output", "the code neither set `result` nor saved output.png", printed, b""
        if not isinstance(result, Image.Image):
            return "bad_output", f"result is a {type(result).__name__}, not a PIL image", printed, b""
        w, h = result.size
        if not (w >= 1 and h >= 1 and w * h <= job["max_output_pixels"]):
            return (
                "bad_output",
                f"result is {w}x{h}: more than max_output_pixels={job['max_output_pixels']}",
                printed,
                b"",
            )
        if result.mode not in _PNG_MODES:
            result = result.convert("RGBA" if "A" in result.getbands() else "RGB")
        buf = io.BytesIO()
        result.save(buf, "PNG")
    except memory_error:
        return "memory", "MemoryError while saving the result", printed, b""
    except Exception as e:  # noqa: BLE001 - a broken result: PIL raises many types
        return "bad_output", _describe(e), printed, b""
    return None, None, printed, buf.getvalue()


def _describe(e: BaseException) -> str:
    """``Type: message (line N)`` for an exception, N being the line of the code's top-level statement."""
    try:
        msg = str(e)
    except Exception:  # noqa: BLE001 - a message that cannot be shown
        msg = ""
    line = e.lineno if isinstance(e, SyntaxError) else None
    tb = e.__traceback__.tb_next if e.__traceback__ is not None else None  # [0] is the harness's exec
    if line is None and tb is not None:
        line = tb.tb_lineno
    text = f"{type(e).__name__}: {msg}" if msg else type(e).__name__
    return text[:300] + (f" (line {line})" if line else "")


if __name__ == "__main__":
    _child_main()
