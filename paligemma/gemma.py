"""Gemma 1 / Gemma 2 decoder as big_vision's `gemma.py` runs it.

Per layer: RMSNorm -> attention (RoPE, MQA/GQA, optional logit softcap) [-> RMSNorm] -> residual
-> RMSNorm -> GeGLU MLP [-> RMSNorm] -> residual. The bracketed post-norms are Gemma 2 only.
Every layer attends globally: big_vision has no Gemma 2 sliding window.

Activations are float32 whatever the weights' storage dtype (see `layers`). Attention runs through
`F.scaled_dot_product_attention` when the result is the same up to f32 rounding (no logit
softcap, no one recording the probabilities), else through explicit f32 scores and softmax. A
decode step's few query rows (softcap or not) and RMSNorm without autograd take the C++ kernel's
one-op versions where it is built (`kernels.attend_cached`, `kernels.rms_norm`): the same f32
math, without the fixed costs of PyTorch's several small ops per layer.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from . import dispatch, kernels
from .config import TextConfig
from .kv_cache import KVCache
from .layers import Embedding, Linear, gelu_tanh_, matmul_dtype

RMS_NORM_EPS = 1e-6  # hard-coded in big_vision; config.norm_eps is never read
MASK_FILL = -2.3819763e38  # big_vision's K_MASK; a finite fill keeps fully masked rows NaN-free


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * (1 + scale), computed in float32.

    `1 + scale` is rounded to `math_dtype` if given (see TextConfig.param_math_dtype).
    """

    def __init__(self, dim: int, math_dtype: torch.dtype | None = None):
        super().__init__()
        self.scale = nn.Parameter(torch.zeros(dim))
        self.math_dtype = math_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gain = (1.0 + self.scale.to(self.math_dtype or torch.float32)).float()
        isa = dispatch.plan().kernel
        if isa and x.dtype == torch.float32 and x.is_cpu and not torch.is_grad_enabled():
            return kernels.rms_norm(isa, x, gain, RMS_NORM_EPS)
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + RMS_NORM_EPS)
        # in place without autograd: one [..., D] temporary fewer (896 px prefill: 38 MB)
        normed = normed * gain if torch.is_grad_enabled() else normed.mul_(gain)
        return normed.to(x.dtype)


def softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    return x if cap is None else torch.tanh(x / cap) * cap


