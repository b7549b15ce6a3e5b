"""The think_with_image stage: runs each trace's code, inserts the tool turn, rejects what cannot run."""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pytest
from PIL import Image

from curation.filters import registry
from curation.schema import from_rows, row_id
from curation.stage import Resources

REG = registry()


def jpeg(w=64, h=48) -> bytes:
    img = Image.new("RGB", (w, h), "white")
    img.paste((255, 0, 0), (8, 8, 24, 20))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95)
    return buf.getvalue()


def trace(code: str | None, question="What is in the red box?") -> list[dict]:
    """A think-with-image conversation before execution: user, assistant with the code, final answer."""
    thought = "<think>The box is small; zoom in on it.</think>"
    return [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": [{"type": "image", "index": 0}, {"type": "text", "text": question}]},
        {"role": "assistant", "content": thought if code is None else f"{thought}\n```python\n{code}\n```"},
        {"role": "assistant", "content": "A red square."},
    ]


def rows(*specs: dict) -> pa.Table:
    out = []
    for i, s in enumerate(specs):
        messages = s.get("raw", json.dumps(s.get("messages")))
        images = s.get("images", [jpeg()])
        out.append(
            {
                "id": s.get("id") or row_id("sft", messages, images or []),
                "source": "test",
                "modality": s.get("modality", "sft"),
                "mode": s.get("mode", "think_with_image"),
                "messages": messages,
                "images": images,
                "source_uri": "mem",
                "source_offset": i,
                "reject_reason": s.get("reject_reason"),
            }
        )
    return from_rows(out)


def stage(**params):
    return REG["think_with_image"](resources=Resources(num_cpus=2), **params)


ZOOM = "box = image.crop((8, 8, 24, 20))\nprint('box', box.size)\nresult = box.resize((32, 24))"


def test_success_inserts_the_tool_turn_and_appends_the_image():
    batch = rows({"messages": trace(ZOOM)}, {"messages": trace("ImageOps.mirror(image).save('output.png')")})
    s = stage()
    s.setup()  # the probe snippet runs
    out = s(batch)
    assert out["reject_reason"].to_pylist() == [None, None]
    assert out["id"].to_pylist() == batch["id"].to_pylist()
    msgs = [json.loads(m) for m in out["messages"].to_pylist()]
    images = out["images"].to_pylist()
    # row 0: printed text comes with the image, right after the code's turn, before the final answer
    assert [m["role"] for m in msgs[0]] == ["system", "user", "assistant", "tool", "assistant"]
    assert msgs[0][3]["content"] == [
        {"type": "image", "index": 1},
        {"type": "text", "text": "box (16, 12)\n"},
    ]
    assert msgs[0][:3] == trace(ZOOM)[:3] and msgs[0][4] == trace(ZOOM)[3]
    assert len(images[0]) == 2 and images[0][0] == batch["images"].to_pylist()[0][0]
    zoomed = Image.open(io.BytesIO(images[0][1]))
    assert zoomed.format == "PNG" and zoomed.size == (32, 24)  # crop box 16x12, zoomed x2
    r, g, b = zoomed.convert("RGB").getpixel((16, 12))
    assert r > 200 and g < 60 and b < 60
    # row 1: no print, no text part; the output came from output.png
    assert msgs[1][3] == {"role": "tool", "content": [{"type": "image", "index": 1}]}
    assert Image.open(io.BytesIO(images[1][1])).size == (64, 48)


def test_every_reason_to_reject():
    cases = [
        ({"raw": "{not json"}, "bad_messages", "not JSON"),
        ({"raw": json.dumps({"role": "user"})}, "bad_messages", "list"),
        ({"messages": trace(None)}, "no_code", "no ```python block"),
        (
            {"messages": trace("result = image\n```\nand again\n```python\nresult = image")},
            "no_code",
            "2 ```python",
        ),
        ({"messages": trace("result = image.crop((0, 0, 8, 8)")}, "code_does_not_parse", "line 1"),
        ({"messages": trace(ZOOM), "images": None}, "no_input_image", "images[0]"),
        ({"messages": trace(ZOOM), "images": [b"not an image"]}, "no_input_image", "does not decode"),
        ({"messages": trace("while True:\n    pass")}, "sandbox_timeout", "limit"),
        ({"messages": trace("big = bytearray(8 * 2**30)")}, "sandbox_memory", "MemoryError"),
        ({"messages": trace("print(open('/etc/passwd').read())")}, "sandbox_blocked", "open /etc/passwd"),
        ({"messages": trace("import socket")}, "sandbox_blocked", "import of 'socket'"),
        ({"messages": trace("x = [1][3]")}, "sandbox_error", "IndexError"),
        ({"messages": trace("x = image.size")}, "no_output_image", "result"),
        ({"messages": trace("result = Image.new('L', (200, 200))")}, "bad_output_image", "200x200"),
    ]
    batch = rows(*(c[0] for c in cases))
    out = stage(timeout_s=2, max_output_pixels=10_000)(batch)
    assert out["reject_reason"].to_pylist() == [c[1] for c in cases]
    assert set(out["reject_stage"].to_pylist()) == {"think_with_image"}
    for (_, reason, words), detail in zip(cases, out["reject_detail"].to_pylist()):
        assert words in detail, (reason, detail)
    # rejected rows keep what they had
    assert out["messages"].to_pylist() == batch["messages"].to_pylist()
    assert out["images"].to_pylist() == batch["images"].to_pylist()


def test_other_rows_untouched_and_a_second_run_changes_nothing():
    batch = rows(
        {"messages": trace(ZOOM)},
        {"messages": trace(ZOOM), "mode": "thinking"},  # another mode
        {"messages": trace(ZOOM), "modality": "image_text"},  # another modality
        {"messages": trace("import socket"), "reject_reason": "earlier"},  # rejected before: not run
        {
            "raw": json.dumps(
                [
                    *trace(ZOOM)[:3],
                    {"role": "tool", "content": [{"type": "image", "index": 1}]},
                    trace(ZOOM)[3],
                ]
            ),
            "images": [jpeg(), jpeg(8, 8)],
        },  # already executed
    )
    s = stage()
    once = s(batch)
    assert once["reject_reason"].to_pylist() == [None, None, None, "earlier", None]
    assert once.slice(1).equals(batch.slice(1))
    assert len(once["images"].to_pylist()[0]) == 2
    assert s(once).equals(once)  # idempotent: the completed row now has its tool turn


def test_registered_with_its_parameters():
    from curation.stage import describe

    params = describe(REG["think_with_image"])
    assert params["timeout_s"] == 10.0 and params["memory_mb"] == 512


@pytest.mark.parametrize("messages", ["null", "[1, 2]", json.dumps([{"content": "no role"}])])
def test_malformed_messages_never_crash(messages):
    out = stage()(rows({"raw": messages}))
    assert out["reject_reason"].to_pylist() == ["bad_messages"]
