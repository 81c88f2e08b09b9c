"""Benchmark: how long a hang costs. A 2-worker gpt-tiny run (the demo's data and model) has rank 1 SIGSTOPped
at a step and never continued; the watcher (pretrain/launch/watch.py) declares the hang, dumps every rank's
stacks and kills the group, Ray Train starts a new one, which resumes from the newest checkpoint. Per
`cluster.hang_timeout_s` setting (`auto`: 10 x the median step, at least 120 s), the table gives:

- detection: the stop to the hang's declaration (the limit, plus up to a heartbeat and a poll);
- dump and kill: the declaration to the `hang:` line (stacks of every rank through Ray tasks on their nodes);
- restart: the declaration to the new group's first step;
- the run's goodput and its split (summary.json).

Needs the demo's data (`make demo` writes data/shakespeare-bpe).

    .venv/bin/python tools/bench_hang.py [--timeouts auto,10] [--stop-at 30] [--steps 40]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def one(timeout: str, stop_at: int, steps: int, tmp: Path) -> dict:
    import ray

    from pretrain.launch.local import launch
    from pretrain.load import load_config

    marker = tmp / f"signalled-{timeout}"
    os.environ["PRETRAIN_TEST_SIGNAL"] = f"1:{stop_at}:SIGSTOP"
    os.environ["PRETRAIN_TEST_SIGNAL_MARKER"] = str(marker)
    name = f"hang-{timeout}"
    cfg = load_config(ROOT / "configs/gpt-tiny.yaml", [
        f"run.dir={tmp}", f"run.name={name}", f"train.steps={steps}", "checkpoint.every=10", "eval.every=0",
        "objective.sample_tokens=0", "log.wandb=false", "cluster.max_failures=1",
        *([] if timeout == "auto" else [f"cluster.hang_timeout_s={timeout}"]),
    ])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        t0 = time.time()
        launch(cfg, started_at=t0, quiet=True)
    finally:
        ray.shutdown()
    run = tmp / name
    hang = json.loads((run / "hangs" / "1" / "hang.json").read_text())
    rows = [json.loads(ln) for ln in (run / "timeline.jsonl").read_text().splitlines() if ln.strip()]
    restart = [r for r in rows if "attempt" in r][-1]["first"]
    stopped = marker.stat().st_mtime
    g = json.loads((run / "summary.json").read_text())["goodput"]
    return {"timeout": timeout, "limit_s": hang["limit_s"], "detection_s": round(hang["quiet_s"], 2),
            "stop_to_line_s": round(hang["t"] - stopped, 2), "declared_to_first_step_s": round(restart - hang["t"], 2),
            "goodput": g}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--timeouts", default="auto,10", help="cluster.hang_timeout_s values (auto: the default)")
    ap.add_argument("--stop-at", type=int, default=30, help="the step rank 1 is stopped at")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--out", default="bench-out/bench_hang.json")
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for t in a.timeouts.split(","):
            print(f"hang_timeout_s={t}: rank 1 stopped at step {a.stop_at} ...", flush=True)
            rows.append(one(t, a.stop_at, a.steps, Path(d)))
    print(f"\n{'hang_timeout_s':>14} {'limit':>7} {'no progress':>12} {'stop->line':>11} {'line->step':>11} {'goodput':>8}")
    for r in rows:
        print(f"{r['timeout']:>14} {r['limit_s']:>6.0f}s {r['detection_s']:>11.1f}s {r['stop_to_line_s']:>10.1f}s "
              f"{r['declared_to_first_step_s']:>10.1f}s {r['goodput']['goodput']:>8.1%}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(rows, indent=2) + "\n")
    print(f"\nwrote {a.out}")


if __name__ == "__main__":
    main()
