"""How an op picks its path and launches Triton: backend resolution, lazy `triton.jit`, output poisoning.

Triton 3.9 reads `TRITON_INTERPRET` when `@triton.jit` runs (the decorator returns an interpreted or a
compiled function then), not at launch. Kernels here are therefore plain Python functions decorated on
first launch, once per mode, so importing `pretrain.kernels` before a test sets the variable changes nothing.
Triton's own @jit helpers (`tl.sum`, `tl.max`, `tl.zeros`, `tl.sigmoid`, `tl.cdiv`) were decorated when
`triton.language` was first imported, possibly in compiled mode, and then fail under the interpreter;
kernels use the builtins instead: `tl.reduce(x, axis, tl.standard._sum_combine)` (the interpreter maps
that combine function to NumPy), `tl.full`, and written-out sigmoids.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch import Tensor

BACKENDS = ("auto", "triton", "reference")


def interpreting() -> bool:
    """True when Triton kernels run on CPU tensors through the interpreter (read at every call)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def use_triton(backend: str, x: torch.Tensor) -> bool:
    """Resolve `backend` for a tensor: CUDA runs Triton, CPU runs it only under the interpreter."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return False
    # "triton" and "auto" agree: forcing Triton on a CPU tensor without the interpreter cannot
    # run anything, so both fall back to the reference (documented in the public API).
    return x.is_cuda or (x.device.type == "cpu" and interpreting())


def use_aten(backend: str, x: torch.Tensor) -> bool:
    """Where Triton does not run and the caller did not ask for the reference: the fastest plain-ATen
    formulation of the op (SDPA's fused CPU kernel, `F.rms_norm`, `F.cross_entropy`), which may differ from
    the reference the tests read; the tests hold both to the same error rule (tests/kernels/test_aten_path.py)."""
    return backend != "reference" and not use_triton(backend, x)


_jitted: dict[tuple[Callable, bool], object] = {}


def kernel(fn: Callable) -> Callable:
    """Mark `fn` as a Triton kernel decorated lazily; `kernel_fn[grid](...)` launches it."""
    return _LazyKernel(fn)


class _LazyKernel:
    def __init__(self, fn: Callable):
        self.fn = fn
        self.__name__ = fn.__name__

    def __getitem__(self, grid):
        import triton

        key = (self.fn, interpreting())
        if key not in _jitted:
            _jitted[key] = triton.jit(self.fn)
        return _jitted[key][grid]


def poison() -> bool:
    """Fill outputs with NaN before launch (under the interpreter or KERNELS_POISON=1): an element a
    kernel forgot to write then fails every comparison instead of passing by luck."""
    return interpreting() or os.environ.get("KERNELS_POISON", "0") == "1"


def new_empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype, device=device)
    if poison() and dtype.is_floating_point:
        out.fill_(float("nan"))
    return out


def rows(t: torch.Tensor) -> torch.Tensor:
    """`t` as a 2-D (rows, last) view with unit column stride, copying only when no such view exists."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    try:
        return t.view(-1, t.shape[-1])
    except RuntimeError:
        return t.contiguous().view(-1, t.shape[-1])


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def dot_dtype(dtype: torch.dtype):
    """Operand type for `tl.dot`: the input dtype on a GPU (tensor cores), fp32 under the interpreter,
    whose bf16 arithmetic is wrong (it has no bf16 in NumPy)."""
    import triton.language as tl

    if interpreting():
        return tl.float32
    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}.get(dtype, tl.float32)


def num_programs_hint(device: torch.device, default: int = 4) -> int:
    """How many persistent programs to launch for row reductions: a few per SM on a GPU, few on CPU."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return default


def upcast(t: Tensor) -> Tensor:
    """The references' compute precision: fp32 for fp32 and narrower, fp64 kept (the tests' ground truth)."""
    return t if t.dtype == torch.float64 else t.float()


def staged(dtype: torch.dtype) -> torch.dtype:
    """Buffer dtype for a kernel output meant to be `dtype`. The interpreter casts fp32 to bf16 by
    truncation where a GPU rounds to nearest even, so under it bf16 outputs are written in fp32 and
    rounded by torch afterwards (`finish`); on a GPU this is the identity."""
    return torch.float32 if dtype == torch.bfloat16 and interpreting() else dtype


def finish(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)
