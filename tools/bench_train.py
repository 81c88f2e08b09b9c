"""Benchmark: `pretrain train` (Ray Train worker + DeepSpeed) against a GPT written in plain PyTorch, and against
our own model in a bare loop, eager and compiled.

Two yardsticks, so the model's cost and the trainer's cost read apart:
- the plain loop (GPT-2 models): `tools/plain_gpt.py`, a GPT of the same shape written with nothing of this
  project (nn.Linear, SDPA, nn.LayerNorm, F.cross_entropy), stepped by `torch.optim.AdamW` as a user writes
  it, eager. `pretrain train` / plain is the figure a user compares; bare / plain is our model's share.
- the bare loop: our model, objective (the loss of its `loss()`) and optimizer (`build_optimizer`) without
  Ray, DeepSpeed, data pipeline or hooks. `pretrain train` / bare is the trainer's share.
Same global batch, batches (pre-loaded and prepared for both loops) and thread count. Per model and pair, back
to back: `pretrain train` eager, the bare loop eager, the plain loop, `pretrain train` with
`train.compile=true`, the bare loop with `module.compile()` plus a compiled optimizer step (inductor, as
`train.compile` does).
By default three models (issue 14): `gpt-tiny` (configs/gpt-tiny.yaml, the demo), `gpt-tiny-50k` (its
shape as the issue measured it: 4 layers on GPT-2's 50k BPE, data/shakespeare) and `small`, a 4-layer x 128 GPT-2
on character-level plays (vocabulary 66, batch 12 x 64; shards from tools/make_char_shards.py, written
when missing), where the per-step machinery is not hidden behind a large LM head.
Works for any registered family and objective (--config): tokens/s for language models, images/s for DiT.
With --in-process the loop runs in the benchmark's own process (a gloo group of one) instead of a Ray Train
worker: the same code per step, without the worker process around it.
Reports steady-state throughput (median over the steps after warm-up), MFU against this machine's
measured matmul peak, the ratios, and the time to the first step of `pretrain train`. Prints a table
and writes JSON. On a loaded machine compare the ratios (each pair measured back to back), not the rates.

    .venv/bin/python tools/bench_train.py [--models gpt-tiny,gpt-tiny-50k,small] [--steps 40] [--threads 2] [--repeat 3]
    .venv/bin/python tools/bench_train.py --config configs/dit-fashion.yaml --steps 20
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from pretrain.config import grad_accum_steps
from pretrain.data import build_train_stream, validate_data
from pretrain.hub.sources import resolve
from pretrain.launch.local import launch
from pretrain.load import load_config
from pretrain.metrics.flops import measured_cpu_peak
from pretrain.models import get_family
from pretrain.objectives import build_objective
from pretrain.train.build import build_model
from pretrain.train.engine import INDUCTOR_CACHE, build_optimizer
from pretrain.train.loop import train

sys.path.insert(0, str(Path(__file__).parent))
from plain_gpt import PlainGPT  # noqa: E402 - the yardstick written without this project
from train_solo import one_rank_group  # noqa: E402 - the loop in this process, on a group of one

SMALL = ["model.n_layers=4", "model.d_model=128", "model.n_heads=4", "model.vocab_size=66", "model.max_seq_len=64",
         "data.train=data/chars/train", "data.val=data/chars/val", "train.micro_batch_size=12",
         "train.global_batch_size=12", "cluster.workers=1"]
# The shape issue 14 measured as gpt-tiny: 4 x 128 on GPT-2's own BPE (50304 rows, the head dominates).
GPT_TINY_50K = ["model.n_layers=4", "model.vocab_size=50304", "data.train=data/shakespeare/train",
                "data.val=data/shakespeare/val"]
MODELS = {"gpt-tiny": ("configs/gpt-tiny.yaml", []), "gpt-tiny-50k": ("configs/gpt-tiny.yaml", GPT_TINY_50K),
          "small": ("configs/gpt-tiny.yaml", SMALL)}


def bare_loop(cfg, steps: int, warmup: int, compiled: bool = False, mode: str | None = None) -> list[float]:
    """units/s per step of a plain single-process loop (micro-batches accumulated like the trainer); `mode`:
    inductor's compile mode when compiled (None: its default, as the trainer compiles)."""
    torch.manual_seed(cfg.train.seed)
    model, _ = build_model(cfg, torch.device("cpu"))  # the trainer's initial (or released) weights, LoRA applied
    if compiled:
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(INDUCTOR_CACHE))  # the trainer's cache
        model.compile(mode=mode)  # what engine.compile() does to the engine's module (default inductor backend)
    objective = build_objective(cfg, validate_data(cfg.data))
    # Compiled as the trainer compiles it (pretrain/train/engine.py): the module and the optimizer step.
    opt = build_optimizer(cfg.model_copy(update={"train": cfg.train.model_copy(update={"compile": compiled})}), model)
    opt_step = torch.compile(opt.step, mode=mode) if compiled else opt.step
    accum = grad_accum_steps(cfg, 1)
    batches = _batches(cfg, objective, accum * (steps + warmup))
    step_units = cfg.train.global_batch_size * objective.units_per_sample()
    rates = []
    for s in range(steps + warmup):
        t0 = time.perf_counter()
        for k in range(accum):
            total, n, _ = objective.loss(model, batches[s * accum + k])  # a sum over n units
            (total / n / accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optimizer.grad_clip)
        opt_step()
        opt.zero_grad(set_to_none=True)
        rates.append(step_units / (time.perf_counter() - t0))
    return rates[warmup:]


