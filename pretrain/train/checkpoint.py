"""Checkpoints: `<location>/step-<N>/` with DeepSpeed's state of every rank, the data-stream state, each rank's
RNG states, the step and the resolved config, where `<location>` is `<cluster.storage>/<run.name>/checkpoints`
(a shared path or an object-store URL) or by default `<run.dir>/<run.name>/checkpoints`; every location is
read and written through `pretrain.train.storage` (fsspec), one code path for all.

Saving. DeepSpeed writes to a local directory, so each rank saves into its own staging directory under the
run directory (`.staging/rank-<R>/`), which costs training the time of that local write; a background thread
then moves the files to the location (a rename, or an upload) and the next save, or the end of the run,
waits for it. A save is complete only when its `COMPLETE` marker exists: each rank, once its files are in
place (fsynced on a file system, PUT on an object store), writes `step-<N>/rank-<R>.done` listing them; rank
0 waits for every rank's (polling, no collective: the training thread owns the collectives), writes
`meta.json` before that, then `COMPLETE` listing every file and its size, and only then `latest`. A crash at
any point leaves a step without a marker, which resume never reads: it picks the newest step with a marker
(`latest` is a hint for people and tools, never trusted by resume). Retention runs after the marker: the
newest `train.ckpt_keep` complete checkpoints stay, and every `train.ckpt_keep_every`-th step for good;
incomplete leftovers older than the newest complete one go (one writer per run: the run lock).

Resuming. Rank 0 decides where (this run's newest complete checkpoint, else `train.branch_from`'s) and
broadcasts it. On an object store each rank downloads the files it reads into its staging directory. At
another world size ZeRO states go through DeepSpeed's universal checkpoint: rank 0 converts once (in its
staging directory) and stores the result as `step-<N>/universal` with its own marker, kept for later
resumes, while the other ranks poll for that marker: no collective waits on the conversion, however long.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import random
import re
import shutil
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from pretrain.config import Config, run_dir
from pretrain.errors import CheckpointPickleError, ResumeError
from pretrain.train.storage import Storage
from pretrain.urls import first_line

LATEST, COMPLETE, META = "latest", "COMPLETE", "meta.json"
# The loop's own state (step, units, the data streams' positions, the resolved config) is JSON beside
# DeepSpeed's files, not DeepSpeed's pickled client state: resuming never unpickles it.
STATE = "state.json"
FORMAT = 2  # of meta.json and COMPLETE; a meta.json without "format" is an earlier version's (complete when present)
POLL_S = 0.2  # how often rank 0 looks for the other ranks' markers, and they for the universal conversion's


def _tag(step: int) -> str:
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


# Crash injection for the tests: PRETRAIN_CKPT_CRASH=<point> raises at that point of a save (in its upload
# thread), leaving the location as a crash there would. The points, in the order a save passes them:
CRASH_ENV = "PRETRAIN_CKPT_CRASH"
CRASH_POINTS = ("after-rank-files", "after-meta", "before-latest", "after-latest", "pruning")


class InjectedCrash(RuntimeError):
    pass


def _crash_point(name: str) -> None:
    if os.environ.get(CRASH_ENV) == name:
        raise InjectedCrash(f"injected crash at {name}")


# Per-rank RNG states are JSON (`rng-rank<R>.json`): resuming never unpickles them. Checkpoints of
# earlier versions hold them as torch pickles (`rng-rank<R>.pt`), loaded only when the user says the
# checkpoint is trusted. DeepSpeed's own files are pickles whatever we do (README.md, "Trust").
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


# ----------------------------------------------------------------------------- what is complete


def is_complete(store: Storage, step: int) -> bool:
    """The step's marker exists (or it is an earlier version's checkpoint: meta.json was its last write)."""
    tag = _tag(step)
    if store.exists(f"{tag}/{COMPLETE}"):
        return True
    meta = store.read_text(f"{tag}/{META}")
    with contextlib.suppress(ValueError):
        return meta is not None and "format" not in json.loads(meta)
    return False


def _steps(store: Storage) -> list[int]:
    return sorted(s for s in map(_step_of, store.children()) if s is not None)


def complete_steps(store: Storage) -> list[int]:
    """Steps with a complete checkpoint at `store`, ascending."""
    return [s for s in _steps(store) if is_complete(store, s)]


def _listed(store: Storage) -> list[str]:
    """The files a complete directory holds, from its marker (an earlier version's: what is there)."""
    text = store.read_text(COMPLETE)
    if text is not None:
        return sorted(json.loads(text)["files"])
    return sorted(p[len(store.root) + 1:] for p in store.fs.find(store.root))


def _remove_step(store: Storage, tag: str) -> None:
    store.remove(f"{tag}/{COMPLETE}")  # first: a crash while deleting leaves an incomplete step, never a torn one
    store.remove(tag)


def prune(store: Storage, newest: int, keep: int | None, keep_every: int | None) -> list[int]:
    """After `newest` is complete: remove complete checkpoints beyond the newest `keep` (none: keep all) that
    are not multiples of `keep_every`, incomplete ones older than `newest`, and the universal conversions of
    a checkpoint branched from (`branch-step-<N>`). Returns the steps removed."""
    steps = _steps(store)
    complete = [s for s in steps if is_complete(store, s)]
    kept = set(complete if keep is None else complete[-keep:]) | {newest}
    if keep_every:
        kept |= {s for s in complete if s % keep_every == 0}
    doomed = sorted([s for s in complete if s not in kept] + [s for s in steps if s not in complete and s < newest])
    for s in doomed:
        _remove_step(store, _tag(s))
        _crash_point("pruning")
    for name in store.children():
        if name.startswith("branch-step-") or (name.endswith(".tmp") and name.startswith("step-")):
            store.remove(name)  # a branch's conversion, no longer needed; an earlier version's debris
    return doomed


# ----------------------------------------------------------------------------- saving


class Checkpointer:
    """One rank's side of saving a run's checkpoints to `store` (see the module docstring). `save` is a
    collective that returns once this rank's files are written locally; the rest runs in a thread."""

    def __init__(self, store: Storage, staging: Path, rank: int, world: int, *, keep: int | None = None,
                 keep_every: int | None = None, timeout_s: float = 1800.0):
        self.store, self.staging, self.rank, self.world = store, staging, rank, world
        self.keep, self.keep_every, self.timeout_s = keep, keep_every, timeout_s
        # A crashed attempt's leftovers (one writer per run); rank 0 also clears those of ranks that are gone.
        # Before `decide`, a collective: no rank writes into its staging directory before that.
        shutil.rmtree(staging.parent if rank == 0 and staging.parent.name == ".staging" else staging,
                      ignore_errors=True)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._pending: int | None = None
        # Of the last save: waited_s for the one before, local_write_s (training stalls this long), upload_s.
        self.stats: dict = {}

    def save(self, engine, step: int, client_state: dict, extra=None) -> None:
        """Collective. `extra(directory)` writes what else belongs to the step (the EMA) on every rank."""
        t0 = time.perf_counter()
        self.wait()  # the previous save's upload: at most one in flight
        waited, t0 = time.perf_counter() - t0, time.perf_counter()
        tag = _tag(step)
        local = self.staging / tag
        shutil.rmtree(local, ignore_errors=True)
        if self.rank == 0 and self.store.children(tag):  # an earlier attempt's incomplete step: never merge into it
            _remove_step(self.store, tag)
        dist.barrier()
        # A run with frozen weights (LoRA) saves only what trains: the frozen base is rebuilt from train.init_from.
        with _without_frozen(engine) as frozen:
            engine.save_checkpoint(str(self.staging), tag=tag, client_state={}, save_latest=False,
                                   exclude_frozen_parameters=frozen)
        save_rng(local, self.rank)
        if extra is not None:
            extra(local)
        if self.rank == 0:
            (local / STATE).write_text(json.dumps(client_state))
            meta = {"format": FORMAT, "step": step, "world_size": self.world,
                    "zero_stage": engine.zero_optimization_stage()}
            (local / META).write_text(json.dumps(meta))
        sizes = {str(p.relative_to(local)): p.stat().st_size for p in sorted(local.rglob("*")) if p.is_file()}
        self.stats = {"step": step, "waited_s": waited, "local_write_s": time.perf_counter() - t0}
        self._pending = step
        self._thread = threading.Thread(target=self._run_upload, args=(step, local, sizes), daemon=True,
                                        name=f"checkpoint-upload-{tag}")
        self._thread.start()

    def _run_upload(self, step: int, local: Path, sizes: dict[str, int]) -> None:
        try:
            t0 = time.perf_counter()
            self._upload(step, local, sizes)
            self.stats["upload_s"] = time.perf_counter() - t0
        except BaseException as e:  # noqa: BLE001 - raised in the training thread by wait()
            self._error = e

    def _upload(self, step: int, local: Path, sizes: dict[str, int]) -> None:
        tag, store = _tag(step), self.store
        store.put(local, [f for f in sizes if f != META], tag)
        _crash_point("after-rank-files")
        if META in sizes:  # rank 0's meta.json after its other files
            store.put(local, [META], tag)
            _crash_point("after-meta")
        store.write_text(f"{tag}/rank-{self.rank}.done", json.dumps(sizes))
        shutil.rmtree(local, ignore_errors=True)
        if self.rank != 0:
            return
        files = self._every_rank(tag)
        store.write_text(f"{tag}/{COMPLETE}", json.dumps({"format": FORMAT, "step": step, "world_size": self.world,
                                                          "files": files}))
        _crash_point("before-latest")
        store.write_text(LATEST, tag)
        _crash_point("after-latest")
        prune(store, step, self.keep, self.keep_every)

    def _every_rank(self, tag: str) -> dict[str, int]:
        """Rank 0: wait for every rank's marker; the union of the files they list."""
        want = {f"rank-{r}.done" for r in range(self.world)}
        deadline = time.monotonic() + self.timeout_s
        while not want <= set(self.store.children(tag)):
            if time.monotonic() > deadline:
                missing = sorted(want - set(self.store.children(tag)))
                raise TimeoutError(f"no {', '.join(missing)} after {self.timeout_s:.0f} s")
            time.sleep(POLL_S)
        files: dict[str, int] = {}
        for name in sorted(want):
            files.update(json.loads(self.store.read_text(f"{tag}/{name}")))
        return dict(sorted(files.items()))

    @property
    def uploading(self) -> bool:
        """Whether this rank's last save is still moving to the location."""
        return self._thread is not None and self._thread.is_alive()

    def wait(self) -> None:
        """Until this rank's last save is in place (rank 0: complete, marker and pruning done); raises
        CheckpointStoreError when it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            e, self._error = self._error, None
            raise CheckpointStoreError(f"checkpoint {_tag(self._pending)} to {self.store.url}: "
                                      f"{type(e).__name__}: {first_line(e)}") from e

    def close(self) -> None:
        """End of the run: wait for the last upload; remove the staging directory (nothing stays under run.dir)."""
        self.wait()
        shutil.rmtree(self.staging, ignore_errors=True)
        with contextlib.suppress(OSError):
            self.staging.parent.rmdir()  # .staging, once no rank has anything left in it


# ----------------------------------------------------------------------------- where to resume


@dataclass(frozen=True)
class Plan:
    """Where a run resumes, in plain values (rank 0 broadcasts it). `step` None: it starts fresh."""

    step: int | None = None
    step_url: str | None = None  # the checkpoint's directory
    universal_url: str | None = None  # its universal conversion, when the world size differs
    branched: bool = False  # from another run's checkpoint (train.branch_from)


def parse_branch(spec: str) -> tuple[str, int | None]:
    """`PATH[@STEP]` -> (PATH, STEP or None)."""
    m = re.fullmatch(r"(.+)@(\d+)", spec)
    return (m.group(1), int(m.group(2))) if m else (spec, None)


def _branch_source(spec: str) -> tuple[Storage, int]:
    url, step = parse_branch(spec)
    store = Storage(url)
    if "checkpoints" in store.children():  # a run directory (or a run's prefix in cluster.storage)
        store = store.child("checkpoints")
    steps = complete_steps(store)
    if not steps:
        raise ResumeError(f"train.branch_from: {url}: no complete checkpoint there")
    if step is None:
        return store, steps[-1]
    if step not in steps:
        raise ResumeError(f"train.branch_from: {spec}: no complete checkpoint step-{step} in {store.url} "
                          f"(complete: {', '.join(map(str, steps))})")
    return store, step


def plan_resume(own: Storage, branch_from: str | None, world: int) -> Plan:
    """Rank 0's decision: this run's newest complete checkpoint, else `branch_from`'s, else none."""
    steps = complete_steps(own)
    if steps:
        src, step, branched = own, steps[-1], False
    elif branch_from:
        (src, step), branched = _branch_source(branch_from), True
    else:
        return Plan()
    tag = _tag(step)
    text = src.read_text(f"{tag}/{META}")
    if text is None:
        raise ResumeError(f"{src.url}/{tag}: no {META}")
    meta = json.loads(text)
    universal = None
    if meta["zero_stage"] > 0 and meta["world_size"] != world:  # ZeRO partitions of another world size
        universal = f"{own.url}/branch-{tag}/universal" if branched else f"{src.url}/{tag}/universal"
    return Plan(step, f"{src.url}/{tag}", universal, branched)


def decide(own: Storage, branch_from: str | None, rank: int, world: int) -> Plan:
    """Collective: rank 0 decides where to resume and every rank gets its answer (or its error), so ranks
    never disagree on a file system that shows them different states."""
    box: list = [None]
    if rank == 0:
        try:
            box[0] = asdict(plan_resume(own, branch_from, world))
        except Exception as e:  # noqa: BLE001 - every rank raises it below, none is left in the broadcast
            # ValueError (ResumeError, StorageError, JSON): the input's; anything else: the store's.
            box[0] = {"error": first_line(e), "resume": isinstance(e, ValueError)}
    dist.broadcast_object_list(box, src=0)
    if "error" in box[0]:
        raise (ResumeError if box[0]["resume"] else CheckpointStoreError)(box[0]["error"])
    return Plan(**box[0])


def prepare_universal(plan: Plan, staging: Path, rank: int, timeout_s: float | None = None) -> None:
    """Collective: rank 0 converts the checkpoint to DeepSpeed's universal format unless that is done, while
    the others poll for its marker (no collective: a large model's conversion may outlast the collective
    timeout); one barrier when it is there."""
    out = Storage(plan.universal_url)
    if rank == 0:
        if not out.exists(COMPLETE):
            _convert(Storage(plan.step_url), out, staging)
    else:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not out.exists(COMPLETE):
            if deadline is not None and time.monotonic() > deadline:
                raise CheckpointStoreError(f"{out.url}: the universal conversion did not finish in {timeout_s:.0f} s")
            time.sleep(POLL_S)
    dist.barrier()


def _convert(src: Storage, out: Storage, staging: Path) -> None:
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    work = staging / "universal-work"
    shutil.rmtree(work, ignore_errors=True)
    if src.local:
        folder = src.local_path()
    else:
        folder = work / "in" / src.url.rsplit("/", 1)[-1]
        src.download([f for f in _listed(src) if not f.startswith("universal/") and not f.endswith(".done")], folder)
    result = work / "out" / "universal"
    ds_to_universal(argparse.Namespace(
        input_folder=str(folder), output_folder=str(result), num_extract_workers=1, num_merge_workers=1,
        keep_temp_folder=False, strict=True, inject_missing_state=True,
    ))
    sizes = {str(p.relative_to(result)): p.stat().st_size for p in sorted(result.rglob("*")) if p.is_file()}
    out.remove("")  # a crashed conversion's partial upload
    out.put(result, list(sizes), "")
    out.write_text(COMPLETE, json.dumps({"format": FORMAT, "files": sizes}))
    shutil.rmtree(work, ignore_errors=True)


_RANKED = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_|rng-rank(\d+)\.")


def _needed(rel: str, rank: int, universal: bool) -> bool:
    """Whether this rank reads the checkpoint file `rel`: DeepSpeed reads the shared model states and its
    own partition's files (or, at another world size, the universal directory instead); the RNG state is
    per rank; the EMA's reassembly reads every rank's piece."""
    if rel.startswith("universal/") or rel.endswith(".done") or rel == COMPLETE:
        return False
    if universal and rel.endswith("_states.pt"):
        return False
    m = _RANKED.match(rel)
    return m is None or int(m.group(1) or m.group(2)) == rank


@contextlib.contextmanager
def opened(plan: Plan, staging: Path, rank: int) -> Iterator[tuple[Path, Path | None]]:
    """(step directory, universal directory or None) on this machine, for `load` and the EMA: the
    checkpoint itself on a file system; on an object store the files this rank reads, downloaded into its
    staging directory and removed when the block ends."""
    src = Storage(plan.step_url)
    universal = Storage(plan.universal_url) if plan.universal_url else None
    tmp = staging / "resume"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if src.local:
            step_dir = src.local_path()
        else:
            step_dir = tmp / src.url.rsplit("/", 1)[-1]
            src.download([f for f in _listed(src) if _needed(f, rank, universal is not None)], step_dir)
            step_dir.mkdir(parents=True, exist_ok=True)
        udir = None
        if universal is not None:
            udir = universal.local_path() if universal.local else tmp / "universal" / "universal"
            if not universal.local:
                universal.download(_listed(universal), udir)
        yield step_dir, udir
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load(engine, step_dir: Path, rank: int, universal_dir: Path | None = None, *, own_schedule: bool = False) -> dict:
    """Collective: restore engine (model, optimizer, scheduler) and this rank's RNG; return the loop's state
    (`state.json`: step, units, data, config; JSON, never unpickled).
    `own_schedule` (a branched run): the learning-rate schedule is this run's, continued at the step."""
    d = universal_dir or step_dir
    _, pickled = engine.load_checkpoint(str(d.parent), tag=d.name, load_module_strict=not _has_frozen(engine),
                                        load_lr_scheduler_states=not own_schedule)
    if pickled is None:
        raise ResumeError(f"checkpoint {d} could not be loaded")
    state = step_dir / STATE
    # Earlier versions kept the loop's state in DeepSpeed's client state; theirs is read from there.
    client_state = json.loads(state.read_text()) if state.exists() else pickled
    load_rng(step_dir, rank)
    sched = engine.lr_scheduler
    if own_schedule and sched is not None:
        # This run's schedule function and peak rate, at the branched step (LambdaLR: one step from step - 1).
        sched.last_epoch = client_state["step"] - 1
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "step() before optimizer.step()": deliberate here
            sched.step()
    return client_state
