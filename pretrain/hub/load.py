"""Values into a model's parameters, whole or ZeRO-3 partitioned: each rank writes only the slice of the
flattened parameter that its partition holds, so a checkpoint streams straight into the partitions (one tensor
alive at a time) and no rank ever holds the whole model. Knows DeepSpeed only by its parameter attributes
(`ds_tensor`, `ds_shape`, `ds_numel`, `ds_process_group`), and expert parallelism by its own (`expert_shape`: the
full (E, ...) shape; `expert_rows`: the [first, last) experts this rank holds, pretrain/train/expert_parallel.py)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from pretrain.errors import CheckpointError
from pretrain.hub.safetensors_io import LazyStack, LazyTensor

_LAZY = (LazyTensor, LazyStack)  # unread: a partition reads only its own slice


def _partition_slice(p: nn.Parameter) -> tuple[int, int]:
    """[start, stop) of the flattened parameter that this rank's ZeRO-3 partition holds (stop clipped to numel)."""
    size = p.ds_tensor.ds_numel
    start = size * dist.get_rank(group=p.ds_process_group)
    return start, min(start + size, p.ds_numel)


def write_parameter(p: nn.Parameter, value) -> None:
    """Set a parameter (partitioned or whole) to `value`, a tensor of the parameter's full shape or an unread
    `LazyTensor` / `LazyStack`, of which a partition reads only its own slice."""
    lazy = isinstance(value, _LAZY)
    if hasattr(p, "expert_rows"):
        return _write_experts(p, value)
    with torch.no_grad():
        if hasattr(p, "ds_tensor"):
            if tuple(value.shape) != tuple(p.ds_shape):
                raise ValueError(f"shape {tuple(value.shape)} does not match the parameter's {tuple(p.ds_shape)}")
            start, stop = _partition_slice(p)
            part = p.ds_tensor.data
            part.zero_()  # the padding past numel stays zero
            if stop > start:
                if lazy:
                    value.read_flat_into(part, start, stop)
                else:
                    part[: stop - start].copy_(value.reshape(-1)[start:stop])
        else:
            if tuple(value.shape) != tuple(p.shape):
                raise ValueError(f"shape {tuple(value.shape)} does not match the parameter's {tuple(p.shape)}")
            p.data.copy_(value.materialise() if lazy else value)


def _write_experts(p: nn.Parameter, value) -> None:
    """An expert-parallel parameter: rows `expert_rows` of a value of the full `expert_shape`, a contiguous range of
    the flattened value (a lazy value reads only those experts)."""
    if tuple(value.shape) != tuple(p.expert_shape):
        raise ValueError(f"shape {tuple(value.shape)} does not match the parameter's {tuple(p.expert_shape)}")
    first, last = p.expert_rows
    per = p[0].numel()
    with torch.no_grad():
        if isinstance(value, _LAZY):
            value.read_flat_into(p.data.view(-1), first * per, last * per)
        else:
            p.data.copy_(value[first:last])


def shape_of(p: nn.Parameter) -> tuple[int, ...]:
    """A parameter's full shape: its ZeRO-3 or expert-parallel whole, not this rank's share."""
    if hasattr(p, "ds_shape"):
        return tuple(p.ds_shape)
    return tuple(getattr(p, "expert_shape", p.shape))


def load_weights(model: nn.Module, tensors, where: str = "load", skip: set[str] = frozenset()) -> int:
    """Copy (our name, tensor) pairs into the model's parameters and buffers, partitions included; every
    parameter not in `skip` must be given exactly once (a tied head as `embed.weight`, the Parameter both
    modules share). Returns the number of parameters written."""
    params = dict(model.named_parameters())
    buffers = {k: b for k, b in model.named_buffers() if k in model.state_dict()}
    tied = {k for k in model.state_dict() if k not in params and k not in buffers}  # aliases of a shared tensor
    seen: set[str] = set()
    for name, value in tensors:
        if name in tied:
            continue
        if name in seen:
            raise CheckpointError(f"{where}: tensor {name} is given twice")
        target = params.get(name)
        if target is None:
            if name in buffers:
                buffers[name].data.copy_(value.materialise() if isinstance(value, _LAZY) else value)
                continue
            raise CheckpointError(f"{where}: tensor {name} is not a parameter of the model")
        try:
            write_parameter(target, value)
        except ValueError as e:
            raise CheckpointError(f"{where}: {name}: {e}") from None
        seen.add(name)
        del value  # before the next tensor is read: never two whole tensors resident
    missing = sorted(set(params) - seen - set(skip))
    if missing:
        raise CheckpointError(f"{where}: no weights for {missing[0]}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    return len(seen)
