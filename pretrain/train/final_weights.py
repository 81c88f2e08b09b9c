"""The trained model as one file: consolidated weights in safetensors beside the model config.

Under ZeRO-3 the parameters are gathered from every rank first, and with expert parallelism each layer's experts
from the ranks holding them (collectives), so this is called by all ranks; rank 0 writes. A tensor shared by two modules (tied embeddings) is stored once, under its first
name. `pretrain.hub.run_weights` reads them back.
"""

from __future__ import annotations

import contextlib
import itertools
import json
from pathlib import Path

import yaml
from safetensors.torch import save_file

from pretrain.atomic import atomic_path, atomic_write
from pretrain.config import Config, dump_config
from pretrain.redact import redact_yaml
from pretrain.train.expert_parallel import full_value

MAX_SHARD_BYTES = 5e9  # as Hugging Face's save_pretrained


def _one_at_a_time(module, zero3: bool, bf16: bool):
    """(name, fp32 CPU tensor) per parameter, each shared one once. Under ZeRO-3 each is gathered alone, so no
    rank's accelerator holds more than one whole parameter; a bf16 run gives its fp32 master weights (those
    the optimizer updates), not the bf16 working copy. Collective: every rank iterates it to the end."""
    import deepspeed  # here, not at the top: sampling on the driver must not pay for (or print) its import
    from deepspeed.utils import safe_get_full_fp32_param

    for name, p in module.named_parameters():
        scope = deepspeed.zero.GatheredParameters([p], modifier_rank=None) if zero3 else contextlib.nullcontext()
        with scope:
            master = safe_get_full_fp32_param(p) if bf16 and p.requires_grad else None
            value = master if master is not None else p
            yield name, full_value(p, value).detach().float().cpu().clone()  # an expert-parallel slice: all experts


def save_final_weights(engine, cfg: Config, out: Path, rank: int, *, ema=None, data: dict | None = None) -> None:
    """`model.safetensors` (the trained weights), `model.yaml` and the run's `config.yaml`; with an EMA also `ema.safetensors` (the
    averaged weights with the same names, buffers included); `data.json`, what the data was (image shape and
    classes, tokenizer), so the model can be used without the data."""
    import torch.distributed as dist

    module = engine.module
    values = _one_at_a_time(module, cfg.zero.stage == 3, cfg.train.precision == "bf16")
    buffers = {k: b.detach().float().cpu().contiguous() for k, b in module.named_buffers() if k in module.state_dict()}
    if rank == 0:
        from pretrain.hub.safetensors_io import INDEX, write_shards

        out.mkdir(parents=True, exist_ok=True)
        for stale in [*out.glob("model-*-of-*.safetensors"), out / INDEX]:  # an earlier end of this run
            stale.unlink(missing_ok=True)
        # Shards of at most MAX_SHARD_BYTES, written as they fill: rank 0 holds one shard, never the model.
        write_shards(out, itertools.chain(values, buffers.items()), MAX_SHARD_BYTES)
        atomic_write(out / "model.yaml", yaml.safe_dump(cfg.model.model_dump(mode="json"), sort_keys=False))
        # The whole run's (objective, seed, data), its credentials masked: readers take its model and objective.
        atomic_write(out / "config.yaml", redact_yaml(dump_config(cfg)))
        if data is not None:
            atomic_write(out / "data.json", json.dumps(data, indent=1, sort_keys=True) + "\n")
    else:
        for _ in values:  # every rank takes part in each parameter's gather
            pass
    if ema is not None:
        # After the raw weights' gather: one parameter at a time, so no rank holds a second full model.
        averaged = {n: t for n, t in ema.gathered(rank, dist.get_world_size())}
        if rank == 0:
            with atomic_path(out / "ema.safetensors") as tmp:
                save_file({**averaged, **buffers}, str(tmp), metadata={"ema_decay": str(ema.decay),
                                                                      "ema_updates": str(ema.updates)})
