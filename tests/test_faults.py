"""Runs that survive failures: a SIGKILLed worker process, a lost node replaced, a lost node not replaced
(elastic: the run continues on fewer workers at the same global batch). Real Ray clusters throughout:
the embedded local one, and several nodes on this machine through `ray.cluster_utils.Cluster`.
"""

from __future__ import annotations

import json
import os
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
def test_lost_node(tmp_path, tiny_shards, reference, replace):
    import ray
    from ray.cluster_utils import Cluster

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
