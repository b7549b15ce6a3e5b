"""A streaming reader for the regular files of a tar archive.

WebDataset shards are tars of many small members, and the standard library's ``tarfile`` spends
about 64 us per sample (three members) parsing headers in Python: most of the cost of indexing a
shard and a large part of reading it. This reader does only what shards need (ustar headers with
their prefix, GNU long names, pax ``path`` records, checksums, base-256 sizes) and reads the stream in
1 MiB chunks: 3.5x faster on img2dataset shards (measured: 20 vs 71 ms per 1,000 samples).
Anything that is not a regular file (folders, links, devices) is skipped, as WebDataset does.

Compressed shards (``.tar.gz``) arrive here already decompressed: pyarrow's input streams detect the
compression from the file name.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import BinaryIO

from curation.io.fs import Skipped

_BLOCK = 512
_ZERO = bytes(_BLOCK)
_REGULAR = (b"0", b"\0", b"7")
_MAX_READ = 1 << 26  # bytes per read of a large member
_MAX_NAME = 1 << 20  # a GNU long name or a pax header longer than this is passed over: no path is that long


class TarError(ValueError):
    """The archive is damaged: a header checksum fails, a number field is not a number, or it ends inside
    a member."""


def _number(field: bytes) -> int:
    if field[0] == 0x80:  # GNU base-256, for sizes of 8 GiB and more (0xff starts a negative number)
        return int.from_bytes(field[1:], "big")
    digits = field.split(b"\0", 1)[0].strip()
    try:
        return int(digits, 8) if digits else 0
    except ValueError:
        raise TarError(f"a header field is not an octal number ({field!r}): the archive is damaged") from None


def _pax_path(data: bytes) -> bytes | None:
    """The ``path`` record of a pax extended header ("<length> path=<value>\\n" records)."""
    path, pos = None, 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            break
        length = data[pos:space]
        if not length.isdigit() or not space < pos + int(length) <= len(data):
            raise TarError(f"a pax record has a bad length ({length[:20]!r}): the archive is damaged")
        key, _, value = data[space + 1 : pos + int(length) - 1].partition(b"=")
        if key == b"path":
            path = value
        pos += int(length)
    return path


def iter_tar(
    stream: BinaryIO, chunk: int = 1 << 20, max_member: int | None = None
) -> Iterator[tuple[str, bytes | Skipped]]:
    """Yield ``(name, data)`` for every regular file of the tar ``stream``, in archive order. A member whose
    header declares more than ``max_member`` bytes is read past, never held, and comes as :class:`Skipped`.

    Raises :class:`TarError` on a damaged archive, after yielding every member before the damage.
    """
    buf, pos = b"", 0

    def take(n: int) -> bytes:
        nonlocal buf, pos
        if len(buf) - pos < n:
            parts, have = [buf[pos:]], len(buf) - pos
            while have < n:  # a damaged header may declare any size: read what is there, chunk by chunk
                more = stream.read(max(chunk, min(n - have, _MAX_READ)))
                if not more:
                    raise TarError(f"the archive ends inside a member ({have} of {n} bytes)")
                parts.append(more)
                have += len(more)
            buf, pos = b"".join(parts), 0
        out = buf[pos : pos + n]
        pos += n
        return out

    def skip(n: int) -> None:
        """Pass over ``n`` bytes, ``chunk`` at a time, holding none."""
        nonlocal buf, pos
        have = min(n, len(buf) - pos)
        pos += have
        while have < n:
            more = stream.read(min(n - have, chunk))
            if not more:
                raise TarError(f"the archive ends inside a member ({have} of {n} bytes)")
            have += len(more)

    long_name: bytes | None = None
    while True:
        try:
            header = take(_BLOCK)
        except TarError:
            if len(buf) == pos:
                return  # no end-of-archive blocks: tolerated, as tarfile does
            raise
        if header == _ZERO:
            return
        if _number(header[148:156]) != sum(header) - sum(header[148:156]) + 8 * 32:
            raise TarError("a header checksum does not match: the archive is damaged")
        size = _number(header[124:136])
        kind = header[156:157]
        # Only what is used is held: a regular member within the limit, a long name. The rest (folders, links,
        # devices, a member over the limit) is read past, whatever size its header declares.
        wanted = (kind in _REGULAR and (max_member is None or size <= max_member)) or (
            kind in (b"L", b"x") and size <= _MAX_NAME
        )
        data = take(size) if wanted else Skipped(size)
        if not wanted:
            skip(size)
        skip(-size % _BLOCK)
        if isinstance(data, Skipped) and kind in (b"L", b"x"):
            continue
        if kind == b"L":  # GNU long name for the next member
            long_name = data.rstrip(b"\0")
            continue
        if kind == b"x":  # pax extended header for the next member
            long_name = _pax_path(data) or long_name
            continue
        if kind not in _REGULAR:
            long_name = None
            continue
        if long_name is not None:
            name = long_name
        else:
            name = header[0:100].split(b"\0", 1)[0]
            if header[257:262] == b"ustar":
                prefix = header[345:500].split(b"\0", 1)[0]
                if prefix:
                    name = prefix + b"/" + name
        long_name = None
        yield name.decode("utf-8", "surrogateescape"), data
