"""An isoFLOP ladder: plan the runs (every size at every budget), run them on Ray, resume, then fit.

`pretrain scaling ladder CONFIG` reads a run config and its `ladder:` block (budgets, sizes, head_dim, out;
`--budgets/--sizes` override it). A size is `DxL` (model.d_model x model.n_layers, heads = D / head_dim) or
`DxLxH`; each run is the config at that shape with `train.flops` = its budget, so the trainer's own length
rule (pretrain/length.py) gives its steps: tokens = budget / FLOPs per token, rounded up to whole
steps, FLOPs per token from the family's count (the figure the runs log). The ladder's directory holds

    ladder.json            the plan: each run's shape, N, FLOPs per token, steps, tokens, FLOPs
    runs/<name>/           each run's directory, its resolved config.yaml written before it starts
    fit/                   fit.json and the plots of `pretrain scaling fit`, from the same code path

Where the runs go: without an address, one after another in this process, on one embedded Ray (the first
`launch` starts it, the others find it). With `cluster.address` (or RAY_ADDRESS, as inside a Ray job) this
process is the driver of one Ray job: each run is a Ray task that calls the same `launch`, and Ray Train
inside it asks for the run's workers (CPUs, GPUs) with their placement group. The task itself holds no CPU
(`num_cpus=0`): counting the run's CPUs in the task too would reserve them twice. How many runs are in
flight at once is what the cluster's resources hold (Ray's "limit pending tasks" pattern with `ray.wait`),
so no run waits on a placement group it cannot get. `--address http://HEAD:8265` submits this command
as that job through the job API (`pretrain.launch.jobs`).

Interrupted, the ladder resumes: a run whose summary.json is complete (a final loss, all planned steps) is
kept; any other starts again, from its own checkpoints where it has them (the trainer resumes). A run
directory that holds another config than the plan's is refused, never mixed into the fit.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from pretrain.config import Config, ConfigError, dump_config, run_dir
from pretrain.load import config_from_dict
from pretrain.scaling import ScalingError

SIZE = re.compile(r"^\s*(\d+)\s*x\s*(\d+)\s*(?:x\s*(\d+))?\s*$")


class LadderError(ScalingError):
    """A ladder that cannot be planned or run as asked (one line)."""


@dataclass(frozen=True)
class Size:
    label: str  # as written, normalised: 128x4 or 128x4x2
    d_model: int
    n_layers: int
    n_heads: int


def parse_size(text: str, head_dim: int) -> Size:
    """`DxL` (heads = D / head_dim, at least 1) or `DxLxH`."""
    m = SIZE.match(text)
    if not m:
        raise LadderError(f"size {text!r}: write it as DxL (d_model x n_layers, e.g. 128x4) or DxLxH")
    d, n_layers = int(m[1]), int(m[2])
    heads = int(m[3]) if m[3] else max(1, d // head_dim)
    if d % heads or not n_layers or not heads:
        raise LadderError(f"size {text!r}: d_model {d} does not split into {heads} heads"
                          + ("" if m[3] else f" of ladder.head_dim={head_dim}"))
    return Size(f"{d}x{n_layers}" + (f"x{heads}" if m[3] else ""), d, n_layers, heads)


def budget_label(budget: float) -> str:
    """3e+13 -> 3e13, 1.5e+14 -> 1.5e14: part of a run's name."""
    return f"{budget:.3g}".replace("e+", "e").replace("e0", "e")


@dataclass(frozen=True)
class Rung:
    """One planned run of the ladder."""

    name: str
    budget: float
    size: str
    d_model: int
    n_layers: int
    n_heads: int
    params: int
    params_non_embedding: int
    flops_per_token: float
    steps: int
    tokens: int  # what the steps train on
    flops: float  # what they cost: >= budget by less than one step
    branch_from: str | None = None  # wsd: the same size's longest run at a stable-phase checkpoint (PATH@STEP)


