"""Inductor's compile modes on the CPU, A/B: the bare compiled loop of tools/bench_train.py (our model and its
optimizer step compiled as `train.compile=true` compiles them) under `default` and under another mode (by
default `max-autotune-no-cudagraphs`: inductor benchmarks its C++ GEMM templates against ATen's matmuls and keeps
the faster), back to back in alternating order, beside the plain PyTorch GPT of tools/plain_gpt.py (eager).
Prints each pair and the medians; writes JSON.

    .venv/bin/python tools/bench_compile_modes.py [--models small,gpt-tiny] [--repeat 3] [--mode max-autotune-no-cudagraphs]

The result decides `compile_engine`'s mode (pretrain/train/engine.py); see docs/benchmarks.md, issue 28.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_train as bt  # noqa: E402 - the same models, batches and loops

from pretrain.hub.sources import resolve  # noqa: E402
from pretrain.load import load_config  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="small,gpt-tiny", help=f"comma-separated, of {', '.join(bt.MODELS)}")
    ap.add_argument("--mode", default="max-autotune-no-cudagraphs", help="the mode set against inductor's default")
    ap.add_argument("--repeat", type=int, default=3, help="back-to-back pairs per model (order alternating)")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench-out/bench_compile_modes.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    result = {}
    for name in args.models.split(","):
        config, overrides = bt.MODELS[name]
        cfg = resolve(load_config(config, [*overrides, "train.precision=fp32", "cluster.workers=1", "zero.stage=0"]))
        runs = {"default": [], args.mode: [], "plain": []}
        for pair in range(args.repeat):
            for mode in (["default", args.mode] if pair % 2 == 0 else [args.mode, "default"]):
                rates = bt.bare_loop(cfg, args.steps, args.warmup, compiled=True, mode=mode)
                runs[mode].append(statistics.median(rates))
                print(f"{name} pair {pair + 1}: {mode} {runs[mode][-1]:,.0f}/s", flush=True)
            runs["plain"].append(statistics.median(bt.plain_loop(cfg, args.steps, args.warmup)))
            print(f"{name} pair {pair + 1}: plain eager {runs['plain'][-1]:,.0f}/s", flush=True)
        med = {k: statistics.median(v) for k, v in runs.items()}
        result[name] = {"median_per_s": med, "runs_per_s": runs, f"{args.mode} / default": med[args.mode] / med["default"],
                        "default / plain": med["default"] / med["plain"], f"{args.mode} / plain": med[args.mode] / med["plain"]}
        print(f"{name}: {args.mode} / default {med[args.mode] / med['default']:.3f}; against plain eager: default "
              f"{med['default'] / med['plain']:.3f}, {args.mode} {med[args.mode] / med['plain']:.3f}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
