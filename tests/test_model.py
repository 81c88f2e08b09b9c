"""The Transformer families: shapes, parameter counts, causality, tying, initial loss, generation."""

from __future__ import annotations

import math

import pytest
import torch

from pretrain.config import ModelConfig, d_ff
from pretrain.models.transformer import Transformer, count_parameters


def _cfg(family: str, **kw) -> ModelConfig:
    base = dict(family=family, n_layers=2, d_model=64, n_heads=4, vocab_size=211, max_seq_len=40, kernels="reference")
    return ModelConfig(**{**base, **kw})


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_shapes_and_loss_at_init(family):
    model = Transformer(_cfg(family, n_kv_heads=2 if family == "llama" else None))
    ids = torch.randint(0, 211, (3, 17))
    hidden = model(ids)
    assert hidden.shape == (3, 17, 64)
    assert model.logits(hidden).shape == (3, 17, 211)
    loss = model(ids[:, :-1], targets=ids[:, 1:])
    # Small init: the first prediction is close to uniform over the vocabulary.
    assert abs(loss.item() - math.log(211)) < 0.2


def test_gpt2_parameter_count_and_tying():
    m = _cfg("gpt2")
    model = Transformer(m)
    d, L, V, T = 64, 2, 211, 40
    per_block = 4 * d * d + 4 * d + 2 * d * 4 * d + 4 * d + d + 4 * d  # attn w+b, mlp w+b, two LayerNorms
    expected = V * d + T * d + L * per_block + 2 * d
    counts = count_parameters(model)
    assert counts["params"] == expected and counts["tied"]
    assert counts["params_non_embedding"] == expected - V * d - T * d
    assert model.output_weight is model.embed.weight


def test_llama_gqa_untied_count():
    m = _cfg("llama", n_kv_heads=1)
    model = Transformer(m)
    d, L, V, hd = 64, 2, 211, 16
    per_block = d * d + 2 * d * hd + d * d + 3 * d * d_ff(m) + 2 * d
    assert count_parameters(model)["params"] == 2 * V * d + L * per_block + d
    assert model.output_weight is not model.embed.weight


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_causal(family):
    model = Transformer(_cfg(family))
    ids = torch.randint(0, 211, (1, 12))
    changed = ids.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % 211
    a, b = model(ids), model(changed)
    assert torch.allclose(a[:, :8], b[:, :8], atol=1e-6)
    assert not torch.allclose(a[:, 8:], b[:, 8:])


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
    out = model.generate(torch.tensor([[1, 2, 3]]), 5, generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, 8) and out[0, :3].tolist() == [1, 2, 3]
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 41, dtype=torch.long))
