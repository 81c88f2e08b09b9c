"""The loop's own collectives: metrics (sum, count) pairs reduced over ranks in one all-reduce, and a step's
unit count agreed in the same collective as whether any rank's batch failed."""

from __future__ import annotations

import torch
import torch.distributed as dist

from pretrain.errors import RunError, first_line
from pretrain.objectives import Metrics


def reduce_metrics(local: Metrics, device: torch.device) -> dict[str, float]:
    """Sum every (sum, count) pair over ranks in one collective; return sum / count per name."""
    names = sorted(local)
    flat = torch.stack([torch.stack([local[k][0].float(), local[k][1].float()]) for k in names]).to(device)
    dist.all_reduce(flat)
    return dict(zip(names, (flat[:, 0] / flat[:, 1].clamp(min=1)).tolist(), strict=True))  # one sync, not one per name


def agree_on_errors(count: torch.Tensor, error: BaseException | None, world: int) -> torch.Tensor:
    """The step's unit count summed over ranks, in the same collective as whether any rank's batch failed
    deterministically (a bad sample in its shard). If one did, every rank raises RunError with that
    rank's line here, together: none is left waiting in a collective for a rank that has stopped, and
    the run ends without the restart a lost worker would cause (`pretrain.launch.local`)."""
    both = torch.stack([count.float(), torch.tensor(float(error is not None), device=count.device)])
    dist.all_reduce(both)
    if both[1].item():
        mine = first_line(error) if error is not None else None
        lines: list = [None] * world
        dist.all_gather_object(lines, mine)
        raise RunError(next(line for line in lines if line))
    return both[0]
