"""Benchmark registries: validation like recipes, items from Parquet and JSONL, broken rows skipped and
named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from curation.dedup.registry import load_benchmarks, read_items
from curation.spec import RecipeError
from tests.helpers import ROOT


@pytest.fixture
def corpus(sample_corpus: Path) -> Path:
    return sample_corpus


def test_shipped_registry_covers_the_sample_benchmarks(corpus):
    vqa, qa, video = load_benchmarks(ROOT / "pipelines" / "benchmarks.yaml", [f"vars.corpus={corpus}"])
    expected = json.loads((corpus / "corpus.json").read_text())["benchmark"]["items"]
    items = list(read_items(vqa))
    assert len(items) == expected >= 20
    first = items[0]
    assert (
        first.benchmark == "sample_vqa"
        and first.item_id.startswith("vqa-")
        and first.key == f"sample_vqa:{first.item_id}"
    )
    assert first.images and first.images[0][:4] == b"\x89PNG"
    assert first.question in first.segments and first.answer in first.options and len(first.options) >= 2
    text_items = list(read_items(qa))
    assert len(text_items) == expected and not text_items[0].images
    # MMLU-style answers are letters into the choices: matching uses the option text
    raw = json.loads((corpus / "benchmark" / "qa.jsonl").read_text().splitlines()[0])
    assert text_items[0].answer == raw["choices"]["ABCD".index(raw["answer"])]
    assert text_items[0].segments == [raw["question"], *raw["choices"]]
    clips = list(read_items(video))
    assert clips and all(c.video and c.video.endswith(".mp4") and Path(c.video).is_file() for c in clips)


def test_jsonl_with_image_paths_gives_the_same_items(corpus, tmp_path):
    reg = tmp_path / "r.yaml"
    reg.write_text(f"""benchmarks:
  - {{name: pq, paths: ["{corpus}/benchmark/vqa.parquet"],
     fields: {{id: item_id, question: question, options: options, answer: answer, image: image}}}}
  - {{name: js, paths: ["{corpus}/benchmark/vqa.jsonl"],
     fields: {{id: item_id, question: question, options: options, answer: answer, image: image}}}}
""")
    a, b = (list(read_items(s)) for s in load_benchmarks(reg))
    assert [(x.item_id, x.text, x.images) for x in a] == [(x.item_id, x.text, x.images) for x in b]


def test_registry_errors_name_file_and_key(tmp_path):
    reg = tmp_path / "bad.yaml"
    reg.write_text("""benchmarks:
  - {name: a, paths: ["/nowhere/*.parquet"], fields: {id: id, question: q, imagez: img}}
  - {name: a, paths: [], fields: {question: q}, format: csv}
extra: 1
""")
    with pytest.raises(RecipeError) as info:
        load_benchmarks(reg)
    text = str(info.value)
    assert str(reg) in text
    for expected in (
        "benchmarks.0.paths.0: no file matches '/nowhere/*.parquet'",
        "benchmarks.0.fields.imagez: unknown role",
        "benchmarks.1.name: 'a' is used twice",
        "benchmarks.1.fields.id: required",
        "benchmarks.1.format: 'csv'",
        "extra: unknown key",
    ):
        assert expected in text, expected


def test_broken_rows_are_skipped_and_reported(tmp_path):
    (tmp_path / "b.jsonl").write_text(
        '{"id": "1", "question": "What is shown?"}\n'
        '{"id": "2"}\n'
        "not json\n"
        '{"id": "4", "question": "Which colour?", "image": "missing.png"}\n'
    )
    reg = tmp_path / "r.yaml"
    reg.write_text(
        f'benchmarks: [{{name: b, paths: ["{tmp_path}/b.jsonl"], '
        f"fields: {{id: id, question: question, image: image}}}}]\n"
    )
    problems: list = []
    items = list(read_items(load_benchmarks(reg)[0], problems))
    # item 4 keeps its text; its image is listed as not indexed, naming the file it looked for
    assert [i.item_id for i in items] == ["1", "4"] and items[1].images == []
    text = [str(p) for p in problems]
    assert len(text) == 3, text
    assert any("b.jsonl#1" in p and "no question" in p for p in text)
    assert any("b.jsonl#2" in p and "not a JSON object" in p for p in text)
    assert any(p.startswith("b: 4: image 0 not indexed: file not found") and "missing.png" in p for p in text)
