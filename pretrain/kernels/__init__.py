"""Triton kernels for the hot ops, each beside its plain-PyTorch reference and its autograd wiring.

Public functions take and return tensors and work under autograd and `torch.compile`. `backend`:
"auto" runs Triton on CUDA tensors and, on CPU tensors, the fastest plain-ATen formulation of the op (SDPA's
fused kernel for attention, `F.rms_norm`, `F.cross_entropy`; Triton through the interpreter when
TRITON_INTERPRET=1); "triton" asks for Triton (on CPU without the interpreter it takes the ATen path as
"auto" does); "reference" always runs the plain-PyTorch reference, written for clarity, that the tests read.

This folder installs as `pretrain.kernels` (pyproject.toml maps it with package-dir), never as a
top-level `kernels`, which is Hugging Face's hub-kernel package: `from pretrain import kernels`. The
ops register in the `torch.ops.pretrain_kernels` namespace. Modules here import each other by that
absolute name, so a stray `import kernels` from the repository root re-exports these same functions
instead of loading (and registering) every op a second time.
"""

from pretrain.kernels.attention import attention, attention_reference
from pretrain.kernels.cross_entropy import cross_entropy, cross_entropy_reference
from pretrain.kernels.grouped_mm import grouped_mm, grouped_mm_reference
from pretrain.kernels.layer_norm import layer_norm, layer_norm_reference
from pretrain.kernels.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_unfused
from pretrain.kernels.moe import (
    moe_permute,
    moe_permute_reference,
    moe_routing,
    moe_unpermute,
    moe_unpermute_reference,
)
from pretrain.kernels.rms_norm import rms_norm, rms_norm_reference
from pretrain.kernels.rope import rope, rope_reference
from pretrain.kernels.swiglu import swiglu, swiglu_reference

__all__ = [
    "attention", "attention_reference", "cross_entropy", "cross_entropy_reference", "layer_norm",
    "layer_norm_reference", "linear_cross_entropy", "linear_cross_entropy_unfused", "grouped_mm",
    "grouped_mm_reference", "moe_permute", "moe_permute_reference", "moe_routing", "moe_unpermute",
    "moe_unpermute_reference", "rms_norm",
    "rms_norm_reference", "rope", "rope_reference", "swiglu", "swiglu_reference",
]
