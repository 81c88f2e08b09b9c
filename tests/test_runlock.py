"""One writer per run: a live run's lock refuses a second run with the same name; a dead run's is taken over."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pretrain.errors import RunLockedError
from pretrain.launch.runlock import LOCK_FILE, RunLock
from tests.test_train import TINY

ROOT = Path(__file__).resolve().parents[1]


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _plant(rdir: Path, age: float = 0.0, **holder) -> Path:
    rdir.mkdir(parents=True, exist_ok=True)
    f = rdir / LOCK_FILE
    f.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": 0.0, **holder}))
    os.utime(f, (time.time() - age, time.time() - age))
    return f


def test_second_holder_refused_with_the_holder_named(tmp_path):
    with RunLock(tmp_path / "r"):
        with pytest.raises(RunLockedError) as e:
            RunLock(tmp_path / "r").acquire()
    msg = str(e.value)
    assert f"{socket.gethostname()} pid {os.getpid()} since" in msg and "\n" not in msg
    assert not (tmp_path / "r" / LOCK_FILE).exists(), "released at the end"
    RunLock(tmp_path / "r").acquire().release()  # and free again


def test_dead_pid_on_this_host_is_taken_over_at_once(tmp_path):
    _plant(tmp_path / "r", pid=_dead_pid())
    lock = RunLock(tmp_path / "r").acquire()
    assert json.loads((tmp_path / "r" / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()


def test_other_host_judged_by_its_heartbeat(tmp_path):
    _plant(tmp_path / "r", host="node-7", pid=1, ray_job="raysubmit_abc")
    with pytest.raises(RunLockedError, match=r"node-7 pid 1 since .* \(Ray job raysubmit_abc\)"):
        RunLock(tmp_path / "r", stale_s=60).acquire()
    _plant(tmp_path / "r", age=120, host="node-7", pid=1)  # its heartbeat stopped two minutes ago
    RunLock(tmp_path / "r", stale_s=60).acquire().release()


def test_heartbeat_keeps_the_lock_fresh(tmp_path):
    with RunLock(tmp_path / "r", heartbeat_s=0.05):
        f = tmp_path / "r" / LOCK_FILE
        os.utime(f, (time.time() - 100, time.time() - 100))
        time.sleep(0.3)
        assert time.time() - f.stat().st_mtime < 5
        # A peer with a short staleness limit still sees a live holder.
        with pytest.raises(RunLockedError):
            RunLock(tmp_path / "r", stale_s=5).acquire()


def test_train_with_a_live_runs_name_is_refused(tmp_path, tiny_shards):
    """`pretrain train` refuses before it writes anything into the run directory."""
    from pretrain.cli import app

    rdir = tmp_path / "runs" / "busy"
    args = ["train", str(ROOT / "configs/gpt-tiny.yaml"), *TINY, f"run.dir={tmp_path / 'runs'}", "run.name=busy",
            f"data.train={tiny_shards / 'train'}", f"data.val={tiny_shards / 'val'}", "train.steps=1"]
    with RunLock(rdir):
        result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "in use by a live run" in result.output and f"pid {os.getpid()}" in result.output
    assert not (rdir / "config.yaml").exists()


def test_a_lock_taken_over_is_noticed_at_the_next_heartbeat(tmp_path):
    """The holder reads its lock before each heartbeat: another token there (this run stalled past the stale
    limit and was taken over) calls `on_lost` once with the line, and the lock is not touched again."""
    lost: list[str] = []
    lock = RunLock(tmp_path / "r", heartbeat_s=0.05, on_lost=lost.append).acquire()
    _plant(tmp_path / "r", host="node-9", pid=7, token="theirs")
    deadline = time.time() + 5
    while not lost and time.time() < deadline:
        time.sleep(0.02)
    assert len(lost) == 1 and "this run's lock" in lost[0] and "node-9 pid 7" in lost[0] and "\n" not in lost[0]
    lock.release()
    assert json.loads((tmp_path / "r" / LOCK_FILE).read_text())["token"] == "theirs", "the new holder's lock stays"


def test_a_run_directory_that_cannot_be_written_is_one_line(tmp_path, tiny_shards):
    """A read-only run.dir (here /sys, where even root may not create a directory): exit 2 and one line."""
    from pretrain.cli import app

    args = ["train", str(ROOT / "configs/gpt-tiny.yaml"), *TINY, "run.dir=/sys/pretrain-test", "run.name=ro",
            f"data.train={tiny_shards / 'train'}", f"data.val={tiny_shards / 'val'}", "train.steps=1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert result.output.strip() == ("error: run.dir /sys/pretrain-test/ro: cannot write the run directory "
                                     "(Operation not permitted)"), result.output


def test_the_owner_of_a_relative_run_dir_checks_from_another_working_directory(tmp_path, monkeypatch):
    """`make demo` trains in run.dir `runs` (relative), and Ray Train workers run in a working directory of their
    own: the lock the workers check must be named by its absolute path (the first save of the demo failed
    with "taken over (now held by no one)" while it was relative)."""
    from pretrain.launch.storelock import StoreLock
    from pretrain.train.owner import Owner

    monkeypatch.chdir(tmp_path)
    (tmp_path / "elsewhere").mkdir()
    run_lock = RunLock(Path("runs") / "demo").acquire()
    store_lock = StoreLock("store/demo").acquire()
    try:
        owners = [Owner.from_dict(lock.owner().to_dict()) for lock in (run_lock, store_lock)]
        monkeypatch.chdir(tmp_path / "elsewhere")
        for owner in owners:
            assert Path(owner.lock_dir).is_absolute()
            owner.check()  # raises LockLostError if the lock cannot be read from here
    finally:
        store_lock.release()
        run_lock.release()
