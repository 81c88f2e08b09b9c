"""Chinchilla scaling-law fits over one set of points: both approaches, their bootstrap intervals, and the
compute-optimal frontier they imply at a target compute (`fit_scaling`, `ScalingFit`, fit.json's document).

Approach 3, the parametric law and its Huber fit, is in pretrain.scaling.approach3; approach 2, the isoFLOP
parabolas and the power laws through their minima, in pretrain.scaling.approach2.

Compute is C = k N D, k the runs' own FLOPs per parameter and token (6 in the usual approximation, Kaplan et
al. 2020; more or less where attention is counted or embeddings are not). For a mixture of experts N is best
the active parameters (pretrain.scaling.table): FLOPs follow them, so k stays near 6 and the frontier's N_opt
is the active size (the total is N_opt times the model's total-to-active ratio).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from pretrain.scaling import ScalingError
from pretrain.scaling.approach2 import MIN_BUDGETS, MIN_SIZES, Approach2, fit_approach2, group_budgets
from pretrain.scaling.approach3 import DELTA, Approach3, Law, bootstrap_approach3, fit_approach3

MIN_POINTS = 8  # approach 3 has five parameters; with fewer points than this they are barely determined
# Exponent a of N_opt ~ C^a as published, drawn beside ours for reference.
PUBLISHED_A = {
    "Hoffmann et al. 2022, approach 1": 0.50,
    "Hoffmann et al. 2022, approach 3": 0.46,
    "Besiroglu et al. 2024, approach 3 refit": 0.513,
}
LAW_NAMES = ("E", "A", "B", "alpha", "beta")


def interval(x: np.ndarray) -> list[float] | None:
    """The 95% percentile interval of bootstrap values (None without any)."""
    x = np.asarray(x, dtype=float)
    x = x[np.isfinite(x)]
    return [float(np.percentile(x, 2.5)), float(np.percentile(x, 97.5))] if len(x) else None


@dataclass
class ScalingFit:
    """Both approaches' fits over one set of points, and what they predict at a target compute."""

    n: np.ndarray  # the points: parameters, tokens, FLOPs, loss
    d: np.ndarray
    c: np.ndarray
    loss: np.ndarray
    labels: np.ndarray  # each point's FLOP budget, an index into `budgets`
    budgets: np.ndarray
    k: float  # FLOPs per parameter-token: C = k N D
    target_flops: float
    approach3: Approach3
    approach3_samples: np.ndarray  # (resamples, 5) of (E, A, B, alpha, beta)
    approach2: Approach2 | None
    approach2_skipped: str | None
    params: str = "total"  # which count N is (table.PARAMS): the plots' axis names
    unit: str = "tokens"  # what D counts (images for a diffusion model): the plots' axis names

    def sample_laws(self) -> list[Law]:
        return [Law(*row) for row in self.approach3_samples]

    def predict3(self, flops: float) -> dict:
        """N_opt, D_opt, tokens per parameter and loss at `flops` by the law, with intervals."""
        law = self.approach3.law
        n, d = law.optimum(flops, self.k)
        laws = self.sample_laws()
        ns = np.array([s.optimum(flops, self.k)[0] for s in laws])
        ds = np.array([s.optimum(flops, self.k)[1] for s in laws])
        ls = np.array([s.frontier_loss(flops, self.k) for s in laws])
        out = {"n_opt": float(n), "d_opt": float(d), "tokens_per_param": float(d / n),
               "loss": float(law.loss(n, d))}
        out["ci95"] = {"n_opt": interval(ns), "d_opt": interval(ds), "tokens_per_param": interval(ds / ns),
                       "loss": interval(ls)}
        return out

    def predict2(self, flops: float) -> dict | None:
        a2 = self.approach2
        if a2 is None:
            return None
        n, d = float(a2.n_opt(flops)), float(a2.d_opt(flops))
        s = a2.samples
        ns, ds = np.exp(s[:, 1]) * flops ** s[:, 0], np.exp(s[:, 3]) * flops ** s[:, 2]
        return {"n_opt": n, "d_opt": d, "tokens_per_param": d / n,
                "ci95": {"n_opt": interval(ns), "d_opt": interval(ds), "tokens_per_param": interval(ds / ns)}}

    def to_json(self) -> dict:
        """What `fit.json` holds (see pretrain/cli/scaling.py)."""
        a3, law = self.approach3, self.approach3.law
        s = self.approach3_samples
        ab = s[:, 4] / (s[:, 3] + s[:, 4]) if len(s) else np.array([])
        ci = {name: interval(s[:, i]) for i, name in enumerate(LAW_NAMES)}
        ci.update(a=interval(ab), b=interval(1 - ab))
        g = law.optimum(self.k, self.k)[0]  # N_opt at C = k: the frontier's coefficient G
        approach3 = {
            **law.to_dict(), "ci95": ci, "huber_objective": a3.objective, "huber_delta": DELTA,
            "starts": a3.starts, "starts_converged": a3.converged, "starts_at_best": a3.at_best,
            "bootstrap": len(s),
            # N_opt = coefficient * C^exponent (and likewise D_opt), C in FLOPs
            "n_opt": {"coefficient": float(g / self.k ** law.a), "exponent": law.a},
            "d_opt": {"coefficient": float(1 / (g * self.k ** law.b)), "exponent": law.b},
            # the bootstrap laws, rows of (E, A, B, alpha, beta): intervals at any C, N or D (scaling/saved.py)
            "bootstrap_laws": s.tolist(),
        }
        out = {"flops_per_param_token": self.k, "approach3": approach3}
        if self.approach2 is None:
            out["approach2"] = {"skipped": self.approach2_skipped}
        else:
            a2 = self.approach2
            out["approach2"] = {
                "budgets": [{"flops": m.flops, "runs": m.runs, "sizes": m.sizes, "n_opt": m.n_opt,
                             "d_opt": None if m.n_opt is None else m.flops / (self.k * m.n_opt),
                             "loss_min": m.loss_opt, "inside": m.inside, "used": m.used} for m in a2.budgets],
                "a": a2.a, "b": a2.b,
                "n_opt": {"coefficient": math.exp(a2.c), "exponent": a2.a},
                "d_opt": {"coefficient": math.exp(a2.d), "exponent": a2.b},
                "bootstrap": len(a2.samples),
                "ci95": ({"a": interval(a2.samples[:, 0]), "b": interval(a2.samples[:, 2])}
                         if len(a2.samples) else None),
            }
        out["target"] = {"flops": self.target_flops, "approach3": self.predict3(self.target_flops),
                         "approach2": self.predict2(self.target_flops)}
        out["published_a"] = PUBLISHED_A
        return out


