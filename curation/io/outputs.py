"""What an output writer may touch: which folders are ours, what ``--overwrite`` deletes, which outputs are
refused, who may write an output at a time, and the life of a pool's or mixture's folder
(:class:`OutputFolder`: claim, resume, done records, temp sweep). Every writer (pools, mixtures, audits) goes
through here; how each file in it is written is :mod:`curation.io.commit`.

- **Marker.** A folder this tool writes holds ``.curation-output.json`` (``tool``, ``kind``: pool, mixture,
  mixtures-root or audit, ``version``, ``created``), written when the folder is first claimed. Folders written
  before markers existed are recognised by what they hold (see :func:`owner`) and get a marker on their next
  run. A non-empty folder that is neither is never written into and never deleted.
- **Overwrite.** ``--overwrite`` empties a folder this tool wrote (everything but the lock), saying what it
  deletes. Symlinks inside it are unlinked, never followed, so nothing outside the output is touched.
- **Overlap.** An output equal to an input, inside an input's folder (a glob's fixed prefix) or holding an
  input is refused before anything is read or deleted; local paths compare as real paths (symlinks resolved),
  ``s3://`` URIs by bucket and key prefix.
- **Lock.** One writer per output (:func:`lock`): ``flock`` on ``.curation-lock`` locally (the kernel drops it
  when the holder dies, however it dies), a lock object with a time to live on ``s3://``.
- **Resume.** A pool or mixture folder records the hash of what it holds (:data:`RECORDS`); a rerun of the
  same recipe resumes it (finished units have done records and are skipped), any other is refused.

Example::

    check_overlap(root, [("sources.0.paths", "/data/corpus/*.tar")])
    with lock(root, "curation run demo.yaml"):
        claim(root, "pool", overwrite=True)   # empties an earlier pool, refuses anything else
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from pathlib import PurePath
from typing import Any

import pyarrow.fs as pafs

from curation import __version__
from curation.io import commit
from curation.io import fs as cfs

log = logging.getLogger(__name__)

TOOL = "keye-curation"
MARKER = ".curation-output.json"
LOCK = ".curation-lock"
KINDS = ("pool", "mixture", "mixtures-root", "audit")
#: How long an ``s3://`` lock stays valid without its holder renewing it (renewed every third of it).
S3_LOCK_TTL_S = 300.0
# How a folder written before markers existed is recognised: the format its manifest.json (pools, mixtures)
# or report.json (audits) declares, as curation.io.pool, curation.mix.builder and curation.dedup.audit write
# them.
_LEGACY_FORMATS = {"curation.pool/1": "pool", "curation.mixture/1": "mixture", "curation.audit/1": "audit"}
#: Per kind of :class:`OutputFolder`: its record of what it holds, the hash in it that a resumed run must
#: agree on, and the folders it writes into. The record also tells a pool or mixture written before markers
#: existed.
RECORDS = {
    "pool": ("_work/recipe.json", "recipe_hash", ("shards", "rejects", "_work/done", "_work/index")),
    "mixture": ("_work/mixture.json", "mixture_hash", ("shards", "_work/done", "_work/buckets")),
}
_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}")


class OutputError(FileExistsError):
    """An output this run may not write: it overlaps an input, holds what this tool did not write, or another
    run holds its lock. The message names the folder and what to do; nothing was deleted."""


def name_problem(name: Any, where: str) -> str | None:
    """Why ``name`` cannot become a folder name under an output (``None`` if it can): a name like ``..`` or
    ``a/b`` would put the folder, and what ``--overwrite`` deletes, outside the output."""
    if isinstance(name, str) and _NAME.fullmatch(name):
        return None
    return (
        f"{where}: {str(name)[:80]!r} cannot be a folder name: use 1 to 128 letters, digits, '_', '-' "
        f"and '.', not starting with '.'"
    )


# ---------------------------------------------------------------- overlap


def _fixed_prefix(pattern: str) -> tuple[str, bool]:
    """The folder a glob searches (its parts before the first wildcard), and whether it searches below that
    folder (``**``, or a wildcard before the last part: :func:`curation.io.fs.expand`); a path without a
    wildcard is itself (a folder is read whole)."""
    scheme, sep, rest = pattern.partition("://") if cfs.is_uri(pattern) else ("", "", pattern)
    parts = rest.split("/")
    fixed = next((i for i, p in enumerate(parts) if any(ch in p for ch in "*?[")), len(parts))
    prefix = "/".join(parts[:fixed])
    if not prefix and not sep:
        prefix = "/" if rest.startswith("/") else "."
    return f"{scheme}{sep}{prefix}", fixed == len(parts) or len(parts) - fixed > 1 or "**" in rest


def _location(path: str) -> tuple[str, ...]:
    """``path`` as comparable parts: a local path's real path (symlinks resolved), a URI's scheme and bucket
    then its key's parts."""
    path = path.removeprefix("file://")
    if cfs.is_uri(path):
        scheme, _, rest = path.partition("://")
        return (f"{scheme}://", *(p for p in rest.split("/") if p))
    return ("", *PurePath(os.path.realpath(os.path.expanduser(path))).parts)


