"""Targets outside [0, V) (a negative other than the ignore index, or V and past it) count as ignored in
the cross-entropy kernels and their references alike: no load past the row, loss and gradient as if they
were -100, never a NaN. Under the interpreter (or on a GPU with PRETRAIN_TEST_DEVICE=cuda), in fp32."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pretrain import kernels
from pretrain.kernels._runtime import use_triton

pytestmark = pytest.mark.kernels

N, V, H = 13, 37, 24
BAD = (-7, V, V + 3)


def _targets(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets with -100, -7, V and V+3 among valid ones, and the same with every bad one set to -100."""
    t = torch.randint(0, V, (N,), device=device)
    t[1], t[4], t[8], t[11] = -100, BAD[0], BAD[1], BAD[2]
    return t, torch.where((t < 0) | (t >= V), -100, t)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_cross_entropy_ignores_targets_outside_the_vocabulary(backend, kernel_device):
    assert use_triton("triton", torch.empty(1, device=kernel_device))
    t, ignored = _targets(kernel_device)
    logits = torch.randn(N, V, device=kernel_device, requires_grad=True)
    loss = kernels.cross_entropy(logits, t, z_loss=1e-3, backend=backend)
    (grad,) = torch.autograd.grad(loss, logits)

    ref = logits.detach().clone().requires_grad_()
    want = kernels.cross_entropy(ref, ignored, z_loss=1e-3, backend="reference")
    want.backward()
    plain = F.cross_entropy(logits.detach(), ignored)  # torch's own, the bad targets ignored
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, ref.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kernels.cross_entropy(logits.detach(), t, backend=backend), plain, rtol=1e-5, atol=1e-6)
    assert (grad[[1, 4, 8, 11]] == 0).all() and (grad[0] != 0).any()


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_linear_cross_entropy_ignores_targets_outside_the_vocabulary(backend, kernel_device):
    t, ignored = _targets(kernel_device)
    hidden = torch.randn(N, H, device=kernel_device, requires_grad=True)
    weight = torch.randn(V, H, device=kernel_device, requires_grad=True)
    loss = kernels.linear_cross_entropy(hidden, weight, t, backend=backend)
    gh, gw = torch.autograd.grad(loss, (hidden, weight))

    h2, w2 = (x.detach().clone().requires_grad_() for x in (hidden, weight))
    want = F.cross_entropy(h2 @ w2.t(), ignored)
    want.backward()
    assert torch.isfinite(loss) and torch.isfinite(gh).all() and torch.isfinite(gw).all()
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gh, h2.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gw, w2.grad, rtol=1e-4, atol=1e-5)
    assert (gh[[1, 4, 8, 11]] == 0).all()


def test_only_bad_targets_give_nan_like_only_ignored_ones():
    """No target left: the mean over nothing is NaN, as torch's mean reduction gives for all -100."""
    logits = torch.randn(3, V)
    t = torch.tensor([-7, V, -100])
    assert torch.isnan(kernels.cross_entropy(logits, t, backend="triton"))
    assert torch.isnan(kernels.cross_entropy(logits, t, backend="reference"))
