"""One writer per checkpoint location (pretrain/launch/storelock.py, pretrain/train/owner.py), on a shared local
path and on a real S3 server (moto): a second run with the same `<cluster.storage>/<run.name>` is refused with the
holder's line whatever its `run.dir`; when a takeover happens all the same (a holder that stalled past the stale
limit, forced here), the first holder writes nothing more, its complete checkpoints all survive the second's
pruning, and resume trusts no step whose markers are of two attempts.

Real 1-rank DeepSpeed engines (gloo) write the checkpoints, as in test_checkpoint_store.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from pretrain.errors import LockLostError, RunLockedError
from pretrain.launch.storelock import LOCK, StoreLock
from pretrain.train import checkpoint as ckpt
from pretrain.train.storage import Storage
from tests.storage.test_checkpoint_store import _save, _saver, engine  # noqa: F401  (the module's engine)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(params=["local", "s3"])
def prefix(request, tmp_path) -> str:
    """`<cluster.storage>/<run.name>` on a shared path or in the S3 bucket."""
    if request.param == "local":
        return str(tmp_path / "shared" / "run")
    return f"{request.getfixturevalue('s3_bucket')}/{uuid.uuid4().hex[:8]}/run"


def test_a_second_holder_is_refused_with_the_holders_line(prefix):
    with StoreLock(prefix, run_dir="/cluster-a/runs/run") as first:
        with pytest.raises(RunLockedError) as e:
            StoreLock(prefix, run_dir="/cluster-b/runs/run").acquire()
        assert Storage(prefix).exists(LOCK)
        assert first.lost is None
    line = str(e.value)
    assert "\n" not in line and f"pid {os.getpid()} since" in line and "(run directory /cluster-a/runs/run)" in line
    assert not Storage(prefix).exists(LOCK), "released at the end"
    StoreLock(prefix).acquire().release()  # and free again


def test_a_taken_over_holder_writes_nothing_more_and_keeps_its_checkpoints(prefix, engine, tmp_path):  # noqa: F811
    store = Storage(f"{prefix}/checkpoints")
    a = StoreLock(prefix).acquire()
    saver_a = _saver(store, tmp_path / "a", keep=1, owner=a.owner())
    for step in (2, 4):
        _save(saver_a, engine, step)
    assert ckpt.complete_steps(store) == [4]  # A's own retention (keep=1) still works: its step 2 is gone

    b = StoreLock(prefix).take_over_for_tests()  # A is alive (this process): B must not trust it
    assert a.token not in b.owner().trusts
    saver_b = _saver(store, tmp_path / "b", keep=1, owner=b.owner())

    # A, whose lock is gone, writes nothing more: not even the step directory of its next save.
    with pytest.raises(LockLostError, match="this run's lock was taken over"):
        saver_a.save(engine, 6, {"step": 6})
    assert "step-6" not in store.children()

    # B cannot claim a step directory A wrote: its save of step 4 is skipped, A's files unchanged.
    before = json.loads(store.read_text("step-4/COMPLETE"))
    saver_b.save(engine, 4, {"step": 4})
    saver_b.wait()
    assert json.loads(store.read_text("step-4/COMPLETE")) == before and saver_b.stats["skipped"]

    for step in (8, 10):
        _save(saver_b, engine, step)
    saver_b.close()
    # B's pruning (keep=1) removed its own step 8, never A's step 4.
    assert ckpt.complete_steps(store) == [4, 10]
    assert ckpt.plan_resume(store, None, 1).step == 10

    # A marker of the other attempt inside B's newest step: resume no longer trusts that step.
    done = json.loads(store.read_text("step-10/rank-0.done"))
    store.write_text("step-10/rank-0.done", json.dumps({**done, "nonce": f"{a.token}.other"}))
    assert ckpt.plan_resume(store, None, 1).step == 4
    a.release()  # no longer its lock: nothing removed
    assert Storage(prefix).exists(LOCK)
    b.release()


def test_a_free_lock_trusts_the_holders_before_it(prefix, engine, tmp_path):  # noqa: F811
    """Retention goes on across runs that each released the lock: the next holder prunes the earlier ones'."""
    store = Storage(f"{prefix}/checkpoints")
    with StoreLock(prefix) as first:
        saver = _saver(store, tmp_path / "1", keep=1, owner=first.owner())
        _save(saver, engine, 2)
        saver.close()
    with StoreLock(prefix) as second:
        assert first.token in second.owner().trusts
        saver = _saver(store, tmp_path / "2", keep=1, owner=second.owner())
        _save(saver, engine, 4)
        saver.close()
    assert ckpt.complete_steps(store) == [4]


