"""One optimizer step: its micro-batches, forward/backward on each, and the metrics reduced over ranks.

Per step the loop prepares `grad_accum` micro-batches, all-reduces their loss-unit count over ranks, and
runs forward/backward on each with the loss sum divided by that global count, so the gradient and the
logged loss are the sum of per-unit losses over the global batch divided by its unit count, however units
are spread over micro-batches and ranks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from pretrain.errors import is_deterministic
from pretrain.objectives import Metrics, add_metrics
from pretrain.train.collectives import agree_on_errors, reduce_metrics
from pretrain.train.engine import backward_and_step
from pretrain.train.pulse import PULSE

if TYPE_CHECKING:
    from pretrain.train.parts import Run
    from pretrain.train.startup import Marks


def next_batches(r: Run, startup: Marks | None) -> tuple[list[dict], torch.Tensor]:
    """The step's prepared micro-batches and their unit count over all ranks; `startup` (the first step's)
    is marked once the raw batches are read. Collective."""
    micro: list[dict] = []
    PULSE.compute_begin()
    try:
        raw = [next(r.stream) for _ in range(r.accum)]
        if startup is not None:
            startup.mark("first_batch")
        micro = [r.objective.prepare(b, r.device) for b in raw]
        if r.sample_batch is None:
            r.sample_batch = raw[0]
        count, error = torch.stack([r.objective.count(b) for b in micro]).sum().float(), None
    except Exception as e:
        if not is_deterministic(e):
            raise
        count, error = torch.zeros((), device=r.device), e
    PULSE.compute_end()
    PULSE.at("collective")
    return micro, agree_on_errors(count, error, r.world)


def forward_backward(r: Run, micro: list[dict], count: torch.Tensor, step: int) -> tuple[dict[str, float], float | None, str | None]:
    """Forward and backward on each micro-batch of `step`, the optimizer step after the last: (metrics reduced over
    ranks, the gradient norm, why the step was skipped or None). The metrics all-reduce runs after the last
    forward, before the update, so the spike gate (pretrain/train/spike.py) decides from the step's loss over
    all ranks and the global norm, alike on every rank. Collective; it synchronises, so the step's time is
    complete on return."""
    # engine.backward divides by grad_accum and the gradient all-reduce averages over ranks.
    scale = r.world * r.accum / count.clamp(min=1)
    local: Metrics = {}
    values: dict[str, float] = {}
    grad_norm = None
    for i, b in enumerate(micro):
        PULSE.at("forward")
        PULSE.compute_begin(r.device)
        total, n, metrics = r.objective.loss(r.engine, b)
        PULSE.compute_end(r.device)
        add_metrics(local, {"loss": (total, n), **metrics})
        if r.family is not None and r.family.step_metrics is not None:  # e.g. a mixture of experts' routing loads
            add_metrics(local, r.family.step_metrics(r.engine.module))
        if i == len(micro) - 1:
            # Whether any rank was asked to stop (SIGTERM, preemption) rides in the same all-reduce: > 0 on every rank.
            one = torch.ones((), device=r.device)
            local["stop"] = (one * (PULSE.stop_reason is not None), one)
            PULSE.at("collective")
            values = reduce_metrics(local, r.device)
            if r.family is not None and r.family.after_reduce is not None:
                values = r.family.after_reduce(r.engine.module, values)
            r.spikes.open(values["loss"])
        PULSE.at("backward")
        grad_norm = backward_and_step(r.engine, total * scale, r.clip, r.spikes)
    if r.device.type == "cuda":  # the update's kernels are done: the step's time is all in this step
        torch.cuda.synchronize(r.device)
    return values, grad_norm, r.spikes.close(step, grad_norm)
