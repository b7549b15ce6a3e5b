"""open_clip models chosen by one string, as in open_clip's ``factory.py``, and never a surprise download.

A *spec* names the architecture and the weights:

``ARCH:TAG``
    an open_clip architecture and pretrained tag, e.g. ``ViT-B-32:datacomp_xl_s13b_b90k`` or
    ``ViT-L-14-quickgelu:dfn2b`` (``open_clip.list_pretrained()`` lists them). The weights must already be
    in open_clip's cache (the Hugging Face cache, or ``~/.cache/clip`` for URL weights) unless
    ``allow_download`` is set: a pipeline never fetches gigabytes because of a typo.
``ARCH:/path/to/weights.pt``
    an open_clip architecture and a local checkpoint (a state dict, or a dict holding ``state_dict`` as
    open_clip's training writes).
``/path/to/model.pt``
    a checkpoint written by :func:`save_clip`, which records its architecture (and preprocessing) inside,
    so the path alone is enough; custom architectures (a config dict) work the same way.
``local-dir:/path/to/folder``
    open_clip's own folder format (``open_clip_config.json`` next to the weights), e.g. a Hugging Face
    model repository downloaded once with ``hf download``.

:func:`resolve_clip` finds the weights without loading the model (the driver's pre-flight check);
:func:`load_clip` builds the model on a device. Nothing here imports torch at module import.

Example::

    clip = load_clip("ViT-B-32:datacomp_xl_s13b_b90k", device="cuda")
    img = clip.encode_images(torch.stack([clip.preprocess(pil_image)]))
    txt = clip.encode_texts(["a red circle"])
    score = (img * txt).sum(-1)  # cosine similarity: both are L2-normalised
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from curation.io import commit
from curation.models import file_sha256

log = logging.getLogger(__name__)

FORMAT = "curation.clip/1"  # marks checkpoints written by save_clip
SPEC_FORMS = (
    "ARCH:TAG (e.g. ViT-B-32:datacomp_xl_s13b_b90k), ARCH:/path/to/weights.pt, "
    "a checkpoint written by curation.models.clip.save_clip, or local-dir:/path/to/open_clip/folder"
)
PRECISIONS = ("fp32", "fp16", "bf16")


def import_open_clip():
    """``open_clip``, imported after the torchvision workaround (:mod:`curation.models.torch_compat`)."""
    from curation.models.torch_compat import ensure_torchvision

    ensure_torchvision()
    import open_clip

    return open_clip


@dataclass(frozen=True)
class ClipWeights:
    """Where a spec's weights are, found without building the model. Picklable (a few strings)."""

    spec: str
    name: str  # what lineage records: ARCH:TAG, ARCH:/abs/path, local-dir:/abs/path
    arch: str  # the open_clip model name to build (a built-in, a save_clip architecture, or local-dir:...)
    checkpoint: str  # the file holding the weights
    model_cfg: dict | None = field(default=None, hash=False)  # save_clip: the recorded architecture
    preprocess_cfg: dict = field(default_factory=dict, hash=False)  # overrides: the tag's or the recorded one
    quick_gelu: bool = False  # the tag's weights were trained with QuickGELU

    def sha256(self) -> str:
        """sha256 of the checkpoint file (cached per file, size and mtime: hashing 1.7 GB takes seconds)."""
        return file_sha256(self.checkpoint)


