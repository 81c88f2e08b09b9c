"""Import of a Hugging Face checkpoint directory: config.json + safetensors (one file, or shards with an
index) + tokenizer files.

config.json is parsed by transformers' config class of its `model_type` (only the families we have an
adapter for: no remote code), then mapped to our model config by the family's adapter. Before any weight
is read, the tensor names and shapes in the safetensors headers are checked against what that config
implies, and the tokenizer's largest id against the vocabulary. Weights then stream one tensor at a time.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import CONFIG_MAPPING

from pretrain.errors import CheckpointError, first_line
from pretrain.hub.families import adapter_for, expected_shapes, our_config
from pretrain.hub.released import Released, check_shapes, check_vocab
from pretrain.hub.safetensors_io import (
    INDEX,
    LazyStack,
    LazyTensor,
    iter_file_tensors,
    iter_lazy_tensors,
    read_headers,
    weight_files,
)
from pretrain.hub.tokenizer_io import load_tokenizer, max_token_id

_HEAD = "<the tied head the file carries>"  # no tensor of ours has this name


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: must hold a JSON object")
    return data


def _ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(int(v) for v in value) if isinstance(value, list) else (int(value),)


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(memoryview(t.contiguous().numpy()).cast("B")).hexdigest()


def read_hf_dir(directory: Path, max_seq_len: int | None = None) -> Released:
    cfg_path = directory / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{directory}: no config.json (not a Hugging Face model directory)")
    raw = _read_json(cfg_path)
    where = str(cfg_path)
    if "model_type" not in raw:
        raise CheckpointError(f"{where}: model_type is missing")
    if raw.get("quantization_config"):
        q = raw["quantization_config"]
        method = q.get("quant_method", "?") if isinstance(q, dict) else "?"
        raise CheckpointError(f"{where}: quantization_config ({method}) is not supported (float weights "
                              "only)")
    adapter = adapter_for(raw["model_type"], where)
    unknown = [a for a in raw.get("architectures") or () if a not in adapter.architectures]
    if unknown:
        raise CheckpointError(f"{where}: architectures {unknown[0]!r} is not supported "
                              f"({', '.join(adapter.architectures)})")
    try:
        hf = CONFIG_MAPPING[raw["model_type"]].from_dict(raw)
    except Exception as e:  # transformers' own validation (e.g. of rope parameters)
        raise CheckpointError(f"{where}: transformers rejects it ({first_line(e)})") from None
    cfg = our_config(adapter.model_config(hf, where, max_seq_len), where)

    files = weight_files(directory)
    headers = read_headers(files)
    skip = frozenset(n for n in headers if adapter.is_ignored(n))
    names = {adapter.normalise_name(n): n for n in headers if n not in skip}
    _, hf_shapes = expected_shapes(adapter, cfg)
    # A tied head that the file carries anyway is checked equal to the embedding while streaming.
    extra_head = cfg.tie_embeddings and "lm_head.weight" in names
    found = {n: (headers[o].shape, headers[o].file.name) for n, o in names.items()
             if not (extra_head and n == "lm_head.weight")}
    check_shapes(found, hf_shapes, "config.json", str(directory / INDEX) if len(files) > 1 else str(files[0]))

    tok = load_tokenizer(directory, str(directory))
    if tok is not None:
        check_vocab(str(directory), max_token_id(tok), cfg.vocab_size)
    gen_path = directory / "generation_config.json"
    gen = _read_json(gen_path) if gen_path.is_file() else {}
    eos = _ids(gen.get("eos_token_id", raw.get("eos_token_id")))
    if not eos and tok is not None and tok.eos_token_id is not None:
        eos = (tok.eos_token_id,)
    bos = gen.get("bos_token_id", raw.get("bos_token_id"))

    def stored() -> dict[str, LazyTensor]:
        return {adapter.normalise_name(n): LazyTensor(headers[n], n) for n in headers if n not in skip}

    def read() -> Iterator[tuple[str, torch.Tensor]]:
        """(our name, tensor) one at a time; a tied head that the file carries anyway as (_HEAD, tensor)."""
        if adapter.grouped:
            parts = stored()
            if extra_head:
                yield _HEAD, parts.pop("lm_head.weight").materialise()
            for ours, lazy in adapter.plan(cfg, parts):
                yield ours, lazy.materialise()
            return
        for name, t in iter_file_tensors(headers, skip):
            hf_name = adapter.normalise_name(name)
            if extra_head and hf_name == "lm_head.weight":
                yield _HEAD, t
                continue
            pieces = adapter.to_ours(cfg, hf_name, t)
            # No reference may outlive its yield: while the next tensor is read, the last must be freeable.
            del t
            while pieces:
                ours, x = pieces.pop(0)
                yield ours, x
                del x

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        embed = head = None
        for ours, x in read():
            if ours == _HEAD:
                head = _digest(x)
                continue
            if extra_head and ours == "embed.weight":
                embed = _digest(x)
            yield ours, x
            del x
        if extra_head and embed != head:
            raise CheckpointError(f"{directory}: lm_head.weight differs from the embedding, but config.json "
                                  "has tie_word_embeddings true")

    def lazy() -> Iterator[tuple[str, LazyTensor | LazyStack]]:
        if adapter.grouped:
            yield from adapter.plan(cfg, stored())
            return
        for t in iter_lazy_tensors(headers, skip):
            (ours, _), = adapter.to_ours(cfg, adapter.normalise_name(t.name), torch.empty(0))
            yield ours, t

    return Released(
        model_cfg=cfg, source=str(directory), hf_config=raw,
        tokenizer_dir=directory if tok is not None else None,
        eos_token_ids=eos, bos_token_id=None if bos is None else int(bos),
        chat_template=getattr(tok, "chat_template", None) if tok is not None else None, _tensors=tensors,
        _lazy=lazy if (adapter.renames_only or adapter.grouped) and not extra_head else None,
    )
