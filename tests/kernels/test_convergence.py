"""A tiny Llama, and a tiny Mixtral-style mixture of experts, trained 30 steps with the Triton kernels (under the
interpreter) and with the plain-PyTorch reference: the losses agree within 1e-3 relative at every step."""

from __future__ import annotations

import pytest
import torch

from pretrain.models.moe_presets import MixtralConfig
from pretrain.models.transformer import LlamaConfig, Transformer

pytestmark = pytest.mark.kernels


def _losses(kernels_mode: str, steps: int = 30, moe: bool = False) -> list[float]:
    torch.manual_seed(0)
    shape = dict(n_layers=1 if moe else 2, d_model=64, n_heads=4, n_kv_heads=2, vocab_size=256, max_seq_len=32, kernels=kernels_mode)
    # The mixture: 4 experts of width 48, 2 per token, with its balance loss (part of the loss compared).
    cfg = (MixtralConfig(**shape, moe={"n_experts": 4, "top_k": 2, "d_expert": 48, "aux_loss": 0.01}) if moe
           else LlamaConfig(**shape))
    model = Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    gen = torch.Generator().manual_seed(1)
    # A learnable stream (each token a fixed function of the previous one) so the loss really falls.
    table = torch.randint(0, 256, (256,), generator=gen)
    losses = []
    for _ in range(steps):
        start = torch.randint(0, 256, (2, 1), generator=gen)
        seq = [start]
        for _ in range(32):
            seq.append(table[seq[-1]])
        seq = torch.cat(seq, dim=1)
        loss = model(seq[:, :-1], seq[:, 1:]) / seq[:, 1:].numel()  # the model returns the summed loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("moe", [False, True], ids=["llama", "mixtral"])
def test_triton_and_reference_train_alike(moe):
    steps = 12 if moe else 30  # the interpreter's grouped products are slow: fewer steps, the same agreement
    ref = _losses("reference", steps, moe=moe)
    tri = _losses("triton", steps, moe=moe)
    assert ref[-1] < (0.9 if moe else 0.8) * ref[0], "the tiny model should learn the stream"
    for step, (a, b) in enumerate(zip(tri, ref, strict=True)):
        assert abs(a - b) <= 1e-3 * abs(b), f"step {step}: triton {a} vs reference {b}"
