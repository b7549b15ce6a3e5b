"""Cold-start SFT sources (curation.io.conversations): the converters (llava, sharegpt, qa), the readers of
their files, and the recipe's checks of sft sources. Validators: tests/unit/filters/test_sft.py; the
sample's cold-start sources through pipelines/coldstart.yaml: tests/integration/test_coldstart.py."""

from __future__ import annotations

import base64
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation.io import conversations
from curation.io.readers import plan_units, read_unit
from curation.recipe import SourceSpec, pipeline_from_dict
from curation.schema import ROW_SCHEMA, row_id
from curation.spec import RecipeError
from curation.target import chat
from tests.helpers.images import jpeg

SHAREGPT = conversations.SOURCE_FIELDS["sharegpt"]
QA = conversations.SOURCE_FIELDS["qa"]


def read(spec: SourceSpec) -> list[dict]:
    out = []
    for unit in plan_units([spec]):
        for t in read_unit(unit, batch_rows=4):
            assert t.schema == ROW_SCHEMA
            out += t.to_pylist()
    return out


def user_parts(conv: conversations.Converted) -> list:
    return next(m for m in conv.messages if m["role"] == "user")["content"]


# ---------------------------------------------------------------- converters


def test_llava_placeholders_become_image_parts_in_place():
    rec = {
        "image": ["a.jpg", "b.jpg"],
        "conversations": [
            {"from": "human", "value": "<image>\nLeft one. <image>\nRight one. Which is bigger?"},
            {"from": "gpt", "value": "The right one."},
        ],
    }
    conv = conversations.from_conversation(rec, SHAREGPT)
    assert user_parts(conv) == [
        {"type": "image", "index": 0},
        {"type": "text", "text": "Left one."},
        {"type": "image", "index": 1},
        {"type": "text", "text": "Right one. Which is bigger? /no_think"},
    ]
    assert conv.images == ["a.jpg", "b.jpg"] and conv.mode == "non_thinking"
    assert conv.messages[1] == {"role": "assistant", "content": "The right one."}


def test_llava_images_without_placeholder_go_first_and_video_placeholder_means_the_video():
    rec = {
        "image": "a.jpg",
        "conversations": [
            {"from": "human", "value": "Describe it."},
            {"from": "gpt", "value": "A dog."},
            {"from": "human", "value": "Its colour?"},
            {"from": "gpt", "value": "<think>Look.</think>\n\nBrown."},
        ],
    }
    conv = conversations.from_conversation(rec, SHAREGPT)
    assert conv.messages[0]["content"] == [
        {"type": "image", "index": 0},
        {"type": "text", "text": "Describe it."},
    ]
    assert conv.mode == "thinking" and conv.messages[2]["content"] == "Its colour? /think"
    # LLaVA-Video writes <image> for its video
    rec = {
        "video": "clip.mp4",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat happens?"},
            {"from": "gpt", "value": "A pan."},
        ],
    }
    conv = conversations.from_conversation(rec, SHAREGPT)
    assert user_parts(conv) == [{"type": "video"}, {"type": "text", "text": "What happens?"}]
    assert conv.mode == "video" and conv.video == "clip.mp4" and conv.images == []


def test_sharegpt_messages_keep_indices_and_append_inline_images():
    png = base64.b64encode(jpeg()).decode()
    rec = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {
                "role": "user",
                "content": [
                    {"type": "image", "index": 0},
                    {"type": "text", "text": "And this one?"},
                    {"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{png}"}},
                ],
            },
            {
                "role": "assistant",
                "content": [{"type": "text", "text": "<analysis>Easy.</analysis>\n\nSame."}],
            },
        ],
        "images": ["x.jpg"],
        "mode": "auto_think",
    }
    conv = conversations.from_conversation(rec, SHAREGPT)
    assert conv.messages[0] == {"role": "system", "content": "Be brief."}
    assert user_parts(conv) == [
        {"type": "image", "index": 0},
        {"type": "text", "text": "And this one?"},
        {"type": "image", "index": 1},
    ]
    assert conv.images[0] == "x.jpg" and conversations.image_bytes(conv.images[1]) == jpeg()
    assert conv.mode == "auto_think" and conv.messages[2]["content"].startswith("<analysis>")


