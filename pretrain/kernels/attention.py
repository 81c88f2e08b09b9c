"""Scaled dot-product attention, FlashAttention-2 style (Dao 2023, https://arxiv.org/abs/2307.08691).

Forward: each program owns BLOCK_M query rows of one head and streams the keys/values in BLOCK_N
blocks with an online softmax, keeping only the running max, the running sum and the output tile;
it stores the output and the log-sum-exp per row (base 2). Backward recomputes the probabilities
from that log-sum-exp block by block, never storing an S x S matrix, in two kernels that each own
their output rows outright: dK/dV per key block (looping over every query head of its group, so
grouped-query attention needs no atomics) and dQ per query block. Results are deterministic.
Shapes: q (B, Hq, S, D), k/v (B, Hkv, Skv, D), Hq % Hkv == 0; query head h reads key head
h // (Hq // Hkv), as Hugging Face's `repeat_kv`. Causal masking is top-left and needs S == Skv.

Packed rows (several documents in one sequence) pass `segment_ids` (B, S): a score survives only where
the query's and the key's ids are equal, so documents never attend across (the varlen masking of FA2,
kept in a dense layout). The ids are a HAS_SEGMENTS constexpr branch of the same kernels: without them
the compiled code is today's. With them, a tile whose query ids and key ids have disjoint [min, max]
ranges is skipped before its dots; in packed rows (non-decreasing ids) that removes most off-diagonal
work, and since the test is on ranges, not on order, it is exact for any ids.
"""

from __future__ import annotations

import math

import torch
import triton.language as tl
from torch import Tensor

from pretrain.kernels._runtime import (
    cdiv,
    dot_dtype,
    finish,
    interpreting,
    kernel,
    new_empty,
    next_pow2,
    staged,
    upcast,
    use_aten,
    use_triton,
)

_LOG2E = 1.4426950408889634
# int32 sentinels for rows/keys past the end, so they never widen a block's segment-id range.
_INT_MAX, _INT_MIN = tl.constexpr(2**31 - 1), tl.constexpr(-(2**31))


def attention_reference(q: Tensor, k: Tensor, v: Tensor, causal: bool = True, scale: float | None = None,
                        segment_ids: Tensor | None = None) -> Tensor:
    """Plain PyTorch: materialises the (S, Skv) scores; softmax in fp32. With `segment_ids` (B, S), query i
    sees key j only inside its own segment (packed documents never attend across)."""
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = upcast(q @ k.transpose(-1, -2)) * scale
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    if segment_ids is not None:
        s = s.masked_fill((segment_ids[:, :, None] != segment_ids[:, None, :])[:, None], float("-inf"))
    return torch.softmax(s, dim=-1).to(v.dtype) @ v


def attention_aten(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float,
                   segment_ids: Tensor | None = None) -> Tensor:
    """The CPU path: ATen's fused SDPA (flash attention for CPU, no (S, Skv) scores kept for the backward),
    grouped-query heads read in place (`enable_gqa`), documents kept apart by a boolean (B, 1, S, S) mask."""
    mask = None
    if segment_ids is not None:
        mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
        if causal:
            mask = mask & torch.ones(mask.shape[-2:], dtype=torch.bool, device=q.device).tril()
        causal = False
    return torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


