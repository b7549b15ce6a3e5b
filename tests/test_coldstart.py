"""Cold-start SFT: converters (sharegpt, qa), per-mode validators (sft_validate), the sample's cold-start
sources and pipelines/coldstart.yaml checked row by row against sft/truth.parquet."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import jpeg

from curation.io.readers import plan_units, read_unit
from curation.mix import coldstart as cs
from curation.recipe import RecipeError, SourceSpec, load_pipeline, pipeline_from_dict
from curation.schema import ROW_SCHEMA, from_rows, row_id

ROOT = Path(__file__).resolve().parent.parent
SHAREGPT = cs.SOURCE_FIELDS["sharegpt"]
QA = cs.SOURCE_FIELDS["qa"]


def read(spec: SourceSpec) -> list[dict]:
    out = []
    for unit in plan_units([spec]):
        for t in read_unit(unit, batch_rows=4):
            assert t.schema == ROW_SCHEMA
            out += t.to_pylist()
    return out


def user_parts(conv: cs.Converted) -> list:
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
    conv = cs.from_conversation(rec, SHAREGPT)
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
    conv = cs.from_conversation(rec, SHAREGPT)
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
    conv = cs.from_conversation(rec, SHAREGPT)
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
    conv = cs.from_conversation(rec, SHAREGPT)
    assert conv.messages[0] == {"role": "system", "content": "Be brief."}
    assert user_parts(conv) == [
        {"type": "image", "index": 0},
        {"type": "text", "text": "And this one?"},
        {"type": "image", "index": 1},
    ]
    assert conv.images[0] == "x.jpg" and cs.image_bytes(conv.images[1]) == jpeg()
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
    conv = cs.from_qa(record, QA)
    assert conv.mode == mode
    assert conv.messages[1]["content"] == reply
    want_suffix = {"thinking": " /think", "non_thinking": " /no_think"}.get(mode, "")
    assert cs.last_user_text(conv.messages).endswith(record["question"] + want_suffix)
    if mode == "think_with_image":  # pre-execution form: code turn, then the answer
        assert [m["role"] for m in conv.messages] == ["user", "assistant", "assistant"]
        assert conv.messages[2]["content"] == "K7" and user_parts(conv)[0] == {"type": "image", "index": 0}


def test_source_default_mode_and_suffix_is_never_added_twice():
    conv = cs.from_qa({"question": "Why? /think", "answer": "Because.", "reasoning": "r"}, QA)
    assert cs.last_user_text(conv.messages) == "Why? /think"
    conv = cs.from_qa(
        {"question": "Why?", "answer": "Because.", "reasoning": "r"}, QA, default_mode="thinking"
    )
    assert conv.mode == "thinking"
    assert (
        cs.from_qa({"question": "Why?", "answer": "x", "mode": "non_thinking"}, QA, "thinking").mode
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
    fn = cs.from_conversation if convert == "conv" else cs.from_qa
    with pytest.raises(cs.ConversionError) as e:
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
    assert cs.validate(got[2]["messages"], got[2]["mode"], 1)[0] == "missing_think"


def test_qa_video_rows_carry_keyframes(tmp_path):
    from curation.sample_video import make_video

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
    assert cs.validate(a["messages"], "video", 0, len(a["frames"])) is None
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


# ---------------------------------------------------------------- validators

IMG = {"type": "image", "index": 0}


def u(text, *parts):
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}] if parts else text}


def a(text):
    return {"role": "assistant", "content": text}


CODE = "<think>Zoom in.</think>\n\n```python\nresult = image.crop((0, 0, 8, 8))\n```"
TOOL = {"role": "tool", "content": [{"type": "image", "index": 1}]}
LOOP = "I will check the picture again to be sure of it. " * 12
GOOD = {
    "thinking": ([u("Why? /think"), a("<think>Because r.</think>\n\nR.")], 0, 0),
    "non_thinking": ([u("Why? /no_think"), a("R.")], 0, 0),
    "auto_think": ([u("Why?"), a("<analysis>Simple.</analysis>\n\nR.")], 0, 0),
    "think_with_image": ([u("Label?", IMG), a(CODE), TOOL, a("K7.")], 2, 0),
    "video": ([u("What moves?", {"type": "video"}), a("A square.")], 0, 4),
}
# (mode, messages, n_images, n_frames, reason): one rejected example per rule of each mode
BAD = [
    ("thinking", "not json", 0, 0, "bad_messages"),
    ("thinking", [u("Why? /think")], 0, 0, "bad_messages"),
    ("thinking", [{"role": "robot", "content": "x"}, a("y")], 0, 0, "bad_messages"),
    ("thinking", [u("Why? /think", IMG), a("<think>r</think>\n\nR.")], 0, 0, "image_ref_out_of_range"),
    ("thinking", [u("Why? /think"), a("<think>r\n\nR.")], 0, 0, "unbalanced_think_tags"),
    ("thinking", [u("Why? /no_think"), a("<think>r</think>\n\nR.")], 0, 0, "mode_suffix_mismatch"),
    ("thinking", [u("Why? /think"), a("R.")], 0, 0, "missing_think"),
    ("thinking", [u("Why? /think"), a("<think>r</think>\n\n")], 0, 0, "empty_answer"),
    ("thinking", [u("Why? /think"), a(f"<think>{LOOP}</think>\n\nR.")], 0, 0, "degenerate_repetition"),
    ("non_thinking", [u("Why?"), a("R.")], 0, 0, "mode_suffix_mismatch"),
    ("non_thinking", [u("Why? /no_think"), a("<think>r</think>\n\nR.")], 0, 0, "unexpected_think"),
    ("non_thinking", [u("Why? /no_think"), a("  ")], 0, 0, "empty_answer"),
    ("non_thinking", [u("Why? /no_think"), a("!" * 400)], 0, 0, "degenerate_repetition"),
    ("non_thinking", [u("Why? /no_think"), a("R.</think>")], 0, 0, "unbalanced_think_tags"),
    ("auto_think", [u("Why? /think"), a("<analysis>s</analysis>\n\nR.")], 0, 0, "mode_suffix_mismatch"),
    ("auto_think", [u("Why?"), a("<think>r</think>\n\nR.")], 0, 0, "missing_analysis"),
    ("auto_think", [u("Why?"), a("<analysis>s<think>r</think></analysis>R.")], 0, 0, "unbalanced_think_tags"),
    ("auto_think", [u("Why?"), a("<analysis>s</analysis>")], 0, 0, "empty_answer"),
    ("think_with_image", [u("Label?"), a(CODE), TOOL, a("K7.")], 2, 0, "no_input_image"),
    ("think_with_image", [u("Label?", IMG), a("<think>hm</think> K7.")], 1, 0, "no_code"),
    (
        "think_with_image",
        [u("Label?", IMG), a(CODE.replace("8))", "8)")), TOOL, a("K7.")],
        2,
        0,
        "code_does_not_parse",
    ),
    (
        "think_with_image",
        [u("Label?", IMG), a(CODE.split("\n\n", 1)[1]), TOOL, a("K7.")],
        2,
        0,
        "missing_think",
    ),
    ("think_with_image", [u("Label?", IMG), a(CODE), a("K7.")], 1, 0, "no_tool_turn"),
    (
        "think_with_image",
        [u("Label?", IMG), a(CODE), {"role": "tool", "content": "done"}, a("K7.")],
        1,
        0,
        "no_tool_image",
    ),
    ("think_with_image", [u("Label?", IMG), a(CODE), TOOL, a("K7.")], 1, 0, "image_ref_out_of_range"),
    ("think_with_image", [u("Label?", IMG), a(CODE), TOOL, a("")], 2, 0, "empty_answer"),
    ("video", [u("What moves?", {"type": "video"}), a("A square.")], 0, 0, "video_part_without_frames"),
    ("video", [u("What moves?"), a("A square.")], 0, 4, "no_video_part"),
    ("video", [u("What moves?", {"type": "video"}), a("<think>r</think>")], 0, 4, "empty_answer"),
    ("video", [u("What moves?", {"type": "video"}), a(LOOP)], 0, 4, "degenerate_repetition"),
    ("chatty", [u("Why?"), a("R.")], 0, 0, "unknown_mode"),
]


def _json(messages) -> str:
    return messages if isinstance(messages, str) else json.dumps(messages)


@pytest.mark.parametrize("mode", cs.MODES)
def test_each_mode_has_a_good_example(mode):
    messages, n_images, n_frames = GOOD[mode]
    assert cs.validate(_json(messages), mode, n_images, n_frames) is None


@pytest.mark.parametrize(
    "mode, messages, n_images, n_frames, reason", BAD, ids=[f"{b[0]}-{b[4]}" for b in BAD]
)
def test_each_rule_rejects_with_its_reason(mode, messages, n_images, n_frames, reason):
    got = cs.validate(_json(messages), mode, n_images, n_frames)
    assert got is not None and got[0] == reason, got
    assert got[1]  # a detail that says what is wrong


def test_repetition_measures():
    prose = (
        "The red square sits to the left of a small blue circle, and below both of them a green triangle "
        "points up towards a yellow star drawn near the top edge of the picture."
    )
    assert cs.repetition(prose)[0] == 0.0 and cs.repetition(LOOP)[0] > 0.8
    assert cs.compression_ratio(prose * 1) > 0.3 and cs.compression_ratio("ha" * 300) < 0.05
    # code blocks are left out: repeated lines of code are not a loop
    code = "```python\n" + "draw.point((1, 1), fill=0)\n" * 40 + "```"
    assert (
        cs.validate(
            _json([u("x", IMG), a("<think>plot</think>\n\n" + code), TOOL, a("Done.")]), "think_with_image", 2
        )
        is None
    )


def test_sft_validate_stage_rejects_and_scores_only_sft_rows():
    from curation.filters.sft import SftValidate

    cases = [(mode, *GOOD[mode], None) for mode in cs.MODES] + [tuple(b) for b in BAD]
    rows = [
        {
            "id": str(i),
            "modality": "sft",
            "messages": _json(m),
            "mode": mode,
            "images": [b"x"] * ni or None,
            "frames": [b"f"] * nf or None,
        }
        for i, (mode, m, ni, nf, _) in enumerate(cases)
    ]
    rows.append({"id": "t", "modality": "text", "text": "not a conversation"})
    out = SftValidate()(from_rows(rows))
    assert out["reject_reason"].to_pylist() == [c[-1] for c in cases] + [None]
    assert set(out["reject_stage"].drop_null().to_pylist()) == {"sft_validate"}
    scores = out["score_sft_validate"].to_pylist()
    assert scores[-1] is None and max(scores[:-1]) > 0.8 and scores[0] == 0.0
    # the threshold applies to the persisted score: raised, the loops pass; annotate_only keeps all
    loose = SftValidate(max_repeat=0.99, min_compression=0.0)(from_rows(rows))["reject_reason"].to_pylist()
    assert loose.count("degenerate_repetition") == 0
    assert SftValidate(annotate_only=True)(from_rows(rows))["reject_reason"].null_count == len(rows)


# ---------------------------------------------------------------- sample corpus and pipeline


@pytest.fixture(scope="module")
def coldstart(tmp_path_factory, ray_local):
    """The sample corpus (150 rows: ~90 conversations) through pipelines/coldstart.yaml; without the
    think_with_image stage when it is not registered (then no think_with_image row can pass)."""
    from curation.runner import run_pipeline
    from curation.sample import write_sample_corpus
    from curation.stage import load_registry

    tmp = tmp_path_factory.mktemp("coldstart")
    write_sample_corpus(tmp / "corpus", rows=150, seed=4, progress=False, workers=2)
    recipe_path = ROOT / "pipelines" / "coldstart.yaml"
    sandbox = "think_with_image" in load_registry()
    if not sandbox:
        raw = yaml.safe_load(recipe_path.read_text())
        raw["stages"] = [s for s in raw["stages"] if "think_with_image" not in s]
        recipe_path = tmp / "coldstart.yaml"
        recipe_path.write_text(yaml.safe_dump(raw))
    recipe = load_pipeline(recipe_path, [f"vars.corpus={tmp / 'corpus'}", f"vars.out={tmp / 'pool'}"])
    result = run_pipeline(recipe, progress=False)
    cols = ["source_uri", "source_offset", "mode", "messages", "reject_stage", "reject_reason"]
    kept = (
        pl.read_parquet(tmp / "pool" / "shards" / "*.parquet")
        .with_columns(
            pl.lit(None, pl.Utf8).alias("reject_stage"), pl.lit(None, pl.Utf8).alias("reject_reason")
        )
        .select(cols)
    )
    rejected = pl.read_parquet(tmp / "pool" / "rejects" / "*.parquet").select(cols)
    truth = pl.read_parquet(tmp / "corpus" / "sft" / "truth.parquet").with_columns(
        (pl.lit(str(tmp / "corpus") + "/") + pl.col("file")).alias("source_uri"),
        pl.col("offset").alias("source_offset"),
    )
    rows = pl.concat([kept, rejected]).with_columns(pl.lit(True).alias("seen"))
    joined = truth.join(rows, on=["source_uri", "source_offset"], how="left", suffix="_got")
    return result, joined, sandbox


def test_every_conversation_is_accounted_for_once(coldstart):
    result, joined, _ = coldstart
    assert joined.height == result.stats["rows_in"]  # no input row twice in the pool
    assert joined["seen"].null_count() == 0, joined.filter(pl.col("seen").is_null()).to_dicts()
    assert joined.filter(pl.col("messages").is_null() & pl.col("reject_stage").is_null()).height == 0


def test_rejects_match_the_truth_labels(coldstart):
    _, joined, sandbox = coldstart
    rows = joined if sandbox else joined.filter(pl.col("source") != "think_with_image")
    wrong = rows.filter(
        (pl.col("stage").fill_null("-") != pl.col("reject_stage").fill_null("-"))
        | (pl.col("reason").fill_null("-") != pl.col("reject_reason").fill_null("-"))
    )
    assert wrong.height == 0, wrong.select("source", "offset", "dirt", "reason", "reject_reason").to_dicts()
    assert rows.filter(pl.col("dirt") != "clean").height >= 20  # every kind of dirt, at least once


def test_think_with_image_rows(coldstart):
    _, joined, sandbox = coldstart
    twi = joined.filter(pl.col("source") == "think_with_image")
    ingest = twi.filter(pl.col("stage") == "ingest")
    assert ingest.height >= 2 and (ingest["reject_reason"] == ingest["reason"]).all()
    clean = twi.filter(pl.col("dirt") == "clean")
    code = twi.filter((pl.col("dirt") != "clean") & (pl.col("stage") != "ingest"))
    assert code.height >= 6  # syntax error, raises, reads a file, opens a socket, no result, loops forever
    if sandbox:  # the code ran: a tool turn with the output image follows it, and sft_validate accepts that
        assert clean["reject_reason"].null_count() == clean.height > 0
        assert all('"role": "tool"' in m for m in clean["messages"])
        assert (code["reject_stage"] == "think_with_image").all()
    else:  # nothing ran the code: the rows are still in their pre-execution form
        assert (clean["reject_reason"] == "no_tool_turn").all()
        expected = code.select(
            pl.when(pl.col("dirt") == "syntax_error")
            .then(pl.lit("code_does_not_parse"))
            .otherwise(pl.lit("no_tool_turn"))
        ).to_series()
        assert (code["reject_reason"] == expected).all(), code.to_dicts()


def test_kept_rows_per_mode(coldstart):
    _, joined, sandbox = coldstart
    kept = joined.filter(pl.col("reject_stage").is_null())
    assert (kept["mode"] == kept["mode_got"]).all()
    got = dict(kept.group_by("mode").len().iter_rows())
    clean = dict(joined.filter(pl.col("dirt") == "clean").group_by("mode").len().iter_rows())
    for mode in ("thinking", "non_thinking", "auto_think", "video"):
        assert got.get(mode) == clean[mode] > 0, (mode, got, clean)
    assert got.get("think_with_image", 0) == (clean["think_with_image"] if sandbox else 0)
    # the report's mix: more non-reasoning than reasoning, auto-think the smallest
    assert clean["non_thinking"] > clean["thinking"] > clean["think_with_image"] > clean["auto_think"]
