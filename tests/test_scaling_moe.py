"""Mixture-of-experts scaling ladders: sizes that name experts (`64x2-e4k1`) or a config that is a mixture of
experts, planned with tokens per budget from the active parameters; the table's params_active column; fits whose N
is the active parameters (by default when a run is sparse). Nothing is trained: the ladder is planned, and the fits
read run directories and tables written here from a known law."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pretrain.cli.scaling import app
from pretrain.load import load_config
from pretrain.scaling.approach3 import Law
from pretrain.scaling.ladder import LadderError, parse_size, plan_ladder
from pretrain.scaling.table import read_runs, read_table

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.vocab_size=50304", "model.max_seq_len=32", "model.kernels=reference", "train.micro_batch_size=4",
        "train.global_batch_size=8", "schedule.warmup_steps=2", "eval.every=0", "checkpoint.every=0",
        "cluster.workers=1", "zero.stage=0", "objective.sample_tokens=0", "log.wandb=false"]
LAW = Law(E=1.82, A=482.01, B=2085.43, alpha=0.3478, beta=0.3658)  # Besiroglu et al. 2024's refit


def _cfg(tmp_path: Path, shards: Path, config: str = "configs/gpt-tiny.yaml", *extra: str):
    return load_config(ROOT / config, [*TINY, f"run.dir={tmp_path / 'runs'}", "run.name=lad",
                                       f"data.train={shards / 'train'}", f"data.val={shards / 'val'}", *extra])


def test_moe_sizes():
    s = parse_size(" 128 x 4 - e8k2 ", 64)
    assert (s.label, s.d_model, s.n_layers, s.n_heads, s.experts, s.top_k) == ("128x4-e8k2", 128, 4, 2, 8, 2)
    s = parse_size("64x2x4-E16", 64)
    assert (s.label, s.n_heads, s.experts, s.top_k) == ("64x2x4-e16", 4, 16, None)
    assert parse_size("64x2", 64).experts is None  # dense, as before
    with pytest.raises(LadderError, match=r"want 1 <= top-k <= experts \(-e2k4\)"):
        parse_size("64x2-e2k4", 64)
    with pytest.raises(LadderError, match="-eE or -eEkK for E experts"):
        parse_size("64x2-8e2", 64)


def test_plan_moe_sizes_count_active_parameters(tmp_path, tiny_shards):
    from pretrain.length import flops_per_unit, parameter_counts
    from pretrain.objectives.preflight import preflight

    cfg = _cfg(tmp_path, tiny_shards)  # a dense GPT-2 config: the sizes make it sparse
    lad = plan_ladder(cfg, budgets=[1e10, 3e10], sizes=["32x1-e4k1", "64x2-e4k1"], head_dim=32, out=tmp_path / "lad")
    assert lad.moe == {"n_experts": 4, "top_k": 1} and len(lad.rungs) == 4
    for r in lad.rungs:
        run = lad.configs[r.name]
        assert r.name.endswith(f"-{r.size}") and r.size.endswith("-e4k1")
        assert (run.model.moe.n_experts, run.model.moe.top_k) == (4, 1)
        counts = parameter_counts(run)
        assert r.params_active == counts["params_active"] < r.params  # 3 of 4 experts idle per token
        objective = preflight(run)
        # Tokens per budget follow the active parameters: counting every expert would give fewer tokens.
        dense_like = flops_per_unit(run, objective, {**counts, "params_active": counts["params"]})
        assert r.flops_per_token == flops_per_unit(run, objective) < dense_like
        assert r.budget <= r.flops < r.budget + r.flops_per_token * 8 * 32
    plan = lad.plan_json()
    assert plan["moe"] == lad.moe and all(row["params_active"] < row["params"] for row in plan["runs"])

    # A config that is a mixture of experts already (the Mixtral preset): plain sizes keep its routing.
    mix = plan_ladder(_cfg(tmp_path, tiny_shards, "configs/moe-tiny.yaml", "model.moe.d_expert=null"),
                      budgets=[3e10], sizes=["32x1", "64x2"], head_dim=32, out=tmp_path / "mix")
    assert mix.moe == {"n_experts": 8, "top_k": 2} and all(r.params_active < r.params for r in mix.rungs)
    # A dense config's ladder stays dense: active equals total.
    dense = plan_ladder(cfg, budgets=[3e10], sizes=["32x1"], head_dim=32, out=tmp_path / "dense")
    assert dense.moe is None and dense.rungs[0].params_active == dense.rungs[0].params
    # One sparsity per ladder.
    with pytest.raises(LadderError, match=r"sizes 32x1-e4k1 \(4 experts, top-1\) and 64x2 \(dense\) differ in sparsity"):
        plan_ladder(cfg, budgets=[3e10], sizes=["32x1-e4k1", "64x2"], head_dim=32, out=tmp_path / "x")
    with pytest.raises(LadderError, match=r"size 32x1-e1: .*top_k \(2\) must not exceed"):
        plan_ladder(_cfg(tmp_path, tiny_shards, "configs/moe-tiny.yaml"), budgets=[3e10], sizes=["32x1-e1"],
                    head_dim=32, out=tmp_path / "y")


def test_example_moe_ladder_plans(tmp_path, tiny_shards):
    from pretrain import cli

    cli._mount(["pretrain", "scaling"])
    args = ["scaling", "ladder", str(ROOT / "configs/ladder-moe-tiny.yaml"), *TINY[:2], "log.wandb=false",
            f"data.train={tiny_shards / 'train'}", f"data.val={tiny_shards / 'val'}", "--out", str(tmp_path / "l"),
            "--plan"]
    r = CliRunner().invoke(cli.app, args)
    assert r.exit_code == 0, r.output
    assert "8 experts, top-2: N = active parameters" in " ".join(r.output.split())  # the title, maybe wrapped
    plan = json.loads((tmp_path / "l" / "ladder.json").read_text())
    assert plan["moe"] == {"n_experts": 8, "top_k": 2} and len(plan["runs"]) == 18
    assert all(row["params_active"] < row["params"] for row in plan["runs"])


def make_moe_runs(root: Path, *, active_key: bool = True) -> list[Path]:
    """Run directories of a sparse ladder (5 budgets x 7 sizes) whose loss follows LAW in the active
    parameters, with C = 6 N_active D; the total is 2.5 to 6 times the active count, varying by size."""
    dirs = []
    rng = np.random.default_rng(0)
    for c in np.logspace(18, 22, 5):
        n_opt = float(LAW.optimum(c)[0])
        for active in n_opt * np.exp(np.linspace(-1.5, 1.5, 7)):
            tokens = c / (6 * active)
            rdir = root / f"run-{len(dirs):02d}"
            rdir.mkdir(parents=True)
            total = active * rng.uniform(2.5, 6.0)
            summary = {"params": total, "params_non_embedding": 0.9 * total, "tokens": tokens, "flops": c,
                       "final_val_loss": float(LAW.loss(active, tokens)), "budget": c, "data": "corpus",
                       "tokenizer": "bpe", "objective": "causal_lm"}
            if active_key:
                summary["params_active"] = active
            (rdir / "summary.json").write_text(json.dumps(summary))
            dirs.append(rdir)
    return dirs


def test_fit_takes_active_parameters_for_a_mixture_of_experts(tmp_path):
    make_moe_runs(tmp_path / "moe")
    out = tmp_path / "fit"
    r = CliRunner().invoke(app, ["fit", str(tmp_path / "moe"), "--out", str(out), "--starts", "8",
                                 "--bootstrap", "8", "--target-flops", "1e23"])
    assert r.exit_code == 0, r.output
    fit = json.loads((out / "fit.json").read_text())
    assert fit["source"]["params"] == "active"  # the default (auto) for sparse runs
    assert fit["flops_per_param_token"] == pytest.approx(6.0)  # C = 6 N_active D
    a3 = fit["approach3"]
    assert a3["alpha"] == pytest.approx(LAW.alpha, abs=5e-3) and a3["beta"] == pytest.approx(LAW.beta, abs=5e-3)
    assert fit["target"]["approach3"]["n_opt"] == pytest.approx(float(LAW.optimum(1e23)[0]), rel=0.05)
    run = fit["runs"][0]
    assert run["n"] == run["params_active"] < run["params"]
    # The same runs on their total parameters: k far below 6 and another law; what the default avoids.
    r = CliRunner().invoke(app, ["fit", str(tmp_path / "moe"), "--out", str(tmp_path / "total"), "--starts", "8",
                                 "--bootstrap", "0", "--params", "total"])
    assert r.exit_code == 0, r.output
    total = json.loads((tmp_path / "total" / "fit.json").read_text())
    assert total["source"]["params"] == "total" and total["flops_per_param_token"] < 3.0


def test_table_params_active_column(tmp_path):
    dirs = make_moe_runs(tmp_path / "moe")
    pts = read_runs(dirs)
    assert pts.params_kind == "active" and np.array_equal(pts.params, pts.counts["params_active"])
    assert np.all(pts.counts["params_active"] < pts.counts["params"])
    assert read_runs(dirs, params="non-embedding").params_kind == "non-embedding"
    # A dense run's summary without params_active: every parameter is active, and N is the total.
    dense = read_runs(make_moe_runs(tmp_path / "dense", active_key=False))
    assert dense.params_kind == "total"
    assert np.array_equal(dense.counts["params_active"], dense.counts["params"])
    assert all(row["params_active"] == row["params"] == row["n"] for row in dense.rows())

    path = tmp_path / "t.csv"
    path.write_text("params,params_active,tokens,loss\n4e8,1e8,2e9,3.1\n8e8,2e8,2e9,3.0\n")
    table = read_table(path)
    assert table.params_kind == "active" and list(table.params) == [1e8, 2e8]
    assert list(table.flops) == [6 * 1e8 * 2e9, 6 * 2e8 * 2e9]  # C = 6 N D on the N fitted
    assert read_table(path, params="total").params_kind == "total"
    path.write_text("params,tokens,loss\n4e8,2e9,3.1\n")
    assert read_table(path).params_kind == "total"
    with pytest.raises(ValueError, match=r"lacks the column params_active \(--params active\)"):
        read_table(path, params="active")
    path.write_text("params,params_active,tokens,loss\n4e8,5e8,2e9,3.1\n")
    with pytest.raises(ValueError, match=r"row 2: params_active \(5e\+08\) exceeds params \(4e\+08\)"):
        read_table(path)
    with pytest.raises(ValueError, match="--params must be one of auto, total, non-embedding, active"):
        read_table(path, params="sparse")
