"""Decoder-only Transformer: the GPT-2 family and the Llama family, chosen by `model.family`.

GPT-2: LayerNorm, learned positions, GELU MLP, biases, tied embeddings.
Llama: RMSNorm, RoPE, SwiGLU, grouped-query attention, no biases, untied embeddings.
`forward(input_ids)` returns the final hidden states; `forward(input_ids, targets)` returns the mean
next-token loss through the LM head fused with cross-entropy (`kernels.linear_cross_entropy`), which never
materialises the full logits. The loss lives inside `forward` so that sharding wrappers that gather
parameters around module calls (ZeRO-3) see the head's weight used inside a module.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import kernels
from pretrain.config import ModelConfig, d_ff, n_kv_heads, tie_embeddings
from pretrain.models.layers import Attention, GeluMLP, LayerNorm, RMSNorm, SwiGLUMLP


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, backend: str):
        super().__init__()
        llama = cfg.family == "llama"
        norm = RMSNorm if llama else LayerNorm
        self.attn_norm = norm(cfg.d_model, cfg.norm_eps, backend)
        self.attn = Attention(
            cfg.d_model, cfg.n_heads, n_kv_heads(cfg), bias=not llama,
            rope_theta=cfg.rope_theta if llama else None, backend=backend,
        )
        self.mlp_norm = norm(cfg.d_model, cfg.norm_eps, backend)
        self.mlp = SwiGLUMLP(cfg.d_model, d_ff(cfg), backend) if llama else GeluMLP(cfg.d_model, d_ff(cfg))

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

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return kernels.linear_cross_entropy(
            hidden.flatten(0, 1), self.weight, targets.flatten(), backend=self.backend
        )

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden @ self.weight.t()


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        backend = "reference" if cfg.kernels == "reference" else "auto"
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_embed = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.family == "gpt2" else None
        self.blocks = nn.ModuleList(Block(cfg, backend) for _ in range(cfg.n_layers))
        self.norm = (RMSNorm if cfg.family == "llama" else LayerNorm)(cfg.d_model, cfg.norm_eps, backend)
        self.lm_head = LMHead(cfg.d_model, cfg.vocab_size, self.embed if tie_embeddings(cfg) else None, backend)
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

    @property
    def output_weight(self) -> torch.Tensor:
        return self.lm_head.weight

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, T) -> hidden states (B, T, d_model); with targets (B, T) -> mean loss (ignore -100)."""
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
        hidden = self.norm(x)
        return hidden if targets is None else self.lm_head(hidden, targets)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head.logits(hidden)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.8,
                 top_k: int = 50, generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample continuations (no KV cache: sampling is for the end-of-run demo, not serving)."""
        for _ in range(max_new_tokens):
            ctx = input_ids[:, -self.cfg.max_seq_len:]
            logits = self.logits(self(ctx)[:, -1]) / max(temperature, 1e-6)
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)
            input_ids = torch.cat([input_ids, nxt], dim=1)
        return input_ids


def count_parameters(model: Transformer) -> dict[str, int]:
    """Total parameters, and non-embedding ones (Kaplan et al. 2020 count N without embeddings)."""
    total = sum(p.numel() for p in model.parameters())
    emb = model.embed.weight.numel() + (model.pos_embed.weight.numel() if model.pos_embed is not None else 0)
    return {"params": total, "params_non_embedding": total - emb, "tied": model.lm_head.weight is model.embed.weight}
