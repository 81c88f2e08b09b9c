"""`Released`: what reading a checkpoint gives the trainer, and the checks every format shares.

A Released holds no weights until asked: `iter_tensors()` streams (our name, fp32 tensor) pairs one at a
time from the files (so a caller filling ZeRO-3 partitions holds one full tensor at most), and `state`
collects them into a dict for small models. Names and shapes were already checked against the config when
the Released was made (from the file headers alone), so a bad checkpoint fails before any training
starts, in one line that names the tensor.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pretrain.errors import CheckpointError


@dataclass
class Released:
    model_cfg: Any  # our `model` config section (a TransformerConfig preset)
    source: str  # the path it was read from
    hf_config: dict  # config.json as read (HF), or the transformers config that the GGUF metadata describes
    tokenizer_dir: Path | None  # tokenizer.json + tokenizer_config.json + chat template; None: no tokenizer
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    chat_template: str | None
    _tensors: Callable[[], Iterator[tuple[str, torch.Tensor]]] = field(repr=False)
    # (our name, LazyTensor) pairs, where every stored tensor maps to one of ours unchanged (Llama-family HF dirs)
    _lazy: Callable[[], Iterator[tuple[str, Any]]] | None = field(default=None, repr=False)

    def iter_lazy(self) -> Iterator[tuple[str, Any]]:
        """Like `iter_tensors`, but yields unread `LazyTensor`s where the format allows (a rename only), so a
        ZeRO-3 rank reads just its partition's slice; full tensors otherwise (GPT-2, GGUF, transforms)."""
        return self._lazy() if self._lazy is not None else self._tensors()

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(our name, fp32 CPU tensor), file by file, one tensor in memory at a time as long as the caller
        drops each before asking for the next (`del t` at the end of the loop body: a loop variable keeps
        the last tensor alive while the next is read). A tied head is not yielded: it is `embed.weight`."""
        return self._tensors()

    @functools.cached_property
    def state(self) -> dict[str, torch.Tensor]:
        """All weights at once (our name -> fp32 CPU tensor); for models that fit in memory."""
        return dict(self.iter_tensors())


def check_shapes(found: dict[str, tuple[tuple[int, ...], str]], expected: dict[str, tuple[int, ...]],
                 implied_by: str, where: str) -> None:
    """Every expected tensor present with its shape and nothing else; one line for the first mistake.
    `found`: name -> (shape, the file that holds it); `where`: the checkpoint, for a missing tensor."""
    for name, (shape, file) in found.items():
        if name not in expected:
            raise CheckpointError(f"{file}: unexpected tensor {name} (not part of the model {implied_by} "
                                  "describes)")
        if tuple(shape) != tuple(expected[name]):
            raise CheckpointError(f"{file}: tensor {name} has shape {tuple(shape)} but {implied_by} implies "
                                  f"{tuple(expected[name])}")
    missing = [n for n in expected if n not in found]
    if missing:
        raise CheckpointError(f"{where}: tensor {missing[0]} is missing"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))


def check_vocab(where: str, max_id: int, vocab_size: int) -> None:
    """A token id the embedding has no row for would index out of bounds at the first batch that has it."""
    if max_id >= vocab_size:
        raise CheckpointError(f"{where}: tokenizer has token id {max_id} but the model's vocab_size is "
                              f"{vocab_size}")


