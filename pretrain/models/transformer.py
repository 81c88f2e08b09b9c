"""The Transformer family: decoder-only language models (GPT-2, Llama presets) and bidirectional
encoders (BERT preset), described by architecture fields rather than by family name.

Architecture fields: `norm` (LayerNorm or RMSNorm), `position` (learned table or RoPE), `mlp` (GELU or
SwiGLU), `bias`, `tie_embeddings`, `causal`. The presets only change their defaults:

| `model.type` | norm | position | mlp | bias | tied | causal |
|---|---|---|---|---|---|---|
| gpt2 | layernorm | learned | gelu | yes | yes | yes |
| llama | rmsnorm | rope | swiglu | no | no | yes |
| bert | layernorm | learned | gelu | yes | yes | no |

Released checkpoints need a few more fields, all defaulting to the above: `qkv_bias` (Qwen2: biases on
q/k/v only), `head_dim` (may differ from d_model / n_heads), `rope_scaling` (Llama 3.1's scaled rotary
frequencies, Hugging Face's semantics), `qk_norm` (RMSNorm of queries and keys: per head, Qwen3; over the whole
projection, OLMoE).

`moe` makes the feed-forward block of some or all layers a mixture of experts (`pretrain/models/moe.py`; the
presets `mixtral`, `qwen2_moe`, `qwen3_moe` and `olmoe` are in `pretrain/models/moe_presets.py`). Its auxiliary
losses join the training loss, per token; FLOPs count the active parameters only.

`forward(input_ids)` returns logits; `forward(input_ids, targets)` returns the *summed* cross-entropy
over the targets that are not -100, through the LM head fused with cross-entropy
(`kernels.linear_cross_entropy`, never the full logits). Rows without a target skip the head entirely,
so a masked objective pays for the head only on its supervised tokens. The loss lives inside `forward`
so that sharding wrappers that gather parameters around module calls (ZeRO-3) see the head's weight
used inside a module.

Packed rows (several documents in one row) pass `positions` (restarting at 0 per document) and
`segment_ids` (attention never crosses a document boundary), so packing is invisible to the loss.
Decoding passes a `KVCache` (`pretrain.models.kv_cache`); `pretrain.models.generate` drives it.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn
from torch.utils.checkpoint import checkpoint

from pretrain import kernels
from pretrain.config import Section
from pretrain.models.family import Family, register
from pretrain.models.kv_cache import KVCache
from pretrain.models.layers import Attention, GeluMLP, LayerNorm, RMSNorm, Rotary, SwiGLUMLP
from pretrain.models.moe import MoE, MoeConfig, load_grid, moe_metrics
from pretrain.models.moe import after_reduce as moe_after_reduce

IGNORE = -100  # target value of positions that carry no loss


class RopeScaling(Section):
    """Llama 3.1's frequency-dependent RoPE scaling (Hugging Face `rope_type: llama3`): wavelengths longer
    than original_max_position_embeddings / low_freq_factor are stretched by `factor`, those shorter than
    original_max_position_embeddings / high_freq_factor are kept, and the band between is interpolated."""

    type: Literal["llama3"] = Field("llama3", description="scaling rule (Hugging Face rope_type); only llama3")
    factor: float = Field(8.0, ge=1.0, description="how much longer the context is than in pretraining")
    low_freq_factor: float = Field(1.0, gt=0, description="wavelengths above original/low_freq_factor are scaled")
    high_freq_factor: float = Field(4.0, gt=0, description="wavelengths below original/high_freq_factor are kept")
    original_max_position_embeddings: int = Field(8192, gt=0, description="context length of the pretraining")

    @model_validator(mode="after")
    def _band(self) -> RopeScaling:
        if self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(f"high_freq_factor ({self.high_freq_factor}) must be greater than low_freq_factor "
                             f"({self.low_freq_factor})")
        return self


class TransformerConfig(Section):
    """Fields shared by every preset; the presets below set the architecture defaults."""

    type: str
    n_layers: int = Field(4, gt=0, description="Transformer blocks")
    d_model: int = Field(128, gt=0, description="residual stream width")
    n_heads: int = Field(4, gt=0, description="query heads")
    head_dim: int | None = Field(None, gt=0, description="width of one attention head; default d_model // n_heads")
    n_kv_heads: int | None = Field(None, gt=0, description="key/value heads (GQA); default n_heads")
    d_ff: int | None = Field(None, gt=0, description="MLP hidden size; default 4*d_model (gelu) or ~8/3*d_model (swiglu)")
    vocab_size: int = Field(50304, gt=0, description="embedding rows; >= the tokenizer's vocabulary")
    max_seq_len: int = Field(128, gt=0, description="longest sequence (the size of a learned position table)")
    norm_eps: float = Field(1e-5, gt=0, description="normalisation epsilon")
    rope_theta: float = Field(10000.0, gt=0, description="RoPE base (position=rope)")
    rope_scaling: RopeScaling | None = Field(None, description="scaled RoPE frequencies (Llama 3.1); none: plain")
    init_std: float = Field(0.02, gt=0, description="std of the normal init; residual projections scaled by 1/sqrt(2*n_layers)")
    kernels: Literal["triton", "reference"] = Field("triton", description="Triton kernels where the device allows, or plain PyTorch")
    norm: Literal["layernorm", "rmsnorm"] = Field("layernorm", description="normalisation layers")
    position: Literal["learned", "rope"] = Field("learned", description="learned position table or rotary embeddings")
    mlp: Literal["gelu", "swiglu"] = Field("gelu", description="MLP: Linear-GELU-Linear or gated SwiGLU")
    bias: bool = Field(True, description="biases in attention and MLP projections")
    qkv_bias: bool | None = Field(None, description="biases on the q/k/v projections; default `bias` (Qwen2: true)")
    tie_embeddings: bool = Field(True, description="share input and output embeddings")
    causal: bool = Field(True, description="causal (decoder) attention; false: bidirectional (encoder)")
    qk_norm: Literal["none", "head", "full"] = Field("none", description="RMSNorm of queries and keys: per head (Qwen3), over the projection (OLMoE)")
    moe: MoeConfig | None = Field(None, description="mixture-of-experts feed-forward blocks; none: dense")

    @model_validator(mode="after")
    def _shapes(self) -> TransformerConfig:
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ValueError(f"model.d_model ({self.d_model}) must be a multiple of model.n_heads ({self.n_heads}) "
                             f"unless model.head_dim is set")
        if self.n_kv_heads is not None and self.n_heads % self.n_kv_heads:
            raise ValueError(f"model.n_heads ({self.n_heads}) must be a multiple of model.n_kv_heads ({self.n_kv_heads})")
        if self.position == "rope" and head_dim(self) % 2:
            raise ValueError(f"model.head_dim ({head_dim(self)}) must be even for rotary positions (model.position=rope)")
        if self.rope_scaling is not None and self.position != "rope":
            raise ValueError(f"model.rope_scaling needs model.position=rope, got {self.position}")
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


def head_dim(m: TransformerConfig) -> int:
    return m.head_dim or m.d_model // m.n_heads


def rope_inv_freq(m: TransformerConfig, dim: int) -> torch.Tensor | None:
    """The (dim/2,) fp32 inverse frequencies of scaled RoPE, computed on CPU, or None for plain RoPE (the
    kernels then use theta^(-2i/dim) themselves). Same arithmetic, in the same order and dtype, as Hugging
    Face's `_compute_llama3_parameters` (which also runs on CPU when a model is built), so imported
    Llama 3.x weights rotate by identical angles."""
    s = m.rope_scaling
    if s is None:
        return None
    base = 1.0 / (m.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim))
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / base
    scaled = torch.where(wavelen > low_wavelen, base / s.factor, base)  # long wavelengths: stretched
    # The band between the two wavelengths blends the stretched and the original frequency.
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    blended = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, blended, scaled)


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

    def __init__(self, cfg: TransformerConfig, backend: str, rotary: Rotary | None, index: int = 0):
        super().__init__()
        norm = _NORMS[cfg.norm]
        self.attn_norm = norm(cfg.d_model, cfg.norm_eps, backend)
        self.attn = Attention(
            cfg.d_model, cfg.n_heads, n_kv_heads(cfg), bias=cfg.bias, rotary=rotary, causal=cfg.causal,
            backend=backend, head_dim=head_dim(cfg), qkv_bias=cfg.qkv_bias,
            qk_norm=None if cfg.qk_norm == "none" else (cfg.qk_norm, cfg.norm_eps),
        )
        self.mlp_norm = norm(cfg.d_model, cfg.norm_eps, backend)
        if cfg.moe is not None and cfg.moe.is_moe_layer(index):
            self.mlp = MoE(cfg.moe, cfg.d_model, d_ff(cfg), backend)
        else:
            self.mlp = (SwiGLUMLP(cfg.d_model, d_ff(cfg), cfg.bias, backend) if cfg.mlp == "swiglu"
                        else GeluMLP(cfg.d_model, d_ff(cfg), cfg.bias))

    def forward(self, x: torch.Tensor, positions: torch.Tensor, segment_ids: torch.Tensor | None = None,
                cache=None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), positions, segment_ids, cache)
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
        if torch.compiler.is_compiling():  # no data-dependent branch in the graph: the loss skips IGNORE rows itself
            mean = kernels.linear_cross_entropy(hidden, self.weight, targets, backend=self.backend)
            return mean * keep.sum()
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
        # One Rotary for all blocks: its frequency table is made once per device, from the config.
        scaled = partial(rope_inv_freq, cfg, head_dim(cfg)) if cfg.rope_scaling is not None else None
        rotary = Rotary(cfg.rope_theta, backend, scaled) if cfg.position == "rope" else None
        self.blocks = nn.ModuleList(Block(cfg, backend, rotary, i) for i in range(cfg.n_layers))
        self.norm = _NORMS[cfg.norm](cfg.d_model, cfg.norm_eps, backend)
        self.lm_head = LMHead(cfg.d_model, cfg.vocab_size, self.embed if cfg.tie_embeddings else None, backend)
        # Set from outside (the engine) to trade compute for activation memory.
        self.activation_checkpointing = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """`init_parameter` for every parameter, from the global RNG. The trainer initialises instead with one
        seeded generator per parameter name (`pretrain.train.build`), which works on ZeRO-3 partitions."""
        for name, p in self.named_parameters():  # a tied head's weight is listed once, as embed.weight
            init_parameter(self.cfg, name, p.data, None)

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None,
                logits_at: torch.Tensor | None = None, *, positions: torch.Tensor | None = None,
                segment_ids: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, V); with targets (B, T) -> summed loss over targets != -100;
        with a boolean logits_at (B, T) -> logits (N, V) of those positions only.

        positions (T,) or (B, T) index RoPE and the learned table alike (default: 0..T-1 after the cached
        tokens); segment_ids (B, T) keep each packed document's attention to itself; cache: a KVCache that
        this call appends to (the prompt first, then one token per call)."""
        b, t = input_ids.shape
        past = self._check_cache(cache, segment_ids)
        if past + t > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {past + t} exceeds model.max_seq_len {self.cfg.max_seq_len}")
        if positions is None:
            positions = torch.arange(past, past + t, device=input_ids.device)
        elif tuple(positions.shape) not in ((t,), (b, t)):
            raise ValueError(f"positions must be (T,) or (B, T) = {(b, t)}, got {tuple(positions.shape)}")
        if segment_ids is not None and tuple(segment_ids.shape) != (b, t):
            raise ValueError(f"segment_ids must be (B, T) = {(b, t)}, got {tuple(segment_ids.shape)}")
        x = self.embed(input_ids)
        if self.pos_embed is not None:
            x = x + self.pos_embed(positions)
        for i, block in enumerate(self.blocks):
            if cache is not None:  # never checkpointed: a recomputed forward would append to the cache twice
                x = block(x, positions, segment_ids, cache.layers[i])
            elif self.activation_checkpointing and self.training:
                x = checkpoint(block, x, positions, segment_ids, use_reentrant=False)
            else:
                x = block(x, positions, segment_ids)
        out = self.lm_head(self.norm(x), targets, logits_at)
        if targets is not None and self.training and self.cfg.moe is not None:
            aux = [b.mlp.aux for b in self.blocks if isinstance(b.mlp, MoE) and b.mlp.aux is not None]
            if aux:  # per token, like the summed loss it joins
                out = out + torch.stack(aux).sum() * (targets != IGNORE).sum()
        return out

    def step_metrics(self) -> dict:
        """The last forward's routing statistics as (sum, count) pairs (`pretrain.models.moe.moe_metrics`)."""
        return moe_metrics(self.blocks) if self.cfg.moe is not None else {}

    def _check_cache(self, cache: KVCache | None, segment_ids: torch.Tensor | None) -> int:
        """Tokens already in the cache (0 without one), after refusing what a cache cannot serve."""
        if cache is None:
            return 0
        if not self.cfg.causal:
            raise ValueError("a KV cache needs a causal model (model.causal is false)")
        if segment_ids is not None:
            raise ValueError("segment_ids cannot be combined with a KV cache (decode one document at a time)")
        if len(cache.layers) != self.cfg.n_layers:
            raise ValueError(f"KV cache has {len(cache.layers)} layers, the model {self.cfg.n_layers}")
        return cache.length

    def new_cache(self, max_len: int | None = None) -> KVCache:
        """An empty cache for every layer, holding up to max_len tokens (default max_seq_len; a long-context
        model's full length can be gigabytes, so callers that know their length pass it)."""
        return KVCache(self.cfg.n_layers, min(max_len or self.cfg.max_seq_len, self.cfg.max_seq_len))


