"""Loss spikes and non-finite values: which steps are skipped, and when a run rolls back (the `spike` section).

A step is skipped when its loss or gradient norm is not finite or, once `spike.warmup` steps have been accepted,
more than `spike.sigma` standard deviations above the mean of the last `spike.window` accepted steps. The loss
is the step's loss over all ranks (its metrics all-reduce runs before the update) and the norm the global one,
so every rank decides alike. `Spikes` is the engine's gate (pretrain/train/engine.py): the optimizer that
updates the weights and the learning-rate schedule ask it, once the norm is known, whether to step, at every
ZeRO stage; DeepSpeed's ZeRO 1-3 and bf16 optimizers skip a non-finite norm on their own, before asking.
A skipped step keeps weights, optimizer state, schedule and EMA; its values stay out of the window; it is
logged once (`skipped`, with where its data came from) and listed in `<run>/skips.json`.

After `spike.max_consecutive` skips in a row the run rolls back, in this process, to the newest complete
checkpoint at or before the first of them (through the resume path), trains again up to that step, and
passes the streak's steps without training on them (their data is consumed). Steps logged before the rollback
are not logged again. After `spike.max_rollbacks` rollbacks, or without a checkpoint to go back to, the run
stops with one line naming the step and its data. skips.json keeps the skipped steps and the rollbacks across
restarts, so a resumed run passes the same windows and counts the same rollbacks.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections import deque
from typing import TYPE_CHECKING

import torch.distributed as dist

from pretrain import compat
from pretrain.atomic import atomic_write
from pretrain.config import expert_parallel
from pretrain.errors import RunError
from pretrain.sections import SpikeConfig
from pretrain.train.resume import decide, prepare_universal, restore

if TYPE_CHECKING:
    from pathlib import Path

    from pretrain.train.goodput import Timeline
    from pretrain.train.parts import Run

SKIPS = "skips.json"  # <run>/skips.json: the skipped steps and the rollbacks (rank 0, atomic)


class Spikes:
    """The running window, the decision of the step under way (the engine's gate), and the run's record."""

    def __init__(self, cfg: SpikeConfig):
        self.cfg = cfg
        self.engine = None  # set once built: where ZeRO's gradient norm is read while its optimizer steps
        self.losses: deque[float] = deque(maxlen=cfg.window)
        self.norms: deque[float] = deque(maxlen=cfg.window)
        self.accepted = 0  # steps accepted so far (the warm-up counts them)
        self.streak: list[int] = []  # the steps skipped in a row up to now
        self.skipped: list[dict] = []  # the record: {"step", "reason"} of each skipped step
        self.rollbacks: list[dict] = []  # {"step", "to", "skip_steps": [first, last]}
        self._open, self._loss, self._norm, self._decided, self.reason = False, 0.0, None, False, None

    # ------------------------------------------------------------------ the gate of one step

    def open(self, loss: float) -> None:
        """The step's loss over all ranks, before its update; the decision waits for the gradient norm."""
        self._open, self._loss, self._norm, self._decided, self.reason = True, loss, None, False, None

    def measured(self, norm: float) -> None:
        self._norm = norm  # ZeRO-0: the loop's own global norm

    def allows(self) -> bool:
        """Whether the step may update (asked by the optimizer and the schedule); outside a step, always."""
        if not self._open:
            return True
        if not self._decided:
            norm = self._norm if self._norm is not None else compat.deepspeed_pending_grad_norm(self.engine)
            self._decide(norm)
        return self.reason is None

    def _decide(self, norm: float | None) -> None:
        self.reason, self._decided = self.test(self._loss, norm), True
        if self.reason is None:  # kept for the window, once the step is accepted
            self._norm = norm

    def close(self, step: int, norm: float | None) -> str | None:
        """The step's verdict once the engine has stepped (`norm`: the engine's, inf where DeepSpeed skipped
        the step itself); an accepted step's values enter the window. Returns the reason of a skip, or None."""
        if not self._decided:  # DeepSpeed skipped a non-finite norm without asking, or no optimizer step asked
            self._decide(norm)
        self._open = False
        if self.reason is None:
            self.losses.append(self._loss)
            if self._norm is not None:
                self.norms.append(self._norm)
            self.accepted += 1
            self.streak = []
            return None
        self.streak.append(step)
        self.skipped = [s for s in self.skipped if s["step"] != step] + [{"step": step, "reason": self.reason}]
        return self.reason

    def test(self, loss: float, norm: float | None) -> str | None:
        """Why a step with this loss and gradient norm is skipped, or None."""
        if not math.isfinite(loss):
            return f"loss {loss}"
        if norm is not None and not math.isfinite(norm):
            return f"grad_norm {norm}"
        if self.cfg.sigma is None or self.accepted < self.cfg.warmup:
            return None
        for name, x, seen in (("loss", loss, self.losses), ("grad_norm", norm, self.norms)):
            if x is None or len(seen) < 2:
                continue
            mean, std = statistics.fmean(seen), statistics.pstdev(seen)
            if x > mean and x > mean + self.cfg.sigma * std:
                return f"{name} {x:.4g} is {(x - mean) / max(std, 1e-30):.1f} sigma above the window's mean {mean:.4g}"
        return None

    # ------------------------------------------------------------------ rows, streaks and windows

    def row(self, step: int, reason: str, stream) -> dict:
        """The metrics row of a skipped step: why, where its data came from, the skips so far."""
        return {"step": step, "skipped": reason, "positions": stream.samples_of(step - 1), "skips": len(self.skipped),
                "warning": f"step {step} skipped: {reason}"}

    def due(self) -> bool:
        """Whether the streak of skips calls for a rollback."""
        return bool(self.cfg.max_consecutive) and len(self.streak) >= self.cfg.max_consecutive

    def window_at(self, step: int) -> int | None:
        """The last step of a rolled-back streak that `step` lies in (its data is passed, not trained on)."""
        return next((r["skip_steps"][1] for r in self.rollbacks if r["skip_steps"][0] <= step <= r["skip_steps"][1]),
                    None)

    def summary(self) -> dict:
        return {"skipped_steps": len(self.skipped), "rollbacks": len(self.rollbacks)}

    # ------------------------------------------------------------------ state: checkpoints and skips.json

    def state_dict(self) -> dict:
        """The window at a checkpoint (in its state.json): a resume or a rollback decides as the run did."""
        return {"losses": list(self.losses), "norms": list(self.norms), "accepted": self.accepted,
                "streak": list(self.streak)}

    def load_state_dict(self, state: dict | None) -> None:
        state = state or {}  # a checkpoint of an earlier version: an empty window
        self.losses = deque(state.get("losses", []), maxlen=self.cfg.window)
        self.norms = deque(state.get("norms", []), maxlen=self.cfg.window)
        self.accepted, self.streak = state.get("accepted", 0), list(state.get("streak", []))

    def record(self) -> dict:
        return {"skipped": self.skipped, "rollbacks": self.rollbacks}

    def save_record(self, rdir: Path, rank: int) -> None:
        if rank == 0:
            atomic_write(rdir / SKIPS, json.dumps(self.record(), indent=1) + "\n")

    def load_record(self, rdir: Path, start: int, rank: int) -> None:
        """Collective: rank 0's skips.json for a run resumed at step `start` (a fresh run starts an empty one).
        Its rollbacks stay (their windows are passed again); skipped steps after `start` are decided again,
        except those of a rolled-back window."""
        box = [None]
        if rank == 0 and start > 0 and (rdir / SKIPS).is_file():
            box[0] = json.loads((rdir / SKIPS).read_text())
        dist.broadcast_object_list(box, src=0)
        record = box[0] or {"skipped": [], "rollbacks": []}
        self.rollbacks = record["rollbacks"]
        self.skipped = [s for s in record["skipped"] if s["step"] <= start or self.window_at(s["step"]) is not None]
        self.save_record(rdir, rank)


def positions_line(positions: list[dict]) -> str:
    return "; ".join(f"{p['source']} {p['shard']} samples {','.join(map(str, p['samples']))}" for p in positions)


def roll_back(r: Run, timeline: Timeline, step: int) -> tuple[int, int]:
    """Collective: back to the newest complete checkpoint at or before the streak's first step, which the run
    then passes up to `step` untrained. Returns the checkpoint's step and units. RunError past
    `spike.max_rollbacks` rollbacks, or without a checkpoint."""
    sp, t0 = r.spikes, time.perf_counter()
    first = sp.streak[0]
    streak = f"{len(sp.streak)} skipped steps in a row ({first}-{step})"
    data = f"data of step {step}: {positions_line(r.stream.samples_of(step - 1))}"
    if len(sp.rollbacks) >= sp.cfg.max_rollbacks:
        raise RunError(f"step {step}: {streak} after {len(sp.rollbacks)} rollbacks (spike.max_rollbacks); {data}")
    r.saver.wait()  # a save in flight completes before the choice
    plan = decide(r.saver.store, r.cfg.checkpoint.branch_from, r.rank, r.world, at_most=first,
                  ep=expert_parallel(r.cfg))
    if plan.step is None:
        raise RunError(f"step {step}: {streak} and no complete checkpoint at or before step {first} to roll back "
                       f"to (spike.max_consecutive); {data}")
    if plan.universal_url:
        prepare_universal(plan, r.saver.staging, r.rank)
    compat.deepspeed_load_universal(r.engine, plan.universal_url is not None)
    state = restore(plan, r.engine, r.ema, r.stream, r.saver.staging, r.rank, r.world)
    sp.load_state_dict(state.get("spike"))
    event = {"to": plan.step, "skip_steps": [first, step]}
    sp.rollbacks.append({"step": step, **event})
    # Skips between the checkpoint and the streak are decided again (alike: the state is the checkpoint's).
    sp.skipped = [s for s in sp.skipped if s["step"] <= plan.step or s["step"] >= first]
    sp.save_record(r.rdir, r.rank)
    r.sink.log({"step": step, "rollback": event, "warning": f"{streak}: rolled back to step {plan.step}; steps "
                f"{first}-{step} are passed without training ({len(sp.rollbacks)} of {sp.cfg.max_rollbacks} rollbacks)"})
    r.quiet_through = max(r.quiet_through, step)  # the steps again up to here were logged the first time
    timeline.recover(time.perf_counter() - t0)
    return plan.step, state.get("units", state.get("tokens", 0))
