"""Local paths and ``s3://`` URIs behind one interface (pyarrow filesystems).

S3 settings come from the usual AWS places: ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY`` (and
``AWS_SESSION_TOKEN``), a profile (``AWS_PROFILE``, ``~/.aws/credentials``) or the instance role;
``AWS_REGION`` / ``AWS_DEFAULT_REGION``; and, for S3-compatible servers (MinIO, SeaweedFS, Ceph),
``AWS_ENDPOINT_URL`` (for example ``http://127.0.0.1:8333``). Credentials are never logged.

Writes of more than 10 MB go up as multipart uploads (pyarrow's S3 output stream, in 10 MB parts, uploaded in
the background while the rest is written). Transient errors (throttling, 5xx, dropped connections) are retried
with AWS's standard backoff, up to ``CURATION_S3_MAX_ATTEMPTS`` attempts per request (default 10).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import functools
import hashlib
import logging
import os
import posixpath
from urllib.parse import urlparse

import pyarrow.fs as pafs

from curation.secrets import redact

log = logging.getLogger(__name__)


def is_uri(path: str) -> bool:
    return "://" in path


@functools.lru_cache(maxsize=8)
def _s3(endpoint: str | None, region: str | None, credentials: str) -> pafs.S3FileSystem:
    # ``credentials`` is only a hash of the AWS_* credentials in the environment: it keys the cache so that
    # changing them in a long-lived process (a notebook) takes effect; pyarrow reads the values itself.
    kwargs = {}
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs["endpoint_override"] = parsed.netloc.rsplit("@", 1)[
            -1
        ]  # never user info: credentials come from AWS_*
        kwargs["scheme"] = parsed.scheme or "https"
        # S3-compatible servers generally need path-style addressing.
        kwargs["force_virtual_addressing"] = False
    if region:
        kwargs["region"] = region
    attempts = int(os.environ.get("CURATION_S3_MAX_ATTEMPTS", "10"))
    return pafs.S3FileSystem(retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=attempts), **kwargs)


class StorageError(OSError):
    """An output location that cannot be written: a missing bucket, refused credentials, a read-only or full
    disk. The message names the location and what to do; it never holds credentials. ``partial``: the job had
    written part of its output when it stopped (a rerun resumes it)."""

    partial: bool = False


@contextlib.contextmanager
def writing(root: str, where: str = ""):
    """Turn an ``OSError`` raised while reading or writing under ``root`` into a :class:`StorageError` that
    says where (``where``, e.g. the unit, then the location) and what to do. ``FileExistsError`` (a folder
    holding another job's output) and StorageErrors pass through unchanged."""
    try:
        yield
    except (FileExistsError, StorageError):
        raise
    except OSError as e:
        raise StorageError(f"{where}{storage_problem(root, e)}") from None


def make_dirs(root: str, subdirs: tuple[str, ...] = ("",)) -> None:
    """Create ``root`` (path or URI) and its ``subdirs``, or raise :class:`StorageError` saying why not."""
    fs, path = filesystem(root)
    with writing(root):
        for sub in subdirs:
            fs.create_dir(f"{path}/{sub}".rstrip("/"), recursive=True)


def storage_problem(root: str, e: BaseException) -> str:
    """What went wrong writing under ``root``, and what to do. Everything quoted is redacted: a server's
    message may echo a key, and ``root`` or the endpoint may carry ``user:password@``."""
    root, msg = redact(root), redact(str(e).strip())
    if root.startswith("s3://"):
        bucket = root[len("s3://") :].split("/", 1)[0]
        endpoint = redact(
            os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS"
        )
        if "not found" in msg.lower() and "bucket" in msg.lower():
            return (
                f"cannot write to {root}: the bucket '{bucket}' does not exist at {endpoint}; "
                f"create it first (aws s3 mb s3://{bucket}), or check the path and AWS_ENDPOINT_URL"
            )
        if any(
            k in msg.upper()
            for k in ("ACCESS_DENIED", "ACCESSDENIED", "SIGNATURE", "INVALIDACCESSKEY", "FORBIDDEN", "403")
        ):
            return (
                f"cannot write to {root}: the object store refused the credentials ({msg}); check "
                f"AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_PROFILE and the bucket's policy"
            )
        return f"cannot write to {root} at {endpoint}: {msg}"
    return f"cannot write to {root}: {msg}"


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path within it)`` for a local path or an ``s3://bucket/key`` URI."""
    if path.startswith("s3://"):
        if "@" in path[len("s3://") :].split("/", 1)[0]:
            raise ValueError(
                "credentials in an s3:// URI are not used: put them in AWS_ACCESS_KEY_ID / "
                "AWS_SECRET_ACCESS_KEY or a profile, and write s3://bucket/key"
            )
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        creds = "\0".join(
            os.environ.get(k, "")
            for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")
        )
        return _s3(endpoint, region, hashlib.sha256(creds.encode()).hexdigest()), path[len("s3://") :]
    if is_uri(path) and not path.startswith("file://"):
        # Only schemes whose file system is configured by the environment: pyarrow's from_uri would take an
        # endpoint, a scheme and credentials' destination from the URI's query string (gs://b/k?endpoint_override=)
        raise ValueError(
            f"unsupported location {path.split('://', 1)[0]}://: use a local path or s3://bucket/key"
        )
    local = path.removeprefix("file://")
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(local))


