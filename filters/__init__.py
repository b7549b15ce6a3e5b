"""Built-in filter stages, one module per family. Installed as ``curation.filters``.

Importing this package registers every stage with :func:`curation.stage.register`; :func:`registry` is the
way to get them, since it is this package (above :mod:`curation.stage`) that knows every family::

    from curation.filters import registry

    stage = registry()["image_size"](min_side=32)
"""

from curation.filters import caption, clip, decontam, dedup, image, judge, ocr, ocr_qa, sft, text, video  # noqa: F401
from curation.stage import REGISTRY, Stage
from curation.synth import think_with_image  # noqa: F401


def registry() -> dict[str, type[Stage]]:
    """Every registered stage by its recipe name (the built-in families above, and any registered since)."""
    return REGISTRY
