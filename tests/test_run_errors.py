"""Errors of the input end a run once: every one is a `RunError`, and one raised inside a worker of a real
2-worker Ray Train run with restarts to spare (`cluster.max_failures=3`) ends the run after one attempt with
its line; at the command line the same error is exit code 2 and one line."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pretrain import errors
from pretrain.errors import LengthError, RunError, StorageError, is_deterministic
from pretrain.load import load_config
from tests.test_faults import workers_seen_while
from tests.test_train import TINY

ROOT = Path(__file__).resolve().parents[1]


def test_every_error_of_the_input_is_a_run_error_and_nothing_else_is():
    """The taxonomy is the class tree, not a list: each error class of pretrain.errors is a RunError."""
    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, BaseException)]
    assert len(classes) >= 12 and all(issubclass(c, RunError) for c in classes)
    assert is_deterministic(StorageError("x")) and is_deterministic(LengthError("x"))
    assert not is_deterministic(RuntimeError("a lost worker")) and not is_deterministic(OSError("a store"))


def _cfg(tmp_path: Path, shards: Path, *extra: str):
    return load_config(ROOT / "configs/gpt-tiny.yaml", [
        *TINY, f"run.dir={tmp_path / 'runs'}", "run.name=bad", "train.steps=4", f"data.train={shards / 'train'}",
        f"data.val={shards / 'val'}", "cluster.workers=2", "cluster.max_failures=3", *extra])


@pytest.mark.slow
@pytest.mark.ray
def test_a_storage_error_in_a_worker_ends_the_run_once(tmp_path, tiny_shards):
    """A checkpoint location the workers cannot open (on a cluster: a worker image without that filesystem's
    library): each worker raises StorageError; the group is not restarted although 3 restarts are allowed."""
    import ray

    from pretrain.config import run_dir
    from pretrain.launch.local import ray_trainer, resolve_paths
    from pretrain.launch.worker_error import recorded_error

    cfg = resolve_paths(_cfg(tmp_path, tiny_shards, "cluster.storage=nosuch://bucket/ckpts"))
    run_dir(cfg).mkdir(parents=True)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        # The driver's own check is left out (launch opens the location before Ray starts): the run's worker
        # function gets the config as launch would give it, and Ray keeps its metadata locally.
        trainer = ray_trainer(cfg, {"cfg": cfg.model_dump(mode="json"), "started_at": time.time(), "marks": [],
                                    "steps": 4}, storage_path=str(tmp_path / "ray"))
        raised: list = []
        thread = threading.Thread(target=lambda: _fit(trainer, raised), daemon=True)
        thread.start()
        seen = workers_seen_while(thread)
    finally:
        ray.shutdown()
    assert raised == [], raised  # returned normally: Ray Train counted no failure
    error = recorded_error(run_dir(cfg))
    assert isinstance(error, RunError)
    assert str(error) == ("nosuch://bucket/ckpts/bad/checkpoints: cannot open this checkpoint location "
                          "(Protocol not known: nosuch)")
    assert len(seen) <= 2, f"restarted: {len(seen)} worker processes"


def _fit(trainer, raised: list) -> None:
    try:
        trainer.fit()
    except BaseException as e:  # noqa: BLE001 - reported by the test
        raised.append(e)


def test_pretrain_train_exits_2_with_one_line_on_a_bad_storage(tmp_path, tiny_shards):
    """The driver opens the location before anything is written or Ray starts: exit 2, one line, no run directory."""
    r = subprocess.run([sys.executable, "-m", "pretrain.cli", "train", str(ROOT / "configs/gpt-tiny.yaml"), *TINY,
                        f"run.dir={tmp_path / 'runs'}", f"data.train={tiny_shards / 'train'}",
                        f"data.val={tiny_shards / 'val'}", "cluster.max_failures=3",
                        "cluster.storage=nosuch://bucket/ckpts"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith("[")]
    assert lines == ["error: nosuch://bucket/ckpts: cannot open this checkpoint location (Protocol not known: nosuch)"], r.stderr
    assert not (tmp_path / "runs").exists()  # nothing written: no run directory, no lock
