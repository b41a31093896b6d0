"""PaliGemma model: SigLIP image tokens -> linear projector -> Gemma decoder, prefix-LM mask."""

from __future__ import annotations

import torch
from torch import nn

from . import heap
from .config import PaliGemmaConfig
from .gemma import GemmaDecoder
from .layers import Linear
from .siglip import SiglipVisionEncoder


def make_attn_mask(input_mask: torch.Tensor, mask_ar: torch.Tensor) -> torch.Tensor:
    """Prefix-LM mask (big_vision `make_attn_mask`).

    input_mask: [B, T] bool (False = padding); mask_ar: [B, T] int, 0 for tokens that attend
    bidirectionally (image, prefix), 1 for causal ones (suffix). Returns [B, T, T] bool where
    query i may attend key j iff cumsum(mask_ar)[j] <= cumsum(mask_ar)[i] and both are valid.
    """
    cumsum = torch.cumsum(mask_ar, dim=1)
    mask = cumsum[:, None, :] <= cumsum[:, :, None]
    return mask & input_mask[:, None, :] & input_mask[:, :, None]


class PaliGemmaModel(nn.Module):
    def __init__(self, config: PaliGemmaConfig):
        super().__init__()
        self.config = config
        self.vision = SiglipVisionEncoder(config.vision)
        self.projector = Linear(config.vision.width, config.text.width)  # big_vision img/head
        self.decoder = GemmaDecoder(config.text)

    def embed_image(self, images: torch.Tensor) -> torch.Tensor:
        """images: [B, 3, H, W] in [-1, 1] -> image tokens [B, N, D_text] (`zimg`, not scaled)."""
        vision = self.config.vision
        with heap.reusing_activations(images.shape[0] * vision.num_patches * vision.width * 4):
            return self.projector(self.vision(images))

    def embed_inputs(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Image tokens followed by text tokens: [B, N + T, D_text]."""
        return torch.cat([self.embed_image(images), self.decoder.embed_tokens(tokens)], dim=1)

    def forward(
        self,
        images: torch.Tensor,
        tokens: torch.Tensor,
        mask_ar: torch.Tensor,
        input_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Training-style forward over image + text, no cache.

        images [B, 3, H, W]; tokens, mask_ar [B, T]; input_mask [B, T] bool, default all True
        (as big_vision's `Model.__call__`, which has no input mask; padding placed last with
        mask_ar=1 cannot affect real tokens either way). Returns text logits [B, T, V] in
        float32: the logit at position t predicts token t + 1.
        """
        x = self.embed_inputs(images, tokens)
        b, n_img = x.shape[0], x.shape[1] - tokens.shape[1]
        if input_mask is None:
            input_mask = torch.ones_like(tokens, dtype=torch.bool)
        full_valid = torch.cat([input_mask.new_ones(b, n_img), input_mask.bool()], dim=1)
        full_ar = torch.cat([mask_ar.new_zeros(b, n_img), mask_ar], dim=1)
        positions = torch.cumsum(full_valid, dim=1) - 1
        hidden = self.decoder(x, positions, make_attn_mask(full_valid, full_ar))
        return self.decoder.logits(hidden[:, n_img:])

    @property
    def device(self) -> torch.device:
        return self.projector.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the activations: float32, whatever the weights are stored in (`layers`)."""
        return torch.float32