def resolve_clip(spec: str, allow_download: bool = False, cache_dir: str | None = None) -> ClipWeights:
    """Find the weights ``spec`` names; download them only when ``allow_download``.

    Raises FileNotFoundError (no such file, weights not in the cache) or ValueError (unknown architecture
    or tag, a checkpoint without its architecture), each naming the spec and what to do.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"model: expected a CLIP spec, one of {SPEC_FORMS}")
    spec = spec.strip()
    open_clip = import_open_clip()
    if spec.startswith("local-dir:"):
        return _resolve_local_dir(spec)
    if spec.startswith("hf-hub:"):
        raise ValueError(
            f"model '{spec}': hf-hub specs are not supported; download the repository once "
            f"(hf download ...) and use local-dir:/path/to/it, or use ARCH:TAG"
        )
    arch, sep, rest = spec.partition(":")
    if sep and arch in open_clip.list_models():
        if open_clip.is_pretrained_cfg(arch, rest):
            return _resolve_tag(open_clip, spec, arch, rest, allow_download, cache_dir)
        path = Path(rest).expanduser()
        if not path.is_file():
            tags = open_clip.list_pretrained_tags_by_model(arch)
            tags = (
                ", ".join(tags[:8]) + (f" and {len(tags) - 8} more" if len(tags) > 8 else "")
                if tags
                else "none"
            )
            raise FileNotFoundError(
                f"model '{spec}': '{rest}' is neither a pretrained tag of {arch} "
                f"(known: {tags}) nor an existing checkpoint file"
            )
        return ClipWeights(spec, f"{arch}:{path.resolve()}", arch, str(path.resolve()))
    path = Path(spec).expanduser()
    if path.is_file():
        return _resolve_saved(spec, path)
    if sep and not os.path.exists(arch):  # looks like ARCH:SOMETHING with an unknown ARCH
        raise ValueError(
            f"model '{spec}': unknown open_clip architecture '{arch}' "
            f"(open_clip.list_models() lists the {len(open_clip.list_models())} known ones); "
            f"expected {SPEC_FORMS}"
        )
    raise FileNotFoundError(f"model '{spec}': no such checkpoint file {path}; expected {SPEC_FORMS}")


def _resolve_tag(open_clip, spec: str, arch: str, tag: str, allow_download: bool, cache_dir: str | None):
    cfg = open_clip.get_pretrained_cfg(arch, tag)
    name = f"{arch}:{tag}"
    path = _cached_pretrained(cfg, cache_dir)
    if path is None and not allow_download:
        where = cfg.get("hf_hub") or cfg.get("url")
        raise FileNotFoundError(
            f"model '{spec}': the weights ({where}) are not in the local cache; set allow_download: true to "
            f"fetch them once (from the driver, before any data is read), or give a local checkpoint"
        )
    if path is None:
        log.info("downloading the weights of %s", name)
        try:
            path = open_clip.download_pretrained(cfg, cache_dir=cache_dir)
        except Exception as e:  # network, permissions, hub errors: all mean "no weights"
            raise FileNotFoundError(f"model '{spec}': downloading the weights failed: {e}") from e
    from open_clip.transform import merge_preprocess_dict

    return ClipWeights(
        spec,
        name,
        arch,
        path,
        preprocess_cfg=merge_preprocess_dict({}, cfg),
        quick_gelu=bool(cfg.get("quick_gelu", False)),
    )


def _cached_pretrained(cfg: dict[str, Any], cache_dir: str | None) -> str | None:
    """The cached weights file of a pretrained tag, or None; looks where open_clip's download would put it."""
    if cfg.get("file"):
        return cfg["file"] if os.path.isfile(cfg["file"]) else None
    if cfg.get("hf_hub"):
        from huggingface_hub import try_to_load_from_cache
        from open_clip.constants import HF_WEIGHTS_NAME

        repo, filename = os.path.split(cfg["hf_hub"])  # 'org/repo/' means the default file name
        filename = filename or HF_WEIGHTS_NAME
        # open_clip prefers a .safetensors twin of a .bin/.pth file when the repository has one
        names = [filename[:-4] + ".safetensors"] if filename.endswith((".bin", ".pth")) else []
        if filename == HF_WEIGHTS_NAME:
            from open_clip.constants import HF_SAFE_WEIGHTS_NAME

            names = [HF_SAFE_WEIGHTS_NAME]
        for name in [*names, filename]:
            found = try_to_load_from_cache(repo, name, cache_dir=cache_dir)
            if isinstance(found, str):
                return found
    if cfg.get("url"):
        path = os.path.join(cache_dir or os.path.expanduser("~/.cache/clip"), os.path.basename(cfg["url"]))
        if os.path.isfile(path):
            return path
    return None