def rope_radians(positions: torch.Tensor, head_dim: int, max_wavelength: float) -> torch.Tensor:
    """positions [...] int -> RoPE angles [..., head_dim // 2] float32, as big_vision under jit.

    big_vision writes `positions / max_wavelength ** fraction` with the f32 exponents
    `fraction = f32(2 / head_dim) * i`, but runs it under `jax.jit`, and XLA rewrites the
    division by a constant power into a multiplication by the constant-folded negative power
    (visible in the compiled HLO). The angles are therefore `positions * f32(w ** -fraction)`,
    which differs from the division by up to one ulp of the angle (2.4e-4 rad near position
    4000). The power is evaluated in float64 and rounded once, which reproduces XLA's folded
    constants exactly (float32 `pow` misses by one ulp for some exponents). Checked bit for bit
    against angles recorded from the official code (parity_tests/data/rope_angles.npz).
    """
    fraction = torch.arange(head_dim // 2, dtype=torch.float32) * (2.0 / head_dim)
    inverse_timescale = (max_wavelength ** -fraction.double()).float().to(positions.device)
    return positions.float()[..., None] * inverse_timescale


def rope_angles(
    positions: torch.Tensor, head_dim: int, max_wavelength: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [B, T] -> (sin, cos), each [B, 1, T, head_dim // 2]; shared by all layers."""
    radians = rope_radians(positions, head_dim, max_wavelength)[:, None]
    return torch.sin(radians), torch.cos(radians)


def apply_rope(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE. x: [B, heads, T, H], sin/cos from `rope_angles` -> [B, heads, T, H]."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def apply_rope_(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """`apply_rope` in place on a float32 x, no autograd: the same operations and values, with
    a copy of one half instead of a new [B, heads, T, H] tensor (34 MB of queries for 3B at
    896 px). Returns x."""
    first, second = x.chunk(2, dim=-1)
    first_before = first.clone()
    first.mul_(cos).sub_(second * sin)
    second.mul_(cos).add_(first_before.mul_(sin))
    return x


ATTENTION_CHUNK_SCORES = 1 << 22  # f32 scores per query chunk (16 MB): bounds prefill memory


def attention_bias(mask: torch.Tensor, groups: int) -> torch.Tensor:
    """mask [B, T, S] bool (True = may attend) -> additive bias [B, 1, groups * T, S] float32.

    0 where allowed, MASK_FILL elsewhere. Adding MASK_FILL gives exactly MASK_FILL in f32 for any
    score below 1e31, so this equals big_vision's `where(mask, scores, K_MASK)`. Rows are
    repeated per query head of a kv head, matching queries viewed as [B, K, G * T, H].
    """
    bias = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    bias.masked_fill_(~mask, MASK_FILL)
    b, t, s = mask.shape
    return bias[:, None].expand(b, groups, t, s).reshape(b, 1, groups * t, s)


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.q_proj = Linear(cfg.width, cfg.num_heads * cfg.head_dim, bias=False)
        self.k_proj = Linear(cfg.width, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = Linear(cfg.width, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = Linear(cfg.num_heads * cfg.head_dim, cfg.width, bias=False)
        self.kv_cache: KVCache | None = None
        self.probs = nn.Identity()  # hook point: attention probabilities [B, K, G, T, S]

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor,
        cache_index: int = 0,
    ) -> torch.Tensor:
        """x: [B, T, D]; rope: `rope_angles(positions)`; mask: [B, T, S] bool (True = may attend).

        Without a cache S == T. With one, this call's keys land in slots
        [cache_index, cache_index + T) and S == cache_index + T.
        """
        cfg = self.cfg
        b, t, _ = x.shape
        kv_heads, groups = cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads
        grad = torch.is_grad_enabled()
        # Without autograd q and k are the projections' own float32 outputs: rotated in place,
        # each before the next projection runs (fewer [B, T, N, H] buffers alive at once).
        rotate = apply_rope if grad else apply_rope_
        q = rotate(self.q_proj(x).view(b, t, cfg.num_heads, cfg.head_dim).transpose(1, 2), *rope)
        k = rotate(self.k_proj(x).view(b, t, kv_heads, cfg.head_dim).transpose(1, 2), *rope)
        v = self.v_proj(x).view(b, t, kv_heads, cfg.head_dim).transpose(1, 2)
        if grad:
            out = q.new_empty(b, t, cfg.num_heads, cfg.head_dim)  # o_proj's input, per chunk
        else:
            # q is a view of q_proj's [B, T, N, H] output, o_proj's input layout: each query
            # chunk's result overwrites the queries it was computed from (one buffer, not two).
            out = q.transpose(1, 2)
        q = q.mul_(cfg.query_scale)  # a fresh tensor: in place is safe
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(cache_index, k, v)
        else:  # rotated in place, k is a strided view; as the cache's are, keep keys contiguous,
            k = k.contiguous()  # which gives every query chunk the same sums as one chunk
        # Query head n reads kv head n // groups: view q as [B, K, G, T, H], no kv copies.
        q = q.view(b, kv_heads, groups, t, cfg.head_dim)
        # Scores take [B, N, T, S] floats: at 896 px (T = S > 4096) gigabytes per layer. Query
        # rows are independent, so they run in chunks; one chunk while probs are observed.
        observed = bool(self.probs._forward_hooks)
        rows = t if observed else max(1, ATTENTION_CHUNK_SCORES // (b * cfg.num_heads * k.shape[2]))
        for start in range(0, t, rows):
            stop = start + rows
            chunk = self._attend(q[:, :, :, start:stop], k, v, mask[:, start:stop])
            out[:, start:stop] = chunk.flatten(1, 2).transpose(1, 2)  # [B, C, N, H]
        del q, k, v  # before o_proj allocates its output
        return self.o_proj(out.reshape(b, t, -1))

    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """q [B, K, G, C, H] (roped, scaled), k/v [B, K, S, H], mask [B, C, S] -> [B, K, G, C, H]"""
        b, kv_heads, groups, c, h = q.shape
        q = q.reshape(b, kv_heads, groups * c, h)
        isa = dispatch.plan().kernel
        rows_of_h = all(t.stride(-1) == 1 and t.stride(-2) == h for t in (k, v))  # the cache's
        if (isa and c <= dispatch.FEW_ROWS and not torch.is_grad_enabled() and q.is_cpu
                and q.dtype == k.dtype == v.dtype == torch.float32 and rows_of_h
                and not self.probs._forward_hooks):
            out = kernels.attend_cached(isa, q, k, v, mask, self.cfg.attn_logits_softcap)
            return out.view(b, kv_heads, groups, c, h)
        bias = attention_bias(mask, groups)
        # The probs hook point is skipped by SDPA: take the explicit path while it is observed.
        if self.cfg.attn_logits_softcap is None and not self.probs._forward_hooks:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)
        else:
            scores = (q @ k.transpose(-1, -2)).float()
            cap = self.cfg.attn_logits_softcap
            if torch.is_grad_enabled():  # training: autograd keeps tanh's output
                scores = softcap(scores, cap) + bias
            else:  # the same values in place: one [B, K, G*C, S] buffer, not four
                if cap is not None:
                    scores = scores.div_(cap).tanh_().mul_(cap)
                scores = scores.add_(bias)
            probs = self.probs(scores.softmax(-1).view(b, kv_heads, groups, c, -1))
            out = probs.view(b, kv_heads, groups * c, -1).to(v.dtype) @ v
        return out.view(b, kv_heads, groups, c, h)


MLP_CHUNK_ELEMENTS = 1 << 23  # f32 hidden activations per row chunk (32 MB): bounds prefill


class GeGLU(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.gate_proj = Linear(cfg.width, cfg.mlp_dim, bias=False)
        self.up_proj = Linear(cfg.width, cfg.mlp_dim, bias=False)
        self.down_proj = Linear(cfg.mlp_dim, cfg.width, bias=False)

    def row_chunks(self, rows: int) -> list[slice]:
        """Slices of `rows` rows, each with at most MLP_CHUNK_ELEMENTS hidden activations.

        The hidden activations are [rows, mlp_dim] float32, four of them at once if computed in
        one piece: 0.6 GB for 3B at 896 px. Rows are independent, so they run in a few chunks.
        Equal chunks, not a fixed size with a remainder: a few-row remainder would take the
        decode kernel, and BLAS may order sums differently for very different row counts.
        """
        pieces = max(1, -(-rows * self.gate_proj.out_features // MLP_CHUNK_ELEMENTS))
        bounds = [round(i * rows / pieces) for i in range(pieces + 1)]
        return [slice(a, b) for a, b in itertools.pairwise(bounds)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, D] -> [B, T, D], in `row_chunks`."""
        rows = x.reshape(-1, x.shape[-1])
        chunks = self.row_chunks(rows.shape[0])
        if len(chunks) == 1:
            return self.hidden_to_out(rows).view_as(x)
        return torch.cat([self.hidden_to_out(rows[c]) for c in chunks]).view_as(x)

    def hidden_to_out(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, D] -> [M, D]: down(gelu(gate(x)) * up(x)); without autograd gelu and the
        product are taken in place (two hidden buffers, not four). bf16 at
        `--matmul-precision medium` (see `matmul_dtype`)."""
        x = x.to(matmul_dtype(x, self.gate_proj.weight))
        gate = self.gate_proj(x)
        if torch.is_grad_enabled():  # autograd needs gelu's input: no in-place ops
            return self.down_proj(F.gelu(gate, approximate="tanh") * self.up_proj(x))
        return self.down_proj(gelu_tanh_(gate, self.up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.pre_attention_norm = RMSNorm(cfg.width, cfg.param_math_dtype)
        self.attn = Attention(cfg)
        self.pre_ffw_norm = RMSNorm(cfg.width, cfg.param_math_dtype)
        self.mlp = GeGLU(cfg)
        if cfg.post_norms:
            self.post_attention_norm = RMSNorm(cfg.width, cfg.param_math_dtype)
            self.post_ffw_norm = RMSNorm(cfg.width, cfg.param_math_dtype)
        self.post_norms = cfg.post_norms

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor,
        cache_index: int = 0,
    ) -> torch.Tensor:
        """x [B, T, D] -> [B, T, D]; see `Attention.forward` for the other arguments.

        Without autograd, and unless a forward hook observes this layer or its MLP (the parity
        tool records their outputs), x is updated in place and returned: `GemmaDecoder` passes
        its own residual buffer.
        """
        if torch.is_grad_enabled() or self._forward_hooks or self.mlp._forward_hooks:
            h = self.attn(self.pre_attention_norm(x), rope, mask, cache_index)
            x = x + self._post_attention(h)
            return x + self._post_ffw(self.mlp(self.pre_ffw_norm(x)))
        return self._forward_in_place(x, rope, mask, cache_index)

    def _forward_in_place(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor,
        cache_index: int,
    ) -> torch.Tensor:
        """`forward`'s values with the residual stream updated in place, and everything after
        attention in the MLP's row chunks: RMSNorm and the MLP are per row, so at 896 px the
        [B * T, D] norms, MLP input and output and residual sums (38 MB each for 3B) exist one
        chunk at a time instead of whole."""
        rows = x.view(-1, x.shape[-1])
        h = self.attn(self.pre_attention_norm(x), rope, mask, cache_index).view_as(rows)
        chunks = self.mlp.row_chunks(rows.shape[0])
        for c in chunks:
            rows[c].add_(self._post_attention(h[c]))
        del h
        for c in chunks:
            rows[c].add_(self._post_ffw(self.mlp.hidden_to_out(self.pre_ffw_norm(rows[c]))))
        return x

    def _post_attention(self, h: torch.Tensor) -> torch.Tensor:
        return self.post_attention_norm(h) if self.post_norms else h

    def _post_ffw(self, h: torch.Tensor) -> torch.Tensor:
        return self.post_ffw_norm(h) if self.post_norms else h


class GemmaDecoder(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embedder = Embedding(cfg.vocab_size, cfg.width)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.depth))
        self.final_norm = RMSNorm(cfg.width, cfg.param_math_dtype)

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: [B, T] -> [B, T, D], scaled by sqrt(width) (image tokens never are)."""
        x = self.embedder(tokens)
        math_dtype = self.cfg.param_math_dtype
        if math_dtype is not None:
            return (x.to(math_dtype) * self.cfg.embed_scale).to(x.dtype)
        return x * self.cfg.embed_scale

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor,
        cache_index: int = 0,
        *,
        overwrite_input: bool = False,
    ) -> torch.Tensor:
        """Input embeddings [B, T, D]; positions [B, T]; mask [B, T, S] bool (True = may attend)
        -> final-normed hidden states [B, T, D]. See `Attention.forward` for S and the cache.

        Without autograd the layers update the residual stream in place, in a copy of x, or in
        x itself if `overwrite_input` (one [B, T, D] buffer fewer: 38 MB for 3B at 896 px).
        """
        cfg = self.cfg
        if not torch.is_grad_enabled():  # the layers' residual buffer: x, or a copy of it
            keep = torch.contiguous_format
            x = x.contiguous() if overwrite_input else x.clone(memory_format=keep)
        rope = rope_angles(positions, cfg.head_dim, cfg.rope_max_wavelength)
        for layer in self.layers:
            x = layer(x, rope, mask, cache_index)
        return self.final_norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., D] -> [..., V] float32 through the tied embedding, final softcap if configured.

        The 257k-row projection is the largest matmul of a decode step: pass only the positions
        whose logits are needed.
        """
        return softcap(self.embedder.attend(hidden).float(), self.cfg.final_logits_softcap)

    def setup_kv_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None) -> None:
        """Allocates one KVCache per layer.

        dtype defaults to float32, the activations' dtype whatever the weights are stored in:
        a bf16 cache (big_vision's default) rounds keys/values and, on CPU, costs a conversion
        of the whole cache per layer and step; the cache is small next to the weights.
        """
        for layer in self.layers:
            layer.attn.kv_cache = KVCache(
                batch,
                self.cfg.num_kv_heads,
                max_len,
                self.cfg.head_dim,
                dtype or torch.float32,
                self.embedder.weight.device,
            )

    def clear_kv_cache(self) -> None:
        for layer in self.layers:
            layer.attn.kv_cache = None
