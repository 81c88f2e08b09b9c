"""A hyperparameter sweep: learning rate x batch size at a few small FLOP budgets, planned as a `Ladder`
(mode "sweep") so pretrain.scaling.runner runs and resumes it like an isoFLOP ladder, then fitted into the laws
eta_opt(C) and B_opt(C) of pretrain.scaling.hyper (DeepSeek LLM 2024, https://arxiv.org/abs/2401.02954, 3.1).

`pretrain scaling sweep CONFIG --budgets ... --lrs ... --batches ...` (pretrain/cli/scaling_sweep.py): every
run is the config at one shape (its own, or `--size DxL`) with optimizer.lr = lr, train.global_batch_size =
batch (sequences per step) and train.flops = budget, so the trainer's length rule gives its steps. Its
summary.json then holds what read_sweep_runs reads: schedule.lr, tokens per trained step and the
planned budget (`books.mark`), which groups the runs per budget exactly. A combination of fewer than
MIN_STEPS steps, or not past its warm-up, is skipped; a budget where none fits is refused. The directory:

    ladder.json            the plan (mode: sweep)
    runs/<name>/           <run.name>-<budget>-lr<lr>-b<batch>
    fit/                   hyper.json, hyper.png (or --fit-dir: beside a ladder's fit.json for `recommend`)

The validation set is held fixed across batch sizes: the micro-batch changes with the batch, and the set is
eval.batches x micro-batch x workers sequences (pretrain/train/run.py), so eval.batches is scaled to match.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np

from pretrain.config import Config, ConfigError, run_dir
from pretrain.scaling import ScalingError
from pretrain.scaling.books import finished
from pretrain.scaling.ladder import Ladder, Size, budget_label, config_of, make_rung, parse_size, probe_sizes

MIN_STEPS = 10  # fewer, and a run is mostly warm-up and start-up: its loss says little about its lr


class SweepError(ScalingError):
    """A sweep that cannot be planned or fitted as asked (one line)."""


def number_label(x: float) -> str:
    """1e-3, 3e-3, 2.5e-4: part of a run's name."""
    mantissa, exponent = f"{x:.2e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def _check(what: str, values: list, integer: bool = False) -> list:
    if not values:
        raise SweepError(f"a sweep needs {what}: e.g. --{what} " + {"budgets": "1e11,3e11,1e12",
                         "lrs": "1e-3,3e-3,1e-2", "batches": "4,8,16"}[what])
    for v in values:
        ok = v > 0 and math.isfinite(v) and (not integer or float(v).is_integer())
        if not ok:
            raise SweepError(f"--{what} must be positive {'whole numbers of sequences' if integer else 'numbers'} "
                             f"(got {v:g})")
    return sorted({int(v) if integer else float(v) for v in values})


