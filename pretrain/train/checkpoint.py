"""Checkpoints: `<location>/step-<N>/` with DeepSpeed's state of every rank, the data-stream state, each rank's
RNG states, the step and the resolved config, where `<location>` is `<cluster.storage>/<run.name>/checkpoints`
(a shared path or an object-store URL) or by default `<run.dir>/<run.name>/checkpoints`; every location is
read and written through `pretrain.train.storage` (fsspec), one code path for all.

Saving. A save holds training only while each rank copies its DeepSpeed states to host memory
(pretrain/train/snapshot.py: why this way, and not torch's or DeepSpeed's asynchronous checkpointing); a
background thread then writes them (`torch.save`) into the rank's staging directory under the run directory
(`.staging/rank-<R>/`: DeepSpeed's format is files in a local directory), moves the files to the location (a
rename, or an upload) and writes the markers; the next save, or the end of the run, waits for it. The small
files stay in the training thread: the RNG states, `state.json`, `meta.json`, and what `extra` writes (the
EMA's weights, `ema-rank<R>.safetensors`: as large as the model's fp32 weights when `ema.decay` is set). A save is complete only when its `COMPLETE` marker exists: each rank, once its files are in
place (fsynced on a file system, PUT on an object store), writes `step-<N>/rank-<R>.done` listing them; rank
0 waits for every rank's (polling, no collective: the training thread owns the collectives), writes
`meta.json` before that, then `COMPLETE` listing every file and its size, and only then `latest`. A crash at
any point leaves a step without a marker, which resume never reads: it picks the newest step with a marker
(`latest` is a hint for people and tools, never trusted by resume). Retention runs after the marker: the
newest `checkpoint.keep` complete checkpoints stay, and every `checkpoint.keep_every`-th step for good;
incomplete leftovers older than the newest complete one go (one writer per run: the run lock).


The layout of the location: pretrain/train/checkpoint_layout.py. Resuming: pretrain/train/resume.py. Per-rank
RNG states: pretrain/train/rng_state.py. Crash injection for the tests: pretrain/train/crash.py. Their names that
the loop and the tests use are importable from here too.

`Checkpointer(host_copy=False)` saves as before the host copies: DeepSpeed writes the files in the training thread,
the background thread only moves them; tools/bench_ckpt.py measures both ways.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import threading
import time
import uuid
from pathlib import Path

import torch.distributed as dist

from pretrain import compat
from pretrain.errors import CheckpointPickleError, ResumeError, first_line  # noqa: F401
from pretrain.train import expert_parallel
from pretrain.train.checkpoint_layout import (  # noqa: F401
    COMPLETE,
    FORMAT,
    LATEST,
    META,
    OWNER,
    POLL_S,
    STATE,
    CheckpointStoreError,
    all_steps,
    complete_steps,
    done_marker,
    has_frozen,
    is_complete,
    location,
    nonce_of,
    staging_dir,
    step_tag,
)
from pretrain.train.crash import CRASH_ENV, CRASH_POINTS, InjectedCrash, crash_point  # noqa: F401
from pretrain.train.owner import Owner
from pretrain.train.resume import Plan, decide, load, opened, parse_branch, plan_resume, prepare_universal  # noqa: F401
from pretrain.train.rng_state import (  # noqa: F401
    TRUST_PICKLES,
    load_rng,
    rng_file,
    rng_state,
    save_rng,
    set_rng_state,
)
from pretrain.train.snapshot import HostBuffers, QueuedWriter
from pretrain.train.storage import Storage


@contextlib.contextmanager
def _without_frozen(engine):
    """Yields whether the model has frozen parameters; while inside, the engine's module state leaves out every
    name of a frozen tensor. DeepSpeed's own exclusion goes by `named_parameters()`, which lists a shared tensor
    once, so the tied alias of a frozen embedding (`lm_head.weight`) would still be saved: 113 MB of SmolLM2."""
    if not has_frozen(engine):
        yield False
        return
    frozen = {id(p) for p in engine.module.parameters() if not p.requires_grad}
    drop = {n for n, t in engine.module.state_dict(keep_vars=True).items() if id(t) in frozen}
    with compat.deepspeed_module_state_without(engine, drop):
        yield True


def _remove_step(store: Storage, tag: str) -> None:
    store.remove(f"{tag}/{COMPLETE}")  # first: a crash while deleting leaves an incomplete step, never a torn one
    store.remove(tag)


def prune(store: Storage, newest: int, keep: int | None, keep_every: int | None, owner: Owner = Owner()) -> list[int]:
    """After `newest` is complete: remove complete checkpoints beyond the newest `keep` (none: keep all) that
    are not multiples of `keep_every`, incomplete ones older than `newest`, and the universal conversions of
    a checkpoint branched from (`branch-...`). Only what `owner` trusts is counted and removed: the checkpoints
    of a holder whose lock was taken over all stay (pretrain/train/owner.py). Returns the steps removed."""
    steps = [s for s in all_steps(store) if owner.trusted(nonce_of(store, s))]
    complete = [s for s in steps if is_complete(store, s)]
    kept = set(complete if keep is None else complete[-keep:]) | {newest}
    if keep_every:
        kept |= {s for s in complete if s % keep_every == 0}
    doomed = sorted([s for s in complete if s not in kept] + [s for s in steps if s not in complete and s < newest])
    for s in doomed:
        _remove_step(store, step_tag(s))
        crash_point("pruning")
    for name in store.children():
        if name.startswith("branch-") or (name.endswith(".tmp") and name.startswith("step-")):
            store.remove(name)  # a branch's conversion, no longer needed; an earlier version's debris
    return doomed


# ----------------------------------------------------------------------------- saving


class Checkpointer:
    """One rank's side of saving a run's checkpoints to `store` (see the module docstring). `save` is a
    collective that returns once this rank's states are copied to host memory; the rest runs in a thread."""

    def __init__(self, store: Storage, staging: Path, rank: int, world: int, *, keep: int | None = None,
                 keep_every: int | None = None, timeout_s: float = 1800.0, host_copy: bool = True,
                 owner: Owner = Owner()):
        """Collective (every rank gets rank 0's attempt nonce). `host_copy=False`: DeepSpeed writes the states'
        files in the training thread, as before host copies (the thread then only moves them): the baseline of
        tools/bench_ckpt.py. `owner`: the run's lock, checked before every write (pretrain/train/owner.py)."""
        self.store, self.staging, self.rank, self.world = store, staging, rank, world
        self.keep, self.keep_every, self.timeout_s = keep, keep_every, timeout_s
        self.host_copy, self.owner = host_copy, owner
        box = [f"{owner.token or 'run'}.{uuid.uuid4().hex[:12]}"]
        dist.broadcast_object_list(box, src=0)
        self.nonce = box[0]  # every marker of this attempt's saves carries it
        # A crashed attempt's leftovers (one writer per run); rank 0 also clears those of ranks that are gone.
        # Before `decide`, a collective: no rank writes into its staging directory before that.
        shutil.rmtree(staging.parent if rank == 0 and staging.parent.name == ".staging" else staging,
                      ignore_errors=True)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._pending: int | None = None
        self._buffers = HostBuffers()  # the host copies' memory, reused by every save
        # Of the last save: waited_s for the one before; local_write_s, how long training stalls (the host
        # copy, copy_s of it, and the small files; without host copies, every file); then in the thread
        # write_s (the states' files; 0 without host copies) and upload_s.
        self.stats: dict = {}

    def save(self, engine, step: int, client_state: dict, extra=None) -> None:
        """Collective. `extra(directory)` writes what else belongs to the step (the EMA) on every rank."""
        t0 = time.perf_counter()
        self.wait()  # the previous save's upload: at most one in flight
        waited, t0 = time.perf_counter() - t0, time.perf_counter()
        tag = step_tag(step)
        local = self.staging / tag
        shutil.rmtree(local, ignore_errors=True)
        self.owner.check()  # a run whose lock was taken over writes nothing more (LockLostError)
        box = [None]
        if self.rank == 0:
            box[0] = self._claim(step)
        dist.broadcast_object_list(box, src=0)
        if box[0] is not None:  # another holder's save of this step is in the location: it stays
            if self.rank == 0:
                print(f"warning: checkpoint {tag} not saved: {box[0]}", file=sys.stderr, flush=True)
            self.stats = {"step": step, "skipped": box[0]}
            return
        self._buffers.recycle()  # the previous save's files are written (waited for above)
        writer = None

        def queued(own):
            nonlocal writer
            writer = QueuedWriter(own, self._buffers)
            return writer

        # A run with frozen weights (LoRA) saves only what trains: the frozen base is rebuilt from init.path.
        swap = compat.deepspeed_checkpoint_engine(engine, queued) if self.host_copy else contextlib.nullcontext()
        with _without_frozen(engine) as frozen, swap:
            engine.save_checkpoint(str(self.staging), tag=tag, client_state={}, save_latest=False,
                                   exclude_frozen_parameters=frozen)
            expert_parallel.save_experts(engine, str(self.staging), tag)  # EP > 1: each rank's experts
        save_rng(local, self.rank)
        if extra is not None:
            extra(local)
        if self.rank == 0:
            (local / STATE).write_text(json.dumps(client_state))
            meta = {"format": FORMAT, "step": step, "world_size": self.world,
                    "zero_stage": engine.zero_optimization_stage(),
                    "expert_parallel": expert_parallel.ep_size(engine.module)}
            (local / META).write_text(json.dumps(meta))
        self.stats = {"step": step, "waited_s": waited, "local_write_s": time.perf_counter() - t0,
                      "copy_s": writer.copy_s if writer else 0.0}
        self._pending = step
        self._thread = threading.Thread(target=self._run_upload, args=(step, local, writer), daemon=True,
                                        name=f"checkpoint-upload-{tag}")
        self._thread.start()

    def _claim(self, step: int) -> str | None:
        """Rank 0: make the step directory this attempt's (`owner.json`), removing an earlier attempt's unfinished
        save of it when this run trusts that attempt; else the reason it cannot (returned, not raised)."""
        tag = step_tag(step)
        if self.store.children(tag):  # an earlier attempt's incomplete step: never merge into it
            nonce = nonce_of(self.store, step)
            if not self.owner.trusted(nonce):
                return (f"{self.store.url}/{tag} was written by another holder of this location ({nonce}), "
                        "whose lock this run took over; it is left as it is")
            _remove_step(self.store, tag)
        self.store.write_text(f"{tag}/{OWNER}", json.dumps({"nonce": self.nonce}))
        return None

    def _run_upload(self, step: int, local: Path, writer: QueuedWriter | None) -> None:
        try:
            t0 = time.perf_counter()
            if writer is not None:
                writer.write()  # DeepSpeed's files, from the host copies; the sizes once all are written
            sizes = {str(p.relative_to(local)): p.stat().st_size for p in sorted(local.rglob("*")) if p.is_file()}
            t1 = time.perf_counter()
            self.stats["write_s"] = t1 - t0
            self._upload(step, local, sizes)
            self.stats["upload_s"] = time.perf_counter() - t1
        except BaseException as e:  # noqa: BLE001 - raised in the training thread by wait()
            self._error = e

    def _upload(self, step: int, local: Path, sizes: dict[str, int]) -> None:
        tag, store = step_tag(step), self.store
        self.owner.check()
        store.put(local, [f for f in sizes if f != META], tag)
        crash_point("after-rank-files")
        if META in sizes:  # rank 0's meta.json after its other files
            store.put(local, [META], tag)
            crash_point("after-meta")
        store.write_text(f"{tag}/rank-{self.rank}.done", json.dumps({"nonce": self.nonce, "files": sizes}))
        shutil.rmtree(local, ignore_errors=True)
        if self.rank != 0:
            return
        files = self._every_rank(tag)
        self.owner.check()
        store.write_text(f"{tag}/{COMPLETE}", json.dumps({"format": FORMAT, "step": step, "world_size": self.world,
                                                          "nonce": self.nonce, "files": files}))
        crash_point("before-latest")
        store.write_text(LATEST, tag)
        crash_point("after-latest")
        self.owner.check()
        prune(store, step, self.keep, self.keep_every, self.owner)

    def _every_rank(self, tag: str) -> dict[str, int]:
        """Rank 0: wait for every rank's marker of this attempt; the union of the files they list."""
        files: dict[str, int] = {}
        waiting = {f"rank-{r}.done" for r in range(self.world)}
        deadline = time.monotonic() + self.timeout_s
        while waiting:
            for name in sorted(waiting & set(self.store.children(tag))):
                text = self.store.read_text(f"{tag}/{name}")
                nonce, listed = done_marker(text) if text is not None else (None, {})
                if nonce == self.nonce:  # another attempt's marker is no marker of this save
                    files.update(listed)
                    waiting.discard(name)
            if not waiting:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {', '.join(sorted(waiting))} of this attempt after {self.timeout_s:.0f} s")
            time.sleep(POLL_S)
        return dict(sorted(files.items()))

    @property
    def uploading(self) -> bool:
        """Whether this rank's last save is still being written or moved to the location."""
        return self._thread is not None and self._thread.is_alive()

    def wait(self) -> None:
        """Until this rank's last save is written and in place (rank 0: complete, marker and pruning done);
        raises CheckpointStoreError when it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            e, self._error = self._error, None
            raise CheckpointStoreError(f"checkpoint {step_tag(self._pending)} to {self.store.url}: "
                                      f"{type(e).__name__}: {first_line(e)}") from e

    def close(self) -> None:
        """End of the run: wait for the last upload; remove the staging directory (nothing stays under run.dir)."""
        self.wait()
        self._buffers.release()
        shutil.rmtree(self.staging, ignore_errors=True)
        with contextlib.suppress(OSError):
            self.staging.parent.rmdir()  # .staging, once no rank has anything left in it

