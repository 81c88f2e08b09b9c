"""The model-family registry: what a family brings (config section, builder, counts, FLOPs) and the
lookup by `model.type`. The families register themselves (pretrain/models/__init__.py imports them)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pretrain.config import register_section
from pretrain.registry import Registry


@dataclass(frozen=True)
class Family:
    name: str
    config: type  # the `model` config section; its `type` field is Literal[name]
    build: Callable[[Any], Any]  # config -> nn.Module
    count_parameters: Callable[[Any], dict]  # module -> {"params", "params_non_embedding", ...}
    # (config, counts, the objective's workload: seq_len, head_fraction, ...) -> training FLOPs per unit
    flops_per_unit: Callable[[Any, dict, dict], float]
    # (config, parameter name, full-shape fp32 tensor to fill, generator) -> None. With it the trainer builds the
    # model inside ZeRO-3's partitioned construction and initialises each parameter in place (train/build.py).
    init_parameter: Callable[[Any, str, Any, Any], None] | None = None
    # module -> {name: (sum, count)} of the last forward (a mixture of experts' routing loads), reduced over ranks with
    # the step's own metrics; then (module, reduced values) -> the values to log, after whatever the family does with
    # them on every rank alike (a router's balance bias). None: the family adds nothing.
    step_metrics: Callable[[Any], dict] | None = None
    after_reduce: Callable[[Any, dict], dict] | None = None
    # (a step's metrics row) -> {name: (row labels, rows x columns values, x label, colour-bar label)}: grids the
    # trainer averages and draws as heatmaps at each evaluation (a mixture of experts' load per layer and expert).
    grids: Callable[[dict], dict] | None = None


_FAMILIES: Registry[Family] = Registry("model.type")


def register(family: Family) -> Family:
    register_section("model", family.name, family.config)  # `model.type: <name>` reads this section
    return _FAMILIES.add(family.name, family)


def registered() -> list[str]:
    return _FAMILIES.names()


def get_family(name: str) -> Family:
    """The family registered as `name`; a KeyError naming the registered ones otherwise."""
    return _FAMILIES.get(name)
