"""Runs that survive failures: a SIGKILLed worker process, a lost node replaced, a lost node not replaced
(elastic: the run continues on fewer workers at the same global batch). Real Ray clusters throughout:
the embedded local one, and several nodes on this machine through `ray.cluster_utils.Cluster`.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest

from pretrain.launch.local import launch
from pretrain.load import load_config
from tests.test_train import TINY

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.ray]
STEPS = 20


def _cfg(tmp_path: Path, shards: Path, name: str, *extra: str):
    return load_config(ROOT / "configs/gpt-tiny.yaml", [
        *TINY, f"run.dir={tmp_path / 'runs'}", f"run.name={name}", f"train.steps={STEPS}", "checkpoint.every=4",
        f"data.train={shards / 'train'}", f"data.val={shards / 'val'}", "cluster.workers=2", "zero.stage=2", *extra,
    ])


def _losses(run: Path) -> list[tuple[int, float]]:
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def _wait_for_step(run: Path, step: int, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (run / "metrics.jsonl").exists() and any(s >= step for s, _ in _losses(run)):
            return
        time.sleep(0.2)
    raise TimeoutError(f"step {step} not reached")


def _train_worker_pids() -> list[int]:
    """Live Ray Train workers of the Ray this test process started (its descendants), so that no other
    run on the machine is touched."""
    pids = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.is_running() and "RayTrainWorker" in " ".join(p.cmdline()):
                pids.append(p.pid)
        except psutil.Error:  # gone (or a zombie) since the listing
            continue
    return pids


def workers_seen_while(thread: threading.Thread) -> set[int]:
    """Every Ray Train worker process seen while `thread` runs: a restart of the group brings new ones."""
    seen: set[int] = set()
    while thread.is_alive():
        seen.update(_train_worker_pids())
        time.sleep(0.1)
    return seen


def _run_in_thread(cfg) -> tuple[threading.Thread, list]:
    errors: list = []

    def target():
        try:
            launch(cfg, started_at=time.time(), quiet=True)
        except BaseException as e:  # noqa: BLE001 - reported by the test
            errors.append(e)

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t, errors


def _check(run: Path, reference: list[tuple[int, float]]) -> None:
    got = _losses(run)
    assert [s for s, _ in got] == list(range(1, STEPS + 1)), "each step exactly once"
    assert got[-1][1] == pytest.approx(reference[-1][1], rel=1e-4)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_shards):
    """An uninterrupted 2-worker run (its own embedded Ray)."""
    import ray

    tmp = tmp_path_factory.mktemp("ref")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        launch(_cfg(tmp, tiny_shards, "ref"), started_at=time.time(), quiet=True)
    finally:
        ray.shutdown()
    return _losses(tmp / "runs" / "ref")


@pytest.mark.parametrize("kill_at,ckpt_every", [(2, 12), (8, 4)], ids=["before-first-checkpoint", "after-checkpoint"])
def test_sigkilled_worker_process_restarts_and_resumes(tmp_path, tiny_shards, reference, kill_at, ckpt_every):
    """Before the first checkpoint the group starts over and metrics.jsonl is emptied; after one it resumes
    and is cut back to it. Either way each step is logged once and the run ends as an uninterrupted one."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        cfg = _cfg(tmp_path, tiny_shards, "killed", "cluster.max_failures=2", f"checkpoint.every={ckpt_every}")
        thread, errors = _run_in_thread(cfg)
        run = tmp_path / "runs" / "killed"
        _wait_for_step(run, kill_at)
        assert (_losses(run)[-1][0] < ckpt_every) == (kill_at < ckpt_every), "killed on the intended side"
        pids = _train_worker_pids()
        assert len(pids) == 2
        os.kill(pids[-1], signal.SIGKILL)
        thread.join(timeout=600)
        assert not thread.is_alive() and not errors, errors
    finally:
        ray.shutdown()
    _check(run, reference)


