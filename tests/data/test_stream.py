"""The training stream: exact global order across world sizes, workers, resume, mixing and epochs."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from pretrain.config import DataConfig
from pretrain.data import DataError, build_train_stream, build_val_batches, validate_data
from pretrain.data.stream import Layout


def streams(cfg: DataConfig, world: int, mb: int, accum: int, seed: int = 7):
    return [build_train_stream(cfg, seed=seed, rank=r, world_size=world, micro_batch_size=mb, grad_accum=accum)
            for r in range(world)]


def step_keys(ranks, n_steps: int, accum: int) -> list[list[tuple[str, str]]]:
    """Per step, the (source, key) pairs of every rank's micro-batches, in rank order."""
    out = []
    for _ in range(n_steps):
        keys = []
        for s in ranks:
            for _ in range(accum):
                b = next(s)
                assert b["input_ids"].shape[0] == len(b["keys"]) == len(b["source"])
                keys += list(zip(b["source"], b["keys"], strict=True))
        out.append(keys)
    return out


def test_batch_format(sources):
    cfg = DataConfig(train=str(sources["prose"]))
    s = build_train_stream(cfg, seed=0, rank=0, world_size=1, micro_batch_size=4, grad_accum=1)
    b = next(s)
    assert s.seq_len == 16 and b["input_ids"].shape == (4, 17) and b["input_ids"].dtype.is_floating_point is False
    assert str(b["input_ids"].dtype) == "torch.int64" and b["source"] == ["prose"] * 4
    assert 0 <= int(b["input_ids"].min()) and int(b["input_ids"].max()) < 50257
    json.dumps(s.state_dict())  # checkpoints store it as JSON


