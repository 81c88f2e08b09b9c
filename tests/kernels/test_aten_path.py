"""The CPU path of every op (backend "auto" without Triton: SDPA, F.rms_norm, ATen's cross-entropy), judged
by the kernels' own rule against the fp64 reference, in fp32, fp16 and bf16, on the same odd shapes."""

from __future__ import annotations

import pytest
import torch

from pretrain import kernels
from pretrain.kernels import checks
from pretrain.kernels._runtime import use_aten

pytestmark = pytest.mark.kernels

# The ops whose CPU path is not their reference (the others run the reference on CPU).
OPS = ("attention", "rms_norm", "cross_entropy", "linear_cross_entropy")
CASES = [(c, d) for op in OPS for c in checks.cases(op) for d in checks.DTYPES]


@pytest.fixture
def no_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert use_aten("auto", torch.empty(1)) and not use_aten("reference", torch.empty(1))


@pytest.mark.parametrize("case,dtype", CASES, ids=[f"{c.op}-{c.label}-{d}".replace(" ", "_") for c, d in CASES])
def test_cpu_path_matches_reference(case, dtype, no_interpreter):
    results = checks.check(case, checks.DTYPES[dtype], backend="auto")
    assert len(results) >= 2
    bad = [r for r in results if not r.ok]
    assert not bad, "\n".join(f"{r.tensor}: err {r.err:.3g} > bound {r.bound:.3g} (ref err {r.ref_err:.3g})" for r in bad)


def test_cross_entropy_paths_agree_on_ignored_and_out_of_range_targets(no_interpreter):
    """Ignored and out-of-range targets count for nothing on the ATen path as on the reference; with no
    target left the mean is NaN (cross_entropy, as torch's) and 0 (linear_cross_entropy, as its chunked path)."""
    gen = torch.Generator().manual_seed(0)
    logits, hidden, weight = (torch.randn(*s, generator=gen) for s in ((6, 11), (6, 8), (11, 8)))
    targets = torch.tensor([3, -100, 11, -5, 0, 10])
    for backend in ("auto", "reference"):
        assert torch.allclose(kernels.cross_entropy(logits, targets, z_loss=1e-3, backend=backend),
                              kernels.cross_entropy(logits[[0, 4, 5]], targets[[0, 4, 5]], z_loss=1e-3, backend="reference"))
        assert torch.allclose(kernels.linear_cross_entropy(hidden, weight, targets, backend=backend),
                              kernels.linear_cross_entropy(hidden[[0, 4, 5]], weight, targets[[0, 4, 5]], backend="reference"))
    none = torch.full((6,), -100)
    assert torch.isnan(kernels.cross_entropy(logits, none, backend="auto"))
    assert kernels.linear_cross_entropy(hidden, weight, none, backend="auto").item() == 0.0


def test_packed_causal_attention_on_the_cpu_path_never_crosses_documents(no_interpreter):
    """A query's output changes with the keys of its own document only (SDPA with the boolean mask)."""
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 9, 8, generator=gen) for _ in range(3))
    seg = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1, 1]])
    out = kernels.attention(q, k, v, segment_ids=seg)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, :4], v2[:, :, :4] = 5.0, -3.0  # rewrite the first document's keys and values
    out2 = kernels.attention(q, k2, v2, segment_ids=seg)
    assert torch.equal(out[:, :, 4:], out2[:, :, 4:]) and not torch.allclose(out[:, :, :4], out2[:, :, :4])
