"""`pretrain scaling hyperfit | recommend | check`: from fits to decisions. Added to the `pretrain scaling` app
(pretrain.cli.scaling) when this module is imported (pretrain.cli mounts both). The work is in
pretrain.scaling.hyper (the learning-rate and batch laws), .recommend (the run at a budget) and .check (a run
against its prediction); `pretrain plan` (pretrain.plan) gives the recommended run's memory and time.

    pretrain scaling hyperfit SWEEP.csv | RUNS... --out FIT_DIR      FIT_DIR/hyper.json, hyper.png
    pretrain scaling recommend FIT_DIR --config BASE.yaml --flops 1e23 [--gpu h100-sxm --gpus 256]
    pretrain scaling recommend FIT_DIR --config BASE.yaml --gpu-hours 2000 --gpu h100-sxm --gpus 8 --mfu 0.4
    pretrain scaling check FIT_DIR RUN_DIR                         FIT_DIR/checks.jsonl, frontier.png

Bad input ends with one line on stderr (`error: ...`) and exit code 2.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from pretrain.cli.common import fail
from pretrain.cli.scaling import _ci, app
from pretrain.config import ConfigError
from pretrain.scaling import ScalingError


@app.command()
def hyperfit(
    sources: list[Path] = typer.Argument(..., help="one CSV (columns flops or budget, lr, batch_tokens, loss) or sweep run directories"),
    out: Path = typer.Option(..., "--out", help="directory for hyper.json and hyper.png (the loss law's fit directory)"),
    bootstrap: int = typer.Option(300, "--bootstrap", min=0, help="bootstrap resamples for the intervals"),
    metric: str = typer.Option("loss", "--metric", help="loss (final_val_loss, else final_loss) or bpb, for run directories"),
    seed: int = typer.Option(0, "--seed", help="seed of the bootstrap"),
) -> None:
    """Fit eta_opt = a C^alpha and B_opt = b C^beta (DeepSeek LLM 2024, section 3.1) to a learning-rate x batch sweep."""
    from pretrain.scaling.hyper import fit_hyper, read_sweep_runs, read_sweep_table
    from pretrain.scaling.sweep import write_fit

    try:
        if len(sources) == 1 and sources[0].suffix.lower() == ".csv":
            if not sources[0].is_file():
                raise ScalingError(f"{sources[0]}: no such table")
            sweep = read_sweep_table(sources[0])
        else:
            sweep = read_sweep_runs(sources, metric)
        fit = fit_hyper(sweep, resamples=bootstrap, seed=seed)
    except ScalingError as e:
        raise fail(str(e)) from None
    print_hyper(fit, write_fit(fit, [str(p) for p in sources], out, bootstrap), out)


def print_hyper(fit, doc: dict, out: Path) -> None:
    """Each budget's optimum (or why it is not used), the laws with their 95% intervals, and where
    they were written: what `hyperfit` and `sweep` print."""
    for o in fit.optima:
        at = ", ".join(f"{q} {getattr(o, q):.3g}" for q in ("lr", "batch") if getattr(o, q) is not None)
        typer.echo(f"{o.flops:.3g} FLOPs, {o.runs} runs: " + (f"optimum {at}" if o.used else f"not used: {o.reason}"))
    for q, unit in (("lr", ""), ("batch", " tokens")):
        law = doc[q]
        if law:
            typer.echo(f"{q}_opt = {law['coefficient']:.4g} C^{law['exponent']:.4f}{unit}   95%: coefficient "
                       f"{_ci(law['ci95']['coefficient'], '.3g')}, exponent {_ci(law['ci95']['exponent'], '.4f')}")
    typer.echo(f"wrote {out / 'hyper.json'} and {out / 'hyper.png'}")


def _budget(flops: float | None, gpu_hours: float | None, gpu: str | None, gpus: int, mfu: float, cfg) -> float:
    """The budget in FLOPs: given, or GPU-hours x 3600 x the GPU's dense peak at the config's precision x MFU."""
    from pretrain.metrics.flops import peak_for
    from pretrain.plan import device

    if (flops is None) == (gpu_hours is None):
        raise fail("give the budget as --flops F, or as --gpu-hours H with --gpu NAME (and --gpus, --mfu)")
    if flops is not None:
        if not flops > 0:
            raise fail(f"--flops must be a positive number of FLOPs (got {flops:g})")
        return flops
    if not gpu_hours > 0:
        raise fail(f"--gpu-hours must be positive (got {gpu_hours:g})")
    if not gpu:
        raise fail("--gpu-hours needs --gpu NAME (the peak table's, e.g. h100-sxm)")
    if not 0 < mfu <= 1:
        raise fail(f"--mfu {mfu}: want a fraction in (0, 1]")
    spec = device(gpu)
    return gpu_hours * 3600 * peak_for(spec.model, cfg.train.precision, cfg.train.tf32) * mfu


@app.command()
def recommend(
    fit_dir: Path = typer.Argument(..., help="a fit directory: fit.json (pretrain scaling fit/ladder), optionally hyper.json"),
    config: Path = typer.Option(..., "--config", help="base run config of the model family, e.g. configs/llama-7b.yaml"),
    flops: Optional[float] = typer.Option(None, "--flops", help="training budget in FLOPs, e.g. 1e23"),
    gpu_hours: Optional[float] = typer.Option(None, "--gpu-hours", help="budget in GPU-hours (with --gpu, --gpus, --mfu)"),
    gpu: Optional[str] = typer.Option(None, "--gpu", help="GPU model from the peak table, e.g. h100-sxm: the budget's peak and the plan"),
    gpus: Optional[int] = typer.Option(None, "--gpus", min=1, help="GPUs of the run; default the config's cluster.workers"),
    mfu: float = typer.Option(0.4, "--mfu", help="model FLOPs utilisation for GPU-hours and the plan"),
    out: Optional[Path] = typer.Option(None, "--out", help="the config to write (default FIT_DIR/<run.name>-<budget>.yaml)"),
    as_json: bool = typer.Option(False, "--json", help="print the recommendation as one JSON object"),
) -> None:
    """N_opt, D_opt and the loss at a budget (with intervals), a model shape, lr and batch, the run length and
    `pretrain plan`'s memory and days; writes the runnable config."""
    from pretrain.atomic import atomic_write
    from pretrain.config import dump_config
    from pretrain.load import load_config
    from pretrain.plan import make_plan
    from pretrain.redact import redact_yaml
    from pretrain.scaling.recommend import recommend as decide
    from pretrain.scaling.recommend import to_json
    from pretrain.scaling.saved import read_fit

    try:
        read_fit(fit_dir)  # a missing fit is the first thing to say, before the config's models are built
        cfg = load_config(config)
        budget = _budget(flops, gpu_hours, gpu, gpus or cfg.cluster.workers, mfu, cfg)
        r = decide(fit_dir, cfg, budget, gpus=gpus)
        plan = make_plan(r.config, gpu, gpus, mfu) if gpu else None
    except (ScalingError, ConfigError) as e:
        raise fail(str(e)) from None
    path = out or fit_dir / f"{r.config.run.name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, redact_yaml(dump_config(r.config)))
    doc = {**to_json(r), "config": str(path), "plan": plan.as_dict() if plan else None}
    for w in r.warnings:
        typer.echo(f"warning: {w}", err=True)
    if as_json:
        typer.echo(json.dumps(doc, indent=2))
        return
    _print(r, plan, path)


