"""Stragglers: a rank that computes slower than its peers, found from each rank's own compute time.

Each rank times its own compute (`pretrain.train.pulse`: reading and preparing its batches, its forward
passes); every `cluster.straggler_every` steps the ranks all-gather their time per step in one small
collective (none per step), and rank 0 logs `straggle` (the slowest rank's time / the median rank's) with
`slowest_rank`. A rank at `cluster.straggler_ratio` or above for `cluster.straggler_windows` windows in a row
is named once: a `warning` row (the console, W&B) and summary.json's `stragglers` (rank, host, pid, step,
ratio). With two ranks the median is their mean, so the ratio is at most 2 and 1.3 means one rank takes
1.86x the other's time.

Why the backward is left out. A straggler makes its peers wait in every collective, and only time that
waits on no peer tells the slow rank from the fast ones: a fast rank's wait is the slow rank's lateness, so
counting it gives every rank the slow one's time and pulls the ratio to 1. The backward waits: under ZeRO 1-2
DeepSpeed reduces gradients in hooks inside it, bucket by bucket as they fill (on CPU a blocking gloo call,
on GPU with `overlap_comm` the compute stream waits for the reduce stream), and at ZeRO-0 the engine
all-reduces at the end of `engine.backward`. Splitting the waits out would take timing hooks inside
DeepSpeed's reduce path (or its comms logger, which synchronises the device per call). The forward and the
batch preparation wait on nothing at ZeRO 0-2 and a slow machine is slow at them alike (the forward is a
third of the step's FLOPs), so they are the sample. At ZeRO-3 the forward gathers parameters, so part of a
slow rank's lateness shows in its peers' forwards too: the ratio understates it there.
"""

from __future__ import annotations

import os
import socket
import statistics

import torch
import torch.distributed as dist

from pretrain.hooks import StepView
from pretrain.train.pulse import PULSE


class Stragglers:
    """The hook (every cluster.straggler_every steps, on every rank: it is a collective). Making one turns on
    this rank's compute timing."""

    def __init__(self, ratio: float, windows: int, world: int):
        self.ratio, self.windows, self.world = ratio, windows, world
        self.streak = [0] * world
        self.flagged: dict[int, dict] = {}
        self.ranks: list[tuple[str, int]] | None = None  # (host, pid) of each rank, gathered at the first window
        self._last = None  # the step of the previous window's end
        PULSE.timing = True
        PULSE.take_compute()  # whatever an earlier run in this process left

    def __call__(self, v: StepView) -> None:
        steps = v.step - (self._last if self._last is not None else v.step - v.cfg.cluster.straggler_every)
        self._last = v.step
        mine = torch.tensor([PULSE.take_compute() / max(steps, 1)], dtype=torch.float64, device=v.device)
        every = [torch.zeros_like(mine) for _ in range(self.world)]
        dist.all_gather(every, mine)
        times = [float(t) for t in every]
        if self.ranks is None:
            self.ranks = [("", 0)] * self.world
            dist.all_gather_object(self.ranks, (socket.gethostname(), os.getpid()))
        median = statistics.median(times)
        if median <= 0:
            return
        slowest = max(range(self.world), key=times.__getitem__)
        row: dict = {"step": v.step, "straggle": times[slowest] / median, "slowest_rank": slowest}
        for rank, t in enumerate(times):
            self.streak[rank] = self.streak[rank] + 1 if t / median >= self.ratio else 0
            if self.streak[rank] == self.windows and rank not in self.flagged:
                host, pid = self.ranks[rank]
                self.flagged[rank] = {"rank": rank, "host": host, "pid": pid, "step": v.step, "ratio": round(t / median, 3)}
                row.setdefault("stragglers", []).append(self.flagged[rank])
                warn = (f"straggler: rank {rank} (pid {pid} on {host}) computes {t / median:.2f}x the median rank's "
                        f"time per step for {self.windows} windows of {v.cfg.cluster.straggler_every} steps")
                row["warning"] = f"{row['warning']}; {warn}" if "warning" in row else warn
        v.log(row)

    def summary(self) -> dict:
        return {"stragglers": sorted(self.flagged.values(), key=lambda f: f["rank"])}


def stragglers(r) -> dict:
    """summary.json's list of named stragglers (rank, host, pid, step, ratio) of a Run: empty for a run of 2+
    ranks that had none, absent for one rank."""
    return r.straggle.summary() if getattr(r, "straggle", None) is not None else {}
