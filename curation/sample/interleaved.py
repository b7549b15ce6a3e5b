"""Interleaved documents (OBELICS-style): aligned ``texts``/``images`` lists, each image described in
the paragraph before it.

Paragraphs are read off the drawn scenes (counts, colours, what a sign says), so text and images agree;
intros, fillers and outros come from ``interleaved.json``. Dirt: a quiz post, one image replaced
by a transformed VQA benchmark image with its question as the paragraph.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from curation.sample.benchmarks import bench_item, plant_image
from curation.sample.captions import NUMBERS_EN, _a, _cap, _plural, scene_phrase_en
from curation.sample.plan import SOURCE_URL, CorpusSpec, shard_plan
from curation.sample.scenes import _pick_size, draw_scene, encode_image, make_scene
from curation.sample.seeding import _rng
from curation.sample.truth import ShardResult, _truth
from curation.sample.vocabulary import load

_VOCAB = load("interleaved")
_INTROS: tuple[str, ...] = _VOCAB["intros"]
_LEADS: tuple[str, ...] = _VOCAB["leads"]  # {c}: the scene's description
_FILLERS: tuple[str, ...] = _VOCAB["fillers"]
_OUTROS: tuple[str, ...] = _VOCAB["outros"]


def _describe_paragraph(scene: dict, rng: random.Random) -> str:
    """A paragraph about one image: the scene phrase plus facts read off the scene."""
    sentences = [_cap(rng.choice(_LEADS).format(c=scene_phrase_en(scene, rng)))]
    if scene["kind"] == "shapes":
        total = sum(n for _, _, n, _ in scene["groups"])
        sentences.append(
            f"There {'is' if total == 1 else 'are'} {NUMBERS_EN[total]} "
            f"shape{'' if total == 1 else 's'} in total."
        )
        shape, colour, n, _ = rng.choice(scene["groups"])
        sentences.append(f"The {shape} is {colour}." if n == 1 else f"The {_plural(shape)} are all {colour}.")
    elif scene["kind"] == "sign":
        board = _a(scene["board"] + " board")
        sentences.append(f"The letters are {scene['ink']} on {board}, which makes them easy to read.")
    else:
        if scene["sun"]:
            sentences.append("The sun is shining in the corner of the picture.")
        for obj in scene["objects"]:
            if obj["obj"] == "house":
                sentences.append(f"The house has {obj['colour']} walls and a {obj['roof']} roof.")
            elif obj["obj"] == "car":
                sentences.append(f"The car is {obj['colour']} and has two black wheels.")
    return " ".join(sentences)


def interleaved_document(
    spec: CorpusSpec, shard: int, i: int, kind: str = "clean"
) -> tuple[dict, list[tuple[str, bytes]], str | None]:
    """An OBELICS-style document: aligned texts/images lists, each image described next to it.

    ``benchmark_copy``: one image is a transformed benchmark image (:func:`plant_image`) and its
    paragraph is the item's question, a quiz post: the (image, question) pair of a VQA item.
    Returns the document, its image files and the planted item's id.
    """
    rng = _rng(spec.seed, "interleaved", shard, i)
    doc_id = f"doc-{spec.key(shard, i)}"
    n_img = rng.randint(1, 3)
    n_par = rng.randint(max(2, n_img), 6)
    extra = n_par - n_img  # paragraphs that are not image descriptions
    texts: list[str | None] = []
    images: list[str | None] = []
    files: list[tuple[str, bytes]] = []
    if extra:
        texts.append(rng.choice(_INTROS))
        images.append(None)
        extra -= 1
    for k in range(n_img):
        scene = make_scene(rng)
        w, h = _pick_size(rng)
        rel = f"images/{doc_id}_{k}.jpg"
        files.append((rel, encode_image(draw_scene(scene, w, h), "jpeg")))
        texts += [_describe_paragraph(scene, rng), None]
        images += [None, rel]
        if extra > 1:
            texts.append(rng.choice(_FILLERS))
            images.append(None)
            extra -= 1
    if extra:
        texts.append(rng.choice(_OUTROS))
        images.append(None)
    bench = None
    if kind == "benchmark_copy":
        item = bench_item(spec.seed, rng.randrange(spec.bench_items))
        k = rng.randrange(n_img)
        data, fmt, _, _ = plant_image(item["image"], rng)
        rel = files[k][0].rsplit(".", 1)[0] + (".png" if fmt == "png" else ".jpg")
        files[k] = (rel, data)
        pos = [j for j, im in enumerate(images) if im is not None][k]
        images[pos] = rel
        quiz = f"Quiz time! {item['question']}"
        if rng.random() < 0.6:
            quiz += " Options: " + ", ".join(item["options"]) + "."
        texts[pos - 1] = quiz  # the paragraph before each image describes it
        bench = item["item_id"]
    url = SOURCE_URL["interleaved"].format(key=doc_id)
    doc = {"id": doc_id, "texts": texts, "images": images, "url": url}
    return doc, files, bench


def write_interleaved_shard(out: Path, spec: CorpusSpec, shard: int) -> ShardResult:
    rel = spec.path("interleaved", shard)
    res = ShardResult("interleaved", shard, spec.shard_len("interleaved", shard), files=[rel])
    folder = (out / rel).parent
    with open(out / rel, "w", encoding="utf-8") as f:
        for i, kind in enumerate(shard_plan(spec, "interleaved", shard)):
            doc, files, bench = interleaved_document(spec, shard, i, kind)
            f.write(json.dumps(doc, ensure_ascii=False) + "\n")
            for image_rel, data in files:
                (folder / image_rel).write_bytes(data)
            res.images += len(files)
            res.truth.append(_truth(rel, i, doc["id"], "interleaved", kind, None, bench))
    return res
