"""Checkpoints: `checkpoints/step-<N>/` with DeepSpeed's state of every rank, the data-stream state,
each rank's RNG states, the step and the resolved config.

A checkpoint is written as `step-<N>.tmp`, renamed once every rank has finished, and only then named in
`latest` (written atomically), so a crash mid-write never leaves something that loads. Resume reads
`latest`; a run whose step is complete never re-trains it.

Resuming ZeRO states at another world size goes through DeepSpeed's universal checkpoint: rank 0
converts `step-<N>` once into `step-<N>/universal` (atomically, kept for later resumes) and every rank
loads that with `checkpoint.load_universal`.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import random
import shutil
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

LATEST = "latest"


def _tag(step: int) -> str:
    return f"step-{step}"


def step_dir(ckpt_dir: Path, step: int) -> Path:
    return ckpt_dir / _tag(step)


def latest_step(ckpt_dir: Path) -> int | None:
    """The step of the newest complete checkpoint, or None."""
    f = ckpt_dir / LATEST
    if not f.exists():
        return None
    tag = f.read_text().strip()
    return int(tag.removeprefix("step-")) if (ckpt_dir / tag).is_dir() else None


# Per-rank RNG states are JSON (`rng-rank<R>.json`): resuming never unpickles them. Checkpoints of
# earlier versions hold them as torch pickles (`rng-rank<R>.pt`), loaded only when the user says the
# checkpoint is trusted. DeepSpeed's own files are pickles whatever we do (README.md, "Trust").
TRUST_PICKLES = "PRETRAIN_TRUST_CHECKPOINT_PICKLES"
RNG_FORMAT = 1


class CheckpointPickleError(ValueError):
    """A checkpoint file that would have to be unpickled without the user's opt-in; one line."""