def _batches(cfg, objective, n: int) -> list[dict]:
    """The first `n` prepared micro-batches of the run's own stream (the loops train on what the run trains on)."""
    stream = build_train_stream(cfg.data, seed=cfg.train.seed, rank=0, world_size=1,
                                micro_batch_size=cfg.train.micro_batch_size, grad_accum=grad_accum_steps(cfg, 1))
    return [objective.prepare(next(stream), torch.device("cpu")) for _ in range(n)]


def plain_loop(cfg, steps: int, warmup: int) -> list[float]:
    """tokens/s per step of `tools/plain_gpt.py` (the config's GPT-2 shape) in a hand-written eager loop."""
    m = cfg.model
    torch.manual_seed(cfg.train.seed)
    model = PlainGPT(m.n_layers, m.d_model, m.n_heads, m.vocab_size, m.max_seq_len)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optimizer.lr, betas=cfg.optimizer.betas,
                            weight_decay=cfg.optimizer.weight_decay)
    accum = grad_accum_steps(cfg, 1)
    batches = _batches(cfg, build_objective(cfg, validate_data(cfg.data)), accum * (steps + warmup))
    step_tokens = sum(b["targets"].numel() for b in batches[:accum])
    rates = []
    for s in range(steps + warmup):
        t0 = time.perf_counter()
        for b in batches[s * accum:(s + 1) * accum]:
            (model(b["input_ids"], b["targets"]) / accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optimizer.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        rates.append(step_tokens / (time.perf_counter() - t0))
    return rates[warmup:]


def train_run(args, config: str, overrides: list[str], compiled: bool) -> tuple[list[float], dict, object]:
    """`pretrain train` on one worker (ZeRO-0, fp32, no evaluation, checkpoints or W&B): its units/s per
    measured step, its summary and the resolved config."""
    # No artefacts, samples or quality numbers: they are evaluation, not training steps.
    quiet = {"sample_tokens": 0, "eval_samples": 0, "grid_samples": 0}
    fields = type(load_config(config, overrides).objective).model_fields
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(config, [
            *overrides, f"train.steps={args.steps + args.warmup}", "cluster.workers=1", "zero.stage=0",
            f"cluster.cpus_per_worker={args.threads}", f"run.dir={tmp}", "run.name=bench", "eval.every=0",
            "checkpoint.every=0", "log.wandb=false", "train.precision=fp32", f"train.compile={str(compiled).lower()}",
            *(f"objective.{k}={v}" for k, v in quiet.items() if k in fields), *args.overrides,
        ])
        if args.full:
            cfg.lora = None
        cfg = resolve(cfg)
        unit = build_objective(cfg, validate_data(cfg.data)).unit
        if args.in_process:  # the same loop in this process (a gloo group of one): no Ray worker around it
            one_rank_group()
            train(cfg, started_at=time.time())
        else:
            launch(cfg, started_at=time.time(), quiet=True)
        rows = [json.loads(ln) for ln in (Path(tmp) / "bench" / "metrics.jsonl").read_text().splitlines()]
        summary = json.loads((Path(tmp) / "bench" / "summary.json").read_text())
    return [r[f"{unit}_per_s"] for r in rows if "loss" in r][args.warmup:], summary, cfg


def bench_model(args, name: str, config: str, overrides: list[str]) -> dict:
    """The four runs of one model, `--repeat` times, and their ratios. Each `pretrain train` run comes right
    before the bare loop it is compared with, and each ratio is taken within its pair: a machine whose speed
    drifts over minutes biases a pair as little as it can, and the median over the pairs drops an outlier."""
    pairs = []
    for _ in range(args.repeat):
        eager, summary, cfg = train_run(args, config, overrides, compiled=False)
        torch.set_num_threads(args.threads)
        bare = bare_loop(cfg, args.steps, args.warmup)
        plain = plain_loop(cfg, args.steps, args.warmup) if cfg.model.type == "gpt2" else None
        comp, csummary, _ = train_run(args, config, overrides, compiled=True)
        bare_c = bare_loop(cfg, args.steps, args.warmup, compiled=True)
        med = statistics.median
        pairs.append({"pretrain_per_s": med(eager), "bare_per_s": med(bare), "pretrain_compiled_per_s": med(comp),
                      "bare_compiled_per_s": med(bare_c), "time_to_first_step_s": summary["time_to_first_step_s"],
                      "time_to_first_step_compiled_s": csummary["time_to_first_step_s"],
                      "compile_stats": {k: csummary.get(k) for k in ("compiled_frames", "compiled_graphs", "graph_breaks")}})
        p = pairs[-1]
        p["ratio"] = p["pretrain_per_s"] / p["bare_per_s"]
        p["ratio_compiled"] = p["pretrain_compiled_per_s"] / p["bare_compiled_per_s"]
        p["compile_speedup"] = p["pretrain_compiled_per_s"] / p["pretrain_per_s"]
        p["bare_compile_speedup"] = p["bare_compiled_per_s"] / p["bare_per_s"]
        if plain is not None:  # the yardstick not ours: the user's figures, and our model's share
            p["plain_per_s"] = med(plain)
            p["vs_plain"] = p["pretrain_per_s"] / p["plain_per_s"]
            p["compiled_vs_plain"] = p["pretrain_compiled_per_s"] / p["plain_per_s"]
            p["bare_vs_plain"] = p["bare_per_s"] / p["plain_per_s"]
        print(f"{name} pair {len(pairs)}/{args.repeat}: eager {p['ratio']:.3f}, compiled {p['ratio_compiled']:.3f}, "
              f"compiled/eager {p['compile_speedup']:.3f} (bare {p['bare_compile_speedup']:.3f})"
              + (f"; against plain PyTorch: pretrain {p['vs_plain']:.3f}, compiled {p['compiled_vs_plain']:.3f}, "
                 f"our model bare {p['bare_vs_plain']:.3f}" if plain is not None else ""), flush=True)
    objective = build_objective(cfg, validate_data(cfg.data))
    family = get_family(cfg.model.type)
    with torch.device("meta"):
        fpu = family.flops_per_unit(cfg.model, family.count_parameters(family.build(cfg.model)), objective.workload())
    r = {"model": name, "config": config, "overrides": overrides, "lora": cfg.lora is not None, "unit": objective.unit,
         "flops_per_unit": fpu, "repeat": args.repeat, "pairs": pairs}
    for key in pairs[0]:
        if key != "compile_stats":  # rates, times and ratios: the median over the pairs
            r[key] = statistics.median(p[key] for p in pairs)
    r["compile_stats"] = pairs[-1]["compile_stats"]
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="gpt-tiny,gpt-tiny-50k,small", help=f"comma-separated, of {sorted(MODELS)}")
    ap.add_argument("--config", help="benchmark this config instead of --models")
    ap.add_argument("--steps", type=int, default=40, help="measured steps (after --warmup)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2, help="CPU threads for the worker and the bare loop")
    ap.add_argument("--repeat", type=int, default=1,
                    help="measure each model's four runs this many times; rates and ratios are medians over them")
    ap.add_argument("--out", default="bench-out/bench_train.json")
    ap.add_argument("--in-process", action="store_true",
                    help="run the training loop in this process, not in a Ray Train worker: separates the loop's own "
                         "per-step cost from the worker process around it")
    ap.add_argument("--full", action="store_true", help="drop the config's lora section: train every weight")
    ap.add_argument("overrides", nargs="*", help="section.key=value config overrides (every model)")
    args = ap.parse_args()

    models = {args.config: (args.config, [])} if args.config else {m: MODELS[m] for m in args.models.split(",")}
    if "small" in models and not Path("data/chars/train/index.json").exists():
        subprocess.run([sys.executable, str(Path(__file__).with_name("make_char_shards.py"))], check=True)
    results = [bench_model(args, name, *spec) for name, spec in models.items()]
    peak = measured_cpu_peak(args.threads)

    print(f"\n{'':16}{'':28}{'units/s':>12}{'MFU':>8}{'vs bare':>9}{'vs plain':>10}"
          + (f"   (medians of {args.repeat} pairs)" if args.repeat > 1 else ""))
    for r in results:
        for label, key, ratio, vs_plain in (
                ("pretrain train", "pretrain_per_s", "ratio", "vs_plain"),
                ("pretrain train compiled", "pretrain_compiled_per_s", "ratio_compiled", "compiled_vs_plain"),
                ("bare loop (our model)", "bare_per_s", None, "bare_vs_plain"),
                ("bare loop compiled", "bare_compiled_per_s", None, None),
                ("plain PyTorch GPT, eager", "plain_per_s", None, None)):
            if key not in r:
                continue
            vs = f"{r[ratio]:>9.3f}" if ratio else f"{'':9}"
            vp = f"{r[vs_plain]:>10.3f}" if vs_plain in r else ""
            print(f"{r['model']:16}{label:28}{r[key]:>12,.1f}{100 * r[key] * r['flops_per_unit'] / peak:>7.1f}%{vs}{vp}")
        print(f"{'':16}compiled / eager: pretrain {r['compile_speedup']:.3f}, bare {r['bare_compile_speedup']:.3f}; "
              f"time to first step {r['time_to_first_step_s']:.1f}s eager, {r['time_to_first_step_compiled_s']:.1f}s compiled")
    print(f"peak {peak / 1e9:.0f} GFLOP/s with {args.threads} threads ({results[0]['unit']}/s)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    out = {"threads": args.threads, "in_process": args.in_process, "peak_flops": peak, "models": results}
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
