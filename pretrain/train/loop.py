"""The training loop: one function every worker runs once its process group exists.

It learns what it trains from the config: the model family (`model.type`) from `pretrain.models`, the
objective (`objective.type`) from `pretrain.objectives`. Per optimizer step it prepares `grad_accum`
micro-batches, all-reduces their loss-unit count over ranks, and runs forward/backward on each with the
loss sum divided by that global count, so the gradient and the logged loss are the sum of per-unit
losses over the global batch divided by its unit count, however units are spread over micro-batches
and ranks. Logging, validation, checkpoints and the end-of-run artefact attach as hooks (`hooks.py`).
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from pretrain.atomic import atomic_write
from pretrain.config import Config, grad_accum_steps, run_dir, worker_counts
from pretrain.data import build_train_stream, build_val_batches, validate_data
from pretrain.errors import RunError, is_deterministic
from pretrain.length import total_steps
from pretrain.metrics.flops import mfu_field, peak_flops
from pretrain.metrics.sinks import Deferred, Fanout, JsonlSink, Sink, WandbSink, last_step, truncate_after
from pretrain.models import get_family
from pretrain.objectives import Metrics, Objective, add_metrics, build_objective
from pretrain.train import checkpoint as ckpt
from pretrain.train.build import build_model
from pretrain.train.ema import EMA
from pretrain.train.engine import backward_and_step, build_engine, clips_itself, compile_stats
from pretrain.train.final_weights import save_final_weights
from pretrain.train.hooks import Hooks
from pretrain.train.startup import Marks


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _device() -> torch.device:
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def reduce_metrics(local: Metrics, device: torch.device) -> dict[str, float]:
    """Sum every (sum, count) pair over ranks in one collective; return sum / count per name."""
    names = sorted(local)
    flat = torch.stack([torch.stack([local[k][0].float(), local[k][1].float()]) for k in names]).to(device)
    dist.all_reduce(flat)
    return dict(zip(names, (flat[:, 0] / flat[:, 1].clamp(min=1)).tolist(), strict=True))  # one sync, not one per name


def validation_share(cfg: Config, rank: int, world: int) -> list[tuple[dict, bool]]:
    """This rank's part of the run's validation set as (batch, counted) pairs, as many on every rank.

    The set is fixed by the config (eval_batches x micro-batch x cluster.workers sequences), not by the
    world size of the moment, so a run resumed on fewer or more workers is validated on the same set.
    Ranks with one batch fewer repeat one with zero weight: under ZeRO-3 every forward is a collective.
    """
    t = cfg.train
    batches = build_val_batches(cfg.data, rank=0, world_size=1, micro_batch_size=t.micro_batch_size,
                                max_batches=t.eval_batches * cfg.cluster.workers)
    mine = [(b, True) for b in batches[rank::world]]
    return mine + [(batches[0], False)] * (-(-len(batches) // world) - len(mine))


@dataclass
class State:
    """What hooks see: the run's parts and where it stands."""

    cfg: Config
    objective: Objective
    engine: Any
    stream: Any
    sink: Sink
    device: torch.device
    rank: int
    world: int
    rdir: Path
    unit: str
    flops_per_unit: float
    step: int = 0
    units: int = 0
    row: dict = field(default_factory=dict)
    val: list = field(default_factory=list)  # prepared (batch, counted) pairs of this rank
    sample_batch: dict | None = None  # a raw batch for the artefact
    ema: EMA | None = None  # the fp32 moving average of the weights, when train.ema_decay is set
    checkpointer: Any = None  # this rank's side of saving checkpoints (train/checkpoint.py)


def _start_wandb(cfg: Config, rdir: Path, rank: int, unit: str) -> Future | None:
    """Rank 0's W&B run, started in a thread: wandb.init waits a second or more on its service process,
    which then overlaps the model and engine build and, if need be, the first steps (`Deferred`). `logged` (the
    last step earlier attempts sent) is read before this attempt touches metrics.jsonl."""
    if rank != 0 or not cfg.log.wandb:
        return None
    logged = last_step(rdir / "metrics.jsonl")
    config = cfg.model_dump(mode="json")
    pool = ThreadPoolExecutor(1, thread_name_prefix="wandb-init")
    future = pool.submit(WandbSink, rdir, cfg.log.project, cfg.run.name, config, unit, logged)
    pool.shutdown(wait=False)
    return future


def _sinks(rdir: Path, rank: int, wandb: Future | None) -> Sink:
    if rank != 0:
        return Sink()
    sinks: list[Sink] = [JsonlSink(rdir / "metrics.jsonl")]
    if wandb is not None:
        sinks.append(Deferred(wandb))  # W&B catches up once its run exists; the steps do not wait for it
    return Fanout(sinks)


