"""LoRA adapters in PEFT's on-disk layout, so `peft.PeftModel.from_pretrained(hf_model, dir)` loads ours and
ours loads theirs.

A PEFT LoRA directory is `adapter_config.json` (rank, alpha, dropout, which modules) and
`adapter_model.safetensors` with `base_model.model.<HF module path>.lora_A.weight` (r, in) and
`.lora_B.weight` (out, r), the module paths being those of the transformers model (`model.layers.3.self_attn
.q_proj`). Our LoRA layers have the same factors under our module names (`blocks.3.attn.q_proj.lora_A
.weight`), so writing and reading is a renaming through the family adapter's `peft_target`, plus checks: a
setting PEFT has and our LoRALinear does not compute (DoRA, rsLoRA scaling, trained biases, per-module
ranks) is refused in one line rather than loaded into a model that would compute something else.

GPT-2 fuses q, k and v into one Conv1D (`c_attn`), which holds a single adapter: separate q/k/v adapters
have no PEFT form, and are refused. GPT-2's other layers (attn.c_proj, mlp.c_fc, mlp.c_proj) export, with
PEFT's `fan_in_fan_out` (its Conv1D stores the weight transposed; the factors are the same).

Mixture-of-experts models: transformers 5 holds the experts as 3-D parameters (`mlp.experts.gate_up_proj`
(E, 2f, d), `down_proj` (E, d, f)) and the router as a plain parameter (`mlp.gate.weight`), which PEFT adapts
through `target_parameters` (its `ParamWrapper`) with the factors our expert adapters keep as they are
(`pretrain/models/lora_experts.py`). PEFT wraps a module once per adapted parameter, the first of the
module's parameters innermost, so the factors of `gate_up_proj` sit under `experts.base_layer.lora_A.weight`
when `down_proj` is adapted too. PEFT's ParamWrapper has no dropout: such an export with `lora.dropout` > 0
is refused (export the merged model instead).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors import safe_open
from safetensors.torch import save_file

from pretrain.atomic import atomic_write, replace_dir
from pretrain.errors import CheckpointError
from pretrain.hub.families import peft_target
from pretrain.models.lora import ADAPTER_KEYS, LoraConfig, Target, lora_targets

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PeftModel (base_model) -> LoraModel (model) -> the transformers model
_CONV1D_FAMILIES = {"gpt2"}  # families whose HF layers are Conv1D: PEFT's fan_in_fan_out
# The order in which transformers 5's experts modules (Mixtral, Qwen2/3-MoE, OLMoE) register their parameters:
# PEFT wraps them in this order, the first innermost (`base_layer` of the next).
_PARAM_ORDER = ("gate_up_proj", "down_proj")


@dataclass
class PeftAdapter:
    """An adapter read back: the LoRA settings that rebuild its layers, and its factors under our names."""

    lora: LoraConfig
    tensors: dict[str, torch.Tensor]  # "blocks.0.attn.q_proj.lora_A.weight" -> (r, in) fp32, ...
    base_model_name_or_path: str | None


@dataclass(frozen=True)
class _Unit:
    """One target as both sides see it: ours (a Linear, or a stacked expert weight) and where PEFT finds it."""

    ours: str
    shape: Target
    module: str  # the transformers model's module path (in memory)
    param: str | None  # the raw parameter PEFT adapts (`target_parameters`); None: a Linear (`target_modules`)

    @property
    def path(self) -> str:
        return f"{self.module}.{self.param}" if self.param else self.module


def _units(model_cfg: Any) -> dict[str, _Unit]:
    """Our adapter module names -> their targets, from the model built on the meta device (no memory)."""
    from pretrain.models import get_family

    # Llama 3's rotary table is computed eagerly on CPU and cannot come from meta tensors; it holds no weights.
    if getattr(model_cfg, "rope_scaling", None):
        model_cfg = model_cfg.model_copy(update={"rope_scaling": None})
    with torch.device("meta"):
        model = get_family(model_cfg.type).build(model_cfg)
    return {t.adapter: _Unit(ours, t, *peft_target(model_cfg, ours)) for ours, t in lora_targets(model).items()}


def _targets(chosen: list[str], every: list[str], parts: int = 1) -> list[str]:
    """The shortest faithful spelling of the set `chosen` among `every`: the last `parts` components (PEFT's and
    our default spelling, "q_proj"; "mlp.experts.down_proj" for a parameter, whose last name alone is
    "weight" for many) where every name with that tail is chosen, the full names where only some are. Both
    PEFT (a name in the list, or a dotted suffix) and apply_lora read it back as this set."""
    tail = lambda n: ".".join(n.split(".")[-parts:])  # noqa: E731
    out = []
    for name in sorted({tail(n) for n in chosen}):
        picked = [n for n in chosen if tail(n) == name]
        out += [name] if len(picked) == sum(tail(n) == name for n in every) else picked
    return sorted(out)


def _nesting(units: list[_Unit]) -> dict[str, int]:
    """Adapter name -> how many `base_layer` PEFT puts before its factors: the parameters adapted on one module
    nest in the module's own order, the first innermost."""
    by_module: dict[str, list[tuple[int, str]]] = {}
    for u in units:
        if u.param:
            by_module.setdefault(u.module, []).append((_PARAM_ORDER.index(u.param) if u.param in _PARAM_ORDER
                                                       else -1, u.shape.adapter))
    return {a: len(group) - 1 - i for group in by_module.values() for i, (_, a) in enumerate(sorted(group))}


