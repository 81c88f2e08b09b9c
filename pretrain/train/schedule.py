"""Learning-rate schedule: linear warm-up, then cosine decay to a floor (Loshchilov & Hutter 2016,
https://arxiv.org/abs/1608.03983), as a multiplier of the peak rate for torch's LambdaLR."""

from __future__ import annotations

import math


def warmup_cosine(done: int, *, warmup: int, total: int, floor: float) -> float:
    """Multiplier for the optimizer step that follows `done` completed steps."""
    if done < warmup:
        return (done + 1) / warmup
    progress = min(1.0, (done - warmup) / max(1, total - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
