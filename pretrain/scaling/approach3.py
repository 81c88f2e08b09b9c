"""Chinchilla's approach 3: the parametric law L(N, D) = E + A/N^alpha + B/D^beta, its Huber fit from a grid
of starts, and bootstrap refits for its intervals.

Hoffmann et al. 2022 (https://arxiv.org/abs/2203.15556, section 3.3 and appendix D.2), as replicated by
Besiroglu et al. 2024 (https://arxiv.org/abs/2404.10102): the law is written log L = LSE(a - alpha log N,
b - beta log D, e) with A = e^a, B = e^b, E = e^e, and fitted by minimising the sum of Huber losses (delta
1e-3) of log L_pred - log L with L-BFGS-B from every point of Hoffmann's grid of 4,500 starts; the lowest
end point wins. The replication found the original fit had stopped early (an objective scaled so small that
the optimiser's relative tolerance ended it) and its intervals implausibly narrow (they would need some
600,000 runs). Here the objective is the plain sum, the tolerances are tight and effectively absolute, and
the intervals are bootstrap percentiles: the rows are resampled with replacement and refitted, each refit
from the point estimate (the replication's refits, too, start from one fixed point). On a Chinchilla-shaped
table of 252 points with 2% scatter they come out about as wide as the replication's (standard errors of
alpha and beta 0.02), not Hoffmann et al.'s.
"""

from __future__ import annotations

import itertools
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize
from threadpoolctl import threadpool_limits

from pretrain.scaling import ScalingError

DELTA = 1e-3  # Huber's delta on log residuals (Hoffmann et al. 2022, appendix D.2)
# Hoffmann et al. 2022, appendix D.2: a, b in {0, 5, ..., 25}, e in {-1, -.5, ..., 1}, alpha, beta in
# {0, .5, ..., 2}; columns (a, b, e, alpha, beta).
HOFFMANN_GRID = np.array(list(itertools.product(
    np.arange(0.0, 26.0, 5.0), np.arange(0.0, 26.0, 5.0), np.arange(-1.0, 1.01, 0.5),
    np.arange(0.0, 2.01, 0.5), np.arange(0.0, 2.01, 0.5))))
# ftol is relative to max(|f|, 1), and f (a sum of Huber terms of ~1e-2 residuals) is ~1e-2: only a tiny
# ftol lets the gradient test end the fit, which is the replication's fix for the original's early stop.
_LBFGSB = {"ftol": 1e-15, "gtol": 1e-10, "maxiter": 5000}


