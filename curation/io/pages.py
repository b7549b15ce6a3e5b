"""How large a Parquet value can get before pyarrow decompresses it: the page headers of a column chunk.

A 33 KB Parquet file can hold a zstd-compressed 1 GiB value, and pyarrow inflates a whole page at once
(the allocation is the page header's ``uncompressed_page_size``). A value lies inside one page, so the
largest page of a column chunk bounds its largest value. The footer gives each chunk's total uncompressed
size, which is enough when it is under the limit; pages are only walked for a chunk above it (a large
row group of images, or a bomb) and for every chunk of a local file, where reading a header is cheap and
a footer that understates the size cannot pass. Only page headers are read (Thrift compact protocol,
parsed here: pyarrow exposes no page API), never page data.
"""

from __future__ import annotations

_HEAD = 4096  # bytes read for a page header: with its statistics (at most a few KiB) it fits
_MAX_HEAD = 1 << 20  # a header longer than this is not one


def largest_page(handle, column) -> int:
    """The largest uncompressed page of a column chunk (``ColumnChunkMetaData``) of the file ``handle``;
    ValueError where its page headers cannot be read."""
    start = column.data_page_offset
    if column.has_dictionary_page and 0 < column.dictionary_page_offset < start:
        start = column.dictionary_page_offset  # as parquet-cpp finds the chunk's start
    end, pos, largest = start + column.total_compressed_size, start, 0
    while pos < end:
        uncompressed, compressed, length = _page_header(handle, pos, min(_HEAD, end - pos))
        if uncompressed < 0 or compressed < 0:
            raise ValueError(f"a page header at byte {pos} has a negative size")
        largest = max(largest, uncompressed)
        pos += length + compressed
    return largest


def _page_header(handle, pos: int, want: int) -> tuple[int, int, int]:
    """``(uncompressed size, compressed size, header length)`` of the page header at ``pos``."""
    while True:
        buf = handle.read_at(want, pos)
        try:
            sizes, length = _struct(buf, 0, 0)
            return sizes[2], sizes[3], length
        except (IndexError, KeyError):
            if want >= _MAX_HEAD or len(buf) < want:
                raise ValueError(f"the page header at byte {pos} cannot be read") from None
            want = _MAX_HEAD


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    out = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        out |= (b & 0x7F) << shift
        if b < 0x80:
            return out, pos
        shift += 7
        if shift > 70:
            raise ValueError("a Thrift number is too long")


def _zigzag(n: int) -> int:
    return (n >> 1) ^ -(n & 1)


def _struct(buf: bytes, pos: int, depth: int) -> tuple[dict[int, int], int]:
    """The i32 fields of a Thrift struct at ``pos`` (the page sizes are fields 2 and 3 of the outermost),
    and the position after it."""
    if depth > 16:
        raise ValueError("Thrift structs nested too deeply")
    fields: dict[int, int] = {}
    fid = 0
    while True:
        head = buf[pos]
        pos += 1
        if head == 0:
            return fields, pos
        kind, delta = head & 0x0F, head >> 4
        if delta:
            fid += delta
        else:
            raw, pos = _varint(buf, pos)
            fid = _zigzag(raw)
        if kind == 5 and depth == 0:
            raw, pos = _varint(buf, pos)
            fields[fid] = _zigzag(raw)
        else:
            pos = _skip(buf, pos, kind, depth)


def _skip(buf: bytes, pos: int, kind: int, depth: int, element: bool = False) -> int:
    """The position after a Thrift compact value of type ``kind``."""
    if kind in (1, 2):  # booleans: in the field header, but one byte each inside a list
        return pos + 1 if element else pos
    if kind == 3:
        return pos + 1
    if kind in (4, 5, 6):
        return _varint(buf, pos)[1]
    if kind == 7:
        return pos + 8
    if kind == 8:
        n, pos = _varint(buf, pos)
        return pos + n
    if kind in (9, 10):  # list, set
        head = buf[pos]
        pos += 1
        n, inner = head >> 4, head & 0x0F
        if n == 15:
            n, pos = _varint(buf, pos)
        for _ in range(n):  # every element takes a byte at least: a lying count runs off the buffer
            pos = _skip(buf, pos, inner, depth + 1, element=True)
        return pos
    if kind == 11:  # map
        n, pos = _varint(buf, pos)
        if n:
            kinds = buf[pos]
            pos += 1
            for _ in range(n):
                pos = _skip(buf, pos, kinds >> 4, depth + 1, element=True)
                pos = _skip(buf, pos, kinds & 0x0F, depth + 1, element=True)
        return pos
    if kind == 12:
        return _struct(buf, pos, depth + 1)[1]
    raise ValueError(f"not a Thrift type: {kind}")
