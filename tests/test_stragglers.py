"""Stragglers found from real slowness: two Ray Train workers, each pinned to its own core, and CPU-bound
processes on one worker's core. The trainer injects nothing: the hogged rank computes slower because it gets
a fraction of its core, and the straggler hook (pretrain/train/straggle.py) must log it as the slowest rank
and name it, by rank, host and pid, within `cluster.straggler_windows` windows. An unslowed run names no one.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from pretrain.launch.local import launch
from pretrain.load import load_config
from tests.test_faults import _run_in_thread
from tests.test_train import TINY

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.ray,
              pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                                 reason="pins the two workers to two cores (Linux)")]
EVERY, WINDOWS, RATIO = 5, 3, 1.3
HOGS = 5  # the hogged worker gets ~1/(HOGS+1) of its core (at its niceness): ~6x slower, straggle ~1.7 (2 ranks: at most 2)


def _cfg(tmp_path: Path, shards: Path, name: str, steps: int):
    return load_config(ROOT / "configs/gpt-tiny.yaml", [
        *TINY, f"run.dir={tmp_path / 'runs'}", f"run.name={name}", f"train.steps={steps}", "cluster.workers=2",
        "zero.stage=2", f"data.train={shards / 'train'}", f"data.val={shards / 'val'}",
        f"cluster.straggler_every={EVERY}", f"cluster.straggler_windows={WINDOWS}", f"cluster.straggler_ratio={RATIO}",
    ])


def _rows(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.exists() else []


def _last_step(run: Path) -> int:
    return max((r["step"] for r in _rows(run) if "loss" in r), default=0)


def _train_workers() -> list[int]:
    """The Ray Train worker processes of the Ray this test process started (its descendants)."""
    pids = []
    for p in psutil.Process().children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(p.cmdline()):
                pids.append(p.pid)
        except psutil.Error:  # gone since the listing
            continue
    return pids


def _pin(pid: int, cpu: int) -> None:
    """Every thread of `pid` (torch's intra-op pool, gloo's, Ray's) to one core; threads started later inherit it."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), {cpu})
        except (ProcessLookupError, FileNotFoundError):  # a thread that ended since the listing
            continue


def _hog(cpu: int, nice: int) -> subprocess.Popen:
    """A busy loop on `cpu` at the worker's own niceness (Ray starts workers at nice 15: a hog at 0 would get ~30x
    the worker's share of the core, not an equal one)."""
    code = f"import os\nos.setpriority(os.PRIO_PROCESS, 0, {nice})\nos.sched_setaffinity(0, {{{cpu}}})\nwhile True: pass"
    return subprocess.Popen([sys.executable, "-c", code])


def _wait(predicate, thread: threading.Thread, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert thread.is_alive(), "the run ended first"
        assert time.time() < deadline, "timed out"
        time.sleep(0.1)


def test_hogged_worker_is_named(tmp_path, tiny_shards, ray_local):
    cfg = _cfg(tmp_path, tiny_shards, "hogged", steps=35)
    run = tmp_path / "runs" / "hogged"
    thread, errors = _run_in_thread(cfg)
    hogs: list[subprocess.Popen] = []
    try:
        _wait(lambda: _last_step(run) >= EVERY + 1, thread)  # past the first window (its warm-up step)
        workers = _train_workers()
        assert len(workers) == 2, workers
        fast, slow = workers
        cpus = sorted(os.sched_getaffinity(0))[:2]
        _pin(fast, cpus[0])
        _pin(slow, cpus[1])
        hogs = [_hog(cpus[1], psutil.Process(slow).nice()) for _ in range(HOGS)]
        hogged_after = _last_step(run)  # rank 0 had not finished the next step: those after it start hogged
        # Then the hogs stay until the rank is named: the steps after it run at full speed.
        _wait(lambda: any("warning" in r for r in _rows(run)), thread)
    finally:
        for h in hogs:
            h.kill()
            h.wait()
    thread.join(timeout=300)
    assert not thread.is_alive() and not errors, errors

    rows = _rows(run)
    summary = json.loads((run / "summary.json").read_text())
    named = summary["stragglers"]
    assert len(named) == 1 and named[0]["pid"] == slow and named[0]["host"] == socket.gethostname(), (named, slow)
    rank = named[0]["rank"]
    windows = [r for r in rows if "straggle" in r]
    assert any(r["straggle"] >= RATIO and r["slowest_rank"] == rank for r in windows), windows
    (warning,) = [r for r in rows if "warning" in r]
    assert warning["stragglers"] == named and f"rank {rank} (pid {slow} " in warning["warning"]
    # Within WINDOWS windows of the hogs: the first window they fill begins at the boundary after `hogged_after`.
    first_full = math.ceil((hogged_after + 1) / EVERY) * EVERY
    assert hogged_after < warning["step"] <= first_full + WINDOWS * EVERY, (hogged_after, warning["step"], windows)


def test_unslowed_run_names_no_one(tmp_path, tiny_shards, ray_local):
    launch(_cfg(tmp_path, tiny_shards, "even", steps=4 * EVERY), started_at=time.time(), quiet=True)
    run = tmp_path / "runs" / "even"
    rows = _rows(run)
    assert [r["step"] for r in rows if "straggle" in r] == list(range(EVERY, 4 * EVERY + 1, EVERY))
    assert not [r for r in rows if "warning" in r]
    assert json.loads((run / "summary.json").read_text())["stragglers"] == []
