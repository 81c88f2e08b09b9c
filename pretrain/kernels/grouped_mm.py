"""Grouped matrix product for mixture-of-experts layers: one matmul per expert over its consecutive rows
(`grouped_mm`, as in MegaBlocks, https://arxiv.org/abs/2211.15841), beside its plain-PyTorch reference (a
loop over experts) and `torch._grouped_mm` as a benchmark baseline.

The rows arrive grouped by expert (`moe.moe_permute`). Programs find their expert in a tile map built on the
device from the prefix sum of the counts, sized by an upper bound, so no launch waits on the host. The
weight gradient sums an expert's rows in one program per tile, without atomics, so the backward is
deterministic.
"""

from __future__ import annotations

import torch
import triton.language as tl
from torch import Tensor

from pretrain import compat
from pretrain.kernels._runtime import (
    cdiv,
    dot_dtype,
    finish,
    interpreting,
    kernel,
    new_empty,
    rows,
    staged,
    use_triton,
)

# ------------------------------------------------------------------------------------------ reference


def grouped_mm_reference(xs: Tensor, w: Tensor, counts: Tensor) -> Tensor:
    outs = [torch.matmul(xe, we) for xe, we in zip(xs.split(counts.tolist()), w, strict=True)]
    return torch.cat(outs)


# ------------------------------------------------------------------------------------------ kernels


@kernel
def _gmm_kernel(X, W, Y, TILE_E, TILE_R, OFFS, N, K, sx, swe, swk, swn, sy,
                DOT: tl.constexpr, PREC: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Y[rows of e] = X[rows of e] @ B_e, where B_e[k, n] = W + e*swe + k*swk + n*swn (so the backward's
    dX = dY @ W_e^T is this kernel with the last two strides swapped). Program (tile, n-block) reads its
    expert and first row from the tile map; tiles past the last one (the map is sized by an upper bound)
    have expert -1 and mask every row."""
    pid_t, pid_n = tl.program_id(0), tl.program_id(1)
    e = tl.load(TILE_E + pid_t)
    valid = e >= 0
    e = tl.maximum(e, 0).to(tl.int64)
    r = tl.load(TILE_R + pid_t) + tl.arange(0, BLOCK_M)
    rm = r < tl.where(valid, tl.load(OFFS + e + 1), 0)  # rows are >= 0: an unused tile masks them all
    c = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cm = c < N
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        km = kk < K
        a = tl.load(X + r[:, None] * sx + kk[None, :], mask=rm[:, None] & km[None, :], other=0.0)
        b = tl.load(W + e * swe + kk[:, None] * swk + c[None, :] * swn, mask=km[:, None] & cm[None, :], other=0.0)
        acc = tl.dot(a.to(DOT), b.to(DOT), acc, input_precision=PREC)
    tl.store(Y + r[:, None] * sy + c[None, :], acc.to(Y.dtype.element_ty), mask=rm[:, None] & cm[None, :])


@kernel
def _gmm_dw_kernel(X, DY, DW, OFFS, M, N, sx, sdy, DOT: tl.constexpr, PREC: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """DW[e] = X_e^T @ DY_e over expert e's rows; an expert without rows gets zeros (an empty loop)."""
    e, pid_m, pid_n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    start = tl.load(OFFS + e)
    end = tl.load(OFFS + e + 1)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    c = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mm, cm = m < M, c < N
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for r0 in range(start, end, BLOCK_K):
        r = r0 + tl.arange(0, BLOCK_K)
        rm = r < end
        xt = tl.load(X + r[None, :] * sx + m[:, None], mask=mm[:, None] & rm[None, :], other=0.0)
        dy = tl.load(DY + r[:, None] * sdy + c[None, :], mask=rm[:, None] & cm[None, :], other=0.0)
        acc = tl.dot(xt.to(DOT), dy.to(DOT), acc, input_precision=PREC)
    out = DW + e.to(tl.int64) * M * N + m[:, None] * N + c[None, :]
    tl.store(out, acc.to(DW.dtype.element_ty), mask=mm[:, None] & cm[None, :])


def _gmm_config(t: Tensor) -> dict:
    """fp32 inputs multiply in IEEE fp32 (tf32 would miss the error rule); the interpreter takes big tiles."""
    cfg = dict(DOT=dot_dtype(t.dtype), PREC="ieee" if t.dtype == torch.float32 else "tf32")
    if interpreting() or not t.is_cuda:
        return dict(cfg, BLOCK_M=32, BLOCK_N=64, BLOCK_K=64)
    return dict(cfg, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=3)


def _offsets(counts: Tensor) -> Tensor:
    return torch.nn.functional.pad(torch.cumsum(counts, 0), (1, 0))


def _tile_map(counts: Tensor, n_rows: int, block_m: int) -> tuple[Tensor, Tensor]:
    """(expert, first row) of every BLOCK_M-row tile, experts in order, tiles never straddling two
    experts; sized cdiv(N, BLOCK_M) + E (an upper bound, no host sync) with expert -1 past the end."""
    offs = _offsets(counts)
    tiles = (counts + block_m - 1) // block_m
    ends = torch.cumsum(tiles, 0)
    tid = torch.arange(cdiv(n_rows, block_m) + counts.numel(), device=counts.device)
    e = torch.searchsorted(ends, tid, right=True)
    ec = e.clamp(max=counts.numel() - 1)
    first = offs[ec] + (tid - (ends[ec] - tiles[ec])) * block_m
    valid = e < counts.numel()
    return torch.where(valid, ec, -1).to(torch.int32), torch.where(valid, first, 0)


def _gmm(x: Tensor, w: Tensor, counts: Tensor, n: int, strides: tuple[int, int, int], dtype) -> Tensor:
    cfg = _gmm_config(x)
    y = new_empty((x.shape[0], n), staged(dtype), x.device)
    if y.numel():
        tile_e, tile_r = _tile_map(counts, x.shape[0], cfg["BLOCK_M"])
        _gmm_kernel[(tile_e.numel(), cdiv(n, cfg["BLOCK_N"]))](
            x, w, y, tile_e, tile_r, _offsets(counts), n, x.shape[1], x.stride(0), *strides, y.stride(0), **cfg)
    return finish(y, dtype)


@torch.library.custom_op("pretrain_kernels::grouped_mm_fwd", mutates_args=())
def _grouped_mm_fwd(xs: Tensor, w: Tensor, counts: Tensor) -> Tensor:
    return _gmm(rows(xs), w, counts, w.shape[2], w.stride(), xs.dtype)


@_grouped_mm_fwd.register_fake
def _(xs, w, counts):
    return xs.new_empty((xs.shape[0], w.shape[2]))


@torch.library.custom_op("pretrain_kernels::grouped_mm_bwd", mutates_args=())
def _grouped_mm_bwd(dy: Tensor, xs: Tensor, w: Tensor, counts: Tensor, need_dw: bool) -> tuple[Tensor, Tensor]:
    """(dxs, dw); dw is empty when `need_dw` is false (frozen experts under LoRA: no weight gradient computed)."""
    d2, x2 = rows(dy), rows(xs)
    e, m, n = w.shape
    dxs = _gmm(d2, w, counts, m, (w.stride(0), w.stride(2), w.stride(1)), xs.dtype)
    if not need_dw:
        return dxs, w.new_empty(0)
    cfg = _gmm_config(xs)
    dw = new_empty((e, m, n), staged(w.dtype), w.device)
    if dw.numel():
        _gmm_dw_kernel[(e, cdiv(m, cfg["BLOCK_M"]), cdiv(n, cfg["BLOCK_N"]))](
            x2, d2, dw, _offsets(counts), m, n, x2.stride(0), d2.stride(0), **cfg)
    return dxs, finish(dw, w.dtype)


@_grouped_mm_bwd.register_fake
def _(dy, xs, w, counts, need_dw):
    return torch.empty_like(xs), torch.empty_like(w) if need_dw else w.new_empty(0)


class GroupedMMFunction(torch.autograd.Function):
    """Autograd for the Triton grouped matmul: dxs_e = dy_e @ w[e]^T, dw[e] = xs_e^T @ dy_e."""

    @staticmethod
    def forward(xs, w, counts):
        return _grouped_mm_fwd(xs, w, counts)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, dy):
        xs, w, counts = ctx.saved_tensors
        dxs, dw = _grouped_mm_bwd(dy, xs, w, counts, ctx.needs_input_grad[1])
        return dxs, dw if ctx.needs_input_grad[1] else None, None


