"""GPT-2 checkpoints <-> our `gpt2` preset.

Two layout differences: GPT-2's projections are `Conv1D` modules whose weight is stored (in, out), the
transpose of nn.Linear's; and q, k, v are one fused `c_attn` of width 3 * d_model (q first). Import
transposes and splits; export re-fuses and transposes back (buffering one block's q/k/v until all three
have come, so a caller may hand tensors over one at a time). The `attn.bias` / `attn.masked_bias` buffers
(the causal mask) that old checkpoints saved are skipped. Released files often lack the `transformer.`
prefix (they were saved from GPT2Model); both spellings load.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from transformers import GPT2Config

from pretrain.errors import CheckpointError
from pretrain.hub.adapter import Adapter, Named, register
from pretrain.models.transformer import d_ff, head_dim, n_kv_heads

_TOP = {"embed": "transformer.wte", "pos_embed": "transformer.wpe", "norm": "transformer.ln_f",
        "lm_head": "lm_head"}
_BLOCK = {"attn_norm": "ln_1", "mlp_norm": "ln_2", "attn.o_proj": "attn.c_proj", "mlp.up_proj": "mlp.c_fc",
          "mlp.down_proj": "mlp.c_proj", "attn.q_proj": "attn.c_attn", "attn.k_proj": "attn.c_attn",
          "attn.v_proj": "attn.c_attn"}
_TOP_INV = {v: k for k, v in _TOP.items()}
_BLOCK_INV = {v: k for k, v in _BLOCK.items() if not k.startswith("attn.") or k == "attn.o_proj"}
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_QKV = ("q_proj", "k_proj", "v_proj")
# Both are the tanh approximation, as ours is (F.gelu(approximate="tanh")).
_TANH_GELU = ("gelu_new", "gelu_pytorch_tanh")


def _to_hf_name(ours: str) -> str:
    parts = ours.split(".")
    if parts[0] == "blocks" and len(parts) >= 3:
        for sub in (".".join(parts[2:4]), parts[2]):
            if sub in _BLOCK:
                rest = parts[2 + len(sub.split(".")):]
                return ".".join(["transformer.h", parts[1], _BLOCK[sub], *rest])
    if parts[0] in _TOP:
        return ".".join([_TOP[parts[0]], *parts[1:]])
    raise CheckpointError(f"export: {ours} has no Hugging Face GPT-2 name")


def _to_our_name(hf: str) -> str:
    parts = hf.split(".")
    if parts[:2] == ["transformer", "h"] and len(parts) >= 4:
        for sub in (".".join(parts[3:5]), parts[3]):
            if sub in _BLOCK_INV:
                rest = parts[3 + len(sub.split(".")):]
                return ".".join(["blocks", parts[2], _BLOCK_INV[sub], *rest])
    for prefix, ours in _TOP_INV.items():
        if hf.startswith(prefix + "."):
            return ours + hf[len(prefix):]
    raise CheckpointError(f"tensor {hf} is not part of a GPT-2 model")


class GPT2Adapter(Adapter):
    model_types = ("gpt2",)
    architectures = ("GPT2LMHeadModel",)
    ignored = ("attn.bias", "attn.masked_bias")

    def normalise_name(self, hf_name: str) -> str:
        return hf_name if hf_name.startswith(("transformer.", "lm_head.")) else "transformer." + hf_name

    def model_config(self, hf: Any, where: str, max_seq_len: int | None = None) -> dict:
        if hf.activation_function not in _TANH_GELU:
            raise CheckpointError(f"{where}: activation_function {hf.activation_function!r} is not supported "
                                  f"({' or '.join(_TANH_GELU)})")
        for field, value in {"scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
                             "add_cross_attention": False}.items():
            if bool(getattr(hf, field, value)) != value:
                raise CheckpointError(f"{where}: {field} {getattr(hf, field)} is not supported ({value})")
        if max_seq_len is not None and max_seq_len != hf.n_positions:
            raise CheckpointError(f"{where}: max_seq_len {max_seq_len} differs from n_positions "
                                  f"{hf.n_positions}, the size of GPT-2's learned position table")
        return {
            "type": "gpt2", "n_layers": hf.n_layer, "d_model": hf.n_embd, "n_heads": hf.n_head,
            "d_ff": hf.n_inner or 4 * hf.n_embd, "vocab_size": hf.vocab_size, "max_seq_len": hf.n_positions,
            "norm_eps": hf.layer_norm_epsilon, "tie_embeddings": bool(hf.tie_word_embeddings),
        }

    def exports(self, cfg: Any) -> bool:
        return cfg.type == "gpt2"

    def hf_config(self, cfg: Any) -> Any:
        wanted = {"norm": "layernorm", "position": "learned", "mlp": "gelu", "bias": True, "causal": True}
        for field, value in wanted.items():
            if getattr(cfg, field) != value:
                raise CheckpointError(f"export: model.{field} {getattr(cfg, field)!r} has no Hugging Face "
                                      f"GPT-2 equivalent ({value!r})")
        plain_heads = n_kv_heads(cfg) == cfg.n_heads and head_dim(cfg) * cfg.n_heads == cfg.d_model
        if cfg.qkv_bias is False or not plain_heads:
            raise CheckpointError("export: GPT-2 has q/k/v biases, no grouped-query attention and head_dim = "
                                  "d_model / n_heads (model.qkv_bias, n_kv_heads, head_dim)")
        hf = GPT2Config(
            vocab_size=cfg.vocab_size, n_positions=cfg.max_seq_len, n_embd=cfg.d_model, n_layer=cfg.n_layers,
            n_head=cfg.n_heads, n_inner=d_ff(cfg), activation_function="gelu_new",
            layer_norm_epsilon=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings,
            # Not GPT-2's 50256: the export sets them from the tokenizer (hf_write).
            bos_token_id=None, eos_token_id=None, pad_token_id=None,
        )
        hf.architectures = ["GPT2LMHeadModel"]
        return hf

    def hf_module(self, cfg: Any, ours: str) -> str:
        return _to_hf_name(ours)

    def to_hf(self, cfg: Any, tensors: Iterable[Named]) -> Iterator[Named]:
        pending: dict[tuple[str, str], dict[str, torch.Tensor]] = {}  # (block, weight|bias) -> q/k/v so far
        for name, t in tensors:
            if cfg.tie_embeddings and name == "lm_head.weight":
                continue  # the tied head is embed.weight; HF leaves it out too
            parts = name.split(".")
            if parts[0] == "blocks" and len(parts) == 5 and parts[2] == "attn" and parts[3] in _QKV:
                group = pending.setdefault((parts[1], parts[4]), {})
                group[parts[3]] = t
                if len(group) < 3:
                    continue
                del pending[(parts[1], parts[4])]
                fused = torch.cat([group[k] for k in _QKV], dim=0)
                hf = f"transformer.h.{parts[1]}.attn.c_attn.{parts[4]}"
                yield hf, (fused.t().contiguous() if parts[4] == "weight" else fused)
                continue
            hf = _to_hf_name(name)
            yield hf, (t.t().contiguous() if hf.endswith(_CONV1D) else t)
        if pending:
            (block, kind), group = next(iter(pending.items()))
            missing = [k for k in _QKV if k not in group]
            raise CheckpointError(f"export: blocks.{block}.attn.{missing[0]}.{kind} is missing (GPT-2 fuses "
                                  "q/k/v into one c_attn)")

    def to_ours(self, cfg: Any, hf_name: str, t: torch.Tensor) -> list[Named]:
        if hf_name.endswith(("attn.c_attn.weight", "attn.c_attn.bias")):
            block, kind = hf_name.split(".")[2], hf_name.rsplit(".", 1)[1]
            parts = (t.t() if kind == "weight" else t).chunk(3, dim=0)
            return [(f"blocks.{block}.attn.{k}.{kind}", p.contiguous())
                    for k, p in zip(_QKV, parts, strict=True)]
        return [(_to_our_name(hf_name), t.t().contiguous() if hf_name.endswith(_CONV1D) else t)]


register(GPT2Adapter())
