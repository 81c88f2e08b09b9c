"""Import of a GGUF file (llama.cpp's format): metadata -> our `llama` config, dequantised tensors -> our
names, the embedded tokenizer -> a tokenizer directory.

Read with `gguf.GGUFReader` (a memory map; nothing is executed) and dequantised per tensor with
`gguf.quants.dequantize`, one tensor in memory at a time. GGUF stores dimensions fastest-first, so a
(rows, cols) weight has shape [cols, rows] there. llama.cpp's converter permutes the rows of Llama's q and
k projections (per head, from rotate-half pairs (i, i + D/2) to interleaved pairs (2i, 2i + 1), the layout
its rope kernel wants); reading undoes it, as transformers' GGUF loader does. Qwen2's converter does not
permute. Architectures other than llama and qwen2 are refused, naming the architecture.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pretrain.errors import CheckpointError, first_line
from pretrain.hub.families import adapter_for, expected_shapes, our_config
from pretrain.hub.released import Released, check_shapes, check_vocab
from pretrain.hub.tokenizer_io import gguf_tokenizer_dir

SUPPORTED = ("llama", "qwen2")
_BOS = "tokenizer.ggml.bos_token_id"
_TOP = {"token_embd": "embed", "output_norm": "norm", "output": "lm_head"}
_BLOCK = {"attn_norm": "attn_norm", "attn_q": "attn.q_proj", "attn_k": "attn.k_proj", "attn_v": "attn.v_proj",
          "attn_output": "attn.o_proj", "ffn_norm": "mlp_norm", "ffn_gate": "mlp.gate_proj",
          "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def _our_name(name: str) -> str | None:
    parts = name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in _BLOCK:
        return f"blocks.{parts[1]}.{_BLOCK[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in _TOP:
        return f"{_TOP[parts[0]]}.{parts[1]}"
    return None


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's `permute(weights, n_head, n_head_kv)` on q/k rows (weights or biases)."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class _Meta:
    """Typed access to the metadata fields, with one-line errors naming the key: a missing one, or a value
    of the wrong type (a string, a list or a fraction where a count belongs; a count below its minimum)."""

    def __init__(self, reader: Any, where: str):
        self.reader, self.where = reader, where

    def get(self, key: str, default: Any = ...) -> Any:
        field = self.reader.fields.get(key)
        if field is None:
            if default is ...:
                raise CheckpointError(f"{self.where}: metadata {key} is missing")
            return default
        try:
            return field.contents()
        except Exception as e:  # a field whose declared type and bytes disagree
            raise CheckpointError(f"{self.where}: metadata {key} does not read ({first_line(e)})") from None

    def integer(self, key: str, default: Any = ..., minimum: int = 0) -> int:
        """An integer field, at least `minimum` (a whole float is taken: some converters write those)."""
        value = self.get(key, default)
        whole = isinstance(value, float) and value.is_integer()
        if isinstance(value, bool) or not (isinstance(value, int) or whole):
            raise CheckpointError(f"{self.where}: metadata {key} is {_shown(value)}, not an integer")
        if value < minimum:
            raise CheckpointError(f"{self.where}: metadata {key} is {int(value)}; it must be at least {minimum}")
        return int(value)

    def number(self, key: str, default: Any = ...) -> float:
        """A finite number."""
        value = self.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise CheckpointError(f"{self.where}: metadata {key} is {_shown(value)}, not a finite number")
        return float(value)


def _shown(value: Any) -> str:
    """A metadata value as one short line (repr escapes newlines)."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _model_fields(meta: _Meta, arch: str, tensor_names: set[str], n_tokens: int,
                  max_seq_len: int | None) -> dict:
    a = arch
    heads = meta.integer(f"{a}.attention.head_count", minimum=1)  # divides below
    d = meta.integer(f"{a}.embedding_length", minimum=1)
    hd = meta.integer(f"{a}.attention.key_length", d // heads, minimum=1)
    rope_dim = meta.integer(f"{a}.rope.dimension_count", hd)
    if rope_dim != hd:
        raise CheckpointError(f"{meta.where}: {a}.rope.dimension_count {rope_dim} is not the head size {hd} "
                              "(partial rotary is not supported)")
    scaling = meta.get(f"{a}.rope.scaling.type", "none")
    if scaling not in ("none", None) or "rope_freqs.weight" in tensor_names:
        raise CheckpointError(f"{meta.where}: rope scaling ({a}.rope.scaling.type {_shown(scaling)} or a "
                              "rope_freqs tensor) is not supported in GGUF; import the HF checkpoint")
    context = meta.integer(f"{a}.context_length", minimum=1)
    return {
        "type": "llama", "n_layers": meta.integer(f"{a}.block_count", minimum=1), "d_model": d, "n_heads": heads,
        "n_kv_heads": meta.integer(f"{a}.attention.head_count_kv", heads, minimum=1),
        "head_dim": None if hd * heads == d else hd,
        "d_ff": meta.integer(f"{a}.feed_forward_length", minimum=1),
        "vocab_size": meta.integer(f"{a}.vocab_size", n_tokens or ..., minimum=1),  # missing: no tokens either
        "max_seq_len": max_seq_len or context,
        "norm_eps": meta.number(f"{a}.attention.layer_norm_rms_epsilon"),
        "rope_theta": meta.number(f"{a}.rope.freq_base", 10000.0),
        "bias": False, "qkv_bias": True if arch == "qwen2" else None,
        "tie_embeddings": "output.weight" not in tensor_names,
    }


def read_gguf(path: Path, max_seq_len: int | None = None) -> Released:
    import gguf

    where = str(path)
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:
        raise CheckpointError(f"{where}: not a GGUF file ({first_line(e)})") from None
    meta = _Meta(reader, where)
    arch = meta.get("general.architecture")
    if not isinstance(arch, str) or arch not in SUPPORTED:
        raise CheckpointError(f"{where}: GGUF architecture {arch!r} is not supported "
                              f"({', '.join(SUPPORTED)})")
    tensors_by_name = {t.name: t for t in reader.tensors}
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    n_tokens = len(tokens.data) if tokens is not None else 0
    cfg = our_config(_model_fields(meta, arch, set(tensors_by_name), n_tokens, max_seq_len), where)
    adapter = adapter_for(arch, where)

    ours_shapes, _ = expected_shapes(adapter, cfg)
    found = {}
    for name, t in tensors_by_name.items():
        ours = _our_name(name)
        if ours is None:
            raise CheckpointError(f"{where}: unexpected tensor {name} (not part of a {arch} model)")
        found[ours] = (tuple(int(x) for x in reversed(t.shape.tolist())), where)
    check_shapes(found, ours_shapes, "the GGUF metadata", where)
    if n_tokens:
        check_vocab(where, n_tokens - 1, cfg.vocab_size)
    tokenizer_dir = gguf_tokenizer_dir(path) if n_tokens else None

    eos = [meta.integer(k) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")
           if meta.get(k, None) is not None]
    bos = meta.integer(_BOS) if meta.get(_BOS, None) is not None else None
    heads, kv_heads = cfg.n_heads, cfg.n_kv_heads or cfg.n_heads

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for name, t in tensors_by_name.items():
            shape = tuple(int(x) for x in reversed(t.shape.tolist()))
            w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)
            kind = name.split(".")[2] if name.startswith("blk.") else ""
            if arch == "llama" and kind in ("attn_q", "attn_k"):
                w = _unpermute(w, heads if kind == "attn_q" else kv_heads)
            # F32 tensors dequantise to a view of the memory map: those are copied (others are new arrays).
            if np.may_share_memory(w, t.data) or not w.flags.c_contiguous or w.dtype != np.float32:
                w = np.array(w, dtype=np.float32, order="C", copy=True)
            x = torch.from_numpy(w)
            del w  # no reference outlives the yield: one tensor alive at a time
            yield _our_name(name), x
            del x

    hf_config = adapter.hf_config(cfg).to_dict()
    return Released(
        model_cfg=cfg, source=where, hf_config=hf_config, tokenizer_dir=tokenizer_dir,
        eos_token_ids=tuple(dict.fromkeys(eos)), bos_token_id=bos,
        chat_template=meta.get("tokenizer.chat_template", None), _tensors=tensors,
    )
