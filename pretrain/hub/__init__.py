"""Released checkpoints in and out: Hugging Face directories (safetensors) and GGUF files.

    released = read_checkpoint("path/to/hf-dir" or "model.gguf")
    model = get_family(released.model_cfg.type).build(released.model_cfg)
    load_weights(model, released.iter_tensors())
    write_hf("out/", model_cfg, model.named_parameters(), tokenizer_dir=released.tokenizer_dir,
             eos_token_ids=released.eos_token_ids)

Families (HF `model_type`): llama, mistral, qwen2 -> our `llama` preset; gpt2 -> our `gpt2` preset; the
mixtures of experts mixtral, qwen2_moe, qwen3_moe, olmoe -> our presets of the same names. GGUF:
architectures llama and qwen2. What we cannot reproduce exactly is refused with a `CheckpointError` of one
line naming the file and the field or tensor; nothing read is executed or unpickled.
"""

from __future__ import annotations

import os
from pathlib import Path

# Light at import: a from-scratch run reaches load_weights (train/build.py) and must not pay for
# transformers (about a second). The readers, writers and adapters load on first use.
from pretrain.errors import CheckpointError
from pretrain.hub.families import hf_name
from pretrain.hub.load import load_weights
from pretrain.hub.released import Released


def __getattr__(name: str):
    if name == "write_hf":  # the writer imports transformers
        from pretrain.hub.hf_write import write_hf

        return write_hf
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["CheckpointError", "Released", "hf_name", "load_weights", "read_checkpoint", "write_hf"]


def read_checkpoint(path: str | os.PathLike, *, max_seq_len: int | None = None) -> Released:
    """A Hugging Face model directory (config.json + safetensors) or a `.gguf` file, checked against its
    config and ready to stream. `max_seq_len` replaces the checkpoint's context length (rotary families
    only), e.g. to train at 4096 a model whose sliding window is 4096."""
    p = Path(path)
    if p.is_file() and p.suffix == ".gguf":
        from pretrain.hub.gguf_io import read_gguf

        return read_gguf(p, max_seq_len)
    if p.is_dir():
        from pretrain.hub.hf_dir import read_hf_dir

        return read_hf_dir(p, max_seq_len)
    if not p.exists():
        raise CheckpointError(f"{p}: no such checkpoint")
    raise CheckpointError(f"{p}: not a Hugging Face model directory or a .gguf file")
