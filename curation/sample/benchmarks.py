"""The benchmarks of the sample corpus, and their copies leaked into it (``benchmark_copy`` dirt).

Three small benchmarks: VQA (a drawn scene with a colour, count or sign question), text QA
(MMLU-style multiple choice, 25-45 word questions built from many slots) and video QA. Items are pure
functions of ``(seed, index)``, so corpus shards plant copies (:func:`plant_image`,
:func:`_render_qa`, a re-encoded video) without reading the benchmark files, and decontamination can
be scored against ``truth.parquet``. Templates and slot values come from ``benchmarks.json``.

    >>> item = bench_item(0, 1)
    >>> item["question"], item["answer"]
    ('What is written on the sign?', 'KEEP OUT')
"""

from __future__ import annotations

import functools
import io
import json
import random
import re
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageEnhance

from curation.sample.captions import _plural
from curation.sample.plan import CorpusSpec
from curation.sample.scenes import (
    COLOUR_NAMES,
    SHAPES,
    SIGN_PHRASES,
    _pick_size,
    _scaled,
    draw_scene,
    encode_image,
    make_shape_scene,
    make_sign_scene,
)
from curation.sample.seeding import _rng
from curation.sample.truth import ShardResult
from curation.sample.video import make_video
from curation.sample.vocabulary import load

_VOCAB = load("benchmarks")
_QA_SLOTS: dict[str, tuple[str, ...]] = _VOCAB["qa_slots"]
# [a|b|c] picks one alternative: items from one template then share only short fixed spans, so an item's
# 5-grams are mostly its own and a copy of one item does not look like a copy of its template siblings.
_QA_TEMPLATES = tuple((t["template"], t["answer"]) for t in _VOCAB["qa_templates"])
_QA_EDITS: dict[str, str] = _VOCAB["qa_edits"]
_VIDEO_QUESTIONS = tuple((q["question"], q["options"]) for q in _VOCAB["video_questions"])  # right one first

BENCH_SCHEMA = pa.schema(
    [
        ("item_id", pa.string()),
        ("question", pa.string()),
        ("answer", pa.string()),
        ("options", pa.list_(pa.string())),
        ("image", pa.binary()),
    ]
)


# --------------------------------------------------------------------------------------------
# VQA
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=128)
def bench_item(seed: int, idx: int) -> dict:
    """One VQA item: a scene drawn like corpus images and a question with its answer.

    Pure function of (seed, idx) so that corpus shards can plant copies of benchmark images
    (``benchmark_copy`` dirt) without reading the benchmark files.
    """
    rng = _rng(seed, "benchmark", idx)
    qtype = ("colour", "word", "count")[idx % 3]
    target = rng.choice(SHAPES)
    others = rng.sample([s for s in SHAPES if s != target], rng.randint(0, 2))
    if qtype == "colour":
        colour = rng.choice(COLOUR_NAMES)
        groups = [(target, colour, 1)] + [(s, rng.choice(COLOUR_NAMES), 1) for s in others]
        scene = make_shape_scene(rng, groups)
        question, answer = f"What colour is the {target}?", colour
        options = [colour, *rng.sample([c for c in COLOUR_NAMES if c != colour], 3)]
    elif qtype == "count":
        n = rng.randint(1, 5)
        groups = [(target, rng.choice(COLOUR_NAMES), n)]
        groups += [(s, rng.choice(COLOUR_NAMES), 1) for s in others[: 5 - n]]
        scene = make_shape_scene(rng, groups)
        question, answer = f"How many {_plural(target)} are there?", str(n)
        options = [answer, *rng.sample([str(k) for k in range(1, 7) if k != n], 3)]
    else:
        scene = make_sign_scene(rng)
        answer = scene["phrase"]
        question = f"What {'is' if ' ' in answer else 'word is'} written on the sign?"
        options = [answer, *rng.sample([p for p in SIGN_PHRASES if p != answer], 3)]
    rng.shuffle(options)
    w, h = _pick_size(rng)
    w, h = max(w, 128), max(h, 128)
    return {
        "item_id": f"vqa-{idx + 1:04d}",
        "question": question,
        "answer": answer,
        "options": options,
        "image": encode_image(draw_scene(scene, w, h), "png"),
        "qtype": qtype,
        "subject": target,
    }