@pytest.mark.parametrize(
    "record, mode, reply",
    [
        ({"question": "2+2?", "answer": "4"}, "non_thinking", "4"),
        (
            {"question": "2+2?", "answer": "4", "reasoning": "2 and 2."},
            "thinking",
            "<think>2 and 2.</think>\n\n4",
        ),
        (
            {"question": "2+2?", "answer": "4", "analysis": "Easy."},
            "auto_think",
            "<analysis>Easy.</analysis>\n\n4",
        ),
        (
            {"question": "2+2?", "answer": "4", "analysis": "Hard.", "reasoning": "2 and 2."},
            "auto_think",
            "<analysis>Hard.</analysis>\n\n<think>2 and 2.</think>\n\n4",
        ),
        (
            {"question": "2+2?", "answer": "4", "reasoning": "2 and 2.", "mode": "non_thinking"},
            "non_thinking",
            "4",
        ),
        ({"question": "What now?", "answer": "A pan.", "video": "c.mp4"}, "video", "A pan."),
        (
            {
                "question": "Label?",
                "answer": "K7",
                "code": "result = image",
                "reasoning": "Zoom.",
                "image": "i.png",
            },
            "think_with_image",
            "<think>Zoom.</think>\n\n```python\nresult = image\n```",
        ),
    ],
)
def test_qa_rows_take_the_mode_given_or_inferred(record, mode, reply):
    conv = conversations.from_qa(record, QA)
    assert conv.mode == mode
    assert conv.messages[1]["content"] == reply
    want_suffix = {"thinking": " /think", "non_thinking": " /no_think"}.get(mode, "")
    assert chat.last_user_text(conv.messages).endswith(record["question"] + want_suffix)
    if mode == "think_with_image":  # pre-execution form: code turn, then the answer
        assert [m["role"] for m in conv.messages] == ["user", "assistant", "assistant"]
        assert conv.messages[2]["content"] == "K7" and user_parts(conv)[0] == {"type": "image", "index": 0}


def test_source_default_mode_and_suffix_is_never_added_twice():
    conv = conversations.from_qa({"question": "Why? /think", "answer": "Because.", "reasoning": "r"}, QA)
    assert chat.last_user_text(conv.messages) == "Why? /think"
    conv = conversations.from_qa(
        {"question": "Why?", "answer": "Because.", "reasoning": "r"}, QA, default_mode="thinking"
    )
    assert conv.mode == "thinking"
    assert (
        conversations.from_qa(
            {"question": "Why?", "answer": "x", "mode": "non_thinking"}, QA, "thinking"
        ).mode
        == "non_thinking"
    )  # the record's own mode wins over the source's


