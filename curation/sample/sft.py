"""Cold-start SFT sources (:mod:`curation.mix.coldstart`, docs/sft-format.md): conversations in the
five modes, in the formats they come in, with labelled dirt.

Sized after the Keye-VL cold-start mix (330k non-reasoning : 230k reasoning : 20k auto-think :
100k agentic, plus video) at a fifth of ``rows`` (60..1500 rows), so a default corpus holds about a
thousand conversations: LLaVA-style JSON, OpenAI-style JSONL, a question/answer/reasoning Parquet table,
think-with-image rows (:mod:`curation.sample.sft_think_with_image`) and video QA. Written after every
other source (the video QA rows point at the video source's clips); each row draws from its own
``_rng(seed, "sft", source, row)``, so the other sources' bytes never change. Labels go to
``sft/truth.parquet``: the intended mode, the dirt, and the stage and reason that must reject the row
(null: kept).
"""

from __future__ import annotations

import functools
import json
import random
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from curation.io.video import probe
from curation.sample.captions import NUMBERS_EN, _a, _items_en, _join_en, _plural
from curation.sample.plan import SOURCE_DIR, CorpusSpec
from curation.sample.scenes import _pick_size, draw_scene, encode_image, make_scene, make_shape_scene
from curation.sample.seeding import _rng
from curation.sample.sft_think_with_image import _TWI, _twi_record
from curation.sample.truth import ShardResult
from curation.sample.video_rows import _clips
from curation.sample.vocabulary import load

SFT_SHARE = 0.2
SFT_ROWS = (60, 1500)
SFT_MODE_MIX = {"non_thinking": 330, "thinking": 230, "auto_think": 20, "think_with_image": 100, "video": 50}
SFT_SOURCES = ("llava", "sharegpt", "qa", "think_with_image", "video_qa")
SFT_FILES = {
    "llava": "sft/llava/00000.json",
    "sharegpt": "sft/sharegpt/00000.jsonl",
    "qa": "sft/qa/00000.parquet",
    "think_with_image": "sft/think_with_image/00000.jsonl",
    "video_qa": "sft/video_qa/00000.jsonl",
}
# Share of each mode's clean rows that each source holds (every mode's shares add up to 1).
SFT_SPLIT = {
    "llava": {"non_thinking": 0.6, "thinking": 0.2},
    "sharegpt": {"non_thinking": 0.15, "thinking": 0.1},
    "qa": {"non_thinking": 0.25, "thinking": 0.7, "auto_think": 1.0},
    "think_with_image": {"think_with_image": 1.0},
    "video_qa": {"video": 1.0},
}
# Dirt per source: kind -> (intended mode, stage that must reject it, reason). The code kinds are for
# the think_with_image stage (curation.synth.think_with_image), which runs the code in the sandbox.
SFT_DIRT: dict[str, dict[str, tuple[str, str, str]]] = {
    "llava": {
        "unbalanced_think": ("thinking", "sft_validate", "unbalanced_think_tags"),
        "empty_answer": ("non_thinking", "sft_validate", "empty_answer"),
        "degenerate_repetition": ("non_thinking", "sft_validate", "degenerate_repetition"),
        "placeholder_mismatch": ("non_thinking", "ingest", "placeholder_mismatch"),
        "missing_image": ("non_thinking", "ingest", "missing_image_file"),
        "bad_role_order": ("non_thinking", "ingest", "bad_role_order"),
        "unknown_mode": ("non_thinking", "ingest", "unknown_mode"),
        "suffix_mismatch": ("thinking", "ingest", "mode_suffix_mismatch"),
        "exact_duplicate": ("non_thinking", "exact_dedup", "duplicate"),
    },
    "sharegpt": {
        "image_ref_out_of_range": ("non_thinking", "sft_validate", "image_ref_out_of_range"),
        "malformed_json": ("non_thinking", "ingest", "malformed_row"),
        "unknown_role": ("non_thinking", "ingest", "unknown_role"),
        "empty_conversation": ("non_thinking", "ingest", "empty_conversation"),
    },
    "qa": {
        "empty_answer": ("thinking", "sft_validate", "empty_answer"),
        "unexpected_think": ("non_thinking", "sft_validate", "unexpected_think"),
        "missing_analysis": ("auto_think", "sft_validate", "missing_analysis"),
        "missing_think": ("thinking", "sft_validate", "missing_think"),
        "unknown_mode": ("thinking", "ingest", "unknown_mode"),
        "degenerate_repetition": ("thinking", "sft_validate", "degenerate_repetition"),
        "unbalanced_think": ("thinking", "sft_validate", "unbalanced_think_tags"),
    },
    _TWI: {
        "syntax_error": (_TWI, _TWI, "code_does_not_parse"),
        "raises": (_TWI, _TWI, "sandbox_error"),
        "reads_file": (_TWI, _TWI, "sandbox_blocked"),
        "opens_socket": (_TWI, _TWI, "sandbox_blocked"),
        "no_result": (_TWI, _TWI, "no_output_image"),
        "infinite_loop": (_TWI, _TWI, "sandbox_timeout"),  # exactly one: it costs the sandbox's whole timeout
        "missing_image": (_TWI, "ingest", "missing_image_file"),
        "malformed_json": (_TWI, "ingest", "malformed_row"),
    },
    "video_qa": {
        "missing_video": ("video", "ingest", "missing_video_file"),
        "truncated_video": (
            "video",
            "ingest",
            "unreadable_video",
        ),  # only when the corpus has a truncated clip
    },
}
SFT_DIRT_RATE = 0.03  # rows of each dirt kind per clean row of the source (at least one)
SFT_TRUTH_SCHEMA = pa.schema(
    [
        ("file", pa.string()),
        ("offset", pa.int64()),
        ("key", pa.string()),
        ("source", pa.string()),
        ("mode", pa.string()),
        ("dirt", pa.string()),
        ("stage", pa.string()),
        ("reason", pa.string()),
    ]
)
SFT_QA_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("question", pa.string()),
        ("answer", pa.string()),
        ("reasoning", pa.string()),
        ("analysis", pa.string()),
        ("image", pa.binary()),
        ("mode", pa.string()),
    ]
)

