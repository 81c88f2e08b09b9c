"""The training stream: this rank's micro-batches of the global sample order, with a state that says
exactly how far the caller has got. Each batch carries its rows' global positions, the key that
per-sample randomness (masks, noise) is derived from.

Positions: step s's global batch is global positions [s*G, (s+1)*G), G = micro_batch * grad_accum * W.
Rank r takes the contiguous slice [s*G + r*mb*A, s*G + (r+1)*mb*A) and its micro-batch k is the k-th mb
rows of it. Every rank reads the shards covering its positions and keeps only its rows, so the result is
exact at any world size, and a state written at one (W, A) loads at another with the same G.

What a sample holds comes from the manifest's kind (`SampleSpec`): token rows (`input_ids`, and `bytes`,
the UTF-8 bytes of text the row's targets cover, where the writer recorded them: bits per byte), packed
supervised rows (`input_ids`, `targets`, `segment_ids`, and `token_positions` that restart at 0 at each
document, derived from the segment ids), or images (`images` channels-first, uint8 pixels or float32 VAE
latents, and `labels`). A batch's `positions` are always the rows' global sample positions. A shard decodes into one
fixed-shape array per field, so a batch is a gather, whatever the kind. Nothing read is executed or
unpickled: `.npy` payloads go through numpy's header parser with pickles refused.

Dataloader workers: micro-batches are grouped in chunks of a few shards' worth of this rank's rows;
worker w of n builds chunks w, w+n, ..., which torch's DataLoader returns in order. A worker mostly reads
shards no other worker of its rank reads. Errors come back as values so the message stays one line.
"""

from __future__ import annotations

import dataclasses
import io
import math
from collections import OrderedDict
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pretrain.data.manifest import Source
from pretrain.data.order import Mixer, SourceOrder, source_salt
from pretrain.data.shards import UnreadableShard, read_shard
from pretrain.errors import DataError

STATE_VERSION = 1
TOKEN_DTYPES = {"tokens.u16": "<u2", "tokens.u32": "<u4"}
IMAGE_MEMBERS = {"pixels": "image.npy", "latents": "latent.npy"}  # by the manifest's `encoding`
SFT_MEMBERS = ("input_ids.i32", "segment_ids.i32", "targets.i32")  # little-endian int32 rows (write_sft)
BYTES_MEMBER = "bytes.u32"  # token rows: UTF-8 bytes the targets cover (write_text; absent in older shards)


@dataclass(frozen=True)
class SampleSpec:
    """What one sample of a source holds, read from its manifest: the payload member, the payload's shape
    in the shard, and the shape a batch carries it in (tokens: seq_len + 1; sft: seq_len; images: C, H, W)."""

    kind: str  # "tokens", "sft" or "images"
    member: str  # tokens.u16 | tokens.u32 | input_ids.i32 (sft: one of three) | image.npy | latent.npy
    stored: tuple[int, ...]  # payload shape in the shard (pixels: HxW or HxWxC)
    shape: tuple[int, ...]  # per-sample shape in a batch
    num_classes: int = 0
    text_bytes: bool = False  # token rows carry their text's byte count (`bytes`)

    @property
    def seq_len(self) -> int | None:
        """Tokens the model sees per row: a token row holds one more (its last token is only a target)."""
        return {"tokens": self.shape[0] - 1, "sft": self.shape[0]}.get(self.kind)

    @cached_property
    def fields(self) -> dict[str, tuple[tuple[int, ...], type]]:
        """Batch fields: name -> (per-sample shape, numpy dtype); built once, read per batch."""
        if self.kind == "tokens":
            return {"input_ids": (self.shape, np.int64), **({"bytes": ((), np.int64)} if self.text_bytes else {})}
        if self.kind == "sft":
            return {name: (self.shape, np.int64) for name in ("input_ids", "targets", "segment_ids", "token_positions")}
        return {"images": (self.shape, np.float32 if self.member == "latent.npy" else np.uint8),
                "labels": ((), np.int64)}

    @property
    def nbytes(self) -> int:
        """Bytes of one sample in a batch."""
        return sum(math.prod(s) * np.dtype(d).itemsize for s, d in self.fields.values())

    def state_entry(self) -> tuple[str, object]:
        """The data-state entry that pins the sample format (tokens keep `seq_len`, as older checkpoints;
        sft rows their own key, so a pretraining run's state never loads into a fine-tune's stream)."""
        if self.kind == "tokens":
            return ("seq_len", self.seq_len)
        if self.kind == "sft":
            return ("sft_seq_len", self.seq_len)
        return ("sample_shape", list(self.shape))


