"""The Transformer family and its presets: shapes, parameter counts, causality (and its absence in the
encoder), tying, initial loss, summed loss over supervised targets, generation."""

from __future__ import annotations

import math

import pytest
import torch

from pretrain.models import get_family, registered
from pretrain.models.transformer import IGNORE, Transformer, TransformerConfig, count_parameters, d_ff
from pretrain.objectives.causal_lm import generate


def _cfg(family: str, **kw) -> TransformerConfig:
    base = dict(n_layers=2, d_model=64, n_heads=4, vocab_size=211, max_seq_len=40, kernels="reference")
    return get_family(family).config(**{**base, **kw})


def test_presets_are_architecture_fields():
    assert {"gpt2", "llama", "bert"} <= set(registered())
    g, ll, b = _cfg("gpt2"), _cfg("llama"), _cfg("bert")
    assert (g.norm, g.position, g.mlp, g.bias, g.tie_embeddings, g.causal) == ("layernorm", "learned", "gelu", True, True, True)
    assert (ll.norm, ll.position, ll.mlp, ll.bias, ll.tie_embeddings) == ("rmsnorm", "rope", "swiglu", False, False)
    assert not b.causal and b.norm == "layernorm"
    # A preset is only defaults: a GPT-2 with RoPE and SwiGLU is built from the same fields.
    model = Transformer(_cfg("gpt2", position="rope", mlp="swiglu"))
    assert model.pos_embed is None and hasattr(model.blocks[0].mlp, "gate_proj")


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_shapes_and_loss_at_init(family):
    model = Transformer(_cfg(family, n_kv_heads=2 if family == "llama" else None))
    ids = torch.randint(0, 211, (3, 17))
    assert model(ids).shape == (3, 17, 211)
    total = model(ids[:, :-1], targets=ids[:, 1:])  # summed over the 48 targets
    # Small init: the first prediction is close to uniform over the vocabulary.
    assert abs(total.item() / 48 - math.log(211)) < 0.2


def test_loss_is_a_sum_over_supervised_targets_only():
    model = Transformer(_cfg("bert"))
    ids = torch.randint(0, 211, (2, 12))
    targets = ids.clone()
    targets[0, ::2] = IGNORE
    targets[1, 5:] = IGNORE
    logits = model(ids)
    ref = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE,
                                            reduction="sum")
    torch.testing.assert_close(model(ids, targets=targets), ref, rtol=1e-5, atol=1e-5)
    rows = targets != IGNORE
    torch.testing.assert_close(model(ids, logits_at=rows), logits[rows], rtol=1e-5, atol=1e-5)
    # No supervised target at all: zero, not NaN, and still differentiable.
    none = model(ids, targets=torch.full_like(ids, IGNORE))
    none.backward()
    assert none.item() == 0.0


def test_gpt2_parameter_count_and_tying():
    m = _cfg("gpt2")
    model = Transformer(m)
    d, L, V, T = 64, 2, 211, 40
    per_block = 4 * d * d + 4 * d + 2 * d * 4 * d + 4 * d + d + 4 * d  # attn w+b, mlp w+b, two LayerNorms
    expected = V * d + T * d + L * per_block + 2 * d
    counts = count_parameters(model)
    assert counts["params"] == expected and counts["tied"]
    assert counts["params_non_embedding"] == expected - V * d - T * d
    assert model.lm_head.weight is model.embed.weight


def test_llama_gqa_untied_count():
    m = _cfg("llama", n_kv_heads=1)
    model = Transformer(m)
    d, L, V, hd = 64, 2, 211, 16
    per_block = d * d + 2 * d * hd + d * d + 3 * d * d_ff(m) + 2 * d
    assert count_parameters(model)["params"] == 2 * V * d + L * per_block + d
    assert model.lm_head.weight is not model.embed.weight


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_causal(family):
    model = Transformer(_cfg(family))
    ids = torch.randint(0, 211, (1, 12))
    changed = ids.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % 211
    a, b = model(ids), model(changed)
    assert torch.allclose(a[:, :8], b[:, :8], atol=1e-6)
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_encoder_sees_both_directions():
    model = Transformer(_cfg("bert"))
    ids = torch.randint(0, 211, (1, 12))
    changed = ids.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % 211
    assert not torch.allclose(model(ids)[:, :8], model(changed)[:, :8])


def test_residual_projections_scaled_init():
    model = Transformer(_cfg("gpt2", n_layers=8, d_model=256, n_heads=4))
    std_o = model.blocks[0].attn.o_proj.weight.std().item()
    std_q = model.blocks[0].attn.q_proj.weight.std().item()
    assert std_q == pytest.approx(0.02, rel=0.05)
    assert std_o == pytest.approx(0.02 / math.sqrt(16), rel=0.05)


def test_activation_checkpointing_same_gradients():
    model = Transformer(_cfg("llama"))
    ids = torch.randint(0, 211, (2, 16))
    model(ids[:, :-1], targets=ids[:, 1:]).backward()
    g1 = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.activation_checkpointing = True
    model(ids[:, :-1], targets=ids[:, 1:]).backward()
    for a, p in zip(g1, model.parameters(), strict=False):
        torch.testing.assert_close(a, p.grad)


def test_generate_and_length_check():
    model = Transformer(_cfg("gpt2")).eval()
    out = generate(model, torch.tensor([[1, 2, 3]]), 5, max_len=40, generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, 8) and out[0, :3].tolist() == [1, 2, 3]
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 41, dtype=torch.long))


def test_gelu_under_compile_is_atens_gelu_written_with_a_sigmoid():
    """`gelu_tanh` compiled (the sigmoid form inductor codes faster) equals ATen's tanh GELU, values and grads,
    over the range where either form could overflow or cancel; and the compiled graph holds no tanh."""
    from torch._dynamo.testing import AotEagerAndRecordGraphs

    from pretrain.models.layers import gelu_tanh

    x = torch.cat([torch.linspace(-30, 30, 6001), torch.randn(4096) * 3]).requires_grad_()
    want = torch.nn.functional.gelu(x, approximate="tanh")
    (gx,) = torch.autograd.grad(want.square().sum(), x)
    backend = AotEagerAndRecordGraphs()
    got = torch.compile(gelu_tanh, backend=backend, fullgraph=True)(x)
    (gx_got,) = torch.autograd.grad(got.square().sum(), x)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gx_got, gx, rtol=1e-5, atol=1e-5)
    (graph,) = backend.fw_graphs
    ops = {str(n.target) for n in graph.graph.nodes if n.op == "call_function"}
    assert "aten.sigmoid.default" in ops and not any("tanh" in op or "gelu" in op for op in ops), ops
    assert torch.equal(gelu_tanh(x.detach()), want.detach())  # eager: ATen's own op
