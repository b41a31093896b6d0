"""The user-facing PaliGemma class: gold decode through the full pipeline, tasks, errors.

Shared helpers (`gold_pipeline`, `tiny_checkpoint`, `scripted`, `CAT_IMAGE`) are imported by
test_cli.py.
"""

import functools
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import save_file
from test_tokenizer import gold_tokenizer, loc_seg_tokenizer

from paligemma import PaliGemma
from paligemma.api import ObjectsResult, TextResult
from paligemma.config import PaliGemmaConfig, TextConfig, VisionConfig
from paligemma.formats import load_official
from paligemma.image import preprocess, to_rgb_array
from paligemma.model import PaliGemmaModel
from paligemma.parity import case_config
from paligemma.tokenizer import Tokenizer

DATA = Path(__file__).parents[1] / "parity_tests" / "data"
SEG_CODES = [0, 68, 84, 96, 33, 73, 18, 28, 47, 32, 6, 41, 9, 119, 42, 127]  # seg_vae codes[0]


def cat_image() -> np.ndarray:
    """A red disk on blue, 120 wide x 90 high (uint8 [90, 120, 3])."""
    y, x = np.mgrid[0:90, 0:120]
    image = np.zeros((90, 120, 3), np.uint8)
    image[..., 2] = 200
    image[(y - 45) ** 2 + (x - 60) ** 2 < 900] = (220, 40, 40)
    return image


def gold_case(name: str):
    """(PaliGemma with a 512-id tokenizer trained here, gold vectors)."""
    config = case_config(json.loads((DATA / name / "config.json").read_text()), image_size=56)
    pg = PaliGemma(load_official(DATA / name / "params.npz", config), Tokenizer(gold_tokenizer()))
    with np.load(DATA / name / "vectors.npz") as f:
        return pg, {k: f[k] for k in f.files}


def gold_prompts(pg: PaliGemma, vec: dict) -> tuple[list[str], list[str]]:
    """Texts whose prompts are the gold `prompt_text` rows: [bos] prefix "\\n" [suffix]."""
    prefixes, suffixes = [], []
    for ids, ar, valid in zip(vec["prompt_text"], vec["prompt_mask_ar"],
                              vec["prompt_input_mask"], strict=True):
        sep = list(ids).index(108)
        prefixes.append(pg.tokenizer.decode(ids[1:sep]))
        suffixes.append(pg.tokenizer.decode(ids[(ar == 1) & valid]))
    return prefixes, suffixes


@pytest.mark.parametrize("case", ["pg1_tiny", "pg2_tiny"])
def test_greedy_pipeline_equals_the_gold_decode(case):
    pg, vec = gold_case(case)
    prefixes, suffixes = gold_prompts(pg, vec)
    tokens, mask_ar, input_mask = pg.tokenizer.batch(prefixes, suffixes)
    np.testing.assert_array_equal(tokens.numpy(), vec["prompt_text"])  # same prompt ids
    np.testing.assert_array_equal(mask_ar.numpy() * input_mask.numpy(),
                                  vec["prompt_mask_ar"] * vec["prompt_input_mask"])
    np.testing.assert_array_equal(input_mask.numpy(), vec["prompt_input_mask"])
    images = torch.from_numpy(vec["image"]).permute(0, 3, 1, 2)
    results = pg.generate(images, prefixes, suffixes, max_new_tokens=10)
    assert [r.tokens for r in results] == vec["decode_tokens"].tolist()
    assert [r.text for r in results] == [pg.tokenizer.decode(t) for t in vec["decode_tokens"]]


def test_image_files_go_through_preprocessing(tmp_path):
    pg, vec = gold_case("pg1_tiny")
    prefixes, suffixes = gold_prompts(pg, vec)
    paths = []
    for i, image in enumerate(vec["image"]):
        paths.append(tmp_path / f"{i}.png")
        PIL.Image.fromarray(np.round((image + 1) * 127.5).astype(np.uint8)).save(paths[-1])
    from_files = pg.generate(paths, prefixes, suffixes, max_new_tokens=10)
    pixels = preprocess([to_rgb_array(p) for p in paths], 56)
    from_pixels = pg.generate(pixels, prefixes, suffixes, max_new_tokens=10)
    assert from_files == from_pixels


def tiny_model(vocab_size: int, seed: int = 0) -> PaliGemmaModel:
    torch.manual_seed(seed)
    return PaliGemmaModel(PaliGemmaConfig(
        VisionConfig(width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=14, image_size=28),
        TextConfig(width=32, depth=2, mlp_dim=64, num_heads=2, num_kv_heads=1, head_dim=16,
                   vocab_size=vocab_size),
    )).eval()


@functools.cache
def tiny_checkpoint() -> Path:
    """A converted-checkpoint directory (random tiny model) with tokenizer.model inside."""
    directory = Path(tempfile.mkdtemp())
    tokenizer = loc_seg_tokenizer()
    model = tiny_model(Tokenizer(tokenizer).vocab_size)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              directory / "model.safetensors")
    (directory / "config.json").write_text(
        json.dumps({"model_type": "paligemma", **model.config.to_dict()}))
    shutil.copy(tokenizer, directory / "tokenizer.model")
    return directory


def scripted(pieces: str, tokenizer: Tokenizer):
    """A sampler that ignores the logits and emits `pieces`, then eos, in every row."""
    ids = iter(tokenizer.encode(pieces))
    return lambda logits: torch.full((logits.shape[0],), next(ids, tokenizer.eos_id))


@pytest.fixture(scope="module")
def pg():
    return PaliGemma.from_pretrained(tiny_checkpoint(), vae=DATA / "seg_vae" / "params.npz")


