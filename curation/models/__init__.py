"""Lazy model loaders (open_clip, VLM backends, OCR engines).

Nothing here imports torch at package import: each module imports its heavy dependencies inside the
functions that need them, so a pipeline that uses no model never pays for them.
"""

import functools
import os

from curation.io import commit


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a weights file, cached per (real path, size, mtime): hashing a 1.7 GB checkpoint takes
    seconds, and every worker and the driver's lineage ask for it."""
    real = os.path.realpath(path)
    st = os.stat(real)
    return _sha256(real, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    return commit.sha256_file(path)