@dataclass
class Ladder:
    out: Path
    rungs: list[Rung]
    configs: dict[str, Config]  # by run name
    skipped: list[dict] = field(default_factory=list)  # (budget, size) pairs under one step

    def plan_json(self) -> dict:
        return {"out": str(self.out), "budgets": sorted({r.budget for r in self.rungs}),
                "sizes": list(dict.fromkeys(r.size for r in self.rungs)),
                "runs": [asdict(r) for r in self.rungs], "skipped": self.skipped}

    def rdir(self, rung: Rung) -> Path:
        return run_dir(self.configs[rung.name])


# ------------------------------------------------------------------------------------------ planning


def plan_ladder(cfg: Config, *, budgets: list[float] | None = None, sizes: list[str] | None = None,
                head_dim: int | None = None, out: Path | None = None) -> Ladder:
    """The runs of the ladder `cfg` (its `ladder:` block, or the arguments) describes; reads the data's
    manifests, builds nothing but meta-device models."""
    from pretrain.launch.local import resolve_paths
    from pretrain.length import flops_per_unit, parameter_counts, steps_for
    from pretrain.objectives.preflight import preflight

    block = cfg.ladder
    budgets = budgets or (block.budgets if block else None)
    sizes = sizes or (block.sizes if block else None)
    if not budgets or not sizes:
        raise LadderError("a ladder needs budgets and sizes: --budgets 1e13,3e13 --sizes 64x2,128x4, or a ladder: block")
    if any(not (b > 0 and math.isfinite(b)) for b in budgets):
        raise LadderError(f"--budgets must be positive FLOP counts (got {budgets})")
    head_dim = head_dim or (block.head_dim if block else 64)
    out = Path(out or (block.out if block and block.out else run_dir(cfg))).expanduser().resolve()
    shapes = list({s.label: s for s in (parse_size(t, head_dim) for t in sizes)}.values())
    base = cfg.model_dump(mode="json")
    base["ladder"] = None
    base["run"]["dir"] = str(out / "runs")
    for key in ("steps", "tokens", "flops"):
        base["train"][key] = None

    per_size = []  # (shape, per-budget tree, counts, flops per token, units per step)
    for shape in shapes:
        tree = json.loads(json.dumps(base))
        tree["model"].update(d_model=shape.d_model, n_layers=shape.n_layers, n_heads=shape.n_heads)
        tree["train"]["flops"] = float(budgets[0])
        try:
            probe = config_from_dict(tree)
        except ConfigError as e:
            raise LadderError(f"size {shape.label}: {e}") from None
        objective = preflight(probe)  # the data, and that the objective accepts this shape
        counts = parameter_counts(probe)
        per_size.append((shape, tree, counts, flops_per_unit(probe, objective, counts),
                         probe.train.global_batch_size * objective.units_per_sample()))

    rungs, configs, skipped = [], {}, []
    for budget in sorted(set(float(b) for b in budgets)):
        smallest = min(per_size, key=lambda p: p[3] * p[4])
        if budget < smallest[3] * smallest[4]:
            raise LadderError(
                f"budget {budget:.3g} FLOPs is less than one step of the smallest model ({smallest[0].label}: "
                f"{smallest[3] * smallest[4]:.3g} FLOPs per step of {smallest[4]:,} tokens); raise it or lower "
                "train.global_batch_size")
        for shape, tree, counts, fpt, per_step in per_size:
            if budget < fpt * per_step:
                skipped.append({"budget": budget, "size": shape.label, "reason": "less than one step"})
                continue
            name = f"{cfg.run.name}-{budget_label(budget)}-{shape.label}"
            run_tree = json.loads(json.dumps(tree))
            run_tree["run"]["name"] = name
            run_tree["train"]["flops"] = budget
            run_cfg = resolve_paths(config_from_dict(run_tree))
            steps = steps_for(units_per_step=per_step, flops=budget, flops_per_unit=fpt)
            rungs.append(Rung(name, budget, shape.label, shape.d_model, shape.n_layers, shape.n_heads,
                              int(counts["params"]), int(counts["params_non_embedding"]), fpt, steps,
                              steps * per_step, steps * per_step * fpt))
            configs[name] = run_cfg
    if cfg.train.schedule == "wsd" and cfg.train.ckpt_every:
        rungs = _branches(rungs, configs, cfg.train.ckpt_every, cfg.train.decay_fraction)
    return Ladder(out, rungs, configs, skipped)


