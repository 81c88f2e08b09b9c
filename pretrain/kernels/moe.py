"""Mixture-of-experts kernels: token rows grouped by expert (`moe_permute`), the experts' outputs weighted
back into token order (`moe_unpermute`), and one matmul per expert over its consecutive rows
(`grouped_mm`, as in MegaBlocks, https://arxiv.org/abs/2211.15841), each beside its plain-PyTorch reference.

The routing bookkeeping (a stable argsort of the expert ids, a bincount) stays in torch: it moves T*k
integers. The kernels move and multiply the (T*k, d) rows. None uses atomics: a token's k rows are summed
by one program (the inverse permutation says where they are) and an expert's weight gradient by one
program per tile, so every backward is deterministic. The grouped matmul's programs find their expert in a
tile map built on the device from the prefix sum of the counts, sized by an upper bound, so no launch
waits on the host.
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
    next_pow2,
    rows,
    staged,
    use_triton,
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


def grouped_mm_reference(xs: Tensor, w: Tensor, counts: Tensor) -> Tensor:
    outs = [torch.matmul(xe, we) for xe, we in zip(xs.split(counts.tolist()), w, strict=True)]
    return torch.cat(outs)


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


# -------------------------------------------------------------------------------- grouped matmul


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
def _grouped_mm_bwd(dy: Tensor, xs: Tensor, w: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
    d2, x2 = rows(dy), rows(xs)
    e, m, n = w.shape
    dxs = _gmm(d2, w, counts, m, (w.stride(0), w.stride(2), w.stride(1)), xs.dtype)
    cfg = _gmm_config(xs)
    dw = new_empty((e, m, n), staged(w.dtype), w.device)
    if dw.numel():
        _gmm_dw_kernel[(e, cdiv(m, cfg["BLOCK_M"]), cdiv(n, cfg["BLOCK_N"]))](
            x2, d2, dw, _offsets(counts), m, n, x2.stride(0), d2.stride(0), **cfg)
    return dxs, finish(dw, w.dtype)


@_grouped_mm_bwd.register_fake
def _(dy, xs, w, counts):
    return torch.empty_like(xs), torch.empty_like(w)


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
        dxs, dw = _grouped_mm_bwd(dy, xs, w, counts)
        return dxs, dw, None


torch.library.register_autograd("pretrain_kernels::grouped_mm_fwd", GroupedMMFunction.backward,
                                setup_context=GroupedMMFunction.setup_context)


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
