"""Generation strategies on the pg1_tiny gold checkpoint (greedy is checked by the parity tests)."""

import contextlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from paligemma import heap
from paligemma.formats import load_official
from paligemma.generate import (
    beam_search,
    generate,
    greedy,
    make_sampler,
    record_attention,
    stream,
)
from paligemma.parity import case_config

CASE = Path(__file__).parents[1] / "parity_tests" / "data" / "pg1_tiny"


@pytest.fixture(scope="module")
def model():
    config = case_config(json.loads((CASE / "config.json").read_text()), image_size=56)
    return load_official(CASE / "params.npz", config)


@pytest.fixture(scope="module")
def inputs():
    """Gold decode prompts: two rows of different lengths (row 0 continues a suffix)."""
    with np.load(CASE / "vectors.npz") as f:
        return (
            torch.from_numpy(f["image"]).permute(0, 3, 1, 2),
            torch.from_numpy(f["prompt_text"]).long(),
            torch.from_numpy(f["prompt_mask_ar"]).long(),
            torch.from_numpy(f["prompt_input_mask"]),
            torch.from_numpy(f["decode_tokens"]).long(),
        )


def test_sampler_keeps_only_top_k_and_nucleus_ids():
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]])).expand(20000, -1)
    g = torch.Generator().manual_seed(0)
    counts = lambda s: torch.bincount(s(logits), minlength=4).float() / len(logits)
    torch.testing.assert_close(counts(make_sampler(1.0, generator=g)),
                               torch.tensor([0.4, 0.3, 0.2, 0.1]), atol=0.015, rtol=0)
    torch.testing.assert_close(counts(make_sampler(1.0, top_k=2, generator=g)),
                               torch.tensor([4 / 7, 3 / 7, 0, 0]), atol=0.015, rtol=0)
    # Nucleus 0.6: 0.4 < 0.6 <= 0.4 + 0.3, so ids 0 and 1 stay (big_vision's cutoff).
    torch.testing.assert_close(counts(make_sampler(1.0, top_p=0.6, generator=g)),
                               torch.tensor([4 / 7, 3 / 7, 0, 0]), atol=0.015, rtol=0)
    # Temperature 2 flattens: p ~ sqrt(p).
    flat = torch.tensor([0.4, 0.3, 0.2, 0.1]).sqrt()
    torch.testing.assert_close(counts(make_sampler(2.0, generator=g)), flat / flat.sum(),
                               atol=0.015, rtol=0)


