"""The reference trainer: a small Keye-VL-shaped model that streams a mixture (``curation train``).

- :mod:`~curation.train.config`: the dataclass config and the stages;
- :mod:`~curation.train.model`: ViT, projector, M-RoPE decoder;
- :mod:`~curation.train.data`: shards, streams, resumable positions, samples per stage;
- :mod:`~curation.train.train`: the loop, checkpoints, logs;
- :mod:`~curation.train.merge`: averaging checkpoints;
- :mod:`~curation.train.hf`: SigLIP and Qwen3 weights from Hugging Face folders.
"""
