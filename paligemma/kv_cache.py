"""Preallocated key/value cache for one decoder layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class RowSlots:
    """Per-row write slots of a one-token step whose rows are at different lengths
    (continuous batching, `paligemma.scheduler`): row b writes slot `slots[b]`; keys/values
    `[0, end)` are returned, `end` > every slot (masking hides each row's unused slots)."""

    slots: torch.Tensor  # [B] long
    end: int


class KVCache(nn.Module):
    """Static buffers `k`, `v`: [B, K, S, H] (batch, kv heads, slots, head_dim).

    Writes go to slots `[index, index + T)`; reads return slots `[0, index + T)` cast to the
    activation dtype. With `dtype=torch.bfloat16` keys/values are rounded when written and
    attention (prefill included) reads the rounded values, as big_vision's default
    `cache_dtype="bfloat16"` does.
    """

    def __init__(
        self,
        batch: int,
        num_kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        shape = (batch, num_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def update(
        self, index: int | RowSlots, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v: [B, K, T, H] written at `index`; returns all keys/values up to index + T.

        With `RowSlots` (T == 1), row b is written at its own slot and the first B rows of the
        cache, slots [0, end), are returned: [B, K, end, H].
        """
        if isinstance(index, RowSlots):
            b = k.shape[0]
            rows = torch.arange(b, device=k.device)
            self.k[rows, :, index.slots] = k[:, :, 0].to(self.k.dtype)
            self.v[rows, :, index.slots] = v[:, :, 0].to(self.v.dtype)
            return self.k[:b, :, : index.end].to(k.dtype), self.v[:b, :, : index.end].to(v.dtype)
        end = index + k.shape[2]
        if end > self.max_len:
            raise ValueError(
                f"KV cache overflow: writing slots [{index}, {end}) into a cache "
                f"of {self.max_len} slots"
            )
        self.k[:, :, index:end] = k
        self.v[:, :, index:end] = v
        return self.k[:, :, :end].to(k.dtype), self.v[:, :, :end].to(v.dtype)
