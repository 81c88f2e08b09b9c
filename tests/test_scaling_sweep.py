"""Hyperparameter sweeps (pretrain.scaling.sweep, `pretrain scaling sweep`): the plan (one run per budget x lr
x batch, each config's lr, batch, micro-batch, validation set and length; the combinations under MIN_STEPS
skipped), bad input refused in one line, and one real sweep of two runs under Ray through the command: their
summaries carry their budget, read_sweep_runs reads back each run's lr and tokens per step, and the same
command again trains nothing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from pretrain.length import total_steps
from pretrain.load import load_config
from pretrain.scaling.sweep import MIN_STEPS, SweepError, plan_sweep

ROOT = Path(__file__).resolve().parents[1]
# configs/sweep-tiny.yaml on the test shards (GPT-2 BPE, 32-token sequences).
ON_SHARDS = ["model.vocab_size=50304", "model.max_seq_len=32", "model.kernels=reference", "log.wandb=false"]


def _tiny(tmp_path: Path, shards: Path, *extra: str):
    return load_config(ROOT / "configs/sweep-tiny.yaml", [*ON_SHARDS, f"run.dir={tmp_path / 'runs'}",
                                                          f"data.train={shards / 'train'}",
                                                          f"data.val={shards / 'val'}", *extra])


def _per_token(cfg, size: str | None = None) -> float:
    return plan_sweep(cfg, [1e15], [1e-3], [4], size=size).rungs[0].flops_per_token


def test_plan(tmp_path, tiny_shards):
    cfg = _tiny(tmp_path, tiny_shards)
    per_seq = _per_token(cfg) * 32
    small, large = 12 * 4 * per_seq, 40 * 4 * per_seq  # batch 4: 12 and 40 steps
    lad = plan_sweep(cfg, [large, small], [1e-2, 3e-3], [16, 4, 8], out=tmp_path / "sw")
    assert lad.mode == "sweep" and lad.plan_json()["mode"] == "sweep" and lad.out == tmp_path / "sw"
    # Sorted budgets, batches, lrs; at the small budget only batch 4 gets MIN_STEPS.
    want = [(small, 4, lr) for lr in (3e-3, 1e-2)] + [(large, b, lr) for b in (4, 8, 16) for lr in (3e-3, 1e-2)]
    assert [(r.budget, lad.configs[r.name].train.global_batch_size, lad.configs[r.name].optimizer.lr)
            for r in lad.rungs] == want
    assert lad.rungs[0].name == f"sweep-tiny-{small:.3g}".replace("e+", "e").replace("e0", "e") + "-lr3e-3-b4"
    for r in lad.rungs:
        run = lad.configs[r.name]
        batch = run.train.global_batch_size
        assert r.name.endswith(f"-lr{'3e-3' if run.optimizer.lr == 3e-3 else '1e-2'}-b{batch}")
        assert (r.size, run.model.d_model, run.model.n_layers, run.model.n_heads) == ("64x2", 64, 2, 2)
        assert run.train.flops == r.budget and run.train.steps is None and run.run.dir == str(tmp_path / "sw/runs")
        # The micro-batch divides the batch and the config's 4; the validation set stays 32 x 4 sequences.
        assert run.train.micro_batch_size == 4 and run.eval.batches == 32
        assert r.steps == total_steps(run) >= MIN_STEPS and r.tokens == r.steps * batch * 32
    assert [r.steps for r in lad.rungs[2:] if lad.configs[r.name].optimizer.lr == 3e-3] == [40, 20, 10]
    assert lad.skipped == [{"budget": small, "size": "64x2", "lr": lr, "batch": b, "reason": f"{s} steps, fewer than 10"}
                           for b, s in ((8, 6), (16, 3)) for lr in (3e-3, 1e-2)]
    # Another shape; a batch under the config's micro-batch, or not a multiple of it: the largest common divisor.
    lad = plan_sweep(cfg, [large], [1e-3], [2, 6], size="32x1", out=tmp_path / "s2")
    assert [(r.size, lad.configs[r.name].model.n_heads) for r in lad.rungs] == [("32x1", 1)] * 2  # head size 32
    assert [(c.train.micro_batch_size, c.eval.batches) for c in lad.configs.values()] == [(2, 64), (2, 64)]


def test_bad_input_is_one_line(tmp_path, tiny_shards):
    from pretrain import cli

    cli._mount(["pretrain", "scaling"])
    r = CliRunner().invoke(cli.app, ["scaling", "sweep", "--help"])
    assert r.exit_code == 0 and "--fit-dir" in r.output and "--batches" in r.output
    config = tmp_path / "s.yaml"
    config.write_text(yaml.safe_dump(_tiny(tmp_path, tiny_shards).model_dump(mode="json")))

    def one_line(args: list[str], match: str) -> None:
        r = CliRunner().invoke(cli.app, ["scaling", "sweep", str(config), "--out", str(tmp_path / "o"), *args, "--plan"])
        assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1 and match in r.stderr, r.output

    one_line(["--lrs", "0,1e-3"], "--lrs must be positive numbers (got 0)")
    one_line(["--lrs", "1e-3,fast"], "--lrs must be comma-separated numbers")
    one_line(["--batches", "4,2.5"], "--batches must be positive whole numbers of sequences (got 2.5)")
    one_line(["--batches", "3,4", "cluster.workers=2"], "batch 3 sequences does not split over cluster.workers=2")
    one_line(["--budgets", "1e5"], "budget 1e+05 FLOPs: no batch gets 10 steps at 64x2")
    one_line(["--budgets", ""], "a sweep needs budgets")
    one_line(["--size", "64by2"], "size '64by2': write it as DxL")
    with pytest.raises(SweepError, match="no batch gets 10 steps"):  # the budget under one step of batch 4
        plan_sweep(_tiny(tmp_path, tiny_shards), [1e6], [1e-3], [4])
    r = CliRunner().invoke(cli.app, ["scaling", "sweep", str(config), "--out", str(tmp_path / "p"), "--budgets",
                                     "1e13,1e14", "--plan"])
    assert r.exit_code == 0 and "FLOPs: " in r.output and "warning" not in r.stderr, r.output
    assert len(json.loads((tmp_path / "p" / "ladder.json").read_text())["runs"]) == 2 * 3 * 4
    r = CliRunner().invoke(cli.app, ["scaling", "sweep", str(config), "spike.sigma=6", "--out", str(tmp_path / "q"),
                                     "--budgets", "1e13,1e14", "--plan"])  # the guard on: said, and planned
    assert r.exit_code == 0 and "warning: the spike guard skips steps over 6 sigma" in r.stderr, r.output


def test_fit_recovers_laws_from_the_planned_batches(tmp_path, tiny_shards, monkeypatch):
    """Without training: each run writes the summary of a loss bowl about known optima, one step skipped by
    the spike guard (its tokens not trained); the fit reads the planned batches and recovers the laws. Into a
    ladder's fit directory, the sweep's plot and laws also extend the ladder's W&B summary run."""
    import wandb

    from pretrain.scaling.hyper import load_hyper, read_sweep_runs
    from pretrain.scaling.report import WANDB_RUN
    from pretrain.scaling.runner import run_ladder
    from pretrain.scaling.sweep import fit_sweep, log_wandb

    cfg = _tiny(tmp_path, tiny_shards)
    per_seq = _per_token(cfg) * 32
    lad = plan_sweep(cfg, [s * 4 * per_seq for s in (40, 120, 360)], [1e-3, 3e-3, 1e-2], [2, 4, 8],
                     out=tmp_path / "sw")
    c0 = lad.rungs[0].budget

    def fake(tree: dict) -> None:
        r = next(r for r in lad.rungs if r.name == tree["run"]["name"])
        lr, per_step = tree["optimizer"]["lr"], r.tokens // r.steps
        lr_opt, b_opt = 3e-3 * (r.budget / c0) ** -0.1, 128 * (r.budget / c0) ** 0.3
        loss = 5 + 0.1 * np.log(lr / lr_opt) ** 2 + 0.1 * np.log(per_step / b_opt) ** 2
        (Path(tree["run"]["dir"]) / r.name / "summary.json").write_text(json.dumps({
            "steps": r.steps, "tokens": (r.steps - 1) * per_step, "flops": r.flops, "skipped_steps": 1,
            "schedule": {"lr": lr}, "final_loss": loss, "final_val_loss": loss}))

    assert not run_ladder(lad, run_fn=fake, cluster=False, show=False).failed
    fit, doc = fit_sweep(lad, tmp_path / "fit", bootstrap=20)
    assert [o.used for o in fit.optima] == [True] * 3
    assert doc["lr"]["exponent"] == pytest.approx(-0.1, abs=1e-6) and doc["batch"]["exponent"] == pytest.approx(0.3, abs=1e-6)
    assert sorted({r["batch_tokens"] for r in doc["runs"]}) == [64, 128, 256]  # not (steps - 1) / steps of it
    # And from the summaries alone (`hyperfit RUNS`): the same batches.
    assert sorted(set(read_sweep_runs([tmp_path / "sw" / "runs"]).batch)) == [64, 128, 256]
    assert load_hyper(tmp_path / "fit" / "hyper.json")["batch_unit"] == "tokens per step"
    assert (tmp_path / "fit" / "hyper.png").is_file()
    monkeypatch.setenv("WANDB_MODE", "offline")
    fit_dir = tmp_path / "fit"
    ladder = wandb.init(project="p", name="ladder", dir=str(fit_dir), mode="offline",
                        settings=wandb.Settings(console="off", silent=True))
    ladder_id = ladder.id
    ladder.finish()
    (fit_dir / WANDB_RUN).write_text(json.dumps({"id": ladder_id, "project": "p", "name": "ladder"}))
    own, extended = log_wandb(lad, doc, fit_dir, "p", "sweep")
    assert own != extended and ladder_id in extended.name  # resumed: offline-run-<time>-<id>[-1]
    assert len(list(extended.glob("files/media/images/hyper_*.png"))) == 1
    assert len(list(extended.glob("files/media/table/sweep_*.table.json"))) == 1
    assert len(list(own.glob("files/media/images/hyper_*.png"))) == 1