def check_overlap(output: str, inputs: Iterable[tuple[str, str]]) -> None:
    """Refuse ``output`` if it overlaps one of ``inputs`` (``(recipe key, path or glob)`` pairs): a pool
    inside its corpus is read back as input by the next run, and a corpus inside a pool is deleted by
    ``--overwrite``."""
    out = _location(output)
    for where, pattern in inputs:
        prefix, deep = _fixed_prefix(pattern)
        inp = _location(prefix)
        # a glob like corpus/wds/*.tar reads only that folder's own files: a pool in corpus/wds/pool is not
        # read
        inside = out[: len(inp)] == inp and (deep or len(out) == len(inp))
        if inside or inp[: len(out)] == out:
            relation = "is" if out == inp else "is inside" if len(out) > len(inp) else "holds"
            raise OutputError(
                f"the output {output} {relation} the input {pattern} ({where}); write the output to "
                f"a folder outside every input, and keep inputs out of the output"
            )


# ---------------------------------------------------------------- ownership


def _read_json(fs: pafs.FileSystem, path: str) -> dict[str, Any] | None:
    """The JSON object in the regular file ``path`` (never a pipe: it would block), or ``None``."""
    try:
        if fs.get_file_info(path).type != pafs.FileType.File:
            return None
        with fs.open_input_stream(path) as f:
            data = json.loads(f.read())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _listing(fs: pafs.FileSystem, path: str, root: str) -> list[pafs.FileInfo] | None:
    """The entries of the folder ``path`` (``None``: there is none); a file there is refused."""
    with cfs.writing(root):
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            return None
        if info.type != pafs.FileType.Directory:
            raise OutputError(f"{root} is a file, not a folder; write the output elsewhere")
        return fs.get_file_info(pafs.FileSelector(path))


def owner(root: str) -> str | None:
    """Which output of this tool ``root`` holds: a kind from its marker, or for a folder written before
    markers existed, from its own records (a pool's ``_work/recipe.json`` or manifest, a mixture's
    ``_work/mixture.json`` or manifest, an audit's ``report.json`` or ``scan`` pool, a folder of such
    mixtures). ``""`` when there is nothing there (no folder, or only a lock), ``None`` for anything else."""
    fs, path = cfs.filesystem(root)
    entries = _listing(fs, path, root)
    names = {i.base_name for i in entries or ()} - {LOCK}
    if not names:
        return ""
    marker = _read_json(fs, f"{path}/{MARKER}") or {}
    if marker.get("tool") == TOOL and marker.get("kind") in KINDS:
        return marker["kind"]
    for record in ("manifest.json", "report.json"):
        kind = _LEGACY_FORMATS.get((_read_json(fs, f"{path}/{record}") or {}).get("format"))
        if kind:
            return kind
    for kind, (record, key, _) in RECORDS.items():
        if key in (_read_json(fs, f"{path}/{record}") or {}):
            return kind
    if "scan" in names and owner(f"{root}/scan") == "pool":
        return "audit"
    dirs = [i.base_name for i in entries if i.type == pafs.FileType.Directory]
    if len(dirs) == len(names) and all(owner(f"{root}/{d}") == "mixture" for d in dirs):
        return "mixtures-root"
    return None


