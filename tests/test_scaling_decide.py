"""From fits to decisions (pretrain.scaling.hyper, .recommend, .check; pretrain/cli/scaling_decide.py): the
hyperparameter laws recover known exponents from a synthetic sweep whose truth the fit never sees; `recommend`
writes a config that loads and that `pretrain plan` accepts, with N_opt by the fit's own law; `check` places a
run inside or outside the interval and appends it to checks.jsonl. The fit.json used is written by
`pretrain scaling fit` itself from a synthetic table."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pretrain.cli.scaling_decide import app
from pretrain.scaling.hyper import Sweep, fit_hyper
from tests.test_scaling_fit import REPLICATION, isoflop_grid, write_csv

LLAMA = Path(__file__).resolve().parents[1] / "configs" / "llama-7b.yaml"


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def one_error_line(r) -> str:
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


# ------------------------------------------------------------------------------------ hyperparameter laws


def _sweep_from_hidden_laws(seed: int) -> Sweep:
    """A 5 x 5 grid of lr x batch at four budgets over two decades. The optimum at each budget is drawn from
    power laws (DeepSeek LLM's published ones) with 2% log-normal noise; the grid is centred off it by up to
    a factor 1.5; the loss is a tilted bowl in the logarithms with 0.1% noise per run. Only the rows leave."""
    rng = np.random.default_rng(seed)
    truth = {"lr": (0.3118, -0.125), "batch": (0.2920, 0.3271)}
    rows = []
    for c in np.geomspace(1e17, 1e19, 4):
        lr_o, b_o = (a * c ** e * math.exp(rng.normal(0, 0.02)) for a, e in truth.values())
        lr_c, b_c = lr_o * math.exp(rng.uniform(-0.4, 0.4)), b_o * math.exp(rng.uniform(-0.4, 0.4))
        floor = 2.0 + 50 * c ** -0.1
        for lr in lr_c * np.exp(np.linspace(-1.4, 1.4, 5)):
            for b in b_c * np.exp(np.linspace(-1.4, 1.4, 5)):
                x, y = math.log(lr / lr_o), math.log(b / b_o)
                rows.append((c, lr, b, floor * (1 + 0.02 * x * x + 0.008 * y * y + 0.006 * x * y)
                             * math.exp(rng.normal(0, 0.001))))
    a = np.array(rows)
    return Sweep(a[:, 0], a[:, 1], a[:, 2], a[:, 3], None, [f"run {i}" for i in range(len(a))])


TRUE_EXPONENTS = {"lr": -0.125, "batch": 0.3271}  # read only after the fit


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hyper_laws_recover_hidden_exponents(seed):
    fit = fit_hyper(_sweep_from_hidden_laws(seed), resamples=200, seed=seed).to_json()
    for q, truth in TRUE_EXPONENTS.items():
        law = fit[q]
        assert abs(law["exponent"] - truth) < 0.05, (q, law["exponent"])
        lo, hi = law["ci95"]["exponent"]
        assert lo <= truth <= hi, (q, lo, hi)
    assert all(b["used"] for b in fit["budgets"])


def test_hyperfit_command_writes_json_and_plot(tmp_path):
    s = _sweep_from_hidden_laws(0)
    table = write_csv(tmp_path / "sweep.csv", ["flops", "lr", "batch_tokens", "loss"],
                      zip(s.flops, s.lr, s.batch, s.loss, strict=True))
    r = invoke("hyperfit", str(table), "--out", str(tmp_path / "fit"), "--bootstrap", "50")
    assert r.exit_code == 0, r.output
    doc = json.loads((tmp_path / "fit" / "hyper.json").read_text())
    assert doc["batch_unit"] == "tokens per step" and len(doc["budgets"]) == 4 and len(doc["runs"]) == 100
    assert (tmp_path / "fit" / "hyper.png").stat().st_size > 10_000
    bad = write_csv(tmp_path / "bad.csv", ["flops", "lr", "loss"], [(1e17, 1e-3, 3.0)])
    assert "lacks batch_tokens" in one_error_line(invoke("hyperfit", str(bad), "--out", str(tmp_path / "x")))


# ------------------------------------------------------------------------------------ recommend and check


@pytest.fixture(scope="module")
def fit_dir(tmp_path_factory) -> Path:
    """fit.json from `pretrain scaling fit` on a Chinchilla-shaped table (the replication's law, 1% noise)."""
    tmp = tmp_path_factory.mktemp("fit")
    n, d, c = isoflop_grid(REPLICATION, [1e18, 1e19, 1e20, 1e21], sizes=5, span=1.2)
    loss = REPLICATION.loss(n, d) * np.exp(np.random.default_rng(0).normal(0, 0.01, len(n)))
    table = write_csv(tmp / "ladder.csv", ["params", "tokens", "loss"], zip(n, d, loss, strict=True))
    r = invoke("fit", str(table), "--out", str(tmp / "fit"), "--starts", "8", "--bootstrap", "40")
    assert r.exit_code == 0, r.output
    return tmp / "fit"


def test_recommend_writes_a_config_the_plan_accepts(fit_dir, tmp_path):
    from pretrain.load import load_config
    from pretrain.plan import make_plan

    out = tmp_path / "llama-1e23.yaml"
    r = invoke("recommend", str(fit_dir), "--config", str(LLAMA), "--flops", "1e23", "--out", str(out), "--json")
    assert r.exit_code == 0, r.output
    rec = json.loads(r.stdout)
    fit = json.loads((fit_dir / "fit.json").read_text())
    a3, k = fit["approach3"], fit["flops_per_param_token"]  # N_opt = G (C/k)^a, G = (alpha A / (beta B))^(1/(alpha+beta))
    g = (a3["alpha"] * a3["A"] / (a3["beta"] * a3["B"])) ** (1 / (a3["alpha"] + a3["beta"]))
    n_opt = g * (1e23 / k) ** (a3["beta"] / (a3["alpha"] + a3["beta"]))
    assert rec["n_opt"] == pytest.approx(n_opt, rel=1e-9)
    assert rec["d_opt"] == pytest.approx(1e23 / (k * n_opt), rel=1e-9)
    lo, hi = rec["ci95"]["n_opt"]
    assert lo < n_opt < hi and rec["ci95"]["loss"][0] < rec["loss"] < rec["ci95"]["loss"][1]
    assert abs(math.log(rec["shape"]["params"] / n_opt)) < 0.2  # the nearest depth at Llama's aspect ratio
    assert "hyper.json" in r.stderr  # no sweep: the config's lr and batch, with a warning

    cfg = load_config(out)
    assert cfg.model.d_model / cfg.model.n_layers == pytest.approx(128, rel=0.05)
    assert cfg.model.d_model // cfg.model.n_heads == 128  # Llama's head size
    assert cfg.train.tokens == pytest.approx(1e23 / (k * rec["shape"]["params"]), rel=1e-3)
    plan = make_plan(cfg, "h100-sxm")
    assert plan.params == rec["shape"]["params"] and plan.tokens >= cfg.train.tokens and plan.fits


def test_recommend_takes_hyper_json_and_gpu_hours(fit_dir, tmp_path):
    import shutil

    d = tmp_path / "fit"
    shutil.copytree(fit_dir, d)
    s = _sweep_from_hidden_laws(0)
    table = write_csv(tmp_path / "sweep.csv", ["flops", "lr", "batch_tokens", "loss"],
                      zip(s.flops, s.lr, s.batch, s.loss, strict=True))
    assert invoke("hyperfit", str(table), "--out", str(d), "--bootstrap", "30").exit_code == 0
    hyper = json.loads((d / "hyper.json").read_text())
    r = invoke("recommend", str(d), "--config", str(LLAMA), "--gpu-hours", "2000", "--gpu", "h100-sxm",
               "--gpus", "8", "--mfu", "0.4", "--json")
    assert r.exit_code == 0, r.output
    rec = json.loads(r.stdout)
    assert rec["flops"] == pytest.approx(2000 * 3600 * 989.4e12 * 0.4, rel=0.01)
    lr = hyper["lr"]["coefficient"] * rec["flops"] ** hyper["lr"]["exponent"]
    assert rec["lr"] == pytest.approx(lr) and rec["hyper"]["lr_ci95"][0] < lr < rec["hyper"]["lr_ci95"][1]
    assert rec["global_batch_size"] % 8 == 0 and rec["plan"]["gpus"] == 8
    assert rec["plan"]["gpu_hours"] == pytest.approx(2000, rel=0.25)  # the family's FLOPs per token, not 6N


def test_recommend_bad_budgets_and_fit_are_one_line(fit_dir, tmp_path):
    base = ("recommend", str(fit_dir), "--config", str(LLAMA))
    assert "--flops must be a positive" in one_error_line(invoke(*base, "--flops", "0"))
    assert "--flops must be a positive" in one_error_line(invoke(*base, "--flops", "-1e22"))
    assert "--gpu-hours must be positive" in one_error_line(invoke(*base, "--gpu-hours", "-5", "--gpu", "h100-sxm"))
    missing = ("recommend", str(tmp_path / "nofit"), "--config", str(LLAMA), "--flops", "1e23")
    assert "no fit.json" in one_error_line(invoke(*missing))
    r = invoke(*base, "--flops", "1e26", "--out", str(tmp_path / "far.yaml"))
    assert r.exit_code == 0 and "decades beyond the ladder's largest budget" in r.stderr


def _run(root: Path, name: str, n: float, d: float, loss: float) -> Path:
    rdir = root / name
    rdir.mkdir(parents=True)
    (rdir / "summary.json").write_text(json.dumps({"params": n, "tokens": d, "flops": 6 * n * d,
                                                   "final_val_loss": loss}))
    return rdir


def test_check_places_runs_and_appends(fit_dir, tmp_path):
    import shutil

    d = tmp_path / "fit"
    shutil.copytree(fit_dir, d)
    n, tokens = 3e9, 6e10  # 4x past the largest budget
    rec = json.loads(invoke("check", str(d), str(_run(tmp_path, "probe", n, tokens, 2.5)), "--json").stdout)
    lo, hi = rec["ci95"]
    inside = _run(tmp_path, "inside", n, tokens, (lo + hi) / 2)
    above = _run(tmp_path, "above", n, tokens, hi * 1.05)
    got = [json.loads(invoke("check", str(d), str(r), "--json").stdout) for r in (inside, above)]
    assert [g["where"] for g in got] == ["inside", "above"]
    assert got[0]["position"] == pytest.approx(0.5) and got[1]["position"] > 1
    lines = (d / "checks.jsonl").read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[-1])["run"] == str(above.resolve())
    assert (d / "frontier.png").stat().st_size > 10_000
    assert "no summary.json" in one_error_line(invoke("check", str(d), str(tmp_path / "none")))


def test_mounted_on_the_pretrain_command():
    from pretrain import cli

    cli._mount(["pretrain", "scaling", "recommend", "--help"])
    for command, option in (("recommend", "--gpu-hours"), ("check", "checks.jsonl"), ("hyperfit", "--bootstrap")):
        r = CliRunner().invoke(cli.app, ["scaling", command, "--help"])
        assert r.exit_code == 0 and option in r.output, r.output


def test_hyperfit_reads_sweep_runs_and_lr_only_sweeps(tmp_path):
    """Run directories: lr from the schedule, batch = tokens / steps. A sweep of lr alone gives the lr law only."""
    s = _sweep_from_hidden_laws(1)
    for i, (c, lr, b, loss) in enumerate(zip(s.flops, s.lr, s.batch, s.loss, strict=True)):
        if i % 5 != 2:  # the middle batch of each budget's grid (batch is the inner loop)
            continue
        rdir = tmp_path / "sweep" / f"run-{i:03d}"
        rdir.mkdir(parents=True)
        steps = 100
        (rdir / "summary.json").write_text(json.dumps({
            "flops": c, "budget": c, "tokens": b * steps, "steps": steps, "schedule": {"lr": lr},
            "final_val_loss": loss}))
    r = invoke("hyperfit", str(tmp_path / "sweep"), "--out", str(tmp_path / "fit"), "--bootstrap", "50")
    assert r.exit_code == 0, r.output
    doc = json.loads((tmp_path / "fit" / "hyper.json").read_text())
    assert doc["batch"] is None and len(doc["runs"]) == 20
    assert abs(doc["lr"]["exponent"] - TRUE_EXPONENTS["lr"]) < 0.05


def test_a_fit_json_without_bootstrap_laws_is_rebootstrapped(fit_dir):
    """fit.json from before approach3.bootstrap_laws: the laws are refitted from its runs, same count."""
    from pretrain.scaling.saved import fit_from_json

    doc = json.loads((fit_dir / "fit.json").read_text())
    kept = fit_from_json(doc)
    del doc["approach3"]["bootstrap_laws"]
    redone = fit_from_json(doc)
    assert len(redone.approach3_samples) == len(kept.approach3_samples) == doc["approach3"]["bootstrap"]
    lo, hi = redone.predict3(1e22)["ci95"]["n_opt"]
    assert lo < kept.predict3(1e22)["n_opt"] < hi