def spec_of(src: Source, setting: str) -> SampleSpec:
    """A source's SampleSpec; DataError naming `setting` for a manifest the stream cannot read."""
    m = src.manifest
    if m["kind"] == "tokens":
        if m.get("member") not in TOKEN_DTYPES:
            raise DataError(f"{setting}: {src.path} has unknown token member '{m.get('member')}'")
        n = int(m["seq_len"]) + 1
        return SampleSpec("tokens", m["member"], (n,), (n,), text_bytes=m.get("bytes_member") == BYTES_MEMBER)
    if m["kind"] == "sft":
        if sorted(m.get("members", [])) != list(SFT_MEMBERS) or m.get("dtype") != "int32":
            raise DataError(f"{setting}: {src.path} has sft members {m.get('members')} of {m.get('dtype')}, "
                            f"not {list(SFT_MEMBERS)} of int32")
        n = int(m["seq_len"])
        return SampleSpec("sft", SFT_MEMBERS[0], (n,), (n,))
    if m["kind"] != "images":
        raise DataError(f"{setting}: {src.path} holds {m['kind']} shards, which the stream cannot read")
    encoding = m.get("encoding", "pixels")
    if encoding not in IMAGE_MEMBERS:
        raise DataError(f"{setting}: {src.path} has unknown image encoding '{encoding}' (pixels or latents)")
    shape, classes = m.get("image_shape"), m.get("classes")
    if shape is None:
        raise DataError(f"{setting}: {src.path} holds images of mixed sizes; write them at one size "
                        f"(resize the folder, or `pretrain data latents --size N`)")
    if not isinstance(classes, list) or not classes:
        raise DataError(f"{setting}: manifest of {src.path} lacks 'classes'")
    stored = tuple(int(d) for d in shape)
    if encoding == "latents" and len(stored) == 3:
        chw = stored
    elif encoding == "pixels" and len(stored) in (2, 3):
        chw = (1, *stored) if len(stored) == 2 else (stored[2], stored[0], stored[1])
    else:
        raise DataError(f"{setting}: {src.path} has image_shape {list(stored)}, not one of {encoding} images")
    return SampleSpec("images", IMAGE_MEMBERS[encoding], stored, chw, len(classes))


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


Decoded = tuple[list[str], dict[str, np.ndarray]]  # a shard's keys and one array per field, in file order


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
            samples = read_shard(label, sha256=entry.get("sha256"), nbytes=entry.get("bytes"), label=label)
            hit = _decode(samples, self.spec, entry["samples"], label)
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


def _decode(samples, spec: SampleSpec, expected: int, label: str) -> Decoded:
    """Raw samples -> keys and one compact array per field."""
    if len(samples) != expected:
        raise DataError(f"shard {label}: {len(samples)} samples, the manifest says {expected}")
    if spec.kind == "tokens":
        return _decode_tokens(samples, spec, label)
    if spec.kind == "sft":
        return _decode_sft(samples, spec, label)
    return _decode_images(samples, spec, label)


def common_spec(sources: list[Source], setting: str) -> SampleSpec:
    """The SampleSpec of sources that agree on their kind (`pretrain.data._agree`): the first one's, with
    byte counts only if every source has them (a mix with older shards streams tokens alone)."""
    spec = spec_of(sources[0], setting)
    if spec.text_bytes and not all(s.manifest.get("bytes_member") == BYTES_MEMBER for s in sources[1:]):
        spec = dataclasses.replace(spec, text_bytes=False)
    return spec


def _decode_tokens(samples, spec: SampleSpec, label: str) -> Decoded:
    """Token rows (and byte counts): one frombuffer over the joined payloads of each."""
    member, dtype, n = spec.member, TOKEN_DTYPES[spec.member], spec.shape[0]
    keys, payloads, counts = [], [], []
    for key, members in samples:
        data, nbytes = members.get(member), members.get(BYTES_MEMBER)
        extra = set(members) - {member, BYTES_MEMBER}
        if data is None or extra or len(data) != n * np.dtype(dtype).itemsize:
            raise DataError(f"shard {label}: sample {key} is not one {member} of {n} tokens")
        if spec.text_bytes:
            if nbytes is None or len(nbytes) != 4:
                raise DataError(f"shard {label}: sample {key} lacks its {BYTES_MEMBER} (4 bytes), which the "
                                f"manifest promises")
            counts.append(nbytes)
        keys.append(key)
        payloads.append(data)
    out = {"input_ids": np.frombuffer(b"".join(payloads), dtype=dtype).reshape(len(keys), n)}
    if spec.text_bytes:
        out["bytes"] = np.frombuffer(b"".join(counts), dtype="<u4")
    return keys, out


