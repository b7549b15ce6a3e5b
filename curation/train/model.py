"""The reference vision-language model: ViT, 2x2-merging projector, causal decoder with 3D M-RoPE.

Keye-VL's layout at any size (the tiny default trains on a CPU):

- **Vision tower.** A ViT over 14-pixel patches of an image resized to multiples of 28 (dynamic
  resolution: no fixed input size). Positions are 2D rotary (patch row, column) inside attention, and
  optionally SigLIP's learned grid table resized to the image (``learned_grid``). Patches arrive in
  *merge-block order* (each 2x2 neighbourhood contiguous), so the projector's merge is a reshape.
- **Projector.** LayerNorm, then each 2x2 block of patch features concatenated (4 x width) and an MLP
  to the decoder's width: one LLM token per 28x28 pixels, as :mod:`curation.target.geometry` counts them.
  A video's frames are encoded one by one and averaged in temporal pairs before the merge, so a video of
  n frames costs ceil(n / 2) frames of tokens, as mixtures count it.
- **Decoder.** Qwen3's block (RMSNorm, grouped-query attention with q/k RMSNorm, SwiGLU MLP), with
  Qwen2-VL's M-RoPE: every token has a (t, h, w) position; a text token has t = h = w (so on text the
  model is exactly a 1D-RoPE Qwen3); an image token has (s, s + row, s + column); a video token's t is
  s plus its frame pair's time since the first frame in seconds times ``tokens_per_second``, so the
  temporal axis follows the frames' absolute timestamps, not their count. Text after a visual block
  continues at the block's largest position plus one. Positions are built by :mod:`curation.train.data`.
- **Contrastive head** (stage 0 only). A small bidirectional text encoder and two linear heads scored
  with SigLIP's sigmoid loss, which trains the vision tower on image-caption pairs.

Module and parameter names follow Hugging Face's SigLIP and Qwen3 where they correspond, so real
weights map one to one (:mod:`curation.train.hf`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curation.train.config import ContrastiveConfig, LMConfig, TrainConfig, VisionConfig, mrope_section


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """Rotate query and key pairs (x_i, x_{i + d/2}) by the angles whose cos/sin are given."""
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


# ---------------------------------------------------------------- vision tower


class VisionAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, mask: Tensor | None, rope: tuple[Tensor, Tensor] | None) -> Tensor:
        b, n, d = x.shape
        shape = (b, n, self.heads, d // self.heads)
        q, k, v = (proj(x).view(shape).transpose(1, 2) for proj in (self.q_proj, self.k_proj, self.v_proj))
        if rope is not None:
            q, k = apply_rotary(q, k, *rope)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))


class VisionBlock(nn.Module):
    """Pre-norm transformer block (SigLIP's: LayerNorm, attention with biases, GELU-tanh MLP)."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, eps: float):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(dim, eps=eps)
        self.self_attn = VisionAttention(dim, heads)
        self.layer_norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = nn.Sequential()
        self.mlp.add_module("fc1", nn.Linear(dim, mlp_dim))
        self.mlp.add_module("act", nn.GELU(approximate="tanh"))
        self.mlp.add_module("fc2", nn.Linear(mlp_dim, dim))

    def forward(
        self, x: Tensor, mask: Tensor | None = None, rope: tuple[Tensor, Tensor] | None = None
    ) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x), mask, rope)
        return x + self.mlp(self.layer_norm2(x))


