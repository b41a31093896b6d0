"""SigLIP vision encoder as PaliGemma uses it (big_vision `vit.py`, So400m/14).

Patch conv -> + learned position embedding -> pre-LN transformer blocks -> final LayerNorm.
No CLS token and no pooling: every patch becomes one image token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import VisionConfig
from .layers import Conv2d, LayerNorm, Linear, gelu_tanh_, matmul_dtype

LAYER_NORM_EPS = 1e-6  # flax nn.LayerNorm default


class SiglipAttention(nn.Module):
    """Multi-head self-attention with biases; scores scaled by head_dim**-0.5."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.q_proj = Linear(cfg.width, cfg.width)
        self.k_proj = Linear(cfg.width, cfg.width)
        self.v_proj = Linear(cfg.width, cfg.width)
        self.out_proj = Linear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, N, D] -> [B, N, D] (bf16 at `--matmul-precision medium`, see `matmul_dtype`)."""
        b, n, _ = x.shape
        x = x.to(matmul_dtype(x, self.q_proj.weight))
        q, k, v = (
            proj(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        out = F.scaled_dot_product_attention(q, k, v, scale=self.head_dim**-0.5)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, -1))


class SiglipMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = Linear(cfg.width, cfg.mlp_dim)
        self.fc2 = Linear(cfg.mlp_dim, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, N, D] -> [B, N, D] (bf16 at `--matmul-precision medium`)."""
        x = x.to(matmul_dtype(x, self.fc1.weight))
        if torch.is_grad_enabled():  # autograd needs gelu's input: no in-place ops
            return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))
        return self.fc2(gelu_tanh_(self.fc1(x)))


class SiglipBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = LayerNorm(cfg.width, eps=LAYER_NORM_EPS)
        self.attn = SiglipAttention(cfg)
        self.norm2 = LayerNorm(cfg.width, eps=LAYER_NORM_EPS)
        self.mlp = SiglipMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, N, D] -> [B, N, D], a new tensor."""
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))

    def forward_in_place(self, x: torch.Tensor) -> torch.Tensor:
        """The same without autograd, each residual update added into x itself: x must be the
        caller's own buffer (`SiglipVisionEncoder`'s residual stream)."""
        x += self.attn(self.norm1(x))
        return x.add_(self.mlp(self.norm2(x)))


class SiglipVisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = Conv2d(3, cfg.width, cfg.patch_size, stride=cfg.patch_size)
        self.pos_embedding = nn.Parameter(torch.zeros(1, cfg.num_patches, cfg.width))
        self.blocks = nn.ModuleList(SiglipBlock(cfg) for _ in range(cfg.depth))
        self.norm = LayerNorm(cfg.width, eps=LAYER_NORM_EPS)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: [B, 3, H, W] in [-1, 1] -> float32 patch features [B, N, D], N = (H/patch)^2."""
        size = self.cfg.image_size
        if images.shape[1:] != (3, size, size):
            raise ValueError(
                f"expected images of shape [B, 3, {size}, {size}], got {list(images.shape)}"
            )
        x = self.patch_embed(images)  # [B, D, h, w]
        # Row-major patches, the stream made contiguous: the sum would keep the transposed
        # layout, and then every LayerNorm copied its input (an int8 tower: 27 of 278 ms).
        x = (x.flatten(2).transpose(1, 2) + self.pos_embedding.float()).contiguous()
        # Without autograd the blocks add into this residual stream in place, as the decoder's
        # layers do: no fresh [B, N, D] per update (an int8 vision tower on one AMX Xeon: 0-13%
        # faster over three alternated pairs of runs). Not while a hook observes a block (the
        # parity tool keeps their inputs and outputs).
        in_place = not torch.is_grad_enabled() and not any(
            m._forward_hooks or m._forward_pre_hooks for m in self.blocks.modules()
        )
        for block in self.blocks:
            x = block.forward_in_place(x) if in_place else block(x)
        return self.norm(x)
