"""Shared Transformer blocks: normalisation, attention and MLPs, built on the `pretrain.kernels` functions.

Each block takes the kernel backend name ("auto" or "reference") and passes it through, so one config
switch compares Triton against plain PyTorch end to end. Nothing here knows about ranks or devices.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pretrain import kernels


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, backend: str):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps, self.backend = eps, backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.rms_norm(x, self.weight, self.eps, backend=self.backend)


class LayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float, backend: str):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps, self.backend = eps, backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.layer_norm(x, self.weight, self.bias, self.eps, backend=self.backend)


class Attention(nn.Module):
    """Multi-head self-attention, causal (decoders) or bidirectional (encoders); grouped-query when
    n_kv_heads < n_heads; RoPE when rope_theta is set."""

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, bias: bool, rope_theta: float | None,
                 backend: str, causal: bool = True):
        super().__init__()
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = d_model // n_heads
        self.q_proj = nn.Linear(d_model, n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(n_heads * self.head_dim, d_model, bias=bias)
        self.rope_theta, self.backend, self.causal = rope_theta, backend, causal

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.rope_theta is not None:
            q = kernels.rope(q, positions, self.rope_theta, backend=self.backend)
            k = kernels.rope(k, positions, self.rope_theta, backend=self.backend)
        y = kernels.attention(q, k, v, causal=self.causal, backend=self.backend)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))


class GeluMLP(nn.Module):
    """GPT-2's MLP: Linear, GELU (tanh approximation, as the released weights were trained), Linear."""

    def __init__(self, d_model: int, d_ff: int, bias: bool = True):
        super().__init__()
        self.up_proj = nn.Linear(d_model, d_ff, bias=bias)
        self.down_proj = nn.Linear(d_ff, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.up_proj(x), approximate="tanh"))


class SwiGLUMLP(nn.Module):
    """Llama's gated MLP (Shazeer 2020, https://arxiv.org/abs/2002.05202)."""

    def __init__(self, d_model: int, d_ff: int, bias: bool, backend: str):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, d_ff, bias=bias)
        self.up_proj = nn.Linear(d_model, d_ff, bias=bias)
        self.down_proj = nn.Linear(d_ff, d_model, bias=bias)
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(kernels.swiglu(self.gate_proj(x), self.up_proj(x), backend=self.backend))
