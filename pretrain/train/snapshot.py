"""Saving that does not stall training: a rank's DeepSpeed states are copied to host memory in the training
thread, and written to files later, by the checkpointer's background thread (pretrain/train/checkpoint.py).

The mechanism: for the length of one `engine.save_checkpoint`, the engine's checkpoint engine (DeepSpeed's
`CheckpointEngine` interface: create / save / load / commit, on `engine.checkpoint_engine`; swapped by
`pretrain.compat.deepspeed_checkpoint_engine`) is a `QueuedWriter`. Its `save(state_dict, path)` copies every
tensor of the state into host memory and queues the copy; `write()`, in the background thread, hands each
copy to DeepSpeed's own engine (its `torch.save`, with the serialization the DeepSpeed config asks for). The
files are then exactly what DeepSpeed would have written at the save, with the same storage sharing (tied
weights, ZeRO's flat buffers are written once, as before), and loading, universal conversion and the upload
protocol see nothing new. Why not the alternatives:

- torch's asynchronous distributed checkpointing (`torch.distributed.checkpoint.async_save`) writes its own
  format: DeepSpeed's load, its universal-checkpoint conversion (resuming at another world size) and every
  checkpoint written so far would need a second reader.
- DeepSpeed's decoupled checkpoint engine (`checkpoint.writer.decoupled`) writes from a separate process
  with its `FastCheckpointEngine` (DeepSpeed's I/O ops) and commits with its own protocol and a collective:
  it would not tell our thread when a rank's files are durable, which the `rank-<R>.done` and `COMPLETE`
  markers need, and it would make the I/O ops a build dependency.

The copy. Each distinct storage is copied once (views keep their offsets and strides), into a buffer reused
from save to save (`HostBuffers`): a fresh allocation of a few hundred MB costs page faults that take ~5x
the copy itself, and on CUDA a pinned allocation is slow while a copy into pinned memory is fast. The
buffers stay allocated between saves (one copy of the rank's checkpoint in host memory, pinned on CUDA)
until the checkpointer closes. Everything around the tensors (dicts, lists, the optimizer's and schedule's
small objects, a tensor's own attributes) is deep-copied, so training may change anything once `save` returns.
tests/test_async_save.py checks, at ZeRO 0-3 in fp32 and bf16, that the files are byte for byte those DeepSpeed
writes at the save while training changes every state in place before they are written.
"""

from __future__ import annotations

import copy
import time

import torch


class HostBuffers:
    """Host memory for the copies of one save, kept for the next (one save at a time: the checkpointer
    recycles them only after the previous save's files are written)."""

    def __init__(self):
        self._free: dict[int, list[torch.UntypedStorage]] = {}
        self._used: list[torch.UntypedStorage] = []

    def take(self, nbytes: int, pinned: bool) -> torch.UntypedStorage:
        free = self._free.get(nbytes)
        buf = free.pop() if free else torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned).untyped_storage()
        self._used.append(buf)
        return buf

    def recycle(self) -> None:
        """The last save's buffers are free again (nothing reads its copies any more); those the last save did
        not take are dropped, so the memory held stays one save's, whatever sizes earlier saves had."""
        self._free = {}
        for buf in self._used:
            self._free.setdefault(buf.nbytes(), []).append(buf)
        self._used = []

    def release(self) -> None:
        self._free, self._used = {}, []


def _tensors(obj, out: list[torch.Tensor]) -> list[torch.Tensor]:
    """The tensors in `obj`'s containers, in order."""
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            _tensors(v, out)
    elif isinstance(obj, list | tuple | set | frozenset):
        for v in obj:
            _tensors(v, out)
    return out


def _host_tensor(t: torch.Tensor, copies: dict, buffers: HostBuffers) -> torch.Tensor:
    if t.device.type == "meta":
        return t  # no data: torch.save writes its shape alone
    if t.layout != torch.strided:
        return t.detach().to("cpu", copy=True)  # sparse states: none in DeepSpeed's, and no storage to share
    # One copy per storage, as torch.save writes one per storage (torch keeps one Python object per storage:
    # its identity is the storage's). The source is held with its copy until the save ends, so that no storage
    # freed meanwhile (DeepSpeed builds some temporaries) hands its identity to another.
    src = t.untyped_storage()
    if id(src) not in copies:
        n = src.nbytes()
        dst = buffers.take(n, pinned=t.device.type == "cuda") if n else torch.UntypedStorage(0)
        dst.copy_(src, non_blocking=t.device.type == "cuda")  # synchronised once for the whole state
        copies[id(src)] = (src, dst)
    out = torch.empty(0, dtype=t.dtype).set_(copies[id(src)][1], t.storage_offset(), t.size(), t.stride())
    if isinstance(t, torch.nn.Parameter):
        return torch.nn.Parameter(out, requires_grad=t.requires_grad)
    return out.requires_grad_(t.requires_grad)  # as torch.save records it (ZeRO's fp32 partitions require grad)


def host_copy(state, buffers: HostBuffers, copies: dict | None = None):
    """A deep copy of `state` with every tensor in host memory; `copies` (storage id -> (it, its copy)) shares
    the storages of one save's several states."""
    copies = {} if copies is None else copies
    memo: dict[int, object] = {}
    tensors = list({id(t): t for t in _tensors(state, [])}.values())
    for t in tensors:
        memo[id(t)] = _host_tensor(t, copies, buffers)
    for t in tensors:
        if t.__dict__ and memo[id(t)] is not t:
            # A tensor's own attributes, which torch.save writes with it (ZeRO-3 tags its flat groups `ds_id`).
            memo[id(t)].__dict__.update(copy.deepcopy(t.__dict__, memo))
    if torch.cuda.is_available() and any(t.device.type == "cuda" for t in tensors):
        torch.cuda.synchronize()  # the non-blocking copies are in host memory before training goes on
    return copy.deepcopy(state, memo)  # the tensors come from the memo: the copies above


class QueuedWriter:
    """DeepSpeed's checkpoint engine for one save: `save` copies the state to host memory and queues it,
    `write` (the background thread) writes the queue through `inner`, the engine's own checkpoint engine;
    everything else (create, makedirs, load; commit, once the sources are let go) is `inner`'s."""

    def __init__(self, inner, buffers: HostBuffers):
        self.inner, self.buffers = inner, buffers
        self.queued: list[tuple[str, object]] = []
        self.copy_s = 0.0
        self._copies: dict = {}  # one save's storages: a storage in two of its states is copied once

    def save(self, state_dict, path: str) -> None:
        t0 = time.perf_counter()
        self.queued.append((str(path), host_copy(state_dict, self.buffers, self._copies)))
        self.copy_s += time.perf_counter() - t0

    def commit(self, info):
        """The end of DeepSpeed's save (training thread): every state is copied; the sources are let go."""
        self._copies = {}
        return self.inner.commit(info)

    def write(self) -> None:
        """Write every queued state to its file (in the order DeepSpeed saved them), dropping each copy once
        written."""
        self._copies = {}
        while self.queued:
            path, state = self.queued.pop(0)
            self.inner.save(state, path)
            del state

    def __getattr__(self, name):
        return getattr(self.inner, name)