def plant_image(data: bytes, rng: random.Random) -> tuple[bytes, str, int, int]:
    """A benchmark image as it leaks into a crawl: cropped, brightened, resized and re-encoded.

    Crop: up to 10% of the width and of the height removed in total, split at random between the two
    sides (left 3% + right 7%, say); half of the copies are not cropped. Brightness x0.75-1.25 on
    half of them; resized x0.75-1.3 on 70%; then JPEG at quality 60-95 (or PNG for 30% of the resized
    ones): never the benchmark's own bytes. Returns (bytes, format, width, height).
    """
    img = Image.open(io.BytesIO(data)).convert("RGB")
    if rng.random() < 0.5:
        cut_w, cut_h = rng.uniform(0, 0.10) * img.width, rng.uniform(0, 0.10) * img.height
        left, top = rng.uniform(0, cut_w), rng.uniform(0, cut_h)
        img = img.crop(
            (round(left), round(top), round(img.width - (cut_w - left)), round(img.height - (cut_h - top)))
        )
    if rng.random() < 0.5:
        img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.75, 1.25))
    resized = rng.random() < 0.7
    if resized:
        img = _scaled(img, rng.uniform(0.75, 1.3))
    fmt = "png" if resized and rng.random() < 0.3 else "jpeg"
    return encode_image(img, fmt, rng.choice((60, 70, 80, 90, 95))), fmt, img.width, img.height


def _bench_statement(item: dict, rng: random.Random) -> str:
    """The item's question and answer reworded as a caption (what leaks into web crawls)."""
    a, s = item["answer"], item["subject"]
    if item["qtype"] == "colour":
        return rng.choice((f"The {s} in this picture is {a}.", f"In this image, the {s} is coloured {a}."))
    if item["qtype"] == "count":
        noun = s if a == "1" else _plural(s)
        verb = "is" if a == "1" else "are"
        return rng.choice((f"There {verb} {a} {noun} in this picture.", f"This image shows {a} {noun}."))
    return rng.choice((f"The sign says '{a}'.", f"A sign with the text '{a}' on it."))


# --------------------------------------------------------------------------------------------
# Text QA
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def bench_qa_item(seed: int, idx: int) -> dict:
    """One text-only multiple-choice item (MMLU-style export: id, question, choices, answer letter).

    Questions are 25-45 words built from many slots, so two items share few 5-grams even when they
    come from the same template. Pure function of (seed, idx), like :func:`bench_item`.
    """
    rng = _rng(seed, "benchmark-qa", idx)
    template, kind = _QA_TEMPLATES[idx % len(_QA_TEMPLATES)]
    values: dict[str, str] = {}

    def pick(name: str) -> str:
        base = name.rstrip("0123456789")
        used = {v for k, v in values.items() if k.rstrip("0123456789") == base}
        return rng.choice([v for v in _QA_SLOTS[base] if v not in used])

    def repl(m: re.Match) -> str:
        name = m.group(1)
        if name not in values:
            if name in ("h1",):
                values[name] = str(rng.randint(5, 20))
            elif name in ("m1",):
                values[name] = f"{rng.randrange(0, 60, 5):02d}"
            elif name == "year":
                values[name] = str(rng.randint(1650, 1990))
            elif name[0] == "n" and name[1:].isdigit():
                values[name] = str(rng.randint(3, 480))
            else:
                values[name] = pick(name)
        return values[name]

    template = re.sub(r"\[([^\]]*)\]", lambda m: rng.choice(m.group(1).split("|")), template)
    question = re.sub(r"\{(\w+)\}", repl, template)
    question = question[0].upper() + question[1:]
    if kind == "time":
        pool = [f"{rng.randint(6, 23)}:{rng.randrange(0, 60, 5):02d}" for _ in range(12)]
    elif kind == "money":
        pool = [f"{rng.randint(10, 9000)} {values['currency']}" for _ in range(12)]
    elif kind in ("number", "years"):
        pool = [f"{rng.randint(2, 900)}{' years' if kind == 'years' else ''}" for _ in range(12)]
    elif kind == "factor":
        pool = list(_QA_SLOTS["factor"])
    elif kind == "reason":
        pool = list(_QA_SLOTS["reason"])
    else:
        pool = list(_QA_SLOTS["name"])
    choices = rng.sample(sorted(set(pool)), 4)
    answer = rng.randrange(4)
    return {"id": f"qa-{idx + 1:04d}", "question": question, "choices": choices, "answer": "ABCD"[answer]}


