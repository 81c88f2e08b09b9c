"""LoRA on a mixture-of-experts layer's stacked expert weights (`experts.gate_up`, `experts.down`): a rank-r
adapter per expert and projection, held in the layout PEFT gives a 3-D parameter it adapts through
`target_parameters` (peft 0.17+, `lora.ParamWrapper`), so a PEFT adapter is ours under other names.

PEFT adapts a stacked weight of E experts with one `lora_A` (r E, in) and one `lora_B` (out, r E): expert e's
factors are A_e = A[e r : (e+1) r] (a block of rows) and B_e = B[:, e::E] (every E-th column: PEFT reshapes B to
(out, r, E)), and its update is B_e A_e (out, in), which on our (E, in, out) layout is its transpose. We keep
those two tensors as they are. That makes the export a renaming, and the seeded initialisation of the trainer
(kaiming on the 2-D A, fan-in `in`; B zero) PEFT's own.

The update is applied to the rows, not folded into the weights: an expert's rows go through x A_e^T and then
B_e^T, two more grouped products of width r beside the expert's own. W + B A per expert would build a tensor,
and in the backward a gradient, as large as every expert of the layer, the memory LoRA exists to save.
Each factor is a module with its own `weight` that the forward calls, so ZeRO-3 gathers it like a Linear's.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pretrain import kernels
from pretrain.models.moe import Experts, swiglu_experts

EXPERT_WEIGHTS = ("gate_up", "down")  # the stacked weights of `Experts`, (E, in, out) each


def stacked_shape(p: torch.Tensor) -> tuple[int, int, int]:
    """(E, in, out) of a stacked expert weight, also when ZeRO-3 has partitioned it (`ds_shape`)."""
    return tuple(getattr(p, "ds_shape", p.shape))


class _FactorA(nn.Module):
    """PEFT's lora_A of E experts, (r E, in); `grouped()` is the (E, in, r) stack the grouped product takes."""

    def __init__(self, n: int, rank: int, d_in: int, **kw):
        super().__init__()
        self.n, self.rank = n, rank
        self.weight = nn.Parameter(torch.empty(rank * n, d_in, **kw))
        # PEFT's init: nn.Linear's default on the 2-D tensor (fan-in d_in, as PEFT's Linear(in, r E) has).
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, xs: torch.Tensor, counts: torch.Tensor, backend: str) -> torch.Tensor:
        w = self.weight.view(self.n, self.rank, -1).transpose(1, 2)
        return kernels.grouped_mm(xs, w, counts, backend=backend)


class _FactorB(nn.Module):
    """PEFT's lora_B of E experts, (out, r E), column k E + e being expert e's k-th; zero at first."""

    def __init__(self, n: int, rank: int, d_out: int, **kw):
        super().__init__()
        self.n, self.rank = n, rank
        self.weight = nn.Parameter(torch.zeros(d_out, rank * n, **kw))

    def forward(self, ts: torch.Tensor, counts: torch.Tensor, backend: str) -> torch.Tensor:
        w = self.weight.view(-1, self.rank, self.n).permute(2, 1, 0)  # (E, r, out)
        return kernels.grouped_mm(ts, w, counts, backend=backend)


class ExpertLoRA(nn.Module):
    """The adapter of one stacked weight (E, in, out): rows grouped by expert -> their update (N, out)."""

    def __init__(self, shape: tuple[int, int, int], rank: int, alpha: float, dropout: float, **kw):
        super().__init__()
        n, d_in, d_out = shape
        self.rank, self.scaling = rank, alpha / rank
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = _FactorA(n, rank, d_in, **kw)
        self.lora_B = _FactorB(n, rank, d_out, **kw)

    def forward(self, xs: torch.Tensor, counts: torch.Tensor, backend: str) -> torch.Tensor:
        return self.lora_B(self.lora_A(self.lora_dropout(xs), counts, backend), counts, backend) * self.scaling

    def delta(self) -> torch.Tensor:
        """scaling x A_e^T B_e^T for every expert, (E, in, out) in fp32: what merging adds to the weight."""
        a = self.lora_A.weight.float().view(self.lora_A.n, self.rank, -1).transpose(1, 2)
        b = self.lora_B.weight.float().view(-1, self.rank, self.lora_B.n).permute(2, 1, 0)
        return torch.bmm(a, b) * self.scaling


class LoRAExperts(nn.Module):
    """`Experts` with adapters on some of its stacked weights (`gate_up_lora`, `down_lora`), the weights frozen.

    The weights are the replaced module's own Parameters under their own names, so released experts load into it
    unchanged, and a ZeRO-3 partition stays one."""

    def __init__(self, base: Experts, targets: tuple[str, ...], rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.gate_up, self.down = base.gate_up, base.down
        self.d_expert, self.backend = base.d_expert, base.backend
        for p in (self.gate_up, self.down):
            p.requires_grad_(False)
        kw = {"device": base.gate_up.device, "dtype": base.gate_up.dtype}
        self.gate_up_lora = self.down_lora = None
        for name in targets:
            adapter = ExpertLoRA(stacked_shape(getattr(base, name)), rank, alpha, dropout, **kw)
            setattr(self, f"{name}_lora", adapter)

    def adapters(self) -> dict[str, ExpertLoRA]:
        """{weight name: its adapter} for the adapted weights."""
        return {w: a for w in EXPERT_WEIGHTS if (a := getattr(self, f"{w}_lora")) is not None}

    def forward(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        hooks = {w: (lambda x, c, a=a: a(x, c, self.backend)) for w, a in self.adapters().items()}
        return swiglu_experts(xs, self.gate_up, self.down, counts, self.d_expert, self.backend, adapters=hooks)

    def merged(self, name: str) -> torch.Tensor:
        """The weight `name` with its adapter folded in (fp32 sum, stored in the weight's dtype)."""
        w = getattr(self, name)
        a = getattr(self, f"{name}_lora")
        return w.detach() if a is None else (w.float() + a.delta()).to(w.dtype)

    def extra_repr(self) -> str:
        a = next(iter(self.adapters().values()))
        return f"adapted={list(self.adapters())}, rank={a.rank}, scaling={a.scaling:g}"
