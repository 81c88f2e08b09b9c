"""Chinchilla's approach 2: per FLOP budget, a parabola of loss in log N whose vertex is N_opt(C); then
log N_opt = a log C + c and log D_opt = b log C + d by least squares, with D_opt = C / (k N_opt); intervals
by resampling runs within each budget (Hoffmann et al. 2022, https://arxiv.org/abs/2203.15556, section 3.2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MIN_SIZES = 3  # a parabola per budget needs three model sizes
MIN_BUDGETS = 2  # a power law through the minima; its interval needs three


def group_budgets(c: np.ndarray, declared: np.ndarray | None = None,
                  tol: float = 1.25) -> tuple[np.ndarray, np.ndarray]:
    """(label per run, budget per label). Declared budgets (a ladder's `budget`) group exactly; without
    them, runs whose FLOPs sorted are within a factor `tol` of their neighbour share a budget (a ladder's
    runs miss their budget by the rounding of steps), at the geometric mean of their FLOPs."""
    if declared is not None:
        values, labels = np.unique(declared, return_inverse=True)
        return labels, values.astype(float)
    order = np.argsort(c)
    labels = np.empty(len(c), dtype=int)
    label = 0
    for j, i in enumerate(order):
        if j and c[i] > c[order[j - 1]] * tol:
            label += 1
        labels[i] = label
    values = np.array([math.exp(np.log(c[labels == g]).mean()) for g in range(label + 1)])
    return labels, values


@dataclass(frozen=True)
class IsoFLOP:
    """One budget's parabola L = p0 x^2 + p1 x + p2 in x = log N, and its vertex."""

    flops: float
    runs: int
    sizes: int
    coef: tuple[float, float, float] | None  # None: fewer than MIN_SIZES sizes
    n_opt: float | None  # None: no minimum (curvature <= 0)
    loss_opt: float | None
    inside: bool  # the vertex lies within the sizes sampled (else it is an extrapolation, not used)

    @property
    def used(self) -> bool:
        return self.n_opt is not None and self.inside


def isoflop(budget: float, n: np.ndarray, loss: np.ndarray) -> IsoFLOP:
    x = np.log(n)
    sizes = len(np.unique(n))
    if sizes < MIN_SIZES:
        return IsoFLOP(budget, len(n), sizes, None, None, None, False)
    p = np.polyfit(x, loss, 2)
    coef = (float(p[0]), float(p[1]), float(p[2]))
    if p[0] <= 0:
        return IsoFLOP(budget, len(n), sizes, coef, None, None, False)
    xo = -p[1] / (2 * p[0])
    with np.errstate(over="ignore"):  # a nearly flat parabola puts its vertex far away: inf, not an error
        n_opt = float(np.exp(xo))
    return IsoFLOP(budget, len(n), sizes, coef, n_opt, float(np.polyval(p, xo)), bool(x.min() <= xo <= x.max()))


@dataclass(frozen=True)
class Approach2:
    budgets: list[IsoFLOP]
    a: float  # N_opt = exp(c) C^a
    c: float
    b: float  # D_opt = exp(d) C^b
    d: float
    samples: np.ndarray  # bootstrap rows (a, c, b, d)

    def n_opt(self, flops: np.ndarray | float) -> np.ndarray:
        return np.exp(self.c) * np.power(flops, self.a)

    def d_opt(self, flops: np.ndarray | float) -> np.ndarray:
        return np.exp(self.d) * np.power(flops, self.b)


def _power_laws(minima: list[IsoFLOP], k: float) -> tuple[float, float, float, float]:
    lc = np.log([m.flops for m in minima])
    ln = np.log([m.n_opt for m in minima])
    a, c = np.polyfit(lc, ln, 1)
    b, d = np.polyfit(lc, lc - math.log(k) - ln, 1)  # D_opt = C / (k N_opt)
    return float(a), float(c), float(b), float(d)


def fit_approach2(n: np.ndarray, c: np.ndarray, loss: np.ndarray, labels: np.ndarray, budgets: np.ndarray,
                  k: float, *, resamples: int, rng: np.random.Generator) -> Approach2 | str:
    """Approach 2, or the reason it cannot be fitted."""
    groups = [np.flatnonzero(labels == g) for g in range(len(budgets))]
    curves = [isoflop(budgets[g], n[idx], loss[idx]) for g, idx in enumerate(groups)]
    used = [m for m in curves if m.used]
    if len(used) < MIN_BUDGETS:
        return (f"approach 2 needs a minimum inside the sizes sampled at {MIN_BUDGETS} or more FLOP budgets "
                f"({MIN_SIZES}+ sizes each); {len(used)} of {len(curves)} budgets have one")
    samples = []
    if len(used) > MIN_BUDGETS:  # with two budgets the line is exact: no interval to speak of
        for _ in range(resamples):
            mins = []
            for g, idx in enumerate(groups):
                pick = rng.choice(idx, size=len(idx), replace=True)
                m = isoflop(budgets[g], n[pick], loss[pick])
                if m.used:
                    mins.append(m)
            if len(mins) >= MIN_BUDGETS:
                samples.append(_power_laws(mins, k))
    return Approach2(curves, *_power_laws(used, k), samples=np.array(samples).reshape(-1, 4))
