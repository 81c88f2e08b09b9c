"""RMSNorm (Zhang & Sennrich 2019, https://arxiv.org/abs/1910.07467), optionally fused with the residual add.

`rms_norm(x, weight, eps, residual)` returns `norm(x) * weight`, or with `residual` the pair
`(norm(x + residual) * weight, x + residual)` from one pass over memory. Statistics are fp32 whatever the
input dtype. Triton kernels, their launchers, the autograd wiring (a `torch.library` custom op, so
`torch.compile` sees one opaque node) and the plain-PyTorch reference all live here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton.language as tl
from torch import Tensor

from pretrain.kernels._runtime import (
    cdiv,
    finish,
    kernel,
    new_empty,
    next_pow2,
    num_programs_hint,
    rows,
    staged,
    upcast,
    use_aten,
    use_triton,
)


def rms_norm_reference(x: Tensor, weight: Tensor, eps: float = 1e-6, residual: Tensor | None = None):
    """Plain PyTorch: the CPU path and the ground truth of the tests."""
    s = x if residual is None else x + residual
    sf = upcast(s)
    y = sf * torch.rsqrt(sf.pow(2).mean(-1, keepdim=True) + eps) * upcast(weight)
    y = y.to(x.dtype)
    return y if residual is None else (y, s)


def rms_norm_aten(x: Tensor, weight: Tensor, eps: float = 1e-6, residual: Tensor | None = None):
    """The CPU path: ATen's fused `F.rms_norm` (one op forward and backward where the reference takes five)."""
    s = x if residual is None else x + residual
    y = F.rms_norm(s, s.shape[-1:], weight, eps)
    return y if residual is None else (y, s)


# ----------------------------------------------------------------------------------------------- Triton


