"""The training stream: this rank's micro-batches of the global sample order, with a state that says
exactly how far the caller has got. Each batch carries its rows' global positions, the key that
per-sample randomness (masks, noise) is derived from.

Positions: step s's global batch is global positions [s*G, (s+1)*G), G = micro_batch * grad_accum * W.
Rank r takes the contiguous slice [s*G + r*mb*A, s*G + (r+1)*mb*A) and its micro-batch k is the k-th mb
rows of it. Every rank reads the shards covering its positions and keeps only its rows, so the result is
exact at any world size, and a state written at one (W, A) loads at another with the same G.

Dataloader workers: micro-batches are grouped in chunks of a few shards' worth of this rank's rows;
worker w of n builds chunks w, w+n, ..., which torch's DataLoader returns in order. A worker mostly reads
shards no other worker of its rank reads. Errors come back as values so the message stays one line.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pretrain.data.errors import DataError
from pretrain.data.manifest import Source
from pretrain.data.order import Mixer, SourceOrder, source_salt
from pretrain.data.shards import read_shard

STATE_VERSION = 1


@dataclass
class Layout:
    """Which rows of the global order belong to this rank: fixed for the lifetime of a stream."""

    seed: int
    rank: int
    world_size: int
    micro_batch_size: int
    grad_accum: int

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.grad_accum * self.world_size

    def positions(self, micro: int) -> np.ndarray:
        """Global positions of this rank's micro-batch number `micro` (= step * grad_accum + k)."""
        step, k = divmod(micro, self.grad_accum)
        start = step * self.global_batch + (self.rank * self.grad_accum + k) * self.micro_batch_size
        return np.arange(start, start + self.micro_batch_size, dtype=np.int64)


class ShardReader:
    """Decoded shards of the sources, an LRU of a few, with corrupt-shard detection and (if configured)
    deterministic substitution: a sample of a corrupt shard is replaced by the same offset of the next
    healthy shard in that epoch's shard order, and the corrupt shard is counted."""

    def __init__(self, sources: list[Source], seq_len: int, seed: int, skip_corrupt: bool, cache: int = 2):
        self.sources, self.seq_len, self.skip_corrupt = sources, seq_len, skip_corrupt
        self.orders = [SourceOrder([s["samples"] for s in src.shards], seed, source_salt(src.name)) for src in sources]
        self._cache: OrderedDict[tuple[int, int], tuple[list[str], np.ndarray]] = OrderedDict()
        self._max = cache * len(sources)  # a step may straddle two shards of every source
        self.corrupt: set[str] = set()

    def shard(self, i: int, j: int) -> tuple[list[str], np.ndarray] | None:
        """(keys, tokens [n, seq_len + 1]) of shard j of source i; None if corrupt and skipping."""
        hit = self._cache.get((i, j))
        if hit is not None:
            self._cache.move_to_end((i, j))
            return hit
        src, entry = self.sources[i], self.sources[i].shards[j]
        label = src.urls[j]
        if label in self.corrupt:
            return None
        try:
            samples = read_shard(label, sha256=entry.get("sha256"), nbytes=entry.get("bytes"), label=label)
            hit = _decode(samples, self.seq_len, entry["samples"], src.manifest.get("member", ""), label)
        except DataError:
            if not self.skip_corrupt:
                raise
            self.corrupt.add(label)
            return None
        self._cache[(i, j)] = hit
        if len(self._cache) > self._max:
            self._cache.popitem(last=False)
        return hit

    def rows(self, i: int, q: np.ndarray, out: np.ndarray) -> list[str]:
        """Fill `out` with positions q of source i's shuffled order; returns their keys."""
        order = self.orders[i]
        epoch, j, shard, off = order.locate(q)
        keys: list[str] = [""] * len(q)
        for e, sh in sorted({(int(a), int(b)) for a, b in zip(epoch.tolist(), shard.tolist(), strict=True)}):
            sel = np.flatnonzero((epoch == e) & (shard == sh))
            got = self.shard(i, sh)
            if got is None:  # corrupt and skipped: the same offsets of the next healthy shard
                got, sh = self._substitute(i, e, int(j[sel[0]]))
            idx = order.inner(e, sh)[off[sel] % len(got[0])]
            out[sel] = got[1][idx]
            for n, k in zip(sel.tolist(), idx.tolist(), strict=True):
                keys[n] = got[0][k]
        return keys

    def _substitute(self, i: int, epoch: int, j: int) -> tuple[tuple[list[str], np.ndarray], int]:
        perm, _ = self.orders[i].shard_order(epoch)
        for step in range(1, len(perm)):
            cand = int(perm[(j + step) % len(perm)])
            got = self.shard(i, cand)
            if got is not None:
                return got, cand
        raise DataError(f"source {self.sources[i].name}: every shard is corrupt")