def _modules(adapters: dict[str, torch.Tensor], units: dict[str, _Unit], rank: int) -> list[str]:
    """The adapter module names, each with both factors of the right shapes (A (r n, in), B (out, r n))."""
    modules: dict[str, set[str]] = {}
    for key, t in adapters.items():
        module, suffix = next(((key[: -len(s) - 1], s) for s in ADAPTER_KEYS if key.endswith("." + s)), (None, None))
        if module is None:
            raise CheckpointError(f"PEFT export: {key} is not a LoRA factor (…lora_A.weight or …lora_B.weight)")
        if module not in units:
            raise CheckpointError(f"PEFT export: {key}: {module} is not a Linear module or expert weight's adapter "
                                  "of the model")
        out_f, in_f, n, _ = units[module].shape
        want = (rank * n, in_f) if suffix == "lora_A.weight" else (out_f, rank * n)
        if tuple(t.shape) != want:
            raise CheckpointError(f"PEFT export: {key} has shape {tuple(t.shape)}, lora.rank {rank} and the model "
                                  f"imply {want}")
        modules.setdefault(module, set()).add(suffix)
    for module, have in modules.items():
        if len(have) != 2:
            raise CheckpointError(f"PEFT export: {module} has {next(iter(have))} but not its other factor")
    if not modules:
        raise CheckpointError("PEFT export: no adapter tensors given")
    return [n for n in units if n in modules]  # model order


