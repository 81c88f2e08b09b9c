"""Run `train` on Ray Train workers: an embedded local Ray by default, or an existing cluster.

The driver resolves paths, starts (or joins) Ray, runs `cluster.workers` TorchTrainer workers (gloo on
CPU, NCCL on GPU) and follows the run's metrics.jsonl to print progress, so Ray's and DeepSpeed's own
console output can stay in the workers' log files instead of the user's terminal.
"""

from __future__ import annotations

import _thread
import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

from pretrain.config import Config, run_dir
from pretrain.length import total_steps
from pretrain.load import config_from_dict
from pretrain.metrics.console import follow_metrics
from pretrain.redact import redact
from pretrain.train.owner import Owner
from pretrain.train.pulse import PREEMPTED
from pretrain.train.storage import Storage
from pretrain.urls import is_url

# Quiet Ray's driver-side chatter before it is imported; workers log to files under the session dir.
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "0")


def resolve_paths(cfg: Config) -> Config:
    """Absolute local paths: Ray workers do not run in the caller's working directory."""
    tree = cfg.model_dump(mode="json")
    tree["run"]["dir"] = str(Path(cfg.run.dir).resolve())
    for src in tree["data"]["train"] + ([tree["data"]["val"]] if tree["data"]["val"] else []):
        if not is_url(src["path"]):
            src["path"] = str(Path(src["path"]).resolve())
    if tree["init"]["path"] and not is_url(tree["init"]["path"]):
        tree["init"]["path"] = str(Path(tree["init"]["path"]).expanduser().resolve())
    if tree["cluster"]["storage"] and not is_url(tree["cluster"]["storage"]):  # checkpoints (train/checkpoint.py)
        tree["cluster"]["storage"] = str(Path(tree["cluster"]["storage"]).expanduser().resolve())
    if tree["checkpoint"]["branch_from"] and not is_url(tree["checkpoint"]["branch_from"]):  # PATH[@STEP]
        tree["checkpoint"]["branch_from"] = str(Path(tree["checkpoint"]["branch_from"]).expanduser().absolute())
    return config_from_dict(tree)


def _worker_main(config: dict) -> None:
    # Runs inside each Ray Train worker; the torch process group already exists.
    spawned = time.time()
    from pretrain.launch import trainer

    trainer.wait()  # the imports begun when the worker actor started (launch/trainer.py)
    import torch.distributed as dist

    from pretrain.errors import is_deterministic
    from pretrain.launch.worker_error import ERROR_FILE, record_error
    from pretrain.train.loop import train

    marks = [*map(tuple, config.get("marks", [])), ("worker_spawned", spawned), ("imports", time.time())]
    cfg = config_from_dict(config["cfg"])
    try:
        train(cfg, started_at=config["started_at"], marks=marks, steps=config.get("steps"),
              watcher=config.get("watcher"), token=config.get("token", ""), owner=config.get("owner"))
    except Exception as e:
        # A deterministic error would fail again on every restart: record its line for the driver and
        # return normally, so Ray Train does not count a failure. Leaving the group breaks the
        # collective any peer waits in (at once under gloo; NCCL at its timeout); that peer then finds
        # the record and returns too. Anything else is a failure: raise it, and Ray Train retries.
        if is_deterministic(e):
            record_error(run_dir(cfg), e, dist.get_rank())
            if dist.is_initialized():
                dist.destroy_process_group()
            return
        if (run_dir(cfg) / ERROR_FILE).is_file():
            return
        raise


def _import_ray_train() -> None:
    import ray.train  # noqa: F401  (with pandas and pyarrow: most of a second)
    from ray.train.torch import TorchTrainer  # noqa: F401

    from pretrain.launch.trainer import WarmUp, trainer_class  # noqa: F401


def _embedded(cfg: Config) -> bool:
    """Whether the run starts its own one-machine Ray (no `cluster.address`, no RAY_ADDRESS)."""
    return not (cfg.cluster.address or os.environ.get("RAY_ADDRESS"))


def _init_ray(cfg: Config) -> None:
    import ray

    if ray.is_initialized():
        return
    quiet = dict(log_to_driver=False, logging_level=logging.ERROR, configure_logging=True)
    if not _embedded(cfg):
        ray.init(address=cfg.cluster.address or os.environ["RAY_ADDRESS"], **quiet)
    else:
        # Ray Train's preemption watcher polls the GCS for a cloud autoscaler's node-drain notices; one machine's
        # embedded Ray gets none, and the watcher's actor (a Python process, ~1 CPU-second) starts just as the
        # workers build their models. The variable reaches the controller through the raylet started here.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        # Ray's own periodic work takes CPU from the workers' compute threads, and on a few cores a thread
        # descheduled for a moment stalls its peers at the next barrier: background work costs the step about
        # twice its share (a load of 10% of one core: 10-12%, tools/bench_background.py). An embedded Ray has no
        # dashboard to feed and no logs to stream to the driver, so its metrics and debug-state dumps are left
        # out, and the log monitor rescans the log folder every 0.5 s instead of every 0.1 s; together they take
        # Ray's idle CPU with two idle actors from 0.93 to 0.48-0.56 CPU-seconds per 20 s. The log monitor reads
        # the variable from the environment it inherits from this process.
        os.environ.setdefault("RAY_LOG_MONITOR_MANY_FILES_THRESHOLD", "0")
        need = cfg.cluster.workers * cfg.cluster.cpus_per_worker
        ray.init(num_cpus=max(need, os.cpu_count() or 1), include_dashboard=False, **quiet,
                 _system_config={"prestart_worker_first_driver": False, "enable_metrics_collection": False,
                                 "debug_dump_period_milliseconds": 600_000})


