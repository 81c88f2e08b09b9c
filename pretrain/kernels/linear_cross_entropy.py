"""The LM head fused with cross-entropy: `cross_entropy(hidden @ weight.T, targets)` without the (N, V) logits.

Tokens are processed in chunks: each chunk's logits are computed, reduced to a loss, and immediately
turned into that chunk's contribution to d hidden and d weight, then freed (the chunk buffer is
overwritten in place by its own gradient). The loss is a scalar, so the backward only rescales the
gradients gathered in the forward by grad_output / n_kept: logits are never rebuilt, in forward or
backward. The chunk size follows Liger-Kernel's rule, about N * H / V rows, so a chunk of logits
weighs about as much as `hidden`, but never fewer than MIN_CHUNK_ROWS rows: with a small hidden size
the rule gives a handful of rows, and each chunk then re-reads the whole (V, H) weight for a sliver of
work (measured on CPU, gpt-tiny's head, 1024 tokens: 4 rows 6.6 s, 32 rows 1.9 s, 128 rows 1.3 s). Per chunk, the Triton path runs the row kernels of
`pretrain.kernels.cross_entropy`; the reference path runs the same loop in plain PyTorch (the CPU path).
"""

from __future__ import annotations

import torch
from torch import Tensor

from pretrain.kernels._runtime import cdiv, next_pow2, upcast, use_aten, use_triton
from pretrain.kernels.cross_entropy import (
    ce_rows_backward,
    ce_rows_forward,
    cross_entropy_reference,
    cross_entropy_sum_aten,
    kept,
)


def linear_cross_entropy_unfused(hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int = -100,
                                 z_loss: float = 0.0) -> Tensor:
    """The naive composition, materialising all logits: the ground truth of the tests and the memory bench."""
    return cross_entropy_reference(hidden @ weight.t(), targets, ignore_index, z_loss)


MIN_CHUNK_ROWS = 128
# On the ATen path (CPU), logits up to this many elements are made whole and handed to ATen's fused
# cross-entropy: a few large matrix products beat many chunk-sized ones, and 2^25 fp32 logits (128 MiB, as
# much again for their gradient) is little beside a CPU's memory. Larger heads are chunked as on a GPU.
FULL_LOGITS_MAX = 2 ** 25


def chunk_rows(n: int, vocab: int, hidden: int) -> int:
    liger = next_pow2(cdiv(n, cdiv(vocab, hidden)))
    return max(1, min(next_pow2(n), max(MIN_CHUNK_ROWS, liger)))


def _chunk_reference(logits: Tensor, targets: Tensor, ignore_index: int, z_loss: float, want_grad: bool):
    lf = upcast(logits)
    lse = torch.logsumexp(lf, dim=-1)
    valid = kept(targets, ignore_index, logits.shape[-1])  # an out-of-range target counts as ignored
    tgt = torch.where(valid, targets, 0)
    per_row = lse - lf.gather(-1, tgt[:, None])[:, 0] + z_loss * lse.square()
    loss = torch.where(valid, per_row, 0.0).sum()
    if not want_grad:
        return loss, None
    grad = torch.softmax(lf, dim=-1).mul_((1.0 + 2.0 * z_loss * lse)[:, None])
    grad.scatter_add_(-1, tgt[:, None], torch.full_like(lse, -1.0)[:, None])
    grad.mul_(valid[:, None])
    return loss, grad.to(logits.dtype)


def _chunk_triton(logits: Tensor, targets: Tensor, ignore_index: int, z_loss: float, want_grad: bool):
    loss_rows, lse = ce_rows_forward(logits, targets, ignore_index, z_loss)
    if not want_grad:
        return loss_rows.sum(), None
    one = torch.ones(1, dtype=torch.float32, device=logits.device)
    # Unscaled gradient written over the chunk's own logits: no second (chunk, V) buffer.
    return loss_rows.sum(), ce_rows_backward(logits, targets, lse, one, ignore_index, z_loss, out=logits)