def _decode(samples, seq_len: int, expected: int, member: str, label: str) -> tuple[list[str], np.ndarray]:
    """Raw samples -> keys and one compact token array (one frombuffer over the joined payloads)."""
    if len(samples) != expected:
        raise DataError(f"shard {label}: {len(samples)} samples, the manifest says {expected}")
    dtype = {"tokens.u16": "<u2", "tokens.u32": "<u4"}.get(member)
    if dtype is None:
        raise DataError(f"shard {label}: unknown token member '{member}'")
    keys, payloads = [], []
    for key, members in samples:
        data = members.get(member)
        if data is None or len(members) != 1 or len(data) != (seq_len + 1) * np.dtype(dtype).itemsize:
            raise DataError(f"shard {label}: sample {key} is not one {member} of {seq_len + 1} tokens")
        keys.append(key)
        payloads.append(data)
    return keys, np.frombuffer(b"".join(payloads), dtype=dtype).reshape(len(keys), seq_len + 1)


class _Chunks(IterableDataset):
    """Chunks of consecutive micro-batches from micro `start` on; in a DataLoader worker, every n-th."""

    def __init__(self, sources, seq_len, layout: Layout, mixer: Mixer, skip_corrupt: bool, start: int, chunk: int):
        self.sources, self.seq_len, self.layout, self.mixer = sources, seq_len, layout, mixer
        self.skip_corrupt, self.start, self.chunk = skip_corrupt, start, chunk

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        reader = ShardReader(self.sources, self.seq_len, self.layout.seed, self.skip_corrupt)
        c = wid
        while True:
            first = self.start + c * self.chunk
            try:
                batches = [build_batch(reader, self.mixer, self.sources, self.layout.positions(m))
                           for m in range(first, first + self.chunk)]
            except DataError as e:
                yield {"error": str(e)}
                return
            # One tensor per chunk: each tensor crossing from a worker costs a shared-memory handle.
            yield {"input_ids": torch.stack([b["input_ids"] for b in batches]),
                   "positions": torch.stack([b["positions"] for b in batches]), "keys": [b["keys"] for b in batches],
                   "source": [b["source"] for b in batches], "corrupt": sorted(reader.corrupt)}
            c += nw


def build_batch(reader: ShardReader, mixer: Mixer, sources: list[Source], pos: np.ndarray) -> dict:
    """The batch dict for global positions `pos`."""
    src, q = mixer.locate(pos)
    ids = np.empty((len(pos), reader.seq_len + 1), dtype=np.int64)
    keys: list[str] = [""] * len(pos)
    for i in np.unique(src).tolist():
        sel = np.flatnonzero(src == i)
        part = np.empty((len(sel), reader.seq_len + 1), dtype=np.int64)
        for n, k in zip(sel.tolist(), reader.rows(i, q[sel], part), strict=True):
            keys[n] = k
        ids[sel] = part
    return {"input_ids": torch.from_numpy(ids), "positions": torch.from_numpy(pos.astype(np.int64)), "keys": keys,
            "source": [sources[i].name for i in src.tolist()]}


