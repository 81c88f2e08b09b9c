"""The loop's side of hooks: the runner and the run's own hooks (logging, validation, EMA,
checkpoints, the end-of-run artefact), each called with a `pretrain.hooks.StepView` (the run's is
`pretrain.train.parts.RunView`). Objectives add theirs the same way (`Objective.hooks`).

Hooks run in the order they were added, on every rank (a hook that writes files checks the rank itself;
one that evaluates is a collective), except the checkpoint: it runs after every other hook of its step
(`add(..., checkpoint=True)`). A step's rows (validation, an objective's evaluations, the final step's) are
written before its checkpoint makes it resumable: a crash during a long evaluation resumes before the step and
evaluates it again, never after it with its score lost.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from pretrain.atomic import atomic_write
from pretrain.errors import first_line
from pretrain.hooks import Hook, StepView
from pretrain.train.collectives import reduce_metrics
from pretrain.train.pulse import PULSE

if TYPE_CHECKING:
    from pretrain.train.ema import EMA


class Hooks:
    def __init__(self) -> None:
        self._hooks: list[Hook] = []
        self._checkpoints: list[Hook] = []  # run after every other hook of the step (module docstring)

    def add(self, fn: Callable[[StepView], None], every: int, *, at_end: bool = True, at_start: bool = False,
            checkpoint: bool = False) -> None:
        (self._checkpoints if checkpoint else self._hooks).append(Hook(fn, every, at_end, at_start))

    def extend(self, hooks: list[Hook]) -> None:
        self._hooks.extend(hooks)

    def due(self, step: int, last: bool) -> list[Hook]:
        """The hooks of `step` in the order they run: as added, the checkpoints last."""
        return [h for h in (*self._hooks, *self._checkpoints) if (h.every and step % h.every == 0) or (last and h.at_end)]

    def start(self, view: StepView) -> None:
        for h in (*self._hooks, *self._checkpoints):
            if h.at_start:
                h.fn(view)

    def after_step(self, view: StepView, step: int, last: bool) -> None:
        for h in self.due(step, last):
            h.fn(view)


# ----------------------------------------------------------------------------- the run's own hooks


def log_step(v: StepView) -> None:
    v.log(v.row)


def validate(val: list[tuple[dict, bool]], flops_per_unit: float, v: StepView) -> None:
    """The loss over this rank's share of the validation set (`val`: prepared (batch, counted) pairs)."""
    if not val:
        return
    PULSE.at("evaluation")
    with v.eval_model() as model:
        local = v.objective.evaluate(model, val)
    values = reduce_metrics(local, v.device)
    v.log({"step": v.step, **{f"val_{k}": x for k, x in values.items()}, v.unit: v.units,
           "flops": flops_per_unit * v.units})


def update_ema(ema: EMA, v: StepView) -> None:
    if "skipped" not in v.row:  # a skipped step (pretrain/train/spike.py) moved no weight: nor does the average
        ema.update()


def save_checkpoint(v: StepView) -> None:
    PULSE.at("checkpoint")
    v.save_checkpoint()


def write_artefact(v: StepView) -> None:
    with v.eval_model() as model:
        try:
            text = v.objective.artefact(model, v)
        except Exception as e:  # noqa: BLE001 - the run is trained and checkpointed: a failed sample must not fail it
            text = None
            if v.rank == 0:
                line = f"{type(e).__name__}: {first_line(str(e))}"
                print(f"warning: end-of-run artefact failed, the run is kept ({line})", file=sys.stderr, flush=True)
                v.summary({"artefact_error": line})
    if text is not None and v.rank == 0:
        atomic_write(v.rdir / "sample.txt", text)