@pytest.mark.parametrize(
    "convert, record, reason",
    [
        ("conv", {"conversations": []}, "empty_conversation"),
        ("conv", {"id": 3}, "empty_conversation"),
        ("conv", {"conversations": "hello"}, "malformed_row"),
        ("conv", {"conversations": ["hello"]}, "malformed_row"),
        ("conv", {"conversations": [{"from": "bot", "value": "x"}]}, "unknown_role"),
        (
            "conv",
            {"conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}]},
            "bad_role_order",
        ),
        ("conv", {"conversations": [{"from": "human", "value": "x"}]}, "bad_role_order"),
        (
            "conv",
            {
                "conversations": [
                    {"from": "human", "value": "x"},
                    {"from": "human", "value": "y"},
                    {"from": "gpt", "value": "z"},
                ]
            },
            "bad_role_order",
        ),
        (
            "conv",
            {
                "mode": "deep",
                "conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}],
            },
            "unknown_mode",
        ),
        (
            "conv",
            {
                "image": "a.jpg",
                "conversations": [
                    {"from": "human", "value": "<image><image>x"},
                    {"from": "gpt", "value": "y"},
                ],
            },
            "placeholder_mismatch",
        ),
        (
            "conv",
            {"conversations": [{"from": "human", "value": "<video> x"}, {"from": "gpt", "value": "y"}]},
            "placeholder_mismatch",
        ),
        (
            "conv",
            {
                "video": ["a.mp4", "b.mp4"],
                "conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}],
            },
            "too_many_videos",
        ),
        (
            "conv",
            {
                "conversations": [
                    {"from": "human", "value": "x /no_think"},
                    {"from": "gpt", "value": "<think>r</think>y"},
                ]
            },
            "mode_suffix_mismatch",
        ),
        (
            "conv",
            {"conversations": [{"from": "human", "value": {"a": 1}}, {"from": "gpt", "value": "y"}]},
            "malformed_row",
        ),
        ("qa", {"answer": "no question"}, "empty_conversation"),
        ("qa", {"question": "q", "answer": "a", "mode": "fast"}, "unknown_mode"),
        ("qa", {"question": ["q"], "answer": "a"}, "malformed_row"),
        ("qa", {"question": "q /think", "answer": "a", "analysis": "hm"}, "mode_suffix_mismatch"),
    ],
)
def test_bad_records_raise_their_reason(convert, record, reason):
    fn = conversations.from_conversation if convert == "conv" else conversations.from_qa
    with pytest.raises(chat.ConversionError) as e:
        fn(record, SHAREGPT if convert == "conv" else QA)
    assert e.value.reason == reason


# ---------------------------------------------------------------- readers


def test_sharegpt_json_file_rows_ids_meta_and_rejects(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.jpg").write_bytes(jpeg(color="red"))
    (tmp_path / "img" / "b.jpg").write_bytes(jpeg(color="blue"))
    records = [
        {
            "id": "r0",
            "image": "a.jpg",
            "conversations": [
                {"from": "human", "value": "<image>\nColour?"},
                {"from": "gpt", "value": "Red."},
            ],
        },
        {
            "id": "r1",
            "image": ["a.jpg", "b.jpg"],
            "conversations": [
                {"from": "human", "value": "<image> vs <image>"},
                {"from": "gpt", "value": "Different."},
            ],
        },
        "not an object",
        {
            "id": "r3",
            "image": "gone.jpg",
            "conversations": [{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "?"}],
        },
        {
            "id": "r4",
            "conversations": [{"from": "gpt", "value": "I start."}, {"from": "human", "value": "No."}],
        },
    ]
    (tmp_path / "chat.json").write_text(json.dumps(records))
    got = read(
        SourceSpec(
            name="c",
            format="sharegpt",
            modality="sft",
            paths=[str(tmp_path / "chat.json")],
            fields={"image_root": "img"},
        )
    )
    assert [r["reject_reason"] for r in got] == [
        None,
        None,
        "malformed_row",
        "missing_image_file",
        "bad_role_order",
    ]
    assert [r["source_offset"] for r in got] == [0, 1, 2, 3, 4]
    r0, r1 = got[0], got[1]
    assert r0["modality"] == "sft" and r0["mode"] == "non_thinking" and r0["text"] is None
    assert r0["images"] == [jpeg(color="red")] and r1["images"] == [jpeg(color="red"), jpeg(color="blue")]
    assert r0["id"] == row_id("sft", r0["messages"], r0["images"])
    assert json.loads(r0["meta"]) == {"id": "r0"}
    assert json.loads(r0["messages"])[0]["content"][1]["text"] == "Colour? /no_think"
    assert "chat.json#3" in got[3]["reject_detail"] and "gone.jpg" in got[3]["reject_detail"]
    assert got[3]["messages"] is not None  # the conversation is kept with its reject
    assert (
        "chat.json#4" in got[4]["reject_detail"]
        and "starts with an assistant turn" in got[4]["reject_detail"]
    )


def test_sharegpt_jsonl_malformed_lines_and_unreadable_json(tmp_path):
    good = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
    (tmp_path / "a.jsonl").write_text(
        json.dumps(good) + "\n" + '{"messages": [{"role"\n' + json.dumps(good) + "\n"
    )
    (tmp_path / "b.json").write_text('[{"messages": ')
    got = read(
        SourceSpec(
            name="c",
            format="sharegpt",
            modality="sft",
            paths=[str(tmp_path / "a.jsonl"), str(tmp_path / "b.json")],
        )
    )
    assert [(r["source_offset"], r["reject_reason"]) for r in got] == [
        (0, None),
        (1, "malformed_row"),
        (2, None),
        (0, "unreadable_file"),
    ]
    assert got[0]["id"] == got[2]["id"]  # content-derived: the same conversation twice has one id


def test_qa_parquet_and_jsonl_with_field_overrides(tmp_path):
    fields = {"question": "prompt", "answer": "response", "reasoning": "cot", "image": "img", "mode": "kind"}
    table = pa.table(
        {
            "prompt": ["What colour?", "Sum of 2 and 3?", "Which shape?"],
            "response": ["Red.", "5", "A circle."],
            "cot": [None, "2 + 3 = 5.", None],
            "img": [{"bytes": jpeg(), "path": "x.jpg"}, None, {"bytes": jpeg(color="blue"), "path": None}],
            "kind": [None, None, "thinking"],
            "source_id": ["a", "b", "c"],
        }
    )
    pq.write_table(table, tmp_path / "t.parquet")
    (tmp_path / "i.jpg").write_bytes(jpeg(color="green"))
    (tmp_path / "t.jsonl").write_text(
        json.dumps({"prompt": "Colour?", "response": "Green.", "img": "i.jpg"}) + "\n"
    )
    spec = SourceSpec(
        name="q",
        format="qa",
        modality="sft",
        fields=fields,
        paths=[str(tmp_path / "t.parquet"), str(tmp_path / "t.jsonl")],
    )
    got = read(spec)
    assert [r["mode"] for r in got] == ["non_thinking", "thinking", "thinking", "non_thinking"]
    assert (
        got[0]["images"] == [jpeg()]
        and got[1]["images"] is None
        and got[3]["images"] == [jpeg(color="green")]
    )
    assert json.loads(got[1]["messages"])[1]["content"] == "<think>2 + 3 = 5.</think>\n\n5"
    assert json.loads(got[0]["meta"]) == {"source_id": "a"}
    assert all(r["reject_reason"] is None for r in got[:2] + got[3:])
    # mode thinking without reasoning converts; the validator is what rejects it
    assert chat.validate(got[2]["messages"], got[2]["mode"], 1)[0] == "missing_think"


def test_qa_video_rows_carry_keyframes(tmp_path):
    from curation.sample.video import make_video

    (tmp_path / "v").mkdir()
    (tmp_path / "v" / "a.mp4").write_bytes(make_video(0, 1, seconds=3.0))
    rows = [
        {"question": "What moves?", "answer": "A square.", "video": "a.mp4"},
        {"question": "What moves?", "answer": "?", "video": "gone.mp4"},
    ]
    (tmp_path / "q.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    got = read(
        SourceSpec(
            name="v",
            format="qa",
            modality="sft",
            paths=[str(tmp_path / "q.jsonl")],
            fields={"image_root": "v"},
        )
    )
    a, b = got
    assert a["mode"] == "video" and len(a["frames"]) >= 3 and a["video"] == str(tmp_path / "v" / "a.mp4")
    assert a["id"] == row_id("sft", a["messages"], a["frames"])  # no images: the frames follow
    assert chat.validate(a["messages"], "video", 0, len(a["frames"])) is None
    assert b["reject_reason"] == "missing_video_file" and "gone.mp4" in b["reject_detail"]


def test_recipe_checks_sft_sources(tmp_path):
    (tmp_path / "x.jsonl").write_text("{}\n")
    p = str(tmp_path / "x.jsonl")

    def problems(**source):
        raw = {
            "sources": [{"name": "s", "paths": [p], **source}],
            "stages": [],
            "output": {"path": str(tmp_path)},
        }
        with pytest.raises(RecipeError) as e:
            pipeline_from_dict(raw)
        return str(e.value)

    assert "use modality: sft" in problems(format="sharegpt", modality="image_text")
    assert "modality sft is read with format sharegpt or qa" in problems(format="jsonl", modality="sft")
    assert "sources.0.mode: 'fast'" in problems(format="qa", modality="sft", mode="fast")
    assert "fields.prompt: unknown field for format sharegpt" in problems(
        format="sharegpt", modality="sft", fields={"prompt": "q"}
    )
    ok = pipeline_from_dict(
        {
            "sources": [
                {
                    "name": "s",
                    "paths": [p],
                    "format": "qa",
                    "modality": "sft",
                    "mode": "video",
                    "fields": {"question": "q", "image_root": "imgs"},
                }
            ],
            "stages": [{"sft_validate": {}}],
            "output": {"path": str(tmp_path)},
        }
    )
    assert ok.sources[0].mode == "video"
