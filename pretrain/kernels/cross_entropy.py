"""Cross-entropy over a vocabulary with ignored targets and the z-loss auxiliary term.

`loss = mean over non-ignored rows of (logsumexp(x) - x[target] + z_loss * logsumexp(x)^2)`; z-loss keeps
the softmax normaliser near 1 (PaLM, https://arxiv.org/abs/2204.02311, section 5). The row kernels
stream the vocabulary in blocks with an online log-sum-exp, so V never has to fit one tile; they are
also the per-chunk workers of `linear_cross_entropy`, which is why the gradient kernel may write in place.

A target outside [0, V) counts as ignored (no load, loss 0, gradient 0, not in the mean's count), in the
kernels and the reference alike: the kernels never read past a row, whatever the targets hold. The data
layer refuses such targets with a line naming the shard (`pretrain.data.decode`); this is the backstop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton.language as tl
from torch import Tensor

from pretrain.kernels._runtime import (
    cdiv,
    kernel,
    new_empty,
    next_pow2,
    rows,
    staged,
    upcast,
    use_aten,
    use_triton,
)


def kept(targets: Tensor, ignore_index: int, vocab: int) -> Tensor:
    """The targets that count: not `ignore_index` and inside [0, vocab)."""
    return (targets != ignore_index) & (targets >= 0) & (targets < vocab)


def cross_entropy_reference(logits: Tensor, targets: Tensor, ignore_index: int = -100, z_loss: float = 0.0) -> Tensor:
    lf = upcast(logits)
    lse = torch.logsumexp(lf, dim=-1)
    valid = kept(targets, ignore_index, logits.shape[-1])
    picked = lf.gather(-1, torch.where(valid, targets, 0)[:, None])[:, 0]
    per_row = lse - picked
    if z_loss:
        per_row = per_row + z_loss * lse.square()
    # Like torch's mean reduction: the sum over kept rows divided by their count (NaN when none).
    return torch.where(valid, per_row, 0.0).sum() / valid.sum()


def cross_entropy_sum_aten(logits: Tensor, targets: Tensor, ignore_index: int, z_loss: float) -> tuple[Tensor, Tensor]:
    """The CPU path: ATen's fused log-softmax and NLL. The summed loss over the kept rows and their mask;
    a target outside [0, V) is turned into `ignore_index` first, so ATen never sees it."""
    lf = upcast(logits)
    valid = kept(targets, ignore_index, logits.shape[-1])
    loss = F.cross_entropy(lf, torch.where(valid, targets, ignore_index), ignore_index=ignore_index, reduction="sum")
    if z_loss:
        loss = loss + z_loss * torch.where(valid, torch.logsumexp(lf, dim=-1).square(), 0.0).sum()
    return loss, valid


@kernel
def _ce_fwd_kernel(X, T, LOSS, LSE, n_rows, V, sx, ignore_index, z_loss,
                   BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = r < n_rows
    # Padding rows read row 0 instead of masked -inf rows, which would make NaNs (never stored).
    r64 = tl.where(rmask, r, 0).to(tl.int64)
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    acc = tl.full([BLOCK_R], 0.0, tl.float32)
    for v0 in range(0, V, BLOCK_V):
        c = v0 + tl.arange(0, BLOCK_V)
        x = tl.load(X + r64[:, None] * sx + c[None, :], mask=(c < V)[None, :], other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.reduce(x, 1, tl.standard._elementwise_max))
        # Online log-sum-exp (Milakov & Gimelshein 2018): rescale the running sum to the new max.
        acc = acc * tl.exp(m - m_new) + tl.reduce(tl.exp(x - m_new[:, None]), 1, tl.standard._sum_combine)
        m = m_new
    lse = m + tl.log(acc)
    t = tl.load(T + r64)
    valid = rmask & (t != ignore_index) & (t >= 0) & (t < V)  # an out-of-range target is never loaded
    xt = tl.load(X + r64 * sx + tl.where(valid, t, 0), mask=valid, other=0.0).to(tl.float32)
    loss = tl.where(valid, lse - xt + z_loss * lse * lse, 0.0)
    tl.store(LOSS + r, loss, mask=rmask)
    tl.store(LSE + r, lse, mask=rmask)


@kernel
def _ce_bwd_kernel(X, T, LSE, SCALE, DX, n_rows, V, sx, sdx, ignore_index, z_loss,
                   BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = r < n_rows
    r64 = tl.where(rmask, r, 0).to(tl.int64)
    t = tl.load(T + r64)
    valid = rmask & (t != ignore_index) & (t >= 0) & (t < V)
    lse = tl.load(LSE + r64)
    # grad_output / n_valid read from memory: no host sync on the count of kept targets.
    scale = tl.load(SCALE)
    coef = 1.0 + 2.0 * z_loss * lse  # d(lse + z*lse^2)/dx = softmax * (1 + 2 z lse)
    for v0 in range(0, V, BLOCK_V):
        c = v0 + tl.arange(0, BLOCK_V)
        mask = rmask[:, None] & (c < V)[None, :]
        x = tl.load(X + r64[:, None] * sx + c[None, :], mask=mask, other=0.0).to(tl.float32)
        p = tl.exp(x - lse[:, None]) * coef[:, None]
        d = p - tl.where(c[None, :] == t[:, None], 1.0, 0.0)
        d = tl.where(valid[:, None], d * scale, 0.0)
        tl.store(DX + r64[:, None] * sdx + c[None, :], d.to(DX.dtype.element_ty), mask=mask)


def _tiles(n_rows: int, V: int, device: torch.device) -> tuple[int, int]:
    if device.type == "cpu":  # the interpreter pays per program and per loop trip: big tiles
        block_v = min(next_pow2(V), 4096)
        return max(1, min(next_pow2(n_rows), 65536 // block_v)), block_v
    return 1, min(next_pow2(V), 4096)


def ce_rows_forward(logits: Tensor, targets: Tensor, ignore_index: int, z_loss: float) -> tuple[Tensor, Tensor]:
    """Per-row loss (0 where ignored) and log-sum-exp, both fp32, for (N, V) logits."""
    x = rows(logits)
    n, V = x.shape
    loss = new_empty((n,), torch.float32, x.device)
    lse = new_empty((n,), torch.float32, x.device)
    br, bv = _tiles(n, V, x.device)
    _ce_fwd_kernel[(cdiv(n, br),)](x, targets, loss, lse, n, V, x.stride(0), ignore_index, z_loss,
                                   BLOCK_R=br, BLOCK_V=bv)
    return loss, lse


def ce_rows_backward(logits: Tensor, targets: Tensor, lse: Tensor, scale: Tensor, ignore_index: int,
                     z_loss: float, out: Tensor | None = None) -> Tensor:
    """d loss / d logits times `scale` (a 1-element fp32 tensor); `out` may be `logits` itself."""
    x = rows(logits)
    n, V = x.shape
    buf = out if out is not None and staged(x.dtype) == x.dtype else new_empty(x.shape, staged(x.dtype), x.device)
    br, bv = _tiles(n, V, x.device)
    _ce_bwd_kernel[(cdiv(n, br),)](x, targets, lse, scale, buf, n, V, x.stride(0), buf.stride(0), ignore_index,
                                   z_loss, BLOCK_R=br, BLOCK_V=bv)
    if buf.dtype == x.dtype:
        return buf
    return out.copy_(buf) if out is not None else buf.to(x.dtype)  # torch rounds to nearest even


@torch.library.custom_op("pretrain_kernels::cross_entropy_fwd", mutates_args=())
def _ce_fwd(logits: Tensor, targets: Tensor, ignore_index: int, z_loss: float) -> tuple[Tensor, Tensor]:
    loss_rows, lse = ce_rows_forward(logits, targets, ignore_index, z_loss)
    return loss_rows.sum() / kept(targets, ignore_index, logits.shape[-1]).sum(), lse


@_ce_fwd.register_fake
def _(logits, targets, ignore_index, z_loss):
    return logits.new_empty((), dtype=torch.float32), logits.new_empty((logits.shape[0],), dtype=torch.float32)


@torch.library.custom_op("pretrain_kernels::cross_entropy_bwd", mutates_args=())
def _ce_bwd(dloss: Tensor, logits: Tensor, targets: Tensor, lse: Tensor, ignore_index: int, z_loss: float) -> Tensor:
    scale = (dloss.float() / kept(targets, ignore_index, logits.shape[-1]).sum()).reshape(1)
    return ce_rows_backward(logits, targets, lse, scale, ignore_index, z_loss).view(logits.shape)


@_ce_bwd.register_fake
def _(dloss, logits, targets, lse, ignore_index, z_loss):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


class CrossEntropyFunction(torch.autograd.Function):
    """Autograd for the Triton path; `register_autograd` installs these same methods on the custom op."""

    @staticmethod
    def forward(logits, targets, ignore_index, z_loss):
        return _ce_fwd(logits, targets, ignore_index, z_loss)

    @staticmethod
    def setup_context(ctx, inputs, output):
        logits, targets, ctx.ignore_index, ctx.z_loss = inputs
        ctx.save_for_backward(logits, targets, output[1])

    @staticmethod
    def backward(ctx, dloss, _dlse):
        logits, targets, lse = ctx.saved_tensors
        return _ce_bwd(dloss, logits, targets, lse, ctx.ignore_index, ctx.z_loss), None, None, None


torch.library.register_autograd(
    "pretrain_kernels::cross_entropy_fwd", CrossEntropyFunction.backward, setup_context=CrossEntropyFunction.setup_context
)


def cross_entropy(logits: Tensor, targets: Tensor, ignore_index: int = -100, z_loss: float = 0.0, *,
                  backend: str = "auto") -> Tensor:
    """Mean cross-entropy of (N, V) `logits` against (N,) `targets`, skipping `ignore_index` and targets
    outside [0, V); fp32 scalar."""
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"cross_entropy: want logits (N, V) and targets (N,), got {tuple(logits.shape)}, "
                         f"{tuple(targets.shape)}")
    if use_aten(backend, logits):
        total, valid = cross_entropy_sum_aten(logits, targets, int(ignore_index), float(z_loss))
        return total / valid.sum()
    if not use_triton(backend, logits):
        return cross_entropy_reference(logits, targets, ignore_index, z_loss)
    return _ce_fwd(logits, targets, int(ignore_index), float(z_loss))[0]
