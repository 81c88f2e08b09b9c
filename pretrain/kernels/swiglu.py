"""SwiGLU activation `silu(gate) * up` (Shazeer 2020, https://arxiv.org/abs/2002.05202).

The backward recomputes `silu(gate)` from the saved inputs instead of storing it: one extra
elementwise pass costs far less than an activation-sized tensor kept alive until the backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton.language as tl
from torch import Tensor

from pretrain.kernels._runtime import cdiv, finish, kernel, new_empty, next_pow2, rows, staged, use_triton


def swiglu_reference(gate: Tensor, up: Tensor) -> Tensor:
    return F.silu(gate) * up


@kernel
def _swiglu_fwd_kernel(G, U, Y, n_rows, N, sg, su, sy, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (r < n_rows)[:, None] & (c < N)[None, :]
    r64 = r.to(tl.int64)[:, None]
    g = tl.load(G + r64 * sg + c[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + r64 * su + c[None, :], mask=mask, other=0.0).to(tl.float32)
    # sigmoid written out: tl.sigmoid is a @jit helper that the interpreter cannot run once triton
    # was imported without TRITON_INTERPRET (see kernels/_runtime.py).
    y = g / (1.0 + tl.exp(-g)) * u
    tl.store(Y + r64 * sy + c[None, :], y.to(Y.dtype.element_ty), mask=mask)


@kernel
def _swiglu_bwd_kernel(DY, G, U, DG, DU, n_rows, N, sdy, sg, su, sd,
                       BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (r < n_rows)[:, None] & (c < N)[None, :]
    r64 = r.to(tl.int64)[:, None]
    dy = tl.load(DY + r64 * sdy + c[None, :], mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + r64 * sg + c[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + r64 * su + c[None, :], mask=mask, other=0.0).to(tl.float32)
    sig = 1.0 / (1.0 + tl.exp(-g))
    silu = g * sig
    # d silu / dg = sig * (1 + g * (1 - sig))
    dg = dy * u * sig * (1.0 + g * (1.0 - sig))
    tl.store(DG + r64 * sd + c[None, :], dg.to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + r64 * sd + c[None, :], (dy * silu).to(DU.dtype.element_ty), mask=mask)


def _tiles(n_rows: int, n: int, device: torch.device) -> tuple[int, int]:
    block_n = min(next_pow2(n), 1024)
    # The interpreter pays per program: big tiles there; ~4K elements per tile on a GPU.
    budget = 32768 if device.type == "cpu" else 4096
    return max(1, min(next_pow2(n_rows), budget // block_n)), block_n


def _grid(n_rows: int, n: int, br: int, bn: int) -> tuple[int, int]:
    return (cdiv(n_rows, br), cdiv(n, bn))


@torch.library.custom_op("pretrain_kernels::swiglu_fwd", mutates_args=())
def _swiglu_fwd(gate: Tensor, up: Tensor) -> Tensor:
    g2, u2 = rows(gate), rows(up)
    y = new_empty(gate.shape, staged(gate.dtype), gate.device)
    n_rows, n = g2.shape
    br, bn = _tiles(n_rows, n, gate.device)
    _swiglu_fwd_kernel[_grid(n_rows, n, br, bn)](
        g2, u2, y, n_rows, n, g2.stride(0), u2.stride(0), n, BLOCK_R=br, BLOCK_N=bn
    )
    return finish(y, gate.dtype)


@_swiglu_fwd.register_fake
def _(gate, up):
    return torch.empty_like(gate)


@torch.library.custom_op("pretrain_kernels::swiglu_bwd", mutates_args=())
def _swiglu_bwd(dy: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    d2, g2, u2 = rows(dy), rows(gate), rows(up)
    dg = new_empty(gate.shape, staged(gate.dtype), gate.device)
    du = new_empty(up.shape, staged(up.dtype), up.device)
    n_rows, n = g2.shape
    br, bn = _tiles(n_rows, n, gate.device)
    _swiglu_bwd_kernel[_grid(n_rows, n, br, bn)](
        d2, g2, u2, dg, du, n_rows, n, d2.stride(0), g2.stride(0), u2.stride(0), n, BLOCK_R=br, BLOCK_N=bn
    )
    return finish(dg, gate.dtype), finish(du, up.dtype)


@_swiglu_bwd.register_fake
def _(dy, gate, up):
    return torch.empty_like(gate), torch.empty_like(up)


class SwiGLUFunction(torch.autograd.Function):
    """Autograd for the Triton path; `register_autograd` installs these same methods on the custom op."""

    @staticmethod
    def forward(gate, up):
        return _swiglu_fwd(gate, up)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)  # the inputs, not silu(gate): recomputed in the backward

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        return _swiglu_bwd(dy, gate, up)


torch.library.register_autograd("pretrain_kernels::swiglu_fwd", SwiGLUFunction.backward, setup_context=SwiGLUFunction.setup_context)


def swiglu(gate: Tensor, up: Tensor, *, backend: str = "auto") -> Tensor:
    """`silu(gate) * up`, elementwise; `gate` and `up` have the same shape."""
    if gate.shape != up.shape:
        raise ValueError(f"swiglu: gate {tuple(gate.shape)} and up {tuple(up.shape)} differ")
    if not use_triton(backend, gate):
        return swiglu_reference(gate, up)
    return _swiglu_fwd(gate, up)
