"""A mixture of experts trained end to end through Ray Train workers and DeepSpeed ZeRO-2, its experts spread over
the two workers (expert parallelism 2): routing loads, the balance loss and the worst layer's max/mean load in every
row, a heatmap of the loads, active parameters in the summary and the FLOPs; a run stopped at step 8 and resumed to 16 follows the
uninterrupted one within 1e-5 (the balance bias and both ranks' experts included), its checkpoint holds every expert
in DeepSpeed's per-expert files, its final weights hold every expert, and a resume at another expert parallelism is
refused in one line."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.test_train import _train

MOE = ["model.type=mixtral", "model.moe.n_experts=4", "model.moe.top_k=2", "model.moe.d_expert=48",
       "model.moe.aux_loss=0.01", "model.moe.z_loss=0.001", "model.moe.bias_balance=0.001", "model.moe.score=sigmoid",
       "model.moe.expert_parallel=2", "checkpoint.every=8", "cluster.workers=2", "zero.stage=2"]


@pytest.mark.slow
@pytest.mark.ray
def test_an_expert_parallel_moe_run_logs_its_routing_and_resumes_exactly(tmp_path, tiny_shards, ray_local):
    from pretrain.errors import ResumeError
    from pretrain.train.resume import plan_resume
    from pretrain.train.storage import Storage

    full = _train(tmp_path, tiny_shards, "full", *MOE, "train.steps=16")
    assert [r["step"] for r in full] == list(range(1, 17))
    row = full[-1]
    loads = [row[f"moe/l0/load{e}"] for e in range(4)]
    assert sum(loads) == pytest.approx(1.0) and row["moe/l0/max_load"] == pytest.approx(max(loads) / 0.25)
    assert row["moe_max_load"] >= 1.0 and row["moe_aux_loss"] > 0 and 0 < row["moe/l1/entropy"] <= 1.3863
    runs = tmp_path / "runs"
    summary = json.loads((runs / "full" / "summary.json").read_text())
    idle = 2 * (4 - 2) * 3 * 64 * 48  # two layers, two of four experts idle per token
    assert summary["params"] - summary["params_active"] == idle
    # FLOPs per token: 6 x the active matrix weights (the LM head included) plus attention.
    assert summary["flops_per_token"] < 6 * (summary["params"] - idle) + 12 * 2 * 64 * 32 + 1

    # The load heatmap (layers x experts, the mean since the last evaluation; here the run's end) for W&B.
    heat = runs / "full" / "heatmaps" / "moe-load-step-16.png"
    assert heat.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and heat.stat().st_size > 5000

    # Every expert of both layers in DeepSpeed's per-expert files (each EP rank wrote its two).
    step8 = runs / "full" / "checkpoints" / "step-8"
    assert sorted(p.name for p in step8.glob("layer_*_expert_*")) == sorted(
        f"layer_{L}_expert_{e}_mp_rank_00_model_states.pt" for L in range(2) for e in range(4))
    assert json.loads((step8 / "meta.json").read_text())["expert_parallel"] == 2

    _train(tmp_path, tiny_shards, "split", *MOE, "train.steps=8")
    resumed = _train(tmp_path, tiny_shards, "split", *MOE, "train.steps=16")
    assert [r["step"] for r in resumed] == list(range(1, 17))
    for a, b in zip(full[8:], resumed[8:], strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), a["step"]
        assert b["moe_max_load"] == pytest.approx(a["moe_max_load"], rel=1e-5), a["step"]

    # The final weights gather both ranks' experts: all four, the same after the resume as without it.
    weights = {name: load_file(runs / name / "final" / "model.safetensors") for name in ("full", "split")}
    experts = [k for k in weights["full"] if ".experts." in k]
    assert experts and all(weights["full"][k].shape[0] == 4 for k in experts)
    for k in experts:
        torch.testing.assert_close(weights["split"][k], weights["full"][k], rtol=1e-5, atol=1e-6)
        assert not torch.equal(weights["full"][k][:2], weights["full"][k][2:])  # not one rank's half twice

    # Another expert parallelism, or another world size at EP 2: refused in one line, before anything loads.
    store = Storage(str(runs / "full" / "checkpoints"))
    with pytest.raises(ResumeError, match=r"saved with model.moe.expert_parallel 2 on 2 workers; this run has 1 on 2"):
        plan_resume(store, None, world=2, ep=1)
    with pytest.raises(ResumeError, match=r"resumes with the same expert_parallel and workers"):
        plan_resume(store, None, world=4, ep=2)
    assert plan_resume(store, None, world=2, ep=2).step == 16
