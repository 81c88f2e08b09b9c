"""The mixture-of-experts feed-forward block of the Transformer family (`model.moe`): a router picks `top_k` of
`n_experts` SwiGLU experts for every token, optionally beside always-on shared experts.

Routing is dropless by default: every token reaches its k experts, whatever their load. Tokens are grouped by expert
(`kernels.moe_permute`), each expert's rows go through its two matrix products as one grouped product over the
experts' variable row counts (`kernels.grouped_mm`), and the rows come back weighted (`kernels.moe_unpermute`).
`capacity_factor` caps each expert at ceil(factor x tokens x k / experts) rows; the rows past it are dropped (their
weight is zero: the token keeps its residual) and counted.

The router:
- scores are the softmax over experts (Mixtral, Qwen, OLMoE) or one sigmoid per expert (DeepSeek-V3);
- `renormalize`: the k chosen weights are divided by their sum (Mixtral, Qwen3-MoE) or kept as scored (Qwen2-MoE,
  OLMoE);
- `bias_balance` > 0: DeepSeek-V3's balance without an auxiliary loss. A per-expert bias, added to the scores only to
  choose the experts (never to weigh them), moves by `bias_balance` after every step against the expert's load:
  down when above the mean, up when below. The loads are the step's, summed over every rank by the trainer's
  metrics all-reduce (`after_reduce`), so every rank moves its bias alike and the model knows nothing of ranks.

Losses, added to the training loss (never to evaluation's), both per token like the loss itself:
- `aux_loss`: Switch Transformer's load-balancing loss, E x sum_e f_e P_e (f_e: the share of routed rows that went to
  expert e; P_e: the mean router probability of e), 1 when perfectly balanced;
- `z_loss`: ST-MoE's router z-loss, the mean of logsumexp(logits)^2.

Expert weights are 3-D parameters laid out for the grouped product, (E, d_in, d_out): `experts.gate_up`
(E, d_model, 2 x d_expert: the gate's columns, then the up projection's) and `experts.down` (E, d_expert, d_model).
`expert_parallel` spreads them over ranks; the model itself knows nothing of it: the trainer swaps `experts` for a
version holding one rank's share (pretrain/train/expert_parallel.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from pretrain import kernels
from pretrain.config import Section
from pretrain.models.layers import SwiGLUMLP


class MoeConfig(Section):
    """`model.moe`: which layers are mixtures of experts, and how they route."""

    n_experts: int = Field(8, gt=0, description="routed experts per MoE layer")
    top_k: int = Field(2, gt=0, description="experts each token is sent to")
    d_expert: int | None = Field(None, gt=0, description="hidden width of one expert; default the model's d_ff")
    shared_width: int = Field(0, ge=0, description="hidden width of the always-on shared expert(s); 0: none")
    shared_gate: bool = Field(False, description="scale the shared expert by sigmoid(w . x) per token (Qwen2-MoE)")
    score: Literal["softmax", "sigmoid"] = Field("softmax", description="router scores: softmax over experts, or a sigmoid each (DeepSeek-V3)")
    renormalize: bool = Field(True, description="divide the top-k weights by their sum")
    bias_balance: float = Field(0.0, ge=0, description="DeepSeek-V3's auxiliary-loss-free balance: the bias update rate (0: off)")
    aux_loss: float = Field(0.01, ge=0, description="coefficient of the load-balancing loss (Switch Transformer)")
    z_loss: float = Field(0.0, ge=0, description="coefficient of the router z-loss (ST-MoE)")
    every: int = Field(1, gt=0, description="every n-th layer is MoE (Hugging Face's decoder_sparse_step): 1 all, 2 every other")
    first_dense: int = Field(0, ge=0, description="the first k layers stay dense (DeepSeek's first_k_dense_replace)")
    capacity_factor: float | None = Field(None, gt=0, description="cap each expert at factor x tokens x k / experts rows; none: dropless")
    expert_parallel: int = Field(1, gt=0, description="ranks each layer's experts are spread over (expert parallelism, applied by the trainer); 1: every rank holds all")

    @model_validator(mode="after")
    def _routing(self) -> MoeConfig:
        if self.top_k > self.n_experts:
            raise ValueError(f"model.moe.top_k ({self.top_k}) must not exceed model.moe.n_experts ({self.n_experts})")
        if self.shared_gate and not self.shared_width:
            raise ValueError("model.moe.shared_gate needs a shared expert (model.moe.shared_width > 0)")
        if self.n_experts % self.expert_parallel:
            raise ValueError(f"model.moe.expert_parallel ({self.expert_parallel}) must divide model.moe.n_experts "
                             f"({self.n_experts})")
        return self

    def is_moe_layer(self, i: int) -> bool:
        return i >= self.first_dense and (i + 1) % self.every == 0


class Experts(nn.Module):
    """`n` SwiGLU experts as two 3-D weights, run as grouped matrix products over rows grouped by expert."""

    def __init__(self, n: int, d_model: int, d_expert: int, backend: str):
        super().__init__()
        self.gate_up = nn.Parameter(torch.empty(n, d_model, 2 * d_expert))
        self.down = nn.Parameter(torch.empty(n, d_expert, d_model))
        self.d_expert, self.backend = d_expert, backend

    def forward(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        return swiglu_experts(xs, self.gate_up, self.down, counts, self.d_expert, self.backend)


def swiglu_experts(xs: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, counts: torch.Tensor, d_expert: int,
                   backend: str, adapters: dict[str, Callable] | None = None) -> torch.Tensor:
    """Rows grouped by expert (`counts[e]` rows for expert e, in order) through their experts' SwiGLU: the
    product shared by `Experts`, its LoRA version (`adapters`: "gate_up" / "down" -> a function of the rows and
    counts that adds to that product, pretrain/models/lora_experts.py) and the trainer's expert-parallel version
    (pretrain/train/expert_parallel.py)."""
    adapters = adapters or {}
    gu = kernels.grouped_mm(xs, gate_up, counts, backend=backend)
    if "gate_up" in adapters:
        gu = gu + adapters["gate_up"](xs, counts)
    h = kernels.swiglu(gu[:, :d_expert], gu[:, d_expert:], backend=backend)
    out = kernels.grouped_mm(h, down, counts, backend=backend)
    return out + adapters["down"](h, counts) if "down" in adapters else out


class MoE(nn.Module):
    """The MoE feed-forward block: (B, T, d) -> (B, T, d). After each forward, `stats` holds the step's detached
    routing statistics and, in training, `aux` the weighted auxiliary losses (a scalar per token)."""

    def __init__(self, cfg: MoeConfig, d_model: int, d_ff: int, backend: str):
        super().__init__()
        self.cfg, self.backend = cfg, backend
        self.router = nn.Linear(d_model, cfg.n_experts, bias=False)
        self.register_buffer("balance", torch.zeros(cfg.n_experts), persistent=True)  # bias_balance's per-expert bias
        self.experts = Experts(cfg.n_experts, d_model, cfg.d_expert or d_ff, backend)
        self.shared = SwiGLUMLP(d_model, cfg.shared_width, False, backend) if cfg.shared_width else None
        self.shared_gate = nn.Linear(d_model, 1, bias=False) if cfg.shared_gate else None
        self.stats: dict[str, torch.Tensor] = {}
        self.aux: torch.Tensor | None = None

    def route(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(weights (N, k), experts (N, k), scores (N, E) as probabilities, logits (N, E)), in fp32."""
        c = self.cfg
        logits = self.router(h).float()
        scores = logits.softmax(-1) if c.score == "softmax" else logits.sigmoid()
        if c.bias_balance:
            experts = (scores + self.balance.float()).topk(c.top_k, dim=-1).indices
            weights = scores.gather(-1, experts)
        else:
            weights, experts = scores.topk(c.top_k, dim=-1)
        if c.renormalize:
            weights = weights / weights.sum(-1, keepdim=True).clamp(min=1e-20)
        return weights, experts, scores, logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        shape = x.shape
        h = x.reshape(-1, shape[-1])
        weights, experts, scores, logits = self.route(h)
        dropped = None
        if c.capacity_factor is not None:
            weights, dropped = _cap(weights, experts, c)
        xs, counts, order = kernels.moe_permute(h, experts, c.n_experts, backend=self.backend)
        ys = self.experts(xs, counts)
        out = kernels.moe_unpermute(ys, order, weights.to(ys.dtype), backend=self.backend)
        if self.shared is not None:
            s = self.shared(h)
            if self.shared_gate is not None:
                s = torch.sigmoid(self.shared_gate(h)) * s
            out = out + s
        self._record(counts, scores, logits, dropped)
        return out.reshape(shape)

    def _record(self, counts: torch.Tensor, scores: torch.Tensor, logits: torch.Tensor, dropped) -> None:
        c, n = self.cfg, scores.shape[0]
        probs = scores if c.score == "softmax" else scores / scores.sum(-1, keepdim=True).clamp(min=1e-20)
        load = counts.float() / max(n * c.top_k, 1)  # f_e: the share of routed rows per expert
        self.aux = None
        if self.training and (c.aux_loss or c.z_loss):
            aux = logits.new_zeros(())
            if c.aux_loss:
                aux = aux + c.aux_loss * c.n_experts * (load * probs.mean(0)).sum()
            if c.z_loss:
                aux = aux + c.z_loss * torch.logsumexp(logits, dim=-1).pow(2).mean()
            self.aux = aux
        with torch.no_grad():
            entropy = -(probs * probs.clamp(min=1e-20).log()).sum(-1).sum()
            self.stats = {"counts": counts.detach().float(), "rows": torch.tensor(float(n * c.top_k), device=counts.device),
                          "entropy": entropy.detach(), "tokens": torch.tensor(float(n), device=counts.device),
                          "dropped": (dropped.float() if dropped is not None else torch.zeros((), device=counts.device))}


