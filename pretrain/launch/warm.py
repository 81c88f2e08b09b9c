"""Worker warm-up: the imports a rank's first step needs, begun as soon as Ray Train's worker actors exist.

Between starting its worker actors and calling the training function, Ray Train's controller spends about two
seconds on its own (dataset manager, train context, process group) while the workers sit idle. The training function then
imports torch._dynamo and parts of inductor (torch's optimizers load them on construction, DeepSpeed's ZeRO
optimizer check through its Muon module), DeepSpeed's engine and the project's loop: ~2.5 s of a 2-core machine
per worker, on the path to the first step. `WarmUp`, a Ray Train worker-group callback (the DeveloperAPI that
`RunConfig.callbacks` takes), starts those imports on a thread in every worker as soon as the workers exist; the
training function waits for that thread (`wait()`) before it imports anything.
"""

from __future__ import annotations

import importlib
import logging
import threading

from ray.train.v2._internal.execution.callback import WorkerGroupCallback

log = logging.getLogger(__name__)

# What every rank imports before its first step, heaviest last-needed included (see the module docstring).
MODULES = (
    "pretrain.fail",
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
    """In a worker: begin importing `modules` on a thread."""
    global _thread
    if _thread is None:
        _thread = threading.Thread(target=_preload, args=(modules,), name="pretrain-warm-up", daemon=True)
        _thread.start()


def wait() -> None:
    """In a worker: return once the warm-up (if one was started) has finished."""
    if _thread is not None:
        _thread.join()


class WarmUp(WorkerGroupCallback):
    """Ray Train callback (RunConfig.callbacks): starts every worker's warm-up as soon as the worker exists."""

    def __init__(self, modules: tuple[str, ...] = MODULES):
        self.modules = modules

    def before_init_train_context(self, workers) -> dict:
        for w in workers:
            w.execute_async(start, self.modules)  # not awaited: the controller goes on with its own start-up
        return {}
