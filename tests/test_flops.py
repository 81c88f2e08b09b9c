"""MFU's two halves: the device peak table (looked up by device-name strings as torch reports them) and the
model FLOPs per token, checked against `torch.utils.flop_counter.FlopCounterMode` on small models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from pretrain.metrics.console import format_row
from pretrain.metrics.flops import SPECS, device_spec, gpu_peak, mfu_field, peak_flops, peak_for
from pretrain.models import get_family

# ------------------------------------------------------------------------------------- the peak table


@pytest.mark.parametrize(("name", "model"), [
    ("NVIDIA H100 80GB HBM3", "H100 SXM"), ("NVIDIA H100 PCIe", "H100 PCIe"), ("NVIDIA H100 NVL", "H100 NVL"),
    ("NVIDIA H200", "H200 SXM"), ("NVIDIA H200 NVL", "H200 NVL"), ("NVIDIA B200", "B200"),
    ("NVIDIA A100-SXM4-80GB", "A100 SXM 80GB"), ("NVIDIA A100-SXM4-40GB", "A100 SXM 40GB"),
    ("NVIDIA A100 80GB PCIe", "A100 PCIe 80GB"), ("NVIDIA A100-PCIE-40GB", "A100 PCIe 40GB"),
    ("NVIDIA L40S", "L40S"), ("NVIDIA L4", "L4"), ("AMD Instinct MI300X", "MI300X"),
    ("AMD Instinct MI300X VF", "MI300X"),
])
def test_device_names_find_their_own_entry(name, model):
    assert device_spec(name).model == model


@pytest.mark.parametrize("name", [
    "NVIDIA L40",  # another chip than the L4 or the L40S
    "NVIDIA GH200 480GB", "NVIDIA GB200",  # the words H200 / B200 do not occur in them
    "NVIDIA H100",  # no form factor in the name: SXM, PCIe and NVL differ by a third
    "NVIDIA A10G", "AMD Instinct MI250X", "Some Future GPU", "",
])
def test_unknown_devices_have_no_peak(name):
    assert device_spec(name) is None and peak_for(name, "bf16") is None and peak_for(name, "fp32", tf32=True) is None


def test_peak_follows_precision_and_tf32():
    h100 = "NVIDIA H100 80GB HBM3"
    assert peak_for(h100, "bf16") == peak_for(h100, "fp16") == pytest.approx(989.5e12)  # 1,979 with sparsity
    assert peak_for(h100, "fp32") == pytest.approx(67e12)  # IEEE fp32: cuBLAS's default, train.tf32 off
    assert peak_for(h100, "fp32", tf32=True) == pytest.approx(494.5e12)
    assert peak_for(h100, "bf16", tf32=True) == peak_for(h100, "bf16")  # TF32 is about fp32 matmuls only
    assert peak_for("NVIDIA H100 PCIe", "bf16") == pytest.approx(756.5e12)
    assert peak_for("NVIDIA A100-PCIE-40GB", "bf16") == peak_for("NVIDIA A100-SXM4-80GB", "bf16") == pytest.approx(312e12)
    assert peak_for("AMD Instinct MI300X", "bf16") == pytest.approx(1307.4e12)
    assert device_spec("NVIDIA H200").tb_s == 4.8 and device_spec("NVIDIA A100 80GB PCIe").tb_s == 1.935
    with pytest.raises(ValueError, match="precision 'fp8'"):
        peak_for(h100, "fp8")


def test_every_entry_is_ordered_and_reachable_by_its_own_names():
    for spec in SPECS:
        assert spec.fp32 < spec.tf32 < spec.bf16 == spec.fp16 and spec.tb_s > 0, spec.model
        for alias in spec.names:  # no alias is shadowed by a more specific one of another entry
            assert device_spec(f"NVIDIA {alias}") is spec, alias


def test_unknown_gpu_warns_naming_device_and_setting():
    with pytest.warns(UserWarning, match=r"'NVIDIA L40'.*log\.peak_flops.*dense tf32"):
        assert gpu_peak("NVIDIA L40", "fp32", tf32=True) is None


def test_cpu_peak_is_measured():
    assert peak_flops(torch.device("cpu"), "fp32", threads=1) > 1e8


# ------------------------------------------------------------------------------------- the step row


def test_row_has_no_mfu_without_a_peak_and_the_console_says_so():
    assert mfu_field(5e12, 10e12, world=2) == {"mfu": 0.25}
    assert mfu_field(5e12, None, world=2) == {}
    row = {"step": 3, "loss": 2.0, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 1000.0, "step_time_s": 0.5}
    assert "mfu n/a" in format_row(row, 10)
    assert "mfu 25.0%" in format_row({**row, **mfu_field(5e12, 10e12, world=2)}, 10)
    # Straggler windows: a line only where a rank is notably slower than the median (even ranks: no line).
    assert format_row({"step": 50, "straggle": 1.07, "slowest_rank": 0}, 100) is None
    assert "straggle 1.42 (rank 1)" in format_row({"step": 50, "straggle": 1.42, "slowest_rank": 1}, 100)


# -------------------------------------------------------------------------- FLOPs per token, counted


def _counted_vs_formula(model_type: str, **fields) -> tuple[int, float, dict]:
    """FLOPs FlopCounterMode counts over one forward+backward of a (2, T) batch, the formula's figure for
    the same tokens, and the terms that explain their difference."""
    family = get_family(model_type)
    cfg = family.config(type=model_type, kernels="reference", **fields)
    torch.manual_seed(0)
    model = family.build(cfg)
    counts = family.count_parameters(model)
    b, t = 2, cfg.max_seq_len
    ids = torch.randint(0, cfg.vocab_size, (b, t))
    with FlopCounterMode(display=False) as counter:
        # The logits path, not forward(ids, targets): the fused LM head + loss is a custom op whose
        # products FlopCounterMode cannot see into. It computes the same three V x d products per token
        # (logits, d hidden, d weight) as this plain head's forward and backward.
        logits = model(ids)
        F.cross_entropy(logits.flatten(0, 1), ids.flatten()).backward()
    formula = family.flops_per_unit(cfg, counts, {"seq_len": t}) * b * t
    vectors = sum(p.numel() for p in model.parameters() if p.dim() == 1)  # norm gains, biases
    attn = 12 * cfg.n_layers * cfg.n_heads * (cfg.head_dim or cfg.d_model // cfg.n_heads) * t * b * t
    return counter.get_total_flops(), formula, {"tokens": b * t, "vectors": vectors, "attn": attn}


@pytest.mark.parametrize(("model_type", "fields"), [
    # T large against d, so the attention term (12 L d T) is ~40% of the matrix term (72 L d^2): a wrong
    # attention count would show. A vocabulary of 512 gives the head a like share.
    ("gpt2", dict(n_layers=2, d_model=64, n_heads=4, vocab_size=512, max_seq_len=256)),
    # GQA (the reference attention repeats k/v to every query head) and head_dim x n_heads != d_model.
    ("llama", dict(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, head_dim=32, vocab_size=512, max_seq_len=256)),
])
def test_flops_per_token_matches_counted_flops(model_type, fields):
    counted, formula, terms = _counted_vs_formula(model_type, **fields)
    assert terms["attn"] > 0.2 * counted  # the shapes exercise the attention term
    assert abs(formula - counted) < 0.05 * counted
    # The residual, exactly: the formula's 6 N counts every parameter, but norm gains and biases do no
    # matrix product (FlopCounterMode counts addmm as its product only). Attention matches exactly: the
    # reference computes both T x T products in full and masks afterwards, 2 + 4 (backward) products of
    # 2 T^2 (H d_head) per layer = 12 L (H d_head) T per token, the formula's term. A causal flash kernel
    # skips the masked half, so its MFU credits attention work it does not do (PaLM's convention).
    assert formula - counted == 6 * terms["tokens"] * terms["vectors"]
