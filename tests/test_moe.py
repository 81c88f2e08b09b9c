"""Mixture-of-experts blocks of the Transformer family (pretrain/models/moe.py): dropless routing equals a per-token
loop over the chosen experts, the router variants, capacity, the auxiliary losses, the balance bias, active-parameter
counts and FLOPs, and bad configs in one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pretrain.load import load_config
from pretrain.models import get_family
from pretrain.models.moe import MoE, MoeConfig, after_reduce, moe_metrics

ROOT = Path(__file__).resolve().parents[1]


def _block(seed: int = 0, **kw) -> MoE:
    torch.manual_seed(seed)
    cfg = MoeConfig(**{"n_experts": 5, "top_k": 2, **kw})
    m = MoE(cfg, 16, 24, "reference")
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.3)
    return m


def _loop(m: MoE, x: torch.Tensor) -> torch.Tensor:
    """Each token through each of its chosen experts, one at a time: what the grouped path must equal."""
    h = x.reshape(-1, x.shape[-1])
    weights, experts, _, _ = m.route(h)
    out = torch.zeros_like(h)
    f = m.experts.d_expert
    for t in range(h.shape[0]):
        for j in range(m.cfg.top_k):
            e = int(experts[t, j])
            gu = h[t] @ m.experts.gate_up[e]
            out[t] += weights[t, j] * ((F.silu(gu[:f]) * gu[f:]) @ m.experts.down[e])
    if m.shared is not None:
        s = m.shared(h)
        out = out + (torch.sigmoid(m.shared_gate(h)) * s if m.shared_gate is not None else s)
    return out.reshape(x.shape)


@pytest.mark.parametrize("kw", [
    {}, {"top_k": 1}, {"top_k": 3, "renormalize": False}, {"score": "sigmoid"},
    {"shared_width": 8, "shared_gate": True}, {"score": "sigmoid", "bias_balance": 0.01},
], ids=["softmax-k2", "k1", "k3-as-scored", "sigmoid", "shared-gated", "bias-balance"])
def test_dropless_routing_equals_a_loop_over_the_chosen_experts(kw):
    m = _block(**kw)
    if kw.get("bias_balance"):
        m.balance.copy_(torch.tensor([0.5, -0.5, 0.0, 0.2, -0.1]))  # a bias that changes the choice, not the weight
    x = torch.randn(3, 7, 16)
    got = m(x)
    assert torch.allclose(got, _loop(m, x), atol=1e-5), (got - _loop(m, x)).abs().max()
    weights, experts, _, _ = m.route(x.reshape(-1, 16))
    if m.cfg.renormalize:
        assert torch.allclose(weights.sum(-1), torch.ones(21))
    assert int(m.stats["counts"].sum()) == 21 * m.cfg.top_k  # dropless: every (token, slot) row computed


def test_gradients_reach_every_routed_expert_router_and_input():
    m = _block()
    x = torch.randn(2, 9, 16, requires_grad=True)
    m.train()
    (m(x).square().sum() + m.aux).backward()
    used = m.stats["counts"] > 0
    grads = m.experts.gate_up.grad.flatten(1).abs().sum(-1)
    assert bool((grads[used] > 0).all()) and bool((grads[~used] == 0).all())
    assert m.router.weight.grad.abs().sum() > 0 and x.grad.abs().sum() > 0


def test_capacity_drops_rows_past_each_experts_queue_and_counts_them():
    m = _block(capacity_factor=0.5)
    x = torch.randn(4, 8, 16)
    weights, experts, _, _ = m.route(x.reshape(-1, 16))
    capacity = -(-0.5 * 32 * 2 // 5)  # ceil(factor x tokens x k / experts) = 7
    per_expert = torch.bincount(experts.reshape(-1), minlength=5)
    expect = int((per_expert - capacity).clamp(min=0).sum())
    m(x)
    assert int(m.stats["dropped"]) == expect > 0
    metrics = moe_metrics([type("B", (), {"mlp": m})()])
    assert metrics["moe/l0/dropped"][0] == expect


def test_auxiliary_losses_join_training_only_and_are_one_when_balanced():
    m = _block(aux_loss=1.0, z_loss=0.0)
    with torch.no_grad():
        m.router.weight.zero_()  # every score equal: top-k by index is unbalanced, probabilities are uniform
    m.train()
    m(torch.randn(2, 10, 16))
    # f: 2 of 5 experts get every row (share 1/2 each); P: 1/5 each -> E * sum f P = 5 * (2 * 1/2 * 1/5) = 1
    assert float(m.aux) == pytest.approx(1.0)
    m.eval()
    m(torch.randn(2, 10, 16))
    assert m.aux is None


def test_the_transformer_adds_the_aux_loss_per_token_in_training(tmp_path):
    cfg = load_config(ROOT / "configs/moe-tiny.yaml", ["model.kernels=reference", "model.n_layers=2",
                                                       "model.moe.aux_loss=0.5", "model.moe.z_loss=0.1"]).model
    torch.manual_seed(0)
    model = get_family(cfg.type).build(cfg)
    ids = torch.randint(0, 100, (2, 16))
    targets = ids.clone()
    targets[0, :5] = -100
    model.eval()
    plain = model(ids, targets)
    model.train()
    with_aux = model(ids, targets)
    aux = sum(b.mlp.aux for b in model.blocks)
    assert float(with_aux) == pytest.approx(float(plain + aux * 27), rel=1e-5)  # 27 counted targets


def test_balance_bias_moves_against_the_global_load():
    m = _block(score="sigmoid", bias_balance=0.1)
    block = type("B", (), {"mlp": m})()
    loads = {f"moe/l0/load{e}": v for e, v in enumerate([0.5, 0.2, 0.1, 0.1, 0.1])}
    out = after_reduce([block], loads)
    assert out["moe/l0/max_load"] == pytest.approx(0.5 / 0.2)
    assert torch.allclose(m.balance, torch.tensor([-0.1, 0.0, 0.1, 0.1, 0.1]))


def test_active_parameters_and_flops_count_k_of_e_experts():
    base = load_config(ROOT / "configs/moe-tiny.yaml", ["model.kernels=reference"]).model
    fam = get_family(base.type)
    counts = fam.count_parameters(fam.build(base))
    e, k, d, f, layers = base.moe.n_experts, base.moe.top_k, base.d_model, base.moe.d_expert, base.n_layers
    idle = layers * (e - k) * 3 * d * f
    assert counts["params"] - counts["params_active"] == idle
    dense_like = fam.flops_per_unit(base, {**counts, "params_active": counts["params"]}, {"seq_len": 128})
    assert dense_like - fam.flops_per_unit(base, counts, {"seq_len": 128}) == pytest.approx(6 * idle)


def test_every_other_layer_and_first_dense():
    cfg = load_config(ROOT / "configs/moe-tiny.yaml", ["model.kernels=reference", "model.n_layers=6",
                                                       "model.moe.every=2", "model.moe.first_dense=2"]).model
    model = get_family(cfg.type).build(cfg)
    assert [isinstance(b.mlp, MoE) for b in model.blocks] == [False, False, False, True, False, True]


@pytest.mark.parametrize("override, expect", [
    ("model.moe.top_k=9", "model.moe.top_k (9) must not exceed model.moe.n_experts (8)"),
    ("model.moe.shared_gate=true", "model.moe.shared_gate needs a shared expert"),
])
def test_bad_moe_configs_are_one_line(override, expect):
    r = subprocess.run([sys.executable, "-m", "pretrain.cli", "train", str(ROOT / "configs/moe-tiny.yaml"), override],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and expect in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
