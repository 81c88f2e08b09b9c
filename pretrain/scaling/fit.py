"""Chinchilla scaling-law fits: approach 3 (the parametric law), approach 2 (isoFLOP minima), their bootstrap
intervals, and the compute-optimal frontier they imply.

Approach 3 (Hoffmann et al. 2022, https://arxiv.org/abs/2203.15556, section 3.3 and appendix D.2, as
replicated by Besiroglu et al. 2024, https://arxiv.org/abs/2404.10102): L(N, D) = E + A/N^alpha + B/D^beta,
written log L = LSE(a - alpha log N, b - beta log D, e) with A = e^a, B = e^b, E = e^e, and fitted by
minimising the sum of Huber losses (delta 1e-3) of log L_pred - log L with L-BFGS-B from every point of
Hoffmann's grid of 4,500 starts; the lowest end point wins. The replication found the original fit had
stopped early (an objective scaled so small that the optimiser's relative tolerance ended it) and its
intervals implausibly narrow (they would need some 600,000 runs). Here the objective is the plain sum, the
tolerances are tight and effectively absolute, and the intervals are bootstrap percentiles: the rows are
resampled with replacement and refitted, each refit from the point estimate (the replication's refits, too,
start from one fixed point). On a Chinchilla-shaped table of 252 points with 2% scatter they come out about
as wide as the replication's (standard errors of alpha and beta 0.02), not Hoffmann et al.'s.

Approach 2: per FLOP budget, a parabola of loss in log N, whose vertex is N_opt(C); then
log N_opt = a log C + c and log D_opt = b log C + d by least squares, with D_opt = C / (k N_opt); intervals
by resampling runs within each budget.

Compute is C = k N D, k the runs' own FLOPs per parameter and token (6 in the usual approximation, Kaplan et
al. 2020; more or less where attention is counted or embeddings are not).
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
MIN_POINTS = 8  # approach 3 has five parameters; with fewer points than this they are barely determined
MIN_SIZES = 3  # a parabola per budget needs three model sizes
MIN_BUDGETS = 2  # a power law through the minima; its interval needs three
# Hoffmann et al. 2022, appendix D.2: a, b in {0, 5, ..., 25}, e in {-1, -.5, ..., 1}, alpha, beta in
# {0, .5, ..., 2}; columns (a, b, e, alpha, beta).
HOFFMANN_GRID = np.array(list(itertools.product(
    np.arange(0.0, 26.0, 5.0), np.arange(0.0, 26.0, 5.0), np.arange(-1.0, 1.01, 0.5),
    np.arange(0.0, 2.01, 0.5), np.arange(0.0, 2.01, 0.5))))
# ftol is relative to max(|f|, 1), and f (a sum of Huber terms of ~1e-2 residuals) is ~1e-2: only a tiny
# ftol lets the gradient test end the fit, which is the replication's fix for the original's early stop.
_LBFGSB = {"ftol": 1e-15, "gtol": 1e-10, "maxiter": 5000}
# Exponent a of N_opt ~ C^a as published, drawn beside ours for reference.
PUBLISHED_A = {
    "Hoffmann et al. 2022, approach 1": 0.50,
    "Hoffmann et al. 2022, approach 3": 0.46,
    "Besiroglu et al. 2024, approach 3 refit": 0.513,
}
LAW_NAMES = ("E", "A", "B", "alpha", "beta")


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


# ------------------------------------------------------------------------------------------ approach 2


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


# ------------------------------------------------------------------------------------------ both


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
                starts: int | None = None, seed: int = 0,
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
                      a2 if isinstance(a2, Approach2) else None, a2 if isinstance(a2, str) else None)
