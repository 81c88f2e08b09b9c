"""Saving and resuming checkpoints at a location, on a local file system and on a real S3 server (moto):
what is complete, what retention keeps, and where a run resumes after a crash at any point of a save.

A real 1-rank DeepSpeed engine (gloo) writes and loads every checkpoint here; the Ray runs of
test_storage_run.py cover two ranks.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import torch

from pretrain.load import config_from_dict
from pretrain.train import checkpoint as ckpt
from pretrain.train.schedule import warmup_cosine
from pretrain.train.storage import Storage


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path) -> Storage:
    if request.param == "local":
        return Storage(str(tmp_path / "loc" / "checkpoints"))
    return Storage(f"{request.getfixturevalue('s3_bucket')}/{uuid.uuid4().hex[:8]}/run/checkpoints")


@pytest.fixture(scope="module")
def engine(one_rank_group):
    from pretrain.train.engine import build_engine

    cfg = config_from_dict({"data": {"train": "unused"}, "cluster": {"workers": 1}, "zero": {"stage": 2},
                            "train": {"micro_batch_size": 2, "global_batch_size": 2}, "schedule": {"warmup_steps": 1}})
    torch.manual_seed(0)
    return build_engine(cfg, torch.nn.Linear(8, 8), 1)


def _train_step(engine) -> dict[str, torch.Tensor]:
    loss = engine(torch.randn(2, 8)).pow(2).mean()
    engine.backward(loss)
    engine.step()
    return {n: p.detach().clone() for n, p in engine.module.named_parameters()}


def _save(saver, engine, step: int) -> dict[str, torch.Tensor]:
    """One step, then a checkpoint of it; the weights it holds."""
    weights = _train_step(engine)
    saver.save(engine, step, {"step": step, "units": 10 * step, "data": {"position": step}})
    saver.wait()
    # The loop's state (data positions included) is JSON beside DeepSpeed's pickles, never inside them.
    state = json.loads(saver.store.read_text(f"step-{step}/state.json"))
    assert state == {"step": step, "units": 10 * step, "data": {"position": step}}
    return weights


def _saver(store, tmp_path, **kw) -> ckpt.Checkpointer:
    return ckpt.Checkpointer(store, tmp_path / "run" / ".staging" / "rank-0", 0, 1, **kw)


def _resume(engine, store, tmp_path) -> dict:
    plan = ckpt.decide(store, None, 0, 1)
    _train_step(engine)  # move away from the saved weights first
    with ckpt.opened(plan, tmp_path / "resume-staging", 0) as (step_dir, universal_dir):
        state = ckpt.load(engine, step_dir, 0, universal_dir)
    assert state["step"] == plan.step and state["data"] == {"position": plan.step}
    assert not (tmp_path / "resume-staging" / "resume").exists()  # downloads removed after the load
    return state


def test_saves_are_complete_and_retention_keeps_newest_and_every_mth(store, engine, tmp_path):
    saver = _saver(store, tmp_path, keep=2, keep_every=3)
    saved = {step: _save(saver, engine, step) for step in range(1, 7)}
    saver.close()
    assert ckpt.complete_steps(store) == [3, 5, 6]  # the newest two, and step 3 for good
    assert store.children() == ["latest", "step-3", "step-5", "step-6"]
    assert store.read_text("latest") == "step-6"
    marker = json.loads(store.read_text("step-6/COMPLETE"))
    assert marker["world_size"] == 1 and "meta.json" in marker["files"] and "rng-rank0.json" in marker["files"]
    assert not (tmp_path / "run" / ".staging").exists()  # nothing left under the run directory

    state = _resume(engine, store, tmp_path)
    assert state["units"] == 60
    for n, p in engine.module.named_parameters():
        torch.testing.assert_close(p.detach(), saved[6][n], rtol=0, atol=0)


@pytest.mark.parametrize("point", ckpt.CRASH_POINTS)
def test_a_crash_at_any_point_of_a_save_resumes_from_a_complete_checkpoint(store, engine, tmp_path, point,
                                                                           monkeypatch):
    saver = _saver(store, tmp_path, keep=1)
    saved = {1: _save(saver, engine, 1)}
    monkeypatch.setenv(ckpt.CRASH_ENV, point)
    saved[2] = _train_step(engine)
    saver.save(engine, 2, {"step": 2, "units": 20, "data": {"position": 2}})
    with pytest.raises(ckpt.CheckpointStoreError, match=f"step-2 to .*injected crash at {point}"):
        saver.wait()
    monkeypatch.delenv(ckpt.CRASH_ENV)
    done = ckpt.CRASH_POINTS.index(point) >= ckpt.CRASH_POINTS.index("before-latest")  # the marker was written
    store.write_text("latest", "")  # a torn pointer changes nothing: resume reads the markers
    expect = 2 if done else 1
    assert ckpt.complete_steps(store)[-1] == expect

    state = _resume(engine, store, tmp_path)  # the restarted run (a new checkpointer, as a new process)
    assert state["step"] == expect
    for n, p in engine.module.named_parameters():
        torch.testing.assert_close(p.detach(), saved[expect][n], rtol=0, atol=0)
    again = _saver(store, tmp_path, keep=1)
    _save(again, engine, expect + 1)
    again.close()
    assert store.children() == ["latest", f"step-{expect + 1}"]  # leftovers and older checkpoints pruned


def test_branch_from_another_runs_checkpoint(engine, tmp_path):
    other = Storage(str(tmp_path / "runs" / "stable" / "checkpoints"))
    saver = _saver(other, tmp_path)
    for step in (2, 4):
        _save(saver, engine, step)
    saver.close()
    own = Storage(str(tmp_path / "runs" / "cooldown" / "checkpoints"))
    run_dir = str(tmp_path / "runs" / "stable")
    assert ckpt.plan_resume(own, run_dir, 1) == ckpt.Plan(4, f"{other.url}/step-4", None, True)
    assert ckpt.plan_resume(own, f"{other.url}@2", 1).step_url == f"{other.url}/step-2"
    with pytest.raises(ckpt.ResumeError, match=r"^checkpoint.branch_from: .*@3: no complete checkpoint step-3 .*2, 4\)$"):
        ckpt.plan_resume(own, f"{run_dir}@3", 1)
    with pytest.raises(ckpt.ResumeError, match="no complete checkpoint there"):
        ckpt.plan_resume(own, str(tmp_path / "runs" / "none"), 1)
    # The branched run continues from step 4 on its own schedule (here its warm-up of 1 step, horizon 100).
    plan = ckpt.plan_resume(own, run_dir, 1)
    with ckpt.opened(plan, tmp_path / "staging", 0) as (step_dir, universal_dir):
        assert ckpt.load(engine, step_dir, 0, universal_dir, own_schedule=True)["step"] == 4
    assert engine.get_lr()[0] == pytest.approx(1e-3 * warmup_cosine(4, warmup=1, total=100, floor=0.1))
    # A run with a checkpoint of its own resumes from it, whatever it branched from.
    mine = _saver(own, tmp_path)
    _save(mine, engine, 6)
    mine.close()
    assert ckpt.plan_resume(own, run_dir, 1) == ckpt.Plan(6, f"{own.url}/step-6", None, False)


def _two_rank_save(rank: int, world: int, url: str, staging: str, out: str) -> None:
    """A real 2-rank ZeRO-2 save (spawned): every rank's marker, rank 0 waiting for both by polling."""
    from pretrain.train.engine import build_engine

    cfg = config_from_dict({"data": {"train": "unused"}, "cluster": {"workers": 2}, "zero": {"stage": 2},
                            "train": {"micro_batch_size": 1, "global_batch_size": 2}, "schedule": {"warmup_steps": 1}})
    torch.manual_seed(0)
    engine = build_engine(cfg, torch.nn.Linear(8, 8), 2)
    weights = _train_step(engine)
    saver = ckpt.Checkpointer(Storage(url), Path(staging) / f"rank-{rank}", rank, 2)
    saver.save(engine, 3, {"step": 3, "units": 30, "data": {"position": 3}})
    saver.close()
    if rank == 0:
        torch.save(weights, out)