@pytest.mark.slow
@pytest.mark.ray
def test_sweep_trains_marks_and_resumes(tmp_path, tiny_shards, ray_local):
    """2 runs (1 budget x 2 lrs x batch 8, two micro-batches of 4) of a 16x1 model, 10 steps each."""
    from pretrain import cli
    from pretrain.scaling.hyper import read_sweep_runs

    cli._mount(["pretrain", "scaling"])
    extra = ["eval.batches=2", "schedule.warmup_steps=2"]
    budget = 10 * 8 * 32 * _per_token(_tiny(tmp_path, tiny_shards, *extra), "16x1")
    args = ["scaling", "sweep", str(ROOT / "configs/sweep-tiny.yaml"), *ON_SHARDS, *extra,
            f"data.train={tiny_shards / 'train'}", f"data.val={tiny_shards / 'val'}", "--budgets", f"{budget!r}",
            "--lrs", "1e-3,1e-2", "--batches", "8", "--size", "16x1", "--out", str(tmp_path / "sw"),
            "--fit-dir", str(tmp_path / "fit"), "--bootstrap", "10"]
    r = CliRunner().invoke(cli.app, args)
    # Trained; no law from one budget and two values per axis: the fit says why, hyper.png shows the runs.
    assert r.exit_code == 1 and "sweep: 2 done, 0 running, 0 queued" in r.output, r.output
    assert "needs an optimum inside the swept values at 2 or more budgets" in r.stderr
    assert (tmp_path / "fit" / "hyper.png").is_file() and not (tmp_path / "fit" / "hyper.json").exists()
    runs = sorted((tmp_path / "sw" / "runs").iterdir())
    label = f"{budget:.3g}".replace("e+", "e").replace("e0", "e")
    assert [d.name for d in runs] == [f"sweep-tiny-{label}-lr1e-2-b8", f"sweep-tiny-{label}-lr1e-3-b8"]
    for d in runs:  # the planned budget marked (the FLOPs overshoot it by under a step), the trainer's length
        s = json.loads((d / "summary.json").read_text())
        assert s["budget"] == budget <= s["flops"] and s["steps"] == 10 and s["tokens"] == 10 * 8 * 32
    sweep = read_sweep_runs(runs)
    assert list(sweep.lr) == [1e-2, 1e-3] and list(sweep.batch) == [8 * 32] * 2  # tokens per step
    assert list(sweep.budget) == [budget] * 2 and all(loss > 0 for loss in sweep.loss)
    stamps = [(d / "metrics.jsonl").stat().st_mtime_ns for d in runs]
    r = CliRunner().invoke(cli.app, args)
    assert r.exit_code == 1 and "sweep: 2 done, 0 running, 0 queued" in r.output, r.output
    assert [(d / "metrics.jsonl").stat().st_mtime_ns for d in runs] == stamps  # kept, nothing trained again
