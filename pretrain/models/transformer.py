"""The Transformer family: decoder-only language models (GPT-2, Llama presets) and bidirectional
encoders (BERT preset), described by architecture fields rather than by family name.

Architecture fields: `norm` (LayerNorm or RMSNorm), `position` (learned table or RoPE), `mlp` (GELU or
SwiGLU), `bias`, `tie_embeddings`, `causal`. The presets only change their defaults:

| `model.type` | norm | position | mlp | bias | tied | causal |
|---|---|---|---|---|---|---|
| gpt2 | layernorm | learned | gelu | yes | yes | yes |
| llama | rmsnorm | rope | swiglu | no | no | yes |
| bert | layernorm | learned | gelu | yes | yes | no |

`forward(input_ids)` returns logits; `forward(input_ids, targets)` returns the *summed* cross-entropy
over the targets that are not -100, through the LM head fused with cross-entropy
(`kernels.linear_cross_entropy`, never the full logits). Rows without a target skip the head entirely,
so a masked objective pays for the head only on its supervised tokens. The loss lives inside `forward`
so that sharding wrappers that gather parameters around module calls (ZeRO-3) see the head's weight
used inside a module.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn
from torch.utils.checkpoint import checkpoint

from pretrain import kernels
from pretrain.config import Section
from pretrain.models import Family, register
from pretrain.models.layers import Attention, GeluMLP, LayerNorm, RMSNorm, SwiGLUMLP

IGNORE = -100  # target value of positions that carry no loss


class TransformerConfig(Section):
    """Fields shared by every preset; the presets below set the architecture defaults."""

    type: str
    n_layers: int = Field(4, gt=0, description="Transformer blocks")
    d_model: int = Field(128, gt=0, description="residual stream width")
    n_heads: int = Field(4, gt=0, description="query heads")
    n_kv_heads: int | None = Field(None, gt=0, description="key/value heads (GQA); default n_heads")
    d_ff: int | None = Field(None, gt=0, description="MLP hidden size; default 4*d_model (gelu) or ~8/3*d_model (swiglu)")
    vocab_size: int = Field(50304, gt=0, description="embedding rows; >= the tokenizer's vocabulary")
    max_seq_len: int = Field(128, gt=0, description="longest sequence (the size of a learned position table)")
    norm_eps: float = Field(1e-5, gt=0, description="normalisation epsilon")
    rope_theta: float = Field(10000.0, gt=0, description="RoPE base (position=rope)")
    init_std: float = Field(0.02, gt=0, description="std of the normal init; residual projections scaled by 1/sqrt(2*n_layers)")
    kernels: Literal["triton", "reference"] = Field("triton", description="Triton kernels where the device allows, or plain PyTorch")
    norm: Literal["layernorm", "rmsnorm"] = Field("layernorm", description="normalisation layers")
    position: Literal["learned", "rope"] = Field("learned", description="learned position table or rotary embeddings")
    mlp: Literal["gelu", "swiglu"] = Field("gelu", description="MLP: Linear-GELU-Linear or gated SwiGLU")
    bias: bool = Field(True, description="biases in attention and MLP projections")
    tie_embeddings: bool = Field(True, description="share input and output embeddings")
    causal: bool = Field(True, description="causal (decoder) attention; false: bidirectional (encoder)")

    @model_validator(mode="after")
    def _shapes(self) -> TransformerConfig:
        if self.d_model % self.n_heads:
            raise ValueError(f"model.d_model ({self.d_model}) must be a multiple of model.n_heads ({self.n_heads})")
        if self.n_kv_heads is not None and self.n_heads % self.n_kv_heads:
            raise ValueError(f"model.n_heads ({self.n_heads}) must be a multiple of model.n_kv_heads ({self.n_kv_heads})")
        return self


class GPT2Config(TransformerConfig):
    type: Literal["gpt2"] = Field("gpt2", description="GPT-2 preset: LayerNorm, learned positions, GELU, biases, tied")


class LlamaConfig(TransformerConfig):
    type: Literal["llama"] = Field("llama", description="Llama preset: RMSNorm, RoPE, SwiGLU, no biases, untied")
    norm: Literal["layernorm", "rmsnorm"] = "rmsnorm"
    position: Literal["learned", "rope"] = "rope"
    mlp: Literal["gelu", "swiglu"] = "swiglu"
    bias: bool = False
    tie_embeddings: bool = False


class BertConfig(TransformerConfig):
    type: Literal["bert"] = Field("bert", description="BERT-style encoder preset: GPT-2's blocks, bidirectional")
    causal: bool = False


def n_kv_heads(m: TransformerConfig) -> int:
    return m.n_kv_heads or m.n_heads


def d_ff(m: TransformerConfig) -> int:
    if m.d_ff:
        return m.d_ff
    if m.mlp == "gelu":
        return 4 * m.d_model
    # SwiGLU: 2/3 of 4*d rounded up to a multiple of 256 keeps its parameter count at a 4x MLP's.
    return 256 * math.ceil(int(8 * m.d_model / 3) / 256)


_NORMS = {"layernorm": LayerNorm, "rmsnorm": RMSNorm}


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, cfg: TransformerConfig, backend: str):
        super().__init__()
        norm = _NORMS[cfg.norm]
        self.attn_norm = norm(cfg.d_model, cfg.norm_eps, backend)
        self.attn = Attention(
            cfg.d_model, cfg.n_heads, n_kv_heads(cfg), bias=cfg.bias,
            rope_theta=cfg.rope_theta if cfg.position == "rope" else None, causal=cfg.causal, backend=backend,
        )
        self.mlp_norm = norm(cfg.d_model, cfg.norm_eps, backend)
        self.mlp = (SwiGLUMLP(cfg.d_model, d_ff(cfg), cfg.bias, backend) if cfg.mlp == "swiglu"
                    else GeluMLP(cfg.d_model, d_ff(cfg), cfg.bias))

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), positions)
        return x + self.mlp(self.mlp_norm(x))


class LMHead(nn.Module):
    """Output projection to the vocabulary, optionally sharing the embedding matrix."""

    def __init__(self, d_model: int, vocab_size: int, tied_to: nn.Embedding | None, backend: str):
        super().__init__()
        # Registering the embedding's Parameter here too is what ties them (one tensor, two modules).
        self.weight = tied_to.weight if tied_to is not None else nn.Parameter(torch.empty(vocab_size, d_model))
        self.backend = backend

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor | None = None,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (..., V); with a boolean `rows` mask, logits (N, V) of those rows only; with targets, the
        summed loss over targets != IGNORE (fp32)."""
        if targets is None:
            return (hidden if rows is None else hidden[rows]) @ self.weight.t()
        hidden, targets = hidden.flatten(0, -2), targets.flatten()
        keep = targets != IGNORE
        if not bool(keep.all()):  # only supervised rows reach the head (masked LM: ~15% of them)
            hidden, targets = hidden[keep], targets[keep]
        if targets.numel() == 0:
            return (hidden.sum() * 0.0).float() + (self.weight.sum() * 0.0).float()
        mean = kernels.linear_cross_entropy(hidden, self.weight, targets, backend=self.backend)
        return mean * targets.numel()


