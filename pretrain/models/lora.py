"""LoRA (Hu et al. 2021, https://arxiv.org/abs/2106.09685): low-rank adapters on chosen Linear layers.

`apply_lora(model, cfg)` swaps each matching `nn.Linear` for a `LoRALinear` and freezes every other
parameter, so the optimizer (which takes `requires_grad` parameters only) updates the adapters alone.
The base weight and bias stay registered under their old names (`blocks.0.attn.q_proj.weight`), so
released weights load into a LoRA model unchanged; the adapters add `...q_proj.lora_A.weight` (r, in) and
`...q_proj.lora_B.weight` (out, r), the shapes and initialisation PEFT uses, so an adapter trained here
is a PEFT adapter (`pretrain/hub/peft.py` writes and reads that layout).

Targets are Linear modules and, in mixture-of-experts layers, the experts' stacked weights, named by their
parameter (`gate_up`, `down`, or `blocks.3.mlp.experts.down`): each MoE layer's `experts` becomes a
`LoRAExperts` with one adapter per adapted weight, in PEFT's `target_parameters` layout
(`pretrain/models/lora_experts.py`).

`merge_lora` folds W += B A * alpha/r back into plain `nn.Linear` layers (and `Experts`) for export. Nothing
here knows about ranks or DeepSpeed: the forward uses the module's own Parameters, so ZeRO-3's per-module
hooks gather them like any other layer's.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

# The config section lives in the config tree (pretrain/config.py, `lora:`); re-exported here with its user.
from pretrain.config import ConfigError, LoraConfig  # noqa: F401
from pretrain.models.lora_experts import EXPERT_WEIGHTS, ExpertLoRA, LoRAExperts, stacked_shape
from pretrain.models.moe import Experts, MoE

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


_matches = LoraConfig.pattern_matches


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def adapter_modules(model: nn.Module) -> dict[str, LoRALinear | ExpertLoRA]:
    """Every module holding a pair of factors (`lora_A.weight`, `lora_B.weight`), by name, in model order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear | ExpertLoRA)}


class Target(NamedTuple):
    """Something an adapter can go on: its factors are A (r n, in) and B (out, r n), as PEFT shapes them, held by
    the module `adapter` (the Linear itself; beside a stacked expert weight, `<experts>.<weight>_lora`)."""

    out: int
    d_in: int
    n: int  # 1 for a Linear, E for a stacked expert weight
    adapter: str


def lora_targets(model: nn.Module) -> dict[str, Target]:
    """Everything an adapter can go on, by name in model order: each plain Linear and each stacked expert weight
    (`blocks.1.mlp.experts.gate_up`, (E, in, out))."""
    out: dict[str, Target] = {}
    for name, m in model.named_modules():
        if type(m) is nn.Linear:
            out[name] = Target(m.out_features, m.in_features, 1, name)
        elif type(m) is Experts:
            for w in EXPERT_WEIGHTS:
                n, d_in, d_out = stacked_shape(getattr(m, w))
                out[f"{name}.{w}"] = Target(d_out, d_in, n, f"{name}.{w}_lora")
    return out


def match_targets(model: nn.Module, targets: list[str]) -> list[str]:
    """Names of the plain nn.Linear modules and stacked expert weights of `model` that the patterns select; a
    pattern that selects none is a config error (a typo must not train an adapter on fewer layers than meant)."""
    names = list(lora_targets(model))
    chosen: set[str] = set()
    for pattern in targets:
        hit = [n for n in names if _matches(pattern, n)]
        if not hit:
            known = sorted({n.rsplit(".", 1)[-1] for n in names})
            raise ConfigError(f"lora.targets: {pattern!r} matches no Linear module or expert weight of the model "
                              f"(their last names: {', '.join(known)})")
        chosen.update(hit)
    return [n for n in names if n in chosen]  # model order


def _check_experts(model: nn.Module, experts: str) -> None:
    moe = model.get_submodule(experts.rsplit(".", 1)[0])
    ep = moe.cfg.expert_parallel if isinstance(moe, MoE) else 1
    if ep > 1:
        raise ConfigError(f"lora.targets: adapters on expert weights ({experts}) need model.moe.expert_parallel 1, "
                          f"not {ep} (each rank would hold only its experts' adapters; not supported)")


def apply_lora(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """Wrap the target Linear layers and experts of `model` (in place) and freeze all other parameters; returns
    the adapted targets' names. Call it before `deepspeed.initialize`, which partitions the new adapters too."""
    if adapter_modules(model):
        raise ValueError("apply_lora: the model already has LoRA adapters")
    names = match_targets(model, cfg.targets)
    targets = lora_targets(model)
    experts: dict[str, list[str]] = {}
    for name in names:
        if targets[name].adapter != name:  # a stacked expert weight
            parent, weight = name.rsplit(".", 1)
            _check_experts(model, parent)
            experts.setdefault(parent, []).append(weight)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        if targets[name].adapter == name:
            _set_submodule(model, name, LoRALinear(model.get_submodule(name), cfg.rank, cfg.alpha, cfg.dropout))
    for parent, weights in experts.items():
        base = model.get_submodule(parent)
        _set_submodule(model, parent, LoRAExperts(base, tuple(weights), cfg.rank, cfg.alpha, cfg.dropout))
    return names


def lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters only: {'<module>.lora_A.weight': (r, in), '<module>.lora_B.weight': (out, r)} (an expert
    weight's: `<experts>.<weight>_lora.lora_A.weight` (r E, in), `...lora_B.weight` (out, r E)), detached
    (under ZeRO-3, call it inside a gather of those parameters)."""
    return {f"{n}.{k}": m.get_parameter(k).detach() for n, m in adapter_modules(model).items() for k in ADAPTER_KEYS}


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
    merged = {f"{n}.weight": (lambda m=m: merged_weight(m)) for n, m in lora_modules(model).items()}
    for n, m in model.named_modules():
        if isinstance(m, LoRAExperts):
            merged |= {f"{n}.{w}": (lambda m=m, w=w: m.merged(w)) for w in m.adapters()}
    adapters = set(lora_state(model))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in adapters:
                continue
            yield name, (merged[name]() if name in merged else p.detach())
        persistent = set(model.state_dict())
        for name, b in model.named_buffers():
            if name in persistent:
                yield name, b.detach()


def merge_lora(model: nn.Module) -> list[str]:
    """Fold every adapter into its base weight (in place) and put plain nn.Linear layers back; returns
    the merged module names. The result has exactly the original model's parameter names."""
    mods = lora_modules(model)
    experts = {n: m for n, m in model.named_modules() if isinstance(m, LoRAExperts)}
    for name, m in [*mods.items(), *experts.items()]:
        if any(hasattr(p, "ds_id") for p in m.parameters(recurse=False)):
            raise ValueError(f"merge_lora: {name} is ZeRO-3 partitioned; merge a gathered CPU copy "
                             "(or export with merged_state inside a gather)")
    for name, m in mods.items():
        with torch.no_grad():
            m.weight.copy_(merged_weight(m))
        plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        plain.weight, plain.bias = m.weight, m.bias  # the same Parameters: nothing is copied
        _set_submodule(model, name, plain)
    for name, m in experts.items():
        with torch.no_grad():
            for w in m.adapters():
                getattr(m, w).copy_(m.merged(w))
        plain = Experts(1, 1, m.d_expert, m.backend)
        plain.gate_up, plain.down = m.gate_up, m.down
        _set_submodule(model, name, plain)
    return [*mods, *(f"{n}.{w}" for n, m in experts.items() for w in m.adapters())]


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
