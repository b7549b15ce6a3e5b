"""The dense caption stage (filters/caption.py) against a real HTTP server process on loopback.

The server is a few lines of ``http.server`` (below, started with the helpers of
tests/helpers/servers/openai_server.py, whose canned server answers in the judge's JSON only): a
``[[mode]]`` marker in the row's caption picks a canned caption (good, too short, looping, an echo of the
prompt, fixed when asked again), and ``GET /log`` returns what every request carried, so a test can read
the prompt the stage sent.
"""

from __future__ import annotations

import hashlib
import json
import sys

import pytest
import requests

from curation.filters import registry
from curation.filters.caption import DEFAULT_PROMPT, DenseCaption, echo
from curation.models.vlm import BackendConfig
from curation.schema import from_rows
from tests.helpers.images import jpeg
from tests.helpers.servers.openai_server import free_port, server_process

GOOD = (
    "A bright red circle sits in the centre of a plain white canvas. Its edges are smooth and it fills "
    "about half of the frame. Nothing else is drawn, and the background is evenly lit without shadows."
)
SHORT = "A red circle."
LOOP = "a red circle on white " * 15

SERVER = r"""
import json, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

GOOD, SHORT, LOOP = json.loads(sys.argv[2])
lock, log = threading.Lock(), []

def texts(content):
    if isinstance(content, str):
        return content
    return " ".join(p.get("text", "") for p in content if p["type"] == "text")

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def log_message(self, *args):
        pass

    def reply(self, body):
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        with lock:
            if self.path == "/reset":
                log.clear()
            models = {"object": "list", "data": [{"id": "canned"}]}
            self.reply(models if self.path == "/v1/models" else list(log))

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        users = [texts(m["content"]) for m in body["messages"] if m["role"] == "user"]
        first = body["messages"][0]["content"]
        mode = users[0].split("[[", 1)[1].split("]]", 1)[0] if "[[" in users[0] else "good"
        with lock:
            images = 0 if isinstance(first, str) else sum(p["type"] == "image_url" for p in first)
            log.append({"mode": mode, "users": users, "images": images})
        text = {"good": GOOD, "short": SHORT, "loop": LOOP, "echo": users[0],
                "think_only": "<think>hmm, a circle", "fix_on_retry": GOOD if len(users) > 1 else SHORT}[mode]
        message = {"role": "assistant", "content": text}
        self.reply({"id": "x", "object": "chat.completion", "model": "canned",
                    "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}})

server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler)
server.daemon_threads = True
server.serve_forever()
"""


@pytest.fixture(scope="module")
def server_module():
    port = free_port()
    args = [sys.executable, "-c", SERVER, str(port), json.dumps([GOOD, SHORT, LOOP])]
    with server_process(args, f"http://127.0.0.1:{port}/v1/models", 20):
        yield f"http://127.0.0.1:{port}/v1"


@pytest.fixture
def server(server_module):
    """The module's server with its request log emptied."""
    requests.get(server_module.removesuffix("/v1") + "/reset", timeout=5).raise_for_status()
    return server_module


def seen(url: str) -> list[dict]:
    return requests.get(url.removesuffix("/v1") + "/log", timeout=5).json()


def rows(*rs, modality="image_text"):
    return from_rows(
        [
            {
                "id": str(i),
                "modality": modality,
                "source_uri": "mem",
                "source_offset": i,
                "image": jpeg(),
                **r,
            }
            for i, r in enumerate(rs)
        ]
    )


def stage(url: str, **kw) -> DenseCaption:
    backend = {
        "kind": "openai",
        "base_url": url,
        "model": "canned",
        "max_retries": 1,
        "backoff_s": 0.01,
        "timeout_s": 2.0,
        **kw.pop("backend", {}),
    }
    return DenseCaption(backend=BackendConfig(**backend), **kw)


def test_registered_under_its_name():
    assert registry()["dense_caption"] is DenseCaption


def test_a_good_caption_is_written_with_its_word_count(server):
    out = stage(server)(rows({"text": "a red circle", "ocr_text": "SALE"}))
    assert out["reject_reason"].to_pylist() == [None]
    assert out["dense_caption"].to_pylist() == [GOOD]
    assert out["score_dense_caption"].to_pylist() == [len(GOOD.split())]
    [req] = seen(server)
    assert req["images"] == 1


def test_the_hints_reach_the_model(server):
    stage(server)(
        rows(
            {"text": "a red circle on white", "ocr_text": "OPEN 24 HOURS"},
            {"text": "blue square"},
            {"text": "", "ocr_text": "EXIT"},
        )
    )
    prompts = [r["users"][0] for r in seen(server)]
    assert len(prompts) == 3
    assert "Original caption: (none)" in next(p for p in prompts if "EXIT" in p)
    first = next(p for p in prompts if "a red circle on white" in p)
    assert "Original caption: a red circle on white" in first and "OCR: OPEN 24 HOURS" in first
    second = next(p for p in prompts if "blue square" in p)
    assert "OCR: (none)" in second  # an empty hint is said to be empty, not left blank


def test_a_short_caption_is_asked_again_then_rejected_with_the_raw_text(server):
    out = stage(server, max_attempts=3)(rows({"text": "[[short]]"}))
    assert out["reject_reason"].to_pylist() == ["caption_too_short"]
    assert out["reject_stage"].to_pylist() == ["dense_caption"]
    detail = out["reject_detail"][0].as_py()
    assert SHORT in detail and "3 words" in detail
    assert out["dense_caption"].to_pylist() == [None] and out["score_dense_caption"].to_pylist() == [None]
    log = seen(server)
    assert len(log) == 3  # every attempt used
    assert "3 words, at least 20" in log[-1]["users"][-1]  # the repair note says what was wrong