class Transformer(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        backend = "reference" if cfg.kernels == "reference" else "auto"
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_embed = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.position == "learned" else None
        self.blocks = nn.ModuleList(Block(cfg, backend) for _ in range(cfg.n_layers))
        self.norm = _NORMS[cfg.norm](cfg.d_model, cfg.norm_eps, backend)
        self.lm_head = LMHead(cfg.d_model, cfg.vocab_size, self.embed if cfg.tie_embeddings else None, backend)
        # Set from outside (the engine) to trade compute for activation memory.
        self.activation_checkpointing = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, init_std) everywhere; residual output projections scaled by 1/sqrt(2 * n_layers)
        so the residual stream's variance does not grow with depth (GPT-2 paper, section 2.3)."""
        std = self.cfg.init_std
        for name, p in self.named_parameters():  # a tied head's weight is listed once, as embed.weight
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() == 1:  # norm gains
                nn.init.ones_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.cfg.n_layers))
            else:
                nn.init.normal_(p, 0.0, std)

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None,
                logits_at: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, V); with targets (B, T) -> summed loss over targets != -100;
        with a boolean logits_at (B, T) -> logits (N, V) of those positions only."""
        t = input_ids.shape[1]
        if t > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {t} exceeds model.max_seq_len {self.cfg.max_seq_len}")
        positions = torch.arange(t, device=input_ids.device)
        x = self.embed(input_ids)
        if self.pos_embed is not None:
            x = x + self.pos_embed(positions)
        for block in self.blocks:
            if self.activation_checkpointing and self.training:
                x = checkpoint(block, x, positions, use_reentrant=False)
            else:
                x = block(x, positions)
        return self.lm_head(self.norm(x), targets, logits_at)


def count_parameters(model: Transformer) -> dict:
    """Total parameters, and non-embedding ones (Kaplan et al. 2020 count N without embeddings)."""
    total = sum(p.numel() for p in model.parameters())
    emb = model.embed.weight.numel() + (model.pos_embed.weight.numel() if model.pos_embed is not None else 0)
    return {"params": total, "params_non_embedding": total - emb, "tied": model.lm_head.weight is model.embed.weight}


def flops_per_token(m: TransformerConfig, counts: dict, workload: dict) -> float:
    """Training FLOPs per token (Kaplan et al. 2020; PaLM, Chowdhery et al. 2022, appendix B): 6 N for the
    matrix products (forward 2N, backward 4N), N = the parameters in a matrix product (embedding
    lookups excluded), plus 12 L d T for attention scores and values. The LM head (a V x d product even
    when tied) counts for the fraction of tokens that reach it (`head_fraction`: 1 for causal LM, the
    mask rate for masked LM, which computes logits only at its chosen positions)."""
    head = m.vocab_size * m.d_model
    body = counts["params_non_embedding"] - (0 if counts["tied"] else head)
    return 6.0 * (body + head * workload.get("head_fraction", 1.0)) + 12.0 * m.n_layers * m.d_model * workload["seq_len"]


for _cls in (GPT2Config, LlamaConfig, BertConfig):
    register(Family(name=_cls.model_fields["type"].default, config=_cls, build=Transformer,
                    count_parameters=count_parameters, flops_per_unit=flops_per_token))