def agree_on_errors(count: torch.Tensor, error: BaseException | None, world: int) -> torch.Tensor:
    """The step's unit count summed over ranks, in the same collective as whether any rank's batch failed
    deterministically (a bad sample in its shard). If one did, every rank raises RunError with that
    rank's line here, together: none is left waiting in a collective for a rank that has stopped, and
    the run ends without the restart a lost worker would cause (`pretrain.launch.local`)."""
    both = torch.stack([count.float(), torch.tensor(float(error is not None), device=count.device)])
    dist.all_reduce(both)
    if both[1].item():
        mine = (str(error).strip() or type(error).__name__).splitlines()[0] if error is not None else None
        lines: list = [None] * world
        dist.all_gather_object(lines, mine)
        raise RunError(next(line for line in lines if line))
    return both[0]


# ----------------------------------------------------------------------------- hooks


def log_step(s: State) -> None:
    s.sink.log(s.row)


def validate(s: State) -> None:
    if not s.val:
        return
    s.engine.eval()
    local = s.objective.evaluate(s.engine, s.val)
    s.engine.train()
    values = reduce_metrics(local, s.device)
    s.sink.log({"step": s.step, **{f"val_{k}": v for k, v in values.items()}, s.unit: s.units,
                "flops": s.flops_per_unit * s.units})


def update_ema(s: State) -> None:
    s.ema.update()


def save_checkpoint(s: State) -> None:
    client = {"step": s.step, "units": s.units, "data": s.stream.state_dict(), "config": s.cfg.model_dump(mode="json")}
    extra = (lambda d: s.ema.save(d, s.rank, s.world)) if s.ema is not None else None
    s.checkpointer.save(s.engine, s.step, client, extra=extra)  # the upload to the location runs behind


def write_artefact(s: State) -> None:
    s.engine.eval()
    try:
        text = s.objective.artefact(s.engine, s)
    except Exception as e:  # noqa: BLE001 - the run is trained and checkpointed: a failed sample must not fail it
        text = None
        if s.rank == 0:
            line = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            print(f"warning: end-of-run artefact failed, the run is kept ({line})", file=sys.stderr, flush=True)
            s.sink.summary({"artefact_error": line})
    s.engine.train()
    if text is not None and s.rank == 0:
        atomic_write(s.rdir / "sample.txt", text)


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
    return {"schedule": describe(t, steps), "length": {k: getattr(t, k) for k in ("steps", "tokens", "flops")},
            f"flops_per_{unit.rstrip('s')}": fpu, **identity(cfg.model_dump(mode="json"))}


# ----------------------------------------------------------------------------- the loop


