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
import fnmatch
import functools
import hashlib
import os
import posixpath
from urllib.parse import urlparse

import pyarrow.fs as pafs


def is_uri(path: str) -> bool:
    return "://" in path


@functools.lru_cache(maxsize=8)
def _s3(endpoint: str | None, region: str | None, credentials: str) -> pafs.S3FileSystem:
    # ``credentials`` is only a hash of the AWS_* credentials in the environment: it keys the cache so that
    # changing them in a long-lived process (a notebook) takes effect; pyarrow reads the values itself.
    kwargs = {}
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs["endpoint_override"] = parsed.netloc
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
    """Turn an ``OSError`` raised while reading or writing under ``root`` into a :class:`StorageError` that says
    where (``where``, e.g. the unit, then the location) and what to do. ``FileExistsError`` (a folder holding
    another job's output) and StorageErrors pass through unchanged."""
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
    """What went wrong writing under ``root``, and what to do (credentials are never part of pyarrow's messages)."""
    msg = str(e).strip()
    if root.startswith("s3://"):
        bucket = root[len("s3://"):].split("/", 1)[0]
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS"
        if "not found" in msg.lower() and "bucket" in msg.lower():
            return (f"cannot write to {root}: the bucket '{bucket}' does not exist at {endpoint}; create it first "
                    f"(aws s3 mb s3://{bucket}), or check the path and AWS_ENDPOINT_URL")
        if any(k in msg.upper() for k in ("ACCESS_DENIED", "ACCESSDENIED", "SIGNATURE", "INVALIDACCESSKEY",
                                          "FORBIDDEN", "403")):
            return (f"cannot write to {root}: the object store refused the credentials ({msg}); check "
                    f"AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_PROFILE and the bucket's policy")
        return f"cannot write to {root} at {endpoint}: {msg}"
    return f"cannot write to {root}: {msg}"


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path within it)`` for a local path or an ``s3://bucket/key`` URI."""
    if path.startswith("s3://"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        creds = "\0".join(os.environ.get(k, "") for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                                           "AWS_SESSION_TOKEN", "AWS_PROFILE"))
        return _s3(endpoint, region, hashlib.sha256(creds.encode()).hexdigest()), path[len("s3://"):]
    if is_uri(path) and not path.startswith("file://"):
        return pafs.FileSystem.from_uri(path)
    local = path[len("file://"):] if path.startswith("file://") else path
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(local))


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


def expand(pattern: str) -> list[str]:
    """Files matching a glob (``*``, ``?``, ``[..]`` in the last parts), or a folder's files, sorted.

    Returns URIs for ``s3://`` patterns and absolute paths for local ones.
    """
    fs, path = filesystem(pattern)
    if not any(ch in path for ch in "*?["):
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.File:
            return [to_uri(fs, path)]
        if info.type == pafs.FileType.Directory:
            sel = pafs.FileSelector(path, recursive=True)
            return sorted(to_uri(fs, i.path) for i in fs.get_file_info(sel) if i.type == pafs.FileType.File)
        return []
    parts = path.split("/")
    first_glob = next(i for i, p in enumerate(parts) if any(ch in p for ch in "*?["))
    root = "/".join(parts[:first_glob]) or "/"
    recursive = len(parts) - first_glob > 1 or "**" in path
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=recursive))
    except FileNotFoundError:
        return []
    matched = [i.path for i in infos if i.type == pafs.FileType.File and _match(i.path, path)]
    return sorted(to_uri(fs, p) for p in matched)


def _match(path: str, pattern: str) -> bool:
    if "**" in pattern:
        return fnmatch.fnmatchcase(path, pattern.replace("**/", "*").replace("**", "*"))
    p_parts, s_parts = path.split("/"), pattern.split("/")
    return len(p_parts) == len(s_parts) and all(fnmatch.fnmatchcase(a, b) for a, b in zip(p_parts, s_parts))


def exists(path: str) -> bool:
    fs, p = filesystem(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def read_bytes(path: str) -> bytes:
    """The whole file. A local path must be a regular file: a device (``/dev/zero``) or a named pipe named by a
    hostile corpus would be read forever, so it raises ``OSError`` instead."""
    fs, p = filesystem(path)
    if isinstance(fs, pafs.LocalFileSystem) and os.path.exists(p) and not os.path.isfile(p):
        raise OSError(f"not a regular file: {p}")
    with fs.open_input_stream(p) as f:
        return f.read()


def open_input(path: str):
    """A binary stream over a whole file (sequential reads; fine for tars and JSONL)."""
    fs, p = filesystem(path)
    return fs.open_input_stream(p)


def open_random_access(path: str):
    fs, p = filesystem(path)
    return fs.open_input_file(p)


def iter_lines(stream, chunk: int = 1 << 20):
    """Lines (bytes, without the newline) of a binary stream, read in large chunks: pyarrow streams have
    no readline, and JSONL files can be larger than memory."""
    tail = b""
    while block := stream.read(chunk):
        lines = (tail + block).split(b"\n")
        tail = lines.pop()
        for line in lines:
            yield line.rstrip(b"\r")
    if tail.strip():
        yield tail.rstrip(b"\r")
