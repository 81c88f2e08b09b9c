"""Weights of the DiT family to and from diffusers' `DiTTransformer2DModel` (the layout of the released
facebook/DiT-XL-2-* checkpoints), both ways, without importing diffusers.

| this family (`DiT`) | diffusers (`DiTTransformer2DModel`) |
|---|---|
| patch_embed.proj | pos_embed.proj |
| t_embed.mlp.0, .mlp.2 | transformer_blocks.{i}.norm1.emb.timestep_embedder.linear_1, linear_2 (all i) |
| label_embed.weight | transformer_blocks.{i}.norm1.emb.class_embedder.embedding_table.weight (all i) |
| blocks.{i}.modulation | transformer_blocks.{i}.norm1.linear |
| blocks.{i}.attn.qkv (fused, rows q, k, v) | transformer_blocks.{i}.attn1.to_q, to_k, to_v |
| blocks.{i}.attn.proj | transformer_blocks.{i}.attn1.to_out.0 |
| blocks.{i}.mlp.up_proj, down_proj | transformer_blocks.{i}.ff.net.0.proj, ff.net.2 |
| final.modulation, final.linear | proj_out_1, proj_out_2 |

The fixed position table is a non-persistent buffer on both sides, rebuilt from the config.
diffusers keeps one timestep/label embedder per block (the output layer reads block 0's); this family
has one, so export copies it into every block and import requires the copies to agree.
diffusers always has the null-label row (its label dropout is fixed at 0.1): a model without one
(class_dropout_prob = 0) exports with a zero row appended; import sets class_dropout_prob = 0.1.
diffusers' attention-branch and output LayerNorms use eps 1e-6 whatever its `norm_eps`, which only
sets the MLP branch's; here `norm_eps` sets all three, so outputs agree exactly at norm_eps = 1e-6 (the
default and the DiT paper's value) and to ~1e-5 relative for diffusers' default config (1e-5).
"""

from __future__ import annotations

from typing import Any

import torch

from pretrain.models.dit import SIZES, DiT, DiTConfig, dims, out_channels

_BLOCK = {  # our per-block name -> diffusers' (qkv handled apart)
    "modulation": "norm1.linear",
    "attn.proj": "attn1.to_out.0",
    "mlp.up_proj": "ff.net.0.proj",
    "mlp.down_proj": "ff.net.2",
}
_TOP = {"patch_embed.proj": "pos_embed.proj", "final.modulation": "proj_out_1", "final.linear": "proj_out_2"}
_EMBED = {"t_embed.mlp.0": "norm1.emb.timestep_embedder.linear_1",
          "t_embed.mlp.2": "norm1.emb.timestep_embedder.linear_2"}
_TABLE = "norm1.emb.class_embedder.embedding_table.weight"


def diffusers_config(cfg: DiTConfig) -> dict:
    """The `DiTTransformer2DModel(**config)` arguments of the same architecture."""
    d, n_layers, n_heads = dims(cfg)
    if cfg.mlp_ratio != 4.0:
        raise ValueError(f"diffusers' DiT has a 4x MLP; model.mlp_ratio is {cfg.mlp_ratio}")
    return {
        "num_attention_heads": n_heads, "attention_head_dim": d // n_heads, "num_layers": n_layers,
        "in_channels": cfg.in_channels, "out_channels": out_channels(cfg), "sample_size": cfg.input_size,
        "patch_size": cfg.patch_size, "num_embeds_ada_norm": cfg.num_classes, "norm_eps": cfg.norm_eps,
        # The fixed parts of the DiT layout.
        "dropout": 0.0, "attention_bias": True, "activation_fn": "gelu-approximate",
        "upcast_attention": False, "norm_type": "ada_norm_zero", "norm_elementwise_affine": False,
    }


