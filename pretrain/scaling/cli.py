"""`pretrain scaling ...`: fit scaling laws to runs. Argument parsing, progress and reporting only; the work
is in pretrain.scaling.table (reading), .fit (fitting) and .plots (drawing).

`pretrain scaling fit RUNS... | TABLE.csv --out DIR` writes DIR/fit.json, whose keys other tools may read:

    approach3          E, A, B, alpha, beta, a (= beta/(alpha+beta), the exponent of N_opt in C), b, and
                       ci95: {name: [low, high]} for each (bootstrap percentiles); n_opt and d_opt:
                       {coefficient, exponent} of N_opt(C) = coefficient * C^exponent; fit diagnostics
    approach2          per budget its parabola's minimum (n_opt, d_opt, loss_min, inside, used), a and b with
                       ci95 (given 3+ budgets), n_opt and d_opt like approach3's; or {skipped: reason}
    target             flops; per approach n_opt, d_opt, tokens_per_param (and approach 3's loss), with ci95
    runs, source       the points fitted and where they came from; flops_per_param_token: k in C = k N D

and the plots isoflops.png, frontier.png, optimal.png and residuals.png. Bad input ends with one line on
stderr (`error: ...`) and exit code 2.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from pretrain.fail import fail
from pretrain.scaling import ScalingError

app = typer.Typer(help="Fit scaling laws (Chinchilla approaches 2 and 3) to runs or published tables.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


@app.callback()
def _group() -> None:
    """Fit scaling laws (Chinchilla approaches 2 and 3) to runs or published tables."""
    # A callback keeps `fit` a sub-command while it is the only one (the ladder command comes later).


def _read(sources: list[Path], metric: str, params: str, force: bool):
    from pretrain.scaling.table import read_runs, read_table

    tables = [p for p in sources if p.suffix.lower() == ".csv"]
    if tables and len(sources) > 1:
        raise ScalingError("give one CSV table or run directories, not both (or several tables)")
    if tables:
        if not tables[0].is_file():
            raise ScalingError(f"{tables[0]}: no such table")
        return read_table(tables[0]), "table"
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
    table = Table(title=f"scaling fit: {result['source']['points']} runs ({result['source']['metric']})")
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
        table.add_row("  D_opt (tokens)", f"{pred['d_opt']:.4g}", _ci(pred["ci95"]["d_opt"], ".4g"))
        table.add_row("  tokens per parameter", f"{pred['tokens_per_param']:.3g}",
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
    params: str = typer.Option("total", "--params", help="total or non-embedding parameter counts as N"),
    seed: int = typer.Option(0, "--seed", help="seed of the bootstrap resamples"),
) -> None:
    """Fit L(N, D) = E + A/N^alpha + B/D^beta (approach 3) and isoFLOP parabolas (approach 2)."""
    from rich.progress import Progress

    from pretrain.atomic import atomic_write
    from pretrain.scaling.fit import fit_scaling
    from pretrain.scaling.plots import write_plots

    if target_flops is not None and not target_flops > 0:
        raise fail(f"--target-flops must be positive (got {target_flops})")
    try:
        points, kind = _read(sources, metric, params, force)
        with Progress(transient=True) as bar:
            tasks: dict[str, int] = {}

            def progress(stage: str, done: int, total: int) -> None:
                if stage not in tasks:
                    tasks[stage] = bar.add_task(stage, total=total)
                bar.update(tasks[stage], completed=done)

            result = fit_scaling(points.params, points.tokens, points.flops, points.loss,
                                 budget=points.budget, target_flops=target_flops, resamples=bootstrap,
                                 starts=starts, seed=seed, progress=progress)
    except ScalingError as e:
        raise fail(str(e)) from None
    out.mkdir(parents=True, exist_ok=True)
    doc = {
        "source": {"kind": kind, "paths": [str(p) for p in sources], "points": len(points),
                   "metric": points.metric, "params": params, **points.identity},
        **result.to_json(),
        "runs": points.rows(),
    }
    write_plots(result, out)
    atomic_write(out / "fit.json", json.dumps(doc, indent=2) + "\n")
    _report(doc, out)