_VOCAB = load("sft")
_SYSTEM: str = _VOCAB["system"]
_LOOPS: tuple[str, ...] = _VOCAB["loops"]  # degenerate_repetition: one of them, said over and over
_EASY: tuple[str, ...] = _VOCAB["easy"]  # auto-think analyses: answer directly ...
_HARD: tuple[str, ...] = _VOCAB["hard"]  # ... or reason first
_VIDEO_QA = tuple((q["question"], q["answer"], q["reasoning"]) for q in _VOCAB["video_qa"])


@functools.lru_cache(maxsize=8)
def sft_plan(spec: CorpusSpec) -> dict[str, tuple[tuple[str, str], ...]]:
    """``(intended mode, dirt kind)`` of every row of every cold-start source; row 0 is always clean."""
    total = min(SFT_ROWS[1], max(SFT_ROWS[0], round(spec.rows * SFT_SHARE)))
    weight = sum(SFT_MODE_MIX.values())
    per_mode = {m: round(total * w / weight) for m, w in SFT_MODE_MIX.items()}
    per_mode["auto_think"] = max(3, per_mode["auto_think"])
    per_mode["video"] = min(per_mode["video"], len(_VIDEO_QA) * len(_clips(spec, "clean")))
    plan = {}
    for source in SFT_SOURCES:
        rows = [
            (mode, "clean")
            for mode, share in SFT_SPLIT[source].items()
            for _ in range(round(per_mode[mode] * share))
        ]
        n_clean = len(rows)
        for kind, (mode, _, _) in SFT_DIRT[source].items():
            if kind == "truncated_video" and not _clips(spec, "truncated_video"):
                continue
            rows += [(mode, kind)] * (
                1 if kind == "infinite_loop" else max(1, round(n_clean * SFT_DIRT_RATE))
            )
        head = rows[:1] if rows and rows[0][1] == "clean" else []
        rest = rows[len(head) :]
        _rng(spec.seed, "sft", source, "plan").shuffle(rest)
        plan[source] = tuple(head + rest)
    return plan


# --------------------------------------------------------------------------------------------
# Questions and answers
# --------------------------------------------------------------------------------------------