def _cap(weights: torch.Tensor, experts: torch.Tensor, c: MoeConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero the weights of the rows past each expert's capacity, in (token, slot) order; (weights, rows dropped)."""
    n = experts.shape[0]
    capacity = math.ceil(c.capacity_factor * n * c.top_k / c.n_experts)
    flat = experts.reshape(-1)
    onehot = F.one_hot(flat, c.n_experts)
    position = (onehot.cumsum(0) * onehot).sum(-1) - 1  # each row's place in its expert's queue
    keep = (position < capacity).reshape(weights.shape)
    return weights * keep, (~keep).sum()


def moe_metrics(blocks) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The routing statistics of the last forward of every MoE layer in `blocks` (their `mlp`), as (sum, count)
    pairs for the trainer's metrics all-reduce: per layer the load of each expert (`moe/l<i>/load<e>`), the
    router's mean entropy, the rows dropped, and the auxiliary losses."""
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for i, block in enumerate(blocks):
        m = block.mlp
        if not isinstance(m, MoE) or not m.stats:
            continue
        s = m.stats
        for e, count in enumerate(s["counts"]):
            out[f"moe/l{i}/load{e}"] = (count, s["rows"])
        out[f"moe/l{i}/entropy"] = (s["entropy"], s["tokens"])
        if m.cfg.capacity_factor is not None:
            out[f"moe/l{i}/dropped"] = (s["dropped"], s["rows"])
        if m.aux is not None:
            out["moe_aux_loss"] = (m.aux.detach() + out.get("moe_aux_loss", (0.0, 0))[0], torch.ones((), device=m.aux.device))
    return out


def load_grid(row: dict) -> dict:
    """The step's expert loads as one grid for the trainer's heatmaps (pretrain/metrics/heatmap.py): layers x
    experts, each load as a multiple of the even share (1.0: balanced), from the row's `moe/l<i>/load<e>`."""
    loads: dict[int, dict[int, float]] = {}
    for key, value in row.items():
        parts = key.split("/")
        if len(parts) == 3 and parts[0] == "moe" and parts[2].startswith("load") and parts[2][4:].isdigit():
            loads.setdefault(int(parts[1][1:]), {})[int(parts[2][4:])] = float(value)
    if not loads:
        return {}
    layers = sorted(loads)
    values = [[loads[i][e] * len(loads[i]) for e in sorted(loads[i])] for i in layers]
    return {"moe/load": ([f"layer {i}" for i in layers], values, "expert", "load / even share")}


def after_reduce(blocks, values: dict[str, float]) -> dict[str, float]:
    """After the step's metrics are reduced over every rank: each MoE layer's max/mean load (`moe/l<i>/max_load`, and
    the worst layer's as `moe_max_load`), and the bias-balance update from the global loads (alike on every rank)."""
    out = dict(values)
    for i, block in enumerate(blocks):
        m = block.mlp
        if not isinstance(m, MoE):
            continue
        names = [f"moe/l{i}/load{e}" for e in range(m.cfg.n_experts)]
        if names[0] not in values:
            continue
        load = torch.tensor([values[n] for n in names])
        mean = float(load.mean())
        out[f"moe/l{i}/max_load"] = float(load.max()) / mean if mean > 0 else 0.0
        if m.cfg.bias_balance:
            with torch.no_grad():
                m.balance.add_(m.cfg.bias_balance * torch.sign(mean - load).to(m.balance))
    layers = [v for k, v in out.items() if k.endswith("/max_load")]
    if layers:  # the console's one figure: the worst layer's max/mean load (1.0: perfectly balanced)
        out["moe_max_load"] = max(layers)
    return out