def _resolve_local_dir(spec: str) -> ClipWeights:
    from open_clip.factory import _find_checkpoint_in_dir  # the file open_clip itself will load

    folder = Path(spec[len("local-dir:") :]).expanduser()
    if not (folder / "open_clip_config.json").is_file():
        raise FileNotFoundError(f"model '{spec}': {folder} has no open_clip_config.json")
    weights = _find_checkpoint_in_dir(folder)
    if weights is None:
        raise FileNotFoundError(f"model '{spec}': no weights file (*.safetensors, *.bin, *.pth) in {folder}")
    return ClipWeights(spec, f"local-dir:{folder.resolve()}", f"local-dir:{folder.resolve()}", weights)


def _resolve_saved(spec: str, path: Path) -> ClipWeights:
    import torch

    try:
        # mmap: the header is read without loading the tensors
        ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # not a torch file, a pickle that is not weights-only, a truncated file
        raise ValueError(f"model '{spec}': cannot read {path} as a checkpoint: {e}") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(
            f"model '{spec}': {path} does not record its architecture (it was not written by "
            f"save_clip); name the architecture: ARCH:{path}"
        )
    return ClipWeights(
        spec,
        f"{ckpt['arch']}:{path.resolve()}",
        ckpt["arch"],
        str(path.resolve()),
        model_cfg=ckpt["model_cfg"],
        preprocess_cfg=ckpt.get("preprocess_cfg") or {},
    )


def save_clip(model, arch: str | dict, path: str | os.PathLike, name: str | None = None) -> Path:
    """Write ``model``'s weights with its architecture, so that ``load_clip(path)`` rebuilds it alone.

    ``arch``: an open_clip architecture name (``ViT-B-32``) or a model config dict in open_clip's format
    (``{"embed_dim": ..., "vision_cfg": {...}, "text_cfg": {...}}``), recorded under ``name`` (default:
    ``custom-<hash of the config>``). The preprocessing open_clip attached to the model is kept too.
    Written to a temporary name and renamed (:func:`curation.io.commit.open_committed`), so a reader never
    sees half a file.
    """
    import torch

    open_clip = import_open_clip()
    if isinstance(arch, str):
        cfg = open_clip.get_model_config(arch)
        if cfg is None:
            raise ValueError(f"unknown open_clip architecture '{arch}'")
        arch_name = arch
    else:
        cfg = copy.deepcopy(arch)
        digest = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:12]
        arch_name = name or f"custom-{digest}"
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    preprocess = dict(getattr(model.visual, "preprocess_cfg", None) or {})
    path = Path(path)
    with commit.open_committed(path) as f:
        torch.save(
            {
                "format": FORMAT,
                "arch": arch_name,
                "model_cfg": cfg,
                "preprocess_cfg": preprocess,
                "state_dict": state,
            },
            f,
        )
    return path


_register_lock = threading.Lock()


def _register_arch(open_clip, name: str, cfg: dict) -> str:
    """Make a recorded architecture buildable by ``open_clip.create_model``; the name it is built under.

    A built-in with the same config is used as it is. Otherwise the config goes into open_clip's config
    table (``add_model_config`` only reads JSON files), under ``name`` or, if a different architecture
    already has that name, under ``name@<hash>``.
    """
    with _register_lock:
        known = open_clip.get_model_config(name)
        if known == cfg:
            return name
        if known is not None:
            name = f"{name}@{hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:12]}"
        from open_clip import factory

        factory._MODEL_CONFIGS.setdefault(name, copy.deepcopy(cfg))
        return name


