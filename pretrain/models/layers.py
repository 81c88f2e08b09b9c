"""Shared Transformer blocks: normalisation, attention and MLPs, built on the `pretrain.kernels` functions.

Each block takes the kernel backend name ("auto" or "reference") and passes it through, so one config
switch compares Triton against plain PyTorch end to end. Nothing here knows about ranks or devices.
Attention also takes what packed rows and cached decoding need: per-token positions, segment ids, and a
per-layer KV cache (`pretrain.models.kv_cache`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pretrain import kernels
from pretrain.models.kv_cache import LayerCache


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


class Rotary:
    """RoPE settings shared by every attention layer: theta, and, when the config scales the frequencies
    (Llama 3's `rope_scaling`), a function that makes the (D/2,) inverse-frequency table.

    Not a module and not a buffer on purpose: the table is a function of the config, so it stays out of
    `state_dict` (released checkpoints do not carry it, and ours must load into Hugging Face unchanged) and
    ZeRO-3 has nothing of it to partition. It is made at the first forward on each device, never at
    construction, which may run on the meta device or inside `deepspeed.zero.Init`."""

    def __init__(self, theta: float, backend: str, make_table: Callable[[], torch.Tensor] | None = None):
        self.theta, self.backend, self._make = theta, backend, make_table
        self._on: dict[torch.device, torch.Tensor] = {}

    def table(self, device: torch.device) -> torch.Tensor | None:
        if self._make is None:
            return None
        if device not in self._on:
            self._on[device] = self._make().to(device)
        return self._on[device]

    def __call__(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        table = self.table(x.device)
        if table is None:  # unscaled RoPE: the kernels' own theta^(-2i/D), today's fast path
            return kernels.rope(x, positions, self.theta, backend=self.backend)
        return kernels.rope(x, positions, self.theta, inv_freq=table, backend=self.backend)


class Attention(nn.Module):
    """Multi-head self-attention, causal (decoders) or bidirectional (encoders); grouped-query when
    n_kv_heads < n_heads; rotary positions when `rotary` is given. `head_dim` may differ from
    d_model / n_heads (as Hugging Face Llama and Qwen allow); q/k/v and o carry separate bias switches
    because Qwen2 has biases on q/k/v only. `qk_norm` ("head" or "full", eps): RMSNorm of queries and keys before
    RoPE, per head over head_dim (Qwen3: `q_norm`, `k_norm` of head_dim) or over the whole projection (OLMoE)."""

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, bias: bool, rotary: Rotary | None,
                 backend: str, causal: bool = True, *, head_dim: int | None = None, qkv_bias: bool | None = None,
                 qk_norm: tuple[str, float] | None = None):
        super().__init__()
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = head_dim or d_model // n_heads
        qkv_bias = bias if qkv_bias is None else qkv_bias
        self.q_proj = nn.Linear(d_model, n_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(n_heads * self.head_dim, d_model, bias=bias)
        self.rotary, self.backend, self.causal = rotary, backend, causal
        self.qk_norm = qk_norm[0] if qk_norm else None
        if qk_norm is not None:
            full = qk_norm[0] == "full"
            self.q_norm = RMSNorm(n_heads * self.head_dim if full else self.head_dim, qk_norm[1], backend)
            self.k_norm = RMSNorm(n_kv_heads * self.head_dim if full else self.head_dim, qk_norm[1], backend)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, segment_ids: torch.Tensor | None = None,
                cache: LayerCache | None = None) -> torch.Tensor:
        """x (B, T, d_model); positions (T,) or (B, T); segment_ids (B, T): keys of another document are
        never attended. With a cache, keys and values (after RoPE) are appended to it; a single new query
        then attends every cached key without a causal mask, since all of them lie in its past."""
        b, t, _ = x.shape
        q, k = self.q_proj(x), self.k_proj(x)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(b, t, self.n_heads, self.head_dim)
        k = k.view(b, t, self.n_kv_heads, self.head_dim)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.rotary is not None:
            q, k = self.rotary(q, positions), self.rotary(k, positions)
        causal = self.causal
        if cache is not None:
            past = cache.length
            k, v = cache.append(k, v)
            if past:
                # The kernels' causal mask is top-left (S == Skv); one query after the cached ones needs none.
                if t != 1:
                    raise ValueError(f"a cached forward after the prefill takes one token at a time, got {t}")
                causal = False
        masks = {} if segment_ids is None else {"segment_ids": segment_ids}
        y = kernels.attention(q, k, v, causal=causal, backend=self.backend, **masks)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))


def gelu_tanh_as_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """GELU's tanh approximation written as x * sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3): the identity
    0.5 (1 + tanh(u)) = sigmoid(2u)."""
    return x * torch.sigmoid(1.5957691216057308 * (x + 0.044715 * x * x * x))


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU, tanh approximation (GPT-2's `gelu_new`). Eager: ATen's one fused op. Under `torch.compile`: the
    sigmoid form, where inductor's CPU code computes an exp instead of a tanh (tools/bench_gelu.py: forward
    and backward in about half the time; fp32 within 5e-7 of ATen's)."""
    if torch.compiler.is_compiling():
        return gelu_tanh_as_sigmoid(x)
    return F.gelu(x, approximate="tanh")


class GeluMLP(nn.Module):
    """GPT-2's MLP: Linear, GELU (tanh approximation, as the released weights were trained), Linear."""

    def __init__(self, d_model: int, d_ff: int, bias: bool = True):
        super().__init__()
        self.up_proj = nn.Linear(d_model, d_ff, bias=bias)
        self.down_proj = nn.Linear(d_ff, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(gelu_tanh(self.up_proj(x)))


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