class VisionTower(nn.Module):
    """ViT over a batch of frames, each a padded list of patches with its (row, column) and grid size."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embedding = nn.Linear(3 * cfg.patch * cfg.patch, cfg.dim)  # a stride-14 conv, as a matmul
        self.position_embedding = nn.Embedding(cfg.learned_grid**2, cfg.dim) if cfg.learned_grid else None
        self.layers = nn.ModuleList(
            VisionBlock(cfg.dim, cfg.heads, cfg.mlp_dim, cfg.norm_eps) for _ in range(cfg.layers)
        )
        self.post_layernorm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        quarter = cfg.dim // cfg.heads // 4  # rows take half the head's rotary pairs, columns the other half
        self.register_buffer(
            "inv_freq",
            1.0 / 10000.0 ** (torch.arange(quarter, dtype=torch.float) / quarter),
            persistent=False,
        )

    def forward(self, patches: Tensor, rc: Tensor, grid: Tensor, mask: Tensor) -> Tensor:
        """``patches`` (F, P, 3*14*14), ``rc`` (F, P, 2) row/column, ``grid`` (F, 2) rows/columns of
        patches, ``mask`` (F, P) True for real patches. Returns (F, P, dim) features (padding is junk)."""
        x = self.patch_embedding(patches)
        if self.position_embedding is not None:
            x = x + self.grid_positions(rc, grid)
        rope = None
        if self.cfg.rope_2d:
            freqs = torch.cat(
                [rc[..., 0, None] * self.inv_freq, rc[..., 1, None] * self.inv_freq], -1
            ).float()
            emb = torch.cat([freqs, freqs], -1)[:, None]  # (F, 1, P, head_dim)
            rope = (emb.cos().to(x.dtype), emb.sin().to(x.dtype))
        attn_mask = mask[:, None, None, :]
        for layer in self.layers:
            x = layer(x, attn_mask, rope)
        return self.post_layernorm(x)

    def grid_positions(self, rc: Tensor, grid: Tensor) -> Tensor:
        """SigLIP's learned position table, bicubically resized to each frame's grid (as HF interpolates)."""
        g, d = self.cfg.learned_grid, self.cfg.dim
        table = self.position_embedding.weight.view(1, g, g, d).permute(0, 3, 1, 2)
        out = torch.zeros(*rc.shape[:2], d, dtype=table.dtype, device=table.device)
        for gh, gw in torch.unique(grid, dim=0).tolist():
            resized = (
                table
                if (gh, gw) == (g, g)
                else F.interpolate(table, size=(gh, gw), mode="bicubic", align_corners=False)
            )
            resized = resized[0].permute(1, 2, 0)  # (gh, gw, d)
            sel = (grid[:, 0] == gh) & (grid[:, 1] == gw)
            r = rc[sel, :, 0].clamp(max=gh - 1)
            c = rc[sel, :, 1].clamp(max=gw - 1)
            out[sel] = resized[r, c]
        return out


class Projector(nn.Module):
    """LayerNorm, then merge x merge patches concatenated and an MLP to the decoder width
    (Qwen2-VL's merger)."""

    def __init__(self, cfg: VisionConfig, out_dim: int):
        super().__init__()
        self.group = cfg.merge * cfg.merge
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.fc1 = nn.Linear(cfg.dim * self.group, cfg.projector_dim)
        self.fc2 = nn.Linear(cfg.projector_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        """``x`` (N, dim) patch features in merge-block order, N a multiple of merge^2 ->
        (N / merge^2, out)."""
        x = self.norm(x).reshape(-1, self.group * x.shape[-1])
        return self.fc2(F.gelu(self.fc1(x)))


# ---------------------------------------------------------------- decoder


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Attention(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.heads, cfg.kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.heads * cfg.head_dim, cfg.dim, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
        b, n, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, n, self.heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(b, n, self.kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, k, *rope)
        # Right padding only: a causal mask already keeps real tokens from seeing the padding after them.
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.kv_heads != self.heads)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, -1))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg.dim, cfg.mlp_dim)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope)
        return x + self.mlp(self.post_attention_layernorm(x))