def train(cfg: Config, *, started_at: float | None = None, marks: list | None = None, steps: int | None = None) -> None:
    """Run (or resume) the configured training on this rank. Collective: every rank calls it. `steps` is the
    run's length as the driver derived it (pretrain.length.total_steps); derived here when not given."""
    started_at = started_at or time.time()
    startup = Marks(marks or [("command", started_at)])  # the driver's marks (launch/local.py), then ours
    rank, world = dist.get_rank(), dist.get_world_size()
    device = _device()
    torch.set_num_threads(cfg.cluster.cpus_per_worker)
    _seed_everything(cfg.train.seed)
    rdir = run_dir(cfg)
    rdir.mkdir(parents=True, exist_ok=True)  # with cluster.storage set, no checkpoint write makes it

    t = cfg.train
    if world not in worker_counts(cfg) or t.global_batch_size % (t.micro_batch_size * world):
        # An elastic group can shrink to a size the config does not allow: refuse before any checkpoint
        # conversion, never silently train on another batch size.
        raise RunError(f"{world} workers: not an allowed group size of this run ({worker_counts(cfg)}: "
                       f"train.global_batch_size must divide by train.micro_batch_size x workers)")
    family = get_family(cfg.model.type)
    objective = build_objective(cfg, validate_data(cfg.data))
    objective.check()
    wandb = _start_wandb(cfg, rdir, rank, objective.unit)
    startup.mark("objective_and_data_check")
    model, counts = build_model(cfg, device)  # in partitions already under ZeRO-3; released weights loaded
    startup.mark("model")
    model.activation_checkpointing = cfg.train.activation_checkpointing
    steps = steps or total_steps(cfg, objective, counts)  # train.steps, or what train.tokens / train.flops take
    store = ckpt.Storage(ckpt.location(cfg))
    saver = ckpt.Checkpointer(store, ckpt.staging_dir(cfg, rank), rank, world, keep=cfg.train.ckpt_keep,
                              keep_every=cfg.train.ckpt_keep_every, timeout_s=cfg.cluster.collective_timeout_s)
    plan = ckpt.decide(store, cfg.train.branch_from, rank, world)  # rank 0's decision, broadcast
    if plan.universal_url:  # resuming at another world size
        ckpt.prepare_universal(plan, saver.staging, rank)
    engine = build_engine(cfg, model, world, load_universal=plan.universal_url is not None, steps=steps)
    startup.mark("engine")

    t = cfg.train
    accum = grad_accum_steps(cfg, world)
    stream = build_train_stream(
        cfg.data, seed=t.seed, rank=rank, world_size=world, micro_batch_size=t.micro_batch_size, grad_accum=accum
    )
    raw_val = validation_share(cfg, rank, world) if cfg.data.val else []
    startup.mark("val_set")

    ema = EMA(engine.module, t.ema_decay, t.ema_warmup) if t.ema_decay else None
    start, units = 0, 0
    if plan.step is not None:
        with ckpt.opened(plan, saver.staging, rank) as (step_dir, universal_dir):
            state = ckpt.load(engine, step_dir, rank, universal_dir, own_schedule=plan.branched)
            if ema is not None:
                ema.load(step_dir, rank, world)
        stream.load_state_dict(state["data"])
        start, units = state["step"], state.get("units", state.get("tokens", 0))
    if rank == 0:  # each step once: cut metrics.jsonl back to the checkpoint's step, or empty it without one
        truncate_after(rdir / "metrics.jsonl", start or -1)

    unit, per_sample = objective.unit, objective.units_per_sample()
    step_units = t.global_batch_size * per_sample
    fpu = family.flops_per_unit(cfg.model, counts, objective.workload())
    if device.type == "cuda":  # train.tf32 decides, both ways: cuDNN's own default is TF32 on
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = t.tf32
    # Read back, not assumed: ROCm honours the flag only with HIPBLASLT_ALLOW_TF32=1; MFU needs the peak in use.
    tf32 = device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32
    peak = cfg.log.peak_flops or peak_flops(device, t.precision, cfg.cluster.cpus_per_worker, tf32=tf32)
    sink = _sinks(rdir, rank, wandb)
    if rank == 0:
        sink.summary({**counts, f"flops_per_{unit.rstrip('s')}": fpu, "peak_flops_per_worker": peak,
                      "world_size": world})
    s = State(cfg, objective, engine, stream, sink, device, rank, world, rdir, unit, fpu, step=start, units=units,
              val=[(objective.prepare(b, device), c) for b, c in raw_val],
              sample_batch=raw_val[0][0] if raw_val else None, ema=ema, checkpointer=saver)

    hooks = Hooks()
    if ema is not None:
        hooks.add(update_ema, every=1)  # first: every later hook of the step sees the updated average
    hooks.add(log_step, every=1)
    hooks.add(validate, every=t.eval_every, at_start=True)
    hooks.add(save_checkpoint, every=t.ckpt_every)
    hooks.extend(objective.hooks(s))
    hooks.add(write_artefact, every=0)

    startup.mark("resume_and_sinks")
    if start == 0:
        hooks.start(s)
    startup.mark("start_hooks")  # the step-0 validation
    first_step_at = None
    clip = t.grad_clip if clips_itself(cfg) else None  # else DeepSpeed clips
    for step in range(start + 1, steps + 1):
        t0 = time.perf_counter()
        try:
            raw = [next(stream) for _ in range(accum)]
            if first_step_at is None:
                startup.mark("first_batch")
            micro = [objective.prepare(b, device) for b in raw]
            if s.sample_batch is None:
                s.sample_batch = raw[0]
            count, error = torch.stack([objective.count(b) for b in micro]).sum().float(), None
        except Exception as e:
            if not is_deterministic(e):
                raise
            count, error = torch.zeros((), device=device), e
        count = agree_on_errors(count, error, world)
        # engine.backward divides by grad_accum and the gradient all-reduce averages over ranks.
        scale = world * accum / count.clamp(min=1)
        local: Metrics = {}
        grad_norm = None
        for b in micro:
            total, n, metrics = objective.loss(engine, b)
            grad_norm = backward_and_step(engine, total * scale, clip)
            add_metrics(local, {"loss": (total, n), **metrics})
        values = reduce_metrics(local, device)  # also synchronises: the step's time is complete
        dt = time.perf_counter() - t0
        units += step_units
        if first_step_at is None:
            first_step_at = time.time()
            startup.mark("first_step")  # compiles, under train.compile
            if rank == 0:
                startup.write(rdir / "start.json")
        s.step, s.units = step, units
        s.row = {
            "step": step, **values, "lr": float(engine.get_lr()[0]), "grad_norm": grad_norm,
            unit: units, f"{unit}_per_s": step_units / dt, "flops": fpu * units,
            **mfu_field(fpu * step_units / dt, peak, world), "step_time_s": dt, **stream.stats(),
        }
        hooks.after_step(s, step, last=step == steps)

    stream.close()  # stop its dataloader workers before the final (collective) save
    save_final_weights(engine, cfg, rdir / "final", rank, ema=ema, data=objective.data)
    saver.close()  # the last checkpoint's upload (it overlapped the final weights) is complete
    if rank == 0:
        summary = {
            **counts, **summarize(rdir / "metrics.jsonl", unit, objective.summary_keys), "world_size": world,
            **fit_fields(cfg, steps, fpu, unit),
            "wall_time_s": time.time() - started_at,
            "time_to_first_step_s": (first_step_at - started_at) if first_step_at else None,
            **(compile_stats() if cfg.train.compile else {}),  # graphs, breaks, recompiles of train.compile
        }
        atomic_write(rdir / "summary.json", json.dumps(summary, indent=2) + "\n")
        sink.summary(summary)
    sink.close()
