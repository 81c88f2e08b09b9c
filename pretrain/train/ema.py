"""An exponential moving average of the weights, kept in fp32 beside whatever the training precision is.

bf16 cannot hold an EMA: with decay 0.9999 an update moves a weight by 1e-4 of its distance to the
current value, below bf16's resolution (2^-8 relative), so it rounds to nothing. The shadow copy here is
fp32 and updated from the working weights after every optimizer step.

Each rank keeps the EMA of what it holds: under ZeRO-3 its flat partition of every parameter
(`p.ds_tensor`: elements [r*ps, (r+1)*ps) of the flattened parameter, ps = ceil(numel / W), the last one
padded), under ZeRO 0-2 the whole parameter. A checkpoint stores every rank's piece with its layout, so
a resume at another world size or ZeRO stage reassembles each parameter and takes its own piece: the EMA
continues exactly. For evaluation the shadow is swapped into the model's own storage (`swapped()`), and
the final weights gather it one parameter at a time, so no rank ever holds a second full model.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from pretrain.atomic import atomic_path


def _partitioned(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_tensor")


def _local(p: torch.Tensor) -> torch.Tensor:
    """The storage this rank holds of parameter p (flat partition under ZeRO-3, else p itself)."""
    return p.ds_tensor if _partitioned(p) else p.data


def _numel(p: torch.Tensor) -> int:
    return int(p.ds_numel) if _partitioned(p) else p.numel()


def _shape(p: torch.Tensor) -> tuple[int, ...]:
    return tuple(p.ds_shape) if _partitioned(p) else tuple(p.shape)


class EMA:
    """fp32 EMA of this rank's share of `module`'s trainable parameters (see the module docstring)."""

    def __init__(self, module: torch.nn.Module, decay: float, warmup: bool = False):
        self.decay, self.warmup, self.updates = decay, warmup, 0
        self.params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        self.module = module
        self.shadow = {n: _local(p).detach().float().clone() for n, p in self.params}

    def rate(self) -> float:
        """The decay of the next update: `decay`, or with warm-up min(decay, (1 + n) / (10 + n)) after n."""
        n = self.updates
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self) -> None:
        d = self.rate()
        for n, p in self.params:
            self.shadow[n].lerp_(_local(p).float(), 1.0 - d)
        self.updates += 1

    @contextlib.contextmanager
    def swapped(self):
        """Inside: the model computes with the EMA weights (in its own dtype); restored on exit."""
        backup = {}
        with torch.no_grad():
            for n, p in self.params:
                t = _local(p)
                backup[n] = t.clone()
                t.copy_(self.shadow[n].to(t.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in self.params:
                    _local(p).copy_(backup[n])

    # ------------------------------------------------------------------ checkpoints

    def _layout(self, rank: int, world: int) -> dict:
        return {"world_size": world, "rank": rank, "updates": self.updates,
                "params": {n: {"numel": _numel(p), "partitioned": _partitioned(p)} for n, p in self.params}}

    def save(self, directory: Path, rank: int, world: int) -> None:
        """Every rank writes `ema-rank<r>.safetensors` (its pieces, the layout in the metadata). Under ZeRO
        0-2 the pieces are whole and equal on every rank, so only rank 0 writes them."""
        if not any(_partitioned(p) for _, p in self.params) and rank != 0:
            return
        meta = {"layout": json.dumps(self._layout(rank, world))}
        tensors = {n: t.detach().cpu().contiguous() for n, t in self.shadow.items()}
        with atomic_path(directory / f"ema-rank{rank}.safetensors") as tmp:
            save_file(tensors, str(tmp), metadata=meta)

    def load(self, directory: Path, rank: int, world: int) -> None:
        """Restore this rank's pieces from the files `save` wrote at any world size or stage."""
        files = sorted(directory.glob("ema-rank*.safetensors"), key=lambda f: int(f.stem.removeprefix("ema-rank")))
        if not files:
            raise FileNotFoundError(f"{directory}: no EMA weights (ema-rank*.safetensors)")
        handles = [safe_open(str(f), framework="pt") for f in files]
        layouts = [json.loads(h.metadata()["layout"]) for h in handles]
        self.updates = layouts[0]["updates"]
        for n, p in self.params:
            saved = layouts[0]["params"].get(n)
            if saved is None or saved["numel"] != _numel(p):
                raise ValueError(f"{directory}: the EMA weights do not match the model (parameter {n})")
            if saved["partitioned"] and _partitioned(p) and len(files) == world:
                own = handles[rank].get_tensor(n)  # the same partitioning: this rank's own file
            elif saved["partitioned"]:  # reassemble the flat parameter from every rank's piece
                own = _piece(torch.cat([h.get_tensor(n).reshape(-1) for h in handles])[: saved["numel"]], p, rank)
            else:
                own = _piece(handles[0].get_tensor(n).reshape(-1), p, rank)
            self.shadow[n].copy_(own.reshape(self.shadow[n].shape))

    # ------------------------------------------------------------------ final weights

    def gathered(self, rank: int, world: int):
        """Yield (name, full fp32 tensor on rank 0 / None elsewhere), one parameter at a time. Collective."""
        for n, p in self.params:
            if not _partitioned(p):
                yield n, self.shadow[n].cpu() if rank == 0 else None
                continue
            piece = self.shadow[n]
            parts = [torch.empty_like(piece) for _ in range(world)] if rank == 0 else None
            dist.gather(piece, parts, dst=0)
            yield n, torch.cat(parts)[: _numel(p)].reshape(_shape(p)).cpu() if rank == 0 else None


def _piece(full: torch.Tensor, p: torch.Tensor, rank: int) -> torch.Tensor:
    """This rank's piece of a flat parameter: all of it, or its ZeRO-3 partition (zero-padded)."""
    if not _partitioned(p):
        return full
    ps = p.ds_tensor.numel()
    out = torch.zeros(ps, dtype=full.dtype)
    chunk = full[rank * ps: (rank + 1) * ps]
    out[: chunk.numel()] = chunk
    return out
