"""Credentials never print: one redaction for every message, log line and traceback.

Credentials reach this tool by several roads: the environment (``AWS_SECRET_ACCESS_KEY``,
``AWS_SESSION_TOKEN``, the variable a VLM backend's ``api_key_env`` names), an AWS profile file
(``~/.aws/credentials``, ``AWS_SHARED_CREDENTIALS_FILE``), the user part of a URI (``s3://KEY:SECRET@bucket/x``,
an endpoint such as ``http://user:pass@host``) and query strings (``?X-Amz-Signature=...``, ``token=``,
``sig=``). Rather than trusting every message to leave them out, :func:`redact` masks all of them in any text,
and :func:`install` puts it in front of what a process writes by itself: log records (their message and
formatted exception) and tracebacks that escape. ``curation``'s command line installs it at start, and every
Ray task of ours before it runs (:func:`curation.runner.in_worker`).

The AWS access key id is masked too: AWS calls it non-secret, but it names the account and is half of a
credential pair, and masking costs a message nothing it needs.
"""

from __future__ import annotations

import configparser
import functools
import logging
import os
import re
import sys
import threading
import traceback
from typing import Any
from urllib.parse import urlsplit

MASK = "***"

# scheme://user[:password]@ : the password may hold "/" or "+" (AWS secret keys do), the user part may not.
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)[^\s/@:'\"<>]*(?::[^\s@'\"<>]*)?@")
# ... and user:password@host with the scheme cut off, as pyarrow quotes an s3:// URI
# ("got a URI: 'K:S@bucket/x'")
_BARE_USERINFO = re.compile(r"(?P<scheme>(?:^|(?<=[\s'\"(=,\[])))[^\s/@:='\"<>]+:(?!//)[^\s@'\"<>]*@(?=\w)")
# ?name=value / &name=value whose name says it carries a credential (X-Amz-Signature, token, sig,
# api_key, ...)
_QUERY = re.compile(
    r"(?P<name>[?&;][A-Za-z0-9_.-]*(?:sig|token|secret|password|passwd|key|credential|auth)"
    r"[A-Za-z0-9_.-]*=)[^&\s#'\"<>]*",
    re.IGNORECASE,
)
_BEARER = re.compile(r"(?P<name>\bBearer\s+|\bAuthorization:\s*Basic\s+)[A-Za-z0-9._~+/=-]+", re.IGNORECASE)
# Environment variables whose values are credentials (AWS_SECRET_ACCESS_KEY, OPENAI_API_KEY, HF_TOKEN, ...).
_SECRET_NAME = re.compile(
    r"SECRET|TOKEN|PASSWORD|PASSWD|API_?KEY|ACCESS_KEY|CREDENTIAL|PRIVATE_KEY", re.IGNORECASE
)
_PROFILE_KEYS = ("aws_access_key_id", "aws_secret_access_key", "aws_session_token", "aws_security_token")
MIN_LENGTH = (
    8  # shorter values ("1", "true") are not credentials, and masking them would garble every message
)

_remembered: set[str] = set()


def redact(text: Any) -> str:
    """``str(text)`` with every credential masked as ``***`` (see the module's docstring for which)."""
    text = str(text)
    for value in _values():  # longest first: a value may contain another
        if value in text:
            text = text.replace(value, MASK)
    text = _USERINFO.sub(rf"\g<scheme>{MASK}@", text)
    text = _BARE_USERINFO.sub(rf"\g<scheme>{MASK}@", text)
    text = _QUERY.sub(rf"\g<name>{MASK}", text)
    return _BEARER.sub(rf"\g<name>{MASK}", text)


def has_userinfo(text: str) -> bool:
    """Whether ``text`` holds a URI with credentials in it (``scheme://user:password@host``)."""
    return _USERINFO.search(text) is not None


def redact_tree(node: Any) -> Any:
    """Every string in a tree of plain data (a resolved recipe) passed through :func:`redact`."""
    if isinstance(node, dict):
        return {k: redact_tree(v) for k, v in node.items()}
    if isinstance(node, list):
        return [redact_tree(v) for v in node]
    return redact(node) if isinstance(node, str) else node