def count_parameters(model: Transformer) -> dict:
    """Total parameters, and non-embedding ones (Kaplan et al. 2020 count N without embeddings); with MoE layers
    also the active ones, what one token passes through (its k experts of each layer's E)."""
    total = sum(p.numel() for p in model.parameters())
    emb = model.embed.weight.numel() + (model.pos_embed.weight.numel() if model.pos_embed is not None else 0)
    idle = sum(e.gate_up.numel() + e.down.numel() for e in _experts(model)) if model.cfg.moe is not None else 0
    idle = idle * (1 - model.cfg.moe.top_k / model.cfg.moe.n_experts) if idle else 0
    return {"params": total, "params_non_embedding": total - emb, "tied": model.lm_head.weight is model.embed.weight,
            "params_active": total - int(idle)}


def _experts(model: Transformer) -> list:
    return [b.mlp.experts for b in model.blocks if isinstance(b.mlp, MoE)]


def flops_per_token(m: TransformerConfig, counts: dict, workload: dict) -> float:
    """Training FLOPs per token (Kaplan et al. 2020; PaLM, Chowdhery et al. 2022, appendix B): 6 N for the
    matrix products (forward 2N, backward 4N), N = the parameters in a matrix product (embedding
    lookups excluded), plus 12 L (H d_head) T for attention scores and values (H d_head is d when
    head_dim is not set). The LM head (a V x d product even when tied) counts for the fraction of tokens
    that reach it (`head_fraction`: 1 for causal LM, the mask rate for masked LM, which computes logits
    only at its chosen positions)."""
    head = m.vocab_size * m.d_model
    idle = counts["params"] - counts.get("params_active", counts["params"])  # experts a token does not visit
    body = counts["params_non_embedding"] - idle - (0 if counts["tied"] else head)
    attn = 12.0 * m.n_layers * m.n_heads * head_dim(m) * workload["seq_len"]
    return 6.0 * (body + head * workload.get("head_fraction", 1.0)) + attn


