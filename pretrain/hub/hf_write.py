"""Export of our model as a Hugging Face checkpoint directory that `transformers` loads as it is.

`write_hf` takes the weights as an iterator of (our name, tensor), so a ZeRO-3 caller can gather one
layer at a time; only one safetensors shard is held in memory. It writes config.json through
transformers' own config class (so the file says what transformers will read), generation_config.json
with the special-token ids, the shards (with an index above `max_shard_bytes`), and the tokenizer
(re-saved through transformers, chat template included). Everything goes into `out_dir.tmp-*` first and
is renamed into place at the end: a crash leaves no directory that looks complete.

The begin, end and padding ids come from the caller (a released checkpoint's own) and else from the
tokenizer that ships beside the weights; a tokenizer without such a token leaves the id unset. The config
classes' defaults (GPT-2's 50256) are never written: a from-scratch model with a small vocabulary would
carry an id it has no row for, and generation would never stop at its end of text.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig

from pretrain.atomic import atomic_write, replace_dir
from pretrain.errors import CheckpointError
from pretrain.hub.families import adapter_for_ours, expected_shapes
from pretrain.hub.released import check_vocab
from pretrain.hub.safetensors_io import write_shards
from pretrain.hub.tokenizer_io import load_tokenizer, max_token_id

_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _checked(expected: dict[str, tuple[int, ...]], tensors: Iterable[tuple[str, torch.Tensor]],
             dtypes: set[torch.dtype]) -> Iterator[tuple[str, torch.Tensor]]:
    """Pass (HF name, tensor) through, checking each against the config's shapes, and that none is missing."""
    seen = set()
    for name, t in tensors:
        if name not in expected:
            raise CheckpointError(f"export: {name} is not part of the model the config describes")
        if tuple(t.shape) != expected[name]:
            raise CheckpointError(f"export: {name} has shape {tuple(t.shape)} but the config implies "
                                  f"{expected[name]}")
        if t.dtype not in _DTYPES:
            raise CheckpointError(f"export: {name} has dtype {t.dtype} (float32, bfloat16 or float16)")
        seen.add(name)
        dtypes.add(t.dtype)
        yield name, t
    missing = [n for n in expected if n not in seen]
    if missing:
        raise CheckpointError(f"export: {missing[0]} was not given" + (f" (and {len(missing) - 1} more)"
                                                                      if len(missing) > 1 else ""))


def _write_json(path: Path, data: dict) -> None:
    atomic_write(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def _special_ids(tok: Any, vocab_size: int, eos_token_ids: Iterable[int], bos_token_id: int | None,
                 pad_token_id: int | None) -> tuple[list[int], int | None, int | None]:
    """(eos ids, bos id, pad id): the given ones, the tokenizer's end-of-text id added to the eos ids, its
    begin and padding ids where none is given; each inside the vocabulary."""
    eos = [int(i) for i in eos_token_ids]
    if tok is not None:
        if tok.eos_token_id is not None and tok.eos_token_id not in eos:
            eos.append(int(tok.eos_token_id))
        bos_token_id = tok.bos_token_id if bos_token_id is None else bos_token_id
        pad_token_id = tok.pad_token_id if pad_token_id is None else pad_token_id
    bos = None if bos_token_id is None else int(bos_token_id)
    pad = None if pad_token_id is None else int(pad_token_id)
    for name, i in [("eos_token_id", i) for i in eos] + [("bos_token_id", bos), ("pad_token_id", pad)]:
        if i is not None and not 0 <= i < vocab_size:
            raise CheckpointError(f"export: {name} {i} is outside the model's vocabulary (0..{vocab_size - 1})")
    return eos, bos, pad


def write_hf(out_dir: str | os.PathLike, model_cfg: Any, tensors: Iterable[tuple[str, torch.Tensor]], *,
             tokenizer_dir: str | os.PathLike | None = None, eos_token_ids: Iterable[int] = (),
             bos_token_id: int | None = None, pad_token_id: int | None = None, chat_template: str | None = None,
             max_shard_bytes: float = 5e9) -> Path:
    """Write a Hugging Face checkpoint of `model_cfg` with the given weights to `out_dir` (replacing it).
    `tensors`: (our name, tensor) pairs, each parameter once (a tied head may be left out or given as
    lm_head.weight: it is not written). Special-token ids not given come from the tokenizer in
    `tokenizer_dir` (see the module docstring). Returns the directory."""
    out = Path(out_dir)
    adapter = adapter_for_ours(model_cfg)
    hf = adapter.hf_config(model_cfg)  # refuses a config with no HF equivalent before anything is written
    tok = None
    if tokenizer_dir is not None:
        tok = load_tokenizer(Path(tokenizer_dir), str(tokenizer_dir))
        if tok is None:
            raise CheckpointError(f"export: {tokenizer_dir} holds no tokenizer")
        check_vocab(f"export: {tokenizer_dir}", max_token_id(tok), model_cfg.vocab_size)
    eos, bos, pad = _special_ids(tok, model_cfg.vocab_size, eos_token_ids, bos_token_id, pad_token_id)
    _, expected = expected_shapes(adapter, model_cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        dtypes: set[torch.dtype] = set()
        write_shards(tmp, _checked(expected, adapter.to_hf(model_cfg, tensors), dtypes), max_shard_bytes)
        if len(dtypes) > 1:
            kinds = ", ".join(sorted(map(str, dtypes)))
            raise CheckpointError(f"export: tensors of several dtypes ({kinds})")
        dtype = _DTYPES[dtypes.pop()] if dtypes else "float32"
        hf.eos_token_id = (eos[0] if len(eos) == 1 else eos) if eos else None
        hf.bos_token_id, hf.pad_token_id = bos, pad
        hf.dtype = dtype
        config = hf.to_dict()
        config["torch_dtype"] = dtype  # older readers (transformers < 4.56, vLLM) look for this spelling
        _write_json(tmp / "config.json", config)
        gen = GenerationConfig(eos_token_id=hf.eos_token_id, bos_token_id=bos, pad_token_id=pad)
        _write_json(tmp / "generation_config.json", gen.to_dict())
        if tok is not None:
            if chat_template is not None:
                tok.chat_template = chat_template
            tok.save_pretrained(str(tmp))
        for f in tmp.iterdir():
            with open(f, "rb+") as fh:
                os.fsync(fh.fileno())
        replace_dir(tmp, out)
    finally:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(tmp)
    return out