def _scene_qa(scene: dict, rng: random.Random) -> tuple[str, str, str]:
    """A question about a drawn scene, its answer and the reasoning that gets there from the picture."""
    kind = scene["kind"]
    if kind == "shapes":
        groups = scene["groups"]
        if scene["label"] and rng.random() < 0.3:
            phrase, ink, where = scene["label"]
            return (
                "What is written in the picture?",
                f"It says '{phrase}'.",
                f"There is text at the {where} of the image, in {ink} letters. It spells '{phrase}'.",
            )
        shape = rng.choice([s for s, _, _, _ in groups])
        same = [g for g in groups if g[0] == shape]
        n = sum(g[2] for g in same)
        if n == 1 and rng.random() < 0.5:
            colour = same[0][1]
            return (
                f"What colour is the {shape}?",
                f"The {shape} is {colour}.",
                f"There is only one {shape} in the image, and it is filled with {colour}.",
            )
        if rng.random() < 0.5:
            total = sum(g[2] for g in groups)
            counts = " + ".join(str(g[2]) for g in groups)
            answer = f"There {'is' if total == 1 else 'are'} {NUMBERS_EN[total]} in total."
            return (
                "How many shapes are there in total?",
                answer,
                f"The picture shows {_items_en(groups)}. Adding the groups up: {counts} = {total}.",
            )
        noun = shape if n == 1 else _plural(shape)
        return (
            f"How many {_plural(shape)} are there in the picture?",
            f"There {'is' if n == 1 else 'are'} {NUMBERS_EN[n]} {noun}.",
            (
                f"I look for every {shape} in the picture and find {_items_en(same)}. "
                f"That makes {NUMBERS_EN[n]}."
            ),
        )
    if kind == "sign":
        if rng.random() < 0.6:
            return (
                "What does the sign say?",
                f"The sign says '{scene['phrase']}'.",
                f"The {scene['board']} sign has {scene['ink']} letters on it that spell '{scene['phrase']}'.",
            )
        return (
            "What colour is the sign?",
            f"The sign is {scene['board']}.",
            f"The board in the middle of the picture is painted {scene['board']}, with {scene['ink']} text.",
        )
    names = [o["obj"] for o in scene["objects"]]
    car = next((o for o in scene["objects"] if o["obj"] == "car"), None)
    if car and rng.random() < 0.5:
        return (
            "What colour is the car?",
            f"The car is {car['colour']}.",
            f"The car is the object with two black wheels; its body is {car['colour']}.",
        )
    listed = _join_en([_a(n) for n in names])
    grass = " on green grass" if scene["ground"] else ""
    return (
        "Which objects can you see in this picture?",
        f"I can see {listed}.",
        f"From left to right the drawing shows {listed}{grass}.",
    )


def _text_qa(rng: random.Random, reasoned: bool) -> tuple[str, str, str]:
    """A question without an image: arithmetic, prices, time units, comparisons and number sequences.

    Every kind draws from thousands of parameter combinations, so generated rows are not accidental
    exact duplicates of each other (exact duplicates are planted on purpose, and labelled).
    """
    kind = rng.choice(
        ("add", "mul", "price", "units") if reasoned else ("add", "units", "compare", "sequence")
    )
    if kind == "add":
        a, b = rng.randint(12, 989), rng.randint(12, 989)
        tens = b // 10 * 10
        return (
            f"What is {a} + {b}?",
            f"{a + b}.",
            (
                f"First add the hundreds and tens: {a} + {tens} = {a + tens}. "
                f"Then add the remaining {b % 10} to get {a + b}."
            ),
        )
    if kind == "mul":
        a, b = rng.randint(3, 29), rng.randint(12, 999)
        tens = b // 10 * 10
        return (
            f"What is {a} x {b}?",
            f"{a * b}.",
            (
                f"Split {b} into {tens} and {b % 10}: {a} x {tens} = {a * tens} and {a} x {b % 10} = "
                f"{a * (b % 10)}. Together that is {a * b}."
            ),
        )
    if kind == "price":
        p, n = rng.randint(15, 195), rng.randint(3, 19)
        item = rng.choice(("pencil", "apple", "stamp", "ticket", "notebook", "candle"))
        return (
            f"One {item} costs {p} cents. How much do {n} of them cost?",
            f"{n * p} cents.",
            f"Each {item} costs {p} cents, so {n} of them cost {n} x {p} = {n * p} cents.",
        )
    if kind == "units":
        big, small, per = rng.choice((("hours", "minutes", 60), ("minutes", "seconds", 60)))
        a, b = rng.randint(1, 99), rng.randint(1, 59)
        return (
            f"How many {small} are there in {a} {big} and {b} {small}?",
            f"{a * per + b} {small}.",
            (
                f"Each of the {a} {big} has {per} {small}, which gives {a * per}; "
                f"adding {b} more makes {a * per + b}."
            ),
        )
    if kind == "compare":
        a, b = rng.sample(range(100, 10_000), 2)
        return (
            f"Which number is larger, {a} or {b}?",
            f"{max(a, b)}.",
            f"{max(a, b)} is larger than {min(a, b)}.",
        )
    a, d = rng.randint(1, 99), rng.randint(2, 15)
    seq = ", ".join(str(a + k * d) for k in range(4))
    return (
        f"What number comes next: {seq}?",
        f"{a + 4 * d}.",
        f"Each number is {d} more than the one before, so the next is {a + 3 * d} + {d} = {a + 4 * d}.",
    )


