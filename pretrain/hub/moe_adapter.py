"""Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE checkpoints <-> our presets of the same names
(`pretrain/models/moe_presets.py`).

Attention, norms and embeddings are named as Llama's (`llama_adapter`), plus Qwen3's per-head and OLMoE's
whole-projection `q_norm` / `k_norm`. The experts differ in layout. Released checkpoints, and what transformers'
`save_pretrained` writes (5.x fuses the experts into 3-D tensors in memory only, and splits them again on save),
hold one SwiGLU per expert, `experts.<e>.{gate,up,down}_proj` (Mixtral: `block_sparse_moe.experts.<e>.w1` gate,
`w3` up, `w2` down), each an nn.Linear weight (out, in). Ours are two 3-D weights laid out for the grouped
product, (E, in, out): `experts.gate_up` (E, d, 2f: the gate's columns, then up's) and `experts.down` (E, f, d).
Import transposes and stacks them lazily (`LazyStack`: a ZeRO-3 rank reads only the experts its partition
covers); export slices them back. The router is HF's `gate`; Qwen2-MoE's `shared_expert` and
`shared_expert_gate` are our `shared` and `shared_gate`. For PEFT (`peft_target`) what counts is the model
transformers 5 holds in memory: the block is `mlp` in every family, and the router and the experts are raw
parameters (`mlp.gate.weight`, `mlp.experts.gate_up_proj` (E, 2f, d), `mlp.experts.down_proj` (E, d, f)).

Routing settings map one to one: `num_experts`, `num_experts_per_tok`, `norm_topk_prob` (Mixtral always
renormalises), `decoder_sparse_step` and a leading `mlp_only_layers` (our `every`, `first_dense`),
`router_aux_loss_coef`. What transformers would compute differently is refused in one line naming the field:
DeepSeek's latent attention (`kv_lora_rank`, `q_lora_rank`), OLMoE's `clip_qkv`, attention biases beside
Qwen2-MoE's q/k/v ones, dense layers other than the leading ones; on export, a router our families lack
(sigmoid scores, a balance bias). `capacity_factor` is a training setting: the export routes dropless.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import MixtralConfig, OlmoeConfig, Qwen2MoeConfig, Qwen3MoeConfig

from pretrain.errors import CheckpointError
from pretrain.hub.adapter import Adapter, Named, register
from pretrain.hub.llama_adapter import rope, rope_parameters, sliding_window, to_hf_name, to_our_name
from pretrain.hub.safetensors_io import LazyStack, LazyTensor
from pretrain.models import get_family
from pretrain.models.transformer import d_ff, head_dim, n_kv_heads


@dataclass(frozen=True)
class _Family:
    config: type  # transformers' config class
    architecture: str
    moe: str  # the MoE module inside a decoder layer
    proj: tuple[str, str, str]  # one expert's gate, up and down projections
    qk_norm: str  # our `qk_norm` for its attention
    fixed: dict = field(default_factory=dict)  # `model.moe` settings the family cannot change


_FAMILIES = {
    "mixtral": _Family(MixtralConfig, "MixtralForCausalLM", "block_sparse_moe", ("w1", "w3", "w2"), "none",
                       {"renormalize": True, "shared_width": 0, "every": 1, "first_dense": 0}),
    "qwen2_moe": _Family(Qwen2MoeConfig, "Qwen2MoeForCausalLM", "mlp", ("gate_proj", "up_proj", "down_proj"),
                         "none", {"shared_gate": True}),
    "qwen3_moe": _Family(Qwen3MoeConfig, "Qwen3MoeForCausalLM", "mlp", ("gate_proj", "up_proj", "down_proj"),
                         "head", {"shared_width": 0}),
    "olmoe": _Family(OlmoeConfig, "OlmoeForCausalLM", "mlp", ("gate_proj", "up_proj", "down_proj"), "full",
                     {"shared_width": 0, "every": 1, "first_dense": 0}),
}
_MOE_PARTS = {"router": "gate", "shared": "shared_expert", "shared_gate": "shared_expert_gate"}
_MOE_PARTS_INV = {v: k for k, v in _MOE_PARTS.items()}
_EXPERT_PARAMS = {"gate_up": "gate_up_proj", "down": "down_proj"}  # transformers 5's stacked experts, (E, out, in)
# Fields of DeepSeek-style configs that our attention and router cannot reproduce.
_UNSUPPORTED = {"kv_lora_rank": "DeepSeek's latent attention", "q_lora_rank": "DeepSeek's latent attention",
                "n_group": "grouped routing", "topk_group": "grouped routing"}


def _gate_up(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """One expert's (f, d) gate and up weights -> our (d, 2f) slice."""
    return torch.cat([gate.t(), up.t()], dim=1)


