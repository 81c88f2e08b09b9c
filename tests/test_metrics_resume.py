"""Each step once after a restart: metrics.jsonl is cut back to the checkpoint, and the W&B run is not sent
the steps it already holds (tests/test_wandb_once.py: nor does it miss the ones it never got)."""

from __future__ import annotations

import re
import struct
import time
from pathlib import Path

from pretrain.metrics.sinks import WandbSink, last_step


def _history_steps(wandb_file: Path) -> list[int]:
    """Steps of the history records in an offline run's transaction log. wandb >= 0.20 writes it from its
    Go core and ships no Python reader: a 7-byte header, then LevelDB log records (32 KiB blocks; each
    chunk a 7-byte header of crc32, length, type: 1 full, 2 first, 3 middle, 4 last) of `Record` protos."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, steps, pending = wandb_file.read_bytes(), 7, [], b""
    while pos + 7 <= len(data):
        if (room := 32768 - pos % 32768) < 7:  # a block's tail too short for a header is padding
            pos += room
            continue
        _, length, kind = struct.unpack_from("<IHB", data, pos)
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(pending)
            if rec.WhichOneof("record_type") == "history":
                steps.append(rec.history.step.num)
    return steps


def test_restarted_run_sends_each_step_once(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    rows = [{"step": s, "loss": 1.0 / s, "tokens": 8 * s, "flops": 1e6 * s} for s in range(1, 9)]
    first = WandbSink(tmp_path, "p", "r", {}, unit="tokens")
    for r in rows[:5]:  # killed after step 5
        first.log(r)
    first.close()
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(f'{{"step": {r["step"]}}}\n' for r in rows[:5]) + '{"step": 6, "lo')  # torn tail
    assert last_step(metrics) == 5
    again = WandbSink(tmp_path, "p", "r", {}, unit="tokens")
    assert again.held == 5  # read back from the first attempt's transaction log, not from metrics.jsonl
    for r in rows:  # no checkpoint: the restart trains from step 1 again
        again.log(r)
    again.close()
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    # offline-run-<date>_<time>-<id>, with "-1" added when both attempts start within the same second
    ids = {re.match(r"offline-run-\d{8}_\d{6}-([0-9a-z]+)", p.name)[1] for p in runs}
    assert len(runs) == 2 and len(ids) == 1, f"the same run id: {[p.name for p in runs]}"
    # wandb's service can still be writing an offline run's log when finish() returns (seen once in the full
    # suite, with other W&B runs of the same process before it): read until it holds what was sent, or 20 s.
    deadline = time.monotonic() + 20
    while True:
        steps = [s for d in runs for s in _history_steps(next(d.glob("*.wandb")))]
        if steps == list(range(1, 9)) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert steps == list(range(1, 9))


def test_truncate_keeps_the_checkpoints_steps_or_nothing(tmp_path):
    from pretrain.metrics.sinks import truncate_after

    f = tmp_path / "metrics.jsonl"
    body = '{"step": 0, "val_loss": 3}\n{"step": 1, "loss": 2}\n{"step": 2, "loss": 1}\n{"step": 3, "lo'
    f.write_text(body)
    assert last_step(f) == 2  # the torn tail of a killed writer is not a step
    truncate_after(f, 1)
    assert f.read_text() == '{"step": 0, "val_loss": 3}\n{"step": 1, "loss": 2}\n'
    truncate_after(f, -1)  # restarted without a checkpoint: step 0's validation is logged again too
    assert f.read_text() == "" and last_step(f) == -1


def test_deferred_wandb_sink_replays_in_order_what_came_before_it_existed(tmp_path, monkeypatch):
    """The loop does not wait for wandb.init: rows sent while the run is still being made reach it, in order."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from pretrain.metrics.sinks import Deferred

    monkeypatch.setenv("WANDB_MODE", "offline")
    go = threading.Event()

    def slow_init():
        go.wait(30)
        return WandbSink(tmp_path, "p", "r", {}, unit="tokens")

    pool = ThreadPoolExecutor(1)
    sink = Deferred(pool.submit(slow_init))
    row = {"step": 1, "loss": 1.0, "tokens": 8, "flops": 1e6}
    sink.log(row)
    row["step"] = 99  # the caller reuses its dict: what was sent is kept as it was
    sink.summary({"params": 3})
    for s in (2, 3):
        sink.log({"step": s, "loss": 1.0 / s, "tokens": 8 * s, "flops": 1e6 * s})
    assert sink._sink is None  # all of that without waiting: the run does not exist yet
    go.set()
    for s in (4, 5):
        sink.log({"step": s, "loss": 1.0 / s, "tokens": 8 * s, "flops": 1e6 * s})
    sink.close()
    run = next((tmp_path / "wandb").glob("offline-run-*"))
    deadline = time.monotonic() + 20
    while (steps := [s for f in run.glob("*.wandb") for s in _history_steps(f)]) != [1, 2, 3, 4, 5] \
            and time.monotonic() < deadline:
        time.sleep(0.5)
    assert steps == [1, 2, 3, 4, 5]