_HOLDER = """
import os, sys, time
from pathlib import Path
from pretrain.launch.storelock import StoreLock
out = Path(sys.argv[2])
def lost(line):
    print("LOST " + line, flush=True)
    os._exit(3)
lock = StoreLock(sys.argv[1], heartbeat_s=0.2, stale_s=1.5, on_lost=lost)
lock.acquire()
owner = lock.owner()
print("HELD", flush=True)
n = 0
while True:  # a writer that checks its lock before each write, as every save does
    owner.check()
    (out / f"tick-{n}").write_text(str(time.time()))
    n += 1
    time.sleep(0.05)
"""


def test_a_stalled_holder_stops_by_itself_once_it_wakes(tmp_path):
    """A holder stopped (SIGSTOP: a suspended VM, a frozen mount) past the stale limit is taken over; once it
    continues it stops within one heartbeat and writes nothing after the takeover."""
    prefix, ticks = str(tmp_path / "shared" / "run"), tmp_path / "ticks"
    ticks.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, prefix, str(ticks)], stdout=subprocess.PIPE, text=True,
                            cwd=ROOT)
    try:
        assert proc.stdout.readline().strip() == "HELD"
        time.sleep(0.3)
        os.kill(proc.pid, signal.SIGSTOP)
        with pytest.raises(RunLockedError):  # stopped, but its heartbeat is fresh
            StoreLock(prefix, stale_s=1.5).acquire()
        time.sleep(1.8)
        taker = StoreLock(prefix, stale_s=1.5).acquire()  # its heartbeat is older than the stale limit
        taken_at = time.time()
        os.kill(proc.pid, signal.SIGCONT)
        woke = time.time()
        code = proc.wait(timeout=10)
        stopped_after = time.time() - woke
        taker.release()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code in (1, 3), code  # the writer's own check (LockLostError) or the heartbeat's, whichever came first
    assert stopped_after < 0.2 + 1.0, stopped_after  # one heartbeat, and the interpreter's exit
    late = [p.name for p in ticks.iterdir() if float(p.read_text()) > taken_at]
    assert late == [], f"written after the takeover: {late}"


@pytest.mark.slow
@pytest.mark.ray
def test_two_runs_of_one_name_and_storage_from_two_run_dirs(tmp_path, tiny_shards):
    """Two `pretrain train` of one run.name and cluster.storage but different run.dir (two clusters, one bucket):
    the second exits 2 with the first's line before it writes anything; the first trains to the end, its saves
    checked against its lock, and releases it."""
    from tests.test_train import TINY

    storage = tmp_path / "shared"
    common = [sys.executable, "-m", "pretrain.cli", "train", str(ROOT / "configs/gpt-tiny.yaml"), *TINY,
              "run.name=shared", f"cluster.storage={storage}", "train.steps=12", "checkpoint.every=4",
              f"data.train={tiny_shards / 'train'}", f"data.val={tiny_shards / 'val'}"]
    env = {**os.environ, "WANDB_MODE": "offline"}
    first = subprocess.Popen([*common, f"run.dir={tmp_path / 'a'}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=env)
    try:
        deadline = time.time() + 120
        while not (storage / "shared" / LOCK).exists():
            assert first.poll() is None and time.time() < deadline, first.communicate()
            time.sleep(0.2)
        second = subprocess.run([*common, f"run.dir={tmp_path / 'b'}"], capture_output=True, text=True, env=env,
                                timeout=300)
        out, err = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            first.kill()
    assert second.returncode == 2, second.stderr
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: cluster.storage {storage}/shared: this run's checkpoint "
                                                   "location is in use by a live run"), second.stderr
    assert f"(run directory {tmp_path / 'a' / 'shared'})" in lines[0]
    assert not (tmp_path / "b" / "shared" / "config.yaml").exists()
    assert first.returncode == 0, err
    checkpoints = Storage(str(storage / "shared" / "checkpoints"))
    assert ckpt.complete_steps(checkpoints)[-1] == 12
    assert not (storage / "shared" / LOCK).exists(), "released at the end"
