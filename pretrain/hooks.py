"""The hook interface: what runs beside the training step (levanter's `add_hook(fn, every=N)`), and the
read-mostly view of the step a hook is called with.

A leaf, so that objectives (below the training layer) can bring their own hooks: `Hook` says when a
function runs, `StepView` what it may read (the step, the config, where the run stands) and do (log,
evaluate the model, save a checkpoint). The loop's side (the runner and the view's implementation) is
`pretrain.train.hooks`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

if TYPE_CHECKING:
    from pretrain.config import Config


class StepView(Protocol):
    """What a hook sees after a step (or at step 0): read-only figures, and named actions."""

    @property
    def step(self) -> int: ...  # the optimizer step just done (the resumed one at the start)
    @property
    def units(self) -> int: ...  # units (tokens, images) trained on so far
    @property
    def row(self) -> Mapping[str, Any]: ...  # the step's metrics row (empty at the start)
    @property
    def cfg(self) -> Config: ...
    @property
    def objective(self) -> Any: ...  # the run's pretrain.objectives.Objective
    @property
    def unit(self) -> str: ...  # what `units` counts (the objective's unit)
    @property
    def rank(self) -> int: ...
    @property
    def world(self) -> int: ...
    @property
    def device(self) -> torch.device: ...
    @property
    def rdir(self) -> Path: ...  # the run directory (files a hook writes go under it, on rank 0)
    @property
    def sample_batch(self) -> dict | None: ...  # a raw batch, for something to look at (the artefact)

    def log(self, row: dict) -> None:
        """A metrics row to the run's sinks (metrics.jsonl, W&B); a no-op off rank 0."""

    def summary(self, values: dict) -> None:
        """Values for the run's summary (W&B); a no-op off rank 0."""

    def image(self, step: int, name: str, path: Path) -> None:
        """A PNG already written under the run directory, to the sinks that show images."""

    def eval_model(self, *, ema: bool = False) -> AbstractContextManager:
        """Inside: the model (a DeepSpeed engine) in eval mode, with the EMA weights swapped in when `ema`
        and the run keeps an EMA; back in train mode on exit. Forwards may be collectives (ZeRO-3)."""

    def save_checkpoint(self) -> None:
        """Save the run's checkpoint at this step. Collective: every rank calls it."""


@dataclass(frozen=True)
class Hook:
    fn: Callable[[StepView], None]  # called with the view of the step
    every: int  # on steps that are multiples of this (0: never on a schedule)
    at_end: bool = True  # also after the last step
    at_start: bool = False  # also at step 0 of a run that starts fresh