def test_zero_temperature_is_greedy_and_bad_options_fail():
    assert make_sampler(0.0) is greedy
    for bad in (dict(temperature=-1), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(ValueError):
            make_sampler(**{"temperature": 1.0, **bad})


def test_seeded_sampling_is_reproducible(model, inputs):
    *prompt, _ = inputs
    run = lambda seed: generate(model, *prompt, max_new_tokens=8, sampler=make_sampler(
        1.5, top_p=0.95, generator=torch.Generator().manual_seed(seed)))[0]
    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


def test_top_k_1_sampling_equals_greedy(model, inputs):
    *prompt, gold = inputs
    tokens, _ = generate(model, *prompt, max_new_tokens=10,
                         sampler=make_sampler(3.0, top_k=1, generator=torch.Generator()))
    assert torch.equal(tokens, gold)


def test_rows_stop_at_eos_with_pad(model, inputs):
    *prompt, gold = inputs  # row 0: 256 256 18 18 ...; row 1: 249 x5, 114, 87, 199 ...
    tokens, _ = generate(model, *prompt, max_new_tokens=10, eos_id=18, pad_id=0)
    assert tokens[0].tolist() == [256, 256, 18, 0, 0, 0, 0, 0, 0, 0]  # row 0 stopped
    assert torch.equal(tokens[1], gold[1])  # row 1 never produced eos: unaffected
    one, _ = generate(model, *(x[:1] for x in prompt), max_new_tokens=10, eos_id=18)
    assert one[0].tolist() == [256, 256, 18]  # every row done: generation ends


def test_stream_yields_the_generate_tokens_one_step_at_a_time(model, inputs):
    *prompt, gold = inputs
    steps = list(stream(model, *prompt, max_new_tokens=10))
    assert len(steps) == 10 and all(t.shape == (2,) for t, _ in steps)
    assert torch.equal(torch.stack([t for t, _ in steps], 1), gold)


def test_kv_cache_is_reused_not_recomputed(model, inputs):
    *prompt, _ = inputs
    calls = {"vision": 0, "decoder_lengths": []}
    h1 = model.vision.register_forward_hook(
        lambda *a: calls.__setitem__("vision", calls["vision"] + 1))
    h2 = model.decoder.register_forward_pre_hook(
        lambda m, args: calls["decoder_lengths"].append(args[0].shape[1]))
    try:
        generate(model, *prompt, max_new_tokens=5)
    finally:
        h1.remove()
        h2.remove()
    assert calls["vision"] == 1
    assert calls["decoder_lengths"] == [26, 1, 1, 1, 1]  # prompt once, then one token a step


def sequence_logprob(model, images, tokens, mask_ar, input_mask, new):
    """Sum of log-probs of `new` [n] after row 0's prompt, by one uncached forward pass."""
    n = int(input_mask[0].sum())
    full = torch.cat([tokens[0, :n], new])[None]
    ar = torch.cat([mask_ar[0, :n], torch.ones_like(new)])[None]
    with torch.no_grad():
        logp = model(images[:1], full, ar)[0, n - 1 : -1].log_softmax(-1)
    return float(logp.gather(1, new[:, None]).sum())


def test_beam_search_scores_are_true_sequence_logprobs(model, inputs):
    images, tokens, mask_ar, input_mask, _ = inputs
    best, scores = beam_search(model, images, tokens, mask_ar, input_mask, 4, num_beams=3)
    assert best.shape == (2, 4)
    for row in range(2):
        row_inputs = (x[row : row + 1] for x in (images, tokens, mask_ar, input_mask))
        ref = sequence_logprob(model, *row_inputs, best[row])
        assert abs(ref - float(scores[row])) < 1e-3


def test_beam_search_with_one_beam_is_greedy(model, inputs):
    *prompt, gold = inputs
    best, _ = beam_search(model, *prompt, 10, num_beams=1)
    assert torch.equal(best, gold)


def test_beam_search_with_all_beams_is_exact(model, inputs):
    """With as many beams as ids, 2-step beam search finds the most likely pair."""
    images, tokens, mask_ar, input_mask, _ = inputs
    row0 = [x[:1] for x in (images, tokens, mask_ar, input_mask)]
    vocab = model.config.text.vocab_size
    _, first = generate(model, *row0, max_new_tokens=1)
    lp1 = first[0, 0].log_softmax(-1)
    # Every first token, batched: second-step log-probs [V, V].
    batch = [x.expand(vocab, *x.shape[1:]) for x in row0]
    following = torch.cat([batch[1], torch.arange(vocab)[:, None]], 1)
    ar = torch.cat([batch[2], torch.ones(vocab, 1, dtype=torch.long)], 1)
    mask = torch.cat([batch[3], torch.ones(vocab, 1, dtype=torch.bool)], 1)
    _, second = generate(model, batch[0], following, ar, mask, max_new_tokens=1)
    total = lp1[:, None] + second[:, 0].log_softmax(-1)
    best_pair = divmod(int(total.argmax()), vocab)
    best, score = beam_search(model, *row0, 2, num_beams=vocab - 1)
    assert tuple(best[0].tolist()) == best_pair
    assert abs(float(score[0]) - float(total.max())) < 1e-4


def test_beam_search_ends_hypotheses_at_eos(model, inputs):
    *prompt, _ = inputs
    best, scores = beam_search(model, *(x[:1] for x in prompt), 10, num_beams=4, eos_id=18,
                               pad_id=0)
    row = best[0].tolist()
    assert 18 in row and all(t == 0 for t in row[row.index(18) + 1 :])
    assert abs(sequence_logprob(model, *(x[:1] for x in prompt),
                                best[0, : row.index(18) + 1]) - float(scores[0])) < 1e-3


def test_record_attention_gives_last_query_probabilities(model, inputs):
    *prompt, _ = inputs
    with record_attention(model) as calls:
        generate(model, *prompt, max_new_tokens=3)
    cfg = model.config.text
    assert [c.shape for c in calls] == [(2, cfg.depth, cfg.num_heads, s) for s in (26, 27, 28)]
    torch.testing.assert_close(calls[2].sum(-1), torch.ones(2, cfg.depth, cfg.num_heads))
    assert float(calls[0][1, :, :, :5].abs().max()) == 0  # row 1's padding slots
    assert not model.decoder.layers[0].attn.probs._forward_hooks  # hooks removed


def test_prefill_and_vision_reuse_activations_by_the_size_of_their_stream(
    model, inputs, monkeypatch
):
    """The prefill asks `heap.reusing_activations` with its f32 residual stream's bytes
    [B, P, D_text] (the embedded image asks with the vision stream's [B, N, D_vision]): the
    size that decides whether its large activations may stay in the heap."""
    asked = []

    @contextlib.contextmanager
    def record(stream_bytes):
        asked.append(stream_bytes)
        yield

    monkeypatch.setattr(heap, "reusing_activations", record)
    images, tokens, mask_ar, input_mask, _ = inputs
    generate(model, images, tokens, mask_ar, input_mask, max_new_tokens=2)
    cfg = model.config
    b, p = tokens.shape[0], cfg.num_image_tokens + tokens.shape[1]
    assert asked == [b * p * cfg.text.width * 4,
                     b * cfg.vision.num_patches * cfg.vision.width * 4]
