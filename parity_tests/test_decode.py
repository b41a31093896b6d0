"""Cached decoding agrees with plain forward passes; batching does not change results."""

import pytest
import torch

from paligemma import dispatch, gemma
from paligemma.config import PaliGemmaConfig, TextConfig, VisionConfig
from paligemma.gemma import rope_angles
from paligemma.generate import generate
from paligemma.model import PaliGemmaModel

ATOL = 1e-4  # f32, same math in a different order


def tiny_model(seed: int = 0, **text) -> PaliGemmaModel:
    torch.manual_seed(seed)
    cfg = PaliGemmaConfig(
        VisionConfig(width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=14, image_size=28),
        TextConfig(**{**dict(width=48, depth=2, mlp_dim=64, num_heads=4, num_kv_heads=2,
                             head_dim=16, vocab_size=97, attn_logits_softcap=50.0,
                             final_logits_softcap=30.0, post_norms=True), **text}))
    model = PaliGemmaModel(cfg).eval()
    with torch.no_grad():  # non-trivial norms so every term matters
        for name, p in model.named_parameters():
            if name.endswith("scale"):
                p.uniform_(-0.5, 0.5)
            else:
                p.normal_(0, 0.3)
    return model


def prompt(lengths, total, seed=1, prefix=2):
    """Left-aligned prompts: `prefix` bidirectional tokens, then a causal suffix."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, 97, (len(lengths), total), generator=g)
    input_mask = torch.arange(total)[None] < torch.tensor(lengths)[:, None]
    mask_ar = (torch.arange(total)[None] >= prefix).long().expand(len(lengths), -1)
    images = torch.rand(len(lengths), 3, 28, 28, generator=g) * 2 - 1
    return images, tokens * input_mask, mask_ar, input_mask


@pytest.mark.parametrize("text", [{}, dict(num_kv_heads=1, post_norms=False,
                                            attn_logits_softcap=None, final_logits_softcap=None)])
def test_cached_decode_equals_uncached_forward(text):
    model = tiny_model(**text)
    images, tokens, mask_ar, input_mask = prompt([5], 5)
    new, logits = generate(model, images, tokens, mask_ar, input_mask, max_new_tokens=6)
    # Uncached: the whole sequence again, generated tokens causal (mask_ar 1).
    full = torch.cat([tokens, new[:, :-1]], 1)
    full_ar = torch.cat([mask_ar, torch.ones_like(new[:, :-1])], 1)
    with torch.no_grad():
        ref = model(images, full, full_ar)[:, 4:]
    torch.testing.assert_close(logits, ref, atol=ATOL, rtol=0)
    assert torch.equal(new, ref.argmax(-1))


def test_ragged_batch_equals_rows_one_by_one():
    model = tiny_model()
    lengths = [7, 3, 5]
    batch = prompt(lengths, 7)
    tokens, logits = generate(model, *batch, max_new_tokens=5)
    for row, n in enumerate(lengths):
        images, toks, ar, mask = (x[row : row + 1] for x in batch)
        t1, l1 = generate(model, images, toks[:, :n], ar[:, :n], mask[:, :n], max_new_tokens=5)
        assert torch.equal(tokens[row : row + 1], t1)
        torch.testing.assert_close(logits[row : row + 1], l1, atol=ATOL, rtol=0)


def test_bf16_cache_rounds_keys_before_the_prefill_attends():
    model = tiny_model()
    batch = prompt([5], 5)
    _, f32 = generate(model, *batch, max_new_tokens=1)
    _, bf16 = generate(model, *batch, max_new_tokens=1, cache_dtype=torch.bfloat16)
    assert (f32 - bf16).abs().max() > 1e-3  # rounding reaches the step-0 (prefill) logits


def test_eos_stops_when_every_row_is_done():
    model = tiny_model()
    batch = prompt([5, 4], 5)
    tokens, _ = generate(model, *batch, max_new_tokens=8)
    eos = int(tokens[0, 2])
    stopped, _ = generate(model, *batch, max_new_tokens=8, eos_id=eos)
    done_at = max(int((tokens[r] == eos).nonzero()[0]) if (tokens[r] == eos).any() else 7
                  for r in range(2))
    assert torch.equal(stopped, tokens[:, : done_at + 1])


def test_prompts_must_be_left_aligned():
    model = tiny_model()
    images, tokens, mask_ar, input_mask = prompt([4], 5)
    with pytest.raises(ValueError, match="left-aligned"):
        generate(model, images, tokens, mask_ar, input_mask.flip(1), max_new_tokens=2)


def test_grouped_attention_reads_kv_head_n_over_groups():
    """Query head n uses kv head n // (N/K) (einops '(K G)'), as big_vision."""
    model = tiny_model(num_heads=4, num_kv_heads=2)
    attn = model.decoder.layers[0].attn
    x = torch.randn(1, 3, 48)
    rope = rope_angles(torch.arange(3)[None], head_dim=16, max_wavelength=10_000.0)
    mask = torch.ones(1, 3, 3, dtype=torch.bool)
    with torch.no_grad():
        out = attn(x, rope, mask)
        # Same weights as full multi-head attention with each kv head repeated per group.
        mha = tiny_model(num_heads=4, num_kv_heads=4).decoder.layers[0].attn
        def per_query_head(w):  # [K * H, D] -> [N * H, D], kv head k serves heads kG..kG+G-1
            return w.view(2, 16, 48).repeat_interleave(2, 0).reshape(64, 48)

        mha.load_state_dict({
            "q_proj.weight": attn.q_proj.weight, "o_proj.weight": attn.o_proj.weight,
            "k_proj.weight": per_query_head(attn.k_proj.weight),
            "v_proj.weight": per_query_head(attn.v_proj.weight),
        })
        torch.testing.assert_close(mha(x, rope, mask), out, atol=1e-5, rtol=0)


