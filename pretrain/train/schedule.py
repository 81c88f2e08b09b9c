"""Learning-rate schedules, as multipliers of the peak rate for torch's LambdaLR (`schedule.type`):

- `cosine`: linear warm-up, then cosine decay to a floor (Loshchilov & Hutter 2016,
  https://arxiv.org/abs/1608.03983) over `schedule.decay_steps` (default the run's steps).
- `wsd`: warmup-stable-decay. Linear warm-up, the peak rate until the last `decay_fraction` of the run,
  then a cooldown to the floor (Hu et al. 2024, MiniCPM, https://arxiv.org/abs/2404.06395; Hägele et al.
  2024, https://arxiv.org/abs/2405.18392). The cooldown is 1-sqrt, lr = 1 - sqrt(progress): Hägele et al.
  report it lower in final loss than a linear cooldown, and a cooldown of ~20% of the run on par with cosine.
  Because the rate before the cooldown does not depend on the run's length, a run of T steps and one of
  T' > T steps are the same run up to the first one's cooldown: a stable-phase checkpoint at step k serves
  every total with k <= total - round(total x decay_fraction) (`checkpoint.branch_from`), so one trunk yields loss
  points at several budgets for the price of their cooldowns.
"""

from __future__ import annotations

import functools
import math


def warmup_cosine(done: int, *, warmup: int, total: int, floor: float) -> float:
    """Multiplier for the optimizer step that follows `done` completed steps."""
    if done < warmup:
        return (done + 1) / warmup
    progress = min(1.0, (done - warmup) / max(1, total - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def wsd_decay_steps(total: int, decay_fraction: float) -> int:
    """Cooldown steps of a `total`-step wsd run: round(f x total), at least 1 when f > 0."""
    return max(1, round(decay_fraction * total)) if decay_fraction > 0 else 0


def warmup_stable_decay(done: int, *, warmup: int, total: int, decay: int, floor: float) -> float:
    """Multiplier for the optimizer step that follows `done` completed steps: (done + 1) / warmup during
    warm-up; 1 while done < total - decay; over the last `decay` steps floor + (1 - floor)(1 - sqrt(p)) with
    p = (done - (total - decay) + 1) / decay, so the run's last step is at the floor. A checkpoint after k
    steps has seen only warm-up and peak-rate steps when k <= total - decay."""
    if done < warmup:
        return (done + 1) / warmup
    start = max(warmup, total - decay)  # the cooldown never eats into warm-up
    if done < start or decay <= 0:
        return 1.0
    progress = min(1.0, (done - start + 1) / max(1, total - start))
    return floor + (1.0 - floor) * (1.0 - math.sqrt(progress))


def lr_lambda(s, total: int):
    """The multiplier function of the `schedule` section (s: the ScheduleConfig) for a run of `total` steps."""
    if s.type == "cosine":
        return functools.partial(warmup_cosine, warmup=s.warmup_steps, total=s.decay_steps or total, floor=s.min_lr_ratio)
    if s.type == "wsd":
        return functools.partial(warmup_stable_decay, warmup=s.warmup_steps, total=total,
                                 decay=wsd_decay_steps(total, s.decay_fraction), floor=s.min_lr_ratio)
    raise ValueError(f"schedule.type: unknown schedule {s.type!r} (cosine or wsd)")


def describe(s, lr: float, total: int) -> dict:
    """What summary.json records of the schedule (s: the ScheduleConfig, lr: the peak rate): fits compare runs
    of one schedule."""
    out = {"type": s.type, "steps": total, "warmup_steps": s.warmup_steps, "lr": lr, "min_lr_ratio": s.min_lr_ratio}
    if s.type == "wsd":
        return {**out, "decay_fraction": s.decay_fraction, "decay_steps": wsd_decay_steps(total, s.decay_fraction)}
    return {**out, "decay_steps": s.decay_steps or total}
