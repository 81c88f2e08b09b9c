"""Rotary position embedding (Su et al. 2021, https://arxiv.org/abs/2104.09864), Hugging Face Llama layout.

The "rotate-half" convention: dimension i pairs with i + D/2 (not with its neighbour), with frequency
theta^(-2i/D). The kernel computes cos/sin on the fly from the positions and a (D/2,) fp32 table of
inverse frequencies, so no (S, D) table is kept. The table is theta^(-2i/D) from the same torch
expression as the reference (both rotate by bit-identical angles), or the caller's `inv_freq`, which is
how scaled RoPE variants (Llama-3 `rope_scaling`) reach the kernel without a kernel of their own.
The backward is the same rotation by the negated angle.
"""

from __future__ import annotations

import torch
import triton.language as tl
from torch import Tensor

from pretrain.kernels._runtime import cdiv, finish, kernel, new_empty, next_pow2, staged, upcast, use_triton


def default_inv_freq(dim: int, theta: float, device: torch.device) -> Tensor:
    """theta^(-2i/D) for i < D/2, in fp32 (the same torch expression on every path: bit-identical angles)."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))


def rope_reference(x: Tensor, positions: Tensor, theta: float = 10000.0, inv_freq: Tensor | None = None) -> Tensor:
    """Plain PyTorch. `inv_freq` (D/2,) replaces theta^(-2i/D) (a scaled table such as Llama-3's); like the
    kernel's, it is a constant here (detached), not a parameter."""
    if inv_freq is None:
        table = default_inv_freq(x.shape[-1], theta, x.device)
    else:
        table = inv_freq.detach().to(x.device, torch.float32)
    freqs = positions.float()[..., None] * table
    if x.dtype == torch.float64:  # the tests' ground truth: angles in fp64 too
        freqs = positions.double()[..., None] * table.double()  # (S, D/2) or (B, S, D/2)
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = emb.cos(), emb.sin()
    if positions.dim() == 2:  # (B, S, D) -> broadcast over heads
        cos, sin = cos[:, None], sin[:, None]
    xf = upcast(x)
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


@kernel
def _rope_kernel(X, P, F, Y, n_rows, H, S, sxb, sxh, sxs, spb, sps, HALF,
                 BACKWARD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.arange(0, BLOCK_H)
    rmask = r < n_rows
    mask = rmask[:, None] & (c < HALF)[None, :]
    # Row r of the (B, H, S) grid: strides let x be any view (e.g. transposed from (B, S, H, D)).
    b = (r // (H * S)).to(tl.int64)
    h = ((r // S) % H).to(tl.int64)
    s = (r % S).to(tl.int64)
    pos = tl.load(P + b * spb + s * sps, mask=rmask, other=0).to(tl.float32)
    f = tl.load(F + c, mask=c < HALF, other=0.0)
    ang = pos[:, None] * f[None, :]
    cos = tl.cos(ang)
    sin = tl.sin(ang)
    if BACKWARD:
        sin = -sin  # the transpose of a rotation is the rotation by the opposite angle
    xo = (b * sxb + h * sxh + s * sxs)[:, None] + c[None, :]
    x1 = tl.load(X + xo, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(X + xo + HALF, mask=mask, other=0.0).to(tl.float32)
    yo = r.to(tl.int64)[:, None] * (2 * HALF) + c[None, :]
    tl.store(Y + yo, (x1 * cos - x2 * sin).to(Y.dtype.element_ty), mask=mask)
    tl.store(Y + yo + HALF, (x2 * cos + x1 * sin).to(Y.dtype.element_ty), mask=mask)


def _launch(x: Tensor, positions: Tensor, theta: float, inv_freq: Tensor | None, backward: bool) -> Tensor:
    B, H, S, D = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    pos = positions if positions.dim() == 2 else positions[None].expand(B, S)
    y = new_empty(x.shape, staged(x.dtype), x.device)
    half = D // 2
    block_h = next_pow2(half)
    n_rows = B * H * S
    budget = 16384 if x.device.type == "cpu" else 4096  # the interpreter pays per program
    block_r = max(1, min(next_pow2(n_rows), budget // block_h))
    table = default_inv_freq(D, theta, x.device) if inv_freq is None else inv_freq.to(x.device, torch.float32)
    _rope_kernel[(cdiv(n_rows, block_r),)](
        x, pos, table.contiguous(), y, n_rows, H, S, x.stride(0), x.stride(1), x.stride(2),
        pos.stride(0), pos.stride(1), half, BACKWARD=backward, BLOCK_R=block_r, BLOCK_H=block_h,
    )
    return finish(y, x.dtype)


@torch.library.custom_op("pretrain_kernels::rope", mutates_args=())
def _rope(x: Tensor, positions: Tensor, theta: float, inv_freq: Tensor | None) -> Tensor:
    return _launch(x, positions, theta, inv_freq, backward=False)


@_rope.register_fake
def _(x, positions, theta, inv_freq):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("pretrain_kernels::rope_bwd", mutates_args=())
def _rope_bwd(dy: Tensor, positions: Tensor, theta: float, inv_freq: Tensor | None) -> Tensor:
    return _launch(dy, positions, theta, inv_freq, backward=True)


@_rope_bwd.register_fake
def _(dy, positions, theta, inv_freq):
    return torch.empty_like(dy, memory_format=torch.contiguous_format)


class RoPEFunction(torch.autograd.Function):
    """Autograd for the Triton path; `register_autograd` installs these same methods on the custom op."""

    @staticmethod
    def forward(x, positions, theta, inv_freq):
        return _rope(x, positions, theta, inv_freq)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, positions, theta, inv_freq = inputs
        ctx.save_for_backward(positions, inv_freq)
        ctx.theta = theta

    @staticmethod
    def backward(ctx, dy):
        # The frequency table is a fixed buffer (a function of the config), never trained: no gradient.
        positions, inv_freq = ctx.saved_tensors
        return _rope_bwd(dy, positions, ctx.theta, inv_freq), None, None, None


torch.library.register_autograd("pretrain_kernels::rope", RoPEFunction.backward, setup_context=RoPEFunction.setup_context)


def rope(x: Tensor, positions: Tensor, theta: float = 10000.0, *, inv_freq: Tensor | None = None,
         backend: str = "auto") -> Tensor:
    """Rotate `x` (B, H, S, D) by `positions` (S,) or (B, S) integer token positions; `inv_freq` (D/2,)
    float32, when given, replaces theta^(-2i/D) (Llama-3 `rope_scaling` computes such a table)."""
    if x.dim() != 4 or x.shape[-1] % 2:
        raise ValueError(f"rope: x must be (B, H, S, D) with even D, got {tuple(x.shape)}")
    if inv_freq is not None and tuple(inv_freq.shape) != (x.shape[-1] // 2,):
        raise ValueError(f"rope: inv_freq must be (D/2,) = ({x.shape[-1] // 2},), got {tuple(inv_freq.shape)}")
    if not use_triton(backend, x):
        return rope_reference(x, positions, theta, inv_freq)
    return _rope(x, positions, float(theta), inv_freq)