def fit_scaling(n: np.ndarray, d: np.ndarray, c: np.ndarray, loss: np.ndarray, *,
                budget: np.ndarray | None = None, target_flops: float | None = None, resamples: int = 300,
                starts: int | None = None, seed: int = 0, params: str = "total", unit: str = "tokens",
                progress: Callable[[str, int, int], None] | None = None) -> ScalingFit:
    """Approach 3 (with `resamples` bootstrap refits) and approach 2 over the points (N, D, C, L)."""
    if len(n) < MIN_POINTS:
        raise ScalingError(f"too few runs for a fit: {len(n)} given, approach 3 needs at least {MIN_POINTS} "
                           f"(approach 2 also needs {MIN_SIZES} sizes at each of {MIN_BUDGETS}+ budgets)")
    rng = np.random.default_rng(seed)
    k = float(np.median(c / (n * d)))

    def stage(name: str) -> Callable[[int, int], None] | None:
        return (lambda done, total: progress(name, done, total)) if progress else None

    a3 = fit_approach3(n, d, loss, starts=starts, progress=stage("approach 3: grid of starts"))
    samples = bootstrap_approach3(n, d, loss, a3.law, resamples=resamples, rng=rng,
                                  progress=stage("approach 3: bootstrap"))
    labels, budgets = group_budgets(c, budget)
    a2 = fit_approach2(n, c, loss, labels, budgets, k, resamples=resamples, rng=rng)
    target = float(target_flops) if target_flops else 10.0 * float(c.max())
    return ScalingFit(n, d, c, loss, labels, budgets, k, target, a3, samples,
                      a2 if isinstance(a2, Approach2) else None, a2 if isinstance(a2, str) else None, params, unit)
