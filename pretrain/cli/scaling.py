"""`pretrain scaling ...`: fit scaling laws to runs. Argument parsing, progress and reporting only; the work
is in pretrain.scaling.table (reading), .fit (fitting), .plots (drawing) and .report (fit.json).

`pretrain scaling fit RUNS... | TABLE.csv --out DIR` writes DIR/fit.json, whose keys other tools may read:

    approach3          E, A, B, alpha, beta, a (= beta/(alpha+beta), the exponent of N_opt in C), b, and
                       ci95: {name: [low, high]} for each (bootstrap percentiles); n_opt and d_opt:
                       {coefficient, exponent} of N_opt(C) = coefficient * C^exponent; fit diagnostics
    approach2          per budget its parabola's minimum (n_opt, d_opt, loss_min, inside, used), a and b with
                       ci95 (given 3+ budgets), n_opt and d_opt like approach3's; or {skipped: reason}
    target             flops; per approach n_opt, d_opt, tokens_per_param (and approach 3's loss), with ci95
    runs, source       the points fitted (each with params, params_active, n: the N fitted, tokens, flops,
                       loss) and where they came from, source.params naming N: total, non-embedding or active
                       (--params auto: active for a mixture of experts); flops_per_param_token: k in C = k N D

and the plots isoflops.png, frontier.png, optimal.png and residuals.png. Bad input ends with one line on
stderr (`error: ...`) and exit code 2.

`pretrain scaling ladder CONFIG [--budgets ... | --tokens-per-param ...] [--mode grid|wsds] [--sizes ...] [--out DIR]`
plans a ladder (an isoFLOP grid, or WSD-S: one wsd trunk per size, a cooldown per point), runs it
(resuming an interrupted one) and fits it into DIR/fit/ (pretrain/scaling/ladder.py, runner.py, report.py).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from pretrain.cli.common import fail
from pretrain.config import ConfigError
from pretrain.errors import first_line
from pretrain.scaling import ScalingError
from pretrain.scaling.report import fit_and_write

app = typer.Typer(help="Fit scaling laws (Chinchilla approaches 2 and 3) to runs or published tables.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


@app.callback()
def _group() -> None:
    """Fit scaling laws (Chinchilla approaches 2 and 3) to runs or published tables."""


def _read(sources: list[Path], metric: str, params: str, force: bool):
    from pretrain.scaling.table import read_runs, read_table

    tables = [p for p in sources if p.suffix.lower() == ".csv"]
    if tables and len(sources) > 1:
        raise ScalingError("give one CSV table or run directories, not both (or several tables)")
    if tables:
        if not tables[0].is_file():
            raise ScalingError(f"{tables[0]}: no such table")
        return read_table(tables[0], params=params), "table"
    files = [p for p in sources if p.is_file()]
    if files:
        raise ScalingError(f"{files[0]}: not a run directory or a .csv table")
    return read_runs(sources, metric=metric, params=params, force=force), "runs"


def _ci(ci: list[float] | None, fmt: str) -> str:
    return "" if not ci else f"[{ci[0]:{fmt}}, {ci[1]:{fmt}}]"


def _report(result: dict, out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    a3, a2, target = result["approach3"], result["approach2"], result["target"]
    source = result["source"]
    unit = source.get("unit", "tokens")
    table = Table(title=f"scaling fit: {source['points']} runs ({source['metric']}), N = {source['params']} parameters")
    for col in ("", "value", "95% interval"):
        table.add_column(col, justify="right" if col else "left")
    for name in ("E", "A", "B", "alpha", "beta", "a", "b"):
        fmt = ".4g" if name in ("A", "B") else ".4f"
        table.add_row(f"approach 3 {name}", f"{a3[name]:{fmt}}", _ci(a3["ci95"].get(name), fmt))
    if "skipped" in a2:
        table.add_row("approach 2", "skipped", a2["skipped"])
    else:
        used = sum(b["used"] for b in a2["budgets"])
        for name in ("a", "b"):
            table.add_row(f"approach 2 {name} ({used} budgets)", f"{a2[name]:.4f}",
                          _ci((a2["ci95"] or {}).get(name), ".4f"))
    for approach in ("approach3", "approach2"):
        pred = target[approach]
        if not pred:
            continue
        label = f"{approach[:-1]} {approach[-1]} at {target['flops']:.3g} FLOPs:"
        table.add_row(f"{label} N_opt", f"{pred['n_opt']:.4g}", _ci(pred["ci95"]["n_opt"], ".4g"))
        table.add_row(f"  D_opt ({unit})", f"{pred['d_opt']:.4g}", _ci(pred["ci95"]["d_opt"], ".4g"))
        table.add_row(f"  {unit} per parameter", f"{pred['tokens_per_param']:.3g}",
                      _ci(pred["ci95"]["tokens_per_param"], ".3g"))
        if "loss" in pred:
            table.add_row("  loss", f"{pred['loss']:.4f}", _ci(pred["ci95"]["loss"], ".4f"))
    console = Console()
    console.print(table)
    console.print(f"wrote {out / 'fit.json'} and plots in {out}")


@app.command()
def fit(
    sources: list[Path] = typer.Argument(..., help="run directories (or directories of runs), or one CSV table with columns params, tokens (or flops), loss"),
    out: Path = typer.Option(..., "--out", help="directory for fit.json and the plots"),
    force: bool = typer.Option(False, "--force", help="fit runs of different datasets or tokenizers together"),
    target_flops: Optional[float] = typer.Option(None, "--target-flops", help="predict N_opt, D_opt and loss at this compute (default: 10x the largest run's)"),
    bootstrap: int = typer.Option(300, "--bootstrap", min=0, help="bootstrap resamples for the intervals"),
    starts: Optional[int] = typer.Option(None, "--starts", min=1, help="run L-BFGS-B from only the N grid points of lowest objective (default: all 4,500 of Hoffmann et al.'s grid)"),
    metric: str = typer.Option("loss", "--metric", help="loss (final_val_loss, else final_loss) or bpb (final_val_bpb)"),
    params: str = typer.Option("auto", "--params", help="N: total, non-embedding or active parameters; auto: active when a run is a mixture of experts (fewer active than total), else total"),
    seed: int = typer.Option(0, "--seed", help="seed of the bootstrap resamples"),
) -> None:
    """Fit L(N, D) = E + A/N^alpha + B/D^beta (approach 3) and isoFLOP parabolas (approach 2)."""
    if target_flops is not None and not target_flops > 0:
        raise fail(f"--target-flops must be positive (got {target_flops})")
    try:
        points, kind = _read(sources, metric, params, force)
        doc = fit_and_write(points, kind, [str(p) for p in sources], out, target_flops=target_flops,
                            bootstrap=bootstrap, starts=starts, seed=seed)
    except ScalingError as e:
        raise fail(str(e)) from None
    _report(doc, out)


def _floats(text: str | None, what: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise fail(f"{what} must be comma-separated numbers, e.g. 1e13,3e13,1e14 (got {text!r})") from None


def _plan_table(ladder) -> None:
    from rich.console import Console
    from rich.table import Table

    moe = ladder.moe
    sparsity = f", {moe['n_experts']} experts, top-{moe['top_k']}: N = active parameters" if moe else ""
    wsds = ladder.mode == "wsds"
    table = Table(title=f"ladder ({ladder.mode}): {len(ladder.rungs)} runs in {ladder.out}{sparsity}")
    budgets = any(r.budget is not None for r in ladder.rungs)  # none: points in tokens per parameter
    for col in ("size", *(["budget"] if budgets else []), *(["tok/param", "from step"] if wsds else []), "params", "non-emb",
                *(["active"] if moe else []), f"FLOPs/{ladder.unit.rstrip('s')}", "steps", ladder.unit):
        table.add_column(col, justify="left" if col == "size" else "right")
    for r in ladder.rungs:  # the run's name is <run.name>-<budget>-<size>, or <run.name>-<size>-tpp<T>
        start = "trunk" if not r.branch_from else r.branch_from.rsplit("@", 1)[1]
        table.add_row(r.size, *([f"{r.budget:.3g}"] if budgets else []),
                      *([f"{r.tokens / r.params_active:.3g}", start] if wsds else []), f"{r.params:,}",
                      f"{r.params_non_embedding:,}", *([f"{r.params_active:,}"] if moe else []),
                      f"{r.flops_per_token:.3g}", f"{r.steps:,}", f"{r.tokens:,}")
    Console().print(table)
    cost = ladder.cost()
    typer.echo(f"FLOPs: {cost['plan']:.3g} to train, against {cost['full_grid']:.3g} for the same "
               f"{len(ladder.rungs)} points each from scratch ({cost['ratio']:.0%})"
               + (f"; trunks checkpoint every {ladder.checkpoint_every} steps" if wsds else ""))
    for s in ladder.skipped:
        at = f"at {s['budget']:.3g} FLOPs" if s.get("budget") is not None else f"point {s.get('point')}"
        typer.echo(f"skipped {s['size']} {at}: {s['reason']}", err=True)


def submit_command(command: str, config: Path, overrides: list[str], address: str, argv: list[str]) -> None:
    """`pretrain scaling COMMAND` (ladder, sweep) as one Ray job: the same command again (without --address) as
    the job's entrypoint, where RAY_ADDRESS makes the runner run the runs as concurrent Ray tasks."""
    import shlex

    from pretrain.launch.jobs import JobCommandError, build_job, connect

    try:
        spec = build_job(config, overrides)
        spec["entrypoint"] = shlex.join(["pretrain", "scaling", command, *argv])
        spec["metadata"]["kind"] = f"scaling-{command}"
        client, addr = connect(address)
        for w in spec.pop("warnings"):
            typer.echo(f"warning: {w}", err=True)
        jid = client.submit_job(**spec)
    except JobCommandError as e:
        raise fail(str(e), e.code) from None
    except Exception as e:  # noqa: BLE001 - Ray's client errors: one line
        raise fail(f"submitting the {command} to {address}: {first_line(e)}", 1) from None
    typer.echo(f"submitted to {addr}: {spec['entrypoint']}", err=True)
    typer.echo(jid)


