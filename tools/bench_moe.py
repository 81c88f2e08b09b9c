"""Benchmark: the mixture-of-experts demo (configs/moe-tiny.yaml) against gpt-tiny at equal active FLOPs per token and
equal tokens, its step time against a dense model of the same active parameters, and the routers' balance with the
balance loss on and off (issue 26).

Runs `pretrain train` for each (the demo's data: `make demo` writes it), reads summary.json and metrics.jsonl, prints
a table and writes JSON:

- `val_bpb`: gpt-tiny and moe-tiny, the full demo length (or --steps);
- step time: moe-tiny against `dense-active`, moe-tiny's shape with one SwiGLU MLP of width k x d_expert (the
  active parameters of the mixture, without routing), same steps; the median step time after 10 warm-up steps;
- balance: moe-tiny for --balance-steps (200) with `model.moe.aux_loss` as configured and with 0; the mean over the
  last 20 logged steps of `moe_max_load` (the worst layer's max/mean expert load; 1.0 is perfectly balanced).

    .venv/bin/python tools/bench_moe.py [--steps 1200] [--balance-steps 200] [--out tools/results/bench_moe.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(config: str, name: str, overrides: list[str], runs: Path) -> tuple[dict, list[dict]]:
    """One `pretrain train`; its summary and its metrics rows."""
    cmd = [sys.executable, "-m", "pretrain.cli", "train", str(ROOT / config), f"run.name={name}", f"run.dir={runs}",
           "log.wandb=false", "checkpoint.every=0", *overrides]
    print("+", " ".join(cmd[3:]), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    rdir = runs / name
    rows = [json.loads(ln) for ln in (rdir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return json.loads((rdir / "summary.json").read_text()), rows


def median_step(rows: list[dict], warmup: int = 10) -> float:
    times = [r["step_time_s"] for r in rows if "step_time_s" in r and r["step"] > warmup]
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=None, help="steps of the val_bpb runs (default: the configs' own)")
    ap.add_argument("--balance-steps", type=int, default=200, help="steps of the balance runs (aux loss on and off)")
    ap.add_argument("--time-steps", type=int, default=60, help="steps of the step-time runs")
    ap.add_argument("--out", type=Path, default=ROOT / "tools/results/bench_moe.json")
    args = ap.parse_args()
    length = [f"train.steps={args.steps}"] if args.steps else []
    from pretrain.load import load_config

    moe = load_config(ROOT / "configs/moe-tiny.yaml").model.moe
    dense = ["model.type=llama", "model.moe=null", f"model.d_ff={moe.top_k * moe.d_expert}"]
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        runs = Path(tmp)
        for name, config in (("gpt-tiny", "configs/gpt-tiny.yaml"), ("moe-tiny", "configs/moe-tiny.yaml")):
            summary, rows = run(config, name, length, runs)
            out[name] = {"val_bpb": summary.get("final_val_bpb"), "val_loss": summary.get("final_val_loss"),
                         "params": summary.get("params"), "params_active": summary.get("params_active"),
                         "flops_per_token": summary.get("flops_per_token"), "tokens": summary.get("tokens")}
        timing = [f"train.steps={args.time_steps}", "eval.every=0"]
        _, moe_rows = run("configs/moe-tiny.yaml", "moe-time", timing, runs)
        _, dense_rows = run("configs/moe-tiny.yaml", "dense-time", [*timing, *dense], runs)
        out["step_time"] = {"moe_s": median_step(moe_rows), "dense_active_s": median_step(dense_rows)}
        out["step_time"]["ratio"] = out["step_time"]["moe_s"] / out["step_time"]["dense_active_s"]
        balance = {}
        for label, aux in (("aux_on", moe.aux_loss), ("aux_off", 0.0)):
            _, rows = run("configs/moe-tiny.yaml", f"balance-{label}",
                          [f"train.steps={args.balance_steps}", "train.log_every=1", "eval.every=0",
                           f"model.moe.aux_loss={aux}"], runs)
            loads = [r["moe_max_load"] for r in rows if "moe_max_load" in r][-20:]
            balance[label] = {"aux_loss": aux, "max_over_mean_load": statistics.mean(loads)}
        out["balance"] = balance
    print(f"\n{'':24}{'gpt-tiny':>12}{'moe-tiny':>12}")
    for k in ("val_bpb", "params", "params_active", "flops_per_token", "tokens"):
        a, b = out["gpt-tiny"][k], out["moe-tiny"][k]
        print(f"{k:24}{a if a is not None else float('nan'):>12.4g}{b if b is not None else float('nan'):>12.4g}")
    st = out["step_time"]
    print(f"\nstep time: moe-tiny {st['moe_s'] * 1000:.1f} ms, dense of the same active parameters "
          f"{st['dense_active_s'] * 1000:.1f} ms: x{st['ratio']:.2f}")
    for label, b in out["balance"].items():
        print(f"balance {label} (aux_loss {b['aux_loss']}): max/mean expert load {b['max_over_mean_load']:.3f} "
              f"(mean of the last 20 steps of {args.balance_steps})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
