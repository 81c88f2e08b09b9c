"""The DiT family: diffusion Transformers over image patches (Peebles & Xie 2022,
https://arxiv.org/abs/2212.09748), with adaLN-Zero conditioning on the timestep and the class label.

`forward(x, t, y)`: x (B, C, H, W) in model space (pixels in [-1, 1] or scaled VAE latents), t (B,) float
timesteps in DiT units [0, 1000), y (B,) int64 labels where `num_classes` is the null label of
classifier-free guidance (its embedding row exists when class_dropout_prob > 0; the objective drops labels,
the model never draws random numbers). Returns (B, C_out, H, W): C_out = C, or 2C with `learn_sigma`
(first C channels the prediction, last C the variance interpolation v of Improved DDPM).

One block: `x + gate * attn(adaLN(x))`, then `x + gate * mlp(adaLN(x))`, where adaLN is LayerNorm without
affine modulated as `norm(x) * (1 + scale) + shift` and (shift, scale, gate) x 2 come from one linear of
SiLU(timestep embedding + label embedding). Every modulation and the output layer start at zero, so the
model is the identity on its residual stream and outputs zeros at init (adaLN-Zero, paper section 3.2).

The timestep and position embeddings follow diffusers' `DiTTransformer2DModel` exactly (so released
weights load, see pretrain/hub/dit_diffusers.py): timestep frequencies exp(-ln(1e4) i / (128 - 1)), i < 128, laid out
[cos, sin] (the DiT repository divides by 128, not 127); positions the fixed 2-D sin-cos table of MAE,
[sin-cos of the column | sin-cos of the row], computed in float64. Unlike diffusers, which copies the
timestep/label embedder into every block, there is one shared embedder (as in the DiT repository).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn
from torch.utils.checkpoint import checkpoint

from pretrain import kernels
from pretrain.config import Section
from pretrain.models.family import Family, register
from pretrain.models.layers import GeluMLP

# DiT paper, Table 1: (d_model, n_layers, n_heads).
SIZES = {"S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16)}
FREQ_DIM = 256  # width of the sinusoidal timestep features before the MLP (DiT and diffusers)


class DiTConfig(Section):
    type: Literal["dit"] = Field("dit", description="diffusion Transformer, adaLN-Zero conditioning")
    size: Literal["S", "B", "L", "XL"] = Field("S", description="DiT paper size: d_model/n_layers/n_heads")
    d_model: int | None = Field(None, gt=0, description="width; overrides the size preset")
    n_layers: int | None = Field(None, gt=0, description="blocks; overrides the size preset")
    n_heads: int | None = Field(None, gt=0, description="attention heads; overrides the size preset")
    patch_size: Literal[2, 4, 8] = Field(2, description="side of the square patches that become tokens")
    input_size: int = Field(32, gt=0, description="image side the model sees (smaller data is padded)")
    in_channels: int = Field(1, gt=0, description="image channels (1 gray, 3 RGB, 4 SD-VAE latents)")
    num_classes: int = Field(10, gt=0, description="class labels; the value num_classes is the null label")
    class_dropout_prob: float = Field(
        0.1, ge=0, lt=1, description="label dropout for classifier-free guidance; > 0 adds a null-label row")
    learn_sigma: bool = Field(False, description="also output the variance interpolation v (2x channels)")
    mlp_ratio: float = Field(4.0, gt=0, description="MLP hidden size over d_model")
    norm_eps: float = Field(1e-6, gt=0, description="epsilon of every LayerNorm (DiT uses 1e-6)")
    kernels: Literal["auto", "triton", "reference"] = Field(
        "auto", description="Triton kernels where the device allows (auto = triton), or plain PyTorch")

    @model_validator(mode="after")
    def _shapes(self) -> DiTConfig:
        d, _, h = dims(self)
        if self.input_size % self.patch_size:
            raise ValueError(f"model.input_size ({self.input_size}) is not divisible by model.patch_size "
                             f"({self.patch_size})")
        if d % h:
            raise ValueError(f"model.d_model ({d}) must be a multiple of model.n_heads ({h})")
        if d % 4:  # half the width encodes rows, half columns, each as sin and cos
            raise ValueError(f"model.d_model ({d}) must be a multiple of 4 (2-D sin-cos position embedding)")
        return self


def dims(cfg: DiTConfig) -> tuple[int, int, int]:
    """(d_model, n_layers, n_heads): the size preset with any explicit field taking precedence."""
    d, n, h = SIZES[cfg.size]
    return cfg.d_model or d, cfg.n_layers or n, cfg.n_heads or h


def out_channels(cfg: DiTConfig) -> int:
    return 2 * cfg.in_channels if cfg.learn_sigma else cfg.in_channels


def label_rows(cfg: DiTConfig) -> int:
    return cfg.num_classes + (cfg.class_dropout_prob > 0)


def tokens(cfg: DiTConfig) -> int:
    return (cfg.input_size // cfg.patch_size) ** 2


def timestep_features(t: torch.Tensor, dim: int = FREQ_DIM) -> torch.Tensor:
    """(B,) float timesteps -> (B, dim) fp32 [cos | sin] features; diffusers' `Timesteps(dim,
    flip_sin_to_cos=True, downscale_freq_shift=1)`, operation for operation."""
    half = dim // 2
    exponent = -math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - 1)
    args = t[:, None].float() * torch.exp(exponent)[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def sincos_pos_embed(d_model: int, grid: int) -> torch.Tensor:
    """(grid*grid, d_model) fixed 2-D position table, token r*grid + c: [1-D sin-cos of the column c over
    d/2 | of the row r over d/2], frequencies 1e4^(-i/(d/4)), in float64 then fp32 (MAE, DiT, diffusers)."""
    omega = 1.0 / 10000 ** (torch.arange(d_model // 4, dtype=torch.float64) / (d_model / 4))
    pos = torch.arange(grid, dtype=torch.float64)
    one_d = torch.outer(pos, omega)
    one_d = torch.cat([torch.sin(one_d), torch.cos(one_d)], dim=1)  # (grid, d/2)
    row = one_d[:, None, :].expand(grid, grid, -1)
    col = one_d[None, :, :].expand(grid, grid, -1)
    return torch.cat([col, row], dim=-1).reshape(grid * grid, d_model).float()


class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, T, D) tokens: non-overlapping patches through a strided convolution (a linear
    map of each flattened patch), plus the fixed position table. The table is a non-persistent buffer: it
    is a function of the config, so it is in neither our checkpoints nor diffusers' state dicts."""

    def __init__(self, cfg: DiTConfig, d_model: int):
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_channels, d_model, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.register_buffer("pos_embed", sincos_pos_embed(d_model, cfg.input_size // cfg.patch_size)[None],
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x.to(self.proj.weight.dtype)).flatten(2).transpose(1, 2)
        return (x + self.pos_embed).to(x.dtype)


class TimestepEmbed(nn.Module):
    """(B,) timesteps -> (B, D): sinusoidal features, then Linear-SiLU-Linear."""

    def __init__(self, d_model: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(FREQ_DIM, d_model), nn.SiLU(), nn.Linear(d_model, d_model))

    def forward(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.mlp(timestep_features(t).to(dtype))


class SelfAttention(nn.Module):
    """Bidirectional multi-head attention with a fused qkv projection (the DiT repository's layout)."""

    def __init__(self, d_model: int, n_heads: int, backend: str):
        super().__init__()
        self.n_heads, self.backend = n_heads, backend
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4).unbind(0)
        y = kernels.attention(q, k, v, causal=False, backend=self.backend)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """adaLN-Zero block: shift/scale/gate for attention and for the MLP from one linear of the
    conditioning."""

    def __init__(self, d_model: int, n_heads: int, mlp_ratio: float, eps: float, backend: str):
        super().__init__()
        self.modulation = nn.Linear(d_model, 6 * d_model)
        self.attn = SelfAttention(d_model, n_heads, backend)
        self.mlp = GeluMLP(d_model, int(d_model * mlp_ratio))
        self.eps, self.backend = eps, backend

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x (B, T, D); c (B, D) = SiLU(conditioning)."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(c)[:, None].chunk(6, dim=-1)
        h = kernels.layer_norm(x, None, None, self.eps, shift=shift1, scale=scale1, backend=self.backend)
        x = x + gate1 * self.attn(h)
        h = kernels.layer_norm(x, None, None, self.eps, shift=shift2, scale=scale2, backend=self.backend)
        return x + gate2 * self.mlp(h)


class FinalLayer(nn.Module):
    """adaLN (shift, scale) then a linear to patch_size^2 * C_out values per token."""

    def __init__(self, d_model: int, patch_values: int, eps: float, backend: str):
        super().__init__()
        self.modulation = nn.Linear(d_model, 2 * d_model)
        self.linear = nn.Linear(d_model, patch_values)
        self.eps, self.backend = eps, backend

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.modulation(c)[:, None].chunk(2, dim=-1)
        return self.linear(kernels.layer_norm(x, None, None, self.eps, shift=shift, scale=scale,
                                              backend=self.backend))


class DiT(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        d, n_layers, n_heads = dims(cfg)
        backend = "reference" if cfg.kernels == "reference" else "auto"
        self.patch_embed = PatchEmbed(cfg, d)
        self.t_embed = TimestepEmbed(d)
        self.label_embed = nn.Embedding(label_rows(cfg), d)
        self.blocks = nn.ModuleList(Block(d, n_heads, cfg.mlp_ratio, cfg.norm_eps, backend)
                                    for _ in range(n_layers))
        self.final = FinalLayer(d, cfg.patch_size ** 2 * out_channels(cfg), cfg.norm_eps, backend)
        # Set from outside (the loop) to trade compute for activation memory.
        self.activation_checkpointing = False
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The DiT repository's init: xavier-uniform linears (qkv as one fused matrix) and patch projection
        (as the linear it is), zero biases, normal(0.02) timestep MLP and label table, zero adaLN
        modulations and output layer (adaLN-Zero)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.proj.bias)
        nn.init.normal_(self.label_embed.weight, std=0.02)
        nn.init.normal_(self.t_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embed.mlp[2].weight, std=0.02)
        for layer in [b.modulation for b in self.blocks] + [self.final.modulation, self.final.linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W), t (B,) float in [0, 1000), y (B,) int64 (num_classes: null) -> (B, C_out, H, W)."""
        cfg = self.cfg
        side, p, c_out = cfg.input_size, cfg.patch_size, out_channels(cfg)
        if x.dim() != 4 or tuple(x.shape[1:]) != (cfg.in_channels, side, side):
            raise ValueError(f"DiT expects x of shape (B, {cfg.in_channels}, {side}, {side}), "
                             f"got {tuple(x.shape)}")
        h = self.patch_embed(x)
        c = F.silu(self.t_embed(t, h.dtype) + self.label_embed(y))  # every consumer applies SiLU first
        for block in self.blocks:
            if self.activation_checkpointing and self.training:
                h = checkpoint(block, h, c, use_reentrant=False)
            else:
                h = block(h, c)
        h = self.final(h, c)
        g = side // p
        # (B, T, p*p*C_out) with token (row, col) and values (p_row, p_col, channel) -> (B, C_out, H, W).
        return h.view(-1, g, g, p, p, c_out).permute(0, 5, 1, 3, 2, 4).reshape(-1, c_out, side, side)


def _weights(modules) -> int:
    return sum(m.weight.numel() for m in modules)


def count_parameters(model: DiT) -> dict:
    """Trainable parameters; non-embedding ones exclude the class table (the fixed position table is a
    buffer, never a parameter). `matmul_per_token` / `matmul_per_image` split the matrix-product weights
    by how often they run: on every token (patches, attention, MLP, output) or once per image (timestep
    MLP and the adaLN modulations, applied to the conditioning vector), for the FLOPs count."""
    total = sum(p.numel() for p in model.parameters())
    per_token = [model.patch_embed.proj, model.final.linear]
    per_image = [model.t_embed.mlp[0], model.t_embed.mlp[2], model.final.modulation]
    for b in model.blocks:
        per_token += [b.attn.qkv, b.attn.proj, b.mlp.up_proj, b.mlp.down_proj]
        per_image.append(b.modulation)
    return {"params": total, "params_non_embedding": total - model.label_embed.weight.numel(),
            "pos_embed": model.patch_embed.pos_embed.numel(),
            "matmul_per_token": _weights(per_token), "matmul_per_image": _weights(per_image)}


def flops_per_image(cfg: DiTConfig, counts: dict, workload: dict) -> float:
    """Training FLOPs per image: 6 N_tok T + 6 N_img + 12 L d T^2, T = (input_size / patch_size)^2 tokens.

    Forward 2 FLOPs per weight per row it multiplies, backward 4 (Kaplan et al. 2020): N_tok are the
    matmul weights applied to all T tokens (patch projection, qkv, attention output, MLP, output layer),
    N_img those applied once to the image's conditioning vector (timestep MLP, adaLN modulations: a third
    of DiT's weights, so counting them per token would overstate the work by ~50%). Attention scores and
    the weighted sum cost 2 T^2 d each per layer forward, x3 for training. Biases, norms and softmax are
    left out. Forward MACs (FLOPs / 6) reproduce the paper's Gflops, e.g. DiT-XL/2 118.6."""
    d, n_layers, _ = dims(cfg)
    t = tokens(cfg)
    return 6.0 * (counts["matmul_per_token"] * t + counts["matmul_per_image"]) + 12.0 * n_layers * d * t * t


register(Family(name="dit", config=DiTConfig, build=DiT, count_parameters=count_parameters,
                flops_per_unit=flops_per_image))