def run_planned(plan, plan_only: bool, what: str):
    """Run a planned ladder or sweep (resuming it), or with `plan_only` write its plan and configs only (None).
    Prints the outcome and each failed run; Ctrl-C ends with one line saying how to resume."""
    from pretrain.scaling.books import prepare
    from pretrain.scaling.runner import run_ladder

    try:
        if plan_only:
            done, todo = prepare(plan)
            typer.echo(f"planned {plan.out / 'ladder.json'}: {len(done)} runs done, {len(todo)} to run")
            return None
        started = time.time()
        tracker = run_ladder(plan)
    except ScalingError as e:
        raise fail(str(e)) from None
    except KeyboardInterrupt:
        done, _ = prepare(plan)
        raise fail(f"interrupted: {len(done)} of {len(plan.rungs)} runs done; the same command resumes the rest "
                   "(a run in flight from its last checkpoint)", 130) from None
    typer.echo(f"{what}: {tracker.line()} in {time.time() - started:.0f}s")
    for name, line in tracker.failed.items():
        typer.echo(f"failed {name}: {line}", err=True)
    return tracker


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def ladder(
    config: Path = typer.Argument(..., help="run config YAML (its ladder: block gives budgets and sizes), e.g. configs/ladder-tiny.yaml"),
    overrides: Optional[list[str]] = typer.Argument(None, help="section.key=value overrides of the runs' config"),
    budgets: Optional[str] = typer.Option(None, "--budgets", help="training FLOPs per run, comma-separated, e.g. 1e13,3e13,1e14"),
    tokens_per_param: Optional[str] = typer.Option(None, "--tokens-per-param", help="wsds: each size's points as tokens per (active) parameter, comma-separated, e.g. 5,10,20,40,80"),
    mode: Optional[str] = typer.Option(None, "--mode", help="grid (every size at every budget, from scratch) or wsds (one wsd trunk per size, a cooldown branched per point); default ladder.mode, else wsds with tokens per parameter, else grid"),
    sizes: Optional[str] = typer.Option(None, "--sizes", help="shapes DxL (d_model x n_layers) or DxLxH, comma-separated, e.g. 64x2,128x4; -eEkK after one makes it a mixture of E experts, K per token (64x2-e8k2)"),
    head_dim: Optional[int] = typer.Option(None, "--head-dim", min=1, help="heads = d_model / head_dim (default ladder.head_dim, 64)"),
    out: Optional[Path] = typer.Option(None, "--out", help="the ladder's directory (default ladder.out, else <run.dir>/<run.name>)"),
    address: Optional[str] = typer.Option(None, "--address", help="submit the ladder as one Ray job to this job API, e.g. http://HEAD:8265"),
    plan_only: bool = typer.Option(False, "--plan", help="write ladder.json and the runs' configs, print the plan, run nothing"),
    bootstrap: int = typer.Option(300, "--bootstrap", min=0, help="bootstrap resamples of the fit's intervals"),
    seed: int = typer.Option(0, "--seed", help="seed of the bootstrap resamples"),
) -> None:
    """Plan a ladder (an isoFLOP grid: every size at every budget; or WSD-S: one wsd trunk per size and a cooldown
    branched at each point), run it on Ray (resuming an interrupted one), fit it into DIR/fit/ and log a W&B
    summary run."""
    from pretrain.data import DataError
    from pretrain.load import load_config
    from pretrain.objectives import ObjectiveError
    from pretrain.scaling.ladder import plan_ladder
    from pretrain.scaling.report import fit_ladder, log_wandb

    overrides = list(overrides or [])
    if address:  # the same command as a Ray job, where RAY_ADDRESS makes it run the runs as concurrent tasks
        given = {"--budgets": budgets, "--tokens-per-param": tokens_per_param, "--mode": mode, "--sizes": sizes, "--head-dim": head_dim, "--out": out,
                 "--bootstrap": bootstrap, "--seed": seed}
        argv = [str(config), *overrides, *[str(x) for k, v in given.items() if v is not None for x in (k, v)]]
        return submit_command("ladder", config, overrides, address, argv)
    try:
        cfg = load_config(config, overrides)
        plan = plan_ladder(cfg, budgets=_floats(budgets, "--budgets"), sizes=sizes.split(",") if sizes else None,
                           head_dim=head_dim, out=out, mode=mode,
                           tokens_per_param=_floats(tokens_per_param, "--tokens-per-param"))
    except (ConfigError, ScalingError, DataError, ObjectiveError) as e:
        raise fail(str(e)) from None
    _plan_table(plan)
    tracker = run_planned(plan, plan_only, "ladder")
    if tracker is None:
        return
    try:
        doc = fit_ladder(plan, bootstrap=bootstrap, seed=seed)
    except ScalingError as e:
        raise fail(str(e), 1) from None
    _report(doc, plan.out / "fit")
    if cfg.log.wandb:
        path = log_wandb(plan, doc, cfg.log.project, f"{cfg.run.name}-ladder")
        typer.echo(f"W&B summary run: {path}")
    if tracker.failed:
        raise typer.Exit(1)
