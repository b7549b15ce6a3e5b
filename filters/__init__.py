"""Built-in filter stages, one module per family. Installed as ``curation.filters``.

Importing this package registers every stage with :func:`curation.stage.register`.
"""

from curation.filters import caption, clip, decontam, dedup, image, judge, ocr, ocr_qa, sft, text, video  # noqa: F401

from curation.synth import think_with_image  # noqa: F401
