"""The training stream: this rank's micro-batches of the global sample order, with a state that says
exactly how far the caller has got. Each batch carries its rows' global positions, the key that
per-sample randomness (masks, noise) is derived from.

Positions: step s's global batch is global positions [s*G, (s+1)*G), G = micro_batch * grad_accum * W.
Rank r takes the contiguous slice [s*G + r*mb*A, s*G + (r+1)*mb*A) and its micro-batch k is the k-th mb
rows of it. Every rank reads the shards covering its positions and keeps only its rows, so the result is
exact at any world size, and a state written at one (W, A) loads at another with the same G.

What a sample holds comes from the manifest's kind (`pretrain.data.sample_spec`); a batch holds the
spec's fields, and its `positions` are always the rows' global sample positions. Shards are read and
decoded by `pretrain.data.reader.ShardReader`.

Dataloader workers: micro-batches are grouped in chunks of a few shards' worth of this rank's rows;
worker w of n builds chunks w, w+n, ..., which torch's DataLoader returns in order. A worker mostly reads
shards no other worker of its rank reads. Errors come back as values so the message stays one line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pretrain.data.manifest import Source, shard_name
from pretrain.data.order import Mixer, SourceOrder, source_salt
from pretrain.data.reader import ShardReader
from pretrain.data.sample_spec import SampleSpec
from pretrain.errors import DataError

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


class _Chunks(IterableDataset):
    """Chunks of consecutive micro-batches from micro `start` on; in a DataLoader worker, every n-th."""

    def __init__(self, sources, spec: SampleSpec, layout: Layout, mixer: Mixer, skip_corrupt: bool,
                 start: int, chunk: int):
        self.sources, self.spec, self.layout, self.mixer = sources, spec, layout, mixer
        self.skip_corrupt, self.start, self.chunk = skip_corrupt, start, chunk

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        reader = ShardReader(self.sources, self.spec, self.layout.seed, self.skip_corrupt)
        c = wid
        while True:
            first = self.start + c * self.chunk
            try:
                batches = [build_batch(reader, self.mixer, self.sources, self.layout.positions(m))
                           for m in range(first, first + self.chunk)]
            except DataError as e:
                yield {"error": str(e)}
                return
            # One tensor per field per chunk: each tensor crossing from a worker costs a shared-memory handle.
            names = (*self.spec.fields, "positions")
            yield {**{name: torch.stack([b[name] for b in batches]) for name in names},
                   "keys": [b["keys"] for b in batches], "source": [b["source"] for b in batches],
                   "corrupt": sorted(reader.corrupt)}
            c += nw


def build_batch(reader: ShardReader, mixer: Mixer, sources: list[Source], pos: np.ndarray) -> dict:
    """The batch dict for global positions `pos`: the spec's fields, then positions, keys, source."""
    src, q = mixer.locate(pos)
    out = {name: np.empty((len(pos), *shape), dtype) for name, (shape, dtype) in reader.spec.fields.items()}
    keys: list[str] = [""] * len(pos)
    for i in np.unique(src).tolist():
        sel = np.flatnonzero(src == i)
        whole = len(sel) == len(pos)  # one source (the common case): fill the batch in place
        part = out if whole else {n: np.empty((len(sel), *a.shape[1:]), a.dtype) for n, a in out.items()}
        for n, k in zip(sel.tolist(), reader.rows(i, q[sel], part), strict=True):
            keys[n] = k
        if not whole:
            for name, a in out.items():
                a[sel] = part[name]
    batch = {name: torch.from_numpy(a) for name, a in out.items()}
    batch.update(positions=torch.from_numpy(pos.astype(np.int64)), keys=keys,
                 source=[sources[i].name for i in src.tolist()])
    return batch