class LanguageModel(nn.Module):
    """Qwen3-style decoder whose rotary angles come from (t, h, w) positions (M-RoPE)."""

    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        half = cfg.head_dim // 2
        self.register_buffer(
            "inv_freq",
            1.0 / cfg.rope_theta ** (torch.arange(0, half, dtype=torch.float) / half),
            persistent=False,
        )
        # which axis (0 = t, 1 = h, 2 = w) drives each rotary frequency: contiguous sections, as Qwen2-VL
        axis = torch.cat([torch.full((n,), a, dtype=torch.long) for a, n in enumerate(mrope_section(cfg))])
        self.register_buffer("axis", axis, persistent=False)

    def rope(self, position_ids: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos/sin (B, 1, L, head_dim) from (3, B, L) positions (floats: video time need not be whole)."""
        freqs = position_ids.float()[..., None] * self.inv_freq  # (3, B, L, half)
        freqs = freqs.gather(0, self.axis.expand(1, *freqs.shape[1:3], -1)).squeeze(0)  # (B, L, half)
        emb = torch.cat([freqs, freqs], -1)[:, None]
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(self, embeds: Tensor, position_ids: Tensor) -> Tensor:
        rope = self.rope(position_ids, embeds.dtype)
        x = embeds
        for layer in self.layers:
            x = layer(x, rope)
        return self.norm(x)

    def logits(self, hidden: Tensor) -> Tensor:
        return F.linear(hidden, self.embed_tokens.weight) if self.lm_head is None else self.lm_head(hidden)


# ---------------------------------------------------------------- stage 0 head


class Contrastive(nn.Module):
    """Caption encoder and heads for SigLIP's pairwise sigmoid loss (stage 0)."""

    def __init__(self, cfg: ContrastiveConfig, vision: VisionConfig, vocab_size: int):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab_size, vision.dim)
        self.position_embedding = nn.Embedding(cfg.max_text, vision.dim)
        self.layers = nn.ModuleList(
            VisionBlock(vision.dim, vision.heads, vision.mlp_dim, vision.norm_eps)
            for _ in range(cfg.text_layers)
        )
        self.norm = nn.LayerNorm(vision.dim, eps=vision.norm_eps)
        self.text_head = nn.Linear(vision.dim, cfg.embed_dim)
        self.image_head = nn.Linear(vision.dim, cfg.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(cfg.init_scale)))
        self.logit_bias = nn.Parameter(torch.tensor(cfg.init_bias))

    def encode_text(self, ids: Tensor, mask: Tensor) -> Tensor:
        x = self.embed_tokens(ids) + self.position_embedding.weight[: ids.shape[1]]
        for layer in self.layers:
            x = layer(x, mask[:, None, None, :])
        x = self.norm(x)
        pooled = (x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        return F.normalize(self.text_head(pooled), dim=-1)

    def loss(self, image_features: Tensor, patch_mask: Tensor, ids: Tensor, mask: Tensor) -> Tensor:
        """SigLIP: every (image, caption) pair of the batch is a binary problem, positive on the diagonal."""
        m = patch_mask[..., None].to(image_features.dtype)
        pooled = (image_features * m).sum(1) / m.sum(1).clamp(min=1)
        zi = F.normalize(self.image_head(pooled), dim=-1)
        zt = self.encode_text(ids, mask)
        logits = zi @ zt.T * self.logit_scale.exp() + self.logit_bias
        labels = 2 * torch.eye(len(zi), device=zi.device, dtype=logits.dtype) - 1
        return -F.logsigmoid(labels * logits).sum() / len(zi)


# ---------------------------------------------------------------- the whole model


class VLM(nn.Module):
    """Vision tower + projector + decoder (+ stage 0's contrastive head). ``forward(batch)`` returns
    the loss."""

    def __init__(self, cfg: TrainConfig):
        super().__init__()
        if cfg.lm.vocab_size < 1:
            raise ValueError("lm.vocab_size is not resolved: build the model through curation.train.train")
        self.vision = VisionTower(cfg.vision)
        self.projector = Projector(cfg.vision, cfg.lm.dim)
        self.lm = LanguageModel(cfg.lm)
        self.contrastive = Contrastive(cfg.contrastive, cfg.vision, cfg.lm.vocab_size)
        self.temporal_patch = cfg.vision.temporal_patch
        self.apply(_init)

    def visual_embeds(self, batch: dict[str, Any]) -> Tensor:
        """LLM-width embeddings of every visual item of the batch, in order: (sum of visual tokens, dim)."""
        feats = self.vision(batch["patches"], batch["patch_rc"], batch["frame_grid"], batch["patch_mask"])
        pieces = []
        for first, frames, gh, gw in batch["visuals"].tolist():
            x = feats[first : first + frames, : gh * gw]
            if frames > 1:  # temporal groups: average each pair of frames (an odd last frame stands alone)
                groups = -(-frames // self.temporal_patch)
                pad = groups * self.temporal_patch - frames
                if pad:
                    x = torch.cat([x, x[-1:].expand(pad, -1, -1)])
                x = x.view(groups, self.temporal_patch, gh * gw, -1).mean(1)
            pieces.append(x.reshape(-1, x.shape[-1]))
        return self.projector(torch.cat(pieces))

    def forward(self, batch: dict[str, Any]) -> Tensor:
        if batch["kind"] == "contrastive":
            feats = self.vision(batch["patches"], batch["patch_rc"], batch["frame_grid"], batch["patch_mask"])
            return self.contrastive.loss(feats, batch["patch_mask"], batch["text_ids"], batch["text_mask"])
        ids = batch["input_ids"]
        x = self.lm.embed_tokens(ids)
        if batch["visuals"].numel():
            slots = batch["visual_slots"]  # (B, L) True where a visual token goes
            vis = self.visual_embeds(batch).to(x.dtype)
            if vis.shape[0] != int(slots.sum()):
                raise RuntimeError(f"{vis.shape[0]} visual embeddings for {int(slots.sum())} visual slots")
            x = x.masked_scatter(slots[..., None], vis)
        hidden = self.lm(x, batch["position_ids"])
        logits = self.lm.logits(hidden).float()
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), batch["labels"].view(-1), ignore_index=-100)


def _init(m: nn.Module) -> None:
    """GPT-2's small normal init for matrices and embeddings; zero biases; norms keep their ones."""
    if isinstance(m, (nn.Linear, nn.Embedding)):
        nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
