"""Every on-disk layout of PaliGemma, and the one way to read them.

    errors      CheckpointError, the one error type
    dtypes      the one dtype table (our names, torch, numpy, safetensors)
    mapping     the official big_vision layout <-> our parameters (`weight_rules`)
    npz         official `.npz` files, read and written one array / layer at a time
    ours        our directory: config.json + safetensors (+ manifest.json)
    hf          our names and config -> Hugging Face transformers (export)
    hf_import   Hugging Face transformers -> our names and config
    hf_serve    tokenizer / processor / generation files of an export
    vae         the segmentation mask VAE (`vae-oid.npz`)
    open        open_checkpoint -> Source: the format recognised, every name and shape checked
    load        a Source -> PaliGemmaModel (load_model, load_pretrained, load_official)
    writers     a Source -> our directory, a Hugging Face directory, an official `.npz`
"""

from .errors import CheckpointError
from .load import load_model, load_official, load_pretrained
from .open import Source, open_checkpoint
from .ours import save_pretrained
from .writers import write_hf, write_npz, write_ours

__all__ = [
    "CheckpointError",
    "Source",
    "load_model",
    "load_official",
    "load_pretrained",
    "open_checkpoint",
    "save_pretrained",
    "write_hf",
    "write_npz",
    "write_ours",
]
