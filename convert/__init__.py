"""Official PaliGemma checkpoints <-> PyTorch: `python -m convert` (also `paligemma-convert`).

Input: an official big_vision `.npz` (one file or several parts of one checkpoint; keys with or
without the `params/` prefix; f32, f16 or bf16 stored as `|V2`), or `vae-oid.npz`.

Output directory (our format, read by `paligemma.checkpoint.load_pretrained` and
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

`--to hf` writes a transformers PaliGemmaForConditionalGeneration directory instead (see
`convert.hf`), `--to npz` turns one of our directories back into the official layout.
Conversion streams one layer at a time and writes to a temporary sibling of the output that is
renamed into place at the end, so a failure leaves nothing behind.
"""

from paligemma import __version__

from .sources import ConversionError, open_source
from .targets import write_hf, write_npz, write_ours

__all__ = ["ConversionError", "__version__", "open_source", "write_hf", "write_npz", "write_ours"]