def _down(down: torch.Tensor) -> torch.Tensor:
    """One expert's (d, f) down weight -> our (f, d) slice."""
    return down.t()


def _first_dense(hf: Any, every: int, where: str) -> int:
    """Our `first_dense` from `mlp_only_layers`, which must name leading layers only (beside the sparse step)."""
    dense = sorted(set(getattr(hf, "mlp_only_layers", None) or ()))
    if not dense:
        return 0
    k, n = dense[-1] + 1, hf.num_hidden_layers
    theirs = [i not in dense and (i + 1) % every == 0 for i in range(n)]
    if theirs != [i >= k and (i + 1) % every == 0 for i in range(n)]:
        raise CheckpointError(f"{where}: mlp_only_layers {dense} is not supported (dense layers must lead, as "
                              "model.moe.first_dense, besides decoder_sparse_step)")
    return k


class MoeAdapter(Adapter):
    model_types = tuple(_FAMILIES)
    architectures = tuple(f.architecture for f in _FAMILIES.values())
    grouped = True

    def model_config(self, hf: Any, where: str, max_seq_len: int | None = None) -> dict:
        fam = _FAMILIES[hf.model_type]
        for name, what in _UNSUPPORTED.items():
            if getattr(hf, name, None):
                raise CheckpointError(f"{where}: {name} {getattr(hf, name)} ({what}) is not supported")
        if hf.hidden_act != "silu":
            raise CheckpointError(f"{where}: hidden_act {hf.hidden_act!r} is not supported (silu)")
        if getattr(hf, "attention_bias", False):
            raise CheckpointError(f"{where}: attention_bias true is not supported")
        if getattr(hf, "clip_qkv", None) is not None:
            raise CheckpointError(f"{where}: clip_qkv {hf.clip_qkv} is not supported (none)")
        theta, scaling = rope(hf, where)
        context = max_seq_len or hf.max_position_embeddings
        sliding_window(hf, context, where)
        heads = hf.num_attention_heads
        hd = getattr(hf, "head_dim", None) or hf.hidden_size // heads
        if fam.qk_norm == "full" and hd * heads != hf.hidden_size:
            raise CheckpointError(f"{where}: head_dim {hd} is not supported (hidden_size / num_attention_heads: "
                                  "OLMoE normalises q over hidden_size)")
        if not hf.num_experts:
            raise CheckpointError(f"{where}: num_experts {hf.num_experts} is not supported (a dense model)")
        every = int(getattr(hf, "decoder_sparse_step", 1) or 1)
        expert = getattr(hf, "moe_intermediate_size", None) or hf.intermediate_size
        shared = int(getattr(hf, "shared_expert_intermediate_size", 0) or 0)
        # The preset's own defaults (OLMoE's z-loss) for what config.json does not say.
        moe = get_family(hf.model_type).config.model_validate({}).moe.model_dump()
        moe.update(
            n_experts=hf.num_experts, top_k=hf.num_experts_per_tok, d_expert=expert, shared_width=shared,
            shared_gate=bool(shared), renormalize=hf.model_type == "mixtral" or bool(hf.norm_topk_prob),
            aux_loss=float(hf.router_aux_loss_coef), every=every, first_dense=_first_dense(hf, every, where),
        )
        return {
            "type": hf.model_type, "n_layers": hf.num_hidden_layers, "d_model": hf.hidden_size, "n_heads": heads,
            "n_kv_heads": hf.num_key_value_heads or heads,
            "head_dim": None if hd * heads == hf.hidden_size else hd,
            "d_ff": hf.intermediate_size, "vocab_size": hf.vocab_size, "max_seq_len": context,
            "norm_eps": hf.rms_norm_eps, "rope_theta": theta, "rope_scaling": scaling, "bias": False,
            "qkv_bias": bool(getattr(hf, "qkv_bias", True)) if hf.model_type == "qwen2_moe" else None,
            "tie_embeddings": bool(hf.tie_word_embeddings), "qk_norm": fam.qk_norm, "moe": moe,
        }

    def exports(self, cfg: Any) -> bool:
        return cfg.type in _FAMILIES

    def _check_exportable(self, cfg: Any, fam: _Family) -> None:
        name = fam.architecture.removesuffix("ForCausalLM")
        wanted = {"norm": "rmsnorm", "position": "rope", "mlp": "swiglu", "causal": True, "bias": False,
                  "qk_norm": fam.qk_norm}
        for key, value in wanted.items():
            if getattr(cfg, key) != value:
                raise CheckpointError(f"export: model.{key} {getattr(cfg, key)!r} has no Hugging Face {name} "
                                      f"equivalent ({value!r})")
        if cfg.qkv_bias and cfg.type != "qwen2_moe":
            raise CheckpointError(f"export: model.qkv_bias true has no Hugging Face {name} equivalent (q/k/v "
                                  "biases: qwen2_moe)")
        if cfg.moe is None:
            raise CheckpointError("export: model.moe is not set (a dense model exports as model.type llama)")
        for key, value in {"score": "softmax", "bias_balance": 0.0, **fam.fixed}.items():
            if getattr(cfg.moe, key) != value:
                raise CheckpointError(f"export: model.moe.{key} {getattr(cfg.moe, key)!r} has no Hugging Face "
                                      f"{name} equivalent ({value!r})")
        if fam.qk_norm == "full" and head_dim(cfg) * cfg.n_heads != cfg.d_model:
            raise CheckpointError(f"export: model.head_dim {head_dim(cfg)} has no Hugging Face {name} equivalent "
                                  "(d_model / n_heads)")

    def hf_config(self, cfg: Any) -> Any:
        fam = _FAMILIES[cfg.type]
        self._check_exportable(cfg, fam)
        m = cfg.moe
        expert = m.d_expert or d_ff(cfg)
        common = dict(
            vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
            num_attention_heads=cfg.n_heads, num_key_value_heads=n_kv_heads(cfg),
            max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, hidden_act="silu",
            tie_word_embeddings=cfg.tie_embeddings, rope_parameters=rope_parameters(cfg),
            num_experts_per_tok=m.top_k, router_aux_loss_coef=m.aux_loss,
            # Not the classes' defaults (Mixtral's 1 and 2): the export sets them from the tokenizer (hf_write).
            bos_token_id=None, eos_token_id=None, pad_token_id=None,
        )
        if cfg.type == "mixtral":
            hf = MixtralConfig(**common, num_local_experts=m.n_experts, intermediate_size=expert,
                               head_dim=head_dim(cfg), sliding_window=None)
        elif cfg.type == "olmoe":
            hf = OlmoeConfig(**common, num_experts=m.n_experts, intermediate_size=expert,
                             norm_topk_prob=m.renormalize, attention_bias=False, clip_qkv=None)
        else:
            sparse = dict(num_experts=m.n_experts, moe_intermediate_size=expert, intermediate_size=d_ff(cfg),
                          norm_topk_prob=m.renormalize, decoder_sparse_step=m.every,
                          mlp_only_layers=list(range(m.first_dense)), use_sliding_window=False)
            if cfg.type == "qwen2_moe":
                hf = Qwen2MoeConfig(**common, **sparse, shared_expert_intermediate_size=m.shared_width,
                                    qkv_bias=bool(cfg.qkv_bias))
                if head_dim(cfg) * cfg.n_heads != cfg.d_model:
                    hf.head_dim = head_dim(cfg)  # its attention reads it when present
            else:
                hf = Qwen3MoeConfig(**common, **sparse, head_dim=head_dim(cfg), attention_bias=False)
        hf.architectures = [fam.architecture]
        return hf

    def hf_module(self, cfg: Any, ours: str) -> str:
        parts = ours.split(".")
        if parts[0] == "blocks" and len(parts) >= 4 and parts[2] == "mlp":
            if parts[3] in _MOE_PARTS:
                return ".".join(["model.layers", parts[1], _FAMILIES[cfg.type].moe, _MOE_PARTS[parts[3]], *parts[4:]])
            if parts[3] == "experts":
                raise CheckpointError(f"export: {ours} is stacked over the experts; Hugging Face has one module "
                                      "per expert")
        return to_hf_name(ours)

    def peft_target(self, cfg: Any, ours: str) -> tuple[str, str | None]:
        # transformers 5 names every family's MoE block `mlp` in memory (Mixtral's `block_sparse_moe` only on
        # disk) and holds the router and the experts as raw parameters: PEFT's `target_parameters`.
        parts = ours.split(".")
        if parts[0] == "blocks" and len(parts) >= 4 and parts[2] == "mlp" and parts[3] in {*_MOE_PARTS, "experts"}:
            layer = f"model.layers.{parts[1]}.mlp"
            if parts[3] == "experts":
                return f"{layer}.experts", _EXPERT_PARAMS[parts[4]]
            if parts[3] == "router":
                return f"{layer}.gate", "weight"
            return ".".join([layer, _MOE_PARTS[parts[3]], *parts[4:]]), None
        return self.hf_module(cfg, ours), None

    def to_hf(self, cfg: Any, tensors: Iterable[Named]) -> Iterator[Named]:
        fam = _FAMILIES[cfg.type]
        gate, up, down = fam.proj
        for name, t in tensors:
            parts = name.split(".")
            if (cfg.tie_embeddings and name == "lm_head.weight") or parts[-1] == "balance":
                continue  # the tied head is embed.weight; the balance bias is unused (bias_balance 0)
            if len(parts) == 5 and parts[0] == "blocks" and parts[2:4] == ["mlp", "experts"]:
                prefix = f"model.layers.{parts[1]}.{fam.moe}.experts"
                if parts[4] == "gate_up":
                    f = t.shape[-1] // 2
                    for e in range(t.shape[0]):
                        yield f"{prefix}.{e}.{gate}.weight", t[e, :, :f].t().contiguous()
                        yield f"{prefix}.{e}.{up}.weight", t[e, :, f:].t().contiguous()
                else:
                    for e in range(t.shape[0]):
                        yield f"{prefix}.{e}.{down}.weight", t[e].t().contiguous()
                continue
            yield self.hf_module(cfg, name), t

    def plan(self, cfg: Any, stored: dict[str, LazyTensor]) -> Iterator[tuple[str, LazyTensor | LazyStack]]:
        fam = _FAMILIES[cfg.type]
        gate, up, down = fam.proj
        expert = re.compile(rf"model\.layers\.(\d+)\.{fam.moe}\.experts\.(\d+)\.({gate}|{up}|{down})\.weight")
        moe_part = re.compile(rf"model\.layers\.(\d+)\.{fam.moe}\.(gate|shared_expert|shared_expert_gate)\.(.+)")
        layers: dict[int, dict[tuple[int, str], LazyTensor]] = {}
        for name, t in stored.items():
            if m := expert.fullmatch(name):
                layers.setdefault(int(m[1]), {})[(int(m[2]), m[3])] = t
            elif m := moe_part.fullmatch(name):
                yield f"blocks.{m[1]}.mlp.{_MOE_PARTS_INV[m[2]]}.{m[3]}", t
            else:
                yield to_our_name(name), t
        for i, got in sorted(layers.items()):
            f, d = got[(0, gate)].shape
            experts = range(cfg.moe.n_experts)
            yield (f"blocks.{i}.mlp.experts.gate_up",
                   LazyStack(tuple((got[(e, gate)], got[(e, up)]) for e in experts), _gate_up, (d, 2 * f)))
            yield f"blocks.{i}.mlp.experts.down", LazyStack(tuple((got[(e, down)],) for e in experts), _down, (f, d))


register(MoeAdapter())
