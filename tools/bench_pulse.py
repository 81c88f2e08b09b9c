"""Benchmark: what a rank's pulse costs a training step: heartbeats and straggler measurement, on and off.

One process, one rank (a gloo group of one), the loop's own step (`pretrain.train.step`: `next_batches`
and `forward_backward` on a run from `build_run`) on configs/gpt-tiny.yaml. Blocks of `--block-steps`
steps alternate, ABAB... (each pair's order flipped the next time, so a drifting machine biases neither):

- off: compute timing off (`PULSE.timing`), no heartbeat thread, no straggler hook;
- on: compute timing on, heartbeats (`start_heartbeats`) sent once a second as UDP to a socket the benchmark
  opened and never reads (the kernel drops what overflows, as a busy watcher's would), and the straggler hook
  (`Stragglers`: its all-gather of the ranks' compute times) every `--every` steps of the on blocks.

The table gives each arm's median and mean step time and the difference in %, with a 95% bootstrap interval
(steps resampled within each arm); the mean carries the every-N hook, the median hides it. Beside them, two
direct figures: one straggler-hook call and one heartbeat (its message and sendto), each as a share of what
it is amortised over (`--every` steps, one second). With one rank the all-gather is a copy; on a real group
it is one small collective per window, taken right after the step's own collectives (no new wait).

    .venv/bin/python tools/bench_pulse.py [--blocks 20] [--block-steps 5] [--every 50] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from train_solo import one_rank_group  # noqa: E402 - the same 1-rank group

from pretrain.load import load_config  # noqa: E402
from pretrain.train.pulse import PULSE, start_heartbeats  # noqa: E402
from pretrain.train.run import build_run  # noqa: E402
from pretrain.train.startup import Marks  # noqa: E402
from pretrain.train.step import forward_backward, next_batches  # noqa: E402
from pretrain.train.straggle import Stragglers  # noqa: E402


def _bootstrap(a: list[float], b: list[float], n: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% interval of (median b / median a - 1) in %, each arm's steps resampled with replacement."""
    rng = random.Random(seed)
    diffs = sorted(100 * (statistics.median(rng.choices(b, k=len(b))) / statistics.median(rng.choices(a, k=len(a))) - 1)
                   for _ in range(n))
    return diffs[int(0.025 * n)], diffs[int(0.975 * n)]


def _beat_cost_s(port: int, n: int = 2000) -> float:
    """One heartbeat's work on the sending side: the message (with the median step time) and its sendto."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    ident = {"t": "x" * 32, "r": 0, "pid": 1, "host": socket.gethostname(), "node": None, "g": "127.0.0.1:1:"}
    t0 = time.perf_counter()
    for _ in range(n):
        msg = {**ident, "s": PULSE.step, "p": PULSE.phase, "q": PULSE.seq, "m": PULSE.median_step_s()}
        sock.sendto(json.dumps(msg).encode(), ("127.0.0.1", port))
    sock.close()
    return (time.perf_counter() - t0) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/gpt-tiny.yaml")
    ap.add_argument("--blocks", type=int, default=20, help="measured blocks of each arm")
    ap.add_argument("--block-steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=10, help="steps of each arm before measuring")
    ap.add_argument("--every", type=int, default=50, help="steps per straggler window (cluster.straggler_every)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench-out/bench_pulse.json")
    args = ap.parse_args()
    one_rank_group()
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # the watcher's socket, never read
    sink.bind(("127.0.0.1", 0))
    address = f"127.0.0.1:{sink.getsockname()[1]}"
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(args.config, ["cluster.workers=1", "log.wandb=false", "eval.every=0", "checkpoint.every=0",
                                        f"cluster.cpus_per_worker={args.threads}", f"run.dir={tmp}", "run.name=bench"])
        r = build_run(cfg, Marks([("command", time.time())]))
        straggle = Stragglers(cfg.cluster.straggler_ratio, cfg.cluster.straggler_windows, r.world)
        times: dict[str, list[float]] = {"off": [], "on": []}
        hook_s: list[float] = []
        step, on_steps = 0, 0

        def block(arm: str, n: int, record: bool) -> None:
            nonlocal step, on_steps
            stop = threading.Event()
            PULSE.timing = arm == "on"
            if arm == "on":
                start_heartbeats(address, "bench", 0, "0", stop=stop)
            for _ in range(n):
                step += 1
                t0 = time.perf_counter()
                PULSE.at("data", step)
                micro, count = next_batches(r, None)
                forward_backward(r, micro, count, step)
                if arm == "on":
                    on_steps += 1
                    if on_steps % args.every == 0:
                        t1 = time.perf_counter()
                        straggle(r.view(step, 0, {}))
                        hook_s.append(time.perf_counter() - t1)
                dt = time.perf_counter() - t0
                if record:
                    times[arm].append(dt)
            stop.set()  # the thread ends at its next wake-up, without another beat

        for arm in ("off", "on"):  # warm-up: the first steps, and the heartbeat thread's first imports
            block(arm, args.warmup, record=False)
        for i in range(args.blocks):
            for arm in (("off", "on") if i % 2 == 0 else ("on", "off")):
                block(arm, args.block_steps, record=True)
            if (i + 1) % 10 == 0:
                print(f"{i + 1}/{args.blocks} blocks: median off {statistics.median(times['off']):.3f} s, "
                      f"on {statistics.median(times['on']):.3f} s", flush=True)
        r.sink.close()
    beat = _beat_cost_s(sink.getsockname()[1])
    med = {k: statistics.median(v) for k, v in times.items()}
    mean = {k: statistics.fmean(v) for k, v in times.items()}
    lo, hi = _bootstrap(times["off"], times["on"])
    hook = statistics.median(hook_s) if hook_s else float("nan")
    result = {
        "config": args.config, "threads": args.threads, "torch_threads": torch.get_num_threads(), "world": r.world,
        "blocks": args.blocks, "block_steps": args.block_steps, "every": args.every,
        "median_step_s": med, "mean_step_s": mean,
        "median_diff_pct": 100 * (med["on"] / med["off"] - 1), "median_diff_pct_95": [lo, hi],
        "mean_diff_pct": 100 * (mean["on"] / mean["off"] - 1),
        "hook_calls": len(hook_s), "hook_s": hook, "hook_pct_of_step": 100 * hook / args.every / med["off"],
        "beat_s": beat, "beat_pct_of_second": 100 * beat / 1.0,
    }
    print(f"\n{'':8}{'median ms':>11}{'mean ms':>10}   ({args.blocks} blocks x {args.block_steps} steps each, "
          f"{args.threads} threads)")
    for k in ("off", "on"):
        print(f"{k:8}{1e3 * med[k]:>11.2f}{1e3 * mean[k]:>10.2f}")
    print(f"{'on/off':8}{result['median_diff_pct']:>+10.2f}%{result['mean_diff_pct']:>+9.2f}%   "
          f"median's 95% interval [{lo:+.2f}%, {hi:+.2f}%]")
    print(f"straggler hook: {1e3 * hook:.3f} ms a call ({len(hook_s)} calls), every {args.every} steps: "
          f"{result['hook_pct_of_step']:.4f}% of a step")
    print(f"heartbeat: {1e6 * beat:.1f} us a beat, once a second: {result['beat_pct_of_second']:.4f}% of the time")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
