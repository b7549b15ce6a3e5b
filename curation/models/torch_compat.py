"""The one workaround for a torchvision wheel whose compiled ops cannot load (DESIGN.md, Known traps).

PyPI's torchvision 0.28.0 is a CUDA build; next to a CPU build of torch its ``_C`` extension fails to
load, and ``import torchvision`` then dies in ``_meta_registrations`` with ``operator torchvision::nms
does not exist``: that module registers fake kernels for ``nms`` and ``qnms`` without checking that
the ops exist. Transforms, open_clip and transformers use none of the compiled ops, so defining the
two operator *schemas* (no kernels) before torchvision is imported is enough for all of them; calling
``torchvision.ops.nms`` still fails, with torch's "no kernel" error.

The fix is active only when the compiled ops are really missing: torchvision's ``_C`` is loaded first
(as torchvision itself would), and the schemas are defined only if ``torchvision::nms`` is still absent.

Call :func:`ensure_torchvision` before importing open_clip, torchvision or a transformers vision model::

    from curation.models.torch_compat import ensure_torchvision
    ensure_torchvision()
    import open_clip
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import logging
import sys
import threading
from types import ModuleType

log = logging.getLogger(__name__)

# The two ops whose fake kernels torchvision registers unconditionally at import.
_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_lock = threading.Lock()
_library = None  # the torch.library.Library holding the schemas; dropping it would unregister them


def ensure_torchvision() -> ModuleType:
    """Import torchvision (defining the missing op schemas first if its compiled ops cannot load).

    Raises ImportError when torch or torchvision is not installed. Safe to call from several threads and
    any number of times.
    """
    global _library
    if "torchvision" in sys.modules:
        return sys.modules["torchvision"]
    import torch

    with _lock:
        if not hasattr(torch.ops.torchvision, "nms") and not _load_compiled_ops(torch):
            log.info(
                "torchvision's compiled ops do not load with torch %s: defining the nms/qnms schemas so "
                "that torchvision imports (transforms work; torchvision.ops.nms does not)",
                torch.__version__,
            )
            _library = torch.library.Library("torchvision", "DEF")
            for schema in _SCHEMAS:
                _library.define(schema)
        return importlib.import_module("torchvision")


def _load_compiled_ops(torch) -> bool:
    """Load torchvision's ``_C`` extension the way torchvision does; True if ``torchvision::nms``
    then exists."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None:
        raise ImportError("torchvision is not installed")
    loader = (importlib.machinery.ExtensionFileLoader, importlib.machinery.EXTENSION_SUFFIXES)
    for folder in spec.submodule_search_locations or ():
        ext = importlib.machinery.FileFinder(folder, loader).find_spec("_C")
        if ext is None:
            continue
        try:
            torch.ops.load_library(ext.origin)
        except OSError as e:
            log.debug("torchvision's _C does not load: %s", e)
            return False
        return hasattr(torch.ops.torchvision, "nms")
    return False
