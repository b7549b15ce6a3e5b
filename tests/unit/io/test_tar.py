"""The streaming tar reader against archives written by the standard library, and damaged ones."""

from __future__ import annotations

import io
import tarfile

import pytest

from curation.io.tar import TarError, iter_tar


def _archive(fmt: int, names: list[str], extra: bool = False) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        if extra:
            d = tarfile.TarInfo("folder")
            d.type = tarfile.DIRTYPE
            tar.addfile(d)
            link = tarfile.TarInfo("link.txt")
            link.type, link.linkname = tarfile.SYMTYPE, "a.txt"
            tar.addfile(link)
        for i, name in enumerate(names):
            data = (f"member {i} " * (i * 97 + 1)).encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _reference(data: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]


NAMES = [
    "000.jpg",
    "000.txt",
    "dir/sub/001.json",
    "p" * 120 + ".jpg",
    "d/" * 70 + "deep.txt",
    "é" * 60 + ".txt",
]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_same_members_as_tarfile(fmt):
    names = NAMES if fmt != tarfile.USTAR_FORMAT else [n for n in NAMES if len(n.encode()) < 100]
    data = _archive(fmt, names, extra=True)
    got = list(iter_tar(io.BytesIO(data), chunk=1000))  # small chunks: members straddle reads
    assert got == _reference(data)
    assert len(got) == len(names)


def test_damaged_archives_raise_after_the_good_members():
    data = _archive(tarfile.GNU_FORMAT, ["a.txt", "b.txt", "c.txt"])
    cut = data[: 3072 + 500]  # headers at 0, 1024, 2560: this cuts into the third member's data
    got = []
    with pytest.raises(TarError, match="ends inside a member"):
        for item in iter_tar(io.BytesIO(cut)):
            got.append(item)  # noqa: PERF402 - one at a time: what was read before the error stays in got
    assert got and got == _reference(data)[: len(got)]
    second = 512 + ((len(_reference(data)[0][1]) + 511) // 512) * 512  # offset of the second header
    flipped = bytearray(data)
    flipped[second + 3] ^= 0x20
    with pytest.raises(TarError, match="checksum"):
        list(iter_tar(io.BytesIO(bytes(flipped))))
    assert list(iter_tar(io.BytesIO(b""))) == []
