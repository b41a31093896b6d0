"""Our checkpoint directory: `config.json` + safetensors weights (PaliGemmaModel state_dict names).

Loading builds the model on the meta device and assigns memory-mapped safetensors tensors, so it
never holds two copies of the weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from .config import PaliGemmaConfig
from .model import PaliGemmaModel

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory (sharded via the index, or single)."""
    index = directory / WEIGHTS_INDEX_FILE
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [directory / s for s in shards]
    if (directory / WEIGHTS_FILE).is_file():
        return [directory / WEIGHTS_FILE]
    raise FileNotFoundError(f"{directory}: no {WEIGHTS_FILE} or {WEIGHTS_INDEX_FILE}")


def load_pretrained(directory: str | Path, dtype: torch.dtype | None = None,
                    device: torch.device | str = "cpu") -> PaliGemmaModel:
    """Loads a converted checkpoint directory. dtype None keeps the stored dtype."""
    directory = Path(directory)
    if not (directory / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{directory}: no {CONFIG_FILE} (not a converted checkpoint)")
    config = PaliGemmaConfig.load(directory / CONFIG_FILE)
    with torch.device("meta"):
        model = PaliGemmaModel(config)
    state = {}
    for path in weight_files(directory):
        with safe_open(path, framework="pt", device=str(device)) as f:
            for name in f.keys():
                tensor = f.get_tensor(name)
                state[name] = tensor if dtype is None else tensor.to(dtype)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()
