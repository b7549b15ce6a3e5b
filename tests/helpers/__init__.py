"""Builders the tests share, imported as ``tests.helpers.<module>`` (pyproject.toml puts the repository root
on pytest's ``pythonpath``); test modules never import one another. Fixtures live in ``tests/conftest.py``.

- ``images``: small JPEGs and WebDataset tars; ``image_edits``: the edited copies image dedup must find.
- ``batches``: a few inline rows as a table, a registered stage set up, and the reasons it gave.
- ``clip``: the tiny random-weight CLIP config; ``ocr``: lines of text drawn with real fonts.
- ``mix``: the packaged tokenizer.json, text rows of known token counts, pools written directly.
- ``recipes``: the recipe over the ``tiny_corpus`` fixture; ``runs``: ``curation run`` in a process of its
  own, to kill and resume, and the pool files to compare runs by.
- ``servers``: real server processes on loopback (OpenAI-compatible, S3, a multi-node Ray cluster).
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository: pipelines/, mixtures/, ray_cluster.yaml
