"""A mixture of experts trained end to end through Ray Train workers and DeepSpeed ZeRO-2: routing loads, the
balance loss and the worst layer's max/mean load in every row, active parameters in the summary and the FLOPs; a
run stopped at step 4 and resumed to 8 follows the uninterrupted one within 1e-5, the balance bias included."""

from __future__ import annotations

import json

import pytest

from tests.test_train import _train

MOE = ["model.type=mixtral", "model.moe.n_experts=4", "model.moe.top_k=2", "model.moe.d_expert=48",
       "model.moe.aux_loss=0.01", "model.moe.z_loss=0.001", "model.moe.bias_balance=0.001", "model.moe.score=sigmoid",
       "checkpoint.every=4", "cluster.workers=2", "zero.stage=2"]


@pytest.mark.slow
@pytest.mark.ray
def test_a_moe_run_logs_its_routing_and_resumes_exactly(tmp_path, tiny_shards, ray_local):
    full = _train(tmp_path, tiny_shards, "full", *MOE, "train.steps=8")
    assert [r["step"] for r in full] == list(range(1, 9))
    row = full[-1]
    loads = [row[f"moe/l0/load{e}"] for e in range(4)]
    assert sum(loads) == pytest.approx(1.0) and row["moe/l0/max_load"] == pytest.approx(max(loads) / 0.25)
    assert row["moe_max_load"] >= 1.0 and row["moe_aux_loss"] > 0 and 0 < row["moe/l1/entropy"] <= 1.3863
    summary = json.loads((tmp_path / "runs" / "full" / "summary.json").read_text())
    idle = 2 * (4 - 2) * 3 * 64 * 48  # two layers, two of four experts idle per token
    assert summary["params"] - summary["params_active"] == idle
    # FLOPs per token: 6 x the active matrix weights (the LM head included) plus attention.
    assert summary["flops_per_token"] < 6 * (summary["params"] - idle) + 12 * 2 * 64 * 32 + 1

    _train(tmp_path, tiny_shards, "split", *MOE, "train.steps=4")
    resumed = _train(tmp_path, tiny_shards, "split", *MOE, "train.steps=8")
    assert [r["step"] for r in resumed] == list(range(1, 9))
    for a, b in zip(full[4:], resumed[4:], strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), a["step"]
        assert b["moe_max_load"] == pytest.approx(a["moe_max_load"], rel=1e-5), a["step"]
