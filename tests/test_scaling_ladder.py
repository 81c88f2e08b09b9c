"""The isoFLOP ladder (pretrain.scaling.ladder): planning (shapes, tokens per budget, the too-small budget),
resume bookkeeping with an injected run function (finished runs kept, only the rest run again), the fit of
its runs, the CLI. One real training run checks train.tokens, the wsd schedule and what summary.json
carries for a fit; the ladder itself is a benchmark (README, "Scaling laws"), not a test."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pretrain.load import config_from_dict, load_config
from pretrain.scaling.approach3 import Law
from pretrain.scaling.books import finished, prepare
from pretrain.scaling.ladder import LadderError, parse_size, plan_ladder
from pretrain.scaling.report import fit_ladder
from pretrain.scaling.runner import run_ladder

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.vocab_size=50304", "model.max_seq_len=32", "model.kernels=reference", "train.micro_batch_size=4",
        "train.global_batch_size=8", "schedule.warmup_steps=2", "eval.every=0", "checkpoint.every=0",
        "cluster.workers=1", "zero.stage=0", "objective.sample_tokens=0", "log.wandb=false"]


def _cfg(tmp_path: Path, shards: Path, *extra: str):
    return load_config(ROOT / "configs/gpt-tiny.yaml", [
        *TINY, f"run.dir={tmp_path / 'runs'}", "run.name=lad",
        f"data.train={shards / 'train'}", f"data.val={shards / 'val'}", *extra])


def test_sizes():
    assert parse_size("128x4", 64) == parse_size(" 128 x 4 ", 64)
    s = parse_size("96x3", 32)
    assert (s.d_model, s.n_layers, s.n_heads, s.label) == (96, 3, 3, "96x3")
    assert parse_size("32x2", 64).n_heads == 1  # narrower than one head: one head
    assert parse_size("64x2x4", 64).n_heads == 4
    with pytest.raises(LadderError, match="write it as DxL"):
        parse_size("big", 64)
    with pytest.raises(LadderError, match="does not split into 3 heads"):
        parse_size("64x2x3", 64)


def test_plan(tmp_path, tiny_shards):
    from pretrain.length import flops_per_unit
    from pretrain.objectives.preflight import preflight

    cfg = _cfg(tmp_path, tiny_shards)
    lad = plan_ladder(cfg, budgets=[3e10, 1e10], sizes=["32x1", "64x2", "96x2"], head_dim=32, out=tmp_path / "lad")
    assert [r.budget for r in lad.rungs] == [1e10] * 3 + [3e10] * 3  # sorted budgets, sizes as given
    per_step = 8 * 32
    for r in lad.rungs:
        run = lad.configs[r.name]
        assert r.name == f"lad-{'1e10' if r.budget == 1e10 else '3e10'}-{r.size}"
        assert (run.model.d_model, run.model.n_layers, run.model.n_heads) == (r.d_model, r.n_layers, r.d_model // 32)
        assert run.train.flops == r.budget and run.train.steps is None
        assert lad.rdir(r) == tmp_path / "lad" / "runs" / r.name
        assert r.flops_per_token == flops_per_unit(run, preflight(run))  # the family's figure, as the runs log
        assert r.tokens == r.steps * per_step
        assert r.budget <= r.flops < r.budget + r.flops_per_token * per_step  # over by under one step
    small, large = lad.rungs[0], lad.rungs[2]
    assert small.params < large.params and small.steps > large.steps
    # A budget under one step of the smallest model: one line; under one step of a larger one: skipped.
    with pytest.raises(LadderError, match=r"budget 1e\+06 FLOPs is less than one step of the smallest model \(32x1"):
        plan_ladder(cfg, budgets=[1e6, 1e10], sizes=["32x1", "64x2"], head_dim=32, out=tmp_path / "x")
    one_small_step = small.flops_per_token * per_step * 1.5
    lad2 = plan_ladder(cfg, budgets=[one_small_step], sizes=["32x1", "96x2"], head_dim=32, out=tmp_path / "y")
    assert [r.size for r in lad2.rungs] == ["32x1"] and lad2.skipped[0]["size"] == "96x2"
    with pytest.raises(LadderError, match="needs budgets and sizes"):
        plan_ladder(cfg, sizes=["32x1"])
    # Under wsd a size's shorter runs branch from its longest one, at a stable-phase checkpoint.
    wsd = _cfg(tmp_path, tiny_shards, "schedule.type=wsd", "schedule.decay_fraction=0.2", "checkpoint.every=2")
    lad3 = plan_ladder(wsd, budgets=[3e10, 1e11], sizes=["32x1"], head_dim=32, out=tmp_path / "w")
    short, trunk = lad3.rungs
    k = (short.steps - round(0.2 * short.steps)) // 2 * 2
    assert trunk.branch_from is None and short.branch_from == f"{lad3.rdir(trunk)}@{k}" and 0 < k < short.steps
    assert lad3.configs[short.name].checkpoint.branch_from == short.branch_from


LAW = Law(E=1.8, A=400.0, B=1800.0, alpha=0.34, beta=0.37)


def fake_run(lad, calls: list, stop_after: int | None = None):
    """A run function that trains nothing: it writes the summary the planned run would, its loss from LAW."""
    from pretrain.config import run_dir

    rungs = {r.name: r for r in lad.rungs}

    def run(tree: dict) -> None:
        if stop_after is not None and len(calls) == stop_after:
            raise KeyboardInterrupt  # the ladder killed mid-run: this run never finishes
        cfg = config_from_dict(tree)
        calls.append(cfg.run.name)
        r = rungs[cfg.run.name]
        loss = float(LAW.loss(r.params, r.tokens)) * (1 + 0.01 * np.sin(len(calls)))
        (run_dir(cfg) / "summary.json").write_text(json.dumps({
            "params": r.params, "params_non_embedding": r.params_non_embedding, "steps": r.steps,
            "tokens": r.tokens, "flops": r.flops, "final_loss": loss, "final_val_loss": loss}))
    return run


def test_resume_keeps_finished_runs(tmp_path, tiny_shards):
    cfg = _cfg(tmp_path, tiny_shards)
    kw = dict(budgets=[1e10, 3e10, 1e11], sizes=["32x1", "64x2", "96x2"], head_dim=32, out=tmp_path / "lad")
    lad = plan_ladder(cfg, **kw)
    first: list = []
    with pytest.raises(KeyboardInterrupt):
        run_ladder(lad, run_fn=fake_run(lad, first, stop_after=4), cluster=False, show=False)
    assert first == [r.name for r in lad.rungs[:4]]
    kept = {n: json.loads((lad.out / "runs" / n / "summary.json").read_text())["final_loss"] for n in first}
    assert json.loads((lad.out / "ladder.json").read_text())["runs"][0]["name"] == first[0]
    assert all((lad.rdir(r) / "config.yaml").is_file() for r in lad.rungs)  # every run's resolved config

    again: list = []
    tracker = run_ladder(lad, run_fn=fake_run(lad, again), cluster=False, show=False)  # state: from disk
    assert again == [r.name for r in lad.rungs[4:]]  # only the missing runs
    assert sorted(tracker.done) == sorted(r.name for r in lad.rungs) and not tracker.failed
    for name, loss in kept.items():  # finished runs kept as they were, with the budget mark added
        summary = json.loads((lad.out / "runs" / name / "summary.json").read_text())
        assert summary["final_loss"] == loss
        assert summary["budget"] in kw["budgets"] and summary["ladder_size"] in kw["sizes"]
    assert all(finished(lad.rdir(r), r) for r in lad.rungs)
    third: list = []
    run_ladder(lad, run_fn=fake_run(lad, third), cluster=False, show=False)
    assert third == []

    doc = fit_ladder(lad, bootstrap=8, starts=8, plots=False)  # plots: tests/test_scaling_fit.py
    assert (lad.out / "fit" / "fit.json").is_file()
    assert len(doc["runs"]) == 9 and {r["budget"] for r in doc["runs"]} == set(kw["budgets"])  # as planned
    assert math.isfinite(doc["approach3"]["a"])

    # The same directory under another config is refused, never mixed into the fit.
    with pytest.raises(LadderError, match=r"holds a run of another config \(optimizer.lr: [0-9.e-]+ -> 0.001\)"):
        prepare(plan_ladder(_cfg(tmp_path, tiny_shards, "optimizer.lr=1e-3"), **kw))


def test_cli(tmp_path, tiny_shards):
    from pretrain import cli

    cli._mount(["pretrain", "scaling"])
    r = CliRunner().invoke(cli.app, ["scaling", "ladder", "--help"])
    assert r.exit_code == 0 and "--budgets" in r.output
    config = tmp_path / "ladder.yaml"
    cfg = _cfg(tmp_path, tiny_shards)
    tree = cfg.model_dump(mode="json")
    tree["ladder"] = {"budgets": [1e10, 3e10], "sizes": ["32x1", "64x2"], "head_dim": 32,
                      "out": str(tmp_path / "cli")}
    import yaml

    config.write_text(yaml.safe_dump(tree))
    r = CliRunner().invoke(cli.app, ["scaling", "ladder", str(config), "--plan"])
    assert r.exit_code == 0, r.output
    assert len(json.loads((tmp_path / "cli" / "ladder.json").read_text())["runs"]) == 4
    r = CliRunner().invoke(cli.app, ["scaling", "ladder", str(config), "--budgets", "1e5", "--plan"])
    assert r.exit_code == 2 and r.stderr.strip().splitlines() == [
        r.stderr.strip()] and "less than one step of the smallest model" in r.stderr
    r = CliRunner().invoke(cli.app, ["scaling", "ladder", str(config), "--sizes", "64by2", "--plan"])
    assert r.exit_code == 2 and "size '64by2': write it as DxL" in r.stderr


@pytest.mark.slow
@pytest.mark.ray
def test_tokens_wsd_and_the_summary(tmp_path, tiny_shards, ray_local):
    """A real run asked for tokens, on the wsd schedule: its steps, its learning rates, its summary."""
    from pretrain.launch.local import launch
    from pretrain.scaling.table import identity, read_runs

    cfg = _cfg(tmp_path, tiny_shards, "model.n_layers=1", "model.d_model=32", "model.n_heads=1",
               "train.tokens=2500", "schedule.type=wsd", "schedule.decay_fraction=0.4", "schedule.min_lr_ratio=0")
    launch(cfg, started_at=time.time(), quiet=True)
    rdir = tmp_path / "runs" / "lad"
    rows = [json.loads(ln) for ln in (rdir / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in rows if "loss" in r]
    assert len(lrs) == 10  # ceil(2500 / (8 x 32))
    peak = cfg.optimizer.lr
    # A row's lr is the schedule's after that step (the next step's rate): warm-up 2, stable to step 6, then
    # 4 cooldown steps to the floor.
    assert lrs[:5] == pytest.approx([peak] * 5)
    assert lrs[5:9] == pytest.approx([peak * (1 - math.sqrt(k / 4)) for k in (1, 2, 3, 4)]) and lrs[9] == 0
    s = json.loads((rdir / "summary.json").read_text())
    assert s["steps"] == 10 and s["tokens"] == 10 * 8 * 32 and s["flops"] == pytest.approx(s["flops_per_token"] * s["tokens"])
    assert s["params"] > s["params_non_embedding"] > 0 and s["final_loss"] > 0 and s["final_val_loss"] > 0
    assert s["schedule"] == {"type": "wsd", "steps": 10, "warmup_steps": 2, "lr": peak, "min_lr_ratio": 0.0,
                             "decay_fraction": 0.4, "decay_steps": 4}
    assert s["length"] == {"steps": None, "tokens": 2500.0, "flops": None}
    assert {k: s[k] for k in ("data", "tokenizer", "objective")} == identity(cfg.model_dump(mode="json"))
    assert s["tokenizer"].startswith("gpt2") and s["objective"] == "causal_lm"
    assert read_runs([rdir]).identity["tokenizer"] == s["tokenizer"]

