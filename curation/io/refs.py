"""Where a media reference in a row may point, and reading it there (DESIGN.md: trust boundary).

A corpus row names its image or video by a path or URI, and the row is untrusted: ``/proc/self/environ``,
``../../../etc/hostname``, a symlink in the corpus to a file outside it, ``file:///etc/passwd`` or
``gs://bkt/x.jpg?endpoint_override=attacker:80`` must never make a worker read (or send credentials)
where the user did not allow. So every reference goes through one :class:`RefPolicy`:

- It resolves under the source's **roots**: the folder of the file that holds the row, the source's
  ``media_roots`` (local folders or ``s3://bucket/prefix``) and, for conversations, ``fields.image_root``.
  ``..`` and symlinks are resolved first (``os.path.realpath``), so neither leads out of a root.
- An absolute path or a full URI in a row is refused unless the source sets ``allow_absolute: true``
  (img2dataset-style corpora whose rows hold ``/data/images/x.jpg``); it must still lie under a root.
- A URI's scheme must be on the source's ``schemes`` allow-list (default ``[s3]``); ``file://`` and a
  URI with a query string, fragment or user info are always refused, and the object store used is the
  one the environment configures (:func:`curation.io.fs.filesystem`), never one the row names.
- ``/proc``, ``/sys`` and ``/dev`` are refused whatever the roots, and so is anything that is not a
  regular file (a pipe, a device, a socket, a folder): the check is made on the opened descriptor.

A refusal raises :class:`RefusedReference`, which the readers turn into a reject whose reason is
``refused_reference`` or ``refused_scheme`` and whose detail names the row and the reference, never the
file's bytes.

>>> p = RefPolicy(roots=("/data/corpus",))
>>> p.resolve("images/a.jpg", "/data/corpus/jsonl")
'/data/corpus/jsonl/images/a.jpg'
>>> p.resolve("/etc/passwd", "/data/corpus")
Traceback (most recent call last):
  ...
curation.io.refs.RefusedReference: an absolute path: refused unless the source sets allow_absolute: true
"""

from __future__ import annotations

import os
import posixpath
import re
import stat
from dataclasses import dataclass

from curation.io import fs as cfs
from curation.secrets import redact

REFUSED_REFERENCE = "refused_reference"
REFUSED_SCHEME = "refused_scheme"
SCHEMES = (
    "s3",
)  # remote schemes a source may allow: each reads through a filesystem the environment configures
NEVER_LOCAL = ("/proc", "/sys", "/dev")  # pseudo file systems: a process's secrets, the kernel, devices
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
MAX_REF_CHARS = 4096  # PATH_MAX: a longer reference is not a path


class RefusedReference(ValueError):
    """A reference the source's policy does not allow. ``reason`` is :data:`REFUSED_REFERENCE` or
    :data:`REFUSED_SCHEME`; ``str()`` says why and what to change in the recipe."""

    def __init__(self, reason: str, why: str):
        super().__init__(why)
        self.reason = reason


def shown(ref: object, limit: int = 200) -> str:
    """A reference as a detail shows it: quoted, cut, credentials masked (:func:`curation.secrets.redact`)."""
    text = redact(ref if isinstance(ref, str) else repr(ref))
    return repr(text[:limit] + ("..." if len(text) > limit else ""))


def _scheme(ref: str) -> str | None:
    m = _SCHEME.match(ref)
    # "C:" is a drive letter on Windows, not a scheme; none of ours is one letter long
    return m.group(1).lower() if m and len(m.group(1)) > 1 else None


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def normalize_root(root: str) -> str:
    """A root as policies compare against it: a local folder's real path, or ``s3://bucket/prefix``."""
    if _scheme(root) == "s3":
        return "s3://" + posixpath.normpath(root[len("s3://") :]).strip("/")
    root = root.removeprefix("file://")
    return os.path.realpath(os.path.expanduser(root))