class TrainStream:
    """Infinite iterator of this rank's micro-batches; see the module docstring for the order."""

    def __init__(self, sources: list[Source], weights: list[float], seq_len: int, layout: Layout,
                 num_workers: int = 0, skip_corrupt: bool = False):
        self.sources, self.seq_len, self.layout = sources, seq_len, layout
        self.mixer = Mixer(weights)
        self.num_workers, self.skip_corrupt = num_workers, skip_corrupt
        self._micro = 0  # micro-batches handed to the caller, counted from step 0
        self._corrupt: set[str] = set()
        self._it = None
        self._pending: list[dict] = []
        mean_shard = np.mean([s["samples"] for src in sources for s in src.shards])
        per_rank = layout.micro_batch_size * layout.world_size
        bytes_per_micro = layout.micro_batch_size * (seq_len + 1) * 8
        # Four shards' worth of this rank's rows per chunk (within 64 MiB of int64 tokens): a chunk rarely
        # starts on a shard boundary, so its worker reads ~5 shards for 4 shards of rows.
        self._chunk = 1 if num_workers == 0 else int(
            max(1, min(math.ceil(4 * mean_shard / per_rank), (64 << 20) // bytes_per_micro))
        )

    def __iter__(self) -> TrainStream:
        return self

    def _start(self) -> None:
        ds = _Chunks(self.sources, self.seq_len, self.layout, self.mixer, self.skip_corrupt, self._micro, self._chunk)
        if self.num_workers == 0:
            self._it = iter(ds)
        else:
            self._it = iter(DataLoader(ds, batch_size=None, num_workers=self.num_workers, prefetch_factor=2))
        self._pending = []

    def __next__(self) -> dict:
        if not self._pending:
            if self._it is None:
                self._start()
            item = next(self._it)
            if "error" in item:
                self.close()
                raise DataError(item["error"])
            self._corrupt.update(item["corrupt"])
            self._pending = [{"input_ids": ids, "positions": pos, "keys": k, "source": s}
                             for ids, pos, k, s in zip(item["input_ids"], item["positions"], item["keys"],
                                                       item["source"], strict=True)]
            self._pending.reverse()  # pop() from the end is O(1)
        self._micro += 1
        return self._pending.pop()

    def close(self) -> None:
        """Stop the dataloader workers (they restart on the next `next`)."""
        self._it, self._pending = None, []

    # ------------------------------------------------------------------------------------------- state
    def _position(self) -> int:
        """Global positions consumed by all ranks together (exact at step boundaries)."""
        step, k = divmod(self._micro, self.layout.grad_accum)
        return step * self.layout.global_batch + k * self.layout.micro_batch_size * self.layout.world_size

    def state_dict(self) -> dict:
        L = self.layout
        step, k = divmod(self._micro, L.grad_accum)
        counts = self.mixer.counts(step * L.global_batch)
        return {
            "version": STATE_VERSION, "seed": L.seed, "global_batch": L.global_batch, "step": step,
            "micro_in_step": k, "grad_accum": L.grad_accum, "world_size": L.world_size,
            "position": self._position(), "seq_len": self.seq_len,
            "sources": {s.name: {"samples": int(n), "weight_share": int(w)}
                        for s, n, w in zip(self.sources, counts, self.mixer.per_block, strict=True)},
            "corrupt_shards": sorted(self._corrupt),
        }

    def load_state_dict(self, state: dict) -> None:
        L = self.layout
        if state.get("version") != STATE_VERSION:
            raise DataError(f"data state: version {state.get('version')} is not {STATE_VERSION}")
        for key, mine in (("global_batch", L.global_batch), ("seed", L.seed), ("seq_len", self.seq_len)):
            if state[key] != mine:
                raise DataError(f"data state: {key} was {state[key]}, this run has {mine}; the sample order would change")
        names = [s.name for s in self.sources]
        if list(state["sources"]) != names:
            raise DataError(f"data state: sources were {list(state['sources'])}, this run has {names}")
        if state["micro_in_step"] and (state["grad_accum"], state["world_size"]) != (L.grad_accum, L.world_size):
            raise DataError("data state: saved mid-step; it resumes only at the same world size and grad_accum")
        self.close()
        self._micro = state["step"] * L.grad_accum + state["micro_in_step"]
        self._corrupt = set(state.get("corrupt_shards", []))

    def stats(self) -> dict:
        """Tokens and epochs of each source over all ranks at the last step boundary, corrupt shards."""
        L = self.layout
        counts = self.mixer.counts((self._micro // L.grad_accum) * L.global_batch)
        out: dict = {}
        for src, n in zip(self.sources, counts, strict=True):
            out[f"tokens/{src.name}"] = int(n) * self.seq_len
            out[f"epoch/{src.name}"] = int(n) / src.samples
        out["corrupt_shards_skipped"] = len(self._corrupt)
        return out
