"""Prefill + cached decoding, separate from the model.

Layout, as big_vision's `prefill_cache` / `extend_cache`: each prompt row (image tokens, then
text) is right-aligned so that every row ends at cache slot P-1 (P = longest prompt); padding
sits in front and is masked out as a key. Decode step t writes all rows at slot P + t and
continues each row's positions from its own length, so rows of any length share one cache.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .model import PaliGemmaModel, make_attn_mask

Sampler = Callable[[torch.Tensor], torch.Tensor]  # logits [B, V] -> tokens [B]


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """Argmax; ties go to the lowest id as in big_vision."""
    return logits.argmax(-1)


@dataclass
class DecodeState:
    key_valid: torch.Tensor  # [B, S] bool: cache slots that hold a real token
    next_position: torch.Tensor  # [B] RoPE position of the next token of each row
    index: int  # next cache slot to write
    logits: torch.Tensor  # [B, V] float32 logits of the last token of each row


def right_align(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Rolls row b of x [B, T, ...] right by T - lengths[b] (left-aligned -> right-aligned)."""
    t = x.shape[1]
    source = (torch.arange(t, device=x.device)[None] - (t - lengths)[:, None]) % t  # [B, T]
    return torch.gather(x, 1, source.view(*source.shape, *[1] * (x.dim() - 2)).expand_as(x))


@torch.no_grad()
def prefill(
    model: PaliGemmaModel,
    images: torch.Tensor,
    tokens: torch.Tensor,
    mask_ar: torch.Tensor,
    input_mask: torch.Tensor,
    max_new_tokens: int,
    cache_dtype: torch.dtype | None = None,
) -> DecodeState:
    """Runs the prompts and fills a fresh KV cache of P + max_new_tokens slots.

    images [B, 3, H, W]; tokens, mask_ar, input_mask [B, T], left-aligned (valid text tokens
    first, padding last). cache_dtype: None keeps the weights' dtype; torch.bfloat16 rounds
    keys/values as big_vision's default cache does.
    """
    x = model.embed_inputs(images, tokens)  # [B, P, D]
    b, p = x.shape[:2]
    n_img = p - tokens.shape[1]
    valid = torch.cat([input_mask.new_ones(b, n_img), input_mask], dim=1).bool()
    ar = torch.cat([mask_ar.new_zeros(b, n_img), mask_ar], dim=1) * valid
    lengths = valid.sum(1)
    if not torch.equal(valid, torch.arange(p, device=valid.device)[None] < lengths[:, None]):
        raise ValueError("prompts must be left-aligned: input_mask True on a prefix of each row")
    x, valid, ar = (right_align(a, lengths) for a in (x, valid, ar))
    positions = (torch.cumsum(valid, 1) - 1).clamp(min=0)
    model.decoder.setup_kv_cache(b, p + max_new_tokens, cache_dtype)
    hidden = model.decoder(x, positions, make_attn_mask(valid, ar), cache_index=0)
    key_valid = torch.cat([valid, valid.new_zeros(b, max_new_tokens)], dim=1)
    return DecodeState(key_valid, lengths, p, model.decoder.logits(hidden[:, -1]))


@torch.no_grad()
def decode_step(model: PaliGemmaModel, state: DecodeState, tokens: torch.Tensor) -> DecodeState:
    """Feeds one token per row [B]; returns the state with the logits that follow it."""
    index = state.index
    key_valid = state.key_valid.clone()
    key_valid[:, index] = True
    x = model.decoder.embed_tokens(tokens[:, None])
    hidden = model.decoder(
        x, state.next_position[:, None], key_valid[:, None, : index + 1], cache_index=index
    )
    return DecodeState(
        key_valid, state.next_position + 1, index + 1, model.decoder.logits(hidden[:, -1])
    )


@torch.no_grad()
def generate(
    model: PaliGemmaModel,
    images: torch.Tensor,
    tokens: torch.Tensor,
    mask_ar: torch.Tensor,
    input_mask: torch.Tensor,
    max_new_tokens: int,
    sampler: Sampler = greedy,
    eos_id: int | None = None,
    cache_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generates up to max_new_tokens per row -> (tokens [B, n], logits [B, n, V]).

    Logits are those each token was chosen from. With eos_id, generation stops once every row
    has produced it (rows that finish early keep running, as big_vision's decode loop does).
    """
    state = prefill(model, images, tokens, mask_ar, input_mask, max_new_tokens, cache_dtype)
    out_tokens, out_logits = [], []
    done = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
    try:
        for step in range(max_new_tokens):
            token = sampler(state.logits)
            out_tokens.append(token)
            out_logits.append(state.logits)
            if eos_id is not None:
                done |= token == eos_id
                if bool(done.all()):
                    break
            if step + 1 < max_new_tokens:
                state = decode_step(model, state, token)
    finally:
        model.decoder.clear_kv_cache()
    return torch.stack(out_tokens, 1), torch.stack(out_logits, 1)
