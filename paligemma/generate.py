"""Prefill + cached decoding, separate from the model: greedy, sampling, beam search, streaming.

Layout, as big_vision's `prefill_cache` / `extend_cache`: each prompt row (image tokens, then
text) is right-aligned so that every row ends at cache slot P-1 (P = longest prompt); padding
sits in front and is masked out as a key. Decode step t writes all rows at slot P + t and
continues each row's positions from its own length, so rows of any length share one cache.
The prompt is run once; every later step feeds one token per row and reuses the cache.

Logits: our model applies the final logit softcap (if configured) at every step. big_vision
skips it on the prefill step (reference gotcha 12); argmax is unaffected, but temperature /
top-p sampling and beam scores see the capped logits on every step here. The PaliGemma 2
transfer configs disable the final softcap, so for them both agree exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch

from . import heap
from .model import PaliGemmaModel, make_attn_mask

Sampler = Callable[[torch.Tensor], torch.Tensor]  # logits [B, V] -> tokens [B]


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """Argmax; ties go to the lowest id as in big_vision."""
    return logits.argmax(-1)


def make_sampler(
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Sampler:
    """Temperature 0 is greedy. Otherwise samples from softmax(logits / temperature) restricted
    to the top_k ids and/or to the nucleus: the smallest set of most likely ids whose
    probability reaches top_p (big_vision's `nucleus` sampler; ids tied with the cutoff stay).
    Pass a seeded `torch.Generator` (on the logits' device) for reproducible samples.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if temperature == 0:
        return greedy

    def sample(logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float() / temperature
        if top_k is not None and top_k < logits.shape[-1]:
            kth = logits.topk(top_k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, -torch.inf)
        if top_p is not None and top_p < 1:
            ordered = logits.sort(dim=-1, descending=True).values
            cumulative = ordered.softmax(-1).cumsum(-1)
            cut = (cumulative < top_p).sum(-1, keepdim=True).clamp(max=logits.shape[-1] - 1)
            logits = logits.masked_fill(logits < ordered.gather(-1, cut), -torch.inf)
        return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]

    return sample


class NonFiniteLogits(ValueError):
    """NaN/Inf logits: the weights or the inputs are broken; the output would be garbage."""


def check_logits(logits: torch.Tensor, step: int) -> None:
    """Raises NonFiniteLogits if any logit [B, V] is NaN or Inf: one sum per step (a NaN or Inf
    makes it non-finite; isfinite element by element took four passes over the 257k logits of
    each row, 1-3 ms of a decode step); only a non-finite sum is looked at element by element,
    since finite logits large enough to overflow it are not an error."""
    if bool(torch.isfinite(logits.sum())):
        return
    finite = torch.isfinite(logits).all(-1)
    if not bool(finite.all()):
        rows = (~finite).nonzero()[:, 0].tolist()
        raise NonFiniteLogits(
            f"generation step {step}: the logits of batch row(s) {rows} are NaN/Inf; the model "
            "weights or the input are not finite (convert the checkpoint again: the converter "
            "refuses NaN/Inf weights)"
        )


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
    first, padding last). cache_dtype: None is float32 (the activations' dtype);
    torch.bfloat16 rounds keys/values as big_vision's default cache does.
    """
    rows = tokens.shape[0] * (model.config.num_image_tokens + tokens.shape[1])
    with heap.reusing_activations(rows * model.config.text.width * 4):  # the f32 stream
        x = model.embed_inputs(images, tokens)  # [B, P, D]
        b, p = x.shape[:2]
        n_img = p - tokens.shape[1]
        valid = torch.cat([input_mask.new_ones(b, n_img), input_mask], dim=1).bool()
        ar = torch.cat([mask_ar.new_zeros(b, n_img), mask_ar], dim=1) * valid
        lengths = valid.sum(1)
        if not torch.equal(valid, torch.arange(p, device=valid.device)[None] < lengths[:, None]):
            raise ValueError(
                "prompts must be left-aligned: input_mask True on a prefix of each row"
            )
        x, valid, ar = (right_align(a, lengths) for a in (x, valid, ar))
        positions = (torch.cumsum(valid, 1) - 1).clamp(min=0)
        model.decoder.setup_kv_cache(b, p + max_new_tokens, cache_dtype)
        hidden = model.decoder(
            x, positions, make_attn_mask(valid, ar), cache_index=0, overwrite_input=True
        )
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
        x,
        state.next_position[:, None],
        key_valid[:, None, : index + 1],
        cache_index=index,
        overwrite_input=True,
    )
    return DecodeState(
        key_valid, state.next_position + 1, index + 1, model.decoder.logits(hidden[:, -1])
    )


@torch.no_grad()
def stream(
    model: PaliGemmaModel,
    images: torch.Tensor,
    tokens: torch.Tensor,
    mask_ar: torch.Tensor,
    input_mask: torch.Tensor,
    max_new_tokens: int,
    sampler: Sampler = greedy,
    eos_id: int | None = None,
    cache_dtype: torch.dtype | None = None,
    pad_id: int | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yields (tokens [B], logits [B, V]) per step, up to max_new_tokens steps.

    Arguments as `prefill`. With eos_id, generation ends once every row has produced it. A
    finished row still runs with the batch, as in big_vision's decode loop; with pad_id its
    later tokens are replaced by pad_id (that row has stopped), otherwise they are what the
    model keeps generating.
    """
    state = prefill(model, images, tokens, mask_ar, input_mask, max_new_tokens, cache_dtype)
    done = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
    try:
        for step in range(max_new_tokens):
            check_logits(state.logits, step)
            token = sampler(state.logits)
            if pad_id is not None:
                token = token.masked_fill(done, pad_id)
            if eos_id is not None:
                done |= token == eos_id
            yield token, state.logits
            if step + 1 == max_new_tokens or bool(done.all()):
                return
            state = decode_step(model, state, token)
    finally:
        model.decoder.clear_kv_cache()


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
    pad_id: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generates up to max_new_tokens per row -> (tokens [B, n], logits [B, n, V]).

    Logits are those each token was chosen from. See `stream` for eos_id and pad_id.
    """
    steps = list(
        stream(
            model, images, tokens, mask_ar, input_mask, max_new_tokens,
            sampler, eos_id, cache_dtype, pad_id,
        )
    )
    return torch.stack([t for t, _ in steps], 1), torch.stack([lg for _, lg in steps], 1)


def _select_rows(model: PaliGemmaModel, state: DecodeState, rows: torch.Tensor) -> DecodeState:
    """Reorders / repeats batch rows of the KV cache and the decode state (beam bookkeeping)."""
    for layer in model.decoder.layers:
        cache = layer.attn.kv_cache
        cache.k, cache.v = cache.k[rows], cache.v[rows]
    return replace(
        state,
        key_valid=state.key_valid[rows],
        next_position=state.next_position[rows],
        logits=state.logits[rows],
    )


@torch.no_grad()
def beam_search(
    model: PaliGemmaModel,
    images: torch.Tensor,
    tokens: torch.Tensor,
    mask_ar: torch.Tensor,
    input_mask: torch.Tensor,
    max_new_tokens: int,
    num_beams: int,
    eos_id: int | None = None,
    cache_dtype: torch.dtype | None = None,
    pad_id: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Beam search -> (tokens [B, n], scores [B]): the best sequence of each row and its score.

    The score is the sum of token log-probabilities (no length penalty) up to and including
    eos, as big_vision's `beam_decode`. Each step keeps the num_beams best live continuations
    (not ending in eos) and the best finished one; it stops when no live beam can still beat
    the finished one (log-probabilities only decrease) or after max_new_tokens, when live
    beams count as finished. Tokens after a row's eos are pad_id.
    """
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    b, k = tokens.shape[0], num_beams
    state = prefill(model, images, tokens, mask_ar, input_mask, max_new_tokens, cache_dtype)
    device = state.logits.device
    rows = torch.arange(b, device=device)
    state = _select_rows(model, state, rows.repeat_interleave(k))
    scores = torch.full((b, k), -torch.inf, device=device)
    scores[:, 0] = 0.0  # one live beam to start with, so the first step has no duplicates
    seqs = torch.zeros(b * k, 0, dtype=torch.long, device=device)
    best = torch.full((b, max_new_tokens), pad_id, dtype=torch.long, device=device)
    best_scores = torch.full((b,), -torch.inf, device=device)
    best_lengths = torch.zeros(b, dtype=torch.long, device=device)
    try:
        for step in range(max_new_tokens):
            check_logits(state.logits, step)
            logp = state.logits.float().log_softmax(-1).view(b, k, -1)
            if eos_id is not None:  # every live beam may end here
                finished, beam = (scores + logp[..., eos_id]).max(1)
                better = finished > best_scores
                best[better] = pad_id
                best[better, :step] = seqs.view(b, k, step)[rows, beam][better]
                best[better, step] = eos_id
                best_scores = torch.where(better, finished, best_scores)
                best_lengths = torch.where(better, step + 1, best_lengths)
                logp[..., eos_id] = -torch.inf
            vocab = logp.shape[-1]
            scores, flat = (scores[..., None] + logp).view(b, -1).topk(k, dim=-1)
            source = (rows[:, None] * k + flat // vocab).view(-1)
            token = (flat % vocab).view(-1)
            seqs = torch.cat([seqs[source], token[:, None]], 1)
            if step + 1 == max_new_tokens or bool((best_scores >= scores[:, 0]).all()):
                break
            state = decode_step(model, _select_rows(model, state, source), token)
    finally:
        model.decoder.clear_kv_cache()
    live = scores[:, 0] > best_scores  # ran out of steps before a better beam finished
    best[live, : seqs.shape[1]] = seqs.view(b, k, -1)[live, 0]
    best_lengths = torch.where(live, seqs.shape[1], best_lengths)
    return best[:, : int(best_lengths.max())], torch.where(live, scores[:, 0], best_scores)


@contextmanager
def record_attention(model: PaliGemmaModel) -> Iterator[list[torch.Tensor]]:
    """Records, for every decoder call (the prefill, then each decode step), the attention
    probabilities of its LAST query position, i.e. of the token that predicts the next one.

    Yields a list that fills with one float32 tensor [B, L, N, S] per call (layers, query
    heads, key cache slots; S grows by one per step).
    """
    layers = model.decoder.layers
    pending: list[torch.Tensor] = []
    calls: list[torch.Tensor] = []

    def hook(module: torch.nn.Module, args: tuple, probs: torch.Tensor) -> None:
        b, kv, groups, _, s = probs.shape  # head n = kv head n // groups, group n % groups
        pending.append(probs[:, :, :, -1].reshape(b, kv * groups, s).float())
        if len(pending) == len(layers):
            calls.append(torch.stack(pending, 1))
            pending.clear()

    handles = [layer.attn.probs.register_forward_hook(hook) for layer in layers]
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()
