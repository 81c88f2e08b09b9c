"""Resuming from a checkpoint (the layout: pretrain/train/checkpoint_layout.py; saving: pretrain/train/checkpoint.py).

Rank 0 decides where (this run's newest complete checkpoint, else `checkpoint.branch_from`'s) and broadcasts it. On an
object store each rank downloads the files it reads into its staging directory. At another world size ZeRO states
go through DeepSpeed's universal checkpoint: rank 0 converts once (in its staging directory) and stores the result
as `step-<N>/universal` with its own marker, kept for later resumes, while the other ranks poll for that marker: no
collective waits on the conversion, however long.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import shutil
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch.distributed as dist

from pretrain import compat
from pretrain.errors import ResumeError, first_line
from pretrain.train import expert_parallel
from pretrain.train.checkpoint_layout import (
    COMPLETE,
    FORMAT,
    META,
    OWNER,
    POLL_S,
    STATE,
    CheckpointStoreError,
    complete_steps,
    has_frozen,
    listed,
    step_tag,
    verified,
)
from pretrain.train.rng_state import load_rng
from pretrain.train.storage import Storage


@dataclass(frozen=True)
class Plan:
    """Where a run resumes, in plain values (rank 0 broadcasts it). `step` None: it starts fresh."""

    step: int | None = None
    step_url: str | None = None  # the checkpoint's directory
    universal_url: str | None = None  # its universal conversion, when the world size differs
    branched: bool = False  # from another run's checkpoint (checkpoint.branch_from)


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
        raise ResumeError(f"checkpoint.branch_from: {url}: no complete checkpoint there")
    if step is None:
        return store, next((s for s in reversed(steps) if verified(store, s)), steps[-1])
    if step not in steps:
        raise ResumeError(f"checkpoint.branch_from: {spec}: no complete checkpoint step-{step} in {store.url} "
                          f"(complete: {', '.join(map(str, steps))})")
    return store, step


def plan_resume(own: Storage, branch_from: str | None, world: int, at_most: int | None = None, ep: int = 1) -> Plan:
    """Rank 0's decision: this run's newest complete checkpoint (at or before step `at_most`, for a rollback:
    pretrain/train/spike.py), else `branch_from`'s, else none. `ep`: this run's expert parallelism, which a
    checkpoint's must equal (and at EP > 1 its world size too: ResumeError, one line)."""
    # A complete step whose ranks' markers are not all its attempt's (a second writer saved the same step) is
    # not trusted: the newest one that is.
    steps = [s for s in complete_steps(own) if at_most is None or s <= at_most]
    steps = next(([s] for s in reversed(steps) if verified(own, s)), [])
    if steps:
        src, step, branched = own, steps[-1], False
    elif branch_from:
        (src, step), branched = _branch_source(branch_from), True
    else:
        return Plan()
    tag = step_tag(step)
    text = src.read_text(f"{tag}/{META}")
    if text is None:
        raise ResumeError(f"{src.url}/{tag}: no {META}")
    meta = json.loads(text)
    _same_experts(meta, f"{src.url}/{tag}", world, ep)
    universal = None
    if meta["zero_stage"] > 0 and meta["world_size"] != world:  # ZeRO partitions of another world size
        # A branch's conversion is keyed by its source: another branch_from before the first save converts anew.
        key = hashlib.sha256(src.url.encode()).hexdigest()[:12]
        universal = f"{own.url}/branch-{key}-{tag}/universal" if branched else f"{src.url}/{tag}/universal"
    return Plan(step, f"{src.url}/{tag}", universal, branched)


def _same_experts(meta: dict, where: str, world: int, ep: int) -> None:
    """An expert-parallel checkpoint holds each EP rank's experts in files and optimizer partitions of that layout
    (pretrain/train/expert_parallel.py), which no conversion regroups: it resumes at its own EP and world size."""
    saved = meta.get("expert_parallel", 1)
    if saved != ep or (ep > 1 and meta["world_size"] != world):
        raise ResumeError(f"{where} was saved with model.moe.expert_parallel {saved} on {meta['world_size']} workers; "
                          f"this run has {ep} on {world}: an expert-parallel run resumes with the same expert_parallel"
                          f"{' and workers' if max(saved, ep) > 1 else ''}")


