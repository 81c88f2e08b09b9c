"""Config -> DeepSpeed: the DeepSpeed config dict, the optimizer and schedule, `deepspeed.initialize`.

The optimizer is torch's AdamW handed to DeepSpeed as a client optimizer, so one update rule serves CPU
(gloo) and GPU runs, and ZeRO partitions it the same way; CPU offload switches to DeepSpeed's CPU Adam,
which offload requires.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import deepspeed
import torch
from deepspeed.moe.utils import is_moe_param, split_params_into_different_moe_groups_for_optimizer
from torch import nn

from pretrain import compat
from pretrain.config import Config, expert_parallel, grad_accum_steps
from pretrain.length import total_steps
from pretrain.train.pulse import PULSE
from pretrain.train.schedule import lr_lambda


def clips_itself(cfg: Config) -> bool:
    """Whether the loop clips (ZeRO-0 in fp32) instead of DeepSpeed: there DeepSpeed would take a second global
    norm of the gradients the loop has just measured (~7% of a small model's step); one
    `clip_grad_norm_` gives both, as in a plain PyTorch loop. ZeRO 1-3 and bf16 clip inside their optimizer."""
    return cfg.zero.stage == 0 and cfg.train.precision == "fp32"


def deepspeed_config(cfg: Config, world_size: int, load_universal: bool = False) -> dict:
    t, z = cfg.train, cfg.zero
    zero: dict = {"stage": z.stage}
    if z.stage >= 1:
        # Overlap and bucket sizes are DeepSpeed's GPU defaults; contiguous gradients cut fragmentation. Expert
        # parallelism needs them at stage 1 too: without, ZeRO-1 all-reduces every gradient over all ranks, the
        # experts' included (pretrain/train/expert_parallel.py).
        zero.update(overlap_comm=z.stage >= 2, contiguous_gradients=z.stage >= 2 or expert_parallel(cfg) > 1)
    if z.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if z.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps(cfg, world_size),
        "gradient_clipping": 0.0 if clips_itself(cfg) else cfg.optimizer.grad_clip,
        "bf16": {"enabled": t.precision == "bf16"},
        "zero_optimization": zero,
        # torch.optim.AdamW is not on DeepSpeed's tested list for ZeRO, but it is an ordinary optimizer.
        "zero_allow_untested_optimizer": True,
        "checkpoint": {"load_universal": load_universal},
        "steps_per_print": 10**9,  # the loop does the logging
        "wall_clock_breakdown": False,
    }


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    # Decay matrices only; biases, norm gains and (by convention) nothing 1-D is decayed.
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:  # a ZeRO-3 partition is flat: its full shape is ds_shape
            (decay if len(getattr(p, "ds_shape", p.shape)) >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # No empty group (LoRA trains matrices only): ZeRO drops it, and the schedule would count one group too many.
    groups = [g for g in groups if g["params"]]
    if any(is_moe_param(p) for g in groups for p in g["params"]):
        # Expert-parallel experts (pretrain/train/expert_parallel.py) in groups of their own, marked `moe`: ZeRO 1-2
        # partition those over the expert-data-parallel group only, and reduce their gradients there.
        groups = split_params_into_different_moe_groups_for_optimizer(
            [{**g, "name": "decay" if g["weight_decay"] else "no_decay"} for g in groups])
    return groups


def build_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    t, o = cfg.train, cfg.optimizer
    groups = _param_groups(model, cfg.optimizer.weight_decay)
    if cfg.zero.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=o.lr, betas=o.betas, adamw_mode=True)
    # Compiled, the optimizer step is one graph whose learning rate is an input: a tensor the schedule fills in
    # place. A float would be a constant of the graph, and every new rate a recompile.
    lr = torch.tensor(o.lr) if t.compile else o.lr
    # Eager, one fused kernel steps every tensor (ATen's fused AdamW runs on CPU and CUDA; on the 4 x 128 GPT it
    # takes 0.7 ms a step where the per-tensor loop takes 4.3 ms). Compiled, inductor fuses the loop itself.
    return torch.optim.AdamW(groups, lr=lr, betas=o.betas, eps=1e-8, fused=None if t.compile else True)


class Gate(Protocol):
    """Whether the step under way may update the weights (pretrain/train/spike.py's `Gate`): asked where the
    update happens, once the step's loss and gradient norm are known; told the norm the loop measured itself."""

    def allows(self) -> bool: ...
    def measured(self, norm: float) -> None: ...


class Schedule(torch.optim.lr_scheduler.LambdaLR):
    """LambdaLR that holds still on a step its gate refuses: a skipped step moves no learning rate either.
    (DeepSpeed skips the schedule itself when its optimizer skips on a non-finite gradient norm.)"""

    def __init__(self, optimizer: torch.optim.Optimizer, fn, gate: Gate | None = None):
        self._gate = gate  # before LambdaLR's own first step
        super().__init__(optimizer, fn)

    def step(self, *args, **kwargs) -> None:
        if self._gate is None or self._gate.allows():
            super().step(*args, **kwargs)

    def state_dict(self) -> dict:
        state = super().state_dict()
        state.pop("_gate", None)  # a checkpoint holds the schedule's position, not the run's gate
        return state


def build_schedule(cfg: Config, optimizer: torch.optim.Optimizer, steps: int | None = None,
                   gate: Gate | None = None) -> torch.optim.lr_scheduler.LambdaLR:
    """schedule.type over the run's `steps` (default: derived from the config, train.tokens / train.flops included)."""
    return Schedule(optimizer, lr_lambda(cfg.schedule, steps or total_steps(cfg)), gate)


def gate_updates(engine, gate: Gate) -> None:
    """The optimizer that updates the weights (the client's AdamW, or CPU Adam; inside ZeRO's wrapper under
    ZeRO 1-3 and bf16) steps only when `gate` allows: a refused step leaves weights and optimizer state as
    they were, at every ZeRO stage alike (ZeRO's wrapper then copies unchanged master weights back). Set after
    `compile_engine`, so the gate stays outside the compiled step."""
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    step = inner.step

    def gated(*args, **kwargs):
        return step(*args, **kwargs) if gate.allows() else None

    inner.step = gated


def without_cpu_shm_op() -> None:
    """Keep DeepSpeed's comm layer from building its CPU shared-memory collective op (`deepspeed_shm_comm`).

    On the CPU accelerator DeepSpeed JIT-compiles that op when its comm layer starts: ~25 s whenever
    ~/.cache/torch_extensions lacks it or holds a build made with other paths or flags (measured here: the first
    demo of a session spent 29 s of its 46 s start on it), a ninja check and a library load otherwise. Only
    DeepSpeed's inference all-reduce calls it; training's collectives are torch.distributed's either way.
    Marked incompatible in DeepSpeed's op table (`pretrain.compat.deepspeed_skip_op`), the op is skipped."""
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        compat.deepspeed_skip_op("deepspeed_shm_comm")


def build_engine(cfg: Config, model: nn.Module, world_size: int, load_universal: bool = False, steps: int | None = None,
                 gate: Gate | None = None):
    """Wrap `model` in a DeepSpeed engine; returns the engine (optimizer and scheduler inside it). With `gate`
    (spike.py) no step it refuses updates the weights, the optimizer state or the schedule."""
    without_cpu_shm_op()
    # With bf16 enabled DeepSpeed casts the module itself and keeps fp32 master weights in the optimizer.
    optimizer = build_optimizer(cfg, model)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=build_schedule(cfg, optimizer, steps, gate),
        config=deepspeed_config(cfg, world_size, load_universal),
        dist_init_required=False,
    )
    if world_size == 1 and cfg.zero.stage == 0:
        # Averaging gradients over one rank is a flatten, a copy and a division by 1 every step (~5% of a small
        # model's step, py-spy): skipped, with bit-identical gradients. ZeRO 1-2 reduce inside their optimizer.
        engine.enable_backward_allreduce = False
    if cfg.train.compile:
        compile_engine(engine)
    if gate is not None:
        gate_updates(engine, gate)
    return engine


# Where inductor keeps compiled graphs (FX graph and AOTAutograd caches): outside the run directory, so a
# second run of the same shapes loads its kernels instead of compiling them (seconds instead of a minute on CPU).
INDUCTOR_CACHE = Path.home() / ".cache" / "pretrain" / "inductor"
# Distinct graphs one function may compile before dynamo stops and runs it eagerly (train / eval mode and
# the sampler's growing lengths need a few; more means shapes change every step, a bug to see, not pay for).
RECOMPILE_LIMIT = 8


def compile_engine(engine) -> None:
    """torch.compile the engine's module in place (DeepSpeed's `engine.compile`, so its ZeRO hooks keep working:
    stages 0-2 give whole-model graphs, stage 3 breaks the graph where parameters are gathered). The state-dict
    keys stay those of the eager module, so checkpoints of compiled and eager runs are interchangeable.
    DeepCompile is not used: it serves ZeRO-3 on GPUs and needs a native op this set-up does not build."""
    compat.torch_inductor_cache_dir(str(INDUCTOR_CACHE))  # unless the user chose one
    compat.torch_dynamo_recompiles(RECOMPILE_LIMIT)  # each recompile, with the guard that failed, in the worker log
    engine.compile()
    # The optimizer step too: AdamW's per-tensor loops become a few fused kernels (on a small model the step is
    # ~12% of the time, and compiled it takes about half as long). ZeRO 1-2 step the same torch optimizer over
    # their flat partitions. ZeRO-3's sub-group stepping trips AdamW's capturable check on CPU tensors under
    # dynamo, so it stays eager there, as does DeepSpeed's CPU Adam (offload), native code already.
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    if (engine.zero_optimization_stage() < 3 and isinstance(inner, torch.optim.AdamW)
            and isinstance(inner.param_groups[0]["lr"], torch.Tensor)):
        inner.step = torch.compile(inner.step)


def compile_stats() -> dict:
    """What dynamo compiled in this process (for summary.json): frames compiled (each recompile is one more),
    graphs, and graph breaks."""
    return compat.torch_dynamo_counts()


def backward_and_step(engine, loss: torch.Tensor, clip: float | None = None, gate: Gate | None = None) -> float | None:
    """One micro-batch's backward and step; at the accumulation boundary returns the global gradient
    norm (before clipping). ZeRO stages record it themselves; stage 0 does not, so it is taken here,
    after DeepSpeed has averaged the gradients across ranks and before the optimizer consumes them, and
    with `clip` (`clips_itself`) the same call clips them to that norm (0: measure only); `gate` is told it
    before the optimizer asks the gate whether to step."""
    engine.backward(loss)
    boundary = engine.is_gradient_accumulation_boundary()
    norm = None
    if boundary and engine.zero_optimization_stage() == 0:
        params = [p for p in engine.module.parameters() if p.grad is not None]
        if any(is_moe_param(p) for p in params):
            norm = float(_expert_parallel_norm(params))
            if clip:
                torch.nn.utils.clip_grads_with_norm_(params, clip, torch.tensor(norm))
        elif clip:
            norm = float(torch.nn.utils.clip_grad_norm_(params, clip)) if params else 0.0
        else:
            norm = float(torch.nn.utils.get_total_norm([p.grad for p in params])) if params else 0.0
        if gate is not None:
            gate.measured(norm)
    PULSE.at("optimizer")
    engine.step()  # steps the optimizer and schedule only at the boundary
    if boundary and norm is None:
        gn = engine.get_global_grad_norm()
        norm = float(gn) if gn is not None else None
    return norm


def _expert_parallel_norm(params: list[nn.Parameter]) -> torch.Tensor:
    """The global gradient norm of a model with expert-parallel experts: each rank holds other experts (the ranks
    of one expert-data-parallel group, the same ones, reduced alike), so their squares are summed over the
    expert-parallel group; every other gradient is alike on every rank."""
    dense = [p.grad for p in params if not is_moe_param(p)]
    total = torch.nn.utils.get_total_norm(dense).double() ** 2 if dense else torch.zeros((), dtype=torch.float64)
    for name in sorted({p.group_name for p in params if is_moe_param(p)}):
        sq = torch.nn.utils.get_total_norm([p.grad for p in params if is_moe_param(p) and p.group_name == name])
        sq = sq.double() ** 2
        torch.distributed.all_reduce(sq, group=compat.deepspeed_expert_group(name))
        total = total + sq.to(total.device)
    return total.sqrt()
