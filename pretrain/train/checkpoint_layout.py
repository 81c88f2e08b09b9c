"""The layout of a run's checkpoint location, shared by saving (pretrain/train/checkpoint.py) and resuming
(pretrain/train/resume.py): where it is, the step directories' names, their markers, and which steps are complete.
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

from pretrain.config import Config, run_dir
from pretrain.train.owner import holder_of
from pretrain.train.storage import Storage

LATEST, COMPLETE, META = "latest", "COMPLETE", "meta.json"
OWNER = "owner.json"  # the nonce of the attempt whose save began in a step directory (pretrain/train/owner.py)
# The loop's own state (step, units, the data streams' positions, the resolved config) is JSON beside
# DeepSpeed's files, not DeepSpeed's pickled client state: resuming never unpickles it.
STATE = "state.json"
FORMAT = 2  # of meta.json and COMPLETE; a meta.json without "format" is an earlier version's (complete when present)
POLL_S = 0.2  # how often rank 0 looks for the other ranks' markers, and they for the universal conversion's


def step_tag(step: int) -> str:
    return f"step-{step}"


_STEP = re.compile(r"step-(\d+)")


def _step_of(name: str) -> int | None:
    m = _STEP.fullmatch(name)
    return int(m.group(1)) if m else None


def location(cfg: Config) -> str:
    """Where the run's checkpoints live: `<cluster.storage>/<run.name>/checkpoints`, else under the run dir."""
    if cfg.cluster.storage:
        return f"{cfg.cluster.storage.rstrip('/')}/{cfg.run.name}/checkpoints"
    return str(run_dir(cfg) / "checkpoints")


def staging_dir(cfg: Config, rank: int) -> Path:
    """This rank's local directory for a save before it moves to the location, and for downloads."""
    return run_dir(cfg) / ".staging" / f"rank-{rank}"


class CheckpointStoreError(RuntimeError):
    """The location failed us: an upload failed, a rank never finished its save, the store was unreachable.
    A failure of the machines, not of the input: a restart resumes from the newest complete checkpoint."""


def has_frozen(engine) -> bool:
    """Whether the model has frozen parameters: its checkpoints hold only what trains (checkpoint.py)."""
    return any(not p.requires_grad for p in engine.module.parameters())


def is_complete(store: Storage, step: int) -> bool:
    """The step's marker exists (or it is an earlier version's checkpoint: meta.json was its last write)."""
    tag = step_tag(step)
    if store.exists(f"{tag}/{COMPLETE}"):
        return True
    meta = store.read_text(f"{tag}/{META}")
    with contextlib.suppress(ValueError):
        return meta is not None and "format" not in json.loads(meta)
    return False


def _json(store: Storage, rel: str) -> dict | None:
    text = store.read_text(rel)
    with contextlib.suppress(ValueError):
        value = json.loads(text) if text is not None else None
        return value if isinstance(value, dict) else None
    return None


def nonce_of(store: Storage, step: int) -> str | None:
    """The nonce of the attempt that wrote (or began writing) a step: its `COMPLETE`'s, else its `owner.json`'s;
    None for a step without either (an earlier version's)."""
    tag = step_tag(step)
    for name in (COMPLETE, OWNER):
        marker = _json(store, f"{tag}/{name}")
        if marker is not None and marker.get("nonce"):
            return marker["nonce"]
    return None


def done_marker(text: str) -> tuple[str | None, dict[str, int]]:
    """(nonce, files with their sizes) of a `rank-<R>.done` (an earlier version's holds the files only)."""
    value = json.loads(text)
    if "files" in value and isinstance(value.get("files"), dict):
        return value.get("nonce"), value["files"]
    return None, value


def verified(store: Storage, step: int) -> bool:
    """Whether a complete step's files are all one attempt's: every rank's marker carries the nonce of its
    `COMPLETE`. A rank marker of another attempt (a second writer of the location saved the same step) means its
    files may be that attempt's: resume does not trust the step. Earlier versions' steps carry no nonce."""
    tag = step_tag(step)
    complete = _json(store, f"{tag}/{COMPLETE}")
    if complete is None or not complete.get("nonce"):
        return complete is not None or is_complete(store, step)
    for r in range(int(complete.get("world_size", 0))):
        text = store.read_text(f"{tag}/rank-{r}.done")
        try:
            nonce = done_marker(text)[0] if text is not None else None
        except ValueError:
            return False
        if nonce != complete["nonce"]:
            return False
    return True


def holders(store: Storage) -> set[str]:
    """The lock tokens of every attempt whose markers are in the location (pretrain/train/owner.py)."""
    return {holder_of(n) for n in (nonce_of(store, s) for s in all_steps(store)) if n}


def all_steps(store: Storage) -> list[int]:
    """Steps with a directory at `store`, complete or not, ascending."""
    return sorted(s for s in map(_step_of, store.children()) if s is not None)


def complete_steps(store: Storage) -> list[int]:
    """Steps with a complete checkpoint at `store`, ascending."""
    return [s for s in all_steps(store) if is_complete(store, s)]


def listed(store: Storage) -> list[str]:
    """The files a complete directory holds, from its marker (an earlier version's: what is there)."""
    text = store.read_text(COMPLETE)
    if text is not None:
        return sorted(json.loads(text)["files"])
    return sorted(p[len(store.root) + 1:] for p in store.fs.find(store.root))
