"""A run's set-up: everything the loop needs before its first step, built in one place (`build_run`).

The order below is the order every rank must keep: the model build, the checkpoint decision, the engine
and the resume are collectives, and the seeds are set before anything draws. `build_run` learns what it
trains from the config: the model family (`model.type`) from `pretrain.models`, the objective
(`objective.type`) from `pretrain.objectives`. It returns a `Run`: the parts (engine, objective, data,
sinks, checkpointer, EMA, hooks) and the figures (steps, the step resumed from, units per step, FLOPs).
"""

from __future__ import annotations

import os
import random
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from pretrain.config import Config, expert_parallel, grad_accum_steps, run_dir, worker_counts
from pretrain.data import build_train_stream, build_val_batches, validate_data
from pretrain.errors import RunError
from pretrain.length import total_steps
from pretrain.metrics.flops import peak_flops
from pretrain.metrics.heatmap import Grids
from pretrain.metrics.sinks import Deferred, Fanout, JsonlSink, Sink, open_wandb, rows, truncate_after
from pretrain.models import get_family
from pretrain.objectives import build_objective
from pretrain.train import checkpoint as ckpt
from pretrain.train.build import build_model
from pretrain.train.ema import EMA
from pretrain.train.engine import build_engine, clips_itself
from pretrain.train.hooks import (
    Hooks,
    log_step,
    save_checkpoint,
    update_ema,
    validate,
    write_artefact,
)
from pretrain.train.owner import Owner
from pretrain.train.parts import Run
from pretrain.train.resume import restore
from pretrain.train.spike import Spikes
from pretrain.train.startup import Marks
from pretrain.train.straggle import Stragglers


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


def validation_share(cfg: Config, rank: int, world: int) -> list[tuple[dict, bool]]:
    """This rank's part of the run's validation set as (batch, counted) pairs, as many on every rank.

    The set is fixed by the config (eval_batches x micro-batch x cluster.workers sequences), not by the
    world size of the moment, so a run resumed on fewer or more workers is validated on the same set.
    Ranks with one batch fewer repeat one with zero weight: under ZeRO-3 every forward is a collective.
    """
    t = cfg.train
    batches = build_val_batches(cfg.data, rank=0, world_size=1, micro_batch_size=t.micro_batch_size,
                                max_batches=cfg.eval.batches * cfg.cluster.workers)
    mine = [(b, True) for b in batches[rank::world]]
    return mine + [(batches[0], False)] * (-(-len(batches) // world) - len(mine))


def _start_wandb(cfg: Config, rdir: Path, rank: int, unit: str) -> Future | None:
    """Rank 0's W&B sink, started in a thread: wandb.init waits a second or more on its service process,
    which then overlaps the model and engine build and, if need be, the first steps (`Deferred`). It never
    fails the run: online falls back to offline, offline to no W&B (`open_wandb`)."""
    if rank != 0 or not cfg.log.wandb:
        return None
    config = cfg.model_dump(mode="json")
    pool = ThreadPoolExecutor(1, thread_name_prefix="wandb-init")
    future = pool.submit(open_wandb, rdir, cfg.log.project, cfg.run.name, config, unit)
    pool.shutdown(wait=False)
    return future


def _sinks(rdir: Path, rank: int, wandb: Future | None) -> Sink:
    """Rank 0's sinks, made once metrics.jsonl is cut back to the checkpoint: what it still holds is W&B's
    backlog (the rows below the resume point; W&B keeps those it lacks, `WandbSink.held`)."""
    if rank != 0:
        return Sink()
    metrics = rdir / "metrics.jsonl"
    backlog = rows(metrics) if wandb is not None else []
    sinks: list[Sink] = [JsonlSink(metrics)]
    if wandb is not None:
        sinks.append(Deferred(wandb, backlog))  # W&B catches up once its run exists; the steps do not wait for it
    return Fanout(sinks)


def build_run(cfg: Config, startup: Marks, steps: int | None = None, owner: Owner = Owner()) -> Run:
    """Set up (or resume) the configured run on this rank, marking its phases on `startup`. Collective:
    every rank calls it. `steps`: the run's length as the driver derived it, else derived here."""
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
    saver = ckpt.Checkpointer(store, ckpt.staging_dir(cfg, rank), rank, world, keep=cfg.checkpoint.keep,
                              keep_every=cfg.checkpoint.keep_every, timeout_s=cfg.cluster.collective_timeout_s,
                              owner=owner)  # the run's lock, checked before every write of a save
    plan = ckpt.decide(store, cfg.checkpoint.branch_from, rank, world, ep=expert_parallel(cfg))  # rank 0's decision, broadcast
    if plan.universal_url:  # resuming at another world size
        ckpt.prepare_universal(plan, saver.staging, rank)
    spikes = Spikes(cfg.spike)  # the engine's gate: a skipped step updates nothing
    engine = build_engine(cfg, model, world, load_universal=plan.universal_url is not None, steps=steps, gate=spikes)
    spikes.engine = engine
    startup.mark("engine")

    accum = grad_accum_steps(cfg, world)
    stream = build_train_stream(
        cfg.data, seed=t.seed, rank=rank, world_size=world, micro_batch_size=t.micro_batch_size, grad_accum=accum
    )
    raw_val = validation_share(cfg, rank, world) if cfg.data.val else []
    startup.mark("val_set")

    ema = EMA(engine.module, cfg.ema.decay, cfg.ema.warmup) if cfg.ema.decay else None
    start, units = 0, 0
    if plan.step is not None:
        state = restore(plan, engine, ema, stream, saver.staging, rank, world)
        start, units = state["step"], state.get("units", state.get("tokens", 0))
        spikes.load_state_dict(state.get("spike"))
    spikes.load_record(rdir, start, rank)  # skips.json: the rollbacks and skips of earlier attempts
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
    run = Run(cfg, objective, engine, stream, sink, saver, ema, device, rank, world, rdir, counts, unit, steps,
              start, units, accum, step_units, fpu, peak, clip=cfg.optimizer.grad_clip if clips_itself(cfg) else None,
              val=[(objective.prepare(b, device), c) for b, c in raw_val],
              sample_batch=raw_val[0][0] if raw_val else None, hooks=Hooks(), spikes=spikes, family=family)

    hooks = run.hooks
    if ema is not None:
        hooks.add(partial(update_ema, ema), every=1)  # first: every later hook of the step sees the updated average
    hooks.add(log_step, every=1)
    hooks.add(partial(validate, run.val, fpu), every=cfg.eval.every, at_start=True)
    if family.grids is not None:  # the family's heatmaps (an MoE's expert loads): summed every step, drawn at evals
        grids = Grids(family.grids)
        hooks.add(grids.add, every=1)
        hooks.add(grids.draw, every=cfg.eval.every)
    hooks.add(save_checkpoint, every=cfg.checkpoint.every, checkpoint=True)  # after every other hook of its step
    c = cfg.cluster
    if world > 1:
        run.straggle = Stragglers(c.straggler_ratio, c.straggler_windows, world)
        hooks.add(run.straggle, every=c.straggler_every, at_end=False)
    hooks.extend(objective.hooks(run.view(start, units)))
    hooks.add(write_artefact, every=0)
    startup.mark("resume_and_sinks")
    return run
