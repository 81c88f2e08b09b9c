"""The mixture-of-experts kernels beyond the shared sweep (pretrain.kernels.checks, run by
test_correctness.py): the routing's counts and order, edge routings (every token on one expert, experts
with no token, k = 1 and 2, no rows at all), mixed-dtype weights, round trips, determinism, dispatch
and `torch.compile`. Forward and backward are judged by the kernels' error rule against an fp64 run of
the reference, in fp32 and bf16 (the kernels compute in fp32 either way)."""

from __future__ import annotations

import pytest
import torch

from pretrain import kernels
from pretrain.kernels import checks

pytestmark = pytest.mark.kernels

E = 5


def _routing(t: int, k: int, empty=(3,), seed: int = 0) -> torch.Tensor:
    return checks.routing_sample(torch.Generator().manual_seed(seed), t, k, E, empty)


def _assert_rule(case: checks.Case, dtype: str, device) -> None:
    results = checks.check(case, checks.DTYPES[dtype], device=device)
    bad = [r for r in results if not r.ok]
    assert not bad, "\n".join(f"{r.tensor}: err {r.err:.3g} > bound {r.bound:.3g} (ref {r.ref_err:.3g})" for r in bad)


# Routings: uneven with expert 3 empty, every token on expert 1 (k = 1), and only experts 0 and 4 used.
ROUTINGS = {
    "uneven-k2": lambda: _routing(11, 2),
    "uneven-k1": lambda: _routing(9, 1),
    "one-expert-k1": lambda: torch.ones(6, 1, dtype=torch.int64),
    "two-experts-k2": lambda: torch.tensor([[0, 4], [4, 0], [0, 4]]),
}


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("routing", list(ROUTINGS))
def test_moe_ops_match_reference(routing, dtype, kernel_device):
    experts = ROUTINGS[routing]()
    t, k = experts.shape
    counts, order = kernels.moe_routing(experts, E)
    n, d = t * k, 24

    def permute(gen_dtype, gen):
        return [checks._randn(gen, t, d, dtype=gen_dtype), experts]

    def unpermute(gen_dtype, gen):
        return [checks._randn(gen, n, d, dtype=gen_dtype), order, torch.rand(t, k, generator=gen).to(gen_dtype)]

    def gmm(gen_dtype, gen):
        return [checks._randn(gen, n, 40, dtype=gen_dtype), checks._randn(gen, E, 40, d, dtype=gen_dtype), counts]

    for case in (checks.Case("moe_permute", routing, permute,
                             lambda x, ex, backend: kernels.moe_permute(x, ex, E, backend=backend)[0]),
                 checks.Case("moe_unpermute", routing, unpermute,
                             lambda ys, o, w, backend: kernels.moe_unpermute(ys, o, w, backend=backend)),
                 checks.Case("grouped_mm", routing, gmm,
                             lambda xs, w, c, backend: kernels.grouped_mm(xs, w, c, backend=backend))):
        _assert_rule(case, dtype, kernel_device)


def test_routing_is_stable_and_counts_every_expert():
    experts = _routing(11, 2)
    xs, counts, order = kernels.moe_permute(torch.randn(11, 8), experts, E)
    assert counts.tolist() == [int((experts == e).sum()) for e in range(E)] and counts[3] == 0
    flat = experts.reshape(-1)
    assert torch.equal(flat[order], flat.sort().values)  # grouped by expert, experts in order
    for e in range(E):  # within an expert, rows keep (token, slot) order
        rows = order[flat[order] == e]
        assert torch.equal(rows, rows.sort().values)
    with pytest.raises(ValueError, match="n_experts"):
        kernels.moe_permute(torch.randn(11, 8), experts, 3)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_permute_then_unpermute_restores_tokens(backend):
    x = torch.randn(11, 24, requires_grad=True)
    experts = _routing(11, 2)
    xs, _, order = kernels.moe_permute(x, experts, E, backend=backend)
    w = torch.full((11, 2), 0.5, requires_grad=True)
    out = kernels.moe_unpermute(xs, order, w, backend=backend)
    torch.testing.assert_close(out, x)
    dx, dw = torch.autograd.grad(out, (x, w), torch.ones_like(out))
    torch.testing.assert_close(dx, torch.ones_like(x))  # 2 slots x weight 0.5 each
    torch.testing.assert_close(dw, x.detach().sum(1, keepdim=True).expand(-1, 2))


