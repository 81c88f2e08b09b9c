"""Diffusion ladders (issue 27, point 5): DiT sizes with a patch side (`-pP`), units counted in images with the
DiT family's FLOPs per image, a fit of points in images (fit.json and the plots say so; tokens and images are
not mixed). What a trained DiT run's summary gives the fit is held in tests/test_diffusion_train.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pretrain.cli.scaling_decide import app  # the `pretrain scaling` app, with check mounted
from pretrain.load import load_config
from pretrain.scaling import ScalingError
from pretrain.scaling.approach3 import Law
from pretrain.scaling.ladder import LadderError, parse_size, plan_ladder
from pretrain.scaling.table import read_runs

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs/ladder-dit-fashion.yaml"
SMALL = ["model.kernels=reference", "log.wandb=false", "eval.batches=2", "train.micro_batch_size=8",
         "train.global_batch_size=8", "schedule.warmup_steps=2"]


def _cfg(tmp_path: Path, fashion: Path, *extra: str):
    return load_config(CONFIG, [*SMALL, f"run.dir={tmp_path / 'runs'}", f"data.train={fashion / 'train'}",
                                f"data.val={fashion / 'val'}", *extra])


def test_dit_sizes():
    assert parse_size("192x6-p2", 64) == parse_size("192 x 6 - p 2", 64)
    s = parse_size("192x6-p2", 64)
    assert (s.label, s.d_model, s.n_layers, s.n_heads, s.patch, s.experts) == ("192x6-p2", 192, 6, 3, 2, None)
    assert parse_size("128x4x2-p4-e8k2", 64).label == "128x4x2-p4-e8k2"
    assert parse_size("64x2", 32).patch is None
    with pytest.raises(LadderError, match="patch side is at least 1"):
        parse_size("64x2-p0", 32)


def test_a_dit_ladder_counts_images(tmp_path, fashion):
    from pretrain.length import flops_per_unit, parameter_counts
    from pretrain.objectives.preflight import preflight

    cfg = _cfg(tmp_path, fashion)
    lad = plan_ladder(cfg, budgets=[2e10, 6e10], sizes=["32x1", "64x2", "64x2-p2"], out=tmp_path / "d")
    assert lad.unit == "images" and lad.plan_json()["unit"] == "images"
    by = {(r.size, r.budget): r for r in lad.rungs}
    for r in lad.rungs:  # the family's FLOPs per image at that shape; images = whole steps of 8 for the budget
        run = lad.configs[r.name]
        assert (run.model.d_model, run.model.n_layers) == (r.d_model, r.n_layers)
        assert run.model.patch_size == (2 if r.size.endswith("-p2") else 4)
        assert run.objective.val_times == [0.1, 0.3, 0.5, 0.7, 0.9]  # one fixed set of noise levels for all
        assert r.flops_per_token == pytest.approx(flops_per_unit(run, preflight(run), parameter_counts(run)))
        assert r.steps == math.ceil(r.budget / (r.flops_per_token * 8)) and r.tokens == 8 * r.steps
    # Patch 2 gives 256 patches of a 32x32 image where patch 4 gives 64: 4x the work of every linear layer and
    # 16x attention's, with about the same parameters (only the patch embedding and the final layer change).
    p4, p2 = by[("64x2", 2e10)], by[("64x2-p2", 2e10)]
    assert 4 < p2.flops_per_token / p4.flops_per_token < 16 and abs(p2.params / p4.params - 1) < 0.05
    with pytest.raises(LadderError, match="model.type=gpt2 has no patch size"):
        plan_ladder(load_config(ROOT / "configs/ladder-tiny.yaml", ["log.wandb=false"]), budgets=[1e12],
                    sizes=["64x2-p4"], out=tmp_path / "lm")


def _runs(root: Path, unit: str, law: Law, sizes=(2e4, 5e4, 1e5, 2e5, 5e5), budgets=(1e11, 3e11, 1e12)) -> None:
    for c in budgets:
        for n in sizes:
            d = c / (6 * n)
            rdir = root / f"{c:g}-{n:g}"
            rdir.mkdir(parents=True)
            summary = {"params": n, unit: d, "flops": c, "final_val_loss": float(law.loss(n, d)), "budget": c}
            (rdir / "summary.json").write_text(json.dumps({**summary, **({} if unit == "tokens" else {"unit": unit})}))


def test_the_fit_counts_images(tmp_path):
    law = Law(E=0.3, A=40.0, B=60.0, alpha=0.4, beta=0.3)
    _runs(tmp_path / "dit", "images", law)
    points = read_runs([tmp_path / "dit"])
    assert points.unit == "images" and len(points) == 15
    r = CliRunner().invoke(app, ["fit", str(tmp_path / "dit"), "--out", str(tmp_path / "fit"), "--starts", "8",
                                 "--bootstrap", "8"])
    assert r.exit_code == 0, r.output
    assert "D_opt (images)" in r.output and "images per parameter" in r.output
    fit = json.loads((tmp_path / "fit" / "fit.json").read_text())
    assert fit["source"]["unit"] == "images" and fit["approach3"]["alpha"] == pytest.approx(0.4, abs=0.01)
    _runs(tmp_path / "lm", "tokens", law, sizes=(3e5,), budgets=(1e12,))
    with pytest.raises(ScalingError, match="runs count their data in images and tokens: a fit needs one unit"):
        read_runs([tmp_path / "dit", tmp_path / "lm"])


def test_check_a_run_in_images_extends_the_ladder_wandb_run(tmp_path, monkeypatch):
    """`pretrain scaling check` on a fit of images: D read in images (a run in tokens refused in one line), and
    the check's table and the redrawn frontier go to the ladder's W&B summary run, resumed by its id."""
    import wandb

    from pretrain.scaling.report import WANDB_RUN

    monkeypatch.setenv("WANDB_MODE", "offline")
    law = Law(E=0.3, A=40.0, B=60.0, alpha=0.4, beta=0.3)
    _runs(tmp_path / "dit", "images", law)
    fit = tmp_path / "fit"
    assert CliRunner().invoke(app, ["fit", str(tmp_path / "dit"), "--out", str(fit), "--starts", "8",
                                    "--bootstrap", "16"]).exit_code == 0
    run = wandb.init(project="p", name="ladder", dir=str(fit), mode="offline",
                     settings=wandb.Settings(console="off", silent=True))
    run_id = run.id
    run.finish()
    (fit / WANDB_RUN).write_text(json.dumps({"id": run_id, "project": "p", "name": "ladder"}))
    _runs(tmp_path / "probe", "images", law, sizes=(1e6,), budgets=(4e12,))
    probe = next((tmp_path / "probe").iterdir())
    r = CliRunner().invoke(app, ["check", str(fit), str(probe), "--json"])
    assert r.exit_code == 0, r.output
    rec = json.loads(r.stdout[r.stdout.index("{"):])
    assert rec["unit"] == "images" and rec["tokens"] == pytest.approx(4e12 / 6e6)
    assert rec["loss"] == pytest.approx(rec["predicted"], rel=2e-3)  # the probe lies on the law the fit found
    # Resumed in the same second, the run's offline directory gets a "-1" suffix.
    tables = list((fit / "wandb").glob(f"offline-run-*-{run_id}*/files/media/table/checks_*.table.json"))
    assert len(list((fit / "wandb").glob(f"offline-run-*-{run_id}*"))) == 2 and len(tables) == 1
    assert json.loads(tables[0].read_text())["data"][0][0] == str(probe.resolve())
    _runs(tmp_path / "lm", "tokens", law, sizes=(3e5,), budgets=(1e12,))
    r = CliRunner().invoke(app, ["check", str(fit), str(next((tmp_path / "lm").iterdir()))])
    assert r.exit_code == 2 and "counts its data in tokens, the fit in images" in r.output