def _render_qa(item: dict, rng: random.Random) -> str:
    """A benchmark item as it shows up on the web: labelled, maybe re-cased, re-wrapped or lightly edited."""
    question = item["question"]
    if rng.random() < 0.3:  # one or two words changed: a paraphrased leak
        words = question.split(" ")
        spots = [k for k, w in enumerate(words) if w.lower() in _QA_EDITS]
        for k in rng.sample(spots, min(len(spots), rng.randint(1, 2))):
            words[k] = _QA_EDITS[words[k].lower()]
        question = " ".join(words)
    style = rng.randrange(3)
    letters = "ABCD"
    if style == 0:
        opts = "\n".join(f"{letters[k]}) {c}" for k, c in enumerate(item["choices"]))
        text = f"Question: {question}\n{opts}\nAnswer: {item['answer']}"
    elif style == 1:
        opts = "  ".join(f"({letters[k].lower()}) {c}" for k, c in enumerate(item["choices"]))
        text = f"Q{rng.randint(1, 40)}. {question} {opts}"
    else:
        text = f"{question}\nThe correct answer is {item['choices'][letters.index(item['answer'])]}."
    if rng.random() < 0.3:
        text = text.upper() if rng.random() < 0.5 else text.lower()
    if rng.random() < 0.4:  # re-wrapped at another width, as a PDF or forum quote does
        text = "\n".join(textwrap.wrap(text, width=rng.randint(24, 70)))
    return text


# --------------------------------------------------------------------------------------------
# Benchmark files (VQA and text QA; video QA: a JSONL of questions with mp4 files)
# --------------------------------------------------------------------------------------------


def write_benchmark(out: Path, spec: CorpusSpec, shard: int = 0) -> ShardResult:
    """The VQA benchmark as Parquet (PNG bytes inline) and as a JSONL twin with PNG files; the text QA
    benchmark as JSONL (MMLU-style: id, question, choices, answer letter)."""
    res = ShardResult(
        "benchmark", 0, 0, files=["benchmark/vqa.parquet", "benchmark/vqa.jsonl", "benchmark/qa.jsonl"]
    )
    with open(out / "benchmark/qa.jsonl", "w", encoding="utf-8") as f:
        f.writelines(
            json.dumps(bench_qa_item(spec.seed, k), ensure_ascii=False) + "\n"
            for k in range(spec.bench_items)
        )
    parquet = pq.ParquetWriter(out / "benchmark/vqa.parquet", BENCH_SCHEMA, write_statistics=["item_id"])
    with parquet as writer, open(out / "benchmark/vqa.jsonl", "w", encoding="utf-8") as f:
        for start in range(0, spec.bench_items, 100):
            items = [bench_item(spec.seed, k) for k in range(start, min(spec.bench_items, start + 100))]
            writer.write_table(
                pa.table(
                    {name: [it[name] for it in items] for name in BENCH_SCHEMA.names}, schema=BENCH_SCHEMA
                )
            )
            for it in items:
                image_rel = f"images/{it['item_id']}.png"
                (out / "benchmark" / image_rel).write_bytes(it["image"])
                record = {k: it[k] for k in ("item_id", "question", "answer", "options")}
                f.write(json.dumps({**record, "image": image_rel}, ensure_ascii=False) + "\n")
            res.images += len(items)
    return res


def bench_video(seed: int, k: int) -> bytes:
    """Benchmark video ``k`` (its own index range, so corpus videos never equal it by construction)."""
    return make_video(seed, 1_000_000 + k)


def write_benchmark_videos(out: Path, spec: CorpusSpec, shard: int = 0) -> ShardResult:
    """A video QA benchmark: JSONL (id, question, options, answer, video path) with mp4 files beside it."""
    res = ShardResult("benchmark_video", 0, 0, files=["benchmark/video_qa.jsonl"])
    with open(out / "benchmark/video_qa.jsonl", "w", encoding="utf-8") as f:
        for k in range(spec.bench_videos):
            rng = _rng(spec.seed, "benchmark-video", k)
            question, options = _VIDEO_QUESTIONS[k % len(_VIDEO_QUESTIONS)]
            rel = f"videos/vid-{k + 1:04d}.mp4"
            (out / "benchmark" / rel).write_bytes(bench_video(spec.seed, k))
            f.write(
                json.dumps(
                    {
                        "id": f"vid-{k + 1:04d}",
                        "question": question,
                        "options": rng.sample(options, len(options)),
                        "answer": options[0],
                        "video": rel,
                    }
                )
                + "\n"
            )
    return res