@pytest.mark.parametrize("replace", [True, False], ids=["node-replaced", "elastic-1-worker"])
def test_lost_node(tmp_path, tiny_shards, reference, replace, monkeypatch):
    import ray
    from ray.cluster_utils import Cluster

    if not replace:
        # Ray Train first tries the whole group again and gives the dead node's place up only when that start times
        # out (60 s by default, most of this test's time); the cluster's processes inherit the shorter limit.
        monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "20")
    # A head without CPUs (the driver and Ray Train's controller) and two 1-CPU worker nodes: one worker each.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False, logging_level="ERROR")
    try:
        extra = ["cluster.max_failures=2"] + ([] if replace else ["cluster.min_workers=1"])
        cfg = _cfg(tmp_path, tiny_shards, "node", *extra)
        thread, errors = _run_in_thread(cfg)
        run = tmp_path / "runs" / "node"
        _wait_for_step(run, 8)
        cluster.remove_node(nodes[1], allow_graceful=False)
        if replace:
            cluster.add_node(num_cpus=1)
        thread.join(timeout=900)
        assert not thread.is_alive() and not errors, errors
    finally:
        ray.shutdown()
        cluster.shutdown()
    _check(run, reference)
    if not replace:  # the tail of the run was trained by one worker
        meta = json.loads((run / "checkpoints" / "step-20" / "meta.json").read_text())
        assert meta["world_size"] == 1


def test_data_error_in_a_worker_ends_the_run_once(tmp_path, tiny_shards):
    """A shard whose bytes no longer match its sha256 passes the driver's manifest checks and fails on the
    rank that reads it: the run ends with that line after one attempt (max_failures=2 left unused)."""
    import shutil

    import ray

    from pretrain.errors import RunError

    shards = tmp_path / "shards"
    shutil.copytree(tiny_shards, shards)
    shard = sorted((shards / "train").glob("*.tar"))[0]
    raw = bytearray(shard.read_bytes())
    raw[520] ^= 0xFF  # inside the first sample's tokens: still a valid tar
    shard.write_bytes(bytes(raw))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        cfg = _cfg(tmp_path, shards, "bad", "cluster.max_failures=2")
        thread, errors = _run_in_thread(cfg)
        seen = workers_seen_while(thread)
    finally:
        ray.shutdown()
    assert len(errors) == 1 and isinstance(errors[0], RunError), errors
    assert shard.name in str(errors[0]) and "sha256" in str(errors[0]) and "\n" not in str(errors[0])
    assert len(seen) <= 2, f"restarted: {len(seen)} worker processes"


def _signalled(monkeypatch, tmp_path: Path, rank: int, step: int, name: str) -> Path:
    """A real signal the rank sends itself at the step, once per test (pretrain.train.pulse.inject_signal);
    set before Ray starts: its workers inherit the environment."""
    marker = tmp_path / "signalled"
    monkeypatch.setenv("PRETRAIN_TEST_SIGNAL", f"{rank}:{step}:{name}")
    monkeypatch.setenv("PRETRAIN_TEST_SIGNAL_MARKER", str(marker))
    return marker


def _timeline(run: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run / "timeline.jsonl").read_text().splitlines() if ln.strip()]


