"""A prediction checked: a finished run's final loss against the fit's law at that run's N and D.

The interval is the 95% interval of the law's loss at (N, D) over the fit's bootstrap laws: the uncertainty
of the law, not the scatter of single runs about it (the fit's rms residual, reported beside: a run outside
the interval but within that scatter is noise more than a miss of the law). Each check is appended to FIT_DIR/checks.jsonl, which the frontier plot
draws (pretrain.scaling.plots), and the frontier plot is redrawn.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np

from pretrain.scaling import ScalingError
from pretrain.scaling.saved import fit_from_json, predict_point, read_fit
from pretrain.scaling.table import IDENTITY, METRICS, PARAMS, summary_unit


def _summary(run_dir: Path) -> dict:
    path = Path(run_dir) / "summary.json"
    if not path.is_file():
        raise ScalingError(f"{run_dir}: no summary.json (not a finished run)")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ScalingError(f"{path}: cannot read it ({e})") from None


def where(loss: float, ci: list[float] | None) -> tuple[str, float | None]:
    """(below, inside or above the interval; the loss's position in it, 0 at the low end, 1 at the high)."""
    if not ci:
        return "no interval", None
    lo, hi = ci
    position = (loss - lo) / (hi - lo) if hi > lo else math.nan
    return ("below" if loss < lo else "above" if loss > hi else "inside"), float(position)


def check_run(fit_dir: Path, run_dir: Path) -> dict:
    """Compare the run with the fit, append the record to checks.jsonl, redraw frontier.png; return the record."""
    from pretrain.atomic import atomic_write
    from pretrain.scaling.plots import plot_frontier, read_checks

    doc = read_fit(fit_dir)
    s = _summary(run_dir)
    metric, kind = doc["source"].get("metric", "final_val_loss"), doc["source"].get("params", "total")
    key = PARAMS.get(kind, "params")
    n = s.get(key) if key != "params_active" else s.get("params_active", s.get("params"))  # dense: all active
    if metric in METRICS:  # a fit of a table names its column (loss, bpb): the summary keys that hold it
        metric = next((k for k in METRICS[metric] if s.get(k) is not None), METRICS[metric][0])
    loss, unit = s.get(metric), doc["source"].get("unit", "tokens")
    if summary_unit(s) != unit:
        raise ScalingError(f"{run_dir}: the run counts its data in {summary_unit(s)}, the fit in {unit}: "
                           "a check compares a run with a fit of its own kind")
    if loss is None or n is None or s.get(unit) is None:
        lacking = metric if loss is None else key if n is None else unit
        raise ScalingError(f"{run_dir}: summary.json lacks {lacking}, which the fit's points used")
    loss, n, d = float(loss), float(n), float(s[unit])
    if not (math.isfinite(loss) and loss > 0):
        raise ScalingError(f"{run_dir}: {metric} is {loss} (a diverged run has nothing to check)")
    fit = fit_from_json(doc)
    pred = predict_point(fit, n, d)
    side, position = where(loss, pred["ci95"])
    residual = math.log(loss / pred["loss"])
    fitted = np.log(fit.loss) - np.log(fit.approach3.law.loss(fit.n, fit.d)) if len(fit.n) else np.zeros(0)
    differs = {k: (s.get(k), doc["source"].get(k)) for k in IDENTITY
               if s.get(k) and doc["source"].get(k) and str(s.get(k)) != str(doc["source"].get(k))}
    record = {"run": str(Path(run_dir).resolve()), "metric": metric, "params": kind, "n": n, "tokens": d, "unit": unit,
              "flops": float(s.get("flops") or fit.k * n * d), "loss": loss, "predicted": pred["loss"],
              "ci95": pred["ci95"], "where": side, "position": position, "log_residual": residual,
              "fit_rms_log_residual": float(np.sqrt(np.mean(fitted ** 2))) if len(fitted) else None,
              "differs": {k: {"run": a, "fit": b} for k, (a, b) in differs.items()}, "time": time.time()}
    path = Path(fit_dir) / "checks.jsonl"
    atomic_write(path, (path.read_text() if path.is_file() else "") + json.dumps(record) + "\n")
    plot_frontier(fit, Path(fit_dir) / "frontier.png", read_checks(Path(fit_dir)))
    return record
