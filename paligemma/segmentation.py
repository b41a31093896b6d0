"""The segmentation-mask VQ-VAE decoder (`vae-oid.npz`), as big_vision's segmentation evaluator.

16 `<segNNN>` codes -> codebook rows on a 4x4 grid (row-major) -> 1x1 conv -> 2 ResBlocks ->
4 x (ConvTranspose 4x4 stride 2 + relu) -> 1x1 conv -> [B, 64, 64] logits, no sigmoid (> 0 is
inside the mask). Parameter names equal the official file's keys (`_vq_vae._embedding`,
`decoder.0.weight`, `decoder.2.net.0.weight`, ...), so loading is the identity. The official
flax `ConvTranspose(padding=2, transpose_kernel=True)` equals torch's `ConvTranspose2d(k=4,
stride=2, padding=1)`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .formats import vae
from .formats.errors import CheckpointError
from .formats.open import NoProgress, open_checkpoint
from .formats.ours import CONFIG_FILE

NUM_CODES = 16  # seg tokens per mask (a 4x4 grid)
MASK_SIZE = 64


class ResBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(dim, dim, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(dim, dim, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(dim, dim, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


class MaskDecoder(nn.Module):
    def __init__(self, num_embeddings: int = 128, embedding_dim: int = 512, dim: int = 128):
        super().__init__()
        self._vq_vae = nn.Module()
        self._vq_vae._embedding = nn.Parameter(torch.zeros(num_embeddings, embedding_dim))
        layers: list[nn.Module] = [nn.Conv2d(embedding_dim, dim, 1), nn.ReLU()]
        layers += [ResBlock(dim), ResBlock(dim)]
        channels = dim
        for i in range(4):  # 128 -> 128 -> 64 -> 32 -> 16 channels, 4x4 -> 64x64
            layers += [nn.ConvTranspose2d(channels, dim >> i, 4, stride=2, padding=1), nn.ReLU()]
            channels = dim >> i
        self.decoder = nn.Sequential(*layers, nn.Conv2d(channels, 1, 1))

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        """codes: [B, 16] int in [0, num_embeddings) -> mask logits [B, 64, 64]."""
        codebook = self._vq_vae._embedding
        x = codebook[codes].view(codes.shape[0], 4, 4, -1).permute(0, 3, 1, 2)
        return self.decoder(x)[:, 0]


def load_mask_decoder(path: str | Path, device: torch.device | str = "cpu") -> MaskDecoder:
    """From the official `vae-oid.npz` (or a folder holding it) or a converted directory.

    Opened and checked by `formats.open_checkpoint`. The official file also holds the mask
    encoder (`encoder.*`); it is not needed to decode.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such VAE file or directory")
    if path.is_dir() and not (path / CONFIG_FILE).is_file():
        npz = sorted(path.glob("*.npz"))
        if not npz:
            raise FileNotFoundError(f"{path}: no VAE weights (config.json or vae-oid.npz)")
        path = npz[0]
    source = open_checkpoint(path, variant=vae.VARIANT if path.is_file() else None)
    if source.vae_config is None:
        raise CheckpointError(f"{path}: a PaliGemma checkpoint, not the segmentation VAE")
    decoder = MaskDecoder(*source.specs["_vq_vae._embedding"][0])
    wanted = decoder.state_dict().keys()
    state = {name: torch.cat(list(chunks)).float() for name, chunks in
             source.tensors(NoProgress()) if name in wanted}
    decoder.load_state_dict(state)
    return decoder.to(device).eval()
