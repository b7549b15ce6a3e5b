"""Deterministic sample corpus generator (``curation sample OUT``).

Why this exists: the curation pipeline has to be developed, tested and demonstrated without
anyone's private data. This package writes a corpus that looks like what data teams bring --
img2dataset-style WebDataset tars, Parquet files with image bytes, JSONL with image folders,
OBELICS-style interleaved documents, pure-text JSONL, videos, cold-start SFT conversations and small
VQA, text QA and video QA benchmarks -- and mixes in the dirt that real crawls contain (broken images,
useless captions, duplicates, benchmark leakage, ...). Every dirty sample is recorded in
``truth.parquet`` so that filters can be scored against ground truth rather than eyeballed.

Design constraints and how they are met:

* **Content a caption can describe.** Images are drawn with PIL from a small *scene* description
  (shapes, simple objects, signs with text); clean captions are generated from the same scene,
  so a CLIP-style model can learn to match them, and mismatched captions really are wrong.
* **Determinism.** Every shard has its own ``random.Random`` seeded from xxh64 of
  ``(seed, source, shard)`` (Python's ``hash`` is salted per process), which decides the dirt
  plan of the shard; every row has its own generator seeded from ``(seed, source, shard, row)``.
  A duplicate therefore never needs the *output* of another shard: it re-derives the original
  row from its coordinates. Shards can be written in any order by any number of processes and
  the bytes are identical.
* **Scale without memory.** Nothing holds more than one shard (and Parquet buffers only one
  row group). ``truth.parquet`` is streamed by the parent in canonical order.

Modules, lowest first (each imports only modules above it in this list):

* ``seeding`` -- one reproducible random stream per tuple of coordinates.
* ``vocabulary`` -- loads the word lists, colours and templates of ``*.json`` files.
* ``scenes`` -- scene descriptions, drawing and image encoding; ``captions`` -- what a scene's caption says.
* ``plan`` -- sources, shards, dirt rates and which row gets which dirt; ``truth`` -- ground-truth rows.
* ``video`` -- synthetic videos (also used directly by tests and benchmarks).
* ``benchmarks`` -- VQA, text QA and video QA items, their leaked copies, and the benchmark files.
* ``image_text``, ``text``, ``interleaved``, ``video_rows`` -- the corpus sources and their shard writers.
* ``sft_think_with_image``, ``sft`` -- the cold-start SFT conversations.
* ``corpus`` -- :func:`write_sample_corpus`, which runs all the writers.

    >>> summary = write_sample_corpus("sample", rows=1000, seed=0)  # also written to sample/corpus.json
"""

from curation.sample.benchmarks import bench_item
from curation.sample.captions import caption_en
from curation.sample.corpus import write_sample_corpus
from curation.sample.plan import DIRT_KINDS, FORCED, IMAGE_TEXT_SOURCES, SOURCES, CorpusSpec
from curation.sample.scenes import _pick_size as _pick_size  # not in __all__: see the note below
from curation.sample.scenes import decompression_bomb_png, draw_scene, make_scene
from curation.sample.sft import SFT_DIRT, SFT_FILES

__all__ = [
    "DIRT_KINDS",
    "FORCED",
    "IMAGE_TEXT_SOURCES",
    "SFT_DIRT",
    "SFT_FILES",
    "SOURCES",
    "CorpusSpec",
    "bench_item",
    "caption_en",
    "decompression_bomb_png",
    "draw_scene",
    "make_scene",
    "write_sample_corpus",
]
# _pick_size (not in __all__): the image sizes the corpus draws at, for tests/unit/dedup/test_image.py and
# benchmarks/bench_phash.py, which draw corpus-like images of their own.