@kernel
def _attn_fwd_kernel(Q, K, V, SEG, OUT, LSE, qk_scale, S, SKV, HQ, GROUP, D,
                     sqb, sqh, sqs, skb, skh, sks, svb, svh, svs,
                     CAUSAL: tl.constexpr, HAS_SEGMENTS: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // HQ).to(tl.int64)
    h = (bh % HQ).to(tl.int64)
    m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    q = tl.load(Q + b * sqb + h * sqh + m[:, None] * sqs + d[None, :],
                mask=(m < S)[:, None] & dmask[None, :], other=0.0).to(DOT)
    k_base = K + b * skb + (h // GROUP) * skh
    v_base = V + b * svb + (h // GROUP) * svh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, tl.float32)
    acc = tl.full([BLOCK_M, BLOCK_D], 0.0, tl.float32)
    mmask = m < S
    if HAS_SEGMENTS:
        seg_q = tl.load(SEG + b * S + m, mask=mmask, other=-1)
        q_lo = tl.reduce(tl.where(mmask, seg_q, _INT_MAX), 0, tl.standard._elementwise_min)
        q_hi = tl.reduce(tl.where(mmask, seg_q, _INT_MIN), 0, tl.standard._elementwise_max)
    hi = SKV
    if CAUSAL:
        # Key blocks wholly above the diagonal contribute nothing: stop before them.
        hi = tl.minimum(SKV, (start_m + 1) * BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        n = start_n + tl.arange(0, BLOCK_N)
        nmask = n < SKV
        live = True
        if HAS_SEGMENTS:
            seg_k = tl.load(SEG + b * S + n, mask=nmask, other=-2)
            k_lo = tl.reduce(tl.where(nmask, seg_k, _INT_MAX), 0, tl.standard._elementwise_min)
            k_hi = tl.reduce(tl.where(nmask, seg_k, _INT_MIN), 0, tl.standard._elementwise_max)
            live = (k_lo <= q_hi) & (k_hi >= q_lo)  # else no id is shared: the block adds nothing
        if live:
            kt = tl.load(k_base + n[None, :] * sks + d[:, None], mask=nmask[None, :] & dmask[:, None], other=0.0)
            # Scores in log2 units (scale * log2 e folded in) so the softmax uses exp2.
            qk = tl.dot(q, kt.to(DOT), input_precision=PREC) * qk_scale
            valid = nmask[None, :]
            if CAUSAL:
                valid = valid & (n[None, :] <= m[:, None])
            if HAS_SEGMENTS:
                valid = valid & (seg_q[:, None] == seg_k[None, :])
            qk = tl.where(valid, qk, float("-inf"))
            # Without segments every real row sees key 0 in its first block, so m_new is finite from then
            # on (no inf - inf). With segments a row may see nothing in a block yet: subtract 0 instead.
            m_new = tl.maximum(m_i, tl.reduce(qk, 1, tl.standard._elementwise_max))
            m_sub = m_new
            if HAS_SEGMENTS:
                m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_sub)
            p = tl.exp2(qk - m_sub[:, None])
            l_i = l_i * alpha + tl.reduce(p, 1, tl.standard._sum_combine)
            v = tl.load(v_base + n[:, None] * svs + d[None, :], mask=nmask[:, None] & dmask[None, :], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(DOT), v.to(DOT), input_precision=PREC)
            m_i = m_new
    if HAS_SEGMENTS:
        # Only rows past S (never stored) can see no key at all; keep them finite.
        l_i = tl.where(l_i > 0.0, l_i, 1.0)
    acc = acc / l_i[:, None]
    o_off = bh.to(tl.int64) * S * D + m[:, None] * D + d[None, :]
    tl.store(OUT + o_off, acc.to(OUT.dtype.element_ty), mask=mmask[:, None] & dmask[None, :])
    tl.store(LSE + bh.to(tl.int64) * S + m, m_i + tl.log2(l_i), mask=mmask)


@kernel
def _attn_bwd_dkdv_kernel(Q, K, V, SEG, DO, LSE, DELTA, DK, DV, qk_scale, sm_scale, S, SKV, HQ, HKV, GROUP, D,
                          sqb, sqh, sqs, skb, skh, sks, svb, svh, svs,
                          CAUSAL: tl.constexpr, HAS_SEGMENTS: tl.constexpr, DOT: tl.constexpr,
                          PREC: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    start_n = tl.program_id(0)
    bhk = tl.program_id(1)
    b = (bhk // HKV).to(tl.int64)
    hk = (bhk % HKV).to(tl.int64)
    n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    nmask = n < SKV
    kv_mask = nmask[:, None] & dmask[None, :]
    k = tl.load(K + b * skb + hk * skh + n[:, None] * sks + d[None, :], mask=kv_mask, other=0.0).to(DOT)
    v = tl.load(V + b * svb + hk * svh + n[:, None] * svs + d[None, :], mask=kv_mask, other=0.0).to(DOT)
    dk = tl.full([BLOCK_N, BLOCK_D], 0.0, tl.float32)
    dv = tl.full([BLOCK_N, BLOCK_D], 0.0, tl.float32)
    if HAS_SEGMENTS:
        seg_k = tl.load(SEG + b * S + n, mask=nmask, other=-2)
        k_lo = tl.reduce(tl.where(nmask, seg_k, _INT_MAX), 0, tl.standard._elementwise_min)
        k_hi = tl.reduce(tl.where(nmask, seg_k, _INT_MIN), 0, tl.standard._elementwise_max)
    lo = 0
    if CAUSAL:
        lo = (start_n * BLOCK_N // BLOCK_M) * BLOCK_M  # query blocks wholly above the diagonal skip
    # Every query head sharing this key head adds into the same registers: GQA without atomics.
    for g in range(0, GROUP):
        h = hk * GROUP + g
        q_base = Q + b * sqb + h * sqh
        row_base = (b * HQ + h) * S
        do_base = DO + row_base * D
        for start_m in range(lo, S, BLOCK_M):
            m = start_m + tl.arange(0, BLOCK_M)
            mmask = m < S
            live = True
            if HAS_SEGMENTS:
                seg_q = tl.load(SEG + b * S + m, mask=mmask, other=-1)
                q_lo = tl.reduce(tl.where(mmask, seg_q, _INT_MAX), 0, tl.standard._elementwise_min)
                q_hi = tl.reduce(tl.where(mmask, seg_q, _INT_MIN), 0, tl.standard._elementwise_max)
                live = (k_lo <= q_hi) & (k_hi >= q_lo)
            if live:
                qt = tl.load(q_base + m[None, :] * sqs + d[:, None], mask=mmask[None, :] & dmask[:, None],
                             other=0.0)
                dot_ = tl.load(do_base + m[None, :] * D + d[:, None], mask=mmask[None, :] & dmask[:, None],
                               other=0.0)
                lse = tl.load(LSE + row_base + m, mask=mmask, other=0.0)
                delta = tl.load(DELTA + row_base + m, mask=mmask, other=0.0)
                # Transposed tiles (keys x queries): recompute P^T from the stored log-sum-exp.
                qkt = tl.dot(k, qt.to(DOT), input_precision=PREC) * qk_scale
                valid = mmask[None, :] & nmask[:, None]
                if CAUSAL:
                    valid = valid & (m[None, :] >= n[:, None])
                if HAS_SEGMENTS:
                    valid = valid & (seg_q[None, :] == seg_k[:, None])
                pt = tl.where(valid, tl.exp2(qkt - lse[None, :]), 0.0)
                dv += tl.dot(pt.to(DOT), tl.trans(dot_).to(DOT), input_precision=PREC)
                dpt = tl.dot(v, dot_.to(DOT), input_precision=PREC)
                dst = pt * (dpt - delta[None, :])
                dk += tl.dot(dst.to(DOT), tl.trans(qt).to(DOT), input_precision=PREC)
    out = bhk.to(tl.int64) * SKV * D + n[:, None] * D + d[None, :]
    tl.store(DK + out, (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=kv_mask)


@kernel
def _attn_bwd_dq_kernel(Q, K, V, SEG, DO, LSE, DELTA, DQ, qk_scale, sm_scale, S, SKV, HQ, GROUP, D,
                        sqb, sqh, sqs, skb, skh, sks, svb, svh, svs,
                        CAUSAL: tl.constexpr, HAS_SEGMENTS: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // HQ).to(tl.int64)
    h = (bh % HQ).to(tl.int64)
    m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    mmask = m < S
    row_mask = mmask[:, None] & dmask[None, :]
    row_base = bh.to(tl.int64) * S
    q = tl.load(Q + b * sqb + h * sqh + m[:, None] * sqs + d[None, :], mask=row_mask, other=0.0).to(DOT)
    do = tl.load(DO + row_base * D + m[:, None] * D + d[None, :], mask=row_mask, other=0.0).to(DOT)
    lse = tl.load(LSE + row_base + m, mask=mmask, other=0.0)
    delta = tl.load(DELTA + row_base + m, mask=mmask, other=0.0)
    k_base = K + b * skb + (h // GROUP) * skh
    v_base = V + b * svb + (h // GROUP) * svh
    dq = tl.full([BLOCK_M, BLOCK_D], 0.0, tl.float32)
    if HAS_SEGMENTS:
        seg_q = tl.load(SEG + b * S + m, mask=mmask, other=-1)
        q_lo = tl.reduce(tl.where(mmask, seg_q, _INT_MAX), 0, tl.standard._elementwise_min)
        q_hi = tl.reduce(tl.where(mmask, seg_q, _INT_MIN), 0, tl.standard._elementwise_max)
    hi = SKV
    if CAUSAL:
        hi = tl.minimum(SKV, (start_m + 1) * BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        n = start_n + tl.arange(0, BLOCK_N)
        nmask = n < SKV
        live = True
        if HAS_SEGMENTS:
            seg_k = tl.load(SEG + b * S + n, mask=nmask, other=-2)
            k_lo = tl.reduce(tl.where(nmask, seg_k, _INT_MAX), 0, tl.standard._elementwise_min)
            k_hi = tl.reduce(tl.where(nmask, seg_k, _INT_MIN), 0, tl.standard._elementwise_max)
            live = (k_lo <= q_hi) & (k_hi >= q_lo)
        if live:
            kt = tl.load(k_base + n[None, :] * sks + d[:, None], mask=nmask[None, :] & dmask[:, None], other=0.0)
            vt = tl.load(v_base + n[None, :] * svs + d[:, None], mask=nmask[None, :] & dmask[:, None], other=0.0)
            qk = tl.dot(q, kt.to(DOT), input_precision=PREC) * qk_scale
            valid = mmask[:, None] & nmask[None, :]
            if CAUSAL:
                valid = valid & (n[None, :] <= m[:, None])
            if HAS_SEGMENTS:
                valid = valid & (seg_q[:, None] == seg_k[None, :])
            p = tl.where(valid, tl.exp2(qk - lse[:, None]), 0.0)
            dp = tl.dot(do, vt.to(DOT), input_precision=PREC)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(DOT), tl.trans(kt).to(DOT), input_precision=PREC)
    tl.store(DQ + row_base * D + m[:, None] * D + d[None, :], (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_mask)


def _config(q: Tensor, backward: bool) -> dict:
    """Tile sizes: big tiles in the interpreter (it pays per program); FA2-like tiles on a GPU."""
    block_d = max(16, next_pow2(q.shape[-1]))
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    if interpreting() or not q.is_cuda:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=block_d, DOT=dot_dtype(q.dtype), PREC=prec)
    big = block_d <= 64 and not backward
    return dict(BLOCK_M=128 if big else 64, BLOCK_N=64 if not backward else 64, BLOCK_D=block_d,
                DOT=dot_dtype(q.dtype), PREC=prec, num_warps=8 if big else 4, num_stages=2)


def _strides(*ts: Tensor) -> list[int]:
    return [s for t in ts for s in t.stride()[:3]]


def _unit_last(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _segments(segment_ids: Tensor | None, fallback: Tensor) -> tuple[Tensor, bool]:
    """The kernels read segment ids as contiguous int32 (B, S); without them `fallback` fills the
    never-read pointer slot and HAS_SEGMENTS=False compiles the masking out."""
    if segment_ids is None:
        return fallback, False
    return segment_ids.to(fallback.device, torch.int32).contiguous(), True


def _fwd_launch(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float,
                segment_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    B, HQ, S, D = q.shape
    HKV, SKV = k.shape[1], k.shape[2]
    o = new_empty((B, HQ, S, D), staged(q.dtype), q.device)
    lse = new_empty((B, HQ, S), torch.float32, q.device)
    cfg = _config(q, backward=False)
    grid = (cdiv(S, cfg["BLOCK_M"]), B * HQ)
    seg, has_seg = _segments(segment_ids, lse)
    _attn_fwd_kernel[grid](q, k, v, seg, o, lse, scale * _LOG2E, S, SKV, HQ, HQ // HKV, D, *_strides(q, k, v),
                           CAUSAL=causal, HAS_SEGMENTS=has_seg, **cfg)
    return finish(o, q.dtype), lse


def _bwd_launch(do, q, k, v, o, lse, causal, scale, segment_ids=None):
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    do = do.contiguous()
    B, HQ, S, D = q.shape
    HKV, SKV = k.shape[1], k.shape[2]
    # delta_i = sum_j P_ij dP_ij = rowsum(dO * O): one cheap elementwise pass, kept in fp32.
    delta = (do.float() * o.float()).sum(-1).contiguous()
    dq = new_empty(q.shape, staged(q.dtype), q.device)
    dk = new_empty((B, HKV, SKV, D), staged(k.dtype), k.device)
    dv = new_empty((B, HKV, SKV, D), staged(v.dtype), v.device)
    cfg = _config(q, backward=True)
    common = (scale * _LOG2E, scale, S, SKV)
    seg, has_seg = _segments(segment_ids, lse)
    flags = dict(CAUSAL=causal, HAS_SEGMENTS=has_seg, **cfg)
    _attn_bwd_dkdv_kernel[(cdiv(SKV, cfg["BLOCK_N"]), B * HKV)](
        q, k, v, seg, do, lse, delta, dk, dv, *common, HQ, HKV, HQ // HKV, D, *_strides(q, k, v), **flags)
    _attn_bwd_dq_kernel[(cdiv(S, cfg["BLOCK_M"]), B * HQ)](
        q, k, v, seg, do, lse, delta, dq, *common, HQ, HQ // HKV, D, *_strides(q, k, v), **flags)
    return finish(dq, q.dtype), finish(dk, k.dtype), finish(dv, v.dtype)


@torch.library.custom_op("pretrain_kernels::attention_fwd", mutates_args=())
def _attention_fwd(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float,
                   segment_ids: Tensor | None) -> tuple[Tensor, Tensor]:
    return _fwd_launch(q, k, v, causal, scale, segment_ids)


@_attention_fwd.register_fake
def _(q, k, v, causal, scale, segment_ids):
    B, HQ, S, D = q.shape
    return q.new_empty((B, HQ, S, D)), q.new_empty((B, HQ, S), dtype=torch.float32)


@torch.library.custom_op("pretrain_kernels::attention_bwd", mutates_args=())
def _attention_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, causal: bool,
                   scale: float, segment_ids: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    return _bwd_launch(do, q, k, v, o, lse, causal, scale, segment_ids)


@_attention_bwd.register_fake
def _(do, q, k, v, o, lse, causal, scale, segment_ids):
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape))


class AttentionFunction(torch.autograd.Function):
    """Autograd for the Triton path; `register_autograd` installs these same methods on the custom op."""

    @staticmethod
    def forward(q, k, v, causal, scale, segment_ids):
        return _attention_fwd(q, k, v, causal, scale, segment_ids)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, ctx.causal, ctx.scale, segment_ids = inputs
        # O and the log-sum-exp: O(S) extra, never O(S^2); the (B, S) ids (or None) for the masks.
        ctx.save_for_backward(q, k, v, *output, segment_ids)

    @staticmethod
    def backward(ctx, do, _dlse):
        q, k, v, o, lse, segment_ids = ctx.saved_tensors
        dq, dk, dv = _attention_bwd(do, q, k, v, o, lse, ctx.causal, ctx.scale, segment_ids)
        return dq, dk, dv, None, None, None


torch.library.register_autograd(
    "pretrain_kernels::attention_fwd", AttentionFunction.backward, setup_context=AttentionFunction.setup_context
)


def attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = True, scale: float | None = None, *,
              segment_ids: Tensor | None = None, backend: str = "auto") -> Tensor:
    """softmax(q k^T * scale) v with q (B, Hq, S, D), k/v (B, Hkv, Skv, D); scale defaults to 1/sqrt(D).
    `segment_ids` (B, S) integers (needs S == Skv): query i attends key j only where their ids are equal."""
    if q.dim() != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"attention: want q (B, Hq, S, D), k = v (B, Hkv, Skv, D), got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"attention: Hq ({q.shape[1]}) must be a multiple of Hkv ({k.shape[1]})")
    if causal and q.shape[2] != k.shape[2]:
        raise ValueError(f"attention: causal needs S == Skv, got {q.shape[2]} and {k.shape[2]}")
    if segment_ids is not None:
        want = (q.shape[0], q.shape[2])
        if tuple(segment_ids.shape) != want or q.shape[2] != k.shape[2] or segment_ids.is_floating_point():
            raise ValueError(f"attention: segment_ids must be integers shaped (B, S) = {want} with S == Skv, got "
                             f"{segment_ids.dtype} {tuple(segment_ids.shape)} for Skv {k.shape[2]}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if use_aten(backend, q):
        return attention_aten(q, k, v, causal, scale, segment_ids)
    if not use_triton(backend, q):
        return attention_reference(q, k, v, causal, scale, segment_ids)
    return _attention_fwd(q, k, v, bool(causal), scale, segment_ids)[0]
