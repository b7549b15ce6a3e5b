"""Multimodal data curation and mixture building for vision-language models.

The library behind the ``curation`` command: readers turn sources into canonical rows
(:mod:`curation.schema`), stages annotate and filter them (:mod:`curation.stage`,
:mod:`curation.filters`), the runner executes them as Ray Data jobs (:mod:`curation.runner`) and
writes pools (:mod:`curation.io.pool`).
"""

__version__ = "0.1.0"
