"""The run's model, built where it will live: whole on each rank for ZeRO 0-2, already in partitions for ZeRO-3.

Under ZeRO-3 the family's modules are constructed inside `deepspeed.zero.Init`, which partitions each module's
parameters as soon as that module exists, so no rank ever holds the whole model (a 7B Llama in fp32 is 28 GB).
Values are then written straight into each rank's own partition, one parameter at a time:

- from scratch, by the family's `init_parameter` with a generator seeded by (train.seed, parameter name), so the
  initial weights are the same at any world size and stage, without a broadcast;
- from released weights (`init.path`), tensor by tensor in the order the checkpoint's files hold them.

Families without `init_parameter` (DiT) are built whole and initialised by their own constructor. LoRA
adapters (the `lora` section) are added after the base weights are in place; only they stay trainable. With
`model.moe.expert_parallel` > 1 each rank keeps only its own experts (pretrain/train/expert_parallel.py), swapped in
before any weight is written: each is given its rows of the full value, seeded or loaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import math

import torch
import torch.distributed as dist
from torch import nn

from pretrain.config import Config, expert_parallel
from pretrain.hub.load import load_weights, shape_of, write_parameter
from pretrain.train.expert_parallel import check as check_expert_parallel
from pretrain.train.expert_parallel import parallelize_experts


def parameter_seed(seed: int, name: str) -> int:
    """A 63-bit seed per (run seed, parameter name): independent of construction order and of sharding."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") >> 1


def _init_seeded(model: nn.Module, cfg: Config, init, *, skip: set[str] = frozenset(), only: set[str] | None = None) -> None:
    """`init(name, value, generator)` fills each parameter's full value; written into its partition."""
    for name, p in model.named_parameters():
        if name in skip or (only is not None and name not in only):
            continue
        value = torch.empty(shape_of(p), dtype=torch.float32)
        init(name, value, torch.Generator().manual_seed(parameter_seed(cfg.train.seed, name)))
        write_parameter(p, value)


def _init_adapter(name: str, value: torch.Tensor, g: torch.Generator) -> None:
    # As PEFT: A kaiming-uniform (a = sqrt 5, nn.Linear's default), B zero, so training starts at the base model.
    if ".lora_B" in name:
        nn.init.zeros_(value)
    else:
        nn.init.kaiming_uniform_(value, a=math.sqrt(5), generator=g)


def init_model(model: nn.Module, cfg: Config) -> nn.Module:
    """The run's initial weights on a model built whole (tests, benchmarks, bare loops): what `build_model`
    gives at any world size. Families without `init_parameter` keep their constructor's values."""
    from pretrain.models import get_family

    family = get_family(cfg.model.type)
    if family.init_parameter is not None:
        _init_seeded(model, cfg, lambda n, v, g: family.init_parameter(cfg.model, n, v, g))
    return model


def build_model(cfg: Config, device: torch.device) -> tuple[nn.Module, dict]:
    """(model, parameter counts) for this rank; collective under ZeRO-3 (every rank calls it)."""
    from pretrain.models import get_family

    family = get_family(cfg.model.type)
    with torch.device("meta"):  # the counts, without allocating anything
        counts = family.count_parameters(family.build(cfg.model))
    zero3 = cfg.zero.stage == 3 and family.init_parameter is not None
    if zero3:
        import deepspeed

        from pretrain.train.engine import deepspeed_config, without_cpu_shm_op

        without_cpu_shm_op()  # zero.Init starts DeepSpeed's comm layer

        # Only what construction needs (precision, stage, offload): the batch keys are checked against a world size
        # that DeepSpeed's own comm layer does not know yet.
        full = deepspeed_config(cfg, dist.get_world_size())
        ds = {k: full[k] for k in ("bf16", "zero_optimization")} | {"train_micro_batch_size_per_gpu": cfg.train.micro_batch_size}
        # No `dtype=`: DeepSpeed 0.19.8 ignores it on devices without fp16 and builds bf16 (CPU); the ds config
        # decides (fp32 unless train.precision is bf16).
        scope = deepspeed.zero.Init(config_dict_or_path=ds, remote_device="cpu" if cfg.zero.offload_params else None)
    else:
        scope = contextlib.nullcontext()
    with scope:
        model = family.build(cfg.model)
        if cfg.lora is not None:  # inside the scope: ZeRO-3 partitions the adapters as they are made
            from pretrain.models.lora import apply_lora

            wrapped = apply_lora(model, cfg.lora)
            counts = {**counts, "lora_modules": len(wrapped)}
    check_expert_parallel(cfg, dist.get_world_size() if dist.is_initialized() else 1)
    parallelize_experts(model, expert_parallel(cfg))  # EP > 1: this rank's experts only, before any weight is written
    if not zero3:
        model = model.to(device)
    adapters = {n for n, _ in model.named_parameters() if ".lora_" in n}
    if cfg.init.path:
        from pretrain.hub.sources import open_source

        src = open_source(cfg.init.path, cfg.model.max_seq_len)
        load_weights(model, src.iter_tensors(), f"init.path {src.path}", skip=adapters)
    elif family.init_parameter is not None:
        _init_seeded(model, cfg, lambda n, v, g: family.init_parameter(cfg.model, n, v, g), skip=adapters)
    if adapters:
        _init_seeded(model, cfg, _init_adapter, only=adapters)
        counts["params_trainable"] = sum(math.prod(shape_of(p)) for n, p in model.named_parameters() if n in adapters)
    return model, counts
