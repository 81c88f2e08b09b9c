"""Safetensors files of a Hugging Face checkpoint directory: which files hold the weights, their tensor
headers, a lazy reader that keeps one tensor in memory, and a sharded writer.

Reading never unpickles: a directory with only `pytorch_model.bin` is refused, not loaded. The reader copies
out one tensor at a time, widened to fp32, in row blocks (see `read_fp32`), so loading a model into ZeRO-3
partitions holds about one fp32 tensor beside the partitions, whatever the file and tensor sizes. The writer
fills shards up to `max_shard_bytes` and names them the way `save_pretrained` does
(`model-00001-of-00003.safetensors` + `model.safetensors.index.json`; one shard is `model.safetensors`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pretrain.atomic import atomic_write
from pretrain.errors import CheckpointError, first_line

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
_ITEM_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}  # the float dtypes we read
_CHUNK_BYTES = 16 << 20


@dataclass(frozen=True)
class TensorHeader:
    file: Path
    shape: tuple[int, ...]
    dtype: str  # safetensors' name: F32, BF16, ...


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory in index order; each one the index names must exist."""
    index = directory / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from None
        files = list(dict.fromkeys(weight_map.values()))
        for name in files:
            if "/" in name or name.startswith(".") or not name.endswith(".safetensors"):
                raise CheckpointError(f"{index}: shard name {name!r} is not a plain .safetensors file name")
            if not (directory / name).is_file():
                raise CheckpointError(f"{index} names shard {name}, which is missing from {directory}")
        return [directory / name for name in files]
    if (directory / SINGLE).is_file():
        return [directory / SINGLE]
    if any(directory.glob("pytorch_model*.bin")):
        raise CheckpointError(f"{directory}: only pytorch_model.bin (a pickle, which we never load); convert "
                              "it to safetensors first")
    raise CheckpointError(f"{directory}: no {SINGLE} or {INDEX}")


def read_headers(files: list[Path]) -> dict[str, TensorHeader]:
    """Name -> (file, shape, dtype) of every tensor, from the headers only (no tensor data is read)."""
    headers: dict[str, TensorHeader] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    s = f.get_slice(name)
                    if name in headers:
                        other = headers[name].file.name
                        raise CheckpointError(f"{file.name}: tensor {name} is also in {other}")
                    headers[name] = TensorHeader(file, tuple(s.get_shape()), s.get_dtype())
        except CheckpointError:
            raise
        except Exception as e:  # the library's message for a torn or foreign file
            raise CheckpointError(f"{file}: not a safetensors file ({first_line(e)})") from None
    for name, h in headers.items():
        if h.dtype not in _ITEM_BYTES:
            raise CheckpointError(f"{h.file.name}: tensor {name} has dtype {h.dtype}; only float tensors "
                                  "(quantised checkpoints are not supported)")
    return headers


