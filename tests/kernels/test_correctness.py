"""Every op's forward and input gradients against an fp64 reference, in fp32, fp16 and bf16, on odd
shapes (S = 1, 77, 130; D = 40, 64; hidden 123; batch 1 and 3; GQA 4:1; causal or not; strided inputs).
The rule is pretrain.kernels.checks: error <= 3x the reference's own error in that dtype + a small floor; NaN
(including NaN-poisoned elements a kernel never wrote) fails.
PRETRAIN_TEST_DEVICE=cuda runs them on a GPU (conftest.py)."""

from __future__ import annotations

import pytest
import torch

from pretrain.kernels import checks
from pretrain.kernels._runtime import use_triton

pytestmark = pytest.mark.kernels

CASES = [(c, d) for op in checks.OPS for c in checks.cases(op) for d in checks.DTYPES]


@pytest.mark.parametrize("case,dtype", CASES, ids=[f"{c.op}-{c.label}-{d}".replace(" ", "_") for c, d in CASES])
def test_matches_reference(case, dtype, kernel_device):
    assert use_triton("triton", torch.empty(1, device=kernel_device)), \
        "the interpreter must be on (or the tensors on a GPU), or this compares the reference to itself"
    results = checks.check(case, checks.DTYPES[dtype], device=kernel_device)
    assert len(results) >= 2  # the output and at least one gradient
    bad = [r for r in results if not r.ok]
    assert not bad, "\n".join(f"{r.tensor}: err {r.err:.3g} > bound {r.bound:.3g} (ref err {r.ref_err:.3g})" for r in bad)