def test_a_caption_fixed_when_asked_again_is_kept(server):
    out = stage(server)(rows({"text": "[[fix_on_retry]]"}))
    assert out["reject_reason"].to_pylist() == [None]
    assert out["dense_caption"].to_pylist() == [GOOD]
    assert len(seen(server)) == 2


def test_a_looping_caption_is_rejected(server):
    out = stage(server)(rows({"text": "[[loop]]"}))
    assert out["reject_reason"].to_pylist() == ["caption_repetitive"]
    assert LOOP.strip() in out["reject_detail"][0].as_py()


def test_an_echo_of_the_prompt_is_rejected(server):
    out = stage(server)(rows({"text": "[[echo]]"}))
    assert out["reject_reason"].to_pylist() == ["caption_echoes_prompt"]
    assert "Describe this image in detail" in out["reject_detail"][0].as_py()


def test_an_empty_answer_is_a_failure(server):
    out = stage(server, max_attempts=1)(rows({"text": "[[think_only]]"}))
    assert out["reject_reason"].to_pylist() == ["caption_failure"]
    assert "<think>hmm" in out["reject_detail"][0].as_py()


def test_echo_measure():
    prompt = DEFAULT_PROMPT.replace("{caption}", "a red circle on a white background").replace(
        "{ocr_text}", "(none)"
    )
    assert echo(prompt, prompt, 8) == 1.0
    assert echo(GOOD, prompt, 8) == 0.0
    quoting = "The picture matches its caption, a red circle on a white background, and shows " + GOOD
    assert 0 < echo(quoting, prompt, 4) < 0.2  # a hint quoted inside a real description is not an echo
    assert echo("too short", prompt, 8) == 0.0


def test_an_unreachable_server_rejects_every_row(server):
    out = stage(f"http://127.0.0.1:{free_port()}/v1")(rows({"text": "x"}, {"text": "y"}))
    assert out["reject_reason"].to_pylist() == ["caption_unreachable"] * 2
    assert all(out["reject_detail"].to_pylist())


def test_rows_with_a_caption_are_skipped_unless_overwrite(server):
    batch = rows({"text": "a", "dense_caption": "kept as it was"}, {"text": "b"})
    out = stage(server)(batch)
    assert out["dense_caption"].to_pylist() == ["kept as it was", GOOD]
    assert out["score_dense_caption"].to_pylist() == [None, len(GOOD.split())]
    assert len(seen(server)) == 1
    out = stage(server, overwrite=True)(batch)
    assert out["dense_caption"].to_pylist() == [GOOD, GOOD]
    assert len(seen(server)) == 3


def test_other_rows_keep_their_values(server):
    batch = rows(
        {"text": "a", "reject_stage": "x", "reject_reason": "earlier", "dense_caption": "old"},
        {"text": "no image", "image": None},
    )
    out = stage(server)(batch)
    assert out["dense_caption"].to_pylist() == ["old", None]
    assert out["reject_reason"].to_pylist() == ["earlier", "missing_image"]
    assert seen(server) == []


def test_lineage_names_the_model_and_hashes_the_prompt(server):
    a, b = stage(server).lineage(), stage(server, prompt="Describe it. Hint: {caption}").lineage()
    assert a["model"] == "canned" and a["backend"] == "openai"
    assert len(a["prompt_sha256"]) == 64 and a["prompt_sha256"] != b["prompt_sha256"]
    assert a["prompt_sha256"] == stage(server).lineage()["prompt_sha256"]  # stable across instances
    assert a["prompt_sha256"] != hashlib.sha256(b"").hexdigest()


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"prompt": "Describe {image}"}, r"unknown placeholder\(s\) \{image\}"),
        ({"max_attempts": 0}, "positive"),
        ({"max_echo": 1.5}, "between 0 and 1"),
        ({"modalities": ["text"]}, "image_text and video"),
        ({"video_prompt": "Describe {clip}"}, r"video_prompt: unknown placeholder\(s\) \{clip\}"),
        ({"frames_per_request": 0}, "positive number of frames"),
    ],
)
def test_parameters_are_validated(kw, message):
    with pytest.raises(ValueError, match=message):
        stage("http://127.0.0.1:1/v1", **kw)


def test_a_video_is_captioned_from_frames_with_their_times(server):
    frames = [jpeg() for _ in range(12)]
    video = from_rows(
        [
            {
                "id": "v",
                "modality": "video",
                "source_uri": "mem",
                "source_offset": 0,
                "text": "a clip",
                "frames": frames,
                "frame_ts": [float(t) for t in range(12)],
            },
            {"id": "w", "modality": "video", "source_uri": "mem", "source_offset": 1, "text": "no frames"},
        ]
    )
    out = stage(server, frames_per_request=4)(video)
    assert out["dense_caption"].to_pylist() == [GOOD, None]
    assert out["reject_reason"].to_pylist() == [None, "missing_frames"]
    [req] = seen(server)
    assert req["images"] == 4  # spread over the clip: frames 0, 4, 7 and 11
    prompt = req["users"][0]
    for t in ("t=0.0 s:", "t=4.0 s:", "t=7.0 s:", "t=11.0 s:"):
        assert t in prompt
    assert "frames of a video clip" in prompt and "Original caption: a clip" in prompt