def write_peft(out_dir: str | os.PathLike, model_cfg: Any, lora_cfg: LoraConfig, adapters: dict[str, torch.Tensor],
               base_model_name_or_path: str | None = None) -> Path:
    """Write `adapters` (our names, as `lora_state` gives them) as a PEFT LoRA adapter of the transformers
    model that `model_cfg` exports to; replaces `out_dir` whole (written beside it, then renamed)."""
    units = _units(model_cfg)
    chosen = [units[a] for a in _modules(adapters, units, lora_cfg.rank)]
    seen: dict[str, str] = {}
    for u in chosen:
        if u.path in seen:
            raise CheckpointError(
                f"PEFT export: {seen[u.path]} and {u.ours} are one Hugging Face module {u.path} (GPT-2 fuses q/k/v "
                "into c_attn), which holds a single adapter; target o_proj/up_proj/down_proj only")
        seen[u.path] = u.ours
    params = [u for u in chosen if u.param]
    if params and lora_cfg.dropout:
        raise CheckpointError(f"PEFT export: lora.dropout {lora_cfg.dropout} with an adapter on {params[0].ours} "
                              f"(PEFT's target_parameters, {params[0].path}, take no dropout); export the merged model")
    every = list(units.values())
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": lora_cfg.rank,
        "lora_alpha": int(lora_cfg.alpha) if float(lora_cfg.alpha).is_integer() else lora_cfg.alpha,
        "lora_dropout": lora_cfg.dropout,
        "target_modules": _targets([u.path for u in chosen if not u.param],
                                   [u.path for u in every if not u.param]) or None,
        "target_parameters": _targets([u.path for u in params], [u.path for u in every if u.param], 3) or None,
        "base_model_name_or_path": base_model_name_or_path,
        "bias": "none",
        "fan_in_fan_out": model_cfg.type in _CONV1D_FAMILIES,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    depth = _nesting(chosen)
    # fp32 on disk, as our other exports: exact for fp32 adapters, a lossless widening for bf16 ones.
    tensors = {f"{PREFIX}{u.module}{'.base_layer' * depth.get(u.shape.adapter, 0)}.{k}":
               adapters[f"{u.shape.adapter}.{k}"].detach().float().cpu().contiguous() for u in chosen for k in ADAPTER_KEYS}
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        atomic_write(tmp / CONFIG, json.dumps(config, indent=2, sort_keys=True) + "\n")
        for f in tmp.iterdir():
            with open(f, "rb+") as fh:
                os.fsync(fh.fileno())
        replace_dir(tmp, out)
    finally:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(tmp)
    return out


# Settings PEFT's LoRA has that change what the layer computes or what is trained; ours computes plain LoRA.
_UNSUPPORTED = {
    "use_dora": (False, None),  # weight-decomposed LoRA: a magnitude vector too
    "use_rslora": (False, None),  # scaling alpha / sqrt(r) instead of alpha / r
    "lora_bias": (False, None),  # a trained bias on lora_B
    "bias": ("none", None),  # base biases trained alongside
    "modules_to_save": (None, []),  # whole modules trained and saved
    "rank_pattern": ({}, None),  # per-module ranks
    "alpha_pattern": ({}, None),
    "layers_to_transform": (None, []),
}


def _read_config(path: Path) -> dict:
    f = path / CONFIG
    if not f.is_file():
        raise CheckpointError(f"{path}: no {CONFIG} (not a PEFT adapter directory)")
    try:
        cfg = json.loads(f.read_text())
    except ValueError as e:
        raise CheckpointError(f"{f}: not JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{f}: not a JSON object")
    if cfg.get("peft_type") != "LORA":
        raise CheckpointError(f"{f}: peft_type {cfg.get('peft_type')!r} is not supported (LORA)")
    for key, allowed in _UNSUPPORTED.items():
        if key in cfg and cfg[key] not in allowed:
            raise CheckpointError(f"{f}: {key} {cfg[key]!r} is not supported ({allowed[0]!r})")
    return cfg