@pytest.mark.slow
def test_two_ranks_save_to_s3_and_one_resumes_through_the_universal_conversion(engine, s3_bucket, tmp_path,
                                                                                 gloo_ranks):
    from pretrain.train.engine import build_engine

    store = Storage(f"{s3_bucket}/{uuid.uuid4().hex[:8]}/two/checkpoints")
    gloo_ranks(_two_rank_save, store.url, str(tmp_path / "st"), str(tmp_path / "w.pt"), timeout=300)
    marker = json.loads(store.read_text("step-3/COMPLETE"))
    assert {"rank-0.done", "rank-1.done"} <= set(store.children("step-3")) and marker["world_size"] == 2
    assert sum("optim_states" in f for f in marker["files"]) == 2  # each rank's partition

    plan = ckpt.decide(store, None, 0, 1)
    assert plan.universal_url == f"{store.url}/step-3/universal"
    ckpt.prepare_universal(plan, tmp_path / "staging", 0)  # converted locally, stored beside the checkpoint
    assert store.exists("step-3/universal/COMPLETE")
    cfg = config_from_dict({"data": {"train": "unused"}, "cluster": {"workers": 1}, "zero": {"stage": 2},
                            "train": {"micro_batch_size": 2, "global_batch_size": 2}, "schedule": {"warmup_steps": 1}})
    one = build_engine(cfg, torch.nn.Linear(8, 8), 1, load_universal=True)
    with ckpt.opened(plan, tmp_path / "staging", 0) as (step_dir, universal_dir):
        assert universal_dir is not None and (universal_dir / "zero").is_dir()
        ckpt.load(one, step_dir, 0, universal_dir)
    saved = torch.load(tmp_path / "w.pt")
    for n, p in one.module.named_parameters():
        torch.testing.assert_close(p.detach(), saved[n], rtol=0, atol=0)