@dataclass(frozen=True)
class Law:
    """L(N, D) = E + A / N^alpha + B / D^beta."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float

    @property
    def a(self) -> float:
        """Exponent of N_opt in C."""
        return self.beta / (self.alpha + self.beta)

    @property
    def b(self) -> float:
        """Exponent of D_opt in C."""
        return self.alpha / (self.alpha + self.beta)

    @classmethod
    def from_theta(cls, t: np.ndarray) -> Law:
        """From the fitted coordinates (a, b, e, alpha, beta) = (log A, log B, log E, alpha, beta); a diverged
        coordinate gives inf rather than an error."""
        with np.errstate(over="ignore"):
            e = np.exp(np.asarray(t[:3], dtype=float))
        return cls(E=float(e[2]), A=float(e[0]), B=float(e[1]), alpha=float(t[3]), beta=float(t[4]))

    @property
    def theta(self) -> np.ndarray:
        # A coefficient that underflowed to 0 in from_theta (a fit driving E to 0) maps back to the floor of
        # a double's logarithm, a finite start, instead of a domain error.
        def log(x: float) -> float:
            return math.log(max(x, sys.float_info.min))

        return np.array([log(self.A), log(self.B), log(self.E), self.alpha, self.beta])

    def loss(self, n: np.ndarray | float, d: np.ndarray | float) -> np.ndarray:
        return self.E + self.A / np.power(n, self.alpha) + self.B / np.power(d, self.beta)

    def optimum(self, c: np.ndarray | float, k: float = 6.0) -> tuple[np.ndarray, np.ndarray]:
        """(N_opt, D_opt) minimising L under k N D = C:
        N_opt = G (C/k)^a, D_opt = (C/k)^b / G, G = (alpha A / (beta B))^(1/(alpha+beta))."""
        c = np.asarray(c, dtype=float)
        if self.alpha <= 0 or self.beta <= 0:  # no interior optimum: the frontier is undefined
            return np.full_like(c, np.nan), np.full_like(c, np.nan)
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / (self.alpha + self.beta))
        n = g * (c / k) ** self.a
        return n, c / k / n

    def frontier_loss(self, c: np.ndarray | float, k: float = 6.0) -> np.ndarray:
        return self.loss(*self.optimum(c, k))

    def to_dict(self) -> dict[str, float]:
        return {"E": self.E, "A": self.A, "B": self.B, "alpha": self.alpha, "beta": self.beta, "a": self.a,
                "b": self.b}


class HuberObjective:
    """sum_i w_i huber(LSE(a - alpha log N_i, b - beta log D_i, e) - log L_i) and its gradient.

    It works in centred coordinates (log N, log D less their means; a and b shifted to match): the same
    minima, and the optimiser no longer walks the long valley that a - alpha log N makes when log N ~ 20.
    """

    def __init__(self, n: np.ndarray, d: np.ndarray, loss: np.ndarray, delta: float = DELTA):
        ln, ld = np.log(n), np.log(d)
        self.mn, self.md = float(ln.mean()), float(ld.mean())
        self.cn, self.cd, self.ll, self.delta = ln - self.mn, ld - self.md, np.log(loss), delta

    def centre(self, t: np.ndarray) -> np.ndarray:
        return np.array([t[0] - t[3] * self.mn, t[1] - t[4] * self.md, t[2], t[3], t[4]])

    def uncentre(self, x: np.ndarray) -> np.ndarray:
        return np.array([x[0] + x[3] * self.mn, x[1] + x[4] * self.md, x[2], x[3], x[4]])

    def __call__(self, x: np.ndarray, w: np.ndarray | None = None) -> tuple[float, np.ndarray]:
        u, v = x[0] - x[3] * self.cn, x[1] - x[4] * self.cd
        m = np.maximum(np.maximum(u, v), x[2])  # log-sum-exp, shifted by the largest term
        eu, ev, ew = np.exp(u - m), np.exp(v - m), np.exp(x[2] - m)
        s = eu + ev + ew
        r = m + np.log(s) - self.ll
        g = np.clip(r, -self.delta, self.delta)  # huber'(r)
        h = g * (r - 0.5 * g)  # r^2/2 inside delta, delta (|r| - delta/2) outside
        if w is not None:
            h, g = h * w, g * w
        g = g / s
        gu, gv = g * eu, g * ev
        return float(h.sum()), np.array([gu.sum(), gv.sum(), (g * ew).sum(), -gu @ self.cn, -gv @ self.cd])

    def values(self, ts: np.ndarray) -> np.ndarray:
        """The objective at many points (rows of original coordinates) at once: to rank starts."""
        out = []
        for chunk in np.array_split(ts, max(1, len(ts) * len(self.ll) // 2_000_000)):  # ~16 MB at a time
            a, b, e, al, be = (chunk[:, i, None] for i in range(5))
            u, v = a - al * (self.cn + self.mn), b - be * (self.cd + self.md)
            m = np.maximum(np.maximum(u, v), e)
            r = m + np.log(np.exp(u - m) + np.exp(v - m) + np.exp(e - m)) - self.ll
            g = np.clip(r, -self.delta, self.delta)
            out.append((g * (r - 0.5 * g)).sum(axis=1))
        return np.concatenate(out)

    def minimise(self, t0: np.ndarray, w: np.ndarray | None = None) -> tuple[np.ndarray, float, bool]:
        """L-BFGS-B from t0 (original coordinates): (end point, objective there, converged)."""
        r = minimize(self, self.centre(t0), args=(w,), jac=True, method="L-BFGS-B", options=_LBFGSB)
        return self.uncentre(r.x), float(r.fun), bool(r.success)


@dataclass(frozen=True)
class Approach3:
    law: Law
    objective: float  # the Huber sum at the fit
    starts: int  # grid points L-BFGS-B ran from
    converged: int  # of those, runs that met the tolerances
    at_best: int  # runs that ended within 1e-6 (relative) of the best objective


def _one_blas_thread():
    """L-BFGS-B's vectors have five entries; OpenBLAS threads waking for each of its BLAS calls made the
    fits some 50 times slower on a busy two-core machine."""
    return threadpool_limits(limits=1, user_api="blas")


def fit_approach3(n: np.ndarray, d: np.ndarray, loss: np.ndarray, *, starts: int | None = None,
                  grid: np.ndarray = HOFFMANN_GRID, delta: float = DELTA,
                  progress: Callable[[int, int], None] | None = None) -> Approach3:
    """The law from L-BFGS-B at every grid point (or at the `starts` grid points of lowest objective)."""
    with _one_blas_thread():
        return _fit_approach3(HuberObjective(n, d, loss, delta), starts, grid, progress)


def _fit_approach3(obj: HuberObjective, starts: int | None, grid: np.ndarray,
                   progress: Callable[[int, int], None] | None) -> Approach3:
    if starts is not None and starts < len(grid):
        with np.errstate(over="ignore", invalid="ignore"):
            ranked = np.argsort(np.nan_to_num(obj.values(grid), nan=np.inf), kind="stable")
        grid = grid[ranked[:starts]]
    ends, funs, ok = [], [], 0
    for i, t0 in enumerate(grid):
        t, f, converged = obj.minimise(t0)
        if np.isfinite(f) and np.all(np.isfinite(t)):
            ends.append(t)
            funs.append(f)
            ok += converged
        if progress:
            progress(i + 1, len(grid))
    if not funs:
        raise ScalingError("approach 3: no start of the grid gave a finite fit")
    funs_a = np.array(funs)
    best = int(funs_a.argmin())
    at_best = int((funs_a <= funs_a[best] * (1 + 1e-6) + 1e-15).sum())
    return Approach3(Law.from_theta(ends[best]), float(funs_a[best]), len(grid), ok, at_best)


def bootstrap_approach3(n: np.ndarray, d: np.ndarray, loss: np.ndarray, law: Law, *, resamples: int,
                        rng: np.random.Generator, delta: float = DELTA,
                        progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """Laws refitted on rows resampled with replacement, each from the point estimate: (resamples, 5) of
    (E, A, B, alpha, beta). A resample is a weight vector (how often each row was drawn)."""
    obj, m, out = HuberObjective(n, d, loss, delta), len(n), []
    with _one_blas_thread():
        for i in range(resamples):
            w = np.bincount(rng.integers(0, m, m), minlength=m).astype(float)
            t, f, _ = obj.minimise(law.theta, w)
            fit = Law.from_theta(t)
            row = [fit.E, fit.A, fit.B, fit.alpha, fit.beta]
            if np.isfinite(f) and np.all(np.isfinite(row)):
                out.append(row)
            if progress:
                progress(i + 1, resamples)
    return np.array(out).reshape(-1, 5)
