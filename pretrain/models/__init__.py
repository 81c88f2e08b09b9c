"""Model families by name: the registry the trainer looks `model.type` up in.

A family brings its config section (a pydantic class whose `type` field is a Literal of its name), its
builder (architecture only: no ranks, no DeepSpeed), its parameter counts and FLOPs per unit of work
(for throughput, MFU and scaling-law metrics), and, once import and export exist, its checkpoint
adapter. Several names may share one builder: `gpt2`, `llama` and `bert` are presets of one
Transformer. Families register when their module is imported; the modules are listed at the bottom.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pretrain.registry import Registry


@dataclass(frozen=True)
class Family:
    name: str
    config: type  # the `model` config section; its `type` field is Literal[name]
    build: Callable[[Any], Any]  # config -> nn.Module
    count_parameters: Callable[[Any], dict]  # module -> {"params", "params_non_embedding", ...}
    # (config, counts, the objective's workload: seq_len, head_fraction, ...) -> training FLOPs per unit
    flops_per_unit: Callable[[Any, dict, dict], float]
    adapter: Any = None  # checkpoint import/export (Hugging Face formats)
    # (config, parameter name, full-shape fp32 tensor to fill, generator) -> None. With it the trainer builds the
    # model inside ZeRO-3's partitioned construction and initialises each parameter in place (train/build.py).
    init_parameter: Callable[[Any, str, Any, Any], None] | None = None


_FAMILIES: Registry[Family] = Registry("model.type")


def register(family: Family) -> Family:
    return _FAMILIES.add(family.name, family)


def registered() -> list[str]:
    return _FAMILIES.names()


def get_family(name: str) -> Family:
    """The family registered as `name`; a KeyError naming the registered ones otherwise."""
    return _FAMILIES.get(name)


from pretrain.models import dit as _dit  # noqa: E402,F401  (registers dit)
from pretrain.models import transformer as _transformer  # noqa: E402,F401  (registers gpt2, llama, bert)
