"""End-to-end training through Ray Train workers and DeepSpeed: ZeRO stages agree, resume is exact.

These start real Ray workers with real gloo process groups and real DeepSpeed engines on the CPU.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pretrain.launch.local import launch
from pretrain.load import load_config

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.ray]

# A smaller model than the demo: the point is agreement between runs, not quality. GPT-2's vocabulary: the
# shards (tiny_shards) are GPT-2 BPE, the demo's own 2048-token BPE is not.
TINY = ["model.n_layers=2", "model.d_model=64", "model.n_heads=4", "model.max_seq_len=32", "model.vocab_size=50304",
        "model.kernels=reference", "train.precision=fp32", "train.micro_batch_size=4",
        "train.global_batch_size=8", "schedule.warmup_steps=3", "schedule.decay_steps=20",
        "eval.every=0", "checkpoint.every=0", "objective.sample_tokens=0", "log.wandb=false"]


def _cfg(tmp_path: Path, shards: Path, name: str, *extra: str):
    return load_config(ROOT / "configs/gpt-tiny.yaml", [
        *TINY, f"run.dir={tmp_path / 'runs'}", f"run.name={name}",
        f"data.train={shards / 'train'}", f"data.val={shards / 'val'}", *extra,
    ])


def _steps(run: Path) -> list[dict]:
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]


def _train(tmp_path, shards, name, *extra) -> list[dict]:
    cfg = _cfg(tmp_path, shards, name, *extra)
    launch(cfg, started_at=time.time(), quiet=True)
    return _steps(tmp_path / "runs" / name)


def test_zero_stages_match_single_worker(tmp_path, tiny_shards, ray_local):
    ref = _train(tmp_path, tiny_shards, "ref", "train.steps=12", "cluster.workers=1", "zero.stage=0")
    assert [r["step"] for r in ref] == list(range(1, 13))
    for stage in (1, 2, 3):
        rows = _train(tmp_path, tiny_shards, f"z{stage}", "train.steps=12", "cluster.workers=2", f"zero.stage={stage}")
        assert [r["step"] for r in rows] == list(range(1, 13)), stage
        assert rows[9]["loss"] == pytest.approx(ref[9]["loss"], rel=1e-3), stage
        assert all(r["grad_norm"] is not None and r["grad_norm"] > 0 for r in rows)
    # A ZeRO-3 checkpoint written by 2 workers, continued by 2 and (through DeepSpeed's universal
    # checkpoint) by 1: the next step agrees.
    runs = tmp_path / "runs"
    shutil.copytree(runs / "z3", runs / "z3-one")
    two = _train(tmp_path, tiny_shards, "z3", "train.steps=13", "cluster.workers=2", "zero.stage=3")
    one = _train(tmp_path, tiny_shards, "z3-one", "train.steps=13", "cluster.workers=1", "zero.stage=3")
    assert [r["step"] for r in one] == list(range(1, 14))
    assert one[-1]["loss"] == pytest.approx(two[-1]["loss"], rel=1e-4)
    assert (runs / "z3-one" / "checkpoints" / "step-12" / "universal").is_dir()

    # Learning happened, and the metrics a scaling-law fit needs are there.
    assert ref[-1]["loss"] < ref[0]["loss"]
    last = ref[-1]
    assert last["tokens"] == 12 * 8 * 32
    assert last["flops"] > 6 * last["tokens"] and 0 < last["mfu"] < 1 and last["tokens_per_s"] > 0


def test_resume_matches_uninterrupted_run(tmp_path, tiny_shards, ray_local):
    full = _train(tmp_path, tiny_shards, "full", "train.steps=20", "checkpoint.every=5")
    first = _train(tmp_path, tiny_shards, "split", "train.steps=10", "checkpoint.every=5")
    assert [r["step"] for r in first] == list(range(1, 11))
    # The same step-10 checkpoint resumed by one worker instead of two (ZeRO-2 states are partitioned
    # per rank: DeepSpeed's universal checkpoint re-partitions them; accumulation keeps the global batch).
    shutil.copytree(tmp_path / "runs" / "split", tmp_path / "runs" / "shrink")
    resumed = _train(tmp_path, tiny_shards, "split", "train.steps=20", "checkpoint.every=5")
    assert [r["step"] for r in resumed] == list(range(1, 21))  # each step exactly once
    for a, b in zip(full[10:], resumed[10:], strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), a["step"]
    ckpts = tmp_path / "runs" / "split" / "checkpoints"
    assert (ckpts / "latest").read_text() == "step-20"
    assert not list(ckpts.glob("*.tmp"))
    summary = json.loads((tmp_path / "runs" / "split" / "summary.json").read_text())
    assert summary["steps"] == 20 and summary["params"] > summary["params_non_embedding"] > 0

    shrunk = _train(tmp_path, tiny_shards, "shrink", "train.steps=20", "cluster.workers=1")
    assert [r["step"] for r in shrunk] == list(range(1, 21))
    for a, b in zip(full[10:], shrunk[10:], strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), a["step"]

    # And the other way: a 1-worker run resumed by 2 workers follows the 2-worker run from the start (the
    # schedule's length is decay_steps, not train.steps: full's first 14 steps are a 14-step run's).
    _train(tmp_path, tiny_shards, "grow", "train.steps=7", "cluster.workers=1")
    grown = _train(tmp_path, tiny_shards, "grow", "train.steps=14", "cluster.workers=2")
    assert [r["step"] for r in grown] == list(range(1, 15))
    for a, b in zip(full[:14], grown, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), a["step"]


def test_cli_trains_and_samples(tmp_path, tiny_shards):
    """The user's command: an embedded Ray started by `pretrain train`, progress lines, a sample."""
    r = subprocess.run(
        [sys.executable, "-m", "pretrain.cli", "train", str(ROOT / "configs/gpt-tiny.yaml"), *TINY,
         f"run.dir={tmp_path / 'runs'}", "run.name=cli", f"data.train={tiny_shards / 'train'}",
         f"data.val={tiny_shards / 'val'}", "train.steps=6", "train.log_every=2", "eval.every=3",
         "objective.sample_tokens=8", "log.wandb=true", "cluster.workers=2", "zero.stage=2"],
        capture_output=True, text=True, timeout=600, env={**__import__("os").environ, "WANDB_MODE": "offline"},
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "step      6/6" in r.stdout and "val_loss" in r.stdout and "sample:" in r.stdout
    run = tmp_path / "runs" / "cli"
    assert [row["step"] for row in _steps(run)] == list(range(1, 7))
    assert (run / "final" / "model.safetensors").exists() and (run / "config.yaml").exists()
    assert list((run / "wandb").glob("offline-run-*")), "an offline W&B run was recorded"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["time_to_first_step_s"] > 0 and summary["final_val_loss"] < summary["initial_val_loss"]
