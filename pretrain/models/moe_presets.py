"""Mixture-of-experts presets of the Transformer family: Llama-style blocks (RMSNorm, RoPE, no biases, untied) whose
feed-forward blocks are mixtures of experts (`pretrain/models/moe.py`). Each preset sets the routing and attention of
its released family; sizes (layers, width, experts, top-k) are the config's to choose:

| `model.type` | router | top-k weights | shared expert | attention |
|---|---|---|---|---|
| mixtral | softmax | renormalised | none | GQA |
| qwen2_moe | softmax | as scored | one, sigmoid-gated | q/k/v biases |
| qwen3_moe | softmax | renormalised | none | per-head q/k RMSNorm |
| olmoe | softmax | as scored | none | q/k RMSNorm over the projection |
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from pretrain.models.moe import MoeConfig
from pretrain.models.transformer import LlamaConfig, register_preset


class _MoePreset(LlamaConfig):
    """A preset's routing defaults stay when a config sets only some `model.moe` keys (`moe: {n_experts: 16}` keeps
    Qwen2-MoE's gated shared expert); `moe: null` makes the model dense."""

    MOE: ClassVar[dict] = {}
    moe: MoeConfig | None = None

    @field_validator("moe", mode="before")
    @classmethod
    def _preset_routing(cls, v):
        return {**cls.MOE, **v} if isinstance(v, dict) else v

    @model_validator(mode="before")
    @classmethod
    def _default_moe(cls, data):
        if isinstance(data, dict) and "moe" not in data:
            return {**data, "moe": dict(cls.MOE)}
        return data


class MixtralConfig(_MoePreset):
    MOE: ClassVar[dict] = {"n_experts": 8, "top_k": 2, "aux_loss": 0.001}
    type: Literal["mixtral"] = Field("mixtral", description="Mixtral preset: Llama blocks, 8 experts, top-2, renormalised")
    rope_theta: float = 1e6


class Qwen2MoeConfig(_MoePreset):
    MOE: ClassVar[dict] = {"n_experts": 8, "top_k": 2, "renormalize": False, "shared_width": 512, "shared_gate": True,
                           "aux_loss": 0.001}
    type: Literal["qwen2_moe"] = Field("qwen2_moe", description="Qwen2-MoE preset: q/k/v biases, a sigmoid-gated shared expert")
    qkv_bias: bool | None = True
    norm_eps: float = 1e-6


class Qwen3MoeConfig(_MoePreset):
    MOE: ClassVar[dict] = {"n_experts": 8, "top_k": 2, "aux_loss": 0.001}
    type: Literal["qwen3_moe"] = Field("qwen3_moe", description="Qwen3-MoE preset: per-head q/k RMSNorm, renormalised top-k")
    qk_norm: Literal["none", "head", "full"] = "head"
    norm_eps: float = 1e-6


class OlmoeConfig(_MoePreset):
    MOE: ClassVar[dict] = {"n_experts": 8, "top_k": 2, "renormalize": False, "aux_loss": 0.01, "z_loss": 0.001}
    type: Literal["olmoe"] = Field("olmoe", description="OLMoE preset: q/k RMSNorm over the projection, top-k as scored")
    qk_norm: Literal["none", "head", "full"] = "full"


for _cls in (MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig, OlmoeConfig):
    register_preset(_cls)