@pytest.mark.parametrize("w0,w1", [(2, 1), (1, 2)])
def test_resume_at_another_world_size(sources, w0, w1):
    """Checkpoint at step 10 with w0 ranks, resume with w1 (same global batch): steps 11-30 match an
    uninterrupted w0 run sample for sample (as sets per step: ranks split a step differently)."""
    cfg = DataConfig(train=str(sources["prose"]))
    G, mb = 8, 2
    ref = step_keys(streams(cfg, w0, mb, G // (mb * w0)), 30, G // (mb * w0))
    first = streams(cfg, w0, mb, G // (mb * w0))
    step_keys(first, 10, G // (mb * w0))
    state = json.loads(json.dumps(first[0].state_dict()))
    resumed = streams(cfg, w1, mb, G // (mb * w1))
    for s in resumed:
        s.load_state_dict(state)
    got = step_keys(resumed, 20, G // (mb * w1))
    assert [sorted(k) for k in got] == [sorted(k) for k in ref[10:]]
    # And the order inside a step is the global position order whatever the world size.
    assert got == ref[10:]


def test_epoch_covers_every_key_once_with_workers(sources):
    """2 ranks x 2 dataloader workers: the first epoch's positions give every sample key exactly once."""
    cfg = DataConfig(train=str(sources["prose"]), num_workers=2)
    info = validate_data(cfg)
    n, mb, accum, world = info["train_samples"], 3, 2, 2
    ranks = streams(cfg, world, mb, accum)
    G = mb * accum * world
    keys_at = {}
    for step in range(-(-n // G)):
        for r, s in enumerate(ranks):
            layout = Layout(7, r, world, mb, accum)
            for k in range(accum):
                for p, key in zip(layout.positions(step * accum + k), next(s)["keys"], strict=True):
                    keys_at[int(p)] = key
    first_epoch = [keys_at[p] for p in range(n)]
    manifest = json.loads((sources["prose"] / "index.json").read_text())
    assert Counter(first_epoch) == Counter(f"{i:010d}" for i in range(manifest["samples"]))
    for s in ranks:
        s.close()


def test_workers_match_in_process(sources):
    """Dataloader workers change nothing about what a rank receives."""
    plain = DataConfig(train=str(sources["prose"]))
    work = DataConfig(train=str(sources["prose"]), num_workers=2)
    a = step_keys(streams(plain, 2, 2, 2)[1:], 25, 2)
    b_stream = streams(work, 2, 2, 2)[1:]
    assert step_keys(b_stream, 25, 2) == a
    b_stream[0].close()


def test_shuffled_deterministic_and_seeded(sources):
    cfg = DataConfig(train=str(sources["prose"]))
    a = step_keys(streams(cfg, 1, 4, 1, seed=1), 10, 1)
    assert a == step_keys(streams(cfg, 1, 4, 1, seed=1), 10, 1)
    assert a != step_keys(streams(cfg, 1, 4, 1, seed=2), 10, 1)
    flat = [k for step in a for _, k in step]
    assert flat != sorted(flat)  # shuffled, not file order


def test_epochs_roll_over_with_a_new_order(sources):
    cfg = DataConfig(train=str(sources["prose"]))
    n = validate_data(cfg)["train_samples"]
    s = streams(cfg, 1, 1, 1)[0]
    keys = [next(s)["keys"][0] for _ in range(2 * n)]
    assert sorted(keys[:n]) == sorted(keys[n:]) and keys[:n] != keys[n:]
    assert s.stats()["epoch/prose"] == pytest.approx(2.0)


def test_mixing_weights_and_resume(sources):
    """0.7 / 0.3 over 2,000 samples within 2 points; resumed mid-run it continues exactly."""
    cfg = DataConfig(train=[{"path": str(sources["prose"]), "weight": 0.7, "name": "prose"},
                            {"path": str(sources["code"]), "weight": 0.3, "name": "code"}])
    mb, accum = 10, 2
    ref = step_keys(streams(cfg, 2, mb, accum), 50, accum)  # 50 steps x 40 = 2,000 samples
    counts = Counter(src for step in ref for src, _ in step)
    assert abs(counts["prose"] / 2000 - 0.7) < 0.02 and abs(counts["code"] / 2000 - 0.3) < 0.02
    first = streams(cfg, 2, mb, accum)
    step_keys(first, 17, accum)
    state = first[1].state_dict()
    stats = first[1].stats()
    assert stats["tokens/prose"] + stats["tokens/code"] == 17 * 40 * 16
    assert stats["tokens/prose"] == state["sources"]["prose"]["samples"] * 16
    resumed = streams(cfg, 1, mb, accum * 2)
    resumed[0].load_state_dict(state)
    assert step_keys(resumed, 33, accum * 2) == ref[17:]
    # Tokens per source are global counts: the resumed 1-rank run reports what the 2-rank run did.
    uninterrupted = streams(cfg, 2, mb, accum)
    step_keys(uninterrupted, 50, accum)
    assert resumed[0].stats() == uninterrupted[0].stats()
    assert resumed[0].stats()["tokens/prose"] == counts["prose"] * 16


@pytest.mark.parametrize("form", ["brace", "pipe"])
def test_brace_pattern_and_pipe_sources(sources, form):
    """A brace pattern of shard paths, or `pipe:` commands, read the same samples as the directory."""
    d = sources["prose"]
    n = len(json.loads((d / "index.json").read_text())["shards"])
    pattern = f"{d}/shard-{{000000..{n - 1:06d}}}.tar"
    path = pattern if form == "brace" else f"pipe:cat {pattern}"
    by_dir = DataConfig(train=[{"path": str(d), "name": "p"}])
    by_url = DataConfig(train=[{"path": path, "name": "p"}])
    commands = [] if form == "brace" else [f"data.train executes a command: cat {pattern}"]
    assert validate_data(by_url) == {**validate_data(by_dir), "commands": commands}
    assert step_keys(streams(by_url, 1, 4, 1), 30, 1) == step_keys(streams(by_dir, 1, 4, 1), 30, 1)


def test_state_refuses_another_global_batch(sources):
    cfg = DataConfig(train=str(sources["prose"]))
    a = streams(cfg, 1, 2, 2)[0]
    next(a)
    b = streams(cfg, 1, 2, 3)[0]
    with pytest.raises(DataError, match="global_batch"):
        b.load_state_dict(a.state_dict())
    c = streams(cfg, 2, 2, 1)[0]  # same G = 4, but the state is mid-step (1 of 2 micro-batches)
    with pytest.raises(DataError, match="mid-step"):
        c.load_state_dict(a.state_dict())


def test_val_batches_fixed_and_disjoint(sources):
    cfg = DataConfig(train=str(sources["prose"]), val=str(sources["val"]))
    per_rank = [build_val_batches(cfg, rank=r, world_size=2, micro_batch_size=2, max_batches=3) for r in range(2)]
    again = build_val_batches(cfg, rank=1, world_size=2, micro_batch_size=2, max_batches=3)
    assert [b["keys"] for b in again] == [b["keys"] for b in per_rank[1]]
    assert all(b["input_ids"].equal(c["input_ids"]) for b, c in zip(again, per_rank[1], strict=True))
    keys = [k for batches in per_rank for b in batches for k in b["keys"]]
    assert len(per_rank[0]) == len(per_rank[1]) == 3
    assert sorted(keys) == [f"{i:010d}" for i in range(12)]  # the first 12 val samples, each once
    one = build_val_batches(cfg, rank=0, world_size=1, micro_batch_size=4, max_batches=3)
    assert sorted(k for b in one for k in b["keys"]) == sorted(keys)
    assert build_val_batches(DataConfig(train=str(sources["prose"])), rank=0, world_size=1,
                             micro_batch_size=2, max_batches=3) == []
