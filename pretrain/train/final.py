"""The trained model as one file: consolidated weights in safetensors beside the model config.

Under ZeRO-3 the parameters are gathered from every rank first (a collective), so this is called by all
ranks; rank 0 writes. A tensor shared by two modules (tied embeddings) is stored once, under its first
name. `load_final_model` rebuilds any registered family's model on CPU.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import yaml
from safetensors.torch import load_file, save_file

from pretrain.atomic import atomic_path, atomic_write
from pretrain.config import Config, typed_section


def _unique_tensors(module) -> dict:
    """Parameters (each shared one once, under its first name) and persistent buffers."""
    out = {k: p for k, p in module.named_parameters()}  # named_parameters skips repeats of a tensor
    names = set(module.state_dict())
    out.update({k: b for k, b in module.named_buffers() if k in names})
    return out


def save_final_weights(engine, cfg: Config, out: Path, rank: int) -> None:
    import deepspeed  # here, not at the top: sampling on the driver must not pay for (or print) its import

    module = engine.module
    gather = (
        deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)
        if cfg.zero.stage == 3 else contextlib.nullcontext()
    )
    with gather:
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            # Always fp32 on disk: exact for fp32 runs, lossless widening for bf16 ones.
            tensors = {k: v.detach().float().cpu().contiguous() for k, v in _unique_tensors(module).items()}
            with atomic_path(out / "model.safetensors") as tmp:
                save_file(tensors, str(tmp))
            atomic_write(out / "model.yaml", yaml.safe_dump(cfg.model.model_dump(mode="json"), sort_keys=False))


def load_final_model(path: Path):
    """The model of a run's `final/` directory, on CPU, in eval mode."""
    from pretrain.models import get_family

    mcfg = typed_section("model", yaml.safe_load((path / "model.yaml").read_text()))
    model = get_family(mcfg.type).build(mcfg)
    state = load_file(str(path / "model.safetensors"))
    expected = set(_unique_tensors(model))
    if set(state) != expected:
        raise ValueError(f"{path}: weights do not match the model (missing {sorted(expected - set(state))}, "
                         f"unexpected {sorted(set(state) - expected)})")
    model.load_state_dict(state, strict=False)  # tied aliases are filled by their shared tensor
    return model.eval()
