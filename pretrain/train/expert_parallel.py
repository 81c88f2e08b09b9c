"""Expert parallelism (`model.moe.expert_parallel`, EP), applied to a built model from outside, as ZeRO is.

With EP > 1 each MoE layer's `experts` (pretrain/models/moe.py) is swapped, before the weights are written and before
the DeepSpeed engine, for `ParallelExperts`: this rank's E / EP experts only. Ranks r, r+1, ..., r+EP-1 (consecutive)
form an expert-parallel group holding the E experts between them; ranks that hold the same experts form an
expert-data-parallel group. A forward sends each routed row to the rank that owns its expert with one all-to-all
over the expert-parallel group (the row counts first, so every rank knows what it receives), runs the local grouped
product, and sends the results back the same way; the backward is the two all-to-alls reversed.

The groups are DeepSpeed's (`deepspeed.utils.groups._create_expert_and_data_parallel`, what DeepSpeed's own MoE layer
calls), and the expert weights carry DeepSpeed's marks of an expert parameter (`allreduce = False`, `group_name`),
so DeepSpeed reduces their gradients over the expert-data-parallel group only (ZeRO 1-2's reduce-scatter, stage 0's
all-reduce), divided by the whole data-parallel size as for every other gradient, and keeps their optimizer state
in their own partitions (`split_params_into_different_moe_groups_for_optimizer`, pretrain/train/engine.py). The
engine turns that on only for models holding its MoE type, so `ParallelExperts` is one (`deepspeed.moe.layer.MoE`),
without DeepSpeed's gate or experts.

Refused: EP not dividing the world size, and ZeRO-3 with EP > 1 (ZeRO-3 partitions every parameter over the whole
data-parallel group; at EP 1 the experts are partitioned like the rest).

Checkpoints. A checkpoint of an EP > 1 run is DeepSpeed's own MoE layout: its engine writes the dense weights
(`mp_rank_00_model_states.pt`, the experts left out), the optimizer state (ZeRO 1-2: each rank's partitions, the
experts' over their expert-data-parallel group; stage 0: `expp_rank_<k>_...optim_states.pt`, one per EP rank), and
`save_experts` writes each expert of each layer to its file (`layer_<L>_expert_<E>_mp_rank_00_model_states.pt`,
global E), which DeepSpeed's engine would write only for its own per-expert modules. `load_checkpoint` reads this
rank's experts' files itself and hands their tensors on under per-expert names; `expert_loader` stacks them into
this rank's slices. A resume keeps the world size and EP (pretrain/train/resume.py refuses another in one line);
the final weights gather every layer's experts along the expert axis (`full_value`).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable

import torch
import torch.distributed as dist
from deepspeed.moe.layer import MoE as DeepSpeedMoE
from torch import nn

from pretrain import compat
from pretrain.config import Config, expert_parallel
from pretrain.errors import RunError
from pretrain.models.moe import MoE, swiglu_experts
from pretrain.train.engine import without_cpu_shm_op


def check(cfg: Config, world: int) -> None:
    """RunError (one line) unless the run's expert parallelism fits `world` ranks and its ZeRO stage."""
    ep = expert_parallel(cfg)
    if ep == 1:
        return
    if world % ep:
        raise RunError(f"model.moe.expert_parallel ({ep}) must divide the number of workers ({world})")
    if cfg.zero.stage == 3:
        raise RunError(f"model.moe.expert_parallel ({ep}) needs zero.stage 0-2: ZeRO-3 would partition the experts "
                       "over every rank (at expert_parallel 1 it partitions them like any other weight)")


