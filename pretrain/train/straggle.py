"""Stragglers: each rank's own compute time per step (`pretrain.train.pulse`: reading and preparing batches,
forward passes; no wait on a peer), gathered every `cluster.straggler_every` steps in one small all-gather
(no collective per step), logged as `straggle` (the slowest rank's time / the median rank's) with the
slowest rank, and a rank above `cluster.straggler_ratio` for `cluster.straggler_windows` windows in a row
is named once, on the console and in W&B (a `warning` row), and listed in summary.json."""

from __future__ import annotations

import socket
import statistics

import torch
import torch.distributed as dist

from pretrain.hooks import StepView
from pretrain.train.pulse import PULSE


class Stragglers:
    """The hook (every cluster.straggler_every steps, on every rank: it is a collective)."""

    def __init__(self, ratio: float, windows: int, world: int):
        self.ratio, self.windows, self.world = ratio, windows, world
        self.streak = [0] * world
        self.flagged: dict[int, dict] = {}
        self.hosts: list[str] | None = None
        self._last = None  # the step of the previous window's end

    def __call__(self, v: StepView) -> None:
        steps = v.step - (self._last if self._last is not None else v.step - v.cfg.cluster.straggler_every)
        self._last = v.step
        mine = torch.tensor([PULSE.take_compute() / max(steps, 1)], dtype=torch.float64, device=v.device)
        every = [torch.zeros_like(mine) for _ in range(self.world)]
        dist.all_gather(every, mine)
        times = [float(t) for t in every]
        if self.hosts is None:
            self.hosts = [""] * self.world
            dist.all_gather_object(self.hosts, socket.gethostname())
        median = statistics.median(times)
        if median <= 0:
            return
        slowest = max(range(self.world), key=times.__getitem__)
        row: dict = {"step": v.step, "straggle": times[slowest] / median, "slowest_rank": slowest}
        for rank, t in enumerate(times):
            self.streak[rank] = self.streak[rank] + 1 if t / median >= self.ratio else 0
            if self.streak[rank] == self.windows and rank not in self.flagged:
                self.flagged[rank] = {"rank": rank, "host": self.hosts[rank], "step": v.step,
                                      "ratio": round(t / median, 3)}
                row["warning"] = (f"straggler: rank {rank} on {self.hosts[rank]} computes {t / median:.2f}x the median "
                                  f"rank's time per step for {self.windows} windows of "
                                  f"{v.cfg.cluster.straggler_every} steps")
        v.log(row)

    def summary(self) -> dict:
        return {"stragglers": sorted(self.flagged.values(), key=lambda f: f["rank"])}


def stragglers(r) -> dict:
    """summary.json's list of named stragglers (rank, host, step, ratio) of a Run."""
    return r.straggle.summary() if getattr(r, "straggle", None) is not None else {}