def test_from_pretrained_finds_the_tokenizer_and_loads_the_weights(pg):
    model = tiny_model(pg.tokenizer.vocab_size)
    for name, tensor in model.state_dict().items():
        assert torch.equal(pg.model.state_dict()[name], tensor), name
    assert pg.tokenizer.path.name == "tokenizer.model" and pg.vae is not None


def test_text_tasks_return_results_with_their_prompts(pg):
    image = cat_image()
    assert pg.caption(image, max_new_tokens=3).prompt == "caption en"
    assert pg.describe(image, lang="fr", max_new_tokens=3).prompt == "describe fr"
    assert pg.ocr(image, max_new_tokens=3).prompt == "ocr"
    answers = pg.ask([image, image[::-1]], ["what?", "where?"], max_new_tokens=3)
    assert [a.prompt for a in answers] == ["answer en what?", "answer en where?"]
    assert all(isinstance(a, TextResult) and len(a.tokens) <= 3 for a in answers)


def test_batch_rows_equal_single_runs(pg):
    images = [cat_image(), cat_image()[:, ::-1]]
    batch = pg.generate(images, ["caption en", "answer en is it red?"], max_new_tokens=5)
    singles = [pg.generate(images[0], "caption en", max_new_tokens=5),
               pg.generate(images[1], "answer en is it red?", max_new_tokens=5)]
    assert batch == singles


def test_detect_boxes_are_in_original_image_pixels(pg):
    text = "<loc0200><loc0300><loc0800><loc0700> cat ; <loc0000><loc0000><loc1023><loc1023> dog"
    result = pg.detect(cat_image(), ["cat", "dog"], sampler=scripted(text, pg.tokenizer))
    assert isinstance(result, ObjectsResult) and result.prompt == "detect cat ; dog"
    assert result.text == text
    assert [o.label for o in result.objects] == ["cat", "dog"]
    np.testing.assert_allclose(result.objects[0].box, (300 / 1023 * 120, 200 / 1023 * 90,
                                                       700 / 1023 * 120, 800 / 1023 * 90))
    assert result.objects[1].box == (0.0, 0.0, 120.0, 90.0)


def test_segment_decodes_a_full_size_mask(pg):
    text = "<loc0200><loc0300><loc0800><loc0700>" + "".join(f"<seg{c:03d}>" for c in SEG_CODES)
    (obj,) = pg.segment(cat_image(), "cat", sampler=scripted(text + " cat", pg.tokenizer)).objects
    assert obj.label == "cat" and obj.mask.shape == (90, 120) and obj.mask.dtype == bool
    x0, y0, x1, y1 = (int(v) for v in obj.box)
    assert obj.mask[y0:y1, x0:x1].any() and not obj.mask[:y0].any() and not obj.mask[:, x1:].any()


def test_garbage_output_gives_no_objects_not_a_crash(pg, caplog):
    result = pg.detect(cat_image(), "cat", sampler=scripted("<loc0001> a cat", pg.tokenizer))
    assert result.objects == [] and "expected 4 <loc> tokens" in caplog.text


def test_stream_pieces_add_up_to_the_generated_text(pg):
    image = cat_image()
    pieces = list(pg.stream(image, "caption en", max_new_tokens=8))
    assert "".join(pieces) == pg.caption(image, max_new_tokens=8).text
    assert len(pieces) > 1


def test_seeded_sampling_and_beam_search_options(pg):
    image = cat_image()
    run = lambda seed: pg.caption(image, temperature=1.0, top_k=50, seed=seed, max_new_tokens=8)
    assert run(3) == run(3)
    beams = pg.caption(image, num_beams=3, max_new_tokens=6)
    assert isinstance(beams, TextResult) and len(beams.tokens) <= 6


def test_explain_maps_attention_of_each_token_to_the_patches(pg):
    result = pg.explain(cat_image(), "caption en", max_new_tokens=4)
    assert result.maps.shape == (len(result.tokens), 2, 2)  # 28px / 14px patches
    assert len(result.pieces) == len(result.tokens)
    assert np.all(result.maps >= 0) and np.all(result.maps.sum((1, 2)) <= 1 + 1e-5)
    one = pg.explain(cat_image(), "caption en", layers=[-1], heads=[1], max_new_tokens=4)
    assert one.tokens == result.tokens and not np.allclose(one.maps, result.maps)
    with pytest.raises(ValueError, match="layer indices"):
        pg.explain(cat_image(), "caption en", layers=[5])


def test_user_errors_are_clear(pg):
    with pytest.raises(ValueError, match="prompt too long"):
        pg.ask(cat_image(), "why " * 9000)
    no_vae = PaliGemma(pg.model, pg.tokenizer)
    with pytest.raises(ValueError, match="segment needs the segmentation VAE"):
        no_vae.segment(cat_image(), "cat")
    with pytest.raises(ValueError, match="unknown task"):
        pg._task("count", cat_image())
    with pytest.raises(FileNotFoundError, match="no such file"):
        pg.caption("missing.jpg")


def test_tokenizer_and_model_vocab_mismatch():
    model = tiny_model(512)
    with pytest.raises(ValueError, match="has 1400 ids but the model's vocabulary has 512"):
        PaliGemma(model, Tokenizer(loc_seg_tokenizer()))
    pg = PaliGemma(model, Tokenizer(gold_tokenizer()))
    with pytest.raises(ValueError, match="no <locNNNN>"):
        pg.detect(cat_image(), "cat")


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such model directory"):
        PaliGemma.from_pretrained(tmp_path / "nope")
    empty = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint(), empty)
    (empty / "tokenizer.model").unlink()
    with pytest.raises(FileNotFoundError, match="pass the tokenizer file"):
        PaliGemma.from_pretrained(empty)