def read_fp32(header: TensorHeader, name: str) -> torch.Tensor:
    """One tensor as a new fp32 CPU tensor, copied over in row blocks of about `_CHUNK_BYTES`, the file
    opened afresh for each block: the memory-mapped pages a block touches are unmapped when it closes, so
    reading costs the fp32 result plus one block, not the result plus the whole tensor (or file) in the
    page mapping and a second copy in the stored dtype."""
    out = torch.empty(header.shape, dtype=torch.float32)
    if out.dim() == 0 or out.numel() == 0:
        with safe_open(str(header.file), framework="pt") as f:
            return f.get_tensor(name).float().clone()
    row_bytes = max(1, out[0].numel() * _ITEM_BYTES[header.dtype])
    step = max(1, _CHUNK_BYTES // row_bytes)
    for start in range(0, header.shape[0], step):
        with safe_open(str(header.file), framework="pt") as f:
            out[start:start + step] = f.get_slice(name)[start:start + step]  # copy_ widens bf16/fp16
    return out


@dataclass(frozen=True)
class LazyTensor:
    """A stored tensor not read yet: a ZeRO-3 rank copies only its partition's slice of the flattened tensor
    (`read_flat_into`), in row blocks, so loading holds its partitions plus one block, never a whole tensor."""

    header: TensorHeader
    name: str

    @property
    def shape(self) -> torch.Size:
        return torch.Size(self.header.shape)

    def materialise(self) -> torch.Tensor:
        return read_fp32(self.header, self.name)

    def read_flat_into(self, out: torch.Tensor, start: int, stop: int) -> None:
        """out[: stop - start] = flatten(tensor)[start:stop], reading only the rows that cover the range."""
        shape = self.header.shape
        row = max(1, int(torch.Size(shape[1:]).numel())) if len(shape) > 1 else 1
        if len(shape) == 0:
            out[:1].copy_(self.materialise().reshape(-1)[start:stop])
            return
        step = max(1, _CHUNK_BYTES // (row * _ITEM_BYTES[self.header.dtype]))
        first, last = start // row, -(-stop // row)
        for r0 in range(first, last, step):
            r1 = min(r0 + step, last)
            with safe_open(str(self.header.file), framework="pt") as f:
                block = f.get_slice(self.name)[r0:r1].reshape(-1)
            lo, hi = max(start, r0 * row), min(stop, r1 * row)
            out[lo - start:hi - start].copy_(block[lo - r0 * row:hi - r0 * row])  # copy_ widens bf16/fp16
            del block


@dataclass(frozen=True)
class LazyStack:
    """An unread tensor of shape (n, *slice_shape) whose i-th slice is `build(*parts[i])` of stored tensors (a
    mixture of experts' per-expert weights, transposed and stacked): like a LazyTensor, a ZeRO-3 rank reads only
    the slices its partition covers, one slice at a time."""

    parts: tuple[tuple[LazyTensor, ...], ...]
    build: Callable[..., torch.Tensor]
    slice_shape: tuple[int, ...]

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.parts), *self.slice_shape))

    def _slice(self, i: int) -> torch.Tensor:
        return self.build(*(p.materialise() for p in self.parts[i]))

    def materialise(self) -> torch.Tensor:
        out = torch.empty(self.shape)
        for i in range(len(self.parts)):
            out[i] = self._slice(i)
        return out

    def read_flat_into(self, out: torch.Tensor, start: int, stop: int) -> None:
        """out[: stop - start] = flatten(tensor)[start:stop], building only the slices that cover the range."""
        per = max(1, int(torch.Size(self.slice_shape).numel()))
        for i in range(start // per, -(-stop // per)):
            block = self._slice(i).reshape(-1)
            lo, hi = max(start, i * per), min(stop, (i + 1) * per)
            out[lo - start:hi - start].copy_(block[lo - i * per:hi - i * per])
            del block


def iter_lazy_tensors(headers: dict[str, TensorHeader], skip: frozenset[str] = frozenset()) -> Iterator[LazyTensor]:
    """The tensors of `iter_file_tensors`, in its order, unread."""
    for name, header in sorted(headers.items(), key=lambda item: str(item[1].file)):
        if name not in skip:
            yield LazyTensor(header, name)


def iter_file_tensors(headers: dict[str, TensorHeader], skip: frozenset[str] = frozenset()
                      ) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, fp32 tensor) file by file, in the files' order; one tensor in memory at a time."""
    for name, header in sorted(headers.items(), key=lambda item: str(item[1].file)):
        if name not in skip:
            yield name, read_fp32(header, name)


def _fsync(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def write_shards(directory: Path, tensors: Iterable[tuple[str, torch.Tensor]], max_shard_bytes: float) -> int:
    """Write (hf_name, tensor) pairs as safetensors shards of at most `max_shard_bytes` (a bigger tensor gets
    a shard of its own) into `directory`, with an index when there is more than one. Returns the total
    bytes. Only one shard is held in memory: the iterator may gather one layer at a time."""
    shards: list[tuple[Path, list[str]]] = []
    current: dict[str, torch.Tensor] = {}
    size = total = 0
    seen: set[str] = set()

    def flush() -> None:
        nonlocal current, size
        if current:
            path = directory / f".shard-{len(shards):05d}.safetensors"
            save_file(current, str(path), metadata={"format": "pt"})
            _fsync(path)
            shards.append((path, list(current)))
        current, size = {}, 0

    for name, t in tensors:
        if name in seen:
            raise CheckpointError(f"export: tensor {name} is given twice")
        seen.add(name)
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            flush()
        current[name] = t.detach().cpu().contiguous()
        size += nbytes
        total += nbytes
    flush()
    if len(shards) == 1:
        os.replace(shards[0][0], directory / SINGLE)
        return total
    weight_map = {}
    for i, (path, names) in enumerate(shards, 1):
        final = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        os.replace(path, directory / final)
        weight_map.update(dict.fromkeys(names, final))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    atomic_write(directory / INDEX, json.dumps(index, indent=2, sort_keys=True) + "\n")
    return total
