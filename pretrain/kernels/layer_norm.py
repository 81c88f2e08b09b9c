"""LayerNorm (Ba et al. 2016, https://arxiv.org/abs/1607.06450) with optional affine and adaLN modulation.

adaLN (DiT, Peebles & Xie 2022, https://arxiv.org/abs/2212.09748): `norm(x) * (1 + scale) + shift`, where
shift/scale come from the conditioning, typically (B, 1, D) for x (B, S, D). The kernel indexes them
through broadcast strides, so the (B, S, D) expansion never exists in memory in the forward.
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
    use_triton,
)


def layer_norm_reference(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float = 1e-6,
                         shift: Tensor | None = None, scale: Tensor | None = None) -> Tensor:
    f = lambda t: None if t is None else upcast(t)  # noqa: E731
    y = F.layer_norm(upcast(x), x.shape[-1:], f(weight), f(bias), eps)
    if scale is not None:
        y = y * (1 + upcast(scale))
    if shift is not None:
        y = y + upcast(shift)
    return y.to(x.dtype)


@kernel
def _ln_fwd_kernel(X, W, B, SH, SC, Y, MEAN, RSTD, n_rows, D, M1, sx, sy,
                   sh0, sh1, sh2, sc0, sc1, sc2, eps,
                   HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_SCALE: tl.constexpr,
                   BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.arange(0, BLOCK_D)
    rmask = r < n_rows
    cmask = c < D
    mask = rmask[:, None] & cmask[None, :]
    r64 = r.to(tl.int64)
    x = tl.load(X + r64[:, None] * sx + c[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.reduce(x, 1, tl.standard._sum_combine) / D
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.reduce(xc * xc, 1, tl.standard._sum_combine) / D + eps)
    y = xc * rstd[:, None]
    if HAS_W:
        y = y * tl.load(W + c, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        y = y + tl.load(B + c, mask=cmask, other=0.0).to(tl.float32)[None, :]
    # Row r is (r // M1, r % M1) of x viewed as (M0, M1, D): shift/scale strides may be 0 (broadcast).
    i0 = (r64 // M1)[:, None]
    i1 = (r64 % M1)[:, None]
    if HAS_SCALE:
        sc = tl.load(SC + i0 * sc0 + i1 * sc1 + c[None, :] * sc2, mask=mask, other=0.0).to(tl.float32)
        y = y * (1.0 + sc)
    if HAS_SHIFT:
        y = y + tl.load(SH + i0 * sh0 + i1 * sh1 + c[None, :] * sh2, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + r64[:, None] * sy + c[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + r, mean, mask=rmask)
    tl.store(RSTD + r, rstd, mask=rmask)


@kernel
def _ln_bwd_kernel(DY, X, W, B, SC, MEAN, RSTD, DX, DWP, DBP, DSC, n_rows, D, M1, rows_per_prog,
                   sdy, sx, sc0, sc1, sc2,
                   HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SCALE: tl.constexpr,
                   BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    # A contiguous slab of rows per program, one partial dW/dB row each: deterministic, no atomics.
    pid = tl.program_id(0)
    c = tl.arange(0, BLOCK_D)
    cmask = c < D
    w = tl.full([BLOCK_D], 1.0, tl.float32)
    if HAS_W:
        w = tl.load(W + c, mask=cmask, other=0.0).to(tl.float32)
    b = tl.full([BLOCK_D], 0.0, tl.float32)
    if HAS_B:
        b = tl.load(B + c, mask=cmask, other=0.0).to(tl.float32)
    dw = tl.full([BLOCK_D], 0.0, tl.float32)
    db = tl.full([BLOCK_D], 0.0, tl.float32)
    start = pid * rows_per_prog
    for i in range(0, rows_per_prog, BLOCK_R):
        r = start + i + tl.arange(0, BLOCK_R)
        rmask = r < n_rows
        mask = rmask[:, None] & cmask[None, :]
        r64 = r.to(tl.int64)
        x = tl.load(X + r64[:, None] * sx + c[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + r64[:, None] * sdy + c[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + r, mask=rmask, other=0.0)
        rstd = tl.load(RSTD + r, mask=rmask, other=0.0)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        if HAS_SCALE:
            i0 = (r64 // M1)[:, None]
            i1 = (r64 % M1)[:, None]
            sc = tl.load(SC + i0 * sc0 + i1 * sc1 + c[None, :] * sc2, mask=mask, other=0.0).to(tl.float32)
            # d/dscale of y0 * (1 + scale) is y0, the affine output before modulation (recomputed).
            y0 = xhat * w[None, :] + b[None, :]
            tl.store(DSC + r64[:, None] * D + c[None, :], dy * y0, mask=mask)
            dy = dy * (1.0 + sc)
        dw += tl.reduce(dy * xhat, 0, tl.standard._sum_combine)
        db += tl.reduce(dy, 0, tl.standard._sum_combine)
        dxhat = dy * w[None, :]
        c1 = tl.reduce(dxhat * xhat, 1, tl.standard._sum_combine) / D
        c2 = tl.reduce(dxhat, 1, tl.standard._sum_combine) / D
        dx = (dxhat - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
        tl.store(DX + r64[:, None] * D + c[None, :], dx.to(DX.dtype.element_ty), mask=mask)
    if HAS_W:
        tl.store(DWP + pid * D + c, dw, mask=cmask)
    if HAS_B:
        tl.store(DBP + pid * D + c, db, mask=cmask)


def _mod3(t: Tensor | None, x: Tensor) -> tuple[Tensor, tuple[int, int, int]]:
    """shift/scale expanded to x and viewed as (M0, M1, D) without copying when broadcast strides allow."""
    if t is None:
        return x, (0, 0, 0)
    m1 = x.shape[-2] if x.dim() >= 2 else 1
    t3 = t.expand(x.shape).reshape(-1, m1, x.shape[-1])
    return t3, tuple(t3.stride())


def _block_rows(block_d: int, n_rows: int, device: torch.device) -> int:
    budget = 16384 if device.type == "cpu" else 8192  # the interpreter pays per program
    return max(1, min(next_pow2(n_rows), budget // block_d, 64))


def _fwd_launch(x, weight, bias, shift, scale, eps):
    D = x.shape[-1]
    x2 = rows(x)
    n = x2.shape[0]
    m1 = x.shape[-2] if x.dim() >= 2 else 1
    sh, shs = _mod3(shift, x)
    sc, scs = _mod3(scale, x)
    y = new_empty(x.shape, staged(x.dtype), x.device)
    mean = new_empty((n,), torch.float32, x.device)
    rstd = new_empty((n,), torch.float32, x.device)
    block_d = next_pow2(D)
    block_r = _block_rows(block_d, n, x.device)
    _ln_fwd_kernel[(cdiv(n, block_r),)](
        x2, weight if weight is not None else x2, bias if bias is not None else x2, sh, sc, y, mean, rstd,
        n, D, m1, x2.stride(0), D, *shs, *scs, eps,
        HAS_W=weight is not None, HAS_B=bias is not None, HAS_SHIFT=shift is not None,
        HAS_SCALE=scale is not None, BLOCK_R=block_r, BLOCK_D=block_d,
    )
    return finish(y, x.dtype), mean, rstd


def _bwd_launch(dy, x, weight, bias, scale, mean, rstd):
    D = x.shape[-1]
    dy2, x2 = rows(dy), rows(x)
    n = x2.shape[0]
    m1 = x.shape[-2] if x.dim() >= 2 else 1
    sc, scs = _mod3(scale, x)
    block_d = next_pow2(D)
    block_r = _block_rows(block_d, n, x.device)
    n_prog = max(1, min(num_programs_hint(x.device), cdiv(n, block_r)))
    rows_per_prog = cdiv(cdiv(n, n_prog), block_r) * block_r
    n_prog = cdiv(n, rows_per_prog)
    dx = new_empty(x.shape, staged(x.dtype), x.device)
    dwp = new_empty((n_prog, D), torch.float32, x.device) if weight is not None else x.new_empty(0)
    dbp = new_empty((n_prog, D), torch.float32, x.device) if bias is not None else x.new_empty(0)
    dsc = new_empty(x.shape, torch.float32, x.device) if scale is not None else x.new_empty(0)
    _ln_bwd_kernel[(n_prog,)](
        dy2, x2, weight if weight is not None else x2, bias if bias is not None else x2, sc, mean, rstd,
        dx, dwp, dbp, dsc, n, D, m1, rows_per_prog, dy2.stride(0), x2.stride(0), *scs,
        HAS_W=weight is not None, HAS_B=bias is not None, HAS_SCALE=scale is not None,
        BLOCK_R=block_r, BLOCK_D=block_d,
    )
    dw = dwp.sum(0).to(weight.dtype) if weight is not None else dwp
    db = dbp.sum(0).to(bias.dtype) if bias is not None else dbp
    return finish(dx, x.dtype), dw, db, dsc


@torch.library.custom_op("pretrain_kernels::layer_norm_fwd", mutates_args=())
def _layer_norm_fwd(x: Tensor, weight: Tensor | None, bias: Tensor | None, shift: Tensor | None,
                    scale: Tensor | None, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    return _fwd_launch(x, weight, bias, shift, scale, eps)


@_layer_norm_fwd.register_fake
def _(x, weight, bias, shift, scale, eps):
    n = x.numel() // x.shape[-1]
    return torch.empty_like(x), x.new_empty((n,), dtype=torch.float32), x.new_empty((n,), dtype=torch.float32)


@torch.library.custom_op("pretrain_kernels::layer_norm_bwd", mutates_args=())
def _layer_norm_bwd(dy: Tensor, x: Tensor, weight: Tensor | None, bias: Tensor | None, scale: Tensor | None,
                    mean: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _bwd_launch(dy, x, weight, bias, scale, mean, rstd)


@_layer_norm_bwd.register_fake
def _(dy, x, weight, bias, scale, mean, rstd):
    e = x.new_empty(0)
    return (torch.empty_like(x), torch.empty_like(weight) if weight is not None else e,
            torch.empty_like(bias) if bias is not None else e,
            torch.empty_like(x, dtype=torch.float32) if scale is not None else e)


class LayerNormFunction(torch.autograd.Function):
    """Autograd for the Triton path; `register_autograd` installs these same methods on the custom op."""

    @staticmethod
    def forward(x, weight, bias, shift, scale, eps):
        return _layer_norm_fwd(x, weight, bias, shift, scale, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, shift, scale, _ = inputs
        _, mean, rstd = output
        ctx.save_for_backward(x, weight, bias, scale, mean, rstd)
        ctx.shift_shape = None if shift is None else (shift.shape, shift.dtype)

    @staticmethod
    def backward(ctx, dy, _dmean, _drstd):
        x, weight, bias, scale, mean, rstd = ctx.saved_tensors
        dx, dw, db, dsc = _layer_norm_bwd(dy, x, weight, bias, scale, mean, rstd)
        dshift = None
        if ctx.shift_shape is not None:
            dshift = dy.float().sum_to_size(ctx.shift_shape[0]).to(ctx.shift_shape[1])
        dscale = dsc.sum_to_size(scale.shape).to(scale.dtype) if scale is not None else None
        return (dx, dw if weight is not None else None, db if bias is not None else None, dshift, dscale, None)


torch.library.register_autograd(
    "pretrain_kernels::layer_norm_fwd", LayerNormFunction.backward, setup_context=LayerNormFunction.setup_context
)


def layer_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float = 1e-6,
               shift: Tensor | None = None, scale: Tensor | None = None, *, backend: str = "auto") -> Tensor:
    """LayerNorm over the last dim; optional affine `weight`/`bias`; optional adaLN
    `norm(x) * (1 + scale) + shift` with shift/scale broadcastable to x (e.g. (B, 1, D))."""
    if not use_triton(backend, x):
        return layer_norm_reference(x, weight, bias, eps, shift, scale)
    return _layer_norm_fwd(x, weight, bias, shift, scale, float(eps))[0]
