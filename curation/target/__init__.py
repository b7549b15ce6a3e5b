"""What the target model (Keye-VL) reads: its input contract, on the ground floor of the package.

- :mod:`curation.target.chat`: the chat format (messages, content parts, the five modes, the ``/think`` and
  ``/no_think`` suffixes, ``<think>``/``<analysis>`` tags) and what a valid SFT row is.
- :mod:`curation.target.geometry`: 14-pixel patches, the 2x2 merge, the temporal patch, resize bounds,
  ``smart_resize`` and visual-token counts.
- :mod:`curation.target.video`: how a video is sampled into frames (the ``video:`` options and defaults).

Ingest, filters, dedup, mixing and the trainer all depend on this contract, so it depends on nothing of
theirs: the standard library, numpy and pyarrow, and :mod:`curation.schema` / :mod:`curation.bounds` at
most (``tests/unit/test_imports.py`` holds it to that). Import the modules, not this package: it re-exports
nothing.
"""
