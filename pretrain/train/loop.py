"""The training loop: one function every worker runs once its process group exists.

`train` sets the run up (`run.build_run`), then per optimizer step reads and prepares the micro-batches,
runs forward/backward on them (`step.py`: the loss is divided by the unit count over all ranks) and hands
a view of the step to the hooks (`hooks.py`: logging, validation, checkpoints, EMA, the objective's own).
After the last step it saves the final weights and writes summary.json.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch.distributed as dist

from pretrain.atomic import atomic_write
from pretrain.config import Config, run_dir
from pretrain.metrics.flops import mfu_field
from pretrain.redact import redacted_tree
from pretrain.train.engine import compile_stats
from pretrain.train.final_weights import save_final_weights
from pretrain.train.goodput import TIMELINE, Timeline, account
from pretrain.train.owner import Owner
from pretrain.train.parts import Run
from pretrain.train.pulse import PREEMPTED, PULSE, inject_signal, start_heartbeats
from pretrain.train.run import build_run
from pretrain.train.spike import roll_back
from pretrain.train.startup import Marks
from pretrain.train.step import forward_backward, next_batches
from pretrain.train.straggle import stragglers


def train(cfg: Config, *, started_at: float | None = None, marks: list | None = None, steps: int | None = None,
          watcher: str | None = None, token: str = "", owner: dict | None = None) -> None:
    """Run (or resume) the configured training on this rank. Collective: every rank calls it. `steps` is the
    run's length as the driver derived it (pretrain.length.total_steps); derived here when not given.
    `watcher` ("host:port", with its `token`): where this rank's heartbeats go (pretrain/launch/watch.py).
    `owner`: the run's lock as `Owner.to_dict()` gives it, which every save checks (pretrain/train/owner.py)."""
    started_at = started_at or time.time()
    startup = Marks(marks or [("command", started_at)])  # the driver's marks (launch/local.py), then ours
    attempt = dict(startup.to_list()).get("worker_spawned", started_at)
    PULSE.at("start-up", 0)
    # Beating from here on: a rank stuck while the run is built (a dead mount, a lost peer) is seen too.
    start_heartbeats(watcher, token, dist.get_rank() if dist.is_initialized() else 0, f"{attempt:.6f}",
                     stacks=run_dir(cfg) / "hangs" / ".live")
    r = build_run(cfg, startup, steps, owner=Owner.from_dict(owner))
    inject_signal(r.rank, 0)
    timeline = Timeline(r.rdir, r.rank, started_at)
    if r.start == 0:
        r.hooks.start(r.view(r.start, r.start_units))
    startup.mark("start_hooks")  # the step-0 validation
    timeline.attempt(attempt, r.start)
    first_step_at, units = None, r.start_units
    step = r.start
    while step < r.steps:
        step += 1
        t0 = time.perf_counter()
        PULSE.at("data", step)
        inject_signal(r.rank, step)
        last = r.spikes.window_at(step)
        if last is not None:  # a rolled-back streak's steps: their data is passed, not trained on
            step = _pass_window(r, timeline, step, last, units)
            continue
        micro, count = next_batches(r, startup if first_step_at is None else None)
        values, grad_norm, skipped = forward_backward(r, micro, count, step)
        stop = values.pop("stop", 0.0) > 0  # a rank was asked to stop (SIGTERM, preemption): agreed in the all-reduce
        dt = time.perf_counter() - t0
        PULSE.step_times.append(dt)
        if first_step_at is None:
            first_step_at = time.time()
            startup.mark("first_step")  # compiles, under train.compile
            if r.rank == 0:
                startup.write(r.rdir / "start.json")
        if skipped is None:
            units += r.step_units
            fpu, unit = r.flops_per_unit, r.unit
            row = {
                "step": step, **values, "lr": float(r.engine.get_lr()[0]), "grad_norm": grad_norm,
                unit: units, f"{unit}_per_s": r.step_units / dt, "flops": fpu * units,
                **mfu_field(fpu * r.step_units / dt, r.peak, r.world), "step_time_s": dt, **r.stream.stats(),
            }
        else:  # no update (pretrain/train/spike.py): the row says why and which data
            row = r.spikes.row(step, skipped, r.stream)
            r.spikes.save_record(r.rdir, r.rank)
        spent = dict(PULSE.spent)
        view = r.view(step, units, row)
        r.hooks.after_step(view, step, last=step == r.steps)
        if stop and step < r.steps:
            _stop(r, view, timeline, step, t0, spent)
            return
        PULSE.settle()
        ev, ck = (PULSE.spent[k] - spent[k] for k in ("evaluation", "checkpoint"))
        timeline.step(step, time.perf_counter() - t0 - ev - ck, ev, ck)
        if skipped is not None and r.spikes.due():
            step, units = roll_back(r, timeline, step)
    _finish(r, started_at, first_step_at, timeline)