def _foreign(root: str, overwrite: bool) -> OutputError:
    return OutputError(
        f"{root} is not empty and was not written by curation (it has no {MARKER}); "
        + ("--overwrite deletes only outputs of this tool. " if overwrite else "")
        + "Write the output to a new or empty folder, or move that folder's files away yourself"
    )


def check_writable(root: str, kind: str, overwrite: bool = False) -> str:
    """Refuse ``root`` unless this run may write a ``kind`` there; return what it holds (:func:`owner`).
    Reads only: call it before anything is written or deleted."""
    found = owner(root)
    if found is None:
        raise _foreign(root, overwrite)
    if found and found != kind and not overwrite:
        raise OutputError(
            f"{root} holds a {found} written by curation, not a {kind}; write elsewhere, "
            f"or pass --overwrite to delete it"
        )
    return found


def claim(root: str, kind: str, overwrite: bool = False) -> None:
    """Make ``root`` this run's ``kind`` output: create it, keep it as it is (a rerun resumes it), or with
    ``overwrite`` empty it first; write its marker (:data:`MARKER`). Refuses what :func:`check_writable`
    refuses. Call it holding :func:`lock`."""
    found = check_writable(root, kind, overwrite)
    fs, path = cfs.filesystem(root)
    with cfs.writing(root):
        if overwrite and found:
            _empty(fs, path, root, found)
        fs.create_dir(path, recursive=True)
        if (_read_json(fs, f"{path}/{MARKER}") or {}).get("kind") != kind:
            body = {"tool": TOOL, "kind": kind, "version": __version__, "created": _now()}
            commit.write_bytes(f"{path}/{MARKER}", json.dumps(body, indent=2).encode(), fs)


def _empty(fs: pafs.FileSystem, path: str, root: str, kind: str) -> None:
    """Delete everything in ``path`` but the lock. Locally a symlink is unlinked, never followed (``rmtree``
    does not follow the links inside a folder either), so nothing outside ``root`` is touched."""
    entries = [i for i in fs.get_file_info(pafs.FileSelector(path)) if i.base_name != LOCK]
    names = sorted(i.base_name + ("/" if i.type == pafs.FileType.Directory else "") for i in entries)
    shown = ", ".join(names[:12])
    log.warning(
        "--overwrite: deleting the %s in %s (%d entries: %s%s)",
        kind,
        root,
        len(entries),
        shown,
        ", ..." if len(entries) > 12 else "",
    )
    if not isinstance(fs, pafs.LocalFileSystem):
        for i in entries:
            (fs.delete_dir if i.type == pafs.FileType.Directory else fs.delete_file)(i.path)
        return
    with os.scandir(path) as it:
        for entry in it:
            if entry.name == LOCK:
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)


# ---------------------------------------------------------------- folder life


