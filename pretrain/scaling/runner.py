"""Running a planned ladder (pretrain.scaling.ladder): its unfinished runs, locally or as concurrent Ray
tasks, with a progress display; each finished run's summary marked with its planned budget. Runs that start
from no other run (a grid's runs, WSD-S trunks) go first, then the branches (cooldowns) that read their
checkpoints; a branch whose trunk failed is reported failed without starting.

Where the runs go: without an address, one after another in this process, on one embedded Ray (the first
`launch` starts it, the others find it). With `cluster.address` (or RAY_ADDRESS, as inside a Ray job) this
process is the driver of one Ray job: each run is a Ray task that calls the same `launch`, and Ray Train
inside it asks for the run's workers (CPUs, GPUs) with their placement group. The task itself holds no CPU
(`num_cpus=0`): counting the run's CPUs in the task too would reserve them twice. How many runs are in
flight at once is what the cluster's resources hold (Ray's "limit pending tasks" pattern with `ray.wait`),
so no run waits on a placement group it cannot get. `--address http://HEAD:8265` submits this command
as that job through the job API (`pretrain.launch.jobs`).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pretrain.config import Config
from pretrain.load import config_from_dict
from pretrain.scaling.books import finished, mark, prepare
from pretrain.scaling.ladder import Ladder, Rung


def train_run(tree: dict) -> None:
    """Train (or resume) one run of the ladder: the run's lock, then `launch` on the Ray this process has
    (or starts). Takes the config as a dict: it is also the body of a Ray task."""
    from pretrain.launch.local import launch
    from pretrain.launch.storelock import run_locks

    cfg = config_from_dict(tree)
    with run_locks(cfg) as owner:
        launch(cfg, started_at=time.time(), quiet=True, owner=owner)


@dataclass
class Tracker:
    """Which runs are done, running, queued, failed; what the progress display shows."""

    ladder: Ladder
    done: list[str]
    queued: list[str]
    running: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    echo: Callable[[str], None] | None = None  # one line per finished run (logs, where no bar is drawn)

    def start(self, name: str) -> None:
        with self.lock:
            self.queued.remove(name)
            self.running.append(name)

    def end(self, name: str, error: str | None) -> None:
        with self.lock:
            self.running.remove(name)
            if error is None:
                self.done.append(name)
            else:
                self.failed[name] = error
        if self.echo is not None:
            self.echo(f"{'done' if error is None else 'FAILED'} {name}{'' if error is None else ': ' + error}"
                      f"  ({self.line()})")

    def line(self) -> str:
        with self.lock:
            text = (f"{len(self.done)} done, {len(self.running)} running, {len(self.queued)} queued"
                    + (f", {len(self.failed)} failed" if self.failed else ""))
            return text


def _error_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[-1] if text else type(e).__name__


def _run_local(ladder: Ladder, todo: list[Rung], tracker: Tracker, run_fn: Callable[[dict], None]) -> None:
    for rung in todo:
        tracker.start(rung.name)
        try:
            run_fn(ladder.configs[rung.name].model_dump(mode="json"))
            error = None if finished(ladder.rdir(rung), rung) else "ended without a complete summary.json"
        except Exception as e:  # noqa: BLE001 - one failed run is reported; the others still run
            error = _error_line(e)
        tracker.end(rung.name, error)


def concurrency(cfgs: list[Config], resources: dict) -> int:
    """How many runs the cluster holds at once: its CPUs (and GPUs) over the largest run's."""
    need_cpu = max(c.cluster.workers * c.cluster.cpus_per_worker for c in cfgs)
    slots = int(resources.get("CPU", 0) // need_cpu)
    gpu_runs = [c.cluster.workers for c in cfgs if c.cluster.use_gpu or (c.cluster.use_gpu is None and resources.get("GPU"))]
    if gpu_runs:
        slots = min(slots, int(resources.get("GPU", 0) // max(gpu_runs)))
    return max(1, slots)


def _run_cluster(ladder: Ladder, todo: list[Rung], tracker: Tracker, run_fn: Callable[[dict], None]) -> None:
    if not todo:
        return
    import ray

    from pretrain.launch.local import _init_ray

    _init_ray(next(iter(ladder.configs.values())))
    task = ray.remote(num_cpus=0, max_retries=0)(run_fn)  # the run's own workers hold its resources
    width = concurrency([ladder.configs[r.name] for r in todo], ray.cluster_resources())
    pending = list(todo)
    flight: dict = {}
    while pending or flight:
        while pending and len(flight) < width:
            rung = pending.pop(0)
            tracker.start(rung.name)
            ref = task.options(name=f"ladder:{rung.name}").remote(ladder.configs[rung.name].model_dump(mode="json"))
            flight[ref] = rung
        ready, _ = ray.wait(list(flight), num_returns=1)
        for ref in ready:
            rung = flight.pop(ref)
            try:
                ray.get(ref)
                error = None if finished(ladder.rdir(rung), rung) else "ended without a complete summary.json"
            except Exception as e:  # noqa: BLE001 - Ray wraps the run's error; report it, keep going
                error = _error_line(e)
            tracker.end(rung.name, error)


def _steps_done(rdir: Path) -> int:
    from pretrain.metrics.sinks import last_step

    return max(0, last_step(rdir / "metrics.jsonl"))


def _trunk_of(ladder: Ladder, branch: Rung) -> Rung | None:
    """The rung whose run directory (or storage location) a branch's branch_from names."""
    path = branch.branch_from.rsplit("@", 1)[0].rstrip("/")
    return next((r for r in ladder.rungs if r.name == path.rsplit("/", 1)[-1] and not r.branch_from), None)


def run_ladder(ladder: Ladder, *, run_fn: Callable[[dict], None] = train_run, cluster: bool | None = None,
               show: bool = True) -> Tracker:
    """Run the ladder's unfinished runs (keeping the finished ones), marking each finished summary with its
    budget. `run_fn(config_dict)` trains one run (injectable: tests pass one that writes a summary).
    `cluster`: concurrent Ray tasks on the cluster of cluster.address / RAY_ADDRESS (default: when one is set)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    done, todo = prepare(ladder)
    tracker = Tracker(ladder, [r.name for r in done], [r.name for r in todo])
    if cluster is None:
        cfg = next(iter(ladder.configs.values()))
        cluster = bool(cfg.cluster.address or os.environ.get("RAY_ADDRESS"))
    by_name = {r.name: r for r in ladder.rungs}
    stop = threading.Event()
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  disable=not show) as bar:
        total = bar.add_task("ladder", total=len(ladder.rungs))
        tracker.echo = bar.console.print if show else None
        steps: dict[str, int] = {}

        def refresh() -> None:
            while True:
                with tracker.lock:
                    running = list(tracker.running)
                    finished_runs = len(tracker.done)
                for name in running:  # one bar per running run, its step read from metrics.jsonl
                    if name not in steps:
                        steps[name] = bar.add_task(f"  {name}", total=by_name[name].steps)
                    bar.update(steps[name], completed=_steps_done(ladder.rdir(by_name[name])))
                for name in [n for n in steps if n not in running]:
                    bar.remove_task(steps.pop(name))
                bar.update(total, completed=finished_runs, description=f"ladder: {tracker.line()}")
                if stop.wait(1.0):
                    return

        poller = threading.Thread(target=refresh, daemon=True)
        poller.start()
        try:
            # Trunks and independent runs first, then the branches: each needs its trunk's checkpoint. A branch
            # whose trunk failed is reported failed without starting (it would only fail to find the checkpoint).
            (_run_cluster if cluster else _run_local)(ladder, [r for r in todo if not r.branch_from], tracker, run_fn)
            branches = []
            for r in (r for r in todo if r.branch_from):
                trunk = _trunk_of(ladder, r)
                if trunk is not None and trunk.name in tracker.failed:
                    tracker.start(r.name)
                    tracker.end(r.name, f"its trunk {trunk.name} failed")
                else:
                    branches.append(r)
            (_run_cluster if cluster else _run_local)(ladder, branches, tracker, run_fn)
        finally:
            stop.set()
            poller.join(timeout=5)
    for rung in ladder.rungs:
        if rung.name in tracker.done:
            mark(ladder.rdir(rung), rung)
    return tracker