def _pass_window(r: Run, timeline: Timeline, step: int, last: int, units: int) -> int:
    """Steps `step`..`last` of a rolled-back streak: the stream moves past their data, the timeline counts
    their earlier computation as lost, and the hooks see the last of them as a skipped step. Returns it."""
    last = min(last, r.steps)
    r.stream.skip_to(last)
    for s in range(step, last + 1):
        timeline.step(s, 0.0, 0.0, 0.0)
    row = r.spikes.row(last, f"in the data window of a rollback ({step}-{last})", r.stream)
    r.hooks.after_step(r.view(last, units, row), last, last=last == r.steps)
    return last


def _stop(r: Run, view, timeline: Timeline, step: int, t0: float, spent: dict) -> None:
    """Asked to stop before the end (SIGTERM, preemption): a complete checkpoint at this step, then a clean
    return; `preempted.json` tells the driver to resume (or the user to run the command again). Collective."""
    if not (r.cfg.checkpoint.every and step % r.cfg.checkpoint.every == 0):  # not saved by its hook already
        PULSE.at("checkpoint")
        view.save_checkpoint()
    r.saver.wait()  # rank 0: complete (COMPLETE marker, latest) before anyone reports it
    PULSE.at("finish")
    ev, ck = (PULSE.spent[k] - spent[k] for k in ("evaluation", "checkpoint"))
    timeline.step(step, time.perf_counter() - t0 - ev - ck, ev, ck)
    timeline.close()
    r.stream.close()
    if r.rank == 0:
        atomic_write(r.rdir / PREEMPTED, json.dumps({"step": step, "reason": PULSE.stop_reason}) + "\n")
    r.sink.close()


def _finish(r: Run, started_at: float, first_step_at: float | None, timeline: Timeline) -> None:
    """The end of the run: the final weights, the last checkpoint's upload, summary.json. Collective."""
    PULSE.at("finish")
    r.stream.close()  # stop its dataloader workers before the final (collective) save
    save_final_weights(r.engine, r.cfg, r.rdir / "final", r.rank, ema=r.ema, data=r.objective.data)
    r.saver.close()  # the last checkpoint's upload (it overlapped the final weights) is complete
    if r.rank == 0:
        summary = {
            **r.counts, **summarize(r.rdir / "metrics.jsonl", r.unit, r.objective.summary_keys),
            "world_size": r.world,
            **fit_fields(r.cfg, r.steps, r.flops_per_unit, r.unit),
            "wall_time_s": time.time() - started_at,
            "time_to_first_step_s": (first_step_at - started_at) if first_step_at else None,
            **(compile_stats() if r.cfg.train.compile else {}),  # graphs, breaks, recompiles of train.compile
            **stragglers(r),
            **r.spikes.summary(),  # skipped_steps, rollbacks
        }
        timeline.close()
        summary["goodput"] = account(r.rdir / TIMELINE, started_at)  # last: its wall time ends here
        atomic_write(r.rdir / "summary.json", json.dumps(summary, indent=2) + "\n")
        r.sink.summary(summary)
    r.sink.close()


def summarize(metrics_path: Path, unit: str, keys: tuple[str, ...] = ()) -> dict:
    """Loss figures of a run from its metrics.jsonl (the record that survives resumes); for each of the
    objective's own `keys` (fd, class_agreement) its last value and its first as `initial_<key>`."""
    rows = [json.loads(ln) for ln in metrics_path.read_text().splitlines() if ln.strip()]
    train = [r for r in rows if "loss" in r]
    val = [r for r in rows if "val_loss" in r]
    out: dict = {"steps": train[-1]["step"] if train else 0, "unit": unit}
    if train:
        out.update(final_loss=train[-1]["loss"], flops=train[-1]["flops"])
        if "bpb" in train[-1]:  # token shards with byte counts: bits per UTF-8 byte, comparable across tokenizers
            out["final_bpb"] = train[-1]["bpb"]
        out[unit] = train[-1][unit]
    if val:
        for k in (k for k in val[-1] if k.startswith("val_")):
            out[f"initial_{k}"], out[f"final_{k}"] = val[0].get(k), val[-1][k]
    for k in keys:
        seen = [r[k] for r in rows if k in r]
        if seen:
            out[f"initial_{k}"], out[k] = seen[0], seen[-1]
    return out


def fit_fields(cfg: Config, steps: int, fpu: float, unit: str) -> dict:
    """What a scaling fit needs beside the losses (pretrain/scaling/table.py reads them): the schedule, the
    length asked for, FLOPs per unit, and the identity of the data, tokenizer and objective."""
    from pretrain.data.identity import identity
    from pretrain.train.schedule import describe

    t = cfg.train
    return {"schedule": describe(cfg.schedule, cfg.optimizer.lr, steps), "length": {k: getattr(t, k) for k in ("steps", "tokens", "flops")},
            # redacted: a data source that is a URL names itself in the identity, presigned signature and all
            f"flops_per_{unit.rstrip('s')}": fpu, **redacted_tree(identity(cfg.model_dump(mode="json")))}