torch.library.register_autograd("pretrain_kernels::grouped_mm_fwd", GroupedMMFunction.backward,
                                setup_context=GroupedMMFunction.setup_context)


# ------------------------------------------------------------------------------------- public API


def torch_grouped_available(device: torch.device) -> bool:
    """Whether `torch._grouped_mm` is offered for `device`: a CUDA GPU of compute capability 9.0 or newer."""
    return (compat.torch_has_grouped_mm() and device.type == "cuda"
            and torch.cuda.get_device_capability(device) >= (9, 0))


def grouped_mm(xs: Tensor, w: Tensor, counts: Tensor, *, backend: str = "auto") -> Tensor:
    """Per-expert matmul: `xs` (N, d_in) holds consecutive groups of counts[e] rows, `w` (E, d_in, d_out)
    -> (N, d_out), group e times w[e]; experts without rows are allowed. `backend="torch_grouped"` calls
    `torch._grouped_mm` (CUDA sm90+ only; a benchmark baseline, never chosen by "auto")."""
    if xs.dim() != 2 or w.dim() != 3 or xs.shape[1] != w.shape[1] or counts.shape != (w.shape[0],):
        raise ValueError(f"grouped_mm: want xs (N, d_in), w (E, d_in, d_out), counts (E,), got "
                         f"{tuple(xs.shape)}, {tuple(w.shape)}, {tuple(counts.shape)}")
    if xs.dtype != w.dtype:
        raise ValueError(f"grouped_mm: xs is {xs.dtype} but w is {w.dtype}")
    if backend == "torch_grouped":
        if not torch_grouped_available(xs.device):
            raise ValueError("grouped_mm: backend 'torch_grouped' needs torch._grouped_mm and a CUDA GPU of "
                             f"compute capability 9.0+; not used on {xs.device.type}")
        return compat.torch_grouped_mm(xs, w, counts)
    if not use_triton(backend, xs):
        return grouped_mm_reference(xs, w, counts)
    return _grouped_mm_fwd(xs, w, counts)
