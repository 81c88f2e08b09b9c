"""`ShardReader`: decoded shards of the sources, kept in a small LRU, read at positions of each source's
shuffled order, with corrupt-shard detection and (if configured) deterministic substitution."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from pretrain.data.decode import Decoded, decode
from pretrain.data.manifest import Source
from pretrain.data.order import SourceOrder, source_salt
from pretrain.data.sample_spec import SampleSpec
from pretrain.data.shards import UnreadableShard, read_shard
from pretrain.errors import DataError


class ShardReader:
    """Decoded shards of the sources, an LRU of a few, with corrupt-shard detection and (if configured)
    deterministic substitution: a sample of a corrupt shard is replaced by the same offset of the next
    healthy shard in that epoch's shard order, and the corrupt shard is counted."""

    def __init__(self, sources: list[Source], spec: SampleSpec, seed: int, skip_corrupt: bool,
                 cache: int = 2):
        self.sources, self.spec, self.skip_corrupt = sources, spec, skip_corrupt
        self.orders = [SourceOrder([s["samples"] for s in src.shards], seed, source_salt(src.name)) for src in sources]
        self._cache: OrderedDict[tuple[int, int], Decoded] = OrderedDict()
        self._max = cache * len(sources)  # a step may straddle two shards of every source
        self.corrupt: set[str] = set()

    def shard(self, i: int, j: int) -> Decoded | None:
        """(keys, {field: array [n, ...]}) of shard j of source i; None if corrupt and skipping."""
        hit = self._cache.get((i, j))
        if hit is not None:
            self._cache.move_to_end((i, j))
            return hit
        entry, label = self.sources[i].shards[j], self.sources[i].urls[j]
        if label in self.corrupt:
            return None
        try:
            samples = read_shard(label, sha256=entry.get("sha256"), nbytes=entry["bytes"], label=label)
            vocab = self.sources[i].manifest.get("vocab_size")  # token and sft manifests have one
            hit = decode(samples, self.spec, entry["samples"], label, None if vocab is None else int(vocab))
        except DataError as e:
            if not self.skip_corrupt or isinstance(e, UnreadableShard):  # a failed read is never "corrupt"
                raise
            self.corrupt.add(label)
            return None
        self._cache[(i, j)] = hit
        if len(self._cache) > self._max:
            self._cache.popitem(last=False)
        return hit

    def rows(self, i: int, q: np.ndarray, out: dict[str, np.ndarray]) -> list[str]:
        """Fill the arrays of `out` (one per field) with positions q of source i's shuffled order; returns
        their keys."""
        order = self.orders[i]
        epoch, j, shard, off = order.locate(q)
        keys: list[str] = [""] * len(q)
        for e, sh in sorted({(int(a), int(b)) for a, b in zip(epoch.tolist(), shard.tolist(), strict=True)}):
            sel = np.flatnonzero((epoch == e) & (shard == sh))
            got = self.shard(i, sh)
            if got is None:  # corrupt and skipped: the same offsets of the next healthy shard
                got, sh = self._substitute(i, e, int(j[sel[0]]))
            idx = order.inner(e, sh)[off[sel] % len(got[0])]
            for name, arr in out.items():
                arr[sel] = got[1][name][idx]  # also widens the stored dtype (u16 tokens, fp16 latents)
            for n, k in zip(sel.tolist(), idx.tolist(), strict=True):
                keys[n] = got[0][k]
        return keys

    def _substitute(self, i: int, epoch: int, j: int) -> tuple[Decoded, int]:
        perm, _ = self.orders[i].shard_order(epoch)
        for step in range(1, len(perm)):
            cand = int(perm[(j + step) % len(perm)])
            got = self.shard(i, cand)
            if got is not None:
                return got, cand
        raise DataError(f"source {self.sources[i].name}: every shard is corrupt")