def remember(value: str | None) -> None:
    """Mask ``value`` from now on in this process: a credential read from a place :func:`redact` does not scan
    (a VLM backend's ``api_key_env`` may name any variable)."""
    if value and len(value) >= MIN_LENGTH:
        _remembered.add(value)


_cache: tuple[Any, tuple[str, ...]] = (None, ())


def _values() -> tuple[str, ...]:
    """:func:`_known_values`, longest first, recomputed only when the environment, a profile file or
    :func:`remember` changed: :func:`redact` runs for every log record and reject detail, and a full scan
    (decoding every variable) costs ~0.2 ms against ~5 us for this check."""
    global _cache
    data = getattr(os.environ, "_data", None)  # the raw bytes mapping behind os.environ (CPython)
    key = (hash(frozenset(data.items())) if data is not None else None, _profile_stamps(), len(_remembered))
    if key[0] is None or key != _cache[0]:
        _cache = (key, tuple(sorted(_known_values(), key=len, reverse=True)))
    return _cache[1]


def _profile_paths() -> list[str]:
    return [
        os.path.expanduser(os.environ.get(var) or default)
        for var, default in (
            ("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials"),
            ("AWS_CONFIG_FILE", "~/.aws/config"),
        )
    ]


def _profile_stamps() -> tuple[int, ...]:
    stamps = []
    for path in _profile_paths():
        try:
            stamps.append(os.stat(path).st_mtime_ns)
        except OSError:
            stamps.append(0)
    return tuple(stamps)


def _known_values() -> set[str]:
    """Credential values this process could leak: from the environment, profile files and :func:`remember`."""
    found = set(_remembered)
    for name, value in os.environ.items():
        if _SECRET_NAME.search(name):
            found.add(value)
        elif "@" in value and "://" in value:  # AWS_ENDPOINT_URL=http://user:pass@host, HTTPS_PROXY=...
            parts = urlsplit(value)
            found.update(p for p in (parts.username, parts.password) if p)
    for path in _profile_paths():
        try:
            stamp = os.stat(path).st_mtime_ns
        except OSError:
            continue
        found.update(_profile_values(path, stamp))
    return {v for v in found if len(v) >= MIN_LENGTH}


@functools.lru_cache(maxsize=8)
def _profile_values(path: str, stamp: int) -> frozenset[str]:
    """The credentials in an AWS profile file (every profile); ``stamp`` (its mtime) re-reads an
    edited file."""
    parser = configparser.RawConfigParser()
    try:
        parser.read(path, encoding="utf-8")
    except (configparser.Error, OSError, UnicodeDecodeError):
        return frozenset()
    return frozenset(
        parser.get(s, k).strip() for s in parser.sections() for k in _PROFILE_KEYS if parser.has_option(s, k)
    )


# ---------------------------------------------------------------- installing


def install() -> None:
    """Redact every log record and every traceback that escapes, in this process; calling it again
    does nothing.

    Log records are redacted where they are made (a record factory), so every handler sees the masked text,
    including handlers added later (Ray's, a notebook's); the formatted exception is stored in ``exc_text``,
    which the standard ``Formatter`` prints instead of formatting the exception again.
    """
    if getattr(logging.getLogRecordFactory(), "redacts", False):
        return
    make_record = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make_record(*args, **kwargs)
        try:
            record.msg, record.args = redact(record.getMessage()), None
        except Exception:  # noqa: BLE001 - a bad format string: the handler reports it as usual (with the raw arguments)
            return record
        if record.exc_info and not record.exc_text:
            record.exc_text = redact("".join(traceback.format_exception(*record.exc_info)).rstrip("\n"))
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return record

    factory.redacts = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)
    sys.excepthook = _excepthook
    threading.excepthook = _thread_excepthook


def _excepthook(exc_type: type[BaseException], exc: BaseException | None, tb: Any) -> None:
    """Print an uncaught exception's traceback as Python would, with credentials masked."""
    if exc_type is SystemExit:
        return
    sys.stderr.write(redact("".join(traceback.format_exception(exc_type, exc, tb))))
    sys.stderr.flush()


def _thread_excepthook(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is not SystemExit:
        sys.stderr.write(f"Exception in thread {args.thread.name if args.thread else '?'}:\n")
        _excepthook(args.exc_type, args.exc_value, args.exc_traceback)