@pytest.mark.parametrize("stop_at", [6, 0], ids=["during-training", "before-first-step"])
def test_hung_worker_is_named_dumped_and_restarted(tmp_path, tiny_shards, reference, monkeypatch, capsys, stop_at):
    """Rank 1 is SIGSTOPped (never continued) at a step, or before its first: the watcher declares the hang
    within its limit + 10 s, writes every rank's stacks (rank 1's holds the frame it stopped in), names
    rank 1 and its host in one line, and the restarted group finishes as an uninterrupted run; the
    goodput parts add up to the wall time, with the recomputed steps as lost work."""
    import socket

    import ray

    marker = _signalled(monkeypatch, tmp_path, 1, stop_at, "SIGSTOP")
    limit = 8 if stop_at else 20  # hang_timeout_s in training; startup_timeout_s before the first step
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        cfg = _cfg(tmp_path, tiny_shards, "hung", "cluster.max_failures=1", "cluster.hang_timeout_s=8",
                   "cluster.startup_timeout_s=20")
        thread, errors = _run_in_thread(cfg)
        thread.join(timeout=600)
        assert not thread.is_alive() and not errors, errors
    finally:
        ray.shutdown()
    run = tmp_path / "runs" / "hung"
    _check(run, reference)
    hang = json.loads((run / "hangs" / "1" / "hang.json").read_text())
    assert hang["stuck"] == [1] and hang["limit_s"] == limit
    assert hang["t"] - marker.stat().st_mtime <= limit + 10, "declared within the limit + 10 s"
    stacks = (run / "hangs" / "1" / "rank-1.txt").read_text()
    head = stacks.splitlines()[0]  # the step and phase of its last heartbeat: up to a second (~5 steps) old
    assert stop_at - 6 <= int(re.search(r"step (\d+) ", head)[1]) <= stop_at and "phase " in head, head
    assert "train (pretrain/train/loop.py" in stacks or "in train\n" in stacks, stacks[:3000]  # where it stopped
    assert (run / "hangs" / "1" / "rank-0.txt").is_file() and not (run / "hangs" / ".live").exists()
    err = capsys.readouterr().err
    line = next(ln for ln in err.splitlines() if ln.startswith("hang:"))
    assert f"rank 1 on {socket.gethostname()}" in line and "\n" not in hang["line"]

    g = json.loads((run / "summary.json").read_text())["goodput"]
    assert g["attempts"] == 2 and abs(g["unaccounted_s"]) <= 0.02 * g["wall_s"], g
    seen: dict[int, float] = {}
    lost = 0.0
    for row in (r for r in _timeline(run) if "step" in r):
        lost += seen.get(row["step"], 0.0)
        seen[row["step"]] = row["dt"]
    assert g["lost_s"] == pytest.approx(lost, abs=2e-3) and (lost > 0) == (stop_at > 4)  # step 5 again
    assert g["recovery_s"] >= limit * 0.9


def test_sigterm_to_a_worker_checkpoints_and_resumes(tmp_path, tiny_shards, reference, monkeypatch):
    """SIGTERM to rank 1 at step 7, with checkpoints every 50 steps: a complete checkpoint at step 7, a new
    worker group resumes at step 8, and each step appears once."""
    import ray

    _signalled(monkeypatch, tmp_path, 1, 7, "SIGTERM")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        cfg = _cfg(tmp_path, tiny_shards, "term", "checkpoint.every=50")
        assert launch(cfg, started_at=time.time(), quiet=True) is None  # finished: not stopped by the driver
    finally:
        ray.shutdown()
    run = tmp_path / "runs" / "term"
    _check(run, reference)
    assert (run / "checkpoints" / "step-7" / "COMPLETE").is_file()
    attempts = [r for r in _timeline(run) if "attempt" in r]
    assert [a["from"] for a in attempts] == [0, 7]
    assert not (run / "hangs").exists()  # no hang: the ranks' faulthandler files are gone with the run


def test_sigterm_to_the_driver_checkpoints_and_the_same_command_resumes(tmp_path, tiny_shards):
    """`pretrain train` gets SIGTERM mid-run: exit 143 with a complete checkpoint at the step it stopped
    at; the same command then resumes at the next step, and each step appears once."""
    import subprocess
    import sys

    run = tmp_path / "runs" / "drv"
    args = [sys.executable, "-m", "pretrain.cli", "train", "-q", str(ROOT / "configs/gpt-tiny.yaml"), *TINY,
            f"run.dir={tmp_path / 'runs'}", "run.name=drv", f"train.steps={STEPS}", "checkpoint.every=50",
            f"data.train={tiny_shards / 'train'}", f"data.val={tiny_shards / 'val'}", "cluster.workers=2"]
    env = {**os.environ, "WANDB_MODE": "offline"}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    _wait_for_step(run, 5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 143, err[-3000:]
    k = json.loads((run / "preempted.json").read_text())["step"]
    assert 5 <= k < STEPS and (run / "checkpoints" / f"step-{k}" / "COMPLETE").is_file()
    assert f"checkpoint at step {k}" in err.splitlines()[-1]
    assert [s for s, _ in _losses(run)] == list(range(1, k + 1))

    done = subprocess.run(args, env=env, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [s for s, _ in _losses(run)] == list(range(1, STEPS + 1))
    assert [a["from"] for a in _timeline(run) if "attempt" in a] == [k]
    assert "goodput" in done.stdout and not (run / "preempted.json").exists()
