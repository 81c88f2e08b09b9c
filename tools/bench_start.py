"""Benchmark: where the seconds before the first step go, for `pretrain train` as a user runs it.

Runs `pretrain train CONFIG [key=value...]` (default: the demo's config for two steps) `--runs` times in
a row and prints each run's phases from its `start.json` (pretrain/train/startup.py: driver marks, then
rank 0's), beginning with the interpreter's own start and the CLI's imports, which happen before the
command's clock starts. The first run after set-up pays Ray's and inductor's first-time costs; later
runs are "warm". On a loaded machine the seconds are inflated; the shares still show what dominates.

    .venv/bin/python tools/bench_start.py [--config configs/gpt-tiny.yaml] [--runs 2] [key=value...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def one_run(config: str, overrides: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [str(Path(sys.executable).with_name("pretrain")), "train", config, "train.steps=2", f"run.dir={tmp}",
               "run.name=start", "checkpoint.every=0", "objective.sample_tokens=0", *overrides]
        t = time.time()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "WANDB_MODE": "offline"})
        start = json.loads((Path(tmp) / "start" / "start.json").read_text())
        summary = json.loads((Path(tmp) / "start" / "summary.json").read_text())
    phases = [{"phase": "python + CLI imports", "s": round(start["started_at"] - t, 3)}, *start["phases"]]
    return {"phases": phases, "total_s": round(start["started_at"] - t + start["total_s"], 3),
            "time_to_first_step_s": summary.get("time_to_first_step_s")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/gpt-tiny.yaml")
    ap.add_argument("--runs", type=int, default=2, help="runs in a row (the first may be cold)")
    ap.add_argument("--out", default="bench-out/bench_start.json")
    ap.add_argument("overrides", nargs="*", help="section.key=value config overrides")
    args = ap.parse_args()
    runs = [one_run(args.config, args.overrides) for _ in range(args.runs)]
    names = [p["phase"] for p in runs[0]["phases"]]
    print(f"\n{'phase':28}" + "".join(f"{'run ' + str(i + 1):>10}" for i in range(len(runs))))
    for k, name in enumerate(names):
        print(f"{name:28}" + "".join(f"{r['phases'][k]['s']:>9.1f}s" for r in runs))
    print(f"{'command to first step':28}" + "".join(f"{r['total_s']:>9.1f}s" for r in runs))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"config": args.config, "overrides": args.overrides, "runs": runs}, indent=2) + "\n")


if __name__ == "__main__":
    main()