def decide(own: Storage, branch_from: str | None, rank: int, world: int, at_most: int | None = None,
           ep: int = 1) -> Plan:
    """Collective: rank 0 decides where to resume (at or before step `at_most`) and every rank gets its answer
    (or its error), so ranks never disagree on a file system that shows them different states."""
    box: list = [None]
    if rank == 0:
        try:
            box[0] = asdict(plan_resume(own, branch_from, world, at_most, ep))
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
    work = staging / "universal-work"
    shutil.rmtree(work, ignore_errors=True)
    if src.local:
        folder = src.local_path()
    else:
        folder = work / "in" / src.url.rsplit("/", 1)[-1]
        src.download([f for f in listed(src) if not f.startswith("universal/") and not f.endswith(".done")], folder)
    result = work / "out" / "universal"
    compat.deepspeed_to_universal(str(folder), str(result))
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
    if rel.startswith("universal/") or rel.endswith(".done") or rel in (COMPLETE, OWNER):
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
            src.download([f for f in listed(src) if _needed(f, rank, universal is not None)], step_dir)
            step_dir.mkdir(parents=True, exist_ok=True)
        udir = None
        if universal is not None:
            udir = universal.local_path() if universal.local else tmp / "universal" / "universal"
            if not universal.local:
                universal.download(listed(universal), udir)
        yield step_dir, udir
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load(engine, step_dir: Path, rank: int, universal_dir: Path | None = None, *, own_schedule: bool = False) -> dict:
    """Collective: restore engine (model, optimizer, scheduler) and this rank's RNG; return the loop's state
    (`state.json`: step, units, data, config; JSON, never unpickled).
    `own_schedule` (a branched run): the learning-rate schedule is this run's, continued at the step."""
    d = universal_dir or step_dir
    strict = not has_frozen(engine)
    _, pickled = engine.load_checkpoint(str(d.parent), tag=d.name, load_module_strict=strict,
                                        load_lr_scheduler_states=not own_schedule,
                                        custom_load_fn=expert_parallel.expert_loader(engine.module, strict))
    if pickled is None:
        raise ResumeError(f"checkpoint {d} could not be loaded")
    if universal_dir is not None:
        _restore_buffers(engine, universal_dir)
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


# The model states a universal conversion copies beside the states (ZeRO 1-2's, else ZeRO-3's of rank 0).
_MODEL_STATES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")


def _restore_buffers(engine, universal_dir: Path) -> None:
    """DeepSpeed's universal load restores the parameters from the optimizer's states and never reads the module
    state, so a persistent buffer that training moves (a mixture of experts' balance bias) would start again from its
    initial value: those are read from the model states the conversion copied (alike on every rank)."""
    module = engine.module
    params = {n for n, _ in module.named_parameters(remove_duplicate=False)}
    names = [n for n in module.state_dict(keep_vars=True) if n not in params]
    path = next((universal_dir / f for f in _MODEL_STATES if (universal_dir / f).exists()), None)
    if not names or path is None:
        return
    saved = engine.checkpoint_engine.load(str(path), map_location="cpu")["module"]
    missing = [n for n in names if n not in saved]
    if missing:
        raise ResumeError(f"{path}: no {', '.join(missing[:3])} in the checkpoint's model state")
    module.load_state_dict({n: saved[n] for n in names}, strict=False)


def restore(plan: Plan, engine, ema, stream, staging: Path, rank: int, world: int) -> dict:
    """Collective: the checkpoint of `plan` into the engine (model, optimizer, schedule), this rank's RNG, the
    EMA (when kept) and the data stream; returns the loop's state (`load`). A resume and a rollback alike."""
    with opened(plan, staging, rank) as (step_dir, universal_dir):
        state = load(engine, step_dir, rank, universal_dir, own_schedule=plan.branched)
        if ema is not None:
            ema.load(step_dir, rank, world)
    stream.load_state_dict(state["data"])
    return state
