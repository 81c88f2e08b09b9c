"""Saving through host copies (pretrain/train/snapshot.py): what the background thread writes is the state at the
save, whatever training does to the engine after `save` returns; the stall and the thread's times are reported;
a failed write surfaces from `wait()` and leaves no complete step.

Real DeepSpeed engines in real gloo groups (two spawned ranks, or this process's one-rank group). The seam that
holds the background thread back is DeepSpeed's own: the engine's checkpoint engine (`engine.checkpoint_engine`,
which the checkpointer wraps for a save) is one whose every file write first takes a permit from the test.
"""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from pretrain import compat
from pretrain.load import config_from_dict
from pretrain.train import checkpoint as ckpt
from pretrain.train.storage import Storage

SEQ, VOCAB = 16, 64


class GatedEngine:
    """The engine's own checkpoint engine, except that each `save` (one file) waits for a permit of `permits`, and
    releases one of `written` once its file is written."""

    def __init__(self, own, permits: threading.Semaphore):
        self.own, self.permits, self.written = own, permits, threading.Semaphore(0)

    def save(self, state_dict, path: str) -> None:
        if not self.permits.acquire(timeout=120):
            raise TimeoutError("the test never let the write go")
        self.own.save(state_dict, path)
        self.written.release()

    def __getattr__(self, name):
        return getattr(self.own, name)


def _config(stage: int, world: int, precision: str = "fp32"):
    return config_from_dict({
        "data": {"train": "unused"}, "cluster": {"workers": world}, "zero": {"stage": stage},
        "train": {"micro_batch_size": 1, "global_batch_size": world, "precision": precision},
        "schedule": {"warmup_steps": 1},
        "model": {"type": "llama", "n_layers": 2, "d_model": 32, "n_heads": 2, "n_kv_heads": 2, "d_ff": 64,
                  "vocab_size": VOCAB, "max_seq_len": SEQ, "tie_embeddings": True, "kernels": "reference"},
    })


def _engine(cfg, world: int):
    from pretrain.train.build import build_model
    from pretrain.train.engine import build_engine

    model, _ = build_model(cfg, torch.device("cpu"))
    return build_engine(cfg, model, world)


def _step(engine) -> None:
    ids = torch.randint(0, VOCAB, (1, SEQ + 1))
    engine.backward(engine(ids[:, :-1], targets=ids[:, 1:]) / SEQ)
    engine.step()


def _weights(engine) -> dict[str, torch.Tensor]:
    """Every parameter's full value (gathered from the partitions under ZeRO-3: a collective)."""
    import deepspeed

    params = list(engine.module.parameters())
    gather = deepspeed.zero.GatheredParameters(params) if engine.zero_optimization_stage() == 3 else None
    with gather or torch.no_grad():
        return {n: p.detach().float().clone() for n, p in engine.module.named_parameters()}


def _tensors(obj, path: str = "") -> dict[str, torch.Tensor]:
    """The tensors in `obj`'s dicts and lists, by path, cloned."""
    if isinstance(obj, torch.Tensor):
        return {path: obj.detach().clone()}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list | tuple) else ()
    return {k: v for key, value in items for k, v in _tensors(value, f"{path}/{key}").items()}


def _assert_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


def _assert_changed(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], every: bool = False) -> None:
    """Some tensor has changed; with `every`, every non-empty floating one (the fp32 master weights and Adam's
    moments; a bf16 weight may not move in three steps)."""
    changed = {k: not torch.equal(got[k], want[k]) for k in want if want[k].is_floating_point() and want[k].numel()}
    assert all(changed.values()) if every else any(changed.values()), changed


def _load(engine, url: str, staging: Path, rank: int, world: int) -> None:
    plan = ckpt.decide(Storage(url), None, rank, world)
    with ckpt.opened(plan, staging, rank) as (step_dir, universal_dir):
        ckpt.load(engine, step_dir, rank, universal_dir)


