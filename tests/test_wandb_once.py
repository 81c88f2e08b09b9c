"""W&B holds each step exactly once, in step order, whatever an attempt lost; a W&B that cannot start never
fails the run.

Real offline W&B runs throughout, read back from their transaction logs with an independent reader
(tests/test_metrics_resume.py's `_history_steps`). The sink tests drive the sinks as pretrain/train/run.py
wires them (`_sinks`); the slow ones run the real loop on a 1-rank gloo group in spawned processes, one of them
killed (SIGKILL) while its W&B rows still wait for `wandb.init`.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import time
from concurrent.futures import Future
from pathlib import Path

import pytest

from pretrain.compat import wandb_last_step
from pretrain.metrics.sinks import Sink, WandbSink, open_wandb, truncate_after
from pretrain.train.run import _sinks
from tests.test_metrics_resume import _history_steps

ROOT = Path(__file__).resolve().parents[1]


def _done(sink: Sink) -> Future:
    f: Future = Future()
    f.set_result(sink)
    return f


def _row(step: int) -> dict:
    return {"step": step, "loss": 1.0 / (step + 1), "tokens": 8 * step, "flops": 1e6 * step}


def _wandb_steps(rdir: Path, want: list[int], timeout: float = 20) -> list[int]:
    """Every history step of the run's local W&B logs, attempt after attempt. wandb's service can still be
    writing a log when finish() returns (tests/test_metrics_resume.py): read until it holds `want`, or `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        logs = sorted((f for f in (rdir / "wandb").glob("*run-*/run-*.wandb") if f.parent.name != "latest-run"),
                      key=lambda f: f.parent.name.removeprefix("offline-"))  # attempts in start order
        steps = [s for f in logs for s in _history_steps(f)]
        if steps == want or time.monotonic() > deadline:
            return steps
        time.sleep(0.5)


def test_rows_waiting_for_wandb_init_at_a_crash_reach_wandb_after_the_resume(tmp_path, monkeypatch):
    """Attempt 1 dies while wandb.init still runs: its rows are in metrics.jsonl only. Its step-4 checkpoint
    is resumed: W&B gets steps 0-4 from metrics.jsonl, then the replayed and new ones."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    metrics = tmp_path / "metrics.jsonl"
    first = _sinks(tmp_path, 0, Future())  # wandb.init never returns before the crash
    for s in range(7):
        first.log(_row(s))
        if s % 2 == 0:
            first.log({"step": s, "val_loss": 2.0 / (s + 1)})
    first.sinks[0].sync()  # the crash: nothing closed, W&B never started
    truncate_after(metrics, 4)  # build_run, resuming from step 4

    again = _sinks(tmp_path, 0, _done(open_wandb(tmp_path, "p", "r", {})))
    for s in range(5, 9):
        again.log(_row(s))
    again.close()
    assert _wandb_steps(tmp_path, list(range(9))) == list(range(9))


def test_steps_wandb_holds_are_skipped_and_those_it_lost_are_sent(tmp_path, monkeypatch):
    """Attempt 1's W&B persisted steps 0-3; steps 4-6 reached metrics.jsonl, not W&B (its process died first).
    Resumed from step 5: 4-5 come from metrics.jsonl, 6 and on from the run, each once; W&B's own record is the
    judge, not metrics.jsonl (whose last step, 6, the sink used to skip through)."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    metrics = tmp_path / "metrics.jsonl"
    first = _sinks(tmp_path, 0, _done(WandbSink(tmp_path, "p", "r", {})))
    for s in range(4):
        first.log(_row(s))
    first.sinks[1].close()  # W&B has written 0-3
    for s in range(4, 7):
        first.sinks[0].log(_row(s))
    truncate_after(metrics, 5)

    again = _sinks(tmp_path, 0, _done(open_wandb(tmp_path, "p", "r", {})))
    assert again.sinks[1]._ready().held == 3
    for s in range(6, 9):
        again.log(_row(s))
    again.close()
    assert _wandb_steps(tmp_path, list(range(9))) == list(range(9))


def test_last_step_of_a_transaction_log_survives_a_torn_tail(tmp_path, monkeypatch):
    """`pretrain.compat.wandb_last_step` reads a log from its last block back: the last step of a log of
    several blocks, of one cut mid-record (a killed writer), and -1 for a log without steps or no log at all."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    sink = WandbSink(tmp_path, "p", "r", {})
    for s in range(1, 1201):
        sink.log({"step": s, "loss": 1.0 / s, "tokens": s, "flops": s, "note": "x" * 40})
    sink.close()
    log = next((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    steps = _wandb_steps(tmp_path, list(range(1, 1201)))
    assert steps == list(range(1, 1201)) and log.stat().st_size > 3 * 32768
    assert wandb_last_step(log) == 1200
    data = log.read_bytes()
    for cut in (len(data) // 2, len(data) // 2 + 3, len(data) - 5):
        torn = tmp_path / f"torn-{cut}.wandb"
        torn.write_bytes(data[:cut])
        got = wandb_last_step(torn)
        assert 1 < got <= 1200 and got in steps, cut
    empty = tmp_path / "header-only.wandb"
    empty.write_bytes(data[:7])
    other = tmp_path / "not-a-log.wandb"
    other.write_bytes(b"{}")
    assert wandb_last_step(empty) == -1 and wandb_last_step(other) == -1


def test_a_wandb_that_cannot_start_online_logs_offline_with_one_warning(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_API_KEY", "bad")
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # loopback, nothing listens: no network needed
    sink = open_wandb(tmp_path, "p", "r", {})
    assert isinstance(sink, WandbSink)
    sink.log(_row(1))
    sink.close()
    warnings = [ln for ln in capfd.readouterr().err.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1 and "could not start online" in warnings[0] and "offline" in warnings[0], warnings
    assert _wandb_steps(tmp_path, [1]) == [1]


def test_a_wandb_that_cannot_start_at_all_leaves_the_run_without_it(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("WANDB_MODE", "offline")
    (tmp_path / "wandb").write_text("a file where W&B wants its directory")
    sink = open_wandb(tmp_path, "p", "r", {})
    assert type(sink) is Sink
    sink.log(_row(1))  # a no-op: the run goes on
    sink.close()
    warnings = [ln for ln in capfd.readouterr().err.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1 and "metrics.jsonl only" in warnings[0], warnings


# ----------------------------------------------------------------------------- the real loop


TINY = ["model.n_layers=1", "model.d_model=32", "model.n_heads=2", "model.max_seq_len=32", "model.vocab_size=50304",
        "model.kernels=reference", "train.precision=fp32", "train.micro_batch_size=4", "train.global_batch_size=4",
        "schedule.warmup_steps=2", "cluster.workers=1", "zero.stage=0", "objective.sample_tokens=0", "eval.batches=1",
        "log.wandb=true", "train.steps=6", "eval.every=2", "checkpoint.every=2"]


def _attempt(rank: int, world: int, tree: dict, block_wandb: bool, order: str) -> None:
    """One attempt of the run in this (spawned) process. `block_wandb`: wandb.init never returns. Appends to the
    file `order` what happens at each step, in order: "<hook> <step>" for the validation, an evaluation hook
    the objective brings and the checkpoint hook, "fsync" for metrics.jsonl, and "saved <step> <last step in
    metrics.jsonl>" as the checkpointer starts the save."""
    import os
    import threading
    from functools import wraps

    import wandb

    import pretrain.train.run as run
    from pretrain.hooks import Hook
    from pretrain.load import config_from_dict
    from pretrain.metrics.sinks import last_step
    from pretrain.objectives.base import Objective
    from pretrain.train import checkpoint
    from pretrain.train.loop import train

    def note(line: str) -> None:
        with open(order, "a") as f:
            f.write(line + "\n")

    if block_wandb:
        wandb.init = lambda *a, **k: threading.Event().wait()

    def recorded(name, fn):
        @wraps(fn)
        def hook(*args):
            note(f"{name} {args[-1].step}")
            return fn(*args)
        return hook

    run.validate, run.save_checkpoint = recorded("validate", run.validate), recorded("save", run.save_checkpoint)
    Objective.hooks = lambda self, ctx: [Hook(recorded("evaluate", lambda v: None), every=2, at_start=True)]
    fsync, save = os.fsync, checkpoint.Checkpointer.save
    metrics = Path(tree["run"]["dir"]) / tree["run"]["name"] / "metrics.jsonl"

    def fsync_noted(fd):
        if os.path.realpath(f"/proc/self/fd/{fd}") == str(metrics.resolve()):
            note("fsync")
        return fsync(fd)

    def save_noted(self, engine, step, *args, **kwargs):
        note(f"saved {step} {last_step(metrics)}")
        return save(self, engine, step, *args, **kwargs)

    os.fsync, checkpoint.Checkpointer.save = fsync_noted, save_noted
    train(config_from_dict(tree))


def _spawn(tmp_path: Path, tree: dict, env: dict, block_wandb: bool = False) -> int:
    from tests.helpers import _gloo_rank

    rdzv = tmp_path / f"rdzv-{time.monotonic_ns()}"
    p = mp.get_context("spawn").Process(target=_gloo_rank, args=(
        _attempt, 0, 1, str(rdzv), env, (tree, block_wandb, str(tmp_path / "order.txt"))))
    p.start()
    p.join(timeout=300)
    if p.is_alive():
        p.kill()
        p.join()
    return p.exitcode


def _tree(tmp_path: Path, shards: Path) -> dict:
    from pretrain.load import load_config

    return load_config(ROOT / "configs/gpt-tiny.yaml", [
        *TINY, f"run.dir={tmp_path / 'runs'}", "run.name=w", f"data.train={shards / 'train'}",
        f"data.val={shards / 'val'}"]).model_dump(mode="json")


@pytest.mark.slow
def test_a_run_killed_while_wandb_rows_wait_holds_each_step_once(tmp_path, tiny_shards, monkeypatch):
    """Attempt 1's wandb.init never returns and the process is SIGKILLed before step 5; attempt 2 resumes (from
    step 4, or 2 when the kill beat step 4's upload). W&B holds steps 0-6 once each, the validations of 0-4 included. At each
    checkpoint step the evaluations (the run's and the objective's) ran first, then metrics.jsonl was fsynced
    with the step's rows in it, then the checkpointer saved."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    tree, rdir = _tree(tmp_path, tiny_shards), tmp_path / "runs" / "w"
    assert _spawn(tmp_path, tree, {"PRETRAIN_TEST_SIGNAL": "0:5:SIGKILL"}, block_wandb=True) == -9
    assert not (rdir / "wandb").exists()  # no W&B row left the first attempt
    assert _spawn(tmp_path, tree, {}) == 0
    assert _wandb_steps(rdir, list(range(7))) == list(range(7))
    rows = [json.loads(ln) for ln in (rdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 7))
    assert [r["step"] for r in rows if "val_loss" in r] == [0, 2, 4, 6]
    order = (tmp_path / "order.txt").read_text().splitlines()
    assert order[:2] == ["validate 0", "evaluate 0"]
    for step in (2, 4, 6):  # 4: the first attempt's; 6: the last step's, whose hooks run at the end too
        at = order.index(f"validate {step}")
        assert order[at:at + 5] == [f"validate {step}", f"evaluate {step}", f"save {step}", "fsync",
                                    f"saved {step} {step}"], order


@pytest.mark.slow
def test_a_run_with_an_unusable_wandb_key_trains_to_the_end_offline(tmp_path, tiny_shards, monkeypatch, capfd):
    for k, v in {"WANDB_MODE": "online", "WANDB_API_KEY": "bad", "WANDB_BASE_URL": "http://127.0.0.1:9"}.items():
        monkeypatch.setenv(k, v)
    tree, rdir = _tree(tmp_path, tiny_shards), tmp_path / "runs" / "w"
    assert _spawn(tmp_path, tree, {}) == 0
    assert json.loads((rdir / "summary.json").read_text())["steps"] == 6
    warnings = [ln for ln in capfd.readouterr().err.splitlines() if ln.startswith("warning: W&B")]
    assert len(warnings) == 1 and "logging offline instead" in warnings[0], warnings
    assert _wandb_steps(rdir, list(range(7))) == list(range(7))
