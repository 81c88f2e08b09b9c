"""Hyperparameter laws: the compute-optimal learning rate and batch size as power laws of compute, from a sweep
of learning rate x batch size at a few small budgets (DeepSeek LLM 2024, https://arxiv.org/abs/2401.02954,
section 3.1: eta_opt = 0.3118 C^-0.125, B_opt = 0.2920 C^0.3271, B in tokens).

Per budget the optimum is the vertex of a quadratic in (log lr, log batch) fitted to that budget's runs by least
squares: the loss near its minimum is a bowl in the logarithms, tilted where lr and batch trade off (the cross
term), and the vertex falls between grid points where DeepSeek's "near-optimal band" (runs within 0.25% of the
best loss) needs a fine grid to be narrow. A vertex outside the swept range, or a surface with no minimum, is
an extrapolation: that budget is listed and not used (as approach 2 does with isoFLOP parabolas).

Then log eta_opt = log a + alpha log C (and log B_opt = log b + beta log C) by least squares over the budgets.
The 95% intervals come from two sources of error together. Resampling each budget's runs with replacement and
refitting moves each vertex by its grid's noise; but each budget has one optimum, so no resampling of runs
sees how far the optima themselves scatter about the line. That scatter enters as the line's own error: each
bootstrap line's coefficients are drawn from the t distribution (n_budgets - 2 degrees of freedom) about it,
with the least-squares covariance of that line. With two budgets the line is exact and only the grids' noise is
left, which understates the interval; three or more budgets are asked for.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy import stats

from pretrain.scaling import ScalingError
from pretrain.scaling.approach2 import group_budgets
from pretrain.scaling.fit import interval
from pretrain.scaling.table import positive

MIN_VALUES = 3  # distinct values an axis needs per budget for its parabola
QUANTITIES = ("lr", "batch")  # batch: tokens per optimizer step


@dataclass(frozen=True)
class Sweep:
    """One row per run of a sweep."""

    flops: np.ndarray  # C, training FLOPs
    lr: np.ndarray  # peak learning rate
    batch: np.ndarray  # tokens per optimizer step
    loss: np.ndarray
    budget: np.ndarray | None  # declared budgets (group exactly); None: group by FLOPs
    names: list[str]

    def __len__(self) -> int:
        return len(self.names)


def read_sweep_table(path: Path) -> Sweep:
    """A CSV with columns flops (or budget), lr, batch_tokens (tokens per step) and loss; optional budget, name.
    A diverged run (loss nan or inf) is dropped: it has no place on a bowl."""
    try:
        with open(path, newline="") as f:
            rows = [{(k or "").strip().lower(): (v or "").strip() for k, v in r.items()} for r in csv.DictReader(f)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ScalingError(f"{path}: cannot read the sweep table ({e})") from None
    if not rows:
        raise ScalingError(f"{path}: no rows (a header: flops, lr, batch_tokens, loss; then one row per run)")
    columns = set(rows[0])
    missing = [c for c in ("lr", "batch_tokens", "loss") if c not in columns]
    if not {"flops", "budget"} & columns:
        missing.append("flops (or budget)")
    if missing:
        raise ScalingError(f"{path}: the sweep table lacks {', '.join(missing)} (it has: {', '.join(sorted(columns))})")
    out: dict[str, list] = {"flops": [], "lr": [], "batch": [], "loss": [], "budget": [], "names": []}
    for i, r in enumerate(rows, start=2):
        where = f"{path} row {i}"
        if r["loss"].lower() in ("nan", "inf", "+inf"):
            continue
        out["budget"].append(positive(where, "budget", r["budget"]) if r.get("budget") else None)
        out["flops"].append(positive(where, "flops", r["flops"]) if r.get("flops") else out["budget"][-1])
        out["lr"].append(positive(where, "lr", r["lr"]))
        out["batch"].append(positive(where, "batch_tokens", r["batch_tokens"]))
        out["loss"].append(positive(where, "loss", r["loss"]))
        out["names"].append(r.get("name") or f"row {i}")
    return _sweep(out)


def read_sweep_runs(paths: list[Path], metric: str = "loss") -> Sweep:
    """Finished runs: C from summary.json's flops, lr from its schedule, batch = tokens / trained steps (steps
    less those the spike guard skipped), the loss as a fit reads it (final_val_loss, else final_loss;
    final_val_bpb with metric bpb), budget when a plan set it."""
    from pretrain.scaling.table import METRICS, run_dirs

    out: dict[str, list] = {"flops": [], "lr": [], "batch": [], "loss": [], "budget": [], "names": []}
    for rdir in run_dirs(paths):
        try:
            s = json.loads((rdir / "summary.json").read_text())
        except (OSError, ValueError) as e:
            raise ScalingError(f"{rdir / 'summary.json'}: cannot read it ({e})") from None
        key = next((k for k in METRICS.get(metric, ()) if s.get(k) is not None), None)
        lr = (s.get("schedule") or {}).get("lr")
        if key is None or lr is None or not s.get("steps"):
            raise ScalingError(f"{rdir}: summary.json lacks {'the loss' if key is None else 'schedule.lr or steps'}")
        loss = float(s[key])
        if not math.isfinite(loss):
            continue  # diverged
        out["flops"].append(positive(str(rdir), "flops", s.get("flops")))
        out["lr"].append(positive(str(rdir), "schedule.lr", lr))
        # Tokens per trained step: a step the spike guard skipped trained none (tokens / steps read 510 for 512).
        trained = int(s["steps"]) - int(s.get("skipped_steps") or 0) if not s.get("rollbacks") else int(s["steps"])
        out["batch"].append(positive(str(rdir), "tokens", s.get("tokens")) / max(trained, 1))
        out["loss"].append(positive(str(rdir), key, loss))
        out["budget"].append(positive(str(rdir), "budget", s["budget"]) if s.get("budget") else None)
        out["names"].append(str(rdir))
    return _sweep(out)


def _sweep(cols: dict[str, list]) -> Sweep:
    budget = cols.pop("budget")
    arrays = {k: np.array(v, dtype=float) for k, v in cols.items() if k != "names"}
    return Sweep(**arrays, budget=np.array(budget) if budget and all(b is not None for b in budget) else None,
                 names=cols["names"])


# ----------------------------------------------------------------------------------------- per budget


@dataclass(frozen=True)
class Optimum:
    """One budget's quadratic in (log lr, log batch) and its vertex; an axis swept at fewer than MIN_VALUES
    values has no optimum (None) and is held at its value."""

    flops: float
    runs: int
    lr: float | None
    batch: float | None
    loss: float | None
    used: bool
    reason: str | None  # why not used


def optimum(flops: float, lr: np.ndarray, batch: np.ndarray, loss: np.ndarray) -> Optimum:
    axes = [z for z in (np.log(lr), np.log(batch)) if len(np.unique(z)) >= MIN_VALUES]
    swept = [len(np.unique(z)) >= MIN_VALUES for z in (np.log(lr), np.log(batch))]
    if not axes:
        return Optimum(flops, len(loss), None, None, None, False, f"fewer than {MIN_VALUES} values of lr and of batch")
    cols = [np.ones_like(loss), *axes, *(a * b for i, a in enumerate(axes) for b in axes[i:])]
    if len(loss) < len(cols):
        return Optimum(flops, len(loss), None, None, None, False, f"{len(loss)} runs for {len(cols)} coefficients")
    coef = np.linalg.lstsq(np.column_stack(cols), loss, rcond=None)[0]
    k = len(axes)
    g = coef[1:1 + k]
    h = np.zeros((k, k))  # the Hessian of the quadratic
    quad = iter(coef[1 + k:])
    for i in range(k):
        for j in range(i, k):
            c = next(quad)
            h[i, j] += c if i != j else 2 * c
            h[j, i] = h[i, j]
    if np.any(np.linalg.eigvalsh(h) <= 0):
        return Optimum(flops, len(loss), None, None, None, False, "the loss surface has no minimum")
    v = np.linalg.solve(h, -g)
    inside = all(a.min() - 1e-9 <= x <= a.max() + 1e-9 for a, x in zip(axes, v, strict=True))
    value = float(coef[0] + g @ v + 0.5 * v @ h @ v)
    it = iter(np.exp(v))
    lr_opt, batch_opt = (float(next(it)) if s else None for s in swept)
    return Optimum(flops, len(loss), lr_opt, batch_opt, value, inside,
                   None if inside else "the vertex lies outside the values swept (an extrapolation)")


# ----------------------------------------------------------------------------------------- the laws


def _line(lc: np.ndarray, ly: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, float]:
    """(intercept, slope), their covariance (None without degrees of freedom), rms residual."""
    x = np.column_stack([np.ones_like(lc), lc])
    beta, *_ = np.linalg.lstsq(x, ly, rcond=None)
    r = ly - x @ beta
    dof = len(ly) - 2
    cov = None if dof <= 0 else float(r @ r / dof) * np.linalg.inv(x.T @ x)
    return beta, cov, float(np.sqrt(np.mean(r ** 2)))


def _laws(opts: list[Optimum], rng: np.random.Generator | None) -> dict[str, np.ndarray]:
    """Per quantity (log coefficient, exponent) through the used budgets' optima; with `rng`, a draw about the
    line from its t distribution (the optima's scatter about it)."""
    out = {}
    for q in QUANTITIES:
        pts = [(o.flops, getattr(o, q)) for o in opts if o.used and getattr(o, q) is not None]
        if len(pts) < 2:
            continue
        lc, ly = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
        beta, cov, _ = _line(lc, ly)
        if rng is not None and cov is not None:
            beta = stats.multivariate_t(loc=beta, shape=cov, df=len(pts) - 2).rvs(random_state=rng)
        out[q] = np.asarray(beta, dtype=float)
    return out


def _groups(sweep: Sweep) -> tuple[list[np.ndarray], np.ndarray]:
    labels, budgets = group_budgets(sweep.flops, sweep.budget)
    return [np.flatnonzero(labels == g) for g in range(len(budgets))], budgets


@dataclass
class HyperFit:
    optima: list[Optimum]
    laws: dict[str, np.ndarray]  # quantity -> (log coefficient, exponent)
    samples: dict[str, np.ndarray]  # quantity -> (resamples, 2)
    rms: dict[str, float]
    sweep: Sweep

    def predict(self, q: str, flops: float) -> tuple[float, list[float] | None]:
        """The law's value at `flops` and its 95% interval."""
        c, e = self.laws[q]
        s = self.samples.get(q, np.empty((0, 2)))
        return float(math.exp(c) * flops ** e), interval(np.exp(s[:, 0]) * flops ** s[:, 1])

    def to_json(self) -> dict:
        laws = {}
        for q in QUANTITIES:
            if q not in self.laws:
                laws[q] = None
                continue
            s = self.samples.get(q, np.empty((0, 2)))
            with np.errstate(over="ignore"):  # a coefficient at C = 1 is far outside the sweep: draws overflow
                ci = {"coefficient": interval(np.exp(s[:, 0])), "exponent": interval(s[:, 1])}
            laws[q] = {"coefficient": math.exp(self.laws[q][0]), "exponent": float(self.laws[q][1]),
                       "ci95": ci,
                       "rms_log_residual": self.rms[q], "samples": s.tolist()}
        return {"lr": laws["lr"], "batch": laws["batch"], "batch_unit": "tokens per step",
                "budgets": [asdict(o) for o in self.optima],
                "runs": [{"name": n, "flops": float(c), "lr": float(lr), "batch_tokens": float(b), "loss": float(v)}
                         for n, c, lr, b, v in zip(self.sweep.names, self.sweep.flops, self.sweep.lr,
                                                   self.sweep.batch, self.sweep.loss, strict=True)]}


def fit_hyper(sweep: Sweep, *, resamples: int = 300, seed: int = 0) -> HyperFit:
    """The optimum per budget, eta_opt(C) and B_opt(C), and their bootstrap intervals (see the module docstring)."""
    if len(sweep) == 0:
        raise ScalingError("no runs in the sweep")
    groups, budgets = _groups(sweep)
    opts = [optimum(float(budgets[g]), sweep.lr[i], sweep.batch[i], sweep.loss[i]) for g, i in enumerate(groups)]
    laws = _laws(opts, None)
    if not laws:
        used = sum(o.used for o in opts)
        raise ScalingError(f"a hyperparameter law needs an optimum inside the swept values at 2 or more budgets "
                           f"({MIN_VALUES}+ values of lr or batch each); {used} of {len(opts)} budgets have one")
    rms = {}
    for q in laws:
        pts = [(o.flops, getattr(o, q)) for o in opts if o.used and getattr(o, q) is not None]
        rms[q] = _line(np.log([p[0] for p in pts]), np.log([p[1] for p in pts]))[2]
    rng = np.random.default_rng(seed)
    draws: dict[str, list] = {q: [] for q in laws}
    for _ in range(resamples):
        picked = [rng.choice(i, size=len(i), replace=True) for i in groups]
        resampled = [optimum(float(budgets[g]), sweep.lr[i], sweep.batch[i], sweep.loss[i])
                     for g, i in enumerate(picked)]
        for q, beta in _laws(resampled, rng).items():
            if q in draws:
                draws[q].append(beta)
    samples = {q: np.array(v).reshape(-1, 2) for q, v in draws.items()}
    return HyperFit(opts, laws, samples, rms, sweep)


def load_hyper(path: Path) -> dict:
    """hyper.json's document, or a ScalingError in one line."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ScalingError(f"{path}: cannot read the hyperparameter fit ({e})") from None


def law_at(doc: dict, q: str, flops: float) -> tuple[float, list[float] | None] | None:
    """hyper.json's law for `q` at `flops` with its interval from the stored samples (None: no law)."""
    law = doc.get(q)
    if not law:
        return None
    s = np.array(law.get("samples") or []).reshape(-1, 2)
    return law["coefficient"] * flops ** law["exponent"], interval(np.exp(s[:, 0]) * flops ** s[:, 1])


def plot_sweep(fit: HyperFit, path: Path) -> Path:
    """Loss against lr, one panel per budget, one line per batch size; the budget's fitted optimum (*) and the
    law's lr at that budget (dashed)."""
    from matplotlib import colormaps
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    from pretrain.atomic import atomic_path

    groups, budgets = _groups(fit.sweep)
    fig = Figure(figsize=(4.2 * len(groups), 4.0), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(groups), squeeze=False)[0])
    s = fit.sweep
    norm = LogNorm(s.batch.min(), s.batch.max() * (1 + 1e-9))
    for ax, idx, opt in zip(axes, groups, fit.optima, strict=True):
        for b in np.unique(s.batch[idx]):
            sel = idx[s.batch[idx] == b]
            sel = sel[np.argsort(s.lr[sel])]
            ax.plot(s.lr[sel], s.loss[sel], marker="o", ms=3, lw=1, color=colormaps["viridis"](0.9 * norm(b)),
                    label=f"batch {b:,.0f} tokens" if b < 1e7 else f"batch {b:.3g} tokens")
        if opt.lr is not None:
            ax.scatter([opt.lr], [opt.loss], marker="*", s=140, zorder=3, edgecolors="black",
                       facecolors="tab:red" if opt.used else "none",
                       label=f"optimum: lr {opt.lr:.3g}" + (f", batch {opt.batch:.3g}" if opt.batch else ""))
        if "lr" in fit.laws:
            ax.axvline(fit.predict("lr", opt.flops)[0], color="grey", ls="--", lw=1, label="law eta_opt(C)")
        ax.set(xscale="log", xlabel="learning rate", ylabel="loss", title=f"{opt.flops:.3g} FLOPs")
        ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels of a log axis overlap at this width
        ax.legend(fontsize=6)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return path