class TooLarge(Exception):
    """Input over one of the size limits (a recipe's ``limits:``), found before the memory is spent.
    ``reason`` is the reject reason: ``file_too_large``, ``line_too_long``, ``value_too_large`` or
    ``member_too_large``. Neither an OSError nor a ValueError, so that no reader takes it for a missing file
    or a malformed row."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason

    @classmethod
    def over(cls, reason: str, what: str, size: int, key: str, limit: int) -> TooLarge:
        return cls(
            reason,
            f"{what} is {size:,} bytes, over limits.{key} ({limit:,}): raise it in the recipe to read it",
        )


@dataclasses.dataclass(frozen=True)
class Skipped:
    """What :func:`iter_lines` and :func:`curation.io.tar.iter_tar` yield in place of a line or a member over
    their limit, passed over without being held: its length in bytes."""

    size: int


class BadFileName(ValueError):
    """A file name that is not UTF-8 under a source folder: pyarrow refuses the whole listing
    without naming it."""


def to_uri(fs: pafs.FileSystem, path: str) -> str:
    """Inverse of :func:`filesystem`: what to store in lineage and hand to other workers."""
    return f"s3://{path}" if isinstance(fs, pafs.S3FileSystem) else path


def join(base: str, rel: str) -> str:
    """Resolve ``rel`` (relative, absolute or a URI) against the folder ``base`` (path or URI)."""
    if is_uri(rel) or os.path.isabs(rel):
        return rel
    return posixpath.join(base, rel) if is_uri(base) else os.path.join(base, rel)


def dirname(path: str) -> str:
    return posixpath.dirname(path) if is_uri(path) else os.path.dirname(os.path.abspath(path))


def expand(pattern: str, on_bad_name: str = "error") -> list[str]:
    """Files matching a glob (``*``, ``?``, ``[..]`` in the last parts), or a folder's files, sorted.

    Returns URIs for ``s3://`` patterns and absolute paths for local ones. A local file name that is not
    UTF-8 raises :class:`BadFileName` naming it, or with ``on_bad_name="skip"`` is logged and left out.
    """
    fs, path = filesystem(pattern)
    if not any(ch in path for ch in "*?["):
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.File:
            return [to_uri(fs, path)]
        if info.type == pafs.FileType.Directory:
            return sorted(to_uri(fs, p) for p in _files_under(fs, path, True, on_bad_name))
        return []
    parts = path.split("/")
    first_glob = next(i for i, p in enumerate(parts) if any(ch in p for ch in "*?["))
    root = "/".join(parts[:first_glob]) or "/"
    recursive = len(parts) - first_glob > 1 or "**" in path
    try:
        files = _files_under(fs, root, recursive, on_bad_name)
    except FileNotFoundError:
        return []
    return sorted(to_uri(fs, p) for p in files if _match(p, path))


def _files_under(fs: pafs.FileSystem, root: str, recursive: bool, on_bad_name: str) -> list[str]:
    """The files under the folder ``root``. pyarrow lists a local folder only when every name in it is UTF-8
    and does not say which is not; then the folder is walked here to name them (or skip them)."""
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=recursive))
        return [i.path for i in infos if i.type == pafs.FileType.File]
    except UnicodeDecodeError:
        if not isinstance(fs, pafs.LocalFileSystem):
            raise
    files, bad = _walk_local(root, recursive)
    shown = ", ".join(repr(b) for b in bad[:5]) + (", ..." if len(bad) > 5 else "")  # as bytes: not text
    if on_bad_name != "skip":
        raise BadFileName(
            f"{len(bad)} file name(s) under {root} are not UTF-8: {shown}; rename them, or add "
            "on_bad_name: skip to the source to leave them out"
        )
    log.warning("skipped %d file name(s) under %s that are not UTF-8: %s", len(bad), root, shown)
    return files


def _walk_local(root: str, recursive: bool) -> tuple[list[str], list[bytes]]:
    """``(files, names that are not UTF-8)`` under a local folder, following symlinked folders as pyarrow
    does (each real folder once). A folder whose name is not UTF-8 counts as one bad name."""
    files: list[str] = []
    bad: list[bytes] = []
    seen: set[tuple[int, int]] = set()
    folders = [os.fsencode(root)]
    while folders:
        try:
            with os.scandir(folders.pop()) as entries:
                found = list(entries)
        except OSError:
            continue
        for entry in found:
            try:
                name = entry.path.decode("utf-8")
            except UnicodeDecodeError:
                bad.append(entry.path)
                continue
            if entry.is_dir():
                st = entry.stat()
                if recursive and (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    folders.append(entry.path)
            elif entry.is_file():
                files.append(name)
    return files, sorted(bad)


def _match(path: str, pattern: str) -> bool:
    if "**" in pattern:
        return fnmatch.fnmatchcase(path, pattern.replace("**/", "*").replace("**", "*"))
    p_parts, s_parts = path.split("/"), pattern.split("/")
    return len(p_parts) == len(s_parts) and all(fnmatch.fnmatchcase(a, b) for a, b in zip(p_parts, s_parts))


def exists(path: str) -> bool:
    fs, p = filesystem(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def read_bytes(path: str, limit: int | None = None, key: str = "max_media_bytes") -> bytes:
    """The whole file. A local path must be a regular file: a device (``/dev/zero``) or a named pipe named by
    a hostile corpus would be read forever, so it raises ``OSError`` instead. A file over ``limit`` bytes
    raises :class:`TooLarge` (naming ``limits.<key>``) before any byte is read: an 8 GB sparse file costs
    nothing. With a limit the bytes are read as stored (a ``.gz`` name does not inflate them on the fly)."""
    fs, p = filesystem(path)
    if isinstance(fs, pafs.LocalFileSystem) and os.path.exists(p) and not os.path.isfile(p):
        raise OSError(f"not a regular file: {p}")
    if limit is None:
        with fs.open_input_stream(p) as f:
            return f.read()
    with fs.open_input_file(p) as f:  # its size comes with opening it (the request S3 makes anyway), unread
        size = f.size()
        if size > limit:
            raise TooLarge.over("file_too_large", path, size, key, limit)
        data = read_capped(f, size, limit)
    if len(data) > limit:
        raise TooLarge.over("file_too_large", path, len(data), key, limit)
    return data


def read_capped(f, size: int, limit: int) -> bytes:
    """At most ``limit + 1`` bytes of the stream ``f`` of a file that said it holds ``size``: one byte over
    the limit shows a file that is longer than the limit. The first read asks for the size it said (a buffer
    of ``limit`` bytes per small image would cost more than reading it); a file longer than it said (grown, or
    on a file system that reports no sizes) is read on up to the limit."""
    data = f.read(min(size, limit) + 1)
    if len(data) > size:
        data += f.read(limit + 1 - len(data))
    return data


def open_input(path: str):
    """A binary stream over a whole file (sequential reads; fine for tars and JSONL)."""
    fs, p = filesystem(path)
    return fs.open_input_stream(p)


def open_random_access(path: str):
    fs, p = filesystem(path)
    return fs.open_input_file(p)


def iter_lines(stream, chunk: int = 1 << 20, max_line: int | None = None):
    """Lines (bytes, without the newline) of a binary stream, read in large chunks: pyarrow streams have
    no readline, and JSONL files can be larger than memory.

    Linear in line length: the pieces of a line that spans chunks are joined once, when its newline arrives
    (re-joining the growing tail at every chunk made a 200 MB line cost minutes). A line longer than
    ``max_line`` bytes is never held: it is read on to its newline and comes back as :class:`Skipped`
    (its length), so that a caller's line numbers stay right."""
    parts: list[bytes] = []  # the line the last chunk ended inside
    size = 0  # its length so far, still counted once its pieces are dropped
    while block := stream.read(chunk):
        lines = block.split(b"\n")
        last = lines.pop()
        if lines:
            size += len(lines[0])
            if max_line is not None and size > max_line:
                yield Skipped(size)
            else:
                yield b"".join((*parts, lines[0])).rstrip(b"\r")
            for line in lines[1:]:
                yield (
                    Skipped(len(line))
                    if max_line is not None and len(line) > max_line
                    else line.rstrip(b"\r")
                )
            parts, size = [], 0
        size += len(last)
        if max_line is not None and size > max_line:
            parts = []
        elif last:
            parts.append(last)
    if max_line is not None and size > max_line:
        yield Skipped(size)
    elif (tail := b"".join(parts)).strip():
        yield tail.rstrip(b"\r")