class OutputFolder:
    """A pool's or mixture's folder (``kind`` in :data:`RECORDS`) through one run: :meth:`prepare` it, commit
    each unit of work by its done record (:meth:`commit_done`), skip the units a rerun finds done
    (:meth:`done_records`), :meth:`sweep_temp` what killed writers left. Exactly once per unit: a unit is
    done when its record is, and the record is written after everything it lists.

    Example::

        folder = OutputFolder("pools/demo", "pool")
        with lock(folder.root, "curation run demo.yaml"):
            folder.prepare({"recipe_hash": "ab12", "recipe": resolved})
            todo = [u for u in units if u not in folder.done_records()]
    """

    def __init__(self, root: str, kind: str):
        self.root, self.kind = root, kind
        self.fs, self.path = cfs.filesystem(root)
        record, self.hash_key, self.subdirs = RECORDS[kind]
        self.record_path = f"{self.path}/{record}"

    def prepare(self, record: dict[str, Any], *, overwrite: bool = False, indent: int | None = None) -> None:
        """Make the folder this run's: claim it (:func:`claim`; ``overwrite`` empties an earlier output of
        this tool), check that what it holds is this output (``record[hash_key]`` equal to the recorded one: a
        rerun, which resumes it, with the temp files of the run before swept), create its folders and write
        ``record`` (JSON, ``indent``). Call it holding :func:`lock`.

        Raises ``FileExistsError`` for a folder holding another recipe's output (or a manifest without its
        record, which cannot be checked), :class:`OutputError` for one this tool did not write,
        :class:`curation.io.fs.StorageError` when the location cannot be read or written."""
        with cfs.writing(self.root):
            claim(self.root, self.kind, overwrite)
            if self.fs.get_file_info(self.record_path).type == pafs.FileType.File:
                with self.fs.open_input_stream(self.record_path) as f:
                    previous = json.loads(f.read()).get(self.hash_key)
                if previous != record[self.hash_key]:
                    raise FileExistsError(
                        f"{self.root} holds a {self.kind} from a different recipe (hash {previous}, this one "
                        f"is {record[self.hash_key]}); write elsewhere or pass --overwrite"
                    )
                self.sweep_temp()
            elif self.fs.get_file_info(f"{self.path}/manifest.json").type == pafs.FileType.File:
                raise FileExistsError(
                    f"{self.root} already holds a {self.kind}; write elsewhere or pass --overwrite"
                )
            cfs.make_dirs(self.root, self.subdirs)
            commit.write_bytes(self.record_path, json.dumps(record, indent=indent).encode(), self.fs)

    def sweep_temp(self) -> int:
        """Before resuming, and once every task is done: :func:`curation.io.commit.sweep_temp`."""
        return commit.sweep_temp(self.fs, self.path, self.root)

    def done_path(self, n: int) -> str:
        return f"{self.path}/_work/done/{n:05d}.json"

    def commit_done(self, n: int, record: dict[str, Any]) -> None:
        """Write unit ``n``'s done record (keys sorted): the commit point of that unit."""
        commit.write_bytes(self.done_path(n), json.dumps(record, sort_keys=True).encode(), self.fs)

    def done_records(self) -> dict[int, dict[str, Any]]:
        """The done records there are, by unit."""
        out = {}
        for info in self.fs.get_file_info(pafs.FileSelector(f"{self.path}/_work/done", allow_not_found=True)):
            if info.base_name.endswith(".json"):
                with self.fs.open_input_stream(info.path) as f:
                    out[int(info.base_name.removesuffix(".json"))] = json.loads(f.read())
        return out


# ---------------------------------------------------------------- lock


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _holder(command: str) -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "command": command, "started": _now()}