def test_deferred_sink_raises_what_its_construction_raised(tmp_path):
    from concurrent.futures import Future

    import pytest

    from pretrain.metrics.sinks import Deferred

    failed: Future = Future()
    sink = Deferred(failed)
    sink.log({"step": 1})  # not done yet: kept
    failed.set_exception(RuntimeError("wandb: no service"))
    with pytest.raises(RuntimeError, match="no service"):
        sink.log({"step": 2})


def test_every_hook_of_a_step_runs_before_its_checkpoint():
    """Registered as build_run does: the checkpoint before the objective's evaluation and the artefact, which
    still run first at a checkpoint step and at the last one; the order of the others is kept."""
    from pretrain.hooks import Hook
    from pretrain.train.hooks import Hooks

    ran: list[str] = []
    hooks = Hooks()

    def hook(name: str, every: int, **kw) -> None:
        hooks.add(lambda v: ran.append(name), every, **kw)

    hook("ema", 1)
    hook("log", 1)
    hook("validate", 2, at_start=True)
    hook("save", 4, checkpoint=True)
    hooks.extend([Hook(lambda v: ran.append("evaluate"), 2, at_start=True)])  # the objective's
    hook("artefact", 0)
    for step, last in ((3, False), (4, False), (6, True)):
        ran.clear()
        hooks.after_step(None, step, last)
        ran.append("|")
        assert ran == {3: ["ema", "log", "|"],
                       4: ["ema", "log", "validate", "evaluate", "save", "|"],
                       6: ["ema", "log", "validate", "evaluate", "artefact", "save", "|"]}[step]
    ran.clear()
    hooks.start(None)
    assert ran == ["validate", "evaluate"]


def test_a_checkpoint_save_fsyncs_metrics_jsonl_first(tmp_path, monkeypatch):
    """Through the run's save path (the checkpoint hook, RunView.save_checkpoint): metrics.jsonl is fsynced,
    with the step's row in it, before the checkpointer is handed the save."""
    import os

    import torch

    from pretrain.load import load_config
    from pretrain.metrics.sinks import Fanout, JsonlSink
    from pretrain.train.hooks import Hooks, log_step, save_checkpoint
    from pretrain.train.parts import Run

    metrics, events = tmp_path / "metrics.jsonl", []
    fsync = os.fsync

    def fsync_noted(fd):
        events.append(("fsync", os.path.realpath(f"/proc/self/fd/{fd}")))
        return fsync(fd)

    class Saver:  # the checkpointer's side: what was on disk when it was handed the save
        def save(self, engine, step, client, extra=None):
            events.append(("save", step, last_step(metrics)))

    class Stream:
        def state_dict(self):
            return {}

    monkeypatch.setattr(os, "fsync", fsync_noted)
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs/gpt-tiny.yaml", [f"run.dir={tmp_path}"])
    run = Run(cfg=cfg, objective=None, engine=None, stream=Stream(), sink=Fanout([JsonlSink(metrics)]), saver=Saver(),
              ema=None, device=torch.device("cpu"), rank=0, world=1, rdir=tmp_path, counts={}, unit="tokens", steps=4,
              start=0, start_units=0, accum=1, step_units=8, flops_per_unit=1.0, peak=1.0, clip=None, val=[],
              sample_batch=None, hooks=Hooks())
    run.hooks.add(log_step, every=1)
    run.hooks.add(save_checkpoint, every=2, checkpoint=True)
    for step in (1, 2):
        run.hooks.after_step(run.view(step, 8 * step, {"step": step, "loss": 1.0}), step, last=False)
    assert events == [("fsync", str(metrics.resolve())), ("save", 2, 2)]
    run.sink.close()