class TrainStream:
    """Infinite iterator of this rank's micro-batches; see the module docstring for the order."""

    def __init__(self, sources: list[Source], weights: list[float], spec: SampleSpec, layout: Layout,
                 num_workers: int = 0, skip_corrupt: bool = False):
        self.sources, self.spec, self.layout = sources, spec, layout
        self.seq_len = spec.seq_len  # None for images
        self.mixer = Mixer(weights)
        self.num_workers, self.skip_corrupt = num_workers, skip_corrupt
        self._micro = 0  # micro-batches handed to the caller, counted from step 0
        self._corrupt: set[str] = set()
        self._it = None
        self._pending: list[dict] = []
        mean_shard = np.mean([s["samples"] for src in sources for s in src.shards])
        per_rank = layout.micro_batch_size * layout.world_size
        bytes_per_micro = layout.micro_batch_size * spec.nbytes
        # Four shards' worth of this rank's rows per chunk (within 64 MiB of batch tensors): a chunk rarely
        # starts on a shard boundary, so its worker reads ~5 shards for 4 shards of rows.
        self._chunk = 1 if num_workers == 0 else int(
            max(1, min(math.ceil(4 * mean_shard / per_rank), (64 << 20) // bytes_per_micro))
        )

    def __iter__(self) -> TrainStream:
        return self

    def _start(self) -> None:
        ds = _Chunks(self.sources, self.spec, self.layout, self.mixer, self.skip_corrupt, self._micro,
                     self._chunk)
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
            cols = [(name, item[name]) for name in (*self.spec.fields, "positions")]
            rows = zip(item["keys"], item["source"], strict=True)
            self._pending = [{**{name: col[m] for name, col in cols}, "keys": keys, "source": source}
                             for m, (keys, source) in enumerate(rows)]
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
        shape_key, shape = self.spec.state_entry()
        return {
            "version": STATE_VERSION, "seed": L.seed, "global_batch": L.global_batch, "step": step,
            "micro_in_step": k, "grad_accum": L.grad_accum, "world_size": L.world_size,
            "position": self._position(), shape_key: shape,
            "sources": {s.name: {"samples": int(n), "weight_share": int(w)}
                        for s, n, w in zip(self.sources, counts, self.mixer.per_block, strict=True)},
            "corrupt_shards": sorted(self._corrupt),
        }

    def load_state_dict(self, state: dict) -> None:
        L = self.layout
        if state.get("version") != STATE_VERSION:
            raise DataError(f"data state: version {state.get('version')} is not {STATE_VERSION}")
        shape_key, shape = self.spec.state_entry()
        if shape_key not in state:
            raise DataError(f"data state: it has no {shape_key}; a run on another kind of data wrote it")
        for key, mine in (("global_batch", L.global_batch), ("seed", L.seed), (shape_key, shape)):
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

    def skip_to(self, step: int) -> None:
        """Continue at the start of step `step` (counted from 0): the steps before it count as consumed."""
        self.close()
        self._micro = step * self.layout.grad_accum

    def samples_of(self, step: int) -> list[dict]:
        """Where the global batch of step `step` (counted from 0, over all ranks) comes from: per source and
        shard, the shard's file name and the indices of its samples in file order. A pure function of the
        step and the config, like the order itself (a corrupt shard's substitute, chosen at read time, is
        not shown)."""
        G = self.layout.global_batch
        src, q = self.mixer.locate(np.arange(step * G, (step + 1) * G, dtype=np.int64))
        out = []
        for i in np.unique(src).tolist():
            source = self.sources[i]
            order = SourceOrder([s["samples"] for s in source.shards], self.layout.seed, source_salt(source.name))
            epoch, _, shard, off = order.locate(q[src == i])
            for e, sh in sorted({(int(a), int(b)) for a, b in zip(epoch.tolist(), shard.tolist(), strict=True)}):
                sel = (epoch == e) & (shard == sh)
                idx = order.inner(e, sh)[off[sel]]
                out.append({"source": source.name, "shard": shard_name(source.urls[sh]),
                            "samples": sorted(int(k) for k in idx)})
        return out

    def stats(self) -> dict:
        """Per source over all ranks at the last step boundary: tokens (token data) or samples (images) and
        epochs; and the corrupt shards skipped."""
        L = self.layout
        counts = self.mixer.counts((self._micro // L.grad_accum) * L.global_batch)
        out: dict = {}
        for src, n in zip(self.sources, counts, strict=True):
            if self.spec.kind in ("tokens", "sft"):  # sft: tokens the model saw, padding included
                out[f"tokens/{src.name}"] = int(n) * self.seq_len
            else:
                out[f"samples/{src.name}"] = int(n)
            out[f"epoch/{src.name}"] = int(n) / src.samples
        out["corrupt_shards_skipped"] = len(self._corrupt)
        return out
