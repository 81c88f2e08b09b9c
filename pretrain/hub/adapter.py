"""The adapter interface: one Hugging Face family's translations (config, tensor names and layouts, PEFT
module paths), and the registry the built-in adapters (gpt2_adapter, llama_adapter, moe_adapter) add themselves to.
`pretrain.hub.families` looks adapters up."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch

from pretrain.registry import Registry

Named = tuple[str, torch.Tensor]  # (tensor name, tensor)
Shapes = dict[str, tuple[int, ...]]


class Adapter:
    """One family's translations; subclasses fill in the methods below."""

    model_types: tuple[str, ...] = ()  # HF config.json `model_type` values it imports
    renames_only = False  # each HF tensor is one of ours under another name (it can be read lazily, in slices)
    grouped = False  # some of ours are built from several HF tensors (stacked experts): read through `plan`
    architectures: tuple[str, ...] = ()  # config.json `architectures` it accepts (a causal-LM head)
    ignored: tuple[str, ...] = ()  # trailing name components of HF tensors that are buffers, not weights

    def normalise_name(self, hf_name: str) -> str:
        """The HF tensor name as the CausalLM model spells it (some files were saved from the base model)."""
        return hf_name

    def is_ignored(self, hf_name: str) -> bool:
        return any(hf_name == s or hf_name.endswith("." + s) for s in self.ignored)

    def model_config(self, hf: Any, where: str, max_seq_len: int | None = None) -> dict:
        """Our model section's fields from a transformers config object (`max_seq_len` overrides the
        checkpoint's context where the family allows it); CheckpointError for what we lack."""
        raise NotImplementedError

    def hf_config(self, cfg: Any) -> Any:
        """The transformers config object of our model config (export)."""
        raise NotImplementedError

    def exports(self, cfg: Any) -> bool:
        raise NotImplementedError

    def hf_module(self, cfg: Any, ours: str) -> str:
        """The HF module path of one of our module paths (or parameter names)."""
        raise NotImplementedError

    def peft_target(self, cfg: Any, ours: str) -> tuple[str, str | None]:
        """Where PEFT adapts one of our LoRA targets in the transformers model (in memory): its module path, and the
        parameter's name when PEFT adapts a raw parameter there rather than a Linear (`target_parameters`)."""
        return self.hf_module(cfg, ours), None

    def to_hf(self, cfg: Any, tensors: Iterable[Named]) -> Iterator[Named]:
        """(our name, tensor) -> (HF name, tensor in HF's layout); may buffer a few (GPT-2's q/k/v)."""
        raise NotImplementedError

    def to_ours(self, cfg: Any, hf_name: str, t: torch.Tensor) -> list[Named]:
        """One HF tensor -> our tensors (GPT-2's fused c_attn gives three)."""
        raise NotImplementedError

    def plan(self, cfg: Any, stored: dict[str, Any]) -> Iterator[tuple[str, Any]]:
        """For `grouped` adapters, instead of `to_ours`: (our name, unread LazyTensor or LazyStack) for each of
        our tensors, from `stored` (HF name -> LazyTensor), whose names and shapes were already checked."""
        raise NotImplementedError


_ADAPTERS: Registry[Adapter] = Registry("config.json model_type")


def register(adapter: Adapter) -> Adapter:
    for name in adapter.model_types:
        _ADAPTERS.add(name, adapter)
    return adapter
