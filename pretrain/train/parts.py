"""A run's parts on this rank (`Run`, what `pretrain.train.run.build_run` returns) and the view of one step
that hooks are called with (`RunView`, a `pretrain.hooks.StepView`)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pretrain.config import Config
from pretrain.metrics.sinks import Sink
from pretrain.objectives import Objective
from pretrain.redact import redacted_tree
from pretrain.train.ema import EMA
from pretrain.train.hooks import Hooks


@dataclass
class Run:
    """The parts of a run on this rank and where it starts; `sample_batch` is the only part the loop sets."""

    cfg: Config
    objective: Objective
    engine: Any  # the DeepSpeed engine
    stream: Any  # the training data stream (build_train_stream)
    sink: Sink
    saver: Any  # this rank's side of saving checkpoints (ckpt.Checkpointer)
    ema: EMA | None  # the fp32 moving average of the weights, when ema.decay is set
    device: torch.device
    rank: int
    world: int
    rdir: Path
    counts: dict  # parameter counts
    unit: str
    steps: int  # the run's length in optimizer steps
    start: int  # the step resumed from (0: a fresh run)
    start_units: int  # units trained on before `start`
    accum: int  # micro-batches per step on this rank
    step_units: int  # units in one step's global batch
    flops_per_unit: float
    peak: float  # peak FLOP/s of one worker (for MFU)
    clip: float | None  # the loop clips to this norm (else DeepSpeed clips, or none)
    val: list  # prepared (batch, counted) pairs of this rank
    sample_batch: dict | None  # a raw batch for the artefact
    hooks: Hooks
    straggle: Any = None  # the straggler hook (pretrain/train/straggle.py), for summary.json
    spikes: Any = None  # skipped steps and rollbacks (pretrain/train/spike.py's Spikes, the engine's gate)
    quiet_through: int = -1  # after a rollback: rows of steps up to this one were logged the first time
    family: Any = None  # the model family (pretrain.models.Family): what it adds to the step's metrics

    def view(self, step: int, units: int, row: dict | None = None) -> RunView:
        """What hooks see at `step` (pretrain.hooks.StepView)."""
        return RunView(self, step, units, row or {}, self.cfg, self.objective, self.unit, self.rank, self.world,
                       self.device, self.rdir, self.sample_batch)


@dataclass(frozen=True)
class RunView:
    """A `StepView` of a run at one step; the loop makes one per step (`Run.view`). The fields are read-only
    copies of the run's; what a hook may do goes through the methods."""

    _run: Run = field(repr=False)
    step: int
    units: int
    row: dict
    cfg: Config
    objective: Any
    unit: str
    rank: int
    world: int
    device: torch.device
    rdir: Path
    sample_batch: dict | None

    def log(self, row: dict) -> None:
        if row["step"] > self._run.quiet_through:
            self._run.sink.log(row)

    def summary(self, values: dict) -> None:
        self._run.sink.summary(values)

    def image(self, step: int, name: str, path: Path) -> None:
        if step > self._run.quiet_through:
            self._run.sink.image(step, name, path)

    @contextlib.contextmanager
    def eval_model(self, *, ema: bool = False):
        engine, average = self._run.engine, self._run.ema
        engine.eval()
        with average.swapped() if ema and average is not None else contextlib.nullcontext():
            yield engine
        engine.train()

    def save_checkpoint(self) -> None:
        r = self._run
        r.sink.sync()  # metrics.jsonl on disk before the save's markers can make this step resumable
        client = {"step": self.step, "units": self.units, "data": r.stream.state_dict(),
                  "config": redacted_tree(r.cfg.model_dump(mode="json")), **({"spike": r.spikes.state_dict()} if r.spikes else {})}
        extra = (lambda d: r.ema.save(d, r.rank, r.world)) if r.ema is not None else None
        r.saver.save(r.engine, self.step, client, extra=extra)  # the upload to the location runs behind