def test_unpermute_with_fp32_weights_promotes_like_torch():
    experts = _routing(9, 2)
    order = kernels.moe_routing(experts, E)[1]
    ys = torch.randn(18, 24).bfloat16().requires_grad_()
    w = torch.rand(9, 2, requires_grad=True)  # router probabilities kept in fp32
    got = kernels.moe_unpermute(ys, order, w, backend="triton")
    want = kernels.moe_unpermute(ys, order, w, backend="reference")
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want)
    dout = torch.randn_like(got)
    for a, b in zip(torch.autograd.grad(got, (ys, w), dout), torch.autograd.grad(want, (ys, w), dout), strict=True):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)


def test_grouped_mm_empty_experts_get_zero_weight_gradient_and_backward_is_deterministic():
    counts = torch.tensor([0, 40, 0, 3, 0])
    xs = torch.randn(43, 16, requires_grad=True)
    w = torch.randn(E, 16, 20, requires_grad=True)
    y = kernels.grouped_mm(xs, w, counts, backend="triton")
    dy = torch.randn_like(y)
    first = torch.autograd.grad(y, (xs, w), dy, retain_graph=True)
    second = torch.autograd.grad(y, (xs, w), dy)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))  # no atomics
    assert torch.equal(first[1][[0, 2, 4]], torch.zeros(3, 16, 20))


def test_grouped_mm_of_frozen_experts_computes_no_weight_gradient():
    """LoRA on experts freezes them: the backward gives the rows' gradient only, the same as with the weights'."""
    counts = torch.tensor([5, 0, 7, 2, 1])
    xs = torch.randn(15, 16, requires_grad=True)
    w = torch.randn(E, 16, 20)
    y = kernels.grouped_mm(xs, w, counts, backend="triton")
    dy = torch.randn_like(y)
    y.backward(dy)
    assert w.grad is None
    want = kernels.grouped_mm(xs, w.requires_grad_(), counts, backend="triton")
    torch.testing.assert_close(xs.grad, torch.autograd.grad(want, xs, dy)[0], rtol=0, atol=0)


def test_grouped_mm_with_no_rows():
    xs = torch.randn(0, 16, requires_grad=True)
    w = torch.randn(3, 16, 8, requires_grad=True)
    y = kernels.grouped_mm(xs, w, torch.zeros(3, dtype=torch.int64), backend="triton")
    assert y.shape == (0, 8)
    y.sum().backward()
    assert torch.equal(w.grad, torch.zeros_like(w))


def test_torch_grouped_backend_needs_a_hopper_gpu():
    xs, w = torch.randn(4, 16), torch.randn(2, 16, 8)
    with pytest.raises(ValueError, match="not used on cpu"):
        kernels.grouped_mm(xs, w, torch.tensor([1, 3]), backend="torch_grouped")


def test_moe_ops_compile_in_one_graph():
    torch._dynamo.reset()
    counts, order = kernels.moe_routing(_routing(7, 2), E)
    xs = torch.randn(14, 16, requires_grad=True)
    w = torch.randn(E, 16, 16, requires_grad=True)
    gate = torch.rand(7, 2, requires_grad=True)

    def f(xs, w, gate):
        return kernels.moe_unpermute(kernels.grouped_mm(xs, w, counts), order, gate).square().sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    got = compiled(xs, w, gate)
    want = f(xs, w, gate)
    torch.testing.assert_close(got, want)
    for a, b in zip(torch.autograd.grad(got, (xs, w, gate)), torch.autograd.grad(want, (xs, w, gate)), strict=True):
        torch.testing.assert_close(a, b)
