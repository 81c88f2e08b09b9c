"""Per-rank RNG states as JSON (`rng-rank<R>.json` in a checkpoint's step directory): python's, numpy's, torch's and
CUDA's, saved and restored without unpickling anything.

Checkpoints of earlier versions hold them as torch pickles (`rng-rank<R>.pt`), loaded only when the user says the
checkpoint is trusted. DeepSpeed's own files are pickles whatever we do (README.md, "Trust").
"""

from __future__ import annotations

import base64
import json
import os
import random
from pathlib import Path

import numpy as np
import torch

from pretrain.errors import CheckpointPickleError

TRUST_PICKLES = "PRETRAIN_TRUST_CHECKPOINT_PICKLES"
RNG_FORMAT = 1


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
