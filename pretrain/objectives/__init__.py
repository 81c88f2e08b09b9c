"""What a model is trained to do: objectives by name (`objective.type`), and the interface the loop uses.

An objective declares the data kind it reads (`tokens`, later `images`, `chat`) and the unit its
throughput counts (`tokens`, `images`); checks the data against the model before anything starts;
turns a raw batch into model inputs (`prepare`, a pure function of the batch and its sample positions,
so anything random per sample is reproduced by a resume at any world size); and turns (model, batch)
into (loss sum, unit count, metrics), with every metric a (sum, count) pair. The loop adds sums and
counts over micro-batches and ranks and divides once, so batches whose units differ are weighted
correctly. It also evaluates and makes the end-of-run artefact (a text sample for language models).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch

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


class ObjectiveError(ValueError):
    """The data or the model does not fit the objective; the message is one line naming the key."""


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
    return _OBJECTIVES.add(cls.name, cls)


def registered() -> list[str]:
    return _OBJECTIVES.names()


def get_objective(name: str) -> type[Objective]:
    return _OBJECTIVES.get(name)


def build_objective(cfg: Config, data: dict) -> Objective:
    return get_objective(cfg.objective.type)(cfg, data)


from pretrain.objectives import causal_lm as _causal_lm  # noqa: E402,F401  (registers causal_lm)
from pretrain.objectives import ddpm as _ddpm  # noqa: E402,F401  (registers ddpm)
from pretrain.objectives import masked_lm as _masked_lm  # noqa: E402,F401  (registers masked_lm)
from pretrain.objectives import rectified_flow as _rectified_flow  # noqa: E402,F401  (registers rectified_flow)
from pretrain.objectives import sft as _sft  # noqa: E402,F401  (registers sft)
