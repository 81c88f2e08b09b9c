"""Benchmark: what background work on the same cores costs a training step (why a Ray Train worker runs slower
than the same loop alone on a machine with few cores).

The bare step of `tools/bench_engine_ab.py` (one model, pre-loaded batches) runs in rounds that alternate between
a quiet machine and one with a background load, so a machine whose speed drifts cancels out:
- `--duty D`: a process that burns CPU in 2 ms bursts, D of one core on average;
- `--actors N`: N idle Ray actors on the embedded Ray the trainer starts (`pretrain.launch.local._init_ray`);
  each one's main thread wakes every 10 ms.
A compute thread descheduled for a moment stalls its peer at the next barrier, so the step slows by more than
the load's share of the machine. The table gives median step times and the slowdown of each load.

    .venv/bin/python tools/bench_background.py [--model gpt-tiny] [--compile] [--duty 0.03,0.1] [--actors 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_engine_ab import steps_of  # noqa: E402 - the same bare step
from bench_train import MODELS  # noqa: E402
from train_solo import one_rank_group  # noqa: E402

BURNER = """
import sys, time
burst = 0.002
period = burst / float(sys.argv[1])
while True:
    t = time.perf_counter()
    while time.perf_counter() - t < burst:
        pass
    time.sleep(period - burst)
"""


def burner(duty: float):
    """Start and stop a process that keeps `duty` of one core busy."""
    proc = None

    def start():
        nonlocal proc
        proc = subprocess.Popen([sys.executable, "-c", BURNER, str(duty)])

    def stop():
        proc.kill()
        proc.wait()

    return start, stop


def idle_actors(n: int):
    """Start and stop `n` idle actors on the embedded Ray."""
    import ray

    from pretrain.launch.local import _init_ray
    from pretrain.load import load_config

    _init_ray(load_config(Path(__file__).parents[1] / "configs/gpt-tiny.yaml", ["cluster.workers=1"]))

    @ray.remote(num_cpus=0)
    class Idle:
        def pid(self) -> int:
            return os.getpid()

    actors = []

    def start():
        actors.extend(Idle.remote() for _ in range(n))
        ray.get([a.pid.remote() for a in actors])

    def stop():
        for a in actors:
            ray.kill(a)
        actors.clear()

    return start, stop


def slowdown(step, start, stop, rounds: int, steps: int) -> tuple[float, float]:
    """Median step seconds (quiet, loaded) over `rounds` alternating rounds of `steps` steps each."""
    times: dict[bool, list[float]] = {False: [], True: []}
    for r in range(rounds):
        for loaded in ((False, True) if r % 2 == 0 else (True, False)):
            if loaded:
                start()
            time.sleep(0.5)  # let the load settle
            for i in range(steps):
                t0 = time.perf_counter()
                step(i)
                times[loaded].append(time.perf_counter() - t0)
            if loaded:
                stop()
    return statistics.median(times[False]), statistics.median(times[True])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gpt-tiny", choices=sorted(MODELS))
    ap.add_argument("--compile", action="store_true", help="the compiled step (module and optimizer step)")
    ap.add_argument("--duty", default="0.03,0.1", help="comma-separated shares of one core for the burner; '' for none")
    ap.add_argument("--actors", type=int, default=3, help="idle Ray actors (0: leave this load out)")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5, help="steps per round")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench-out/bench_background.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    one_rank_group()
    step, _ = steps_of(*MODELS[args.model], args.compile, args.threads)
    for i in range(5):  # compile and warm up
        step(i)
    loads = [(f"burner {float(d):.0%} of a core", burner(float(d))) for d in args.duty.split(",") if d]
    if args.actors:
        loads.append((f"{args.actors} idle Ray actors", idle_actors(args.actors)))
    rows = []
    print(f"{'load':28}{'quiet':>12}{'loaded':>12}{'slowdown':>9}   ({args.model}, {'compiled' if args.compile else 'eager'})")
    for label, (start, stop) in loads:
        quiet, loaded = slowdown(step, start, stop, args.rounds, args.steps)
        rows.append({"load": label, "quiet_step_s": quiet, "loaded_step_s": loaded, "slowdown": loaded / quiet})
        print(f"{label:28}{1e3 * quiet:>9.1f} ms{1e3 * loaded:>9.1f} ms{loaded / quiet:>8.3f}x", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"model": args.model, "compiled": args.compile, "threads": args.threads,
                                          "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