def _snapshot(rank: int, world: int, stage: int, precision: str, root: str) -> None:
    """A save, then training at once while the background thread is held back: the files equal those of a save
    written in the training thread at the same point (DeepSpeed's own, host_copy=False), and a fresh engine
    loads the weights and optimizer states of the save."""
    root_dir = Path(root)
    cfg = _config(stage, world, precision)
    engine = _engine(cfg, world)
    _step(engine)  # optimizer states exist

    # The reference: the same step saved the way DeepSpeed writes it, in the training thread.
    ref = ckpt.Checkpointer(Storage(str(root_dir / "ref")), root_dir / "st-ref" / f"rank-{rank}", rank, world,
                            host_copy=False)
    ref.save(engine, 1, {"step": 1})
    ref.close()
    assert ref.stats["copy_s"] == 0.0
    want_weights, want_optim = _weights(engine), _tensors(engine.optimizer.state_dict())

    permits = threading.Semaphore(0)
    staging = root_dir / "st" / f"rank-{rank}"
    saver = ckpt.Checkpointer(Storage(str(root_dir / "async")), staging, rank, world)
    with compat.deepspeed_checkpoint_engine(engine, lambda own: GatedEngine(own, permits)):
        saver.save(engine, 1, {"step": 1})
        # Returned with nothing of DeepSpeed's written: the states are in host memory only (under ZeRO-0 in
        # fp32 rank 0 alone has any: the model states with the optimizer's).
        assert not list((staging / "step-1").rglob("*.pt"))
        stats = dict(saver.stats)
        assert 0 <= stats["copy_s"] <= stats["local_write_s"] and (stats["copy_s"] > 0 or rank > 0)
        assert saver.uploading or stats["copy_s"] == 0
        for _ in range(2):  # training goes on: weights and optimizer states change in place
            _step(engine)
        _assert_changed(_tensors(engine.optimizer.state_dict()), want_optim, every=True)
        _assert_changed(_weights(engine), want_weights)
        permits.release(1000)
        saver.wait()
    assert saver.stats["write_s"] > 0 and saver.stats["upload_s"] > 0
    saver.close()
    dist.barrier()  # rank 0's markers are written

    a, b = Storage(str(root_dir / "ref")), Storage(str(root_dir / "async"))
    files = [json.loads(s.read_text("step-1/COMPLETE"))["files"] for s in (a, b)]
    assert files[0] == files[1]  # the same files, of the same sizes
    for name in sorted(p.name for p in a.local_path("step-1").iterdir() if p.suffix == ".pt"):
        assert (a.local_path("step-1") / name).read_bytes() == (b.local_path("step-1") / name).read_bytes(), name

    fresh = _engine(cfg, world)  # the initial weights
    _assert_changed(_weights(fresh), want_weights)
    _load(fresh, b.url, root_dir / "st-load" / f"rank-{rank}", rank, world)
    _assert_equal(_weights(fresh), want_weights)
    _assert_equal(_tensors(fresh.optimizer.state_dict()), want_optim)


@pytest.mark.slow
@pytest.mark.parametrize(("stage", "precision"), [(0, "fp32"), (2, "fp32"), (3, "fp32"), (3, "bf16")])
def test_the_files_hold_the_state_at_the_save_while_training_goes_on(stage, precision, gloo_ranks, tmp_path):
    gloo_ranks(_snapshot, stage, precision, str(tmp_path), timeout=300)


@pytest.fixture(scope="module")
def one_rank_engine(one_rank_group):
    return _engine(_config(2, 1), 1)


def test_a_failed_write_surfaces_from_wait_and_leaves_no_complete_step(one_rank_engine, tmp_path):
    engine, permits = one_rank_engine, threading.Semaphore(0)
    store = Storage(str(tmp_path / "loc"))
    staging = tmp_path / "run" / ".staging" / "rank-0"
    saver = ckpt.Checkpointer(store, staging, 0, 1)
    with compat.deepspeed_checkpoint_engine(engine, lambda own: GatedEngine(own, permits)) as gated:
        saver.save(engine, 1, {"step": 1})
        permits.release()  # the first file (the model states) is written; the thread waits before the second
        assert gated.written.acquire(timeout=60)
        assert [p.name for p in (staging / "step-1").rglob("*.pt")] == ["mp_rank_00_model_states.pt"]
        # The staging directory goes away mid-write (as on a vanished disk): the next file fails for real.
        shutil.rmtree(staging / "step-1")
        (staging / "step-1").write_text("not a directory")
        permits.release(1000)
        with pytest.raises(ckpt.CheckpointStoreError, match=r"^checkpoint step-1 to .*: \w+Error: ") as e:
            saver.wait()
        assert "\n" not in str(e.value)
    assert ckpt.complete_steps(store) == [] and not store.exists("step-1/rank-0.done")
    assert not store.exists("latest")

    # The next save does not build on the failed one: it is complete, and resume finds it.
    saver.save(engine, 2, {"step": 2})
    saver.close()
    assert ckpt.complete_steps(store) == [2] and store.read_text("latest") == "step-2"
    assert not staging.exists()
