"""The recipe over the ``tiny_corpus`` fixture (``str.format`` it with ``corpus`` and ``out``)."""

from __future__ import annotations

TINY_RECIPE = """
name: tiny
vars: {{corpus: {corpus}, out: {out}}}
sources:
  - {{name: wds, format: webdataset, modality: image_text, paths: ["${{corpus}}/wds/*.tar"]}}
  - {{name: pairs, format: jsonl, modality: image_text, paths: ["${{corpus}}/jsonl/*.jsonl"]}}
  - {{name: docs, format: jsonl, modality: text, paths: ["${{corpus}}/text/*.jsonl"]}}
stages:
  - image_decode: {{}}
  - image_size: {{min_side: 32}}
  - aspect_ratio: {{max_ratio: 3.0}}
  - caption_length: {{min: 3}}
  - caption_repetition: {{}}
  - caption_boilerplate: {{}}
  - caption_language: {{languages: [en]}}
  - caption_length: {{instance: doc_length, modalities: [text], min: 20}}
  - exact_dedup: {{}}
output: {{path: "${{out}}", shard_rows: 4}}
"""
