"""What a fit leaves behind: fit.json and the plots from a set of points (`fit_and_write`, the one path that
`pretrain scaling fit` and `pretrain scaling ladder` both take), a ladder's fit over its finished runs, and
the ladder's W&B summary run. fit.json's keys are described in pretrain/cli/scaling.py.
"""

from __future__ import annotations

import json
from pathlib import Path

from pretrain.metrics.sinks import wandb_mode
from pretrain.scaling.books import finished
from pretrain.scaling.ladder import Ladder, LadderError


def fit_and_write(points, kind: str, paths: list[str], out: Path, *, target_flops: float | None = None,
                  bootstrap: int = 300, starts: int | None = None, seed: int = 0, plots: bool = True) -> dict:
    """Fit `points` (a table.Points) with a progress bar; write out/fit.json and the plots; return fit.json's
    document. The one path from points to fit.json: `scaling fit` and `scaling ladder` both take it. N is the
    count the points hold (`points.params_kind`, source.params in fit.json)."""
    from rich.progress import Progress

    from pretrain.atomic import atomic_write
    from pretrain.scaling.fit import fit_scaling
    from pretrain.scaling.plots import write_plots

    with Progress(transient=True) as bar:
        tasks: dict[str, int] = {}

        def progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done)

        result = fit_scaling(points.params, points.tokens, points.flops, points.loss,
                             budget=points.budget, target_flops=target_flops, resamples=bootstrap,
                             starts=starts, seed=seed, params=points.params_kind, unit=points.unit,
                             progress=progress)
    out.mkdir(parents=True, exist_ok=True)
    doc = {
        "source": {"kind": kind, "paths": paths, "points": len(points),
                   "metric": points.metric, "params": points.params_kind, "unit": points.unit,
                   **points.identity},
        **result.to_json(),
        "runs": points.rows(),
    }
    if plots:
        write_plots(result, out)
    atomic_write(out / "fit.json", json.dumps(doc, indent=2) + "\n")
    return doc


def fit_ladder(ladder: Ladder, *, bootstrap: int = 300, seed: int = 0, starts: int | None = None,
               plots: bool = True) -> dict:
    """`pretrain scaling fit` over the ladder's finished runs into <out>/fit/; returns fit.json's document. N is
    the active parameters for a mixture-of-experts ladder, the total for a dense one (table.AUTO)."""
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
    run = wandb.init(project=project, name=name, job_type="scaling-ladder", dir=str(fit_dir), mode=wandb_mode(),
                     config=ladder.plan_json(), settings=wandb.Settings(console="off", silent=True))
    columns = ["name", "budget", "params", "params_active", "tokens", "flops", "loss"]
    by_path = {str(ladder.rdir(r)): r for r in ladder.rungs}
    rows = [[Path(p["name"]).name, by_path[p["name"]].budget if p["name"] in by_path else p.get("budget"),
             p["params"], p.get("params_active", p["params"]), p["tokens"], p["flops"], p["loss"]]
            for p in doc["runs"]]
    images = {p.stem: wandb.Image(str(p)) for p in sorted(fit_dir.glob("*.png"))}
    run.log({"runs": wandb.Table(columns=columns, data=rows), **images})
    a3, target = doc["approach3"], doc["target"]
    summary = {f"approach3/{k}": a3[k] for k in ("E", "A", "B", "alpha", "beta", "a", "b")}
    summary["params"] = doc["source"]["params"]  # which count N is: active for a mixture of experts
    summary.update({f"approach3/{k}_ci95": a3["ci95"][k] for k in ("a", "b") if a3["ci95"].get(k)})
    if "skipped" not in doc["approach2"]:
        summary.update({"approach2/a": doc["approach2"]["a"], "approach2/b": doc["approach2"]["b"]})
    summary.update({"target/flops": target["flops"],
                    **{f"target/{k}": v for k, v in (target.get("approach3") or {}).items() if not isinstance(v, dict)}})
    run.summary.update(summary)
    path = Path(run.dir).parent
    from pretrain.atomic import atomic_write

    atomic_write(fit_dir / WANDB_RUN, json.dumps({"id": run.id, "project": project, "name": name}) + "\n")
    run.finish()
    return path


WANDB_RUN = "wandb.json"  # in a fit directory: the ladder's W&B summary run, which later checks and sweeps extend


def log_to_fit_run(fit_dir: Path, images: list[Path] = (), tables: dict[str, list[dict]] | None = None,
                   summary: dict | None = None) -> Path | None:
    """Add to the W&B summary run of the ladder whose fit directory this is (resumed by its id, offline unless
    an API key is set): `images` by their stems, `tables` (rows of dicts, by name), `summary` keys. None, and
    nothing logged, when the fit has no such run (`pretrain scaling fit` logs none)."""
    try:
        known = json.loads((Path(fit_dir) / WANDB_RUN).read_text())
    except (OSError, ValueError):
        return None
    import wandb

    run = wandb.init(project=known["project"], name=known["name"], id=known["id"], resume="allow",
                     job_type="scaling-ladder", dir=str(fit_dir), mode=wandb_mode(),
                     settings=wandb.Settings(console="off", silent=True))
    data = {p.stem: wandb.Image(str(p)) for p in images if Path(p).is_file()}
    for key, rows in (tables or {}).items():
        columns = list(dict.fromkeys(k for r in rows for k in r))
        data[key] = wandb.Table(columns=columns, data=[[_cell(r.get(c)) for c in columns] for r in rows])
    run.log(data)
    run.summary.update(summary or {})
    path = Path(run.dir).parent
    run.finish()
    return path


def _cell(v):
    """A table cell W&B takes: numbers and strings as they are, anything else (lists, dicts) as JSON text."""
    return v if v is None or isinstance(v, (int, float, str, bool)) else json.dumps(v)
