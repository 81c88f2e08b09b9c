"""Mixture-of-experts token movement: token rows grouped by expert (`moe_permute`) and the experts' outputs
weighted back into token order (`moe_unpermute`), each beside its plain-PyTorch reference. The per-expert
matmul between the two lives in `grouped_mm.py`.

The routing bookkeeping (a stable argsort of the expert ids, a bincount) stays in torch: it moves T*k
integers. The kernels move the (T*k, d) rows. Neither uses atomics: a token's k rows are summed by one
program (the inverse permutation says where they are), so every backward is deterministic.
"""

from __future__ import annotations

import torch
import triton.language as tl
from torch import Tensor

from pretrain.kernels._runtime import (
    cdiv,
    finish,
    kernel,
    new_empty,
    next_pow2,
    rows,
    staged,
    use_triton,
)
from pretrain.kernels.grouped_mm import (  # noqa: F401  (moved to grouped_mm.py; still importable from here)
    grouped_mm,
    grouped_mm_reference,
    torch_grouped_available,
)

# ------------------------------------------------------------------------------------------ references


def moe_routing(experts: Tensor, n_experts: int) -> tuple[Tensor, Tensor]:
    """(counts (E,), order (T*k,)): rows per expert, and the flat (token*k + slot) index of each sorted row,
    stable so that within an expert rows keep (token, slot) order."""
    flat = experts.reshape(-1)
    counts = torch.bincount(flat, minlength=n_experts)
    if counts.numel() != n_experts:
        raise ValueError(f"moe_permute: expert ids reach {counts.numel() - 1}, beyond n_experts={n_experts}")
    return counts, torch.argsort(flat, stable=True)


def inverse_order(order: Tensor) -> Tensor:
    """`inv[order[i]] = i`: the sorted row that holds flat slot (token*k + slot)."""
    inv = torch.empty_like(order)
    inv[order] = torch.arange(order.numel(), device=order.device)
    return inv


