"""The DiT family: forward parity with diffusers' DiTTransformer2DModel on the same (random) weights, the
weight mapping both ways, the Triton path against the reference, the paper's parameter counts and Gflops,
config errors, adaLN-Zero at init, activation checkpointing."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DiTTransformer2DModel
from diffusers.models.embeddings import Timesteps, get_2d_sincos_pos_embed

from pretrain.config import ConfigError, typed_section
from pretrain.hub.dit_diffusers import from_diffusers, to_diffusers
from pretrain.models import get_family
from pretrain.models.dit import (
    DiT,
    DiTConfig,
    count_parameters,
    dims,
    flops_per_image,
    sincos_pos_embed,
    timestep_features,
)

TINY = dict(d_model=48, n_heads=3, n_layers=2)
CASES = {  # two sizes, patch 2 and 4, learn_sigma on and off, with and without a null-label row
    "16px-p4-rgb-sigma": dict(TINY, input_size=16, patch_size=4, in_channels=3, num_classes=10,
                              learn_sigma=True),
    "8px-p2-gray": dict(TINY, input_size=8, patch_size=2, in_channels=1, num_classes=7),
    "16px-p2-latent-nonull": dict(d_model=64, n_heads=4, n_layers=3, input_size=16, patch_size=2,
                                  in_channels=4, num_classes=5, learn_sigma=True, class_dropout_prob=0.0),
}


@torch.no_grad()
def _randomise(model: torch.nn.Module) -> None:
    """Every weight random, the zero-initialised adaLN and output layers included, at a scale that keeps
    activations O(1), so that any mismapped or unused tensor changes the output."""
    gen = torch.Generator().manual_seed(1)
    for p in model.parameters():
        std = 1 / math.sqrt(p[0].numel()) if p.dim() > 1 else 0.1
        p.copy_(torch.randn(p.shape, generator=gen) * std)


def _inputs(cfg: DiTConfig, batch: int = 4):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size, generator=gen)
    t = torch.tensor([0.0, 999.5, 3.25, 500.0])[:batch]
    hi = cfg.num_classes + (cfg.class_dropout_prob > 0)  # the null label where its row exists
    y = torch.arange(batch) * 3 % hi
    if cfg.class_dropout_prob > 0:
        y[1] = cfg.num_classes
    return x, t, y


def _model(cfg: DiTConfig) -> DiT:
    model = DiT(cfg)
    _randomise(model)
    return model


def _diffusers(model: DiT, cfg: DiTConfig) -> DiTTransformer2DModel:
    config, sd = to_diffusers(model, cfg)
    ref = DiTTransformer2DModel(**config)
    ref.load_state_dict(sd, strict=True)  # every diffusers tensor is filled (bar the position buffer)
    return ref.eval()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def test_registered_family():
    fam = get_family("dit")
    assert fam.config is DiTConfig and fam.build is DiT
    # The diffusers adapter is released-weights interop: it lives in pretrain.hub, not in the model registry.
    assert not hasattr(fam, "adapter") and to_diffusers.__module__ == "pretrain.hub.dit_diffusers"


def test_embeddings_are_diffusers_conventions():
    t = torch.tensor([0.0, 1.0, 17.5, 999.0])
    assert torch.equal(timestep_features(t), Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=1)(t))
    for d, grid in ((48, 4), (64, 8)):
        ref = get_2d_sincos_pos_embed(d, grid, base_size=grid, output_type="pt").float()
        assert torch.equal(sincos_pos_embed(d, grid), ref)


@pytest.mark.parametrize("case", CASES)
def test_forward_matches_diffusers(case):
    cfg = DiTConfig(**CASES[case])
    model = _model(cfg).eval()
    ref = _diffusers(model, cfg)
    x, t, y = _inputs(cfg)
    with torch.no_grad():
        out = model(x, t, y)
        want = ref(x, timestep=t, class_labels=y).sample
    c_out = 2 * cfg.in_channels if cfg.learn_sigma else cfg.in_channels
    assert out.shape == want.shape == (4, c_out, cfg.input_size, cfg.input_size)
    assert want.abs().max() > 0.1  # random weights: a real signal, not the zero of adaLN-Zero
    assert _rel(out, want) <= 1e-5
    # The label matters (and the null label is its own row), as does the timestep.
    with torch.no_grad():
        other = model(x, t, (y + 1) % cfg.num_classes)
        later = model(x, t + 10, y)
    assert _rel(other, out) > 1e-3 and _rel(later, out) > 1e-3


@pytest.mark.parametrize("case", ["16px-p4-rgb-sigma", "8px-p2-gray"])
def test_diffusers_round_trip_is_identical(case):
    cfg = DiTConfig(**CASES[case])
    model = _model(cfg)
    back_cfg, back = from_diffusers(_diffusers(model, cfg))
    assert back_cfg == cfg
    sd = model.state_dict()
    assert back.keys() == sd.keys()
    for k, v in sd.items():
        assert torch.equal(back[k], v), k
    DiT(back_cfg).load_state_dict(back, strict=True)


def test_without_null_row_exports_a_zero_row_and_imports_with_one():
    cfg = DiTConfig(**CASES["16px-p2-latent-nonull"])
    model = _model(cfg)
    back_cfg, back = from_diffusers(_diffusers(model, cfg))
    assert model.label_embed.weight.shape[0] == cfg.num_classes
    assert back["label_embed.weight"].shape[0] == cfg.num_classes + 1 and back_cfg.class_dropout_prob > 0
    assert torch.equal(back["label_embed.weight"][:-1], model.label_embed.weight.detach())
    assert not back["label_embed.weight"][-1].any()


def test_diverging_per_block_embedders_are_refused():
    cfg = DiTConfig(**CASES["8px-p2-gray"])
    ref = _diffusers(_model(cfg), cfg)
    with torch.no_grad():
        ref.transformer_blocks[1].norm1.emb.timestep_embedder.linear_1.bias.add_(1.0)
    with pytest.raises(ValueError, match="block 1"):
        from_diffusers(ref)


def test_mlp_ratio_other_than_four_has_no_diffusers_form():
    cfg = DiTConfig(**TINY, input_size=8, mlp_ratio=2.0)
    with pytest.raises(ValueError, match="mlp_ratio"):
        to_diffusers(DiT(cfg), cfg)


@pytest.mark.kernels
def test_triton_matches_reference_forward_and_gradients(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    base = dict(d_model=32, n_heads=2, n_layers=1, input_size=8, patch_size=2, in_channels=2, num_classes=3,
                learn_sigma=True)
    ref = _model(DiTConfig(**base, kernels="reference"))
    tri = DiT(DiTConfig(**base, kernels="auto"))
    tri.load_state_dict(ref.state_dict())
    x, t, y = _inputs(ref.cfg, batch=2)
    outs, grads = [], []
    for model in (tri, ref):
        xi = x.clone().requires_grad_(True)
        out = model(xi, t, y)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        outs.append(out.detach())
        grads.append([xi.grad] + [p.grad for p in model.parameters()])
    assert _rel(outs[0], outs[1]) <= 1e-5
    names = ["x"] + [n for n, _ in ref.named_parameters()]
    for name, a, b in zip(names, grads[0], grads[1], strict=True):
        assert b.abs().max() > 0, name
        assert _rel(a, b) <= 1e-4, name


def _expected_params(d: int, n_layers: int, p: int, c: int, c_out: int, classes: int) -> int:
    block = 6 * d * d + 6 * d + 3 * d * d + 3 * d + d * d + d + 8 * d * d + 5 * d  # adaLN, qkv, proj, MLP
    embed = c * p * p * d + d + 256 * d + d + d * d + d + (classes + 1) * d  # patches, timestep MLP, labels
    final = 2 * d * d + 2 * d + d * p * p * c_out + p * p * c_out
    return n_layers * block + embed + final


# DiT paper Table 4 (ImageNet 256, 32x32x4 latents, learn_sigma, 1000 classes): params, forward Gflops.
PAPER = {"S": (33e6, 6.06), "B": (130e6, 23.01), "L": (458e6, 80.71), "XL": (675e6, 118.64)}


@pytest.mark.parametrize("size", PAPER)
def test_presets_have_the_papers_parameter_counts_and_gflops(size):
    cfg = DiTConfig(size=size, patch_size=2, input_size=32, in_channels=4, num_classes=1000, learn_sigma=True)
    with torch.device("meta"):  # counts only: nothing is allocated or initialised
        model = DiT(cfg)
    counts = count_parameters(model)
    d, n_layers, _ = dims(cfg)
    assert counts["params"] == _expected_params(d, n_layers, 2, 4, 8, 1000)
    assert counts["params_non_embedding"] == counts["params"] - 1001 * d
    params, gflops = PAPER[size]
    # The DiT repository's count includes its frozen position table; ours is a buffer.
    assert abs(counts["params"] + counts["pos_embed"] - params) <= 0.01 * params
    assert abs(flops_per_image(cfg, counts, {}) / 6 / 1e9 - gflops) <= 0.005 * gflops  # forward MACs


def test_flops_split_per_token_and_per_image_weights():
    cfg = DiTConfig(**TINY, input_size=16, patch_size=4, in_channels=3)
    counts = count_parameters(DiT(cfg))
    matmuls = [m for m in DiT(cfg).modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    weights = sum(m.weight.numel() for m in matmuls)
    assert counts["matmul_per_token"] + counts["matmul_per_image"] == weights
    tokens = (16 // 4) ** 2
    want = 6 * (counts["matmul_per_token"] * tokens + counts["matmul_per_image"]) + 12 * 2 * 48 * tokens**2
    assert flops_per_image(cfg, counts, {}) == want


def test_presets_and_overrides():
    cfg = typed_section("model", {"type": "dit", "size": "XL"})
    assert isinstance(cfg, DiTConfig) and dims(cfg) == (1152, 28, 16)
    assert dims(typed_section("model", {"type": "dit", "size": "B", "n_layers": 4})) == (768, 4, 12)


@pytest.mark.parametrize("bad, message", [
    ({"input_size": 30, "patch_size": 4}, "model.input_size (30) is not divisible by model.patch_size (4)"),
    ({"d_model": 50, "n_heads": 3}, "model.d_model (50) must be a multiple of model.n_heads (3)"),
    ({"size": "B", "n_heads": 5}, "model.d_model (768) must be a multiple of model.n_heads (5)"),
    ({"d_model": 54, "n_heads": 3}, "model.d_model (54) must be a multiple of 4"),
    ({"patch_size": 3}, "model.patch_size:"),
    ({"size": "M"}, "model.size:"),
    ({"class_dropout_prob": 1.0}, "model.class_dropout_prob:"),
    ({"kernels": "cuda"}, "model.kernels:"),
    ({"n_head": 3}, "model.n_head: unknown key"),
])
def test_bad_config_is_one_line(bad, message):
    with pytest.raises(ConfigError) as e:
        typed_section("model", {"type": "dit", **bad})
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_adaln_zero_outputs_zeros_at_init():
    cfg = DiTConfig(**TINY, input_size=8, learn_sigma=True)
    model = DiT(cfg)
    x, t, y = _inputs(cfg)
    out = model(x, t, y)
    assert out.shape == (4, 2, 8, 8) and not out.any()
    # Only the output layer learns on the first step; everything upstream waits for it.
    (out - x.repeat(1, 2, 1, 1)).square().sum().backward()
    assert model.final.linear.weight.grad.abs().max() > 0
    assert not model.blocks[0].attn.qkv.weight.grad.any()


def test_wrong_input_shape_is_refused():
    model = DiT(DiTConfig(**TINY, input_size=8))
    with pytest.raises(ValueError, match=r"\(B, 1, 8, 8\)"):
        model(torch.zeros(2, 1, 6, 6), torch.zeros(2), torch.zeros(2, dtype=torch.long))


def test_activation_checkpointing_recomputes_blocks_with_the_same_gradients():
    cfg = DiTConfig(**CASES["8px-p2-gray"])
    model = _model(cfg).train()
    x, t, y = _inputs(cfg)
    calls = []
    model.blocks[0].register_forward_pre_hook(lambda *_: calls.append(1))
    grads = []
    for ckpt in (False, True):
        model.activation_checkpointing = ckpt
        model.zero_grad(set_to_none=True)
        calls.clear()
        model(x, t, y).square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        assert len(calls) == (2 if ckpt else 1)  # checkpointing runs the block again in backward
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-6, atol=1e-7, msg=name)
