"""Per-mode validators of cold-start conversations (curation.target.chat) and the sft_validate stage
(filters/sft.py)."""

from __future__ import annotations

import json

import pytest

from curation.schema import from_rows
from curation.target import chat

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


@pytest.mark.parametrize("mode", chat.MODES)
def test_each_mode_has_a_good_example(mode):
    messages, n_images, n_frames = GOOD[mode]
    assert chat.validate(_json(messages), mode, n_images, n_frames) is None


@pytest.mark.parametrize(
    "mode, messages, n_images, n_frames, reason", BAD, ids=[f"{b[0]}-{b[4]}" for b in BAD]
)
def test_each_rule_rejects_with_its_reason(mode, messages, n_images, n_frames, reason):
    got = chat.validate(_json(messages), mode, n_images, n_frames)
    assert got is not None and got[0] == reason, got
    assert got[1]  # a detail that says what is wrong


def test_repetition_measures():
    prose = (
        "The red square sits to the left of a small blue circle, and below both of them a green triangle "
        "points up towards a yellow star drawn near the top edge of the picture."
    )
    assert chat.repetition(prose)[0] == 0.0 and chat.repetition(LOOP)[0] > 0.8
    assert chat.compression_ratio(prose * 1) > 0.3 and chat.compression_ratio("ha" * 300) < 0.05
    # code blocks are left out: repeated lines of code are not a loop
    code = "```python\n" + "draw.point((1, 1), fill=0)\n" * 40 + "```"
    assert (
        chat.validate(
            _json([u("x", IMG), a("<think>plot</think>\n\n" + code), TOOL, a("Done.")]), "think_with_image", 2
        )
        is None
    )


def test_sft_validate_stage_rejects_and_scores_only_sft_rows():
    from curation.filters.sft import SftValidate

    cases = [(mode, *GOOD[mode], None) for mode in chat.MODES] + [tuple(b) for b in BAD]
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