def to_diffusers(model_or_state_dict: DiT | dict[str, torch.Tensor], cfg: DiTConfig
                 ) -> tuple[dict, dict[str, torch.Tensor]]:
    """(diffusers config, diffusers state dict) of a DiT module or its state dict; tensors are shared where
    the mapping is one-to-one (clone them to modify independently)."""
    sd = model_or_state_dict
    if isinstance(sd, torch.nn.Module):
        sd = sd.state_dict()
    config = diffusers_config(cfg)
    _, n_layers, _ = dims(cfg)
    out: dict[str, torch.Tensor] = {}
    for ours, theirs in _TOP.items():
        for p in ("weight", "bias"):
            out[f"{theirs}.{p}"] = sd[f"{ours}.{p}"]
    table = sd["label_embed.weight"]
    if table.shape[0] == cfg.num_classes:  # no null row here; diffusers always has one
        table = torch.cat([table, table.new_zeros(1, table.shape[1])])
    for i in range(n_layers):
        ours, theirs = f"blocks.{i}.", f"transformer_blocks.{i}."
        for p in ("weight", "bias"):
            for o, t in _BLOCK.items():
                out[f"{theirs}{t}.{p}"] = sd[f"{ours}{o}.{p}"]
            for name, part in zip(("to_q", "to_k", "to_v"), sd[f"{ours}attn.qkv.{p}"].chunk(3), strict=True):
                out[f"{theirs}attn1.{name}.{p}"] = part
            for o, t in _EMBED.items():  # the shared embedder, copied into every block
                out[f"{theirs}{t}.{p}"] = sd[f"{o}.{p}"]
        out[theirs + _TABLE] = table
    return config, out


def from_diffusers(diffusers_model: Any) -> tuple[DiTConfig, dict[str, torch.Tensor]]:
    """(DiTConfig, state dict for `DiT`) of a `DiTTransformer2DModel`; raises ValueError (one line) for
    what this family cannot hold: per-block embedders that differ, a non-DiT block layout."""
    c = diffusers_model.config
    if c.norm_type != "ada_norm_zero" or c.norm_elementwise_affine or not c.attention_bias \
            or c.activation_fn != "gelu-approximate":
        raise ValueError("from_diffusers: want norm_type ada_norm_zero, no norm affine, attention biases and "
                         "gelu-approximate (the DiT layout)")
    n_heads, head_dim = c.num_attention_heads, c.attention_head_dim
    out_ch = c.out_channels or c.in_channels
    if out_ch not in (c.in_channels, 2 * c.in_channels):
        raise ValueError(f"from_diffusers: out_channels {out_ch} is neither in_channels nor twice it")
    shape = (n_heads * head_dim, c.num_layers, n_heads)
    preset = next((s for s, v in SIZES.items() if v == shape), None)  # name a paper size when it is one
    size = {"size": preset} if preset else dict(zip(("d_model", "n_layers", "n_heads"), shape, strict=True))
    cfg = DiTConfig(**size, patch_size=c.patch_size, input_size=c.sample_size, in_channels=c.in_channels,
                    num_classes=c.num_embeds_ada_norm, class_dropout_prob=0.1,
                    learn_sigma=out_ch != c.in_channels, norm_eps=c.norm_eps)
    sd = diffusers_model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for ours, theirs in _TOP.items():
        for p in ("weight", "bias"):
            out[f"{ours}.{p}"] = sd[f"{theirs}.{p}"]
    shared = {f"{o}.{p}": f"{t}.{p}" for o, t in _EMBED.items() for p in ("weight", "bias")}
    shared["label_embed.weight"] = _TABLE
    for ours, theirs in shared.items():
        first = sd[f"transformer_blocks.0.{theirs}"]
        for i in range(1, c.num_layers):
            if not torch.equal(sd[f"transformer_blocks.{i}.{theirs}"], first):
                raise ValueError(f"from_diffusers: block {i}'s {theirs} differs from block 0's; this family "
                                 "shares one timestep/label embedder")
        out[ours] = first
    for i in range(c.num_layers):
        ours, theirs = f"blocks.{i}.", f"transformer_blocks.{i}."
        for o, t in _BLOCK.items():
            for p in ("weight", "bias"):
                out[f"{ours}{o}.{p}"] = sd[f"{theirs}{t}.{p}"]
        for p in ("weight", "bias"):
            q, k, v = (sd[f"{theirs}attn1.{n}.{p}"] for n in ("to_q", "to_k", "to_v"))
            out[f"{ours}attn.qkv.{p}"] = torch.cat([q, k, v])
    return cfg, out
