"""Properties beyond numerical agreement: dispatch, determinism, what the backward keeps alive,
poisoned outputs, and the ops inside `torch.compile`."""

from __future__ import annotations

import pytest
import torch

from pretrain import kernels
from pretrain.kernels._runtime import new_empty, use_triton

pytestmark = pytest.mark.kernels


def test_dispatch_follows_backend_and_interpreter(monkeypatch):
    x = torch.empty(1)
    assert use_triton("auto", x) and use_triton("triton", x)
    assert not use_triton("reference", x)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    # Without the interpreter a CPU tensor cannot run Triton: both fall back to the reference.
    assert not use_triton("auto", x) and not use_triton("triton", x)
    with pytest.raises(ValueError, match="backend"):
        use_triton("cuda", x)


def test_outputs_are_poisoned_before_launch():
    # Under the interpreter every kernel output starts as NaN, so an unwritten element fails the checks.
    assert torch.isnan(new_empty((4, 3), torch.float32, torch.device("cpu"))).all()


def test_attention_backward_is_deterministic_and_keeps_no_score_matrix():
    s = 130
    q = torch.randn(3, 4, s, 40, requires_grad=True)
    k, v = (torch.randn(3, 1, s, 40, requires_grad=True) for _ in range(2))
    saved = []

    def pack(t):
        saved.append(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = kernels.attention(q, k, v, causal=True)
    # q, k, v, O and the log-sum-exp: nothing bigger than q, nothing shaped like scores (.., S, S).
    assert saved and max(sh.numel() for sh in saved) <= q.numel()
    assert not any(tuple(sh[-2:]) == (s, s) for sh in saved)
    dy = torch.randn_like(out)
    first = torch.autograd.grad(out, (q, k, v), dy, retain_graph=True)
    second = torch.autograd.grad(out, (q, k, v), dy)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)  # no atomics: bitwise the same every time


def test_swiglu_saves_only_its_inputs():
    gate, up = torch.randn(5, 123, requires_grad=True), torch.randn(5, 123, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        kernels.swiglu(gate, up)
    # silu(gate) is recomputed in the backward, never stored.
    assert {t.data_ptr() for t in saved} == {gate.data_ptr(), up.data_ptr()}


def test_linear_cross_entropy_keeps_no_logits():
    n, h, vocab = 300, 32, 2000
    hidden, weight = torch.randn(n, h, requires_grad=True), torch.randn(vocab, h, requires_grad=True)
    targets = torch.randint(0, vocab, (n,))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        for backend in ("triton", "reference"):
            loss = kernels.linear_cross_entropy(hidden, weight, targets, backend=backend)
            loss.backward()
    assert max(saved) <= vocab * h  # the d weight buffer at most; an (N, V) tensor would be 600,000


def test_all_ignored_targets_give_nan_like_torch():
    logits = torch.randn(4, 11)
    t = torch.full((4,), -100)
    assert torch.isnan(kernels.cross_entropy(logits, t)) and torch.isnan(torch.nn.functional.cross_entropy(logits, t))


def test_ops_compile_in_one_graph():
    torch._dynamo.reset()
    q = torch.randn(1, 4, 33, 40, requires_grad=True)
    k = torch.randn(1, 1, 33, 40, requires_grad=True)
    x = torch.randn(2, 33, 64, requires_grad=True)
    w = torch.randn(64, requires_grad=True)
    head = torch.randn(100, 64, requires_grad=True)
    t = torch.randint(0, 100, (66,))
    shift = torch.randn(2, 1, 64, requires_grad=True)

    def f(q, k, x, w, head, shift):
        a = kernels.attention(q, k, k).sum()
        y, s = kernels.rms_norm(x, w, 1e-6, x)
        y = kernels.layer_norm(y, w, None, 1e-6, shift, shift)
        y = kernels.swiglu(y, s)
        r = kernels.rope(y[:, None], torch.arange(33)).sum()
        flat = y.flatten(0, 1)
        return a + r + kernels.cross_entropy(flat @ head.t(), t) + kernels.linear_cross_entropy(flat, head, t)

    inputs = (q, k, x, w, head, shift)
    # aot_eager: dynamo + AOTAutograd with fake tensors, which is what the custom-op registration serves.
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    got = compiled(*inputs)
    g_got = torch.autograd.grad(got, inputs)
    want = f(*inputs)
    g_want = torch.autograd.grad(want, inputs)
    torch.testing.assert_close(got, want)
    for a, b in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(a, b)
