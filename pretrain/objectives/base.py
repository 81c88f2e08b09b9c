"""What an objective is (data kind, loss, evaluation, artefact), its metrics arithmetic, and the registry
by `objective.type`. The objectives register themselves (pretrain/objectives/__init__.py imports them)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch

from pretrain.config import register_section
from pretrain.errors import ObjectiveError
from pretrain.registry import Registry

if TYPE_CHECKING:
    from pretrain.config import Config, Section

Metrics = dict[str, tuple[torch.Tensor, torch.Tensor]]  # name -> (sum, count), this rank's share


def add_metrics(acc: Metrics, new: Metrics, weight: float = 1.0) -> Metrics:
    """`acc` plus `new`, name by name (detached, fp32); `weight` 0 adds nothing but keeps the names."""
    for k, (s, c) in new.items():
        s, c = s.detach().float() * weight, c.float() * weight
        prev = acc.get(k)
        acc[k] = (s, c) if prev is None else (prev[0] + s, prev[1] + c)
    return acc



class Objective:
    name: ClassVar[str]
    Config: ClassVar[type[Section]]
    data_kind: ClassVar[str]  # the manifest `kind` it reads
    unit: ClassVar[str]  # what throughput and FLOPs count
    summary_keys: ClassVar[tuple[str, ...]] = ()  # metrics whose first and last values go into summary.json

    def __init__(self, cfg: Config, data: dict):
        """`data`: what `pretrain.data.validate_data` found (kind, seq_len, vocab_size, ...)."""
        self.cfg, self.data = cfg, data

    # ------------------------------------------------------------------ before anything starts
    def check(self) -> None:
        """Raise ObjectiveError (one line naming the key) if data and model do not fit this objective."""
        kind = self.data.get("kind")
        if kind != self.data_kind:
            raise ObjectiveError(f"objective.type={self.name} reads {self.data_kind} shards, but data.train holds "
                                 f"{kind} shards")

    def setup(self) -> None:
        """Work done once, on the driver, before any worker starts (train a judge for sample quality and
        cache it); nothing by default. Workers may rely on what it cached."""

    def units_per_sample(self) -> int:
        """Units of work (throughput, FLOPs) in one sample of the data."""
        raise NotImplementedError

    def workload(self) -> dict:
        """What the family's FLOPs count needs to know of the work (sequence length, ...)."""
        return {}

    # ------------------------------------------------------------------ per micro-batch
    def prepare(self, batch: dict, device: torch.device) -> dict:
        """Raw batch (from the data stream) -> model inputs on `device`."""
        raise NotImplementedError

    def count(self, batch: dict) -> torch.Tensor:
        """Loss units in a prepared batch (known before the forward: the loop divides by the global count)."""
        raise NotImplementedError

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, Metrics]:
        """(summed loss, unit count, metrics) of a prepared batch. `model` may be a DeepSpeed engine."""
        raise NotImplementedError

    @torch.no_grad()
    def evaluate(self, model, batches: list[tuple[dict, bool]]) -> Metrics:
        """This rank's (sum, count) of the loss and metrics over prepared batches; a batch marked False is
        run (every forward may be a collective under ZeRO-3) but not counted. The loop reduces over ranks."""
        out: Metrics = {}
        for batch, counted in batches:
            total, n, metrics = self.loss(model, batch)
            add_metrics(out, {"loss": (total, n), **metrics}, 1.0 if counted else 0.0)
        return out

    # ------------------------------------------------------------------ hooks and end of run
    def hooks(self, ctx: Any) -> list:
        """Extra loop hooks of this objective (EMA, sample grids); none by default."""
        return []

    def artefact(self, model, ctx: Any) -> str | None:
        """Something to look at after the run (collective: every rank calls it). Text, or None."""
        return None


_OBJECTIVES: Registry[type[Objective]] = Registry("objective.type")


def register(cls: type[Objective]) -> type[Objective]:
    register_section("objective", cls.name, lambda: cls.Config)  # read when a config names it
    return _OBJECTIVES.add(cls.name, cls)


def registered() -> list[str]:
    return _OBJECTIVES.names()


def get_objective(name: str) -> type[Objective]:
    return _OBJECTIVES.get(name)


def build_objective(cfg: Config, data: dict) -> Objective:
    return get_objective(cfg.objective.type)(cfg, data)
