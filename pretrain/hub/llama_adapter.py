"""Llama, Mistral and Qwen2 checkpoints <-> our `llama` preset.

The three share one layout (RMSNorm, rotary, SwiGLU, grouped-query attention) and differ in settings:
Qwen2 has biases on q/k/v only (our `qkv_bias`), Mistral may use sliding-window attention (refused when the
window is shorter than the context we would train at: our attention is full causal), Llama 3.1 scales its
rotary frequencies (`rope_scaling` type llama3). config.json is read through transformers' own config class,
so defaults, and the old spelling (`rope_theta` + `rope_scaling`) beside the new (`rope_parameters`), mean
what transformers says they mean. Tensors need no layout change, only names.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from transformers import LlamaConfig, Qwen2Config

from pretrain.errors import CheckpointError
from pretrain.hub.adapter import Adapter, Named, register
from pretrain.models.transformer import d_ff, head_dim, n_kv_heads

# Our module names -> HF's, top level and inside a block; the submodules below (q_proj, gate_proj, ...) agree.
_TOP = {"embed": "model.embed_tokens", "norm": "model.norm", "lm_head": "lm_head"}
_BLOCK = {"attn_norm": "input_layernorm", "attn": "self_attn", "mlp_norm": "post_attention_layernorm",
          "mlp": "mlp"}
_TOP_INV = {v: k for k, v in _TOP.items()}
_BLOCK_INV = {v: k for k, v in _BLOCK.items()}
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def to_hf_name(ours: str) -> str:
    parts = ours.split(".")
    if parts[0] == "blocks" and len(parts) >= 3 and parts[2] in _BLOCK:
        return ".".join(["model.layers", parts[1], _BLOCK[parts[2]], *parts[3:]])
    if parts[0] in _TOP:
        return ".".join([_TOP[parts[0]], *parts[1:]])
    raise CheckpointError(f"export: {ours} has no Hugging Face Llama name")


def to_our_name(hf: str) -> str:
    parts = hf.split(".")
    if parts[:2] == ["model", "layers"] and len(parts) >= 4 and parts[3] in _BLOCK_INV:
        return ".".join(["blocks", parts[2], _BLOCK_INV[parts[3]], *parts[4:]])
    for prefix, ours in _TOP_INV.items():
        if hf.startswith(prefix + "."):
            return ours + hf[len(prefix):]
    raise CheckpointError(f"tensor {hf} is not part of a Llama model")


def rope(hf: Any, where: str) -> tuple[float, dict | None]:
    """(rope_theta, our rope_scaling or None) from transformers' normalised `rope_parameters`."""
    rp = dict(getattr(hf, "rope_parameters", None) or {})
    rope_type = rp.get("rope_type", rp.get("type", "default"))
    theta = float(rp.get("rope_theta", getattr(hf, "rope_theta", 10000.0)))
    if rp.get("partial_rotary_factor", 1.0) != 1.0:
        raise CheckpointError(f"{where}: partial_rotary_factor {rp['partial_rotary_factor']} is not "
                              "supported (1.0)")
    if rope_type in (None, "default"):
        return theta, None
    if rope_type != "llama3":
        raise CheckpointError(f"{where}: rope_scaling type {rope_type!r} is not supported (llama3 or none)")
    missing = [k for k in _LLAMA3_KEYS if k not in rp]
    if missing:
        raise CheckpointError(f"{where}: rope_scaling type llama3 lacks {missing[0]}")
    return theta, {"type": "llama3", **{k: rp[k] for k in _LLAMA3_KEYS}}


def rope_parameters(cfg: Any) -> dict:
    """transformers' `rope_parameters` of our rotary settings (export)."""
    if cfg.rope_scaling is None:
        return {"rope_type": "default", "rope_theta": cfg.rope_theta}
    return {**cfg.rope_scaling.model_dump(exclude={"type"}), "rope_type": "llama3", "rope_theta": cfg.rope_theta}


def sliding_window(hf: Any, max_seq_len: int, where: str) -> None:
    """Refuse a sliding window shorter than the context: within it, windowed attention is full attention."""
    window = getattr(hf, "sliding_window", None)
    layer_types = getattr(hf, "layer_types", None)
    if hf.model_type in ("qwen2", "qwen2_moe"):  # they name the window but use it only with use_sliding_window
        active = bool(getattr(hf, "use_sliding_window", False)) or "sliding_attention" in (layer_types or ())
    else:
        active = window is not None
    if active and window is not None and window < max_seq_len:
        raise CheckpointError(f"{where}: sliding_window {window} is shorter than model.max_seq_len "
                              f"{max_seq_len} (max_position_embeddings); read it with max_seq_len <= "
                              f"{window}")


