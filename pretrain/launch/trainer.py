"""The Ray Train trainer a run starts, shaped for its first step. On a 2-core machine the start is CPU-bound: every
Ray Train actor is a Python process, and each worker imports ~4 CPU-seconds of modules before it trains.

- Warm-up (`WarmUp`): once its worker actors exist, Ray Train's controller spends about two seconds on its own
  (train context, process group) before it calls the training function, and only then would the function import
  torch._dynamo and parts of inductor (torch's optimizers load them on construction, DeepSpeed's ZeRO optimizer
  check through its Muon module), DeepSpeed's engine and the project's loop. `WarmUp`, a worker-group callback
  (the DeveloperAPI `RunConfig.callbacks` takes), starts those imports on a thread in every worker as soon as the
  workers exist; the training function waits for that thread (`wait()`) before it imports anything.
- The embedded Ray runs none of the helper actors that only a shared cluster needs (`trainer_class`). Each would
  also cost the whole run: an idle Ray actor wakes every 10 ms, and on 2 cores three of them slowed a gpt-tiny
  step by 0-6%, 3% in the median of four measurements (tools/bench_background.py).
"""

from __future__ import annotations

import importlib
import logging
import threading

from pretrain import compat

log = logging.getLogger(__name__)

# What every rank imports before its first step (the loop's own imports, then what its optimizers load).
MODULES = (
    "pretrain.errors",
    "pretrain.train.loop",
    "torch._dynamo",
    "deepspeed.runtime.zero.muon.muon_optimizer",
)

_thread: threading.Thread | None = None


def _preload(modules: tuple[str, ...]) -> None:
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as e:  # the training function imports it again and fails there, where it is reported
            log.warning("warm-up: importing %s failed: %s", name, e)
            return
    from pretrain.train.engine import without_cpu_shm_op

    without_cpu_shm_op()  # DeepSpeed's op-compatibility probe: compiler subprocesses, ~0.3 s


def start(modules: tuple[str, ...]) -> None:
    """In a worker: begin importing `modules` on a thread; SIGTERM asks the loop for a checkpoint and a stop
    (pretrain.train.pulse: the handler must be installed on the actor's main thread, where this runs)."""
    global _thread
    import torch  # noqa: F401  (see below)

    from pretrain.train.pulse import install_sigterm

    install_sigterm()
    # torch is imported here, on the actor's main thread, before the thread starts: the next task this thread runs
    # (Ray Train's init_train_context) unpickles ray.train.torch, which imports torch too, and two threads importing
    # torch's circular package at once meet Python's import-deadlock detector: one gets a half-built module and
    # the worker dies (SIGABRT), which Ray Train counts as a machine failure. That task needs torch anyway, so
    # importing it first costs the start-up nothing.
    if _thread is None:
        _thread = threading.Thread(target=_preload, args=(modules,), name="pretrain-warm-up", daemon=True)
        _thread.start()


def wait() -> None:
    """In a worker: return once the warm-up (if one was started) has finished."""
    if _thread is not None:
        _thread.join()


class WarmUp(compat.ray_worker_group_callback()):
    """Ray Train callback (RunConfig.callbacks): starts every worker's warm-up as soon as the worker exists."""

    def __init__(self, modules: tuple[str, ...] = MODULES):
        self.modules = modules

    def before_init_train_context(self, workers) -> dict:
        for w in workers:
            w.execute_async(start, self.modules)  # not awaited: the controller goes on with its own start-up
        return {}


def trainer_class(embedded: bool) -> type:
    """Ray Train's TorchTrainer; for the embedded one-machine Ray, without three helper actors that serve only a
    shared cluster. Each is a Python process of its own (~1.2-1.4 CPU-seconds to start) starting just as the
    workers import and build, which on 2 cores delays the first step by about a second:

    - the dataset manager, which hands out Ray Data shards: runs read their own webdataset shards, never Ray Data;
    - the placement-group cleaner, which frees a crashed controller's reservation on a cluster that outlives it:
      the embedded Ray ends with the command that started it;
    - the autoscaling coordinator, through which a fixed-size run asks a cluster autoscaler for its workers'
      resources every 20 s: one machine has no autoscaler. (An elastic run, `cluster.min_workers`, keeps it:
      its resizing reads the coordinator's reservations.)

    Ray Train 2.60 has no option for any of them, so the trainer filters the first two out of its default
    callbacks and gives the controller a fixed-size policy that sends no resource requests (both through Ray
    Train's internals: `pretrain.compat.ray_embedded_torch_trainer`)."""
    from ray.train.torch import TorchTrainer

    if not embedded:
        return TorchTrainer
    return compat.ray_embedded_torch_trainer()
