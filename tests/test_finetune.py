"""Fine-tuning on a tiny model: loss mask, training, LoRA, checkpointing, resume, export, CLI."""

import json
import shutil

import numpy as np
import PIL.Image
import pytest
import torch
from test_tokenizer import loc_seg_tokenizer

from paligemma import cli
from paligemma.config import PaliGemmaConfig, TextConfig, VisionConfig
from paligemma.finetune import (
    Example,
    FinetuneConfig,
    JsonlDataset,
    collate,
    encode_example,
    evaluate_loss,
    example_losses,
    export_npz,
    finetune,
    init_weights,
    prepare_model,
    save_model,
)
from paligemma.formats import load_official
from paligemma.lora import add_lora, merge_lora
from paligemma.model import PaliGemmaModel
from paligemma.tokenizer import Tokenizer

SUFFIXES = ["a cat sitting on a sofa", "two dogs in the park", "a red car", "a person"]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(loc_seg_tokenizer())


def tiny_model(tok: Tokenizer, seed: int = 0) -> PaliGemmaModel:
    config = PaliGemmaConfig(
        VisionConfig(width=16, depth=1, mlp_dim=32, num_heads=2, patch_size=8, image_size=16),
        TextConfig(width=16, depth=2, mlp_dim=32, num_heads=2, num_kv_heads=1, head_dim=8,
                   vocab_size=tok.vocab_size, attn_logits_softcap=50.0, post_norms=True),
    )
    model = PaliGemmaModel(config)
    init_weights(model, seed)
    return model


def examples(n: int = 4) -> list[Example]:
    rng = np.random.default_rng(0)
    return [Example(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8), "caption en",
                    SUFFIXES[i % len(SUFFIXES)]) for i in range(n)]


def batch_of(tok, model, n=4):
    return collate(examples(n), tok, model.config.vision.image_size)


def test_loss_mask_is_suffix_and_eos(tok):
    tokens, mask_ar, mask_loss = encode_example(tok, "caption en", "a red car")
    prompt, _ = tok.prompt("caption en")
    assert tokens == [*prompt, *tok.encode("a red car"), tok.eos_id]
    n_suffix = len(tok.encode("a red car")) + 1
    assert mask_loss == [0] * len(prompt) + [1] * n_suffix
    assert mask_ar == mask_loss


def test_padding_is_masked(tok):
    batch = collate([Example(np.zeros((4, 4, 3), np.uint8), "caption en", s)
                     for s in ("a person", "a cat sitting on a sofa")], tok, 16)
    short = len(encode_example(tok, "caption en", "a person")[0])
    assert not batch.input_mask[0, short:].any() and batch.input_mask[1].all()
    assert not batch.mask_loss[0, short:].any()
    assert (batch.tokens[0, short:] == tok.pad_id).all()


def test_loss_scores_next_token_on_suffix_only(tok):
    model = tiny_model(tok)
    batch = batch_of(tok, model, 2)
    logits = model(batch.images, batch.tokens[:, :-1], batch.mask_ar[:, :-1],
                   batch.input_mask[:, :-1])
    logp = logits.log_softmax(-1)
    for row in range(2):
        suffix = batch.mask_loss[row].nonzero()[:, 0]  # positions of suffix tokens and eos
        expected = -logp[row, suffix - 1, batch.tokens[row, suffix]].mean()
        torch.testing.assert_close(example_losses(model, batch)[row], expected)


def test_loc_sigma_scores_loc_targets_against_a_gaussian(tok):
    model = tiny_model(tok)
    batch = collate([Example(np.zeros((4, 4, 3), np.uint8), "detect cat",
                             "<loc0100><loc0200><loc0300><loc0400> cat")], tok, 16)
    plain = example_losses(model, batch)
    # A vanishing sigma is the one-hot target; the default (no loc_ids) is unchanged.
    torch.testing.assert_close(example_losses(model, batch, tok.loc_ids, 1e-3), plain)
    torch.testing.assert_close(example_losses(model, batch, tok.loc_ids, 0.0), plain)
    logits = model(batch.images, batch.tokens[:, :-1], batch.mask_ar[:, :-1],
                   batch.input_mask[:, :-1])
    logp = logits.log_softmax(-1)[0]
    loc_logp = logp[:, tok.loc_ids]
    bins = torch.arange(len(tok.loc_ids), dtype=torch.float32)
    expected = []
    for pos in batch.mask_loss[0].nonzero()[:, 0]:
        target = int(batch.tokens[0, pos])
        if target in tok.loc_ids:
            soft = torch.softmax(-0.5 * ((bins - tok.loc_ids.index(target)) / 20) ** 2, 0)
            expected.append(-(soft * loc_logp[pos - 1]).sum())
        else:
            expected.append(-logp[pos - 1, target])
    torch.testing.assert_close(example_losses(model, batch, tok.loc_ids, 20.0)[0],
                               torch.stack(expected).mean())
    # FinetuneConfig.loc_sigma reaches the training loss.
    finetune(model, tok, [Example(np.zeros((4, 4, 3), np.uint8), "detect cat",
                                  "<loc0100><loc0200><loc0300><loc0400> cat")] * 4,
             FinetuneConfig(steps=2, batch_size=4, lr=1e-3, warmup_steps=1, loc_sigma=20.0),
             progress=False)


