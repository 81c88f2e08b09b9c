"""Triton kernels for the hot ops, each beside its plain-PyTorch reference and its autograd wiring.

Public functions take and return tensors and work under autograd and `torch.compile`. `backend`:
"auto" runs Triton on CUDA tensors and the reference on CPU tensors (Triton through the interpreter when
TRITON_INTERPRET=1); "triton" asks for Triton (on CPU without the interpreter it falls back to the
reference); "reference" always runs plain PyTorch.
"""

from kernels.attention import attention, attention_reference
from kernels.cross_entropy import cross_entropy, cross_entropy_reference
from kernels.layer_norm import layer_norm, layer_norm_reference
from kernels.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_unfused
from kernels.rms_norm import rms_norm, rms_norm_reference
from kernels.rope import rope, rope_reference
from kernels.swiglu import swiglu, swiglu_reference

__all__ = [
    "attention", "attention_reference", "cross_entropy", "cross_entropy_reference", "layer_norm",
    "layer_norm_reference", "linear_cross_entropy", "linear_cross_entropy_unfused", "rms_norm",
    "rms_norm_reference", "rope", "rope_reference", "swiglu", "swiglu_reference",
]