def _sft_image(rng: random.Random, shapes_only: bool = False) -> tuple[dict, bytes, int, int]:
    scene = make_shape_scene(rng) if shapes_only else make_scene(rng)
    w, h = _pick_size(rng)
    w, h = max(w, 160), max(h, 160)
    return scene, encode_image(draw_scene(scene, w, h), "jpeg"), w, h


def _loop(rng: random.Random) -> str:
    return " ".join([rng.choice(_LOOPS)] * rng.randint(15, 25))


def _reply(answer: str, reasoning: str | None) -> str:
    return f"<think>{reasoning}</think>\n\n{answer}" if reasoning is not None else answer


def _new_text_qa(rng: random.Random, reasoned: bool, seen: set[str]) -> tuple[str, str, str]:
    """:func:`_text_qa`, drawn again until its question is new to the source: generated rows must not be
    accidental exact duplicates (rows are written in order, so this stays deterministic)."""
    q, a, r = _text_qa(rng, reasoned)
    while q in seen:
        q, a, r = _text_qa(rng, reasoned)
    seen.add(q)
    return q, a, r


# --------------------------------------------------------------------------------------------
# Records, one kind per source
# --------------------------------------------------------------------------------------------


def _llava_record(spec: CorpusSpec, i: int, mode: str, dirt: str) -> tuple[dict, list[tuple[str, bytes]]]:
    """A LLaVA-Instruct-style record (``image``, ``conversations`` of ``{from, value}``) and its image
    files."""
    rng = _rng(spec.seed, "sft", "llava", i)
    key = f"llava-{i:05d}"
    think = mode == "thinking"
    layout = rng.choices(("before", "after", "none", "two", "multi"), (55, 10, 15, 10, 10))[0]
    files: list[tuple[str, bytes]] = []
    if layout == "two":
        (s1, img1, _, _), (s2, img2, _, _) = _sft_image(rng, True), _sft_image(rng, True)
        n1, n2 = (sum(g[2] for g in s["groups"]) for s in (s1, s2))
        answer = (
            "The first picture."
            if n1 > n2
            else "The second picture."
            if n2 > n1
            else "Neither: they show the same number."
        )
        turns = [
            (
                "<image>\n<image>\nWhich of the two pictures shows more shapes?",
                answer,
                f"The first picture has {NUMBERS_EN[n1]} and the second has {NUMBERS_EN[n2]}.",
            )
        ]
        files = [(f"images/{key}-0.jpg", img1), (f"images/{key}-1.jpg", img2)]
    else:
        scene, img, _, _ = _sft_image(rng)
        files = [(f"images/{key}.jpg", img)]
        q, a, r = _scene_qa(scene, rng)
        prompt = {"before": f"<image>\n{q}", "after": f"{q}\n<image>", "none": q, "multi": f"<image>\n{q}"}[
            layout
        ]
        turns = [(prompt, a, r)]
        if layout == "multi":
            q2, a2, r2 = _scene_qa(scene, rng)
            turns.append((q2, a2, r2))
    conversations = []
    for q, a, r in turns:
        conversations += [
            {"from": "human", "value": q},
            {"from": "gpt", "value": _reply(a, r if think else None)},
        ]
    images = [rel for rel, _ in files]
    record: dict[str, Any] = {
        "id": key,
        "image": images[0] if len(images) == 1 else images,
        "conversations": conversations,
    }
    last = conversations[-1]
    if dirt == "unbalanced_think":
        last["value"] = last["value"].replace("</think>", "")
    elif dirt == "empty_answer":
        last["value"] = ""
    elif dirt == "degenerate_repetition":
        last["value"] = _loop(rng)
    elif dirt == "placeholder_mismatch":  # two placeholders, one image
        question = conversations[0]["value"].replace("<image>", "").strip()
        conversations[0]["value"] = f"<image>\n<image>\n{question}"
        record["image"], files = images[0], files[:1]
    elif dirt == "missing_image":  # as many images as placeholders, none of them on disk
        missing = [f"images/missing-{key}-{k}.jpg" for k in range(len(images))]
        record["image"], files = missing[0] if len(missing) == 1 else missing, []
    elif dirt == "bad_role_order":
        record["conversations"] = [conversations[1], conversations[0]]
    elif dirt == "unknown_mode":
        record["mode"] = "deep_think"
    elif dirt == "suffix_mismatch":
        conversations[-2]["value"] += " /no_think"
        if "<think>" not in last["value"]:
            last["value"] = _reply(last["value"], turns[-1][2])
    return record, files


