"""Benchmark: one training step through the DeepSpeed engine against the same step as a bare PyTorch loop,
interleaved step by step in one process, so a machine whose speed drifts over minutes cancels out.

Two copies of the same model (same weights, batches, optimizer and objective). Each measured round runs one
step of each, in alternating order; the table gives the median step time of each and their ratio. A ratio
near 1 means the engine and the loop's step code (`backward_and_step`, DeepSpeed's forward/backward/step
hooks) add nothing measurable; what `tools/bench_train.py` measures beyond that is the process around it.
`--profile` prints torch.profiler's op table for ten steps of each.

    .venv/bin/python tools/bench_engine_ab.py [--models gpt-tiny,small] [--steps 40] [--compile] [--profile]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_train import MODELS  # noqa: E402 - the same model shapes
from train_solo import one_rank_group  # noqa: E402 - the same process group of one

from pretrain.config import grad_accum_steps  # noqa: E402
from pretrain.data import build_train_stream, validate_data  # noqa: E402
from pretrain.load import load_config
from pretrain.objectives import build_objective  # noqa: E402
from pretrain.train.build import build_model  # noqa: E402
from pretrain.train.engine import backward_and_step, build_engine, build_optimizer, clips_itself  # noqa: E402


def steps_of(config: str, overrides: list[str], compiled: bool, threads: int):
    """(bare step, engine step) functions of one model: each runs the step `i` on pre-loaded batches."""
    # No warm-up: the bare loop keeps optimizer.lr, and both take the same update (the decay over a few steps is ~1e-5).
    cfg = load_config(config, [*overrides, "cluster.workers=1", "zero.stage=0", "train.precision=fp32", "schedule.warmup_steps=0",
                               "log.wandb=false", f"train.compile={str(compiled).lower()}",
                               f"cluster.cpus_per_worker={threads}"])
    objective = build_objective(cfg, validate_data(cfg.data))
    torch.manual_seed(cfg.train.seed)
    bare_model, _ = build_model(cfg, torch.device("cpu"))
    engine = build_engine(cfg, copy.deepcopy(bare_model), 1)
    opt = build_optimizer(cfg, bare_model)
    opt_step = opt.step
    if compiled:
        bare_model.compile()
        opt_step = torch.compile(opt.step)
    accum = grad_accum_steps(cfg, 1)
    stream = build_train_stream(cfg.data, seed=cfg.train.seed, rank=0, world_size=1,
                                micro_batch_size=cfg.train.micro_batch_size, grad_accum=accum)
    batches = [objective.prepare(next(stream), torch.device("cpu")) for _ in range(4 * accum)]
    clip = cfg.optimizer.grad_clip if clips_itself(cfg) else None

    def bare(i: int) -> torch.Tensor:
        loss = torch.zeros(())
        for k in range(accum):
            total, n, _ = objective.loss(bare_model, batches[(i * accum + k) % len(batches)])
            (total / n / accum).backward()
            loss += total.detach() / n / accum
        torch.nn.utils.clip_grad_norm_(bare_model.parameters(), cfg.optimizer.grad_clip)
        opt_step()
        opt.zero_grad(set_to_none=True)
        return loss  # the step's mean loss, not synchronised on (a device would wait)

    def through_engine(i: int) -> torch.Tensor:
        loss = torch.zeros(())
        for k in range(accum):
            total, n, _ = objective.loss(engine, batches[(i * accum + k) % len(batches)])
            backward_and_step(engine, total * (accum / n), clip)  # the loop's scale for one rank
            loss += total.detach() / n / accum
        return loss

    return bare, through_engine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="gpt-tiny,small", help=f"comma-separated, of {sorted(MODELS)}")
    ap.add_argument("--steps", type=int, default=40, help="measured rounds (one step of each per round)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="both compiled (the module and the optimizer step)")
    ap.add_argument("--profile", action="store_true", help="print torch.profiler's op table for each")
    ap.add_argument("--out", default="bench-out/bench_engine_ab.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    one_rank_group()
    results = []
    for name in args.models.split(","):
        fns = dict(zip(("bare", "engine"), steps_of(*MODELS[name], args.compile, args.threads), strict=True))
        for f in fns.values():
            for i in range(args.warmup):
                f(i)
        times: dict[str, list[float]] = {k: [] for k in fns}
        for i in range(args.steps):
            for k in (("bare", "engine") if i % 2 == 0 else ("engine", "bare")):
                t0 = time.perf_counter()
                fns[k](i)
                times[k].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        results.append({"model": name, "compiled": args.compile, "bare_step_s": med["bare"],
                        "engine_step_s": med["engine"], "bare_over_engine": med["bare"] / med["engine"]})
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            for k, f in fns.items():
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    for i in range(10):
                        f(i)
                print(f"===== {name} {k}\n{prof.key_averages().table(sort_by='self_cpu_time_total', row_limit=25)}")
    print(f"\n{'':12}{'bare ms':>10}{'engine ms':>11}{'bare/engine':>13}   ({'compiled' if args.compile else 'eager'})")
    for r in results:
        print(f"{r['model']:12}{1e3 * r['bare_step_s']:>10.2f}{1e3 * r['engine_step_s']:>11.2f}{r['bare_over_engine']:>13.3f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"threads": args.threads, "models": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