def moe_permute_reference(x: Tensor, experts: Tensor, n_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    counts, order = moe_routing(experts, n_experts)
    return x[order // experts.shape[1]], counts, order


def moe_unpermute_reference(ys: Tensor, order: Tensor, weights: Tensor) -> Tensor:
    t, k = weights.shape
    return (ys[inverse_order(order)].view(t, k, -1) * weights[..., None]).sum(1)


# ----------------------------------------------------------------------------------- permute kernels


@kernel
def _gather_kernel(X, ORDER, Y, n_rows, N, K, sx, sy, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    """Y[i] = X[ORDER[i] // K]: sorted row i is a copy of its token's row."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = r < n_rows
    src = tl.load(ORDER + r, mask=rm, other=0) // K
    mask = rm[:, None] & (c < N)[None, :]
    v = tl.load(X + src[:, None] * sx + c[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + r.to(tl.int64)[:, None] * sy + c[None, :], v.to(Y.dtype.element_ty), mask=mask)


@kernel
def _combine_kernel(YS, INV, W, OUT, n_tok, N, K, sy, so, HAS_W: tl.constexpr,
                    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    """OUT[t] = sum_j W[t, j] * YS[INV[t*K + j]] (W = 1 without HAS_W): the unpermute forward and the
    permute backward, one program summing each token's K rows in fp32."""
    t = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    tm = t < n_tok
    mask = tm[:, None] & (c < N)[None, :]
    acc = tl.full((BLOCK_R, BLOCK_N), 0.0, tl.float32)
    for j in range(K):
        flat = t.to(tl.int64) * K + j
        row = tl.load(INV + flat, mask=tm, other=0)
        v = tl.load(YS + row[:, None] * sy + c[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_W:
            v = v * tl.load(W + flat, mask=tm, other=0.0).to(tl.float32)[:, None]
        acc += v
    tl.store(OUT + t.to(tl.int64)[:, None] * so + c[None, :], acc.to(OUT.dtype.element_ty), mask=mask)


@kernel
def _unpermute_bwd_kernel(DOUT, YS, ORDER, W, DYS, DW, n_rows, N, K, sdo, sy, sdy,
                          BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    """Per sorted row i of flat slot o = ORDER[i] (token o // K): DYS[i] = W[o] * DOUT[o // K] and
    DW[o] = <DOUT[o // K], YS[i]>, the dot product accumulated over column blocks."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rm = r < n_rows
    r64 = r.to(tl.int64)[:, None]
    o = tl.load(ORDER + r, mask=rm, other=0)
    tok = (o // K)[:, None]
    w = tl.load(W + o, mask=rm, other=0.0).to(tl.float32)[:, None]
    dot = tl.full((BLOCK_R,), 0.0, tl.float32)
    for c0 in range(0, N, BLOCK_N):
        c = c0 + tl.arange(0, BLOCK_N)
        mask = rm[:, None] & (c < N)[None, :]
        g = tl.load(DOUT + tok * sdo + c[None, :], mask=mask, other=0.0).to(tl.float32)
        y = tl.load(YS + r64 * sy + c[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(DYS + r64 * sdy + c[None, :], (g * w).to(DYS.dtype.element_ty), mask=mask)
        dot += tl.reduce(g * y, 1, tl.standard._sum_combine)
    tl.store(DW + o, dot.to(DW.dtype.element_ty), mask=rm)


def _row_tiles(n_rows: int, n: int, device: torch.device) -> tuple[int, int]:
    block_n = min(next_pow2(n), 1024)
    budget = 32768 if device.type == "cpu" else 4096  # the interpreter pays per program: big tiles there
    return max(1, min(next_pow2(n_rows), budget // block_n)), block_n


def _combine(ys: Tensor, order: Tensor, w: Tensor | None, n_tok: int, dtype: torch.dtype) -> Tensor:
    y2 = rows(ys)
    out = new_empty((n_tok, y2.shape[1]), staged(dtype), ys.device)
    if out.numel():
        k = order.numel() // max(n_tok, 1)
        br, bn = _row_tiles(n_tok, y2.shape[1], ys.device)
        flat_w = w.contiguous().view(-1) if w is not None else order
        _combine_kernel[(cdiv(n_tok, br), cdiv(y2.shape[1], bn))](
            y2, inverse_order(order), flat_w, out, n_tok, y2.shape[1], k, y2.stride(0), out.stride(0),
            HAS_W=w is not None, BLOCK_R=br, BLOCK_N=bn)
    return finish(out, dtype)


@torch.library.custom_op("pretrain_kernels::moe_permute_fwd", mutates_args=())
def _moe_permute_fwd(x: Tensor, order: Tensor, k: int) -> Tensor:
    x2 = rows(x)
    n_rows, n = order.numel(), x2.shape[1]
    xs = new_empty((n_rows, n), staged(x.dtype), x.device)
    if xs.numel():
        br, bn = _row_tiles(n_rows, n, x.device)
        _gather_kernel[(cdiv(n_rows, br), cdiv(n, bn))](
            x2, order, xs, n_rows, n, k, x2.stride(0), xs.stride(0), BLOCK_R=br, BLOCK_N=bn)
    return finish(xs, x.dtype)


@_moe_permute_fwd.register_fake
def _(x, order, k):
    return x.new_empty((order.numel(), x.shape[1]))


@torch.library.custom_op("pretrain_kernels::moe_permute_bwd", mutates_args=())
def _moe_permute_bwd(dxs: Tensor, order: Tensor, n_tok: int) -> Tensor:
    return _combine(dxs, order, None, n_tok, dxs.dtype)


@_moe_permute_bwd.register_fake
def _(dxs, order, n_tok):
    return dxs.new_empty((n_tok, dxs.shape[1]))


class MoEPermuteFunction(torch.autograd.Function):
    """Autograd for the Triton gather: each token's gradient is the sum of its k sorted rows' gradients."""

    @staticmethod
    def forward(x, order, k):
        return _moe_permute_fwd(x, order, k)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, order, _ = inputs
        ctx.save_for_backward(order)
        ctx.n_tok = x.shape[0]

    @staticmethod
    def backward(ctx, dxs):
        (order,) = ctx.saved_tensors
        return _moe_permute_bwd(dxs, order, ctx.n_tok), None, None


torch.library.register_autograd("pretrain_kernels::moe_permute_fwd", MoEPermuteFunction.backward,
                                setup_context=MoEPermuteFunction.setup_context)


@torch.library.custom_op("pretrain_kernels::moe_unpermute_fwd", mutates_args=())
def _moe_unpermute_fwd(ys: Tensor, order: Tensor, weights: Tensor) -> Tensor:
    return _combine(ys, order, weights, weights.shape[0], torch.promote_types(ys.dtype, weights.dtype))


@_moe_unpermute_fwd.register_fake
def _(ys, order, weights):
    return ys.new_empty((weights.shape[0], ys.shape[1]), dtype=torch.promote_types(ys.dtype, weights.dtype))


@torch.library.custom_op("pretrain_kernels::moe_unpermute_bwd", mutates_args=())
def _moe_unpermute_bwd(dout: Tensor, ys: Tensor, order: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    d2, y2 = rows(dout), rows(ys)
    n_rows, n = y2.shape
    dys = new_empty((n_rows, n), staged(ys.dtype), ys.device)
    dw = new_empty((weights.numel(),), staged(weights.dtype), ys.device)
    if n_rows:
        br = max(1, min(next_pow2(n_rows), 16 if ys.is_cuda else 64))
        bn = min(next_pow2(max(n, 1)), 256 if ys.is_cuda else 1024)
        _unpermute_bwd_kernel[(cdiv(n_rows, br),)](
            d2, y2, order, weights.contiguous().view(-1), dys, dw, n_rows, n, weights.shape[1],
            d2.stride(0), y2.stride(0), dys.stride(0), BLOCK_R=br, BLOCK_N=bn)
    return finish(dys, ys.dtype), finish(dw, weights.dtype).view(weights.shape)


@_moe_unpermute_bwd.register_fake
def _(dout, ys, order, weights):
    return torch.empty_like(ys), torch.empty_like(weights)


class MoEUnpermuteFunction(torch.autograd.Function):
    """Autograd for the Triton combine: d ys scatters the weighted token gradient to each sorted row, and
    d weights[t, j] is the dot product of the token's gradient with the row (t, j) came from."""

    @staticmethod
    def forward(ys, order, weights):
        return _moe_unpermute_fwd(ys, order, weights)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, dout):
        ys, order, weights = ctx.saved_tensors
        dys, dw = _moe_unpermute_bwd(dout, ys, order, weights)
        return dys, None, dw


torch.library.register_autograd("pretrain_kernels::moe_unpermute_fwd", MoEUnpermuteFunction.backward,
                                setup_context=MoEUnpermuteFunction.setup_context)


# ------------------------------------------------------------------------------------- public API


def moe_permute(x: Tensor, experts: Tensor, n_experts: int, *,
                backend: str = "auto") -> tuple[Tensor, Tensor, Tensor]:
    """Token rows grouped by expert: `x` (T, d), `experts` (T, k) expert ids -> (xs (T*k, d), counts (E,),
    order (T*k,)), where sorted row i is token order[i] // k's row for slot order[i] % k, experts in
    order and rows within an expert in (token, slot) order. Differentiable in `x`."""
    if x.dim() != 2 or experts.dim() != 2 or experts.shape[0] != x.shape[0] or experts.is_floating_point():
        raise ValueError(f"moe_permute: want x (T, d) and integer experts (T, k), got {tuple(x.shape)} and "
                         f"{tuple(experts.shape)} {experts.dtype}")
    if not use_triton(backend, x):
        return moe_permute_reference(x, experts, n_experts)
    counts, order = moe_routing(experts, n_experts)
    return _moe_permute_fwd(x, order, experts.shape[1]), counts, order


def moe_unpermute(ys: Tensor, order: Tensor, weights: Tensor, *, backend: str = "auto") -> Tensor:
    """out[t] = sum_j weights[t, j] * ys[row of (t, j)]: `ys` (T*k, d) in `moe_permute`'s sorted order,
    `order` its (T*k,) map, `weights` (T, k) -> (T, d) in the promoted dtype of `ys` and `weights`."""
    if ys.dim() != 2 or weights.dim() != 2 or not (ys.shape[0] == order.numel() == weights.numel()):
        raise ValueError(f"moe_unpermute: want ys (T*k, d), order (T*k,), weights (T, k), got "
                         f"{tuple(ys.shape)}, {tuple(order.shape)}, {tuple(weights.shape)}")
    if not use_triton(backend, ys):
        return moe_unpermute_reference(ys, order, weights)
    return _moe_unpermute_fwd(ys, order.reshape(-1), weights)
