"""Benchmark: `pretrain train` (Ray Train worker + DeepSpeed) against a bare PyTorch loop.

Same model, global batch, objective (the loss of its `loss()`), optimizer (AdamW) and thread count;
the bare loop has no Ray, no DeepSpeed, no data pipeline, no hooks (batches pre-loaded and prepared).
Works for any registered family and objective: tokens/s for language models, images/s for DiT.
Reports steady-state throughput (median over the steps after warm-up), MFU against this machine's
measured matmul peak, the ratio, and the time to the first step of `pretrain train`. Prints a table
and writes JSON.

    .venv/bin/python tools/bench_train.py [--config configs/gpt-tiny.yaml] [--steps 40] [--threads 2]
    .venv/bin/python tools/bench_train.py --config configs/dit-fashion.yaml --steps 20
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from pretrain.config import grad_accum_steps, load_config
from pretrain.data import build_train_stream, validate_data
from pretrain.launch.local import launch
from pretrain.metrics.flops import measured_cpu_peak
from pretrain.models import get_family
from pretrain.objectives import build_objective
from pretrain.train.build import build_model
from pretrain.train.engine import build_optimizer
from pretrain.train.init_from import resolve


def bare_loop(cfg, steps: int, warmup: int) -> list[float]:
    """units/s per step of a plain single-process loop (micro-batches accumulated like the trainer)."""
    torch.manual_seed(cfg.train.seed)
    model, _ = build_model(cfg, torch.device("cpu"))  # the trainer's initial (or released) weights, LoRA applied
    objective = build_objective(cfg, validate_data(cfg.data))
    opt = build_optimizer(cfg, model)
    accum = grad_accum_steps(cfg, 1)
    stream = build_train_stream(cfg.data, seed=cfg.train.seed, rank=0, world_size=1,
                                micro_batch_size=cfg.train.micro_batch_size, grad_accum=accum)
    cpu = torch.device("cpu")
    batches = [objective.prepare(next(stream), cpu) for _ in range(accum * (steps + warmup))]
    step_units = cfg.train.global_batch_size * objective.units_per_sample()
    rates = []
    for s in range(steps + warmup):
        t0 = time.perf_counter()
        for k in range(accum):
            total, n, _ = objective.loss(model, batches[s * accum + k])  # a sum over n units
            (total / n / accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        rates.append(step_units / (time.perf_counter() - t0))
    return rates[warmup:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/gpt-tiny.yaml")
    ap.add_argument("--steps", type=int, default=40, help="measured steps (after --warmup)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2, help="CPU threads for the worker and the bare loop")
    ap.add_argument("--out", default="bench-out/bench_train.json")
    ap.add_argument("--full", action="store_true", help="drop the config's lora section: train every weight")
    ap.add_argument("overrides", nargs="*", help="section.key=value config overrides")
    args = ap.parse_args()

    total = args.steps + args.warmup
    # No artefacts, samples or quality numbers: they are evaluation, not training steps.
    quiet = {"sample_tokens": 0, "eval_samples": 0, "grid_samples": 0}
    fields = type(load_config(args.config).objective).model_fields
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(args.config, [
            f"train.steps={total}", "cluster.workers=1", "zero.stage=0", f"cluster.cpus_per_worker={args.threads}",
            f"run.dir={tmp}", "run.name=bench", "train.eval_every=0", "train.ckpt_every=0",
            "log.wandb=false", "train.precision=fp32", *(f"objective.{k}={v}" for k, v in quiet.items() if k in fields),
            *args.overrides,
        ])
        if args.full:
            cfg.lora = None
        cfg = resolve(cfg)
        objective = build_objective(cfg, validate_data(cfg.data))
        t0 = time.time()
        launch(cfg, started_at=t0, quiet=True)
        rows = [json.loads(ln) for ln in (Path(tmp) / "bench" / "metrics.jsonl").read_text().splitlines()]
        summary = json.loads((Path(tmp) / "bench" / "summary.json").read_text())
    unit = objective.unit
    ours = [r[f"{unit}_per_s"] for r in rows if "loss" in r][args.warmup:]

    torch.set_num_threads(args.threads)
    bare = bare_loop(cfg, args.steps, args.warmup)
    family = get_family(cfg.model.type)
    with torch.device("meta"):
        fpu = family.flops_per_unit(cfg.model, family.count_parameters(family.build(cfg.model)), objective.workload())
    peak = measured_cpu_peak(args.threads)

    result = {
        "config": args.config, "lora": cfg.lora is not None, "unit": unit, "threads": args.threads, "peak_flops": peak, "flops_per_unit": fpu,
        "pretrain_per_s": statistics.median(ours), "bare_per_s": statistics.median(bare),
        "time_to_first_step_s": summary["time_to_first_step_s"], "wall_time_s": summary["wall_time_s"],
    }
    result["ratio"] = result["pretrain_per_s"] / result["bare_per_s"]
    result["pretrain_mfu"] = result["pretrain_per_s"] * fpu / peak
    result["bare_mfu"] = result["bare_per_s"] * fpu / peak

    print(f"\n{'':24}{unit + '/s':>12}{'MFU':>8}")
    print(f"{'pretrain train (1 wkr)':24}{result['pretrain_per_s']:>12,.1f}{100 * result['pretrain_mfu']:>7.1f}%")
    print(f"{'bare PyTorch loop':24}{result['bare_per_s']:>12,.1f}{100 * result['bare_mfu']:>7.1f}%")
    print(f"ratio {result['ratio']:.3f}; time to first step {result['time_to_first_step_s']:.1f}s; "
          f"peak {peak / 1e9:.0f} GFLOP/s with {args.threads} threads")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