def _fused_forward(hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int, z_loss: float,
                   want_grad: bool, use_kernels: bool):
    n, h = hidden.shape
    step = chunk_rows(n, weight.shape[0], h)
    chunk_fn = _chunk_triton if use_kernels else _chunk_reference
    loss = torch.zeros((), dtype=upcast(hidden).dtype, device=hidden.device)
    gh = torch.empty_like(hidden) if want_grad else hidden.new_empty(0)
    # d weight sums over all tokens: accumulate in fp32 whatever the parameter dtype.
    gw = torch.zeros(weight.shape, dtype=upcast(weight).dtype, device=weight.device) if want_grad else hidden.new_empty(0)
    for s in range(0, n, step):
        hc, tc = hidden[s:s + step], targets[s:s + step]
        chunk_loss, dlogits = chunk_fn(hc @ weight.t(), tc, ignore_index, z_loss, want_grad)
        loss += chunk_loss
        if want_grad:
            torch.mm(dlogits, weight, out=gh[s:s + step])
            if gw.dtype == dlogits.dtype:
                gw.addmm_(dlogits.t(), hc)
            else:
                gw += dlogits.t() @ hc
    n_kept = kept(targets, ignore_index, weight.shape[0]).sum().clamp(min=1)
    return loss / n_kept, gh, gw  # no target: loss 0, gradients 0


@torch.library.custom_op("pretrain_kernels::linear_cross_entropy_fwd", mutates_args=())
def _lce_fwd(hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int, z_loss: float, want_grad: bool,
             use_kernels: bool) -> tuple[Tensor, Tensor, Tensor]:
    return _fused_forward(hidden, weight, targets, ignore_index, z_loss, want_grad, use_kernels)


@_lce_fwd.register_fake
def _(hidden, weight, targets, ignore_index, z_loss, want_grad, use_kernels):
    loss = hidden.new_empty((), dtype=upcast(hidden).dtype)
    if not want_grad:
        return loss, hidden.new_empty(0), hidden.new_empty(0)
    return loss, torch.empty_like(hidden), weight.new_empty(weight.shape, dtype=upcast(weight).dtype)


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Autograd for both paths; `register_autograd` installs these same methods on the custom op."""

    @staticmethod
    def forward(hidden, weight, targets, ignore_index, z_loss, want_grad, use_kernels):
        return _lce_fwd(hidden, weight, targets, ignore_index, z_loss, want_grad, use_kernels)

    @staticmethod
    def setup_context(ctx, inputs, output):
        hidden, weight, targets, ignore_index, _, want_grad, _ = inputs
        if not want_grad and (hidden.requires_grad or weight.requires_grad):
            raise RuntimeError("linear_cross_entropy: gradients were not gathered in the forward")
        ctx.ignore_index, ctx.vocab = ignore_index, weight.shape[0]
        ctx.dtypes = (hidden.dtype, weight.dtype)
        ctx.save_for_backward(targets, output[1], output[2])

    @staticmethod
    def backward(ctx, dloss, _dgh, _dgw):
        targets, gh, gw = ctx.saved_tensors
        scale = dloss.float() / kept(targets, ctx.ignore_index, ctx.vocab).sum().clamp(min=1)
        dh = (gh * scale.to(gh.dtype)).to(ctx.dtypes[0])
        dw = (gw * scale).to(ctx.dtypes[1])
        return dh, dw, None, None, None, None, None


torch.library.register_autograd(
    "pretrain_kernels::linear_cross_entropy_fwd", LinearCrossEntropyFunction.backward,
    setup_context=LinearCrossEntropyFunction.setup_context,
)


def linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int = -100,
                         z_loss: float = 0.0, *, backend: str = "auto") -> Tensor:
    """`cross_entropy(hidden @ weight.T, targets, ...)` for hidden (N, H), weight (V, H), targets (N,),
    computed in chunks that never hold the full (N, V) logits; fp32 scalar."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1] or targets.shape != hidden.shape[:1]:
        raise ValueError(f"linear_cross_entropy: want hidden (N, H), weight (V, H), targets (N,), got "
                         f"{tuple(hidden.shape)}, {tuple(weight.shape)}, {tuple(targets.shape)}")
    if use_aten(backend, hidden) and hidden.shape[0] * weight.shape[0] <= FULL_LOGITS_MAX:
        total, valid = cross_entropy_sum_aten(hidden @ weight.t(), targets, int(ignore_index), float(z_loss))
        return total / valid.sum().clamp(min=1)  # no target: 0, as the chunked path gives
    want_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return _lce_fwd(hidden, weight, targets, int(ignore_index), float(z_loss), want_grad,
                    use_triton(backend, hidden))[0]
