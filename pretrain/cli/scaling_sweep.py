"""`pretrain scaling sweep`: train a learning rate x batch size grid at a few small FLOP budgets and fit the
compute-optimal lr and batch laws (DeepSeek LLM 2024, section 3.1) beside the loss law. Added to the
`pretrain scaling` app (pretrain.cli.scaling) when this module is imported (pretrain.cli mounts it). The work
is in pretrain.scaling.sweep (the plan, the fit's files), .runner (running, resuming) and .hyper (the laws).

    pretrain scaling sweep CONFIG [overrides] --budgets 1.5e11,5e11,1.5e12 --lrs 1e-3,3e-3,1e-2 --batches 1,2,4,8
        [--size 64x2] [--out DIR] [--fit-dir DIR] [--plan] [--address URL] [--bootstrap N] [--seed S]

writes DIR/ladder.json, DIR/runs/<name>/ and FIT_DIR/hyper.json + hyper.png (FIT_DIR default DIR/fit; a
ladder's fit directory puts them where `pretrain scaling recommend` reads them). Bad input ends with one line
on stderr (`error: ...`) and exit code 2; failed runs with exit code 1 after the fit of the others.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from pretrain.cli.common import fail
from pretrain.cli.scaling import _floats, app, run_planned, submit_command
from pretrain.cli.scaling_decide import print_hyper
from pretrain.config import ConfigError
from pretrain.scaling import ScalingError

# The grid of configs/sweep-tiny.yaml (a config holds no sweep: block): 36 runs of 92 to 7,400 steps, about
# 20 min on 2 CPU cores, an optimum inside the grid at each budget (docs/scaling.md).
BUDGETS, LRS, BATCHES = "1.5e11,5e11,1.5e12", "1e-3,3e-3,1e-2", "1,2,4,8"


def _plan_table(plan) -> None:
    from rich.console import Console
    from rich.table import Table

    from pretrain.scaling.sweep import run_settings

    r0 = plan.rungs[0]
    table = Table(title=f"sweep: {len(plan.rungs)} runs at {r0.size} ({r0.params:,} parameters, "
                        f"{r0.flops_per_token:.3g} FLOPs/token) in {plan.out}")
    for col in ("budget", "lr", "batch (seq)", "batch tokens", "steps", "tokens", "FLOPs"):
        table.add_column(col, justify="right")
    for r in plan.rungs:  # the run's name is <run.name>-<budget>-lr<lr>-b<batch>
        lr, batch = run_settings(plan, r.name)
        table.add_row(f"{r.budget:.3g}", f"{lr:.3g}", str(batch), f"{r.tokens // r.steps:,}", f"{r.steps:,}",
                      f"{r.tokens:,}", f"{r.flops:.3g}")
    Console().print(table)
    typer.echo(f"FLOPs: {plan.cost()['plan']:.3g} in all")
    for s in plan.skipped:
        typer.echo(f"skipped {s['budget']:.3g} FLOPs lr {s['lr']:.3g} batch {s['batch']}: {s['reason']}", err=True)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def sweep(
    config: Path = typer.Argument(..., help="run config YAML: the model, data and schedule every run shares, e.g. configs/sweep-tiny.yaml"),
    overrides: Optional[list[str]] = typer.Argument(None, help="section.key=value overrides of the runs' config"),
    budgets: str = typer.Option(BUDGETS, "--budgets", help="training FLOPs per run, comma-separated: two or three small budgets over a decade or more (a law needs an optimum inside the grid at 2+, 3+ for its interval)"),
    lrs: str = typer.Option(LRS, "--lrs", help="peak learning rates (optimizer.lr), comma-separated: 3+ values around the expected optimum"),
    batches: str = typer.Option(BATCHES, "--batches", help="global batch sizes in sequences per step (train.global_batch_size), comma-separated: 3+ values for a batch law; fewer fits the lr law only"),
    size: Optional[str] = typer.Option(None, "--size", help="the model's shape DxL (d_model x n_layers, the config's head size) or DxLxH; default the config's"),
    out: Optional[Path] = typer.Option(None, "--out", help="the sweep's directory (default <run.dir>/<run.name>)"),
    fit_dir: Optional[Path] = typer.Option(None, "--fit-dir", help="where hyper.json and hyper.png go (default OUT/fit); a ladder's fit directory puts them beside its fit.json for `pretrain scaling recommend`"),
    plan_only: bool = typer.Option(False, "--plan", help="write ladder.json and the runs' configs, print the plan, run nothing"),
    address: Optional[str] = typer.Option(None, "--address", help="submit the sweep as one Ray job to this job API, e.g. http://HEAD:8265 (the runs then go concurrently)"),
    bootstrap: int = typer.Option(300, "--bootstrap", min=0, help="bootstrap resamples of the laws' intervals"),
    seed: int = typer.Option(0, "--seed", help="seed of the bootstrap resamples"),
) -> None:
    """Train a learning rate x batch size grid at a few FLOP budgets (one run each, resuming an interrupted
    sweep), then fit eta_opt = a C^alpha and B_opt = b C^beta to each budget's optimum into FIT_DIR/hyper.json
    and log a W&B summary run."""
    from pretrain.data import DataError
    from pretrain.load import load_config
    from pretrain.objectives import ObjectiveError
    from pretrain.scaling.sweep import fit_sweep, log_wandb, plan_sweep

    overrides = list(overrides or [])
    if address:
        given = {"--budgets": budgets, "--lrs": lrs, "--batches": batches, "--size": size, "--out": out,
                 "--fit-dir": fit_dir, "--bootstrap": bootstrap, "--seed": seed}
        argv = [str(config), *overrides, *[str(x) for k, v in given.items() if v is not None for x in (k, v)]]
        return submit_command("sweep", config, overrides, address, argv)
    try:
        cfg = load_config(config, overrides)
        plan = plan_sweep(cfg, _floats(budgets, "--budgets"), _floats(lrs, "--lrs"), _floats(batches, "--batches"),
                          size=size, out=out)
    except (ConfigError, ScalingError, DataError, ObjectiveError) as e:
        raise fail(str(e)) from None
    _plan_table(plan)
    if cfg.spike.sigma is not None:
        typer.echo(f"warning: the spike guard skips steps over {cfg.spike.sigma:g} sigma: at small batches it skips "
                   "ordinary steps, and a sweep's losses then leave out what each lr and batch did "
                   "(spike.sigma=null: non-finite steps only)", err=True)
    fit_dir = (fit_dir or plan.out / "fit").expanduser().resolve()
    tracker = run_planned(plan, plan_only, "sweep")
    if tracker is None:
        return
    try:
        fit, doc = fit_sweep(plan, fit_dir, bootstrap=bootstrap, seed=seed)
    except ScalingError as e:
        raise fail(str(e), 1) from None
    print_hyper(fit, doc, fit_dir)
    if cfg.log.wandb:
        own, ladder_run = log_wandb(plan, doc, fit_dir, cfg.log.project, f"{cfg.run.name}-sweep")
        typer.echo(f"W&B summary run: {own}")
        if ladder_run:
            typer.echo(f"hyper.png and the laws added to the ladder's W&B summary run: {ladder_run}")
    if tracker.failed:
        raise typer.Exit(1)