def test_finetune_lowers_the_loss(tok):
    model = tiny_model(tok)
    loader = [batch_of(tok, model)]
    before = evaluate_loss(model, loader)
    finetune(model, tok, examples(), FinetuneConfig(steps=30, batch_size=4, lr=1e-2,
                                                    warmup_steps=3), progress=False)
    after = evaluate_loss(model, loader)
    assert after < 0.5 * before, (before, after)


def test_frozen_image_mode_trains_the_decoder_only(tok):
    model = tiny_model(tok)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    finetune(model, tok, examples(), FinetuneConfig(steps=2, batch_size=4, lr=1e-2,
                                                    mode="frozen-image"), progress=False)
    for name, value in model.state_dict().items():
        changed = not torch.equal(value, start[name])
        assert changed == name.startswith("decoder."), name


def test_lora_merged_equals_unmerged(tok):
    model = tiny_model(tok)
    names = add_lora(model.decoder, rank=4, alpha=8.0)
    assert len(names) == 2 * 7  # q, k, v, o, gate, up, down in each of 2 layers
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # B starts at 0: make the adapters matter
    batch = batch_of(tok, model)
    args = (batch.images, batch.tokens, batch.mask_ar, batch.input_mask)
    with torch.no_grad():
        unmerged = model(*args)
        assert merge_lora(model) == 14
        merged = model(*args)
    assert set(model.state_dict()) == set(tiny_model(tok).state_dict())
    assert (unmerged - tiny_model(tok)(*args)).abs().max() > 1e-2  # the adapters did change it
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)


def test_lora_finetune_trains_adapters_only(tok):
    model = tiny_model(tok)
    trainable = prepare_model(model, FinetuneConfig(mode="lora", lora_rank=2))
    assert trainable and all(".lora_A" in n or ".lora_B" in n for n in trainable)


def test_gradient_checkpointing_gives_the_same_gradients(tok):
    grads = []
    for enabled in (False, True):
        model = tiny_model(tok)
        prepare_model(model, FinetuneConfig(grad_checkpointing=enabled))
        example_losses(model, batch_of(tok, model)).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-5)


class Crash(RuntimeError):
    pass


class MeanTokenProbe(torch.nn.Module):
    """A test auxiliary objective: squared error of a linear probe on the mean ViT token."""

    def __init__(self, model):
        super().__init__()
        torch.manual_seed(0)  # the same head in every run
        self.head = torch.nn.Linear(model.config.vision.width, 2)
        self.hook = model.vision.register_forward_hook(lambda m, i, out: setattr(self, "out", out))

    def forward(self, model, batch):
        return ((self.head(self.out.mean(1)) - batch.aux) ** 2).mean(1)


def with_aux(items):
    return [Example(e.image, e.prefix, e.suffix, aux=[1.0, -1.0]) for e in items]


def test_collate_stacks_aux_targets_and_refuses_a_mix(tok):
    assert collate(examples(2), tok, 16).aux is None
    assert torch.equal(collate(with_aux(examples(2)), tok, 16).aux, torch.tensor([[1.0, -1.0]] * 2))
    with pytest.raises(ValueError, match="aux"):
        collate([*with_aux(examples(1)), *examples(1)], tok, 16)


def test_aux_objective_trains_its_head_and_reaches_the_encoder(tok):
    config = FinetuneConfig(steps=3, batch_size=4, lr=1e-2, warmup_steps=1)
    plain = finetune(tiny_model(tok), tok, with_aux(examples()), config, progress=False)
    model = tiny_model(tok)
    probe = MeanTokenProbe(model)
    head_before = probe.head.weight.detach().clone()
    finetune(model, tok, with_aux(examples()), config, progress=False, aux=probe)
    assert not torch.equal(probe.head.weight, head_before)
    assert not torch.allclose(model.vision.patch_embed.weight, plain.vision.patch_embed.weight)
    assert "aux.head.weight" not in model.state_dict()


class CrashAfter(list):
    """Examples whose item access fails once `limit` items were read: a run dying mid-way."""

    def __init__(self, items, limit):
        super().__init__(items)
        self.limit, self.reads = limit, 0

    def __getitem__(self, i):
        self.reads += 1
        if self.reads > self.limit:
            raise Crash("simulated crash")
        return super().__getitem__(i)


