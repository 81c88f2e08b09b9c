"""WSD-S ladder points: where one size's stable trunk saves its checkpoints and where each cooldown starts
and ends (`ladder.mode: wsds`; pretrain.scaling.ladder turns them into runs).

Under `schedule.type=wsd` the rate before the cooldown does not depend on the run's length
(pretrain/train/schedule.py), so a run of T steps is, up to its cooldown start k = T - round(f T), the same
run as any longer one: same rates, same data order. One trunk per size (the size's longest point, with its
own cooldown, since that point needs one) saves a checkpoint at each shorter point's k, and each shorter
point is a branch (`checkpoint.branch_from` TRUNK@k) that trains only its T - k cooldown steps. This is
WSD-S as OLMo-core's ladders run it; Hägele et al. 2024 (https://arxiv.org/abs/2405.18392) find such
cooldowns match full-length runs.

Where the trunk saves. The trainer checkpoints every `checkpoint.every` steps and has no list of steps
(pretrain/train is not this layer's to change), so the plan picks one interval E per size and moves each
branch start k to a multiple of E: E is the largest interval for which every k moves by at most
`TOLERANCE` of itself, and each T is then re-solved so that its cooldown starts exactly at the moved k.
Points set by doubling tokens (5, 10, 20, 40, 80 per parameter) give E = the first point's k, one
checkpoint per first-point stretch; the fit reads each run's actual tokens, so the move biases nothing.

The cost against the same points each trained from scratch (the "full grid") is
(T_n + sum_{j<n} (T_j - k_j)) / sum_j T_j, at least T_n / sum_j T_j: for 5, 10, 20, 40, 80 tokens per
parameter and f = 0.2 it is 95 / 155 = 61%; denser points cost less per point (ten points 8, 16, ..., 80:
152 / 440 = 35%).
"""

from __future__ import annotations

from dataclasses import dataclass

from pretrain.errors import ScalingError
from pretrain.train.schedule import wsd_decay_steps

TOLERANCE = 0.05  # how far (relative) a branch start may move to land on the trunk's checkpoint interval


class WsdsError(ScalingError):
    """A WSD-S plan that cannot be made (one line)."""


@dataclass(frozen=True)
class Point:
    """One (N, D) point of a size: `steps` in all, the last `steps - start` of them a cooldown."""

    label: str  # what it was asked as: "tpp5" or a budget's label; part of the run's name
    target: int  # the steps asked for (before moving the start onto the trunk's interval)
    steps: int
    start: int  # the cooldown's first step: the branch step (the trunk's checkpoint) for a branch
    trunk: bool  # trained from scratch (the size's longest point), not branched


def cooldown_start(total: int, fraction: float) -> int:
    """Steps before a `total`-step wsd run's cooldown: total - round(f x total)."""
    return total - wsd_decay_steps(total, fraction)


def total_for_start(start: int, fraction: float, near: int) -> int:
    """The run length T, nearest `near`, whose cooldown starts at `start`. T - round(f T) grows by 0 or 1 per
    step of T (f <= 1), so some T has every start; the search runs out from start / (1 - f)."""
    guess = max(start, round(start / (1 - fraction))) if fraction < 1 else start
    hits = [t for t in range(max(1, guess - 3), guess + 4) if cooldown_start(t, fraction) == start]
    if not hits:  # far from the guess only when rounding is odd; widen once
        hits = [t for t in range(start, 2 * guess + 8) if cooldown_start(t, fraction) == start]
    return min(hits, key=lambda t: (abs(t - near), t))


def checkpoint_every(starts: list[int], tolerance: float = TOLERANCE) -> int:
    """The largest interval E (at most the smallest start) that moves each start by at most `tolerance` of
    itself onto a multiple of E (>= E). 1 always qualifies."""
    for e in range(min(starts), 0, -1):
        if all(abs(max(1, round(k / e)) * e - k) <= tolerance * k for k in starts):
            return e
    return 1


def plan_size(targets: list[tuple[str, int]], *, fraction: float, warmup: int, size: str) -> tuple[int, list[Point]]:
    """(E, points) for one size from (label, steps asked) pairs: the longest is the trunk, the rest branch from
    its checkpoints every E steps. Points that land on the same length are kept once (the first label)."""
    if not 0 < fraction < 1:
        raise WsdsError(f"a WSD-S ladder needs 0 < schedule.decay_fraction < 1 (got {fraction}): each point is a cooldown")
    targets = sorted(targets, key=lambda t: t[1])
    (trunk_label, trunk_steps), shorter = targets[-1], targets[:-1]
    for label, steps in targets:
        start = cooldown_start(steps, fraction)
        if start < max(1, warmup):
            raise WsdsError(f"size {size}, point {label}: its cooldown would start at step {start} of {steps}, inside "
                            f"schedule.warmup_steps={warmup}: raise the point's tokens or lower the warm-up")
    starts = [cooldown_start(s, fraction) for _, s in shorter]
    every = checkpoint_every(starts) if starts else max(1, cooldown_start(trunk_steps, fraction))
    points, seen = [], set()
    for label, steps in shorter:
        start = max(1, round(cooldown_start(steps, fraction) / every)) * every
        total = total_for_start(start, fraction, steps)
        if start < warmup:  # moving onto the interval may cross into the warm-up: the same refusal
            raise WsdsError(f"size {size}, point {label}: its branch step {start} falls inside "
                            f"schedule.warmup_steps={warmup}: raise the point's tokens or lower the warm-up")
        if total not in seen and total < trunk_steps:
            seen.add(total)
            points.append(Point(label, steps, total, start, False))
    points.append(Point(trunk_label, trunk_steps, trunk_steps, cooldown_start(trunk_steps, fraction), True))
    return every, points
