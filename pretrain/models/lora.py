"""LoRA (Hu et al. 2021, https://arxiv.org/abs/2106.09685): low-rank adapters on chosen Linear layers.

`apply_lora(model, cfg)` swaps each matching `nn.Linear` for a `LoRALinear` and freezes every other
parameter, so the optimizer (which takes `requires_grad` parameters only) updates the adapters alone.
The base weight and bias stay registered under their old names (`blocks.0.attn.q_proj.weight`), so
released weights load into a LoRA model unchanged; the adapters add `...q_proj.lora_A.weight` (r, in) and
`...q_proj.lora_B.weight` (out, r), the shapes and initialisation PEFT uses, so an adapter trained here
is a PEFT adapter (`pretrain/hub/peft.py` writes and reads that layout).

`merge_lora` folds W += B A * alpha/r back into plain `nn.Linear` layers for export. Nothing here knows
about ranks or DeepSpeed: the forward uses the module's own Parameters, so ZeRO-3's per-module hooks
gather them like any other layer's.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

# The config section lives in the config tree (pretrain/config.py, `lora:`); re-exported here with its user.
from pretrain.config import ConfigError, LoraConfig  # noqa: F401

ADAPTER_KEYS = ("lora_A.weight", "lora_B.weight")


class LoRALinear(nn.Module):
    """y = x W^T + b + B(A(dropout(x))) * scaling, with W and b frozen.

    W and b are the replaced layer's own Parameter objects (same names, same storage: nothing is copied,
    and a ZeRO-3 partitioned parameter stays partitioned). The forward reads them from the module at call
    time through `F.linear`; a tensor captured at construction would be ZeRO-3's empty placeholder."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias  # None registers "no bias", as nn.Linear does
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.rank, self.scaling = rank, alpha / rank
        kw = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, **kw)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, **kw)
        self.reset_lora()

    def reset_lora(self) -> None:
        """PEFT's initialisation: A as nn.Linear's default (Kaiming uniform, a=sqrt(5)), B zero, so the
        adapted layer starts exactly equal to the base one.

        Made inside `deepspeed.zero.Init`, A and B are partitioned as soon as their nn.Linear exists; A then
        already holds nn.Linear's own initialisation (the same as PEFT's, broadcast from rank 0 by
        zero.Init), and B's zeros are written into each rank's partition: no gather, no collective."""
        wa, wb = self.lora_A.weight, self.lora_B.weight
        with torch.no_grad():
            if hasattr(wb, "ds_tensor"):
                wb.ds_tensor.zero_()
                return
            nn.init.kaiming_uniform_(wa, a=math.sqrt(5))
            nn.init.zeros_(wb)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        return y + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, rank={self.rank}, scaling={self.scaling:g}")


def _matches(pattern: str, name: str) -> bool:
    # A pattern without a dot names a module by its last component, as PEFT's target_modules do.
    return fnmatch.fnmatchcase(name if "." in pattern else name.rsplit(".", 1)[-1], pattern)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def match_targets(model: nn.Module, targets: list[str]) -> list[str]:
    """Names of the plain nn.Linear modules of `model` that the patterns select; a pattern that selects
    none is a config error (a typo must not train an adapter on fewer layers than meant)."""
    linears = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    chosen = set()
    for pattern in targets:
        hit = [n for n in linears if _matches(pattern, n)]
        if not hit:
            known = sorted({n.rsplit(".", 1)[-1] for n in linears})
            raise ConfigError(f"lora.targets: {pattern!r} matches no Linear module of the model "
                              f"(their last names: {', '.join(known)})")
        chosen.update(hit)
    return [n for n in linears if n in chosen]  # model order


def apply_lora(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """Wrap the target Linear layers of `model` (in place) and freeze all other parameters; returns the
    wrapped module names. Call it before `deepspeed.initialize`, which partitions the new adapters too."""
    if lora_modules(model):
        raise ValueError("apply_lora: the model already has LoRA adapters")
    names = match_targets(model, cfg.targets)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        _set_submodule(model, name, LoRALinear(model.get_submodule(name), cfg.rank, cfg.alpha, cfg.dropout))
    return names


def lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters only: {'<module>.lora_A.weight': (r, in), '<module>.lora_B.weight': (out, r)}, detached
    (under ZeRO-3, call it inside a gather of those parameters)."""
    return {f"{n}.{k}": m.get_parameter(k).detach() for n, m in lora_modules(model).items() for k in ADAPTER_KEYS}


def load_lora_state(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy adapter weights (as `lora_state` names them) into a LoRA model; keys and shapes must match
    exactly (resuming from an adapter, or checking one)."""
    own = lora_state(model)
    if set(tensors) != set(own):
        missing, extra = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
        raise ValueError(f"adapter does not fit the model's LoRA layers (missing {missing[:4]}, "
                         f"unexpected {extra[:4]})")
    with torch.no_grad():
        for k, t in tensors.items():
            if t.shape != own[k].shape:
                raise ValueError(f"adapter tensor {k}: shape {tuple(t.shape)}, the model's is {tuple(own[k].shape)}")
            own[k].copy_(t)


def merged_weight(m: LoRALinear) -> torch.Tensor:
    """W + B A * scaling, computed in fp32 (a bf16 product of two small factors loses the update)."""
    delta = m.lora_B.weight.float() @ m.lora_A.weight.float()
    return (m.weight.float() + delta * m.scaling).to(m.weight.dtype)


def merged_state(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of the model as if merged, without changing it: LoRA layers' weights folded, the
    adapters left out, each shared tensor once (under its first name), persistent buffers included."""
    merged = {f"{n}.weight": m for n, m in lora_modules(model).items()}
    adapters = set(lora_state(model))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in adapters:
                continue
            yield name, (merged_weight(merged[name]) if name in merged else p.detach())
        persistent = set(model.state_dict())
        for name, b in model.named_buffers():
            if name in persistent:
                yield name, b.detach()


def merge_lora(model: nn.Module) -> list[str]:
    """Fold every adapter into its base weight (in place) and put plain nn.Linear layers back; returns
    the merged module names. The result has exactly the original model's parameter names."""
    mods = lora_modules(model)
    for name, m in mods.items():
        if hasattr(m.weight, "ds_id"):
            raise ValueError(f"merge_lora: {name}.weight is ZeRO-3 partitioned; merge a gathered CPU copy "
                             "(or export with merged_state inside a gather)")
        with torch.no_grad():
            m.weight.copy_(merged_weight(m))
        plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        plain.weight, plain.bias = m.weight, m.bias  # the same Parameters: nothing is copied
        _set_submodule(model, name, plain)
    return list(mods)


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; ZeRO-3 partitioned parameters count at their full size."""
    def size(p):
        return getattr(p, "ds_numel", p.numel())

    params = list(model.parameters())
    return sum(size(p) for p in params if p.requires_grad), sum(size(p) for p in params)


def describe_trainable(model: nn.Module) -> str:
    """'trainable 12,288 of 1,234,567 parameters (1.00%)', for the run's first log lines."""
    trainable, total = trainable_parameters(model)
    return f"trainable {trainable:,} of {total:,} parameters ({100 * trainable / max(total, 1):.2f}%)"
