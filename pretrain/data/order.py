"""The global sample order as pure functions of (seed, epoch, position): no state, no randomness drawn
at run time, so any rank or dataloader worker at any world size computes the same answer.

Two layers:
- `Mixer` turns a global position into (source, position within that source) with a fixed interleave
  per block of `block` positions: each source gets its weight's share of every block, spread evenly
  through it, so the counts after any prefix are within one block-rounding of the weights.
- `SourceOrder` turns a position within a source into (shard, sample in shard): epoch e = q // N is a
  permutation of the shards keyed by (seed, source, e) and, inside each shard, a permutation keyed by
  (seed, source, e, shard). Epochs roll over forever.
"""

from __future__ import annotations

import zlib
from collections import OrderedDict

import numpy as np


class Mixer:
    """Deterministic interleave of sources by weight; `locate` and `counts` are O(1) per position."""

    def __init__(self, weights: list[float], block: int = 10_000):
        w = np.asarray(weights, dtype=np.float64)
        if len(w) == 1:
            block = 1
        self.block = block
        # Largest-remainder rounding of weight * block, every source at least one slot.
        exact = w / w.sum() * block
        n = np.maximum(np.floor(exact).astype(np.int64), 1)
        for i in np.argsort(-(exact - np.floor(exact)), kind="stable")[: block - n.sum()]:
            n[i] += 1
        while n.sum() > block:  # only when the at-least-one rule overfilled the block
            n[np.argmax(n)] -= 1
        self.per_block = n
        # Item j of source i sits at (j + 0.5) / n_i through the block: an even spread.
        src = np.concatenate([np.full(k, i) for i, k in enumerate(n)])
        rank = np.concatenate([np.arange(k) for k in n])
        order = np.lexsort((src, (rank + 0.5) / n[src]))
        self.src, self.rank = src[order], rank[order]
        self.prefix = np.zeros((block + 1, len(n)), dtype=np.int64)
        self.prefix[1:] = np.cumsum(np.eye(len(n), dtype=np.int64)[self.src], axis=0)

    def locate(self, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Global positions -> (source index, position within that source)."""
        b, t = np.divmod(pos, self.block)
        s = self.src[t]
        return s, b * self.per_block[s] + self.rank[t]

    def counts(self, pos: int) -> np.ndarray:
        """Samples of each source among global positions [0, pos)."""
        b, t = divmod(pos, self.block)
        return b * self.per_block + self.prefix[t]


def _rng(*key: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([k & 0xFFFFFFFF for k in key])))


def source_salt(name: str) -> int:
    """A source's part of the seed: from its name, so list order does not reshuffle a source."""
    return zlib.crc32(name.encode())


class SourceOrder:
    """Per-source shuffled order over shards of the given sizes."""

    def __init__(self, sizes: list[int], seed: int, salt: int, cache: int = 16):
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self.total = int(self.sizes.sum())
        self.seed, self.salt = seed, salt
        self._epochs: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._inner: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._cache = cache

    def shard_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard permutation, end offset of each permuted shard) of one epoch."""
        hit = self._epochs.get(epoch)
        if hit is None:
            perm = _rng(self.seed, self.salt, epoch).permutation(len(self.sizes))
            hit = (perm, np.cumsum(self.sizes[perm]))
            self._epochs[epoch] = hit
            if len(self._epochs) > 4:
                self._epochs.popitem(last=False)
        return hit

    def inner(self, epoch: int, shard: int) -> np.ndarray:
        """Permutation of the samples of `shard` in `epoch`."""
        key = (epoch, shard)
        hit = self._inner.get(key)
        if hit is None:
            hit = _rng(self.seed, self.salt, epoch, shard + 1).permutation(int(self.sizes[shard]))
            self._inner[key] = hit
            if len(self._inner) > self._cache:
                self._inner.popitem(last=False)
        else:
            self._inner.move_to_end(key)
        return hit

    def locate(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Positions within the source -> arrays (epoch, index in the epoch's shard order, shard, offset in
        the shard's permutation)."""
        epoch, o = np.divmod(np.asarray(q, dtype=np.int64), self.total)
        j = np.empty_like(o)
        shard = np.empty_like(o)
        for e in np.unique(epoch).tolist():
            sel = epoch == e
            perm, ends = self.shard_order(e)
            j[sel] = np.searchsorted(ends, o[sel], side="right")
            shard[sel] = perm[j[sel]]
        return epoch, j, shard, o - (self._ends_of(epoch, j) - self.sizes[shard])

    def _ends_of(self, epoch: np.ndarray, j: np.ndarray) -> np.ndarray:
        out = np.empty_like(j)
        for e in np.unique(epoch).tolist():
            sel = epoch == e
            out[sel] = self.shard_order(e)[1][j[sel]]
        return out
