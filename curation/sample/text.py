"""Pure-text documents: 50-400 word articles on one topic, and their dirt.

Sentences are filled from topic templates (``text.json``) dealt like cards, with a few slot values
kept per document and optional openers/closers, so unrelated documents do not look like near-duplicates
of each other. Dirt: exact and near duplicates (a few typos, an extra line), documents in other
languages, web boilerplate, and text QA benchmark items pasted into articles.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from curation.sample.benchmarks import _render_qa, bench_qa_item
from curation.sample.captions import _cap
from curation.sample.plan import SOURCE_URL, CorpusSpec, _pick_original, shard_plan
from curation.sample.seeding import _rng
from curation.sample.truth import ShardResult, _truth
from curation.sample.vocabulary import load

_VOCAB = load("text")
# topic -> (slot values, sentence templates); {slot}, {Slot} capitalised, {slot2} another value
_TOPICS = {name: (t["slots"], t["sentences"]) for name, t in _VOCAB["topics"].items()}
_OPENERS: tuple[str, ...] = _VOCAB["openers"]
_CLOSERS: tuple[str, ...] = _VOCAB["closers"]
_FOREIGN_TEXT = {lang: (t["slots"], t["sentences"]) for lang, t in _VOCAB["foreign"].items()}
_BOILERPLATE_LINES: tuple[str, ...] = _VOCAB["boilerplate_lines"]
_TYPOS: dict[str, str] = _VOCAB["typos"]


def _fill(template: str, slots: dict[str, list[str]], rng: random.Random) -> str:
    """Fill {slot} / {Slot} (capitalised) / {slot2} (a value other than {slot}'s)."""
    used: dict[str, str] = {}

    def repl(m: re.Match) -> str:
        name = m.group(1)
        base = name.rstrip("0123456789").lower()
        values = [v for v in slots[base] if v != used.get(base)] or slots[base]
        value = used.setdefault(base, rng.choice(values)) if base == name.lower() else rng.choice(values)
        return _cap(value) if name[0].isupper() else value

    return re.sub(r"\{(\w+)\}", repl, template)


def _units(text: str, lang: str) -> int:
    """Length in words; Chinese has no spaces, so two characters count as one word."""
    return len(text) // 2 if lang == "zh" else len(text.split())


def _text_doc(rng: random.Random, lang: str = "en") -> str:
    """50-400 words on one topic, in paragraphs.

    Templates are dealt like cards (no repeat until all are used), each document keeps a few
    slot values (so it stays on one city, one dish, ...), and English sentences get optional
    openers/closers: unrelated documents must not look like near-duplicates of each other.
    """
    if lang == "en":
        slots, templates = _TOPICS[rng.choice(sorted(_TOPICS))]
    else:
        slots, templates = _FOREIGN_TEXT[lang]
    slots = {name: rng.sample(values, min(3, len(values))) for name, values in slots.items()}
    target = rng.randint(50, 400)
    sep = "" if lang == "zh" else " "
    deck: list[str] = []
    paragraphs, para, total = [], [], 0
    while total < target:
        if not deck:
            deck = rng.sample(templates, len(templates))
        sentence = _fill(deck.pop(), slots, rng)
        if lang == "en":
            opener, closer = rng.choice(_OPENERS), rng.choice(_CLOSERS)
            if opener:
                sentence = opener + sentence[0].lower() + sentence[1:]
            sentence = sentence[:-1] + closer + "."
        n = _units(sentence, lang)
        if total + n > 400:
            break
        para.append(sentence)
        total += n
        if len(para) >= rng.randint(3, 6):
            paragraphs.append(sep.join(para))
            para = []
    if para:
        paragraphs.append(sep.join(para))
    return "\n\n".join(paragraphs)


def _boilerplate_doc(rng: random.Random) -> str:
    lines: list[str] = []
    while sum(len(x.split()) for x in lines) < rng.randint(50, 150):
        lines.append(rng.choice(_BOILERPLATE_LINES))
    return "\n".join(lines)


def _near_text(text: str, rng: random.Random) -> str:
    """A few typos and maybe an extra line: what a re-post of the same article looks like."""
    words = text.split(" ")
    for k in rng.sample(range(len(words)), max(1, len(words) // 80)):
        words[k] = _TYPOS.get(words[k], words[k])
    edited = " ".join(words)
    if edited == text or rng.random() < 0.5:
        edited += f"\n\nLast updated: {rng.choice(('March', 'June', 'October'))} {rng.randint(2015, 2024)}."
    return edited


def _text_body(spec: CorpusSpec, shard: int, i: int) -> tuple[str, random.Random]:
    """The clean text of a document (re-derivable, like image-text originals)."""
    rng = _rng(spec.seed, "text", shard, i)
    return _text_doc(rng), rng


def text_document(spec: CorpusSpec, shard: int, i: int, kind: str) -> tuple[dict, str | None, str | None]:
    """A pure-text row, its duplicate-of reference and the benchmark item planted in it (if any)."""
    text, rng = _text_body(spec, shard, i)
    dup_of = bench = None
    if kind in ("exact_duplicate", "near_duplicate"):
        _, sh, j = _pick_original(spec, "text", shard, i, rng)
        original, _ = _text_body(spec, sh, j)
        dup_of = f"{spec.path('text', sh)}#txt-{spec.key(sh, j)}"
        text = original if kind == "exact_duplicate" else _near_text(original, rng)
    elif kind == "non_english_caption":
        text = _text_doc(rng, rng.choice(("de", "fr", "zh")))
    elif kind == "boilerplate_caption":
        text = _boilerplate_doc(rng)
    elif kind == "benchmark_copy":  # a quiz item pasted into an article, or a page holding only the item
        item = bench_qa_item(spec.seed, rng.randrange(spec.bench_items))
        quiz, bench = _render_qa(item, rng), item["id"]
        paragraphs = text.split("\n\n")
        if rng.random() < 0.2:
            paragraphs = []
        paragraphs.insert(rng.randint(0, len(paragraphs)), quiz)
        text = "\n\n".join(paragraphs)
    doc_id = f"txt-{spec.key(shard, i)}"
    return {"id": doc_id, "text": text, "url": SOURCE_URL["text"].format(key=doc_id)}, dup_of, bench


def write_text_shard(out: Path, spec: CorpusSpec, shard: int) -> ShardResult:
    rel = spec.path("text", shard)
    res = ShardResult("text", shard, spec.shard_len("text", shard), files=[rel])
    with open(out / rel, "w", encoding="utf-8") as f:
        for i, kind in enumerate(shard_plan(spec, "text", shard)):
            doc, dup_of, bench = text_document(spec, shard, i, kind)
            f.write(json.dumps(doc, ensure_ascii=False) + "\n")
            res.truth.append(_truth(rel, i, doc["id"], "text", kind, dup_of, bench))
    return res