@kernel
def _rms_fwd_kernel(X, R, W, Y, S, RSTD, n_rows, D, sx, sr, sy, ss, eps,
                    HAS_RES: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.arange(0, BLOCK_D)
    rmask = r < n_rows
    mask = rmask[:, None] & (c < D)[None, :]
    r64 = r.to(tl.int64)[:, None]
    x = tl.load(X + r64 * sx + c[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        x += tl.load(R + r64 * sr + c[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(S + r64 * ss + c[None, :], x.to(S.dtype.element_ty), mask=mask)
    rstd = 1.0 / tl.sqrt(tl.reduce(x * x, 1, tl.standard._sum_combine) / D + eps)
    w = tl.load(W + c, mask=c < D, other=0.0).to(tl.float32)
    y = x * rstd[:, None] * w[None, :]
    tl.store(Y + r64 * sy + c[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + r, rstd, mask=rmask)


@kernel
def _rms_bwd_kernel(DY, X, W, RSTD, DS, DX, DWP, n_rows, D, rows_per_prog, sdy, sx, sds, sdx,
                    HAS_DS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    # Each program owns a contiguous slab of rows and writes one partial dW row: summing the
    # partials afterwards is deterministic, unlike atomics.
    pid = tl.program_id(0)
    c = tl.arange(0, BLOCK_D)
    cmask = c < D
    w = tl.load(W + c, mask=cmask, other=0.0).to(tl.float32)
    dw = tl.full([BLOCK_D], 0.0, tl.float32)
    start = pid * rows_per_prog
    for i in range(0, rows_per_prog, BLOCK_R):
        r = start + i + tl.arange(0, BLOCK_R)
        rmask = r < n_rows
        mask = rmask[:, None] & cmask[None, :]
        r64 = r.to(tl.int64)[:, None]
        x = tl.load(X + r64 * sx + c[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + r64 * sdy + c[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + r, mask=rmask, other=0.0)
        xhat = x * rstd[:, None]
        wdy = dy * w[None, :]
        proj = tl.reduce(xhat * wdy, 1, tl.standard._sum_combine) / D
        dx = (wdy - xhat * proj[:, None]) * rstd[:, None]
        if HAS_DS:
            dx += tl.load(DS + r64 * sds + c[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + r64 * sdx + c[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        dw += tl.reduce(dy * xhat, 0, tl.standard._sum_combine)
    tl.store(DWP + pid * D + c, dw, mask=cmask)


def _block_rows(block_d: int, n_rows: int, device: torch.device) -> int:
    # The interpreter pays per program, so it takes big row tiles; a GPU wants ~8K elements per tile.
    budget = 16384 if device.type == "cpu" else 8192
    return max(1, min(next_pow2(n_rows), budget // block_d, 64))


def _fwd_launch(x: Tensor, weight: Tensor, residual: Tensor | None, eps: float):
    D = x.shape[-1]
    x2 = rows(x)
    r2 = rows(residual) if residual is not None else x2
    n = x2.shape[0]
    y = new_empty(x.shape, staged(x.dtype), x.device)
    s = new_empty(x.shape, staged(x.dtype), x.device) if residual is not None else x.new_empty(0)
    rstd = new_empty((n,), torch.float32, x.device)
    s2 = s.view(-1, D) if residual is not None else y.view(-1, D)
    block_d = next_pow2(D)
    block_r = _block_rows(block_d, n, x.device)
    _rms_fwd_kernel[(cdiv(n, block_r),)](
        x2, r2, weight, y.view(-1, D), s2, rstd, n, D, x2.stride(0), r2.stride(0), D, D, eps,
        HAS_RES=residual is not None, BLOCK_R=block_r, BLOCK_D=block_d,
    )
    return finish(y, x.dtype), finish(s, x.dtype), rstd


def _bwd_launch(dy: Tensor, s: Tensor, weight: Tensor, rstd: Tensor, ds: Tensor | None):
    D = s.shape[-1]
    dy2, s2 = rows(dy), rows(s)
    ds2 = rows(ds) if ds is not None else dy2
    n = s2.shape[0]
    dx = new_empty(s.shape, staged(s.dtype), s.device)
    block_d = next_pow2(D)
    block_r = _block_rows(block_d, n, s.device)
    n_prog = max(1, min(num_programs_hint(s.device), cdiv(n, block_r)))
    rows_per_prog = cdiv(cdiv(n, n_prog), block_r) * block_r
    n_prog = cdiv(n, rows_per_prog)
    dw_part = new_empty((n_prog, D), torch.float32, s.device)
    _rms_bwd_kernel[(n_prog,)](
        dy2, s2, weight, rstd, ds2, dx.view(-1, D), dw_part, n, D, rows_per_prog,
        dy2.stride(0), s2.stride(0), ds2.stride(0), D,
        HAS_DS=ds is not None, BLOCK_R=block_r, BLOCK_D=block_d,
    )
    return finish(dx, s.dtype), dw_part.sum(0).to(weight.dtype)


# --------------------------------------------------------------------------------------------- autograd


@torch.library.custom_op("pretrain_kernels::rms_norm_fwd", mutates_args=())
def _rms_norm_fwd(x: Tensor, weight: Tensor, residual: Tensor | None, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    return _fwd_launch(x, weight, residual, eps)


@_rms_norm_fwd.register_fake
def _(x, weight, residual, eps):
    n = x.numel() // x.shape[-1]
    s = torch.empty_like(x) if residual is not None else x.new_empty(0)
    return torch.empty_like(x), s, x.new_empty((n,), dtype=torch.float32)


@torch.library.custom_op("pretrain_kernels::rms_norm_bwd", mutates_args=())
def _rms_norm_bwd(dy: Tensor, s: Tensor, weight: Tensor, rstd: Tensor, ds: Tensor | None) -> tuple[Tensor, Tensor]:
    return _bwd_launch(dy, s, weight, rstd, ds)


@_rms_norm_bwd.register_fake
def _(dy, s, weight, rstd, ds):
    return torch.empty_like(s), torch.empty_like(weight)


class RMSNormFunction(torch.autograd.Function):
    """Autograd for the Triton path. `setup_context`/`backward` are also what `register_autograd`
    installs on the custom op, so eager, `.apply` and `torch.compile` share one derivation."""

    @staticmethod
    def forward(x, weight, residual, eps):
        return _rms_norm_fwd(x, weight, residual, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, residual, _ = inputs
        _, s, rstd = output
        ctx.has_res = residual is not None
        # Without a residual the normalised input is x itself; with one it is the stored sum.
        ctx.save_for_backward(s if ctx.has_res else x, weight, rstd)

    @staticmethod
    def backward(ctx, dy, ds, _drstd):
        s, weight, rstd = ctx.saved_tensors
        dx, dw = _rms_norm_bwd(dy.contiguous(), s, weight, rstd, ds if ctx.has_res else None)
        return dx, dw, (dx if ctx.has_res else None), None


torch.library.register_autograd(
    "pretrain_kernels::rms_norm_fwd", RMSNormFunction.backward, setup_context=RMSNormFunction.setup_context
)


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-6, residual: Tensor | None = None, *, backend: str = "auto"):
    """RMS-normalise the last dim of `x` and scale by `weight`; with `residual`, normalise `x + residual`
    and also return that sum: `(normed, x + residual)`."""
    if use_aten(backend, x) and weight.dtype == x.dtype:
        return rms_norm_aten(x, weight, eps, residual)
    if not use_triton(backend, x):
        return rms_norm_reference(x, weight, eps, residual)
    y, s, _ = _rms_norm_fwd(x, weight, residual, float(eps))
    return y if residual is None else (y, s)