def _branches(rungs: list[Rung], configs: dict[str, Config], every: int, fraction: float) -> list[Rung]:
    """Under wsd, a size's shorter runs branch from its longest run (the trunk): the trunk's checkpoint at the
    last multiple of train.ckpt_every before the shorter run's cooldown has seen exactly the steps (rate and
    data) an independent run would have, so only the cooldown is trained again. Saves (1 - decay_fraction) of
    every shorter run, less up to ckpt_every steps each."""
    import dataclasses

    from pretrain.train.schedule import wsd_decay_steps

    trunks = {}
    for r in rungs:
        if r.size not in trunks or r.steps > trunks[r.size].steps:
            trunks[r.size] = r
    out = []
    for r in rungs:
        trunk = trunks[r.size]
        k = (r.steps - wsd_decay_steps(r.steps, fraction)) // every * every
        if r is trunk or k <= 0:
            out.append(r)
            continue
        t_cfg = configs[trunk.name]
        where = (f"{t_cfg.cluster.storage.rstrip('/')}/{trunk.name}" if t_cfg.cluster.storage else str(run_dir(t_cfg)))
        spec = f"{where}@{k}"
        tree = configs[r.name].model_dump(mode="json")
        tree["train"]["branch_from"] = spec
        configs[r.name] = config_from_dict(tree)
        out.append(dataclasses.replace(r, branch_from=spec))
    return out


# ------------------------------------------------------------------------------------------ bookkeeping


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _config_change(rdir: Path, cfg: Config) -> str | None:
    """The first key where rdir/config.yaml differs from `cfg` ("key: old -> new"); None when equal or absent."""
    path = rdir / "config.yaml"
    if not path.is_file():
        return None
    try:
        old = _flat(config_from_dict(yaml.safe_load(path.read_text()) or {}).model_dump(mode="json"))
    except (ConfigError, yaml.YAMLError) as e:
        return f"its config.yaml does not load ({e})"
    new = _flat(cfg.model_dump(mode="json"))
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            return f"{key}: {old.get(key)!r} -> {new.get(key)!r}"
    return None


def finished(rdir: Path, rung: Rung) -> bool:
    """Whether the run is complete: its summary.json has a final loss and all the planned steps."""
    try:
        summary = json.loads((rdir / "summary.json").read_text())
    except (OSError, ValueError):
        return False
    return summary.get("final_loss") is not None and int(summary.get("steps", 0)) >= rung.steps


def prepare(ladder: Ladder) -> tuple[list[Rung], list[Rung]]:
    """Write ladder.json and the configs of the runs still to do; (done, todo). Refuses a run directory that
    holds another config (changing the ladder's config under a finished run would mix two ladders)."""
    from pretrain.atomic import atomic_write

    done, todo = [], []
    for rung in ladder.rungs:
        rdir, cfg = ladder.rdir(rung), ladder.configs[rung.name]
        change = _config_change(rdir, cfg)
        if change is not None:
            raise LadderError(f"{rdir} holds a run of another config ({change}): delete it or give another --out")
        (done if finished(rdir, rung) else todo).append(rung)
    ladder.out.mkdir(parents=True, exist_ok=True)
    atomic_write(ladder.out / "ladder.json", json.dumps(ladder.plan_json(), indent=2) + "\n")
    for rung in todo:
        rdir = ladder.rdir(rung)
        rdir.mkdir(parents=True, exist_ok=True)
        atomic_write(rdir / "config.yaml", dump_config(ladder.configs[rung.name]))
    return done, todo


