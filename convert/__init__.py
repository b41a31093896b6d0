"""Official PaliGemma checkpoints <-> PyTorch: `python -m convert` (also `paligemma-convert`).

The command line over `paligemma.formats`, which does all the work (`open_checkpoint`, then
`write_ours` / `write_hf` / `write_npz`); nothing in `paligemma` imports this package.

Input: an official big_vision `.npz` (one file or several parts of one checkpoint; keys with or
without the `params/` prefix; f32, f16 or bf16 stored as `|V2`), or `vae-oid.npz`; one of our
directories; a Hugging Face transformers PaliGemma directory (PaliGemma 1 or 2, sharded or not).

Output directory (our format, read by `paligemma.formats.load_pretrained` and
`paligemma.PaliGemma.from_pretrained`):

    config.json     PaliGemma: {"model_type": "paligemma", "vision": {...}, "text": {...},
                    "name": "pg1-3b-224"}, i.e. PaliGemmaConfig.to_dict(); text.param_dtype is
                    the dtype the official weights were stored in (it decides the bf16-rounded
                    sqrt(width) embedding scale), whatever --dtype writes.
                    VAE: {"model_type": "vae-oid", "num_embeddings": 128, "embedding_dim": 512}
    model.safetensors                       PaliGemmaModel.state_dict() names (VAE: the
                                            official vae-oid.npz key names, unchanged:
                                            `_vq_vae._embedding`, `decoder.0.weight`, ...,
                                            plus `encoder.*` when the file has them)
      or model-0000i-of-0000N.safetensors + model.safetensors.index.json (above --max-shard-size)
    manifest.json   {"format", "converter", "converter_version", "torch_version", "variant",
                    "dtype", "sources": [{"file", "bytes", "sha256" (with --hash, else null)}],
                    "official_arrays": {official key: {"shape", "dtype"}}}

`--to hf` writes a transformers PaliGemmaForConditionalGeneration directory instead, with the
tokenizer and processor files (see `paligemma.formats.hf`, `hf_serve`), `--to npz` turns one of
our directories (or a Hugging Face one) back into the official layout.
Conversion streams one layer at a time and writes to a temporary sibling of the output that is
renamed into place at the end, so a failure leaves nothing behind.
"""

from paligemma import __version__

__all__ = ["__version__"]
