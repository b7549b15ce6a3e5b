"""ocr_qa: OCR lines become grounded question-answer conversations in the SFT row format."""

from __future__ import annotations

import ast
import json

import pyarrow as pa
import pytest

from curation.filters import registry
from curation.schema import from_rows
from curation.target.chat import mode_suffix
from tests.helpers import ROOT

REG = registry()
JPEG = b"\xff\xd8\xff\xe0 not decoded by this stage"


def line(text: str, x0: int, y0: int, x1: int, y1: int, conf: float = 0.99) -> dict:
    return {"text": text, "box": [[x0, y0], [x1, y0], [x1, y1], [x0, y1]], "confidence": conf}


def batch(*ocr_lines, modality="image_text") -> pa.Table:
    rows = [
        {
            "id": f"{i:032x}",
            "modality": modality,
            "image": JPEG,
            "text": "a sign",
            "source_uri": "mem",
            "source_offset": i,
        }
        for i in range(len(ocr_lines))
    ]
    table = from_rows(rows)
    values = [lines if isinstance(lines, str) or lines is None else json.dumps(lines) for lines in ocr_lines]
    return table.append_column("ocr_lines", pa.array(values, pa.string()))


def conversation(table: pa.Table, i: int = 0) -> list[dict]:
    return json.loads(table["messages"][i].as_py())


def qa_pairs(messages: list[dict]) -> dict[str, str]:
    out = {}
    for user, assistant in zip(messages[::2], messages[1::2]):
        content = user["content"]
        q = content if isinstance(content, str) else next(p["text"] for p in content if p["type"] == "text")
        out[q.replace(" /no_think", "")] = assistant["content"]
    return out


def test_lines_become_a_grounded_conversation():
    lines = [
        line("OPEN DAILY", 10, 10, 210, 40),
        line("Fresh bread 7am", 10, 60, 310, 90),
        line("blurry", 10, 100, 60, 110, conf=0.3),
    ]
    out = REG["ocr_qa"]()(batch(lines))
    row = out.to_pylist()[0]
    assert row["modality"] == "sft" and row["mode"] == "non_thinking" and row["reject_reason"] is None
    assert row["images"] == [JPEG] and row["image"] is None and row["id"] != f"{0:032x}"
    assert json.loads(row["meta"])["ocr_qa_from"] == f"{0:032x}"
    messages = conversation(out)
    assert messages[0]["content"][0] == {"type": "image", "index": 0}
    assert mode_suffix(messages[-2]["content"]) == "/no_think"
    qa = qa_pairs(messages)
    assert qa["How many lines of text are in the image?"] == "2 lines."  # the unsure line is left out
    assert qa["Read all the text in the image, line by line."] == "OPEN DAILY\nFresh bread 7am"
    region = next(q for q in qa if q.startswith("What text is in the region"))
    box = ast.literal_eval(region[len("What text is in the region ") : -1])
    assert (box, qa[region]) in (([10, 10, 210, 40], "OPEN DAILY"), ([10, 60, 310, 90], "Fresh bread 7am"))
    where = next(q for q in qa if q.startswith("Where is the word"))
    word = where.split('"')[1]
    x0, y0, x1, y1 = ast.literal_eval(qa[where])
    host = next(ln for ln in lines[:2] if word in ln["text"])
    hb = [host["box"][0][0], host["box"][0][1], host["box"][2][0], host["box"][2][1]]
    assert hb[0] <= x0 < x1 <= hb[2] and (y0, y1) == (hb[1], hb[3])
    # the same row gives the same conversation
    assert REG["ocr_qa"]()(batch(lines))["messages"].to_pylist() == out["messages"].to_pylist()


def test_task_choice_and_bad_rows():
    lines = [line("EXIT", 0, 0, 40, 20)]
    only = REG["ocr_qa"](tasks=["count_lines"])(batch(lines))
    assert qa_pairs(conversation(only)) == {"How many lines of text are in the image?": "1 line."}
    out = REG["ocr_qa"]()(batch([], [line("??", 0, 0, 5, 5, conf=0.1)], "{not json", lines))
    assert out["reject_reason"].to_pylist() == [
        "no_confident_text",
        "no_confident_text",
        "bad_ocr_lines",
        None,
    ]
    assert out["reject_stage"].to_pylist()[:3] == ["ocr_qa"] * 3
    with pytest.raises(ValueError, match="tasks: expected some of"):
        REG["ocr_qa"](tasks=["translate"])
    with pytest.raises(ValueError, match="put an 'ocr' stage before it"):
        REG["ocr_qa"]()(from_rows([{"id": "x", "modality": "image_text", "image": JPEG}]))


def test_real_ocr_then_ocr_qa_gives_rows_the_cold_start_validator_accepts():
    pytest.importorskip("rapidocr", reason="pip install 'keye-curation[ocr]'")
    from tests.helpers.ocr import render

    ocr = REG["ocr"]()
    ocr.setup()
    image = render(["OPEN DAILY", "Fresh bread"], "sans", 32)
    table = ocr(
        from_rows(
            [
                {
                    "id": "a" * 32,
                    "modality": "image_text",
                    "image": image,
                    "source_uri": "mem",
                    "source_offset": 0,
                }
            ]
        )
    )
    out = REG["ocr_qa"]()(table)
    assert out["reject_reason"][0].as_py() is None, out["reject_detail"][0].as_py()
    qa = qa_pairs(conversation(out))
    assert qa["Read all the text in the image, line by line."].split("\n") == ["OPEN DAILY", "Fresh bread"]
    checked = REG["sft_validate"]()(out)
    assert checked["reject_reason"][0].as_py() is None, checked["reject_detail"][0].as_py()


def test_shipped_pipeline_is_valid():
    from curation.recipe import load_pipeline

    recipe = load_pipeline(ROOT / "pipelines" / "ocr_qa.yaml", check_paths=False)
    assert [s.name for s in recipe.stages][-2:] == ["ocr_qa", "exact_dedup"]