def mark(rdir: Path, rung: Rung) -> None:
    """Add the planned budget and size to a finished run's summary.json, so `pretrain scaling fit` on the
    runs groups them by the budget they were planned for (their FLOPs overshoot it by under one step)."""
    from pretrain.atomic import atomic_write

    path = rdir / "summary.json"
    summary = json.loads(path.read_text())
    if summary.get("budget") != rung.budget or summary.get("ladder_size") != rung.size:
        summary.update(budget=rung.budget, ladder_size=rung.size)
        atomic_write(path, json.dumps(summary, indent=2) + "\n")


# ------------------------------------------------------------------------------------------ running


def train_run(tree: dict) -> None:
    """Train (or resume) one run of the ladder: the run's lock, then `launch` on the Ray this process has
    (or starts). Takes the config as a dict: it is also the body of a Ray task."""
    from pretrain.launch.local import launch
    from pretrain.launch.runlock import RunLock

    cfg = config_from_dict(tree)
    lock = RunLock(run_dir(cfg))
    lock.acquire()
    try:
        launch(cfg, started_at=time.time(), quiet=True)
    finally:
        lock.release()


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
            # Trunks and independent runs first, then the branches: each needs its trunk's checkpoint.
            for wave in ([r for r in todo if not r.branch_from], [r for r in todo if r.branch_from]):
                (_run_cluster if cluster else _run_local)(ladder, wave, tracker, run_fn)
        finally:
            stop.set()
            poller.join(timeout=5)
    for rung in ladder.rungs:
        if rung.name in tracker.done:
            mark(ladder.rdir(rung), rung)
    return tracker


# ------------------------------------------------------------------------------------------ the fit


def fit_ladder(ladder: Ladder, *, bootstrap: int = 300, seed: int = 0, starts: int | None = None,
               plots: bool = True) -> dict:
    """`pretrain scaling fit` over the ladder's finished runs into <out>/fit/; returns fit.json's document."""
    from pretrain.cli.scaling import fit_and_write
    from pretrain.scaling.table import read_runs

    dirs = [ladder.rdir(r) for r in ladder.rungs if finished(ladder.rdir(r), r)]
    if not dirs:
        raise LadderError(f"{ladder.out}: no finished runs to fit")
    points = read_runs(dirs)
    return fit_and_write(points, "runs", [str(d) for d in dirs], ladder.out / "fit", bootstrap=bootstrap,
                         seed=seed, starts=starts, plots=plots)


def log_wandb(ladder: Ladder, doc: dict, project: str, name: str) -> Path:
    """One W&B run for the ladder (offline unless an API key is set, like the runs' own): a table of the runs,
    the fitted exponents and predictions in its summary, the plots as images. Returns its directory."""
    import wandb

    fit_dir = ladder.out / "fit"
    mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    run = wandb.init(project=project, name=name, job_type="scaling-ladder", dir=str(fit_dir), mode=mode,
                     config=ladder.plan_json(), settings=wandb.Settings(console="off", silent=True))
    columns = ["name", "budget", "params", "tokens", "flops", "loss"]
    by_path = {str(ladder.rdir(r)): r for r in ladder.rungs}
    rows = [[Path(p["name"]).name, by_path[p["name"]].budget if p["name"] in by_path else p.get("budget"),
             p["params"], p["tokens"], p["flops"], p["loss"]] for p in doc["runs"]]
    images = {p.stem: wandb.Image(str(p)) for p in sorted(fit_dir.glob("*.png"))}
    run.log({"runs": wandb.Table(columns=columns, data=rows), **images})
    a3, target = doc["approach3"], doc["target"]
    summary = {f"approach3/{k}": a3[k] for k in ("E", "A", "B", "alpha", "beta", "a", "b")}
    summary.update({f"approach3/{k}_ci95": a3["ci95"][k] for k in ("a", "b") if a3["ci95"].get(k)})
    if "skipped" not in doc["approach2"]:
        summary.update({"approach2/a": doc["approach2"]["a"], "approach2/b": doc["approach2"]["b"]})
    summary.update({"target/flops": target["flops"],
                    **{f"target/{k}": v for k, v in (target.get("approach3") or {}).items() if not isinstance(v, dict)}})
    run.summary.update(summary)
    path = Path(run.dir).parent
    run.finish()
    return path
