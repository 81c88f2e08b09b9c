"""Key/value cache for incremental decoding: the keys (after RoPE) and values of every layer for the tokens
seen so far, so each new token costs one token's projections instead of a forward over the whole sequence.

Buffers are allocated once per layer, at the first append, for `max_len` tokens (the model's
max_seq_len): decoding then writes in place and never re-allocates. Every row of the batch has the same
length (no ragged batches: `generate` decodes one prompt at a time). Nothing here is a parameter or a
buffer of the model, so the cache never enters a state_dict and ZeRO-3 never sees it.
"""

from __future__ import annotations

import torch


class LayerCache:
    """One layer's keys and values, (B, H_kv, max_len, D) each; the first `length` positions are filled."""

    def __init__(self, max_len: int):
        self.max_len = max_len
        self.length = 0
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v (B, H_kv, T, D) after the cached ones; return all keys and values so far (views)."""
        b, h, t, d = k.shape
        if self.k is None:
            self.k = k.new_empty((b, h, self.max_len, d))
            self.v = v.new_empty((b, h, self.max_len, d))
        elif (b, h, d) != (self.k.shape[0], self.k.shape[1], self.k.shape[3]):
            raise ValueError(f"KV cache holds (B, H, D) = {(self.k.shape[0], self.k.shape[1], self.k.shape[3])}, "
                             f"got {(b, h, d)}")
        end = self.length + t
        if end > self.max_len:
            raise ValueError(f"KV cache is full: {self.length} + {t} tokens exceed its {self.max_len}")
        self.k[:, :, self.length:end] = k
        self.v[:, :, self.length:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


class KVCache:
    """The cache of a whole model: one `LayerCache` per block, all advancing together."""

    def __init__(self, n_layers: int, max_len: int):
        self.layers = [LayerCache(max_len) for _ in range(n_layers)]

    @property
    def length(self) -> int:
        """Tokens cached so far (the position of the next token)."""
        return self.layers[0].length

    @property
    def max_len(self) -> int:
        return self.layers[0].max_len