@pytest.mark.parametrize("softcap", [50.0, None], ids=["explicit", "sdpa"])
def test_attention_in_query_chunks_equals_one_chunk(monkeypatch, softcap):
    """Prefill attention runs in bounded query chunks (896 px: T > 4096) with the same result."""
    model = tiny_model(attn_logits_softcap=softcap)
    images, tokens, mask_ar, input_mask = prompt([5, 3], 7)
    with torch.no_grad():
        whole = model(images, tokens, mask_ar, input_mask)
        # 4 query heads x S keys per row: 3 rows per chunk, a short last chunk included.
        monkeypatch.setattr(gemma, "ATTENTION_CHUNK_SCORES", 2 * 4 * 3 * (4 + 7))
        chunked = model(images, tokens, mask_ar, input_mask)
    torch.testing.assert_close(chunked, whole, atol=0, rtol=0)  # rows are independent


def test_mlp_in_row_chunks_equals_one_piece(monkeypatch):
    """The GeGLU MLP runs prefill rows in a few equal chunks (896 px: 4 x 0.15 GB otherwise).

    Rows are independent, but BLAS may order a row's sums differently for a different number of
    rows (seen at full size: one f32 ulp of the 3B logits), hence a tolerance of f32 rounding.
    """
    model = tiny_model()
    images, tokens, mask_ar, input_mask = prompt([5, 3], 7)
    mlp_dim = model.config.text.mlp_dim
    with torch.no_grad():
        whole = model(images, tokens, mask_ar, input_mask)
        rows = 2 * (model.config.num_image_tokens + 7)
        monkeypatch.setattr(gemma, "MLP_CHUNK_ELEMENTS", mlp_dim * -(-rows // 3))
        chunked = model(images, tokens, mask_ar, input_mask)
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-6)


def test_mlp_in_place_without_autograd_equals_autograd_path():
    """Without autograd, gelu and the gate * up product are taken in place: the same values, up
    to the few ulp between the C++ kernel's tanh-GELU (where it builds) and PyTorch's."""
    mlp = tiny_model().decoder.layers[0].mlp
    x = torch.randn(2, 9, mlp.gate_proj.in_features)
    with torch.no_grad():
        in_place = mlp(x)
    exact = 0 if dispatch.plan().kernel is None else 1e-5
    torch.testing.assert_close(mlp(x).detach(), in_place, atol=exact, rtol=exact)


@pytest.mark.parametrize("text", [{}, dict(post_norms=False, attn_logits_softcap=None)])
def test_decoder_in_place_equals_observed_layers(monkeypatch, text):
    """Unobserved, the layers update the residual stream in place, rotate q/k in place, write
    attention into q's buffer and run norms + MLP in row chunks; a forward hook on a layer (as
    the parity tool's) takes the out-of-place path. Both give the same values."""
    model = tiny_model(**text)
    decoder = model.decoder
    rows = 9
    monkeypatch.setattr(gemma, "MLP_CHUNK_ELEMENTS", decoder.cfg.mlp_dim * 4)  # 3 chunks
    monkeypatch.setattr(gemma, "ATTENTION_CHUNK_SCORES", 4 * 4 * rows)  # 4 query rows a chunk
    x = torch.randn(1, rows, decoder.cfg.width)
    positions = torch.arange(rows)[None]
    mask = torch.ones(1, rows, rows, dtype=torch.bool).tril()
    with torch.no_grad():
        in_place = decoder(x, positions, mask)
        hooks = [layer.register_forward_hook(lambda *args: None) for layer in decoder.layers]
        observed = decoder(x, positions, mask)
    for h in hooks:
        h.remove()
    torch.testing.assert_close(in_place, observed, atol=0, rtol=0)


def test_decoder_overwrites_its_input_only_when_asked():
    decoder = tiny_model().decoder
    x = torch.randn(2, 5, decoder.cfg.width)
    kept = x.clone()
    args = torch.arange(5)[None].expand(2, -1), torch.ones(2, 5, 5, dtype=torch.bool)
    with torch.no_grad():
        out = decoder(x, *args)
        assert torch.equal(x, kept)
        torch.testing.assert_close(decoder(x, *args, overwrite_input=True), out, atol=0, rtol=0)
    assert not torch.equal(x, kept)  # the residual stream lived in x


def test_rope_in_place_equals_rope():
    x = torch.randn(2, 7, 3, 16).transpose(1, 2)  # strided, as projections' outputs are viewed
    sin, cos = rope_angles(torch.arange(7)[None].expand(2, -1), 16, 10_000.0)
    expected = gemma.apply_rope(x, sin, cos)
    assert gemma.apply_rope_(x, sin, cos) is x
    torch.testing.assert_close(x, expected, atol=0, rtol=0)
