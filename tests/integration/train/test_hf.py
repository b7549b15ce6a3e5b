"""Real weights: tiny random SigLIP and Qwen3 checkpoints written with save_pretrained (no downloads) load
into the trainer's model and compute exactly what transformers computes."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from curation.train import hf
from curation.train.config import ConfigError, load_config
from curation.train.data import patchify
from curation.train.model import LanguageModel, VisionTower
from curation.train.train import evaluate, train

transformers = pytest.importorskip("transformers")
hf._transformers()  # the torchvision workaround, before transformers' vision models import it


@pytest.fixture(scope="module")
def siglip_path(tmp_path_factory) -> str:
    cfg = transformers.SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=56,
        patch_size=14,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("siglip")
    transformers.SiglipVisionModel(cfg).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def qwen3_path(tmp_path_factory) -> str:
    cfg = transformers.Qwen3Config(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("qwen3")
    transformers.Qwen3ForCausalLM(cfg).save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("height,width", [(56, 56), (84, 112)])
def test_siglip_tower_matches_transformers(siglip_path, height, width):
    vcfg = dataclasses.replace(
        load_config(None).vision, rope_2d=False, **hf.siglip_vision_config(siglip_path)
    )
    assert (vcfg.dim, vcfg.layers, vcfg.learned_grid) == (32, 2, 4)
    ours = VisionTower(vcfg)
    ours.load_state_dict(hf.siglip_vision_weights(siglip_path))
    ref = transformers.SiglipVisionModel.from_pretrained(siglip_path).eval()
    pixels = np.random.default_rng(1).integers(0, 255, (height, width, 3), dtype=np.uint8)
    patches, rc = patchify(pixels, 14, 2)
    with torch.no_grad():
        got = ours(
            torch.from_numpy(patches)[None],
            torch.from_numpy(rc)[None],
            torch.tensor([[height // 14, width // 14]]),
            torch.ones(1, len(rc), dtype=torch.bool),
        )[0]
        x = torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 127.5 - 1
        want = ref(pixel_values=x, interpolate_pos_encoding=True).last_hidden_state[0]  # raster order
    raster = torch.from_numpy(rc[:, 0] * (width // 14) + rc[:, 1])
    torch.testing.assert_close(got, want[raster], rtol=1e-4, atol=1e-4)


def test_qwen3_decoder_matches_transformers_on_text(qwen3_path):
    lcfg = dataclasses.replace(load_config(None).lm, **hf.qwen3_config(qwen3_path))
    ours = LanguageModel(lcfg)
    ours.load_state_dict(hf.qwen3_weights(qwen3_path))
    ref = transformers.Qwen3ForCausalLM.from_pretrained(qwen3_path).eval()
    ids = torch.randint(0, 300, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        positions = torch.arange(17, dtype=torch.float32).expand(3, 2, 17)  # text: t = h = w
        got = ours.logits(ours(ours.embed_tokens(ids), positions))
        want = ref(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_training_starts_from_hf_weights(train_mixtures, siglip_path, qwen3_path, tmp_path):
    mix = str(train_mixtures["stage2"])
    run = train(
        load_config(
            None,
            [
                f"mixture={mix}",
                f"out={tmp_path / 'a'}",
                "stage=2",
                "steps=3",
                "data.num_workers=0",
                f"vision.hf_path={siglip_path}",
                f"lm.hf_path={qwen3_path}",
                "vision.rope_2d=false",
            ],
        )
    )
    ckpt = torch.load(run["checkpoint"], weights_only=True)
    assert ckpt["config"]["lm"]["vocab_size"] == 300 and ckpt["config"]["vision"]["learned_grid"] == 4
    assert np.isfinite(evaluate(run["checkpoint"], mix, "2", batches=1))
    small = transformers.Qwen3Config(
        vocab_size=200,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
    )
    transformers.Qwen3ForCausalLM(small).save_pretrained(tmp_path / "small")
    with pytest.raises(
        ConfigError, match=r"lm.hf_path: the model embeds 200 tokens, the tokenizer needs 263"
    ):
        train(
            load_config(None, [f"mixture={mix}", f"out={tmp_path / 'b'}", f"lm.hf_path={tmp_path / 'small'}"])
        )
    with pytest.raises(ConfigError, match=r"vision.hf_path: .* holds a 'qwen3' model, not SigLIP"):
        train(load_config(None, [f"mixture={mix}", f"out={tmp_path / 'c'}", f"vision.hf_path={qwen3_path}"]))