def _locations(units: dict[str, _Unit], target_parameters: Any, where: Path) -> dict[str, list[str]]:
    """Where a PEFT adapter of this model keeps each of our adapters' factors (the key without `.lora_A.weight`,
    after PEFT's prefix) -> our adapter module names there (several: GPT-2's fused c_attn). The parameters that
    `target_parameters` names (a full name, or a dotted suffix, as PEFT matches them) nest on their module; a
    Linear's, or a plain `weight` parameter's (a router PEFT once saw as a Linear), sit on the module itself."""
    if target_parameters is not None and (not isinstance(target_parameters, list)
                                          or not all(isinstance(t, str) for t in target_parameters)):
        raise CheckpointError(f"{where}: target_parameters {target_parameters!r} is not a list of names")
    params = [u for u in units.values() if u.param]
    targeted = []
    for t in target_parameters or ():
        hit = [u for u in params if u.path == t or u.path.endswith("." + t)]
        if not hit:
            raise CheckpointError(f"{where}: target_parameters {t!r} names no parameter we can adapt (ours: "
                                  f"{', '.join(sorted({'.'.join(u.path.split('.')[-3:]) for u in params}))})")
        targeted += [u for u in hit if u not in targeted]
    depth = _nesting(targeted)
    at: dict[str, list[str]] = {}
    for u in targeted:
        at.setdefault(u.module + ".base_layer" * depth[u.shape.adapter], []).append(u.shape.adapter)
    for u in units.values():
        if (not u.param or u.param == "weight") and u not in targeted:
            at.setdefault(u.module, []).append(u.shape.adapter)
    return at


def read_peft(path: str | os.PathLike, model_cfg: Any) -> PeftAdapter:
    """A PEFT LoRA adapter of the model `model_cfg` describes: its settings and factors under our names,
    checked against the model (names and shapes) before anything is loaded. Safetensors only: an
    `adapter_model.bin` is a pickle and is refused."""
    p = Path(path)
    cfg = _read_config(p)
    f = p / WEIGHTS
    if not f.is_file():
        if (p / "adapter_model.bin").is_file():
            raise CheckpointError(f"{p}: only adapter_model.bin (a pickle, which we never load); save it as "
                                  "safetensors first")
        raise CheckpointError(f"{p}: no {WEIGHTS}")
    if model_cfg.type in _CONV1D_FAMILIES:
        pass  # PEFT sets fan_in_fan_out itself on Conv1D; either spelling means the same factors
    elif cfg.get("fan_in_fan_out"):
        raise CheckpointError(f"{p / CONFIG}: fan_in_fan_out true, but {model_cfg.type} has no Conv1D layers")
    units = _units(model_cfg)
    at = _locations(units, cfg.get("target_parameters"), p / CONFIG)
    tensors: dict[str, torch.Tensor] = {}
    with safe_open(str(f), framework="pt") as st:
        for key in st.keys():
            module, suffix = next(((key[: -len(s) - 1], s) for s in ADAPTER_KEYS if key.endswith("." + s)),
                                  (None, None))
            hf = module[len(PREFIX):] if module is not None and module.startswith(PREFIX) else None
            if hf is None:
                raise CheckpointError(f"{f}: tensor {key} is not a LoRA factor ({PREFIX}<module>.lora_A.weight)")
            if len(at.get(hf, ())) != 1:
                what = "is several of our modules (GPT-2's fused c_attn)" if hf in at else \
                    "is not a Linear module or adapted parameter"
                raise CheckpointError(f"{f}: tensor {key}: {hf} {what} of the {model_cfg.type} model")
            tensors[f"{at[hf][0]}.{suffix}"] = st.get_tensor(key).float()
    rank = cfg.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise CheckpointError(f"{p / CONFIG}: r {rank!r} is not a positive integer")
    try:
        modules = _modules(tensors, units, rank)
    except CheckpointError as e:  # the export's checks; name the file
        raise CheckpointError(f"{f}: {str(e).removeprefix('PEFT export: ')}") from None
    try:
        lora = LoraConfig(rank=rank, alpha=cfg.get("lora_alpha", 8), dropout=cfg.get("lora_dropout", 0.0),
                          targets=_targets([units[m].ours for m in modules], [u.ours for u in units.values()]))
    except ValidationError as err:
        e = err.errors()[0]
        key = {"alpha": "lora_alpha", "dropout": "lora_dropout"}.get(str(e["loc"][0]), str(e["loc"][0]))
        raise CheckpointError(f"{p / CONFIG}: {key} {e.get('input')!r}: {e['msg']}") from None
    return PeftAdapter(lora=lora, tensors=tensors, base_model_name_or_path=cfg.get("base_model_name_or_path"))
