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
import json
import os
import random
import shutil
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


def rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(engine, ckpt_dir: Path, step: int, client_state: dict, rank: int, extra=None) -> Path:
    """Collective: every rank calls it. `extra(directory)` writes what else belongs to the step (the EMA)
    into the not-yet-renamed directory, on every rank. Returns the final directory."""
    final, tmp_tag = ckpt_dir / _tag(step), _tag(step) + ".tmp"
    if rank == 0:
        shutil.rmtree(ckpt_dir / tmp_tag, ignore_errors=True)  # debris of an earlier crash
    dist.barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tmp_tag, client_state=client_state, save_latest=False)
    torch.save(rng_state(), ckpt_dir / tmp_tag / f"rng-rank{rank}.pt")
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
    _, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if client_state is None:
        raise RuntimeError(f"checkpoint {ckpt_dir / tag} could not be loaded")
    rng = ckpt_dir / _tag(step) / f"rng-rank{rank}.pt"
    if rng.exists():  # absent when the world size grew; the data order does not depend on it
        set_rng_state(torch.load(rng, weights_only=False))
    return client_state