def _sharegpt_record(
    spec: CorpusSpec, i: int, mode: str, dirt: str, seen: set[str]
) -> tuple[dict, list[tuple[str, bytes]]]:
    """An OpenAI-style record (``messages`` of ``{role, content}`` with image parts, ``images``)."""
    rng = _rng(spec.seed, "sft", "sharegpt", i)
    key = f"sharegpt-{i:05d}"
    think = mode == "thinking"
    system = rng.random() < 0.3
    files: list[tuple[str, bytes]] = []
    if rng.random() < 0.7:
        scene, img, _, _ = _sft_image(rng)
        q, a, r = _scene_qa(scene, rng)
        files = [(f"images/{key}.jpg", img)]
        user: Any = (
            [{"type": "image", "index": 0}, {"type": "text", "text": q}]
            if rng.random() < 0.7
            else f"<image>{q}"
        )  # llama-factory writes the placeholder into the text
    else:  # with a system turn, which the qa table never has: no accidental duplicate across the two
        q, a, r = _new_text_qa(rng, think, seen)
        user, system = q, True
    messages: list[dict] = [{"role": "system", "content": _SYSTEM}] if system else []
    messages += [
        {"role": "user", "content": user},
        {"role": "assistant", "content": _reply(a, r if think else None)},
    ]
    record: dict[str, Any] = {"id": key, "messages": messages, "images": [rel for rel, _ in files]}
    if dirt == "image_ref_out_of_range":
        messages[-2]["content"] = [{"type": "image", "index": 1}, {"type": "text", "text": q}]
        if not files:
            _, img, _, _ = _sft_image(rng)
            files = [(f"images/{key}.jpg", img)]
            record["images"] = [files[0][0]]
    elif dirt == "unknown_role":
        messages[-1]["role"] = "bot"
    elif dirt == "empty_conversation":
        record["messages"] = []
    return record, files


def _qa_record(spec: CorpusSpec, i: int, mode: str, dirt: str, seen: set[str]) -> dict:
    """A row of the question/answer/reasoning/analysis table (some with an image)."""
    rng = _rng(spec.seed, "sft", "qa", i)
    reasoned = mode == "thinking" or (mode == "auto_think" and rng.random() < 0.5)
    image = None
    if rng.random() < 0.4:
        scene, image, _, _ = _sft_image(rng)
        q, a, r = _scene_qa(scene, rng)
    else:
        q, a, r = _new_text_qa(rng, reasoned, seen)
    row = {
        "id": f"qa-{i:05d}",
        "question": q,
        "answer": a,
        "reasoning": r if reasoned else None,
        "analysis": None,
        "image": image,
        "mode": mode if rng.random() < 0.5 else None,
    }
    if mode == "auto_think":
        row["analysis"] = rng.choice(_HARD if reasoned else _EASY)
    if dirt == "empty_answer":
        row["answer"] = ""
    elif dirt == "unexpected_think":
        row.update(mode="non_thinking", answer=_reply(a, r))
    elif dirt == "missing_analysis":
        row.update(mode="auto_think", analysis=None, reasoning=r)
    elif dirt == "missing_think":
        row.update(mode="thinking", reasoning=None)
    elif dirt == "unknown_mode":
        row["mode"] = "fast_think"
    elif dirt == "degenerate_repetition":
        row["reasoning"] = _loop(rng)
    elif dirt == "unbalanced_think":
        row["reasoning"] = r.replace(". ", ".</think> ", 1) if ". " in r else r + "</think> Done."
    return row


