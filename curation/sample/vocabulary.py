"""The sample corpus's vocabulary: word lists, colours and templates, kept as data next to the code.

Why data: about 500 lines of literals (sign phrases, caption words in five languages, text topics,
benchmark templates) drowned the generator code. Each module ``X.py`` of this package that needs words
reads them from ``X.json`` beside it; editing the words changes the corpus, never the code that builds it.

JSON keeps the order of lists and objects, which matters: generators pick with ``rng.choice`` by
position, so reordering a list changes every byte that depends on it. Lists come back as tuples (the
cached object is shared by every caller and must not be mutated); each file may carry an ``_about``
string saying what it holds.

    >>> load("scenes")["colours"]["red"]
    (220, 40, 40)
"""

from __future__ import annotations

import functools
import json
from importlib.resources import files
from typing import Any


@functools.cache
def load(name: str) -> dict[str, Any]:
    """The contents of ``{name}.json`` in this package, read once per process, lists turned into tuples."""
    text = (files(__package__) / f"{name}.json").read_text(encoding="utf-8")
    return json.loads(text, object_pairs_hook=lambda pairs: {k: _frozen(v) for k, v in pairs})


def _frozen(value: Any) -> Any:
    return tuple(_frozen(v) for v in value) if isinstance(value, list) else value