def _who(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "another run"
    return (
        f"'{holder.get('command')}' (pid {holder.get('pid')} on {holder.get('host')}, since "
        f"{holder.get('started')})"
    )


def _refusal(root: str, holder: dict[str, Any] | None) -> OutputError:
    return OutputError(
        f"{root} is being written by {_who(holder)}; wait for that run to finish or stop it, "
        f"then run this again (a run that died does not keep the lock)"
    )


@contextlib.contextmanager
def lock(root: str, command: str, ttl_s: float = S3_LOCK_TTL_S) -> Iterator[None]:
    """Hold ``root``'s writer lock, or raise :class:`OutputError` naming its holder (host, pid, command,
    start).

    Creates ``root`` if need be, never inside a folder this tool did not write. ``command`` says what holds
    it (no secrets: it is stored in the output). ``ttl_s``: the ``s3://`` lock's time to live."""
    if owner(root) is None:
        raise _foreign(root, overwrite=False)
    fs, path = cfs.filesystem(root)
    with cfs.writing(root):
        fs.create_dir(path, recursive=True)
    held = _local_lock if isinstance(fs, pafs.LocalFileSystem) else _s3_lock
    with held(root, path, _holder(command), ttl_s):
        yield


@contextlib.contextmanager
def _local_lock(root: str, path: str, holder: dict[str, Any], ttl_s: float) -> Iterator[None]:
    """``flock`` on ``LOCK``: released by the kernel when the holder exits or is killed. The file stays (an
    unlinked lock file could be held by two processes at once); its body names the holder while it is held."""
    import fcntl

    with cfs.writing(root):
        fd = os.open(f"{path}/{LOCK}", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _refusal(root, _json_or_none(os.pread(fd, 1 << 16, 0))) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the flock


@contextlib.contextmanager
def _s3_lock(root: str, path: str, holder: dict[str, Any], ttl_s: float) -> Iterator[None]:
    """A lock object created only if absent (``If-None-Match: *``), renewed every ``ttl_s / 3`` with
    ``If-Match`` on its own ETag, deleted on exit. It is stale once ``expires`` has passed, or at once when
    its holder ran on this host and that process is gone; a stale lock is replaced with ``If-Match`` on the
    ETag read, so of two runs that find it stale only one gets it."""
    try:
        from botocore.exceptions import ClientError
    except ImportError:
        raise OutputError(
            f"writing to {root} needs boto3 for its lock: pip install 'keye-curation[s3]'"
        ) from None
    client = _s3_client()
    bucket, _, prefix = path.partition("/")
    key = f"{prefix.rstrip('/')}/{LOCK}" if prefix.strip("/") else LOCK
    token = uuid.uuid4().hex

    def put(**condition) -> str:
        body = dict(holder, token=token, expires=time.time() + ttl_s)
        return client.put_object(Bucket=bucket, Key=key, Body=json.dumps(body).encode(), **condition)["ETag"]

    def code(e: ClientError) -> str:
        return e.response.get("Error", {}).get("Code", "")

    def acquire() -> str:
        for _ in range(3):  # the holder may release between our attempt and our read
            try:
                return put(IfNoneMatch="*")
            except ClientError as e:
                if code(e) not in _CONFLICT:
                    raise OSError(str(e)) from None
            try:
                got = client.get_object(Bucket=bucket, Key=key)
            except ClientError as e:
                if code(e) in ("NoSuchKey", "404"):
                    continue
                raise OSError(str(e)) from None
            other = _json_or_none(got["Body"].read())
            if not _stale(other):
                raise _refusal(root, other)
            log.warning("%s: taking over the lock left by %s", root, _who(other))
            try:
                return put(IfMatch=got["ETag"])
            except ClientError as e:
                if code(e) not in _CONFLICT and code(e) not in ("NoSuchKey", "404"):
                    raise OSError(str(e)) from None
        raise _refusal(root, None)

    with cfs.writing(root):
        etag = acquire()
    stop = threading.Event()

    def renew() -> None:
        nonlocal etag
        while not stop.wait(ttl_s / 3):
            try:
                etag = put(IfMatch=etag)
            except ClientError as e:
                if code(e) in _CONFLICT:
                    log.error("%s: another run took over this run's lock (it was not renewed in time)", root)
                    return
                log.warning("%s: could not renew the lock (%s); trying again", root, code(e))
            except Exception as e:  # noqa: BLE001 - the store away for a while: the run itself reports that
                log.warning("%s: could not renew the lock (%s); trying again", root, type(e).__name__)

    renewer = threading.Thread(target=renew, name="curation-output-lock", daemon=True)
    renewer.start()
    try:
        yield
    finally:
        stop.set()
        renewer.join()
        with contextlib.suppress(Exception):  # best effort: a lock that cannot be deleted expires
            client.delete_object(Bucket=bucket, Key=key, IfMatch=etag)


_CONFLICT = ("PreconditionFailed", "ConditionalRequestConflict")


def _json_or_none(data: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(data or b"null")
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _stale(holder: dict[str, Any] | None) -> bool:
    """Whether an ``s3://`` lock's holder is gone: its time to live passed, or it ran here and has exited."""
    if not holder or not isinstance(holder.get("expires"), (int, float)):
        return True
    if holder["expires"] < time.time():
        return True
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
        try:
            os.kill(holder["pid"], 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
    return False


def _s3_client():
    """A boto3 client on the endpoint, region and credentials :func:`curation.io.fs.filesystem` uses."""
    import boto3

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint and "://" not in endpoint:
        endpoint = f"https://{endpoint}"
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    return boto3.client("s3", endpoint_url=endpoint, region_name=region)