def rng_file(directory: Path, rank: int) -> Path:
    return directory / f"rng-rank{rank}.json"


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _tensor(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def rng_state() -> dict:
    """This process's python, numpy, torch and CUDA RNG states as plain JSON values."""
    version, mt, gauss = random.getstate()
    kind, key, pos, has_gauss, cached = np.random.get_state()
    return {
        "format": RNG_FORMAT,
        "python": {"version": version, "state": list(mt), "gauss_next": gauss},
        "numpy": {"kind": kind, "key": [int(k) for k in key], "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
        "torch": _b64(torch.get_rng_state()),
        "cuda": [_b64(t) for t in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else None,
    }


def _restore(python, numpy, cpu: torch.Tensor, cuda: list[torch.Tensor] | None) -> None:
    random.setstate(python)
    np.random.set_state(numpy)
    torch.set_rng_state(cpu)
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` returned (the JSON form); CUDA states only where CUDA is available."""
    py, npy = state["python"], state["numpy"]
    _restore(
        (py["version"], tuple(py["state"]), py["gauss_next"]),
        (npy["kind"], np.array(npy["key"], dtype=np.uint32), npy["pos"], npy["has_gauss"], npy["cached_gaussian"]),
        _tensor(state["torch"]),
        None if state["cuda"] is None else [_tensor(t) for t in state["cuda"]],
    )


def save_rng(directory: Path, rank: int) -> None:
    rng_file(directory, rank).write_text(json.dumps(rng_state()))


def load_rng(directory: Path, rank: int) -> bool:
    """Restore this rank's RNG from `directory`; False when it holds none for this rank (the world size
    grew; the data order does not depend on it). An old-format pickle loads only with the opt-in."""
    f = rng_file(directory, rank)
    if f.exists():
        state = json.loads(f.read_text())
        if state.get("format") != RNG_FORMAT:
            raise ValueError(f"{f}: RNG state format {state.get('format')!r}, this version reads {RNG_FORMAT}")
        set_rng_state(state)
        return True
    legacy = directory / f"rng-rank{rank}.pt"
    if not legacy.exists():
        return False
    if os.environ.get(TRUST_PICKLES) != "1":
        raise CheckpointPickleError(
            f"{legacy} is a pickle (a checkpoint of an earlier version) and loading it can run code: "
            f"set {TRUST_PICKLES}=1 to load it if you trust {directory}"
        )
    old = torch.load(legacy, weights_only=False)
    _restore(old["python"], old["numpy"], old["torch"], old["cuda"])
    return True


def _has_frozen(engine) -> bool:
    return any(not p.requires_grad for p in engine.module.parameters())


@contextlib.contextmanager
def _without_frozen(engine):
    """Yields whether the model has frozen parameters; while inside, the engine's module state leaves out every
    name of a frozen tensor. DeepSpeed's own exclusion goes by `named_parameters()`, which lists a shared tensor
    once, so the tied alias of a frozen embedding (`lm_head.weight`) would still be saved: 113 MB of SmolLM2."""
    if not _has_frozen(engine):
        yield False
        return
    frozen = {id(p) for p in engine.module.parameters() if not p.requires_grad}
    drop = {n for n, t in engine.module.state_dict(keep_vars=True).items() if id(t) in frozen}
    full = engine.module_state_dict
    engine.module_state_dict = lambda *a, **k: OrderedDict((n, t) for n, t in full(*a, **k).items() if n not in drop)
    try:
        yield True
    finally:
        del engine.module_state_dict


def save(engine, ckpt_dir: Path, step: int, client_state: dict, rank: int, extra=None) -> Path:
    """Collective: every rank calls it. `extra(directory)` writes what else belongs to the step (the EMA)
    into the not-yet-renamed directory, on every rank. Returns the final directory."""
    final, tmp_tag = ckpt_dir / _tag(step), _tag(step) + ".tmp"
    if rank == 0:
        shutil.rmtree(ckpt_dir / tmp_tag, ignore_errors=True)  # debris of an earlier crash
    dist.barrier()
    # A run with frozen weights (LoRA) saves only what trains: the frozen base is rebuilt from train.init_from.
    with _without_frozen(engine) as frozen:
        engine.save_checkpoint(str(ckpt_dir), tag=tmp_tag, client_state=client_state, save_latest=False,
                               exclude_frozen_parameters=frozen)
    save_rng(ckpt_dir / tmp_tag, rank)
    if extra is not None:
        extra(ckpt_dir / tmp_tag)
    dist.barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(ckpt_dir / tmp_tag, final)
        latest_tmp = ckpt_dir / (LATEST + ".tmp")
        latest_tmp.write_text(_tag(step))
        os.replace(latest_tmp, ckpt_dir / LATEST)
        meta = {"step": step, "world_size": dist.get_world_size(), "zero_stage": engine.zero_optimization_stage()}
        (final / "meta.json").write_text(json.dumps(meta))
    dist.barrier()
    return final


def needs_universal(ckpt_dir: Path, step: int | None, world_size: int) -> bool:
    """True when the checkpoint holds ZeRO-partitioned states for another world size."""
    if step is None:
        return False
    meta = json.loads((ckpt_dir / _tag(step) / "meta.json").read_text())
    return meta["zero_stage"] > 0 and meta["world_size"] != world_size


def prepare_universal(ckpt_dir: Path, step: int, rank: int) -> None:
    """Collective: rank 0 converts the checkpoint to DeepSpeed's universal format if not done yet."""
    src = ckpt_dir / _tag(step)
    out = src / "universal"
    if rank == 0 and not out.is_dir():
        from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

        tmp = src / "universal.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        ds_to_universal(argparse.Namespace(
            input_folder=str(src), output_folder=str(tmp), num_extract_workers=1, num_merge_workers=1,
            keep_temp_folder=False, strict=True, inject_missing_state=True,
        ))
        os.replace(tmp, out)
    dist.barrier()


def load(engine, ckpt_dir: Path, step: int, rank: int, universal: bool = False) -> dict:
    """Collective: restore engine (model, optimizer, scheduler) and this rank's RNG; return client state."""
    tag = _tag(step) + ("/universal" if universal else "")
    _, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_module_strict=not _has_frozen(engine))
    if client_state is None:
        raise RuntimeError(f"checkpoint {ckpt_dir / tag} could not be loaded")
    load_rng(ckpt_dir / _tag(step), rank)
    return client_state
