"""A fit read back from its fit.json: the law, its bootstrap laws and the points, as the `ScalingFit` that
`pretrain scaling fit` wrote it from, so that `recommend` and `check` predict at any compute, N and D with
intervals from the same bootstrap laws, and `check` redraws the frontier plot.

fit.json keeps the bootstrap laws under approach3.bootstrap_laws. A fit.json written before it did is
re-bootstrapped from its runs (same law, same resamples count, seed 0): the intervals are then equivalent,
not identical, to those the fit printed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from pretrain.scaling import ScalingError
from pretrain.scaling.approach2 import Approach2, IsoFLOP, group_budgets
from pretrain.scaling.approach3 import Approach3, Law, bootstrap_approach3
from pretrain.scaling.fit import ScalingFit, interval


def read_fit(fit_dir: Path) -> dict:
    """FIT_DIR/fit.json's document, or a ScalingError in one line."""
    path = Path(fit_dir) / "fit.json"
    if not path.is_file():
        raise ScalingError(f"{fit_dir}: no fit.json there (write one with `pretrain scaling fit ... --out {fit_dir}`)")
    try:
        doc = json.loads(path.read_text())
        Law(*(float(doc["approach3"][k]) for k in ("E", "A", "B", "alpha", "beta")))
        float(doc["flops_per_param_token"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ScalingError(f"{path}: not a scaling fit ({type(e).__name__}: {e})") from None
    return doc


def fit_from_json(doc: dict) -> ScalingFit:
    """The ScalingFit fit.json was written from (approach 2's parabolas without their coefficients)."""
    a3 = doc["approach3"]
    law = Law(*(float(a3[k]) for k in ("E", "A", "B", "alpha", "beta")))
    runs = doc.get("runs") or []
    col = {k: np.array([float(r.get(k) or r.get("params", 0)) if k == "n" else float(r[k]) for r in runs])
           for k in ("n", "tokens", "flops", "loss")}
    declared = np.array([r["budget"] for r in runs]) if runs and all("budget" in r for r in runs) else None
    labels, budgets = group_budgets(col["flops"], declared) if runs else (np.zeros(0, int), np.zeros(0))
    samples = np.array(a3.get("bootstrap_laws") or []).reshape(-1, 5)
    if not len(samples) and a3.get("bootstrap") and len(runs):
        samples = bootstrap_approach3(col["n"], col["tokens"], col["loss"], law, resamples=int(a3["bootstrap"]),
                                      rng=np.random.default_rng(0))
    a2 = doc.get("approach2") or {}
    approach2 = None
    if "skipped" not in a2 and a2:
        curves = [IsoFLOP(b["flops"], b["runs"], b["sizes"], None, b["n_opt"], b["loss_min"], b["inside"])
                  for b in a2["budgets"]]
        approach2 = Approach2(curves, a2["a"], math.log(a2["n_opt"]["coefficient"]), a2["b"],
                              math.log(a2["d_opt"]["coefficient"]), np.zeros((0, 4)))
    fit3 = Approach3(law, float(a3.get("huber_objective", math.nan)), int(a3.get("starts", 0)),
                     int(a3.get("starts_converged", 0)), int(a3.get("starts_at_best", 0)))
    return ScalingFit(col["n"], col["tokens"], col["flops"], col["loss"], labels, budgets,
                      float(doc["flops_per_param_token"]), float(doc["target"]["flops"]), fit3, samples,
                      approach2, a2.get("skipped"), doc["source"].get("params", "total"),
                      doc["source"].get("unit", "tokens"))


def predict_point(fit: ScalingFit, n: float, d: float) -> dict:
    """The law's loss at (N, D) and its 95% interval over the bootstrap laws."""
    with np.errstate(all="ignore"):
        losses = np.array([s.loss(n, d) for s in fit.sample_laws()])
    return {"loss": float(fit.approach3.law.loss(n, d)), "ci95": interval(losses)}


def budget_range(doc: dict) -> tuple[float, float]:
    """The smallest and largest compute of the fit's points (a run's declared budget, else its FLOPs)."""
    runs = doc.get("runs") or []
    if not runs:
        return math.nan, math.nan
    c = [float(r.get("budget") or r["flops"]) for r in runs]
    return min(c), max(c)