def _shape(cfg: Config, size: str | None) -> Size:
    """The sweep's one shape: `size` (DxL at the config's head size, or DxLxH), else the config's own."""
    m = cfg.model
    d, layers, heads = (getattr(m, k, None) for k in ("d_model", "n_layers", "n_heads"))
    if size is not None:
        return parse_size(size, d // heads if d and heads else 64)
    if not (d and layers and heads):
        raise SweepError(f"model.type {m.type}: no d_model, n_layers and n_heads to sweep at; give --size DxL")
    return Size(f"{d}x{layers}", d, layers, heads)


def _micro(cfg: Config, batch: int) -> int:
    """The micro-batch for `batch` sequences per step: the largest that divides both the config's micro-batch
    (so the validation set stays the same sequences, see the module docstring) and batch / workers."""
    workers = cfg.cluster.workers
    if batch % workers:
        raise SweepError(f"batch {batch} sequences does not split over cluster.workers={workers}: give batches "
                         f"that are multiples of {workers}")
    return math.gcd(cfg.train.micro_batch_size, batch // workers)


def plan_sweep(cfg: Config, budgets: list[float], lrs: list[float], batches: list[int], size: str | None = None,
               out: Path | None = None) -> Ladder:
    """One run per (budget, lr, batch) at one shape; reads the data's manifests, builds only meta-device models."""
    from pretrain.launch.local import resolve_paths
    from pretrain.length import steps_for

    budgets, lrs = _check("budgets", budgets), _check("lrs", lrs)
    batches = _check("batches", batches, integer=True)
    micro = {b: _micro(cfg, b) for b in batches}
    out = Path(out or run_dir(cfg)).expanduser().resolve()
    [(shape, tree, counts, fpt, per_step)], moe, *_ = probe_sizes(cfg, [_shape(cfg, size)], out, budgets[0])
    per_sample = per_step // cfg.train.global_batch_size  # tokens per sequence (the objective's units)
    warmup = cfg.schedule.warmup_steps
    rungs, configs, skipped = [], {}, []
    for budget in budgets:
        fits = 0
        for batch in batches:
            steps = steps_for(units_per_step=batch * per_sample, flops=budget, flops_per_unit=fpt)
            if steps < max(MIN_STEPS, warmup + 1):
                reason = (f"{steps} steps, fewer than {MIN_STEPS}" if steps < MIN_STEPS
                          else f"{steps} steps, not past schedule.warmup_steps={warmup}")
                skipped += [{"budget": budget, "size": shape.label, "lr": lr, "batch": batch, "reason": reason}
                            for lr in lrs]
                continue
            fits += 1
            for lr in lrs:
                name = f"{cfg.run.name}-{budget_label(budget)}-lr{number_label(lr)}-b{batch}"
                run_tree = json.loads(json.dumps(tree))
                run_tree["run"]["name"] = name
                run_tree["optimizer"]["lr"] = lr
                run_tree["train"].update(flops=budget, global_batch_size=batch, micro_batch_size=micro[batch])
                run_tree["eval"]["batches"] = cfg.eval.batches * cfg.train.micro_batch_size // micro[batch]
                try:
                    configs[name] = resolve_paths(config_of(run_tree))
                except ConfigError as e:
                    raise SweepError(f"run {name}: {e}") from None
                rungs.append(make_rung(name, budget, shape, counts, fpt, steps, batch * per_sample))
        if not fits:
            most = steps_for(units_per_step=batches[0] * per_sample, flops=budget, flops_per_unit=fpt)
            raise SweepError(f"budget {budget:.3g} FLOPs: no batch gets {max(MIN_STEPS, warmup + 1)} steps at "
                             f"{shape.label} (batch {batches[0]}: {most}); raise the budget or lower --batches")
    return Ladder(out, rungs, configs, skipped, moe, mode="sweep")


def run_settings(ladder: Ladder, name: str) -> tuple[float, int]:
    """A planned run's (lr, batch in sequences per step)."""
    cfg = ladder.configs[name]
    return cfg.optimizer.lr, cfg.train.global_batch_size


def finished_dirs(ladder: Ladder) -> list[Path]:
    return [ladder.rdir(r) for r in ladder.rungs if finished(ladder.rdir(r), r)]


def fit_sweep(ladder: Ladder, fit_dir: Path, *, bootstrap: int = 300, seed: int = 0, metric: str = "loss"):
    """Fit the laws to the sweep's finished runs; write fit_dir/hyper.json and hyper.png. Returns (fit, doc).
    Where no law can be fitted, hyper.png still shows the runs and each budget's optimum (a diagnosis), and
    the error lists why each budget was not used; no hyper.json is written (recommend would read it)."""
    from pretrain.scaling.hyper import HyperFit, fit_hyper, optimum, plot_sweep, read_sweep_runs

    dirs = finished_dirs(ladder)
    if not dirs:
        raise SweepError(f"{ladder.out}: no finished runs to fit")
    sweep = read_sweep_runs(dirs, metric)
    # The planned tokens per step, not read_sweep_runs' tokens / steps: a step the spike guard skipped
    # (pretrain/train/spike.py) trained no tokens, which puts a run at 510 tokens per step instead of 512.
    planned = {str(ladder.rdir(r)): r.tokens / r.steps for r in ladder.rungs}
    sweep = dataclasses.replace(sweep, batch=np.array([planned[n] for n in sweep.names]))
    fit_dir.mkdir(parents=True, exist_ok=True)
    try:
        fit = fit_hyper(sweep, resamples=bootstrap, seed=seed)
    except ScalingError as e:
        from pretrain.scaling.approach2 import group_budgets

        labels, values = group_budgets(sweep.flops, sweep.budget)
        opts = [optimum(float(c), sweep.lr[labels == g], sweep.batch[labels == g], sweep.loss[labels == g])
                for g, c in enumerate(values)]
        plot_sweep(HyperFit(opts, {}, {}, {}, sweep), fit_dir / "hyper.png")
        why = "; ".join(f"{o.flops:.3g}: {o.reason}" for o in opts if not o.used)
        raise SweepError(f"{e} ({why}); see {fit_dir / 'hyper.png'} and widen the grid toward the best runs") from None
    return fit, write_fit(fit, [str(d) for d in dirs], fit_dir, bootstrap)


def write_fit(fit, paths: list[str], fit_dir: Path, bootstrap: int) -> dict:
    """hyper.json and hyper.png in fit_dir (the one writer: `hyperfit` and `sweep` both use it)."""
    from pretrain.atomic import atomic_write
    from pretrain.scaling.hyper import plot_sweep

    fit_dir.mkdir(parents=True, exist_ok=True)
    doc = {"source": {"paths": paths, "runs": len(fit.sweep)}, "bootstrap": bootstrap, **fit.to_json()}
    atomic_write(fit_dir / "hyper.json", json.dumps(doc, indent=2) + "\n")
    plot_sweep(fit, fit_dir / "hyper.png")
    return doc


def log_wandb(ladder: Ladder, doc: dict, fit_dir: Path, project: str, name: str) -> tuple[Path, Path | None]:
    """One W&B run for the sweep (offline unless an API key is set): the runs' table, the laws in its summary,
    hyper.png. When `fit_dir` is a ladder's fit directory, the same plot, table and laws (keys under `hyper/`)
    also go to the ladder's W&B summary run (`report.log_to_fit_run`). Returns the sweep run's directory and
    the ladder run's (None when the fit has no such run)."""
    import wandb

    from pretrain.metrics.sinks import wandb_mode
    from pretrain.scaling.report import log_to_fit_run

    columns = ["name", "budget", "lr", "batch_sequences", "batch_tokens", "steps", "flops", "loss"]
    by_dir = {str(ladder.rdir(r)): r for r in ladder.rungs}
    rows = []
    for p in doc["runs"]:
        rung = by_dir.get(p["name"])
        batch = run_settings(ladder, rung.name)[1] if rung else None
        rows.append([Path(p["name"]).name, rung.budget if rung else None, p["lr"], batch, p["batch_tokens"],
                     rung.steps if rung else None, p["flops"], p["loss"]])
    summary = {}
    for q in ("lr", "batch"):
        if doc.get(q):
            summary.update({f"{q}/coefficient": doc[q]["coefficient"], f"{q}/exponent": doc[q]["exponent"],
                            f"{q}/exponent_ci95": doc[q]["ci95"]["exponent"]})
    plot = fit_dir / "hyper.png"
    run = wandb.init(project=project, name=name, job_type="scaling-sweep", dir=str(fit_dir), mode=wandb_mode(),
                     config=ladder.plan_json(), settings=wandb.Settings(console="off", silent=True))
    run.log({"runs": wandb.Table(columns=columns, data=rows),
             **({"hyper": wandb.Image(str(plot))} if plot.is_file() else {})})
    run.summary.update(summary)
    path = Path(run.dir).parent
    run.finish()
    ladder_run = log_to_fit_run(fit_dir, [plot], {"sweep": [dict(zip(columns, r, strict=True)) for r in rows]},
                                {f"hyper/{k}": v for k, v in summary.items()})
    return path, ladder_run