def _decode_sft(samples, spec: SampleSpec, label: str) -> Decoded:
    """Packed supervised rows: one frombuffer per member over the joined payloads, and the positions
    within each document (segment) that the segment ids imply."""
    n = spec.shape[0]
    keys: list[str] = []
    payloads: dict[str, list[bytes]] = {m: [] for m in SFT_MEMBERS}
    for key, members in samples:
        if sorted(members) != list(SFT_MEMBERS) or any(len(b) != 4 * n for b in members.values()):
            raise DataError(f"shard {label}: sample {key} is not {', '.join(SFT_MEMBERS)} of {n} int32 each")
        keys.append(key)
        for m in SFT_MEMBERS:
            payloads[m].append(members[m])
    out = {m.split(".")[0]: np.frombuffer(b"".join(p), dtype="<i4").reshape(len(keys), n)
           for m, p in payloads.items()}
    out["token_positions"] = segment_positions(out["segment_ids"])
    return keys, out


def segment_positions(segment_ids: np.ndarray) -> np.ndarray:
    """(R, N) positions that restart at 0 wherever the segment id changes (each packed document, and
    the padding after them, counts from 0), int32."""
    idx = np.broadcast_to(np.arange(segment_ids.shape[1], dtype=np.int32), segment_ids.shape)
    start = np.ones(segment_ids.shape, dtype=bool)
    start[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    return idx - np.maximum.accumulate(np.where(start, idx, 0), axis=1)


def _decode_images(samples, spec: SampleSpec, label: str) -> Decoded:
    """Images (pixels or latents) channels-first, and labels checked against the manifest's classes."""
    keys, payloads = [], []
    labels = np.empty(len(samples), dtype=np.int64)
    for n, (key, members) in enumerate(samples):
        data, cls = members.get(spec.member), members.get("label.cls")
        if data is None or cls is None:
            raise DataError(f"shard {label}: sample {key} lacks its {spec.member} or label.cls")
        try:
            y = int(cls.decode("ascii").strip())
        except (UnicodeDecodeError, ValueError):
            msg = f"shard {label}: sample {key} has label {cls[:20]!r}, not a decimal integer"
            raise DataError(msg) from None
        if not 0 <= y < spec.num_classes:
            raise DataError(f"shard {label}: sample {key} has label {y}, outside [0, {spec.num_classes}) "
                            f"of the manifest's classes")
        labels[n] = y
        keys.append(key)
        payloads.append(data)
    images = _npy_stack(keys, payloads, spec, label)
    if spec.member == "image.npy":  # pixels: HxW -> 1xHxW, HxWxC -> CxHxW
        hwc = len(spec.stored) == 3
        images = np.ascontiguousarray(images.transpose(0, 3, 1, 2)) if hwc else images[:, None]
    return keys, {"images": images, "labels": labels}


def _dtype_ok(spec: SampleSpec, dtype: np.dtype) -> bool:
    return dtype == np.uint8 if spec.member == "image.npy" else dtype.kind == "f"


def _npy_stack(keys: list[str], payloads: list[bytes], spec: SampleSpec, label: str) -> np.ndarray:
    """The .npy payloads as one array [n, *stored]. Fast path: every payload has the first one's header
    (same shape and dtype), so the data parts are joined and read with one frombuffer; otherwise each is
    loaded on its own to name the first that is wrong."""
    first = payloads[0]
    f = io.BytesIO(first)
    try:
        version = np.lib.format.read_magic(f)
        fmt = np.lib.format
        read = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}.get(version)
        shape, fortran, dtype = read(f) if read else (None, True, None)
    except ValueError:
        read = None
    if read is not None and not fortran and tuple(shape) == spec.stored and _dtype_ok(spec, dtype):
        head, size = f.tell(), f.tell() + math.prod(spec.stored) * dtype.itemsize
        prefix = first[:head]
        if len(first) == size and all(len(p) == size and p[:head] == prefix for p in payloads):
            joined = b"".join(memoryview(p)[head:] for p in payloads)
            return np.frombuffer(joined, dtype=dtype).reshape(len(payloads), *spec.stored)
    out = np.empty((len(payloads), *spec.stored), np.uint8 if spec.member == "image.npy" else np.float32)
    for n, (key, p) in enumerate(zip(keys, payloads, strict=True)):
        try:
            arr = np.load(io.BytesIO(p), allow_pickle=False)
        except Exception as e:  # a truncated header, an object array: all mean the sample is unusable
            why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            msg = f"shard {label}: sample {key}: {spec.member} is not a readable .npy ({why})"
            raise DataError(msg) from None
        if arr.shape != spec.stored:
            raise DataError(f"shard {label}: sample {key}: {spec.member} of shape {list(arr.shape)}, the "
                            f"manifest's image_shape is {list(spec.stored)}")
        if not _dtype_ok(spec, arr.dtype):
            want = "uint8" if spec.member == "image.npy" else "floating point"
            raise DataError(f"shard {label}: sample {key}: {spec.member} of dtype {arr.dtype}, not {want}")
        out[n] = arr
    return out


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
