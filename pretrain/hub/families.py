"""Family adapters: how one Hugging Face `model_type` maps onto our Transformer presets, and back.

An adapter owns three translations for its family: config.json <-> our model config section, HF tensor
names and layouts <-> ours, and our module paths -> HF module paths (for PEFT). The registry is keyed by
HF `model_type` for import; export asks each adapter whether it `exports` our config. Expected tensor
names and shapes are never tabulated by hand: they come from our model built on the meta device and sent
through the adapter's own export mapping, so import, export and the model cannot drift apart.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import ValidationError

from pretrain.errors import CheckpointError
from pretrain.hub.adapter import _ADAPTERS, Adapter, Named, Shapes, register  # noqa: F401
from pretrain.models import get_family
from pretrain.registry import Registry


def _adapters() -> Registry[Adapter]:
    """The registry, with the built-in adapters loaded (on first use: they import transformers)."""
    # Register gpt2; llama, mistral, qwen2; mixtral, qwen2_moe, qwen3_moe, olmoe.
    from pretrain.hub import gpt2_adapter, llama_adapter, moe_adapter  # noqa: F401

    return _ADAPTERS


def adapter_for(model_type: str, where: str) -> Adapter:
    _adapters()
    try:
        return _ADAPTERS.get(model_type)
    except KeyError:
        raise CheckpointError(f"{where}: model_type {model_type!r} is not supported "
                              f"(supported: {', '.join(_ADAPTERS.names())})") from None


def adapter_for_ours(cfg: Any) -> Adapter:
    """The adapter that exports our model config (first registered that accepts it)."""
    for name in _adapters().names():
        adapter = _ADAPTERS.get(name)
        if adapter.exports(cfg):
            return adapter
    raise CheckpointError(f"model.type {cfg.type!r} has no Hugging Face export (supported: gpt2, llama, mixtral, "
                          "qwen2_moe, qwen3_moe, olmoe)")


def our_config(fields: dict, where: str) -> Any:
    """Validate our model section from the fields an adapter mapped; a pydantic error becomes one line."""
    family = get_family(fields["type"])
    try:
        return family.config.model_validate(fields)
    except ValidationError as err:
        e = err.errors()[0]
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        field = f"model.{loc}: " if loc else ""
        raise CheckpointError(f"{where}: gives an invalid model config ({field}{msg})") from None


def expected_shapes(adapter: Adapter, cfg: Any) -> tuple[Shapes, Shapes]:
    """(our name -> shape, HF name -> shape) of every weight the model needs: our model built on the meta
    device (no memory) and its parameters sent through the adapter's export mapping. Shared parameters
    (a tied head) are listed once, as `embed.weight`."""
    # The rotary table is computed eagerly on CPU and cannot come from meta tensors; it holds no weights,
    # so the shapes are those of the same config without scaling.
    shape_cfg = cfg.model_copy(update={"rope_scaling": None}) if getattr(cfg, "rope_scaling", None) else cfg
    with torch.device("meta"):
        model = get_family(cfg.type).build(shape_cfg)
    ours = {n: p for n, p in model.named_parameters()}
    theirs = {n: tuple(t.shape) for n, t in adapter.to_hf(cfg, ours.items())}
    return {n: tuple(p.shape) for n, p in ours.items()}, theirs


def hf_name(model_cfg: Any, our_name: str) -> str:
    """The Hugging Face module path of one of our modules, e.g. `blocks.3.attn.q_proj` ->
    `model.layers.3.self_attn.q_proj` (Llama) or `transformer.h.3.attn.c_attn` (GPT-2, whose q/k/v share
    one fused Conv1D); a parameter name keeps its `.weight`/`.bias` suffix."""
    return adapter_for_ours(model_cfg).hf_module(model_cfg, our_name)


def peft_target(model_cfg: Any, ours: str) -> tuple[str, str | None]:
    """Where PEFT finds one of our LoRA targets in the transformers model: (module path, None) for a Linear it
    adapts through `target_modules`, (module path, parameter) for a raw parameter it adapts through
    `target_parameters` (transformers 5's stacked experts and MoE routers)."""
    return adapter_for_ours(model_cfg).peft_target(model_cfg, ours)