def launch(cfg: Config, *, started_at: float, quiet: bool = False, steps: int | None = None,
           owner: Owner | None = None) -> str | None:
    """Train with Ray Train workers; returns when the run has finished (None) or stopped early with a
    checkpoint because the driver got SIGTERM (the reason). A deterministic error found by a worker (data,
    config, shapes) raises `pretrain.errors.RunError` with its line after one attempt; anything else Ray
    Train retried `cluster.max_failures` times (a hang, pretrain/launch/watch.py, is one) raises as Ray
    gives it. A worker's SIGTERM or Ray's preemption notice stops the group with a checkpoint, and a new
    group resumes from it. `owner`: the lock the caller holds (pretrain/launch/storelock.py `run_locks`), which
    every save checks; none for callers that hold none (tests)."""
    # Ray Train's imports load in a thread while this one checks the run and starts Ray. Ray's own processes must
    # be started from the main thread: their parent-death signal follows the thread that started them. (Checking
    # beside Ray's start instead was measured no faster: both want the same two cores.)
    importing = threading.Thread(target=_import_ray_train, name="import-ray-train", daemon=True)
    importing.start()
    from pretrain.objectives.preflight import preflight

    objective = preflight(cfg)  # bad data or a mismatched model fails here, before Ray starts
    if cfg.cluster.storage:
        Storage(cfg.cluster.storage)  # an unusable location too (StorageError), before Ray resolves it its own way
    steps = steps or total_steps(cfg, objective)  # derived once on the driver: the workers receive it
    marks = [("command", started_at), ("preflight", time.time())]  # start-up phases (pretrain/train/startup.py)
    for line in objective.data.get("commands", []):  # a `pipe:` source the user wrote: say that it runs
        print(f"notice: {redact(line)}", file=sys.stderr, flush=True)
    objective.setup()
    unit = objective.unit
    cfg = resolve_paths(cfg)
    _init_ray(cfg)
    importing.join()
    marks.append(("ray_init", time.time()))
    rdir = run_dir(cfg)
    from pretrain.launch.watch import Watcher
    from pretrain.launch.worker_error import ERROR_FILE, recorded_error

    (rdir / ERROR_FILE).unlink(missing_ok=True)  # an earlier run's: the workers' record starts empty
    watcher = Watcher(cfg.cluster, rdir, world=cfg.cluster.workers, command=started_at)
    loop_config = {"cfg": cfg.model_dump(mode="json"), "started_at": started_at, "marks": marks, "steps": steps,
                   "watcher": watcher.address, "token": watcher.token, "owner": (owner or Owner()).to_dict()}
    try:
        with follow_metrics(rdir / "metrics.jsonl", steps, unit, cfg.train.log_every, enabled=not quiet), \
                on_sigterm(watcher, cfg.cluster.preemption_grace_s):
            while True:
                (rdir / PREEMPTED).unlink(missing_ok=True)
                ray_trainer(cfg, loop_config, storage_path=cfg.cluster.storage or str(rdir / "ray")).fit()
                if not (rdir / PREEMPTED).is_file() or watcher.stopping is not None:
                    break
                # A worker was told to stop (its SIGTERM, Ray's preemption notice): a new group resumes.
                note = json.loads((rdir / PREEMPTED).read_text())
                print(f"preempted: checkpoint at step {note['step']} ({note['reason']}); resuming on a new worker "
                      "group", file=sys.stderr, flush=True)
    except Exception:
        if (error := recorded_error(rdir)) is None:
            raise
        raise error from None  # a peer's deterministic error, not the collective failure it caused
    finally:
        watcher.close()
    if (error := recorded_error(rdir)) is not None:
        raise error
    return watcher.stopping if (rdir / PREEMPTED).is_file() else None


@contextlib.contextmanager
def on_sigterm(watcher, grace_s: float):
    """While inside: the driver's SIGTERM asks every rank to save a checkpoint at its step and stop; after
    `grace_s` without the group ending, the driver's main thread is interrupted (the group is abandoned)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if watcher.stopping is not None:
            return
        watcher.request_stop("SIGTERM to the driver")
        print(f"SIGTERM: saving a checkpoint at the current step (up to {grace_s:.0f} s)", file=sys.stderr, flush=True)
        timer = threading.Timer(grace_s, _thread.interrupt_main)
        timer.daemon = True
        timer.start()

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)

def ray_trainer(cfg: Config, loop_config: dict, *, storage_path: str):
    """The Ray Train trainer of a run: `cluster.workers` workers (elastic down to `cluster.min_workers`), each
    running `_worker_main(loop_config)` in a gloo or NCCL group, restarted up to `cluster.max_failures`."""
    import ray.train
    import torch
    from ray.train.torch import TorchConfig

    from pretrain.launch.trainer import WarmUp, trainer_class

    use_gpu = cfg.cluster.use_gpu if cfg.cluster.use_gpu is not None else torch.cuda.is_available()
    return trainer_class(embedded=_embedded(cfg))(
        train_loop_per_worker=_worker_main,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            # (min, max) makes the group elastic: after losing a node it continues with fewer workers.
            num_workers=(cfg.cluster.min_workers, cfg.cluster.workers) if cfg.cluster.min_workers else cfg.cluster.workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": cfg.cluster.cpus_per_worker, **({"GPU": 1} if use_gpu else {})},
        ),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo", timeout_s=cfg.cluster.collective_timeout_s),
        run_config=ray.train.RunConfig(
            name=cfg.run.name,
            storage_path=storage_path,
            failure_config=ray.train.FailureConfig(max_failures=cfg.cluster.max_failures),
            callbacks=[WarmUp()],
        ),
    )