class LlamaAdapter(Adapter):
    model_types = ("llama", "mistral", "qwen2")
    architectures = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
    ignored = ("rotary_emb.inv_freq",)  # a buffer that old checkpoints saved
    renames_only = True

    def model_config(self, hf: Any, where: str, max_seq_len: int | None = None) -> dict:
        if hf.hidden_act != "silu":
            raise CheckpointError(f"{where}: hidden_act {hf.hidden_act!r} is not supported (silu)")
        if hf.model_type == "qwen2":
            bias, qkv_bias = False, True
        else:
            attention_bias = bool(getattr(hf, "attention_bias", False))
            mlp_bias = bool(getattr(hf, "mlp_bias", False))
            if attention_bias != mlp_bias:
                field, other = ("attention_bias", "mlp_bias")[::1 if attention_bias else -1]
                raise CheckpointError(f"{where}: {field} true without {other} is not supported (biases on "
                                      "all projections or none)")
            bias, qkv_bias = attention_bias, None
        theta, scaling = rope(hf, where)
        context = max_seq_len or hf.max_position_embeddings
        sliding_window(hf, context, where)
        heads = hf.num_attention_heads
        hd = getattr(hf, "head_dim", None) or hf.hidden_size // heads
        return {
            "type": "llama", "n_layers": hf.num_hidden_layers, "d_model": hf.hidden_size, "n_heads": heads,
            "n_kv_heads": hf.num_key_value_heads or heads,
            "head_dim": None if hd * heads == hf.hidden_size else hd,
            "d_ff": hf.intermediate_size, "vocab_size": hf.vocab_size, "max_seq_len": context,
            "norm_eps": hf.rms_norm_eps, "rope_theta": theta, "rope_scaling": scaling, "bias": bias,
            "qkv_bias": qkv_bias, "tie_embeddings": bool(hf.tie_word_embeddings),
        }

    def exports(self, cfg: Any) -> bool:
        return cfg.type == "llama"

    def _check_exportable(self, cfg: Any) -> None:
        wanted = {"norm": "rmsnorm", "position": "rope", "mlp": "swiglu", "causal": True}
        for field, value in wanted.items():
            if getattr(cfg, field) != value:
                raise CheckpointError(f"export: model.{field} {getattr(cfg, field)!r} has no Hugging Face "
                                      f"Llama equivalent ({value!r})")
        if cfg.moe is not None or cfg.qk_norm != "none":
            field = "moe" if cfg.moe is not None else "qk_norm"
            raise CheckpointError(f"export: model.{field} has no Hugging Face Llama equivalent (export a mixture of "
                                  "experts as model.type mixtral, qwen2_moe, qwen3_moe or olmoe)")
        if cfg.bias and cfg.qkv_bias is False:
            raise CheckpointError("export: model.bias true with model.qkv_bias false has no Hugging Face "
                                  "equivalent")

    def hf_config(self, cfg: Any) -> Any:
        self._check_exportable(cfg)
        common = dict(
            vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=d_ff(cfg),
            num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
            num_key_value_heads=n_kv_heads(cfg),
            max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, hidden_act="silu",
            tie_word_embeddings=cfg.tie_embeddings, rope_parameters=rope_parameters(cfg),
            # Not the classes' defaults (Llama's 1 and 2): the export sets them from the tokenizer (hf_write).
            bos_token_id=None, eos_token_id=None, pad_token_id=None,
        )
        if not cfg.bias and cfg.qkv_bias:  # q/k/v biases only: Qwen2's layout
            hf = Qwen2Config(**common, use_sliding_window=False)
            if head_dim(cfg) * cfg.n_heads != cfg.d_model:
                hf.head_dim = head_dim(cfg)  # Qwen2's attention reads it when present
            hf.architectures = ["Qwen2ForCausalLM"]
            return hf
        hf = LlamaConfig(**common, attention_bias=cfg.bias, mlp_bias=cfg.bias, head_dim=head_dim(cfg))
        hf.architectures = ["LlamaForCausalLM"]
        return hf

    def hf_module(self, cfg: Any, ours: str) -> str:
        return to_hf_name(ours)

    def to_hf(self, cfg: Any, tensors: Iterable[Named]) -> Iterator[Named]:
        for name, t in tensors:
            if cfg.tie_embeddings and name == "lm_head.weight":
                continue  # the tied head is embed.weight; HF leaves it out too
            yield to_hf_name(name), t

    def to_ours(self, cfg: Any, hf_name: str, t: torch.Tensor) -> list[Named]:
        return [(to_our_name(hf_name), t)]


register(LlamaAdapter())