def init_parameter(cfg: TransformerConfig, name: str, t: torch.Tensor, generator: torch.Generator | None) -> None:
    """Normal(0, init_std) for matrices; residual output projections scaled by 1/sqrt(2 * n_layers) so the
    residual stream's variance does not grow with depth (GPT-2 paper, section 2.3); biases 0, norm gains 1."""
    with torch.no_grad():
        if name.endswith("bias"):
            t.zero_()
        elif t.dim() == 1:  # norm gains
            t.fill_(1.0)
        elif name.endswith(("o_proj.weight", "down_proj.weight", "experts.down")):
            t.normal_(0.0, cfg.init_std / math.sqrt(2 * cfg.n_layers), generator=generator)
        else:
            t.normal_(0.0, cfg.init_std, generator=generator)


def step_metrics(model: Transformer) -> dict:
    """The family's addition to the step's metrics: the MoE layers' routing statistics (none for a dense model)."""
    return model.step_metrics()


def after_reduce(model: Transformer, values: dict) -> dict:
    """After the all-reduce: the MoE layers' max/mean loads and their balance-bias update."""
    return moe_after_reduce(model.blocks, values) if model.cfg.moe is not None else values


def grids(row: dict) -> dict:
    """What the trainer draws as heatmaps at each evaluation: the MoE layers' expert loads (nothing when dense)."""
    return load_grid(row)


def register_preset(cls: type[TransformerConfig]) -> None:
    register(Family(name=cls.model_fields["type"].default, config=cls, build=Transformer,
                    count_parameters=count_parameters, flops_per_unit=flops_per_token, init_parameter=init_parameter,
                    step_metrics=step_metrics, after_reduce=after_reduce, grids=grids))


for _cls in (GPT2Config, LlamaConfig, BertConfig):
    register_preset(_cls)