class _AllToAll(torch.autograd.Function):
    """Rows to the ranks of `group`: `send[j]` rows of x to rank j, `recv[j]` rows from it; the backward sends the
    gradients back the way the rows came."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, send: list[int], recv: list[int], group) -> torch.Tensor:
        ctx.send, ctx.recv, ctx.group = send, recv, group
        return _all_to_all(x, send, recv, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _all_to_all(grad, ctx.recv, ctx.send, ctx.group), None, None, None


def _all_to_all(x: torch.Tensor, send: list[int], recv: list[int], group) -> torch.Tensor:
    out = x.new_empty((sum(recv), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), output_split_sizes=recv, input_split_sizes=send, group=group)
    return out


class ParallelExperts(DeepSpeedMoE):
    """This rank's share of a layer's SwiGLU experts, `Experts`' drop-in: same call (rows grouped by all E experts,
    counts per expert), same parameter names, each holding experts [first, first + E / EP) of the full weights.
    A DeepSpeed `MoE` by type only (its constructor builds a gate and experts of its own: not called)."""

    def __init__(self, n_experts: int, d_model: int, d_expert: int, backend: str, group_name: str, group):
        nn.Module.__init__(self)
        ep = dist.get_world_size(group)
        # What DeepSpeed's engine and checkpointing read of its MoE layers.
        self.num_experts, self.ep_size, self.num_local_experts = n_experts, ep, n_experts // ep
        self.expert_group_name = group_name
        self.group, self.d_expert, self.backend = group, d_expert, backend
        self.first = dist.get_rank(group) * self.num_local_experts
        local = self.num_local_experts
        self.gate_up = nn.Parameter(torch.empty(local, d_model, 2 * d_expert))
        self.down = nn.Parameter(torch.empty(local, d_expert, d_model))
        for p in (self.gate_up, self.down):
            p.allreduce, p.group_name = False, group_name  # DeepSpeed's marks of an expert parameter
            p.expert_shape = (n_experts, *p.shape[1:])  # the initialiser and loaders write this rank's slice
            p.expert_rows = (self.first, self.first + local)

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """The engine's call to make the layer's groups: made already, before the weights were written."""

    def forward(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        ep, local = self.ep_size, self.num_local_experts
        per_rank = counts.reshape(ep, local)  # rows for each rank's experts (xs is grouped by expert: contiguous)
        got = torch.empty_like(per_rank)  # got[j, l]: rows rank j sends to my l-th expert
        dist.all_to_all_single(got, per_rank.contiguous(), group=self.group)
        send, recv = per_rank.sum(1).tolist(), got.sum(1).tolist()
        rows = _AllToAll.apply(xs, send, recv, self.group)  # by source rank, then by expert within each
        # By expert, then by source rank: a stable sort of each row's local expert.
        expert = torch.arange(local, device=xs.device).repeat(ep).repeat_interleave(got.reshape(-1).to(xs.device))
        order = torch.argsort(expert, stable=True)
        ys = swiglu_experts(rows[order], self.gate_up, self.down, got.sum(0), self.d_expert, self.backend)
        back = torch.zeros_like(ys).index_copy(0, order, ys)  # by source rank again
        return _AllToAll.apply(back, recv, send, self.group)

    def extra_repr(self) -> str:
        return f"experts {self.first}..{self.first + self.num_local_experts - 1} of {self.num_experts}"


def parallelize_experts(model: nn.Module, ep: int) -> int:
    """Swap every MoE layer's `experts` for this rank's share of EP ranks, `ParallelExperts` (uninitialised: the
    caller writes the weights, `expert_rows` of each full value); collective (the groups are made on every rank).
    Returns the number of layers swapped: 0 at EP 1."""
    if ep == 1:
        return 0
    group_name = _groups(ep)
    group = compat.deepspeed_expert_group(group_name)
    swapped = 0
    for module in model.modules():
        if isinstance(module, MoE):
            old = module.experts
            d_model = old.gate_up.shape[1]
            module.experts = ParallelExperts(module.cfg.n_experts, d_model, old.d_expert, old.backend, group_name, group)
            del old  # the full experts, never written: only this rank's slice is
            swapped += 1
    return swapped


def _groups(ep: int) -> str:
    """DeepSpeed's expert-parallel and expert-data-parallel groups of size `ep` (made once); their name."""
    from deepspeed import comm
    from deepspeed.accelerator import get_accelerator

    without_cpu_shm_op()  # DeepSpeed's comm layer starts here, before the engine
    comm.init_distributed(dist_backend=get_accelerator().communication_backend_name(), dist_init_required=False)
    return compat.deepspeed_expert_groups(ep)


def parallel_layers(module: nn.Module) -> list[tuple[str, ParallelExperts]]:
    """(name, experts) of every expert-parallel layer, in DeepSpeed's order of its MoE layers (`named_modules`)."""
    return [(n, m) for n, m in module.named_modules() if isinstance(m, ParallelExperts)]


WEIGHTS = ("gate_up", "down")


def ep_size(module: nn.Module) -> int:
    """The model's expert parallelism: the ranks each MoE layer's experts are spread over (1 without)."""
    layers = parallel_layers(module)
    return layers[0][1].ep_size if layers else 1


def save_experts(engine, save_dir: str, tag: str) -> int:
    """Write each of this rank's experts to DeepSpeed's file of that expert (global index) in `save_dir/tag`, through
    the engine's checkpoint engine (host copies, written in the background: pretrain/train/checkpoint.py); only the
    first rank of each expert-data-parallel group writes. Returns the number of files written (0 at EP 1)."""
    written = 0
    for layer, (name, experts) in enumerate(parallel_layers(engine.module)):
        if compat.deepspeed_expert_data_rank(experts.expert_group_name) != 0:
            continue
        for local in range(experts.num_local_experts):
            g = experts.first + local
            state = {f"{name}.{compat.DEEPSPEED_EXPERT_KEY}.{g}.{w}": getattr(experts, w)[local].detach().clone()
                     for w in WEIGHTS}
            engine.checkpoint_engine.save(state, compat.deepspeed_expert_file(save_dir, tag, layer, g))
            written += 1
    return written


_PER_EXPERT = re.compile(rf"(.+)\.{re.escape(compat.DEEPSPEED_EXPERT_KEY)}\.(\d+)\.({'|'.join(WEIGHTS)})")


def expert_loader(module: nn.Module, strict: bool) -> Callable | None:
    """For `load_checkpoint(custom_load_fn=...)` of a model with expert-parallel layers (None without): the state it
    is handed has this rank's experts one by one (`<layer>.deepspeed_moe.experts.deepspeed_experts.<local>.<w>`);
    they are stacked into the layer's slices, then the whole state is loaded (`strict` as the caller asks)."""
    if not parallel_layers(module):
        return None

    def load(src: dict, dst: nn.Module) -> None:
        pieces: dict[str, dict[int, torch.Tensor]] = defaultdict(dict)
        for key in [k for k in src if _PER_EXPERT.fullmatch(k)]:
            layer, local, w = _PER_EXPERT.fullmatch(key).groups()
            pieces[f"{layer}.{w}"][int(local)] = src.pop(key)
        for key, by_local in pieces.items():
            src[key] = torch.stack([by_local[i] for i in range(len(by_local))])
        dst.load_state_dict(src, strict=strict)

    return load


def full_value(p: torch.Tensor, value: torch.Tensor | None = None) -> torch.Tensor:
    """The whole of parameter p's `value` (p itself by default; its fp32 master, say): an expert-parallel slice
    (`expert_rows`) gathered along the expert axis over its expert-parallel group (a collective over that group),
    anything else as it is."""
    value = p if value is None else value
    if not hasattr(p, "expert_rows") or p.shape[0] == p.expert_shape[0]:
        return value
    group = compat.deepspeed_expert_group(p.group_name)
    parts = [torch.empty_like(value) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, value.detach().contiguous(), group=group)
    return torch.cat(parts)