@dataclass(frozen=True)
class RefPolicy:
    """Roots (normalized by :func:`normalize_root`), whether rows may give absolute locations, and which
    remote schemes they may name."""

    roots: tuple[str, ...]
    allow_absolute: bool = False
    schemes: tuple[str, ...] = SCHEMES

    def resolve(self, ref: object, base: str) -> str:
        """The absolute path or URI that ``ref`` (written in a row of a file in folder ``base``) names, or
        :class:`RefusedReference`."""
        if not isinstance(ref, str) or not ref.strip():
            raise RefusedReference(REFUSED_REFERENCE, "not a path: an empty or non-text reference")
        if "\0" in ref or len(ref) > MAX_REF_CHARS:
            raise RefusedReference(REFUSED_REFERENCE, "not a path (a NUL byte, or longer than PATH_MAX)")
        scheme = _scheme(ref)
        if scheme is not None:
            return self._resolve_uri(ref, scheme)
        if ref.startswith("~"):
            raise RefusedReference(REFUSED_REFERENCE, "a path in a home folder (~): refused")
        if os.path.isabs(ref):
            if not self.allow_absolute:
                raise RefusedReference(
                    REFUSED_REFERENCE, "an absolute path: refused unless the source sets allow_absolute: true"
                )
            return self._check_local(ref)
        if cfs.is_uri(base):
            return self._resolve_uri(posixpath.join(base, ref), "s3", relative=True)
        return self._check_local(os.path.join(base, ref))

    def _resolve_uri(self, uri: str, scheme: str, relative: bool = False) -> str:
        if scheme == "file":
            raise RefusedReference(
                REFUSED_SCHEME,
                "a file:// URI: write a path relative to the source file "
                "instead (file:// is never allowed in rows)",
            )
        if not relative and scheme not in self.schemes:
            allowed = ", ".join(f"{s}://" for s in self.schemes) or "none"
            raise RefusedReference(
                REFUSED_SCHEME,
                f"the scheme {scheme}:// is not allowed for this source "
                f"(allowed: {allowed}; see the source's schemes:)",
            )
        rest = uri[len(scheme) + 3 :] if uri[len(scheme) : len(scheme) + 3] == "://" else None
        if rest is None or not rest:
            raise RefusedReference(REFUSED_SCHEME, f"not a {scheme}://bucket/key URI")
        if any(c in rest for c in "?#@\\"):
            raise RefusedReference(
                REFUSED_SCHEME,
                "a URI with a query string, fragment, user info or backslash: "
                "rows may not pass options to a file system",
            )
        if not relative and not self.allow_absolute:
            raise RefusedReference(
                REFUSED_REFERENCE, "a full URI: refused unless the source sets allow_absolute: true"
            )
        parts = rest.split("/")
        if ".." in parts:
            raise RefusedReference(REFUSED_REFERENCE, "'..' in a URI")
        target = f"{scheme}://" + posixpath.normpath(rest).lstrip("/")
        if not any(_under(target, r) for r in self.roots if r.startswith(f"{scheme}://")):
            raise RefusedReference(REFUSED_REFERENCE, self._outside())
        return target

    def _check_local(self, path: str) -> str:
        real = os.path.realpath(path)
        if any(_under(real, p) for p in NEVER_LOCAL):
            raise RefusedReference(
                REFUSED_REFERENCE, f"resolves to {shown(real)}: /proc, /sys and /dev are never read"
            )
        if not any(_under(real, r) for r in self.roots if not r.startswith("s3://")):
            raise RefusedReference(REFUSED_REFERENCE, self._outside(symlink=real != os.path.abspath(path)))
        return real

    def _outside(self, symlink: bool = False) -> str:
        how = "through a symlink " if symlink else ""
        roots = ", ".join(self.roots[:3]) + (", ..." if len(self.roots) > 3 else "")
        return (
            f"resolves {how}outside the source's roots ({roots}): add its folder to the source's media_roots "
            f"if it is meant"
        )

    def read(self, ref: object, base: str, limit: int | None = None) -> tuple[str, bytes]:
        """``(resolved location, bytes)`` of a reference, read only where :meth:`resolve` allows."""
        target = self.resolve(ref, base)
        return target, fetch(target, limit)


def fetch(target: str, limit: int | None = None) -> bytes:
    """The bytes at a location :meth:`RefPolicy.resolve` returned."""
    return cfs.read_bytes(target, limit) if cfs.is_uri(target) else read_regular(target, limit)


def read_regular(path: str, limit: int | None = None) -> bytes:
    """A local regular file's bytes. Opened without following a final symlink (one swapped in after the
    check), and checked on the descriptor: a FIFO, a device, a socket or a folder raises
    :class:`RefusedReference` before any byte is read; a file over ``limit`` bytes raises
    :class:`curation.io.fs.TooLarge`."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == 40:  # ELOOP: the last component became a symlink
            raise RefusedReference(REFUSED_REFERENCE, "a symlink appeared where the file was") from None
        raise
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise RefusedReference(REFUSED_REFERENCE, "not a regular file (a device, pipe, socket or folder)")
        if limit is not None and st.st_size > limit:
            raise cfs.TooLarge.over("file_too_large", path, st.st_size, "max_media_bytes", limit)
        data = f.read() if limit is None else cfs.read_capped(f, st.st_size, limit)
        if limit is not None and len(data) > limit:  # it grew after the check
            raise cfs.TooLarge.over("file_too_large", path, len(data), "max_media_bytes", limit)
        return data


def policy(
    uri: str,
    roots: list[str] | tuple[str, ...] = (),
    allow_absolute: bool = False,
    schemes: list[str] | tuple[str, ...] = SCHEMES,
    extra: tuple[str, ...] = (),
) -> RefPolicy:
    """The policy for rows of the file ``uri``: its folder, ``roots`` and ``extra`` (already
    absolute) roots."""
    folder = cfs.dirname(uri)
    return RefPolicy(
        tuple(dict.fromkeys(normalize_root(r) for r in (folder, *extra, *roots))),
        allow_absolute,
        tuple(schemes),
    )
