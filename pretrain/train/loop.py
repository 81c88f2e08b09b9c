"""The training loop: one function every worker runs once its process group exists.

Build the model and its DeepSpeed engine, resume from the newest complete checkpoint if there is one,
then per optimizer step: `grad_accum` micro-batches of forward/backward, one step, one metrics row
(loss averaged over every rank and micro-batch), and on schedule validation and a checkpoint.
The loop does not know the model family; the objective turns (model, batch) into a loss.
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from pretrain.config import Config, grad_accum_steps, run_dir
from pretrain.data import build_train_stream, build_val_batches
from pretrain.metrics.flops import flops_per_token, matmul_params, peak_flops
from pretrain.metrics.sinks import Fanout, JsonlSink, Sink, WandbSink, truncate_after
from pretrain.models.transformer import Transformer, count_parameters
from pretrain.objectives.causal_lm import causal_lm
from pretrain.train import checkpoint as ckpt
from pretrain.train.engine import backward_and_step, build_engine
from pretrain.train.final import save_final_weights


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


def _mean_over_ranks(total: torch.Tensor, count: int) -> float:
    dist.all_reduce(total)
    return total.item() / (count * dist.get_world_size())


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


@torch.no_grad()
def evaluate(engine, share: list[tuple[dict, bool]], device: torch.device) -> float:
    """Mean validation loss per sequence over every rank's share (collective)."""
    engine.eval()
    total = torch.zeros(2, device=device)  # (sum of per-sequence losses, sequences)
    for batch, counted in share:
        loss, _ = causal_lm(engine, {"input_ids": batch["input_ids"].to(device)})
        if counted:
            n = batch["input_ids"].shape[0]
            total += torch.stack([loss.float() * n, torch.tensor(float(n), device=device)])
    engine.train()
    dist.all_reduce(total)
    return (total[0] / total[1]).item()


def _sinks(cfg: Config, rdir: Path, rank: int) -> Sink:
    if rank != 0:
        return Sink()
    sinks: list[Sink] = [JsonlSink(rdir / "metrics.jsonl")]
    if cfg.log.wandb:
        sinks.append(WandbSink(rdir, cfg.log.project, cfg.run.name, cfg.model_dump(mode="json")))
    return Fanout(sinks)


def summarize(metrics_path: Path) -> dict:
    """Loss figures of a run from its metrics.jsonl (the record that survives resumes)."""
    rows = [json.loads(ln) for ln in metrics_path.read_text().splitlines() if ln.strip()]
    train = [r for r in rows if "loss" in r]
    val = [r for r in rows if "val_loss" in r]
    out = {"steps": train[-1]["step"] if train else 0}
    if train:
        out.update(final_loss=train[-1]["loss"], tokens=train[-1]["tokens"], flops=train[-1]["flops"])
    if val:
        out.update(initial_val_loss=val[0]["val_loss"], final_val_loss=val[-1]["val_loss"])
    return out


def train(cfg: Config, *, started_at: float | None = None) -> None:
    """Run (or resume) the configured training on this rank. Collective: every rank calls it."""
    started_at = started_at or time.time()
    rank, world = dist.get_rank(), dist.get_world_size()
    device = _device()
    torch.set_num_threads(cfg.cluster.cpus_per_worker)
    _seed_everything(cfg.train.seed)
    rdir = run_dir(cfg)
    ckpt_dir = rdir / "checkpoints"

    model = Transformer(cfg.model).to(device)
    counts = count_parameters(model)  # before ZeRO-3 partitions the parameters
    model.activation_checkpointing = cfg.train.activation_checkpointing
    last = ckpt.latest_step(ckpt_dir)
    universal = ckpt.needs_universal(ckpt_dir, last, world)  # resuming at another world size
    if universal:
        ckpt.prepare_universal(ckpt_dir, last, rank)
    engine = build_engine(cfg, model, world, load_universal=universal)

    t = cfg.train
    if t.global_batch_size % (t.micro_batch_size * world):
        # An elastic group can shrink to a size that does not divide the global batch: refuse, never
        # silently train on another batch size.
        raise ValueError(f"train.global_batch_size ({t.global_batch_size}) is not divisible by "
                         f"train.micro_batch_size x {world} workers")
    accum = grad_accum_steps(cfg, world)
    stream = build_train_stream(
        cfg.data, seed=t.seed, rank=rank, world_size=world, micro_batch_size=t.micro_batch_size, grad_accum=accum
    )
    val_share = validation_share(cfg, rank, world) if cfg.data.val else []

    start, tokens = 0, 0
    if last is not None:
        state = ckpt.load(engine, ckpt_dir, last, rank, universal)
        stream.load_state_dict(state["data"])
        start, tokens = state["step"], state["tokens"]
        if rank == 0:
            truncate_after(rdir / "metrics.jsonl", start)
    sink = _sinks(cfg, rdir, rank)

    seq_len = stream.seq_len
    step_tokens = t.global_batch_size * seq_len
    fpt = flops_per_token(cfg.model, matmul_params(counts, cfg.model), seq_len)
    peak = cfg.log.peak_flops or peak_flops(device, t.precision, cfg.cluster.cpus_per_worker)
    if rank == 0:
        sink.summary({**counts, "flops_per_token": fpt, "peak_flops_per_worker": peak, "world_size": world})

    def validate(step: int) -> None:
        if val_share:
            sink.log({"step": step, "val_loss": evaluate(engine, val_share, device), "tokens": tokens,
                      "flops": fpt * tokens})

    if start == 0:
        validate(0)
    first_step_at = None
    for step in range(start + 1, t.steps + 1):
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        for _ in range(accum):
            batch = next(stream)
            loss, _ = causal_lm(engine, {"input_ids": batch["input_ids"].to(device, non_blocking=True)})
            grad_norm = backward_and_step(engine, loss)
            loss_sum += loss.detach().float()
        loss_mean = _mean_over_ranks(loss_sum, accum)  # also synchronises: the step's time is complete
        dt = time.perf_counter() - t0
        tokens += step_tokens
        first_step_at = first_step_at or time.time()
        row = {
            "step": step, "loss": loss_mean, "lr": engine.get_lr()[0],
            "grad_norm": grad_norm,
            "tokens": tokens, "tokens_per_s": step_tokens / dt, "flops": fpt * tokens,
            "mfu": fpt * step_tokens / dt / (peak * world), "step_time_s": dt,
        }
        row.update(stream.stats())
        sink.log(row)
        if step == t.steps or (t.eval_every and step % t.eval_every == 0):
            validate(step)
        if step == t.steps or (t.ckpt_every and step % t.ckpt_every == 0):
            client = {"step": step, "tokens": tokens, "data": stream.state_dict(), "config": cfg.model_dump(mode="json")}
            ckpt.save(engine, ckpt_dir, step, client, rank)

    stream.close()  # stop its dataloader workers before the final (collective) save
    save_final_weights(engine, cfg, rdir / "final", rank)
    if rank == 0:
        summary = {
            **counts, **summarize(rdir / "metrics.jsonl"), "world_size": world,
            "wall_time_s": time.time() - started_at,
            "time_to_first_step_s": (first_step_at - started_at) if first_step_at else None,
        }
        (rdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        sink.summary(summary)
    sink.close()
