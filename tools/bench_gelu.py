"""Benchmark: the tanh GELU as ATen's op and in the sigmoid form `pretrain.models.layers.gelu_tanh` uses
under `torch.compile`, eager and compiled, forward plus backward, on GPT-2 MLP activations (tokens x 4 d_model).

The two forms are one function: 0.5 x (1 + tanh(u)) = x sigmoid(2u). Inductor's CPU code computes the first
with a vectorised tanh and the second with an exp, which costs less. Rounds interleave the four variants, so
a machine whose speed drifts cancels out; the table gives median milliseconds and the compiled speed-ups.

    .venv/bin/python tools/bench_gelu.py [--shapes 768x512,2048x512] [--rounds 50] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from pretrain.models.layers import gelu_tanh_as_sigmoid


def aten_gelu(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def run(f, x: torch.Tensor, dy: torch.Tensor) -> float:
    """Seconds for one forward and backward of `f` at `x`."""
    t0 = time.perf_counter()
    f(x).backward(dy)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="768x512,2048x512", help="tokens x hidden, comma-separated")
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench-out/bench_gelu.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    fns = {"aten eager": aten_gelu, "sigmoid eager": gelu_tanh_as_sigmoid,
           "aten compiled": torch.compile(aten_gelu), "sigmoid compiled": torch.compile(gelu_tanh_as_sigmoid)}
    rows = []
    for shape in args.shapes.split(","):
        x = torch.randn(*map(int, shape.split("x"))).requires_grad_()
        dy = torch.randn_like(x)

        for f in fns.values():  # compile and warm up
            for _ in range(3):
                run(f, x, dy)
        times: dict[str, list[float]] = {k: [] for k in fns}
        for i in range(args.rounds):
            for k in (list(fns) if i % 2 == 0 else list(fns)[::-1]):
                times[k].append(run(fns[k], x, dy))
        row = {"shape": shape, **{k: 1e3 * statistics.median(v) for k, v in times.items()}}
        row["sigmoid_over_aten_compiled"] = row["aten compiled"] / row["sigmoid compiled"]
        rows.append(row)
    print(f"{'shape':>10}" + "".join(f"{k:>18}" for k in fns) + f"{'compiled speed-up':>19}   (ms, forward + backward)")
    for r in rows:
        print(f"{r['shape']:>10}" + "".join(f"{r[k]:>18.3f}" for k in fns) + f"{r['sigmoid_over_aten_compiled']:>18.2f}x")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"threads": args.threads, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