def test_resume_continues_identically(tok, tmp_path):
    config = FinetuneConfig(steps=4, batch_size=2, lr=1e-2, warmup_steps=1, save_every=2)
    straight = finetune(tiny_model(tok), tok, examples(), config, tmp_path / "a", progress=False)
    with pytest.raises(Crash):  # dies while loading step 3's batch, after step 2's checkpoint
        finetune(tiny_model(tok), tok, CrashAfter(examples(), 4), config, tmp_path / "b",
                 progress=False)
    assert json.loads((tmp_path / "b/checkpoint/state.json").read_text())["step"] == 2
    resumed = finetune(tiny_model(tok), tok, examples(), config, tmp_path / "b", resume=True,
                       progress=False)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(),
                            strict=True):
        assert torch.equal(a, b), name


def test_resume_restores_the_aux_objective(tok, tmp_path):
    config = FinetuneConfig(steps=4, batch_size=2, lr=1e-2, warmup_steps=1, save_every=2)
    model = tiny_model(tok)
    straight = MeanTokenProbe(model)
    finetune(model, tok, with_aux(examples()), config, tmp_path / "a", progress=False, aux=straight)
    with pytest.raises(Crash):
        model = tiny_model(tok)
        finetune(model, tok, CrashAfter(with_aux(examples()), 4), config, tmp_path / "b",
                 progress=False, aux=MeanTokenProbe(model))
    model = tiny_model(tok)
    resumed = MeanTokenProbe(model)
    finetune(model, tok, with_aux(examples()), config, tmp_path / "b", resume=True,
             progress=False, aux=resumed)
    assert torch.equal(straight.head.weight, resumed.head.weight)
    with pytest.raises(ValueError, match="auxiliary"):  # a checkpoint with aux, resumed without
        finetune(tiny_model(tok), tok, examples(), config, tmp_path / "b", resume=True,
                 progress=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_export_npz_round_trip(tok, tmp_path, dtype):
    model = tiny_model(tok)
    finetune(model, tok, examples(), FinetuneConfig(steps=2, batch_size=4, mode="lora",
                                                    lora_rank=2, lr=1e-2), progress=False)
    save_model(model, tok, tmp_path / "model")
    export_npz(tmp_path / "model", tmp_path / "out.npz", dtype)
    with np.load(tmp_path / "out.npz") as f:
        assert f["params/llm/final_norm/scale"].dtype == (np.float32 if dtype == torch.float32
                                                           else np.dtype("V2"))
    loaded = load_official(tmp_path / "out.npz", model.config)
    batch = batch_of(tok, model)
    args = (batch.images, batch.tokens, batch.mask_ar, batch.input_mask)
    # Expected: our model with its weights rounded to the stored dtype (and, for bf16, the
    # bf16-rounded embedding scale that load_official reads from the file).
    expected = PaliGemmaModel(loaded.config).eval()
    expected.load_state_dict({k: v.to(dtype).float() for k, v in model.state_dict().items()})
    with torch.no_grad():
        torch.testing.assert_close(loaded(*args), expected(*args), atol=1e-5, rtol=1e-5)


def test_cli_finetune_jsonl_and_export(tok, tmp_path):
    model = tiny_model(tok)
    save_model(model, tok, tmp_path / "base")
    (tmp_path / "images").mkdir()
    lines = []
    for i, ex in enumerate(examples()):
        PIL.Image.fromarray(ex.image).save(tmp_path / "images" / f"{i}.png")
        lines.append(json.dumps({"image": f"images/{i}.png", "prefix": ex.prefix,
                                 "suffix": ex.suffix}))
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    shutil.copyfile(tmp_path / "train.jsonl", tmp_path / "val.jsonl")
    rc = cli.main(["finetune", "--model", str(tmp_path / "base"), "--train",
                   str(tmp_path / "train.jsonl"), "--eval", str(tmp_path / "val.jsonl"),
                   "-o", str(tmp_path / "run"), "--steps", "3", "--batch-size", "2",
                   "--lr", "1e-2", "--warmup-steps", "1", "--mode", "lora",
                   "--export-npz", str(tmp_path / "ft.npz")])
    assert rc == 0
    metrics = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3] and "eval_loss" in metrics[-1]
    # --eval also scores generations: the records are "caption en" ones.
    assert {"eval_caption_cider", "eval_caption_exact_match"} <= set(metrics[-1])
    assert (tmp_path / "run/model/tokenizer.model").is_file()
    assert load_official(tmp_path / "ft.npz", model.config) is not None


def test_jsonl_errors_name_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"image": "a.png", "prefix": "caption en", "suffix": "x"}\n{"image": 1}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        JsonlDataset(path)
