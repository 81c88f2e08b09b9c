"""Run length: `train.steps`, or `train.tokens` and `train.flops` turned into optimizer steps.

A scaling ladder plans runs by compute (C = FLOPs per token x tokens) and by data (D tokens), not by
steps; the trainer counts steps. The conversion needs the objective's units per sample (tokens of a
sequence, 1 for an image) and, for FLOPs, the family's FLOPs per unit (`Family.flops_per_unit`, the
same figure MFU and the metrics use), so a run asked for C FLOPs logs `flops` >= C at its end. Steps are
rounded up: a run never trains on less than it was asked for, and overshoots by under one step.
"""

from __future__ import annotations

import math
from typing import Any

from pretrain.errors import LengthError


def steps_for(*, units_per_step: int, tokens: float | None = None, flops: float | None = None,
              flops_per_unit: float | None = None) -> int:
    """ceil(tokens / units_per_step), or ceil(flops / (flops_per_unit x units_per_step)); exactly one of
    tokens and flops."""
    if (tokens is None) == (flops is None):
        raise LengthError("give one of train.tokens and train.flops")
    if units_per_step <= 0:
        raise LengthError(f"units per step must be positive (got {units_per_step})")
    if flops is not None:
        if not flops_per_unit or flops_per_unit <= 0:
            raise LengthError("train.flops needs the model family's FLOPs per unit (none known)")
        tokens = flops / flops_per_unit
    # A relative tolerance keeps 1e6 tokens at exactly 1e6 / 2048 steps when float division lands just above.
    return max(1, math.ceil(tokens / units_per_step * (1 - 1e-12)))


def parameter_counts(cfg: Any) -> dict:
    """The family's parameter counts of cfg.model, from a model built on the meta device (nothing allocated)."""
    import torch

    from pretrain.models import get_family

    family = get_family(cfg.model.type)
    with torch.device("meta"):
        return family.count_parameters(family.build(cfg.model))


def flops_per_unit(cfg: Any, objective: Any, counts: dict | None = None) -> float:
    """Training FLOPs per unit of work (a token) for this config: the figure the loop logs `flops` with."""
    from pretrain.models import get_family

    counts = counts if counts is not None else parameter_counts(cfg)
    return float(get_family(cfg.model.type).flops_per_unit(cfg.model, counts, objective.workload()))


def derived_steps(cfg: Any, objective: Any = None, counts: dict | None = None) -> int:
    """Steps for train.tokens or train.flops. Without `objective` it is built from the config and its data's
    manifests (pretrain.objectives.preflight), so the driver and every worker derive the same number."""
    t = cfg.train
    if objective is None:
        from pretrain.objectives.preflight import preflight

        objective = preflight(cfg)
    per_step = t.global_batch_size * objective.units_per_sample()
    fpu = flops_per_unit(cfg, objective, counts) if t.flops is not None else None
    return steps_for(units_per_step=per_step, tokens=t.tokens, flops=t.flops, flops_per_unit=fpu)


def total_steps(cfg: Any, objective: Any = None, counts: dict | None = None) -> int:
    """The run's optimizer steps: train.steps, or those train.tokens / train.flops take. `objective` and
    `counts` (the built objective, the parameter counts) are found from the config when not given: that
    reads the data's manifests and builds the model on the meta device, so the driver calls it once."""
    if cfg.train.steps is not None:
        return cfg.train.steps
    return derived_steps(cfg, objective, counts)