def _print(r, plan, path: Path) -> None:
    from pretrain.plan import render

    s, ci = r.shape, r.ci95
    lines = [
        f"budget {r.flops:.3g} FLOPs",
        f"N_opt {r.n_opt:.4g} {_ci(ci['n_opt'], '.3g')}   D_opt {r.d_opt:.4g} tokens {_ci(ci['d_opt'], '.3g')}   "
        f"{r.d_opt / r.n_opt:.3g} tokens per parameter",
        f"loss on the frontier {r.loss:.4f} {_ci(ci['loss'], '.4f')}",
        f"shape: d_model {s['d_model']}, n_layers {s['n_layers']}, n_heads {s['n_heads']}"
        + (f", n_kv_heads {s['n_kv_heads']}" if s.get("n_kv_heads") else "") + (f", d_ff {s['d_ff']}" if s.get("d_ff") else "")
        + f": {s['params']:,} {s['count_kind']} parameters",
        f"  rule: {s['rule']}",
        f"run length: train.tokens {r.tokens:.4g}; loss there {r.loss_at_shape['loss']:.4f} "
        f"{_ci(r.loss_at_shape['ci95'], '.4f')}",
        f"lr {r.lr:.4g} {_ci(r.hyper['lr_ci95'], '.3g')}, batch {r.global_batch_size} sequences "
        f"(law: {r.batch_tokens:.4g} tokens {_ci(r.hyper['batch_ci95'], '.3g')}), from {r.hyper['source']}",
    ]
    typer.echo("\n".join(lines))
    if plan:
        typer.echo(render(plan, r.config.train.activation_checkpointing))
    else:
        typer.echo("(--gpu NAME adds pretrain plan's memory and time)")
    typer.echo(f"wrote {path}")


@app.command()
def check(
    fit_dir: Path = typer.Argument(..., help="the fit directory (fit.json)"),
    run_dir: Path = typer.Argument(..., help="a finished run's directory (summary.json)"),
    as_json: bool = typer.Option(False, "--json", help="print the record as one JSON object"),
) -> None:
    """Compare a finished run's final loss with the law's prediction at its N and D; append it to
    FIT_DIR/checks.jsonl and draw it on FIT_DIR/frontier.png."""
    from pretrain.scaling.check import check_run

    try:
        rec = check_run(fit_dir, run_dir)
    except ScalingError as e:
        raise fail(str(e)) from None
    for k, v in rec["differs"].items():
        typer.echo(f"warning: the run's {k} ({v['run']}) is not the fit's ({v['fit']})", err=True)
    from pretrain.scaling.plots import read_checks
    from pretrain.scaling.report import log_to_fit_run

    logged = log_to_fit_run(fit_dir, [fit_dir / "frontier.png"], {"checks": read_checks(fit_dir)},
                            {"checks/last/where": rec["where"], "checks/last/loss": rec["loss"],
                             "checks/last/predicted": rec["predicted"]})
    if logged is not None:
        typer.echo(f"W&B summary run: {logged}", err=True)
    if as_json:
        typer.echo(json.dumps(rec, indent=2))
        return
    pos = "" if rec["position"] is None else f", at {rec['position']:.2f} of it"
    typer.echo(f"{rec['run']}: N {rec['n']:.4g}, D {rec['tokens']:.4g}: {rec['metric']} {rec['loss']:.4f}, predicted "
               f"{rec['predicted']:.4f} {_ci(rec['ci95'], '.4f')}: {rec['where']} the interval{pos} "
               f"(log residual {rec['log_residual']:+.4f}; the fit's rms {rec['fit_rms_log_residual'] or 0:.4f})")
    typer.echo(f"appended to {fit_dir / 'checks.jsonl'}; drawn on {fit_dir / 'frontier.png'}")