def _video_qa_record(spec: CorpusSpec, i: int, mode: str, dirt: str, out: Path) -> dict:
    rng = _rng(spec.seed, "sft", "video_qa", i)
    clips = _clips(spec, "clean")
    key = f"vqa-{i:05d}"
    if dirt == "missing_video":
        return {
            "id": key,
            "question": _VIDEO_QA[0][0],
            "answer": "About 5 seconds.",
            "video": f"../../{SOURCE_DIR['video']}/clips/missing-{key}.mp4",
        }
    if dirt == "truncated_video":
        clip = _clips(spec, "truncated_video")[0]
        return {"id": key, "question": _VIDEO_QA[1][0], "answer": _VIDEO_QA[1][1], "video": f"../../{clip}"}
    k = sum(1 for _, d in sft_plan(spec)["video_qa"][:i] if d == "clean")  # clean rows before: one question
    clip = clips[k % len(clips)]  # per (clip, question), never twice
    q, a, r = _VIDEO_QA[(k // len(clips)) % len(_VIDEO_QA)]
    d = probe(str(out / clip)).duration or 0.0
    record = {"id": key, "question": q, "answer": a.format(s=round(d)), "video": f"../../{clip}"}
    if rng.random() < 0.4:
        record["reasoning"] = r.format(s=round(d), d=d)
    return record


def write_sft_source(out: Path, spec: CorpusSpec, source: str) -> ShardResult:
    """One cold-start source file (plus its images) and its truth rows."""
    rel = SFT_FILES[source]
    plan = sft_plan(spec)[source]
    res = ShardResult(f"sft_{source}", 0, len(plan), files=[rel])
    folder = (out / rel).parent
    records: list[dict] = []
    seen: set[str] = set()  # text-only questions so far
    for i, (mode, dirt) in enumerate(plan):
        files: list[tuple[str, bytes]] = []
        if source == "llava" and dirt == "exact_duplicate":  # an earlier clean record, re-derived: same bytes
            j = _rng(spec.seed, "sft", "llava", i, "dup").choice(
                [k for k in range(i) if plan[k][1] == "clean"]
            )
            record = dict(_llava_record(spec, j, *plan[j])[0], id=f"llava-{i:05d}")
            mode = plan[j][0]
        elif source == "llava":
            record, files = _llava_record(spec, i, mode, dirt)
        elif source == "sharegpt":
            record, files = _sharegpt_record(spec, i, mode, dirt, seen)
        elif source == "qa":
            record = _qa_record(spec, i, mode, dirt, seen)
        elif source == _TWI:
            record, files = _twi_record(spec, i, mode, dirt)
        else:
            record = _video_qa_record(spec, i, mode, dirt, out)
        for name, data in files:
            (folder / name).write_bytes(data)
        res.images += len(files)
        records.append(record)
        stage, reason = (None, None) if dirt == "clean" else SFT_DIRT[source][dirt][1:]
        res.truth.append((rel, i, record["id"], source, mode, dirt, stage, reason))
    if rel.endswith(".parquet"):
        pq.write_table(pa.Table.from_pylist(records, schema=SFT_QA_SCHEMA), out / rel, row_group_size=64)
    elif rel.endswith(".json"):
        (out / rel).write_text(json.dumps(records, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    else:
        with open(out / rel, "wb") as f:
            for (_, dirt), record in zip(plan, records):
                line = json.dumps(record, ensure_ascii=False).encode()
                f.write((line[: len(line) * 2 // 3] if dirt == "malformed_json" else line) + b"\n")
    return res