@dataclass
class ClipModel:
    """A loaded CLIP model: its preprocessing, tokenizer and where its weights came from.

    Preprocessing is open_clip's evaluation transform in two halves: :meth:`prepare` (resize, crop, RGB:
    Pillow only, so it runs on any thread without starting a torch thread team there) and :meth:`pixels` (to
    float and normalise, over a whole batch, on ``device``); ``preprocess`` is the whole transform, for one
    image.
    """

    model: Any
    preprocess: Any  # PIL image -> float tensor (C, H, W): open_clip's evaluation transform
    tokenizer: Any  # list[str] -> LongTensor (N, context_length)
    weights: ClipWeights
    device: str
    precision: str = "fp32"

    def __post_init__(self):
        import torch
        from torchvision.transforms import Compose, Normalize, ToTensor

        steps = list(self.preprocess.transforms)
        if not (isinstance(steps[-2], ToTensor) and isinstance(steps[-1], Normalize)):
            raise TypeError(
                f"open_clip's transform no longer ends with ToTensor, Normalize: {self.preprocess}"
            )
        self._prepare = Compose(steps[:-2])
        shape = (1, 3, 1, 1)
        self._mean = torch.tensor(steps[-1].mean, dtype=torch.float32, device=self.device).view(shape)
        self._std = torch.tensor(steps[-1].std, dtype=torch.float32, device=self.device).view(shape)

    def prepare(self, image) -> Any:
        """A PIL image resized and cropped to the model's input, as a uint8 (H, W, 3) numpy array."""
        import numpy as np

        return np.asarray(self._prepare(image))

    def pixels(self, prepared: list) -> Any:
        """A batch of :meth:`prepare` outputs as the model's normalised float input (N, 3, H, W) on
        ``device``: the same numbers as ``preprocess`` gives image by image."""
        import numpy as np
        import torch

        batch = torch.from_numpy(np.stack(prepared)).to(self.device, non_blocking=True)
        return batch.permute(0, 3, 1, 2).float().div(255).sub(self._mean).div(self._std)

    @property
    def name(self) -> str:
        return self.weights.name

    @property
    def checkpoint_sha256(self) -> str:
        return self.weights.sha256()

    @property
    def image_size(self) -> tuple[int, int]:
        size = self.model.visual.image_size
        return (size, size) if isinstance(size, int) else tuple(size)

    def encode_images(self, pixels) -> Any:
        """L2-normalised float32 image embeddings of a preprocessed batch (N, C, H, W), on ``device``."""
        import torch

        with torch.inference_mode(), self._autocast():
            out = self.model.encode_image(pixels.to(self.device, non_blocking=True), normalize=True)
        return out.float()

    def encode_texts(self, texts: list[str]) -> Any:
        """L2-normalised float32 text embeddings (N, D), on ``device``; texts longer than the context are
        cut."""
        import torch

        tokens = self.tokenizer(texts)
        with torch.inference_mode(), self._autocast():
            out = self.model.encode_text(tokens.to(self.device, non_blocking=True), normalize=True)
        return out.float()

    def _autocast(self):
        import contextlib

        import torch

        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.float16 if self.precision == "fp16" else torch.bfloat16
        return torch.autocast(device_type=self.device.split(":")[0], dtype=dtype)


def load_clip(
    spec: str,
    device: str = "cpu",
    allow_download: bool = False,
    cache_dir: str | None = None,
    precision: str = "fp32",
    weights: ClipWeights | None = None,
) -> ClipModel:
    """Build the model ``spec`` names on ``device``, in evaluation mode.

    ``precision``: ``fp32``, or ``fp16``/``bf16`` autocast (GPUs: about twice the throughput; scores move in
    the third decimal). ``weights``: an already resolved spec (skips the cache lookup).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
    weights = weights or resolve_clip(spec, allow_download=allow_download, cache_dir=cache_dir)
    open_clip = import_open_clip()
    from open_clip.transform import PreprocessCfg, image_transform_v2

    if weights.arch.startswith("local-dir:"):  # open_clip reads the folder's config and weights itself
        arch, pretrained = weights.arch, None
    else:
        arch = (
            _register_arch(open_clip, weights.arch, weights.model_cfg) if weights.model_cfg else weights.arch
        )
        pretrained = weights.checkpoint
    try:
        model = open_clip.create_model(
            arch,
            pretrained=pretrained,
            device=device,
            force_quick_gelu=weights.quick_gelu,
            force_preprocess_cfg=weights.preprocess_cfg or None,
        )
    except RuntimeError as e:  # open_clip reports a state dict that does not fit as RuntimeError
        raise ValueError(
            f"model '{spec}': the weights in {weights.checkpoint} do not fit {weights.arch}: {e}"
        ) from e
    model.eval()
    preprocess = image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)
    tokenizer = open_clip.get_tokenizer(arch)
    return ClipModel(model, preprocess, tokenizer, weights, device, precision)
