"""The PNG plots of a scaling fit: isoFLOP curves with their minima, loss against compute with the fitted
frontier, N_opt and D_opt against C beside the published exponents, and the law's residuals.

Figures are drawn with matplotlib's object API (`matplotlib.figure.Figure`, rendered by Agg), so nothing
touches pyplot's global state or needs a display.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pretrain.atomic import atomic_path
from pretrain.scaling.fit import PUBLISHED_A, ScalingFit

NAMES = {"total": "parameters", "non-embedding": "non-embedding parameters", "active": "active parameters"}


def _n(fit: ScalingFit) -> str:
    """The axis name of N: which count was fitted (a mixture of experts' active ones, most often)."""
    return NAMES.get(fit.params, "parameters")


def _figure(width: float = 7.0, height: float = 4.8, cols: int = 1):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.subplots(1, cols)


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    return path


def _colors(fit: ScalingFit):
    """One colour per FLOP budget, by log budget."""
    from matplotlib import colormaps
    from matplotlib.colors import LogNorm

    norm = LogNorm(fit.budgets.min(), fit.budgets.max() * (1 + 1e-9))
    return lambda budget: colormaps["viridis"](norm(budget) * 0.9)


def _band(fit: ScalingFit, grid: np.ndarray, what) -> tuple[np.ndarray, np.ndarray] | None:
    """2.5th and 97.5th percentiles, over the bootstrap laws, of what(law) along `grid`."""
    laws = fit.sample_laws()
    if not laws:
        return None
    with np.errstate(all="ignore"):
        values = np.array([what(law) for law in laws])
        return np.nanpercentile(values, 2.5, axis=0), np.nanpercentile(values, 97.5, axis=0)


def plot_isoflops(fit: ScalingFit, path: Path) -> Path:
    fig, ax = _figure()
    color, law = _colors(fit), fit.approach3.law
    curves = fit.approach2.budgets if fit.approach2 else []
    for g, budget in enumerate(fit.budgets):
        sel = fit.labels == g
        col = color(budget)
        ax.scatter(fit.n[sel], fit.loss[sel], s=14, color=col, label=f"{budget:.2g} FLOPs")
        xs = np.geomspace(fit.n[sel].min() / 1.5, fit.n[sel].max() * 1.5, 100)
        ax.plot(xs, law.loss(xs, budget / (fit.k * xs)), color=col, lw=0.8, ls=":")  # the law at this budget
        curve = next((m for m in curves if m.flops == budget), None)
        if curve is not None and curve.coef is not None:
            ax.plot(xs, np.polyval(curve.coef, np.log(xs)), color=col, lw=1.2)
        if curve is not None and curve.n_opt is not None:
            ax.scatter([curve.n_opt], [curve.loss_opt], marker="*", s=120, zorder=3, edgecolors="black",
                       facecolors=col if curve.used else "none")
    n3 = law.optimum(fit.budgets, fit.k)[0]
    ax.scatter(n3, law.frontier_loss(fit.budgets, fit.k), marker="x", color="black", s=30, zorder=3,
               label="approach 3 optimum")
    ax.set(xscale="log", xlabel=f"{_n(fit)} N", ylabel="loss",
           title="isoFLOP curves: parabolas in log N (solid), their minima (*), the law (dotted)")
    ax.legend(fontsize=7, ncols=2)
    return _save(fig, path)


def read_checks(out: Path) -> list[dict]:
    """The checked runs in out/checks.jsonl (`pretrain scaling check`), drawn on the frontier."""
    import json

    path = out / "checks.jsonl"
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.is_file() else []


def _draw_checks(ax, checks: list[dict]) -> None:
    """Each checked run: its prediction with the interval (open square, bar) and its loss (filled diamond)."""
    for i, c in enumerate(checks):
        lo, hi = c["ci95"] or (c["predicted"], c["predicted"])
        # The law's own loss may lie just outside its bootstrap laws' interval (a tight fit of few resamples):
        # the bar then ends at the prediction, never below it (matplotlib refuses negative lengths).
        down, up = max(0.0, c["predicted"] - lo), max(0.0, hi - c["predicted"])
        ax.errorbar([c["flops"]], [c["predicted"]], yerr=[[down], [up]], fmt="s",
                    mfc="none", color="tab:blue", capsize=3, label="checked: prediction" if i == 0 else None)
        ax.scatter([c["flops"]], [c["loss"]], marker="D", s=30, color="tab:blue", zorder=4,
                   label="checked: realized" if i == 0 else None)


def plot_frontier(fit: ScalingFit, path: Path, checks: list[dict] | None = None) -> Path:
    """Loss against compute with the frontier, its band, the target and the checked runs (default: those in
    checks.jsonl beside the plot)."""
    checks = checks if checks is not None else read_checks(path.parent)
    fig, ax = _figure()
    law = fit.approach3.law
    sc = ax.scatter(fit.c, fit.loss, c=np.log10(fit.n), s=14, cmap="plasma")
    fig.colorbar(sc, ax=ax, label=f"log10 N ({_n(fit)})")
    grid = np.geomspace(fit.c.min() / 2, max(fit.target_flops, fit.c.max(), *(c["flops"] for c in checks)) * 2, 200)
    ax.plot(grid, law.frontier_loss(grid, fit.k), color="black",
            label="approach 3 frontier L(N_opt(C), D_opt(C))")
    band = _band(fit, grid, lambda s: s.frontier_loss(grid, fit.k))
    if band is not None:
        ax.fill_between(grid, *band, color="black", alpha=0.15, lw=0, label="95% bootstrap interval")
    if fit.approach2:
        used = [m for m in fit.approach2.budgets if m.used]
        ax.scatter([m.flops for m in used], [m.loss_opt for m in used], marker="*", s=90, color="tab:green",
                   edgecolors="black", zorder=3, label="isoFLOP minima (approach 2)")
    target = fit.predict3(fit.target_flops)
    lo, hi = target["ci95"]["loss"] or (target["loss"], target["loss"])
    ax.errorbar([fit.target_flops], [target["loss"]], yerr=[[target["loss"] - lo], [hi - target["loss"]]],
                fmt="o", color="tab:red", capsize=3, label=f"target {fit.target_flops:.2g} FLOPs")
    _draw_checks(ax, checks)
    ax.set(xscale="log", xlabel="training FLOPs C", ylabel="loss", title="loss against compute")
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_optimal(fit: ScalingFit, path: Path) -> Path:
    fig, axes = _figure(11.0, 4.6, cols=2)
    law = fit.approach3.law
    grid = np.geomspace(fit.c.min() / 2, max(fit.target_flops, fit.c.max()) * 2, 200)
    mid = float(np.exp(np.log(fit.c).mean()))  # reference lines pass through our frontier here
    for ax, which, name in ((axes[0], 0, f"N_opt ({_n(fit)})"), (axes[1], 1, f"D_opt ({fit.unit})")):
        ax.plot(grid, law.optimum(grid, fit.k)[which], color="black",
                label=f"approach 3: {'a' if which == 0 else 'b'} = {law.a if which == 0 else law.b:.3f}")
        band = _band(fit, grid, lambda s, which=which: s.optimum(grid, fit.k)[which])
        if band is not None:
            ax.fill_between(grid, *band, color="black", alpha=0.15, lw=0)
        if fit.approach2:
            a2 = fit.approach2
            used = [m for m in a2.budgets if m.used]
            pts = [m.n_opt if which == 0 else m.flops / (fit.k * m.n_opt) for m in used]
            ax.scatter([m.flops for m in used], pts, marker="*", s=90, color="tab:green", edgecolors="black",
                       zorder=3)
            ax.plot(grid, a2.n_opt(grid) if which == 0 else a2.d_opt(grid), color="tab:green",
                    label=f"approach 2: {'a' if which == 0 else 'b'} = {a2.a if which == 0 else a2.b:.3f}")
        anchor = law.optimum(mid, fit.k)[which]
        for (ref, a), ls in zip(PUBLISHED_A.items(), ("--", "-.", ":"), strict=True):
            exponent = a if which == 0 else 1 - a
            ax.plot(grid, anchor * (grid / mid) ** exponent, color="grey", lw=1, ls=ls,
                    label=f"{ref}: {exponent:.2f}")
        ax.axvline(fit.target_flops, color="tab:red", lw=0.8, ls="--")
        ax.set(xscale="log", yscale="log", xlabel="training FLOPs C", ylabel=name,
               title=f"compute-optimal {name.split()[0]} against C")
        ax.legend(fontsize=7)
    return _save(fig, path)


def plot_residuals(fit: ScalingFit, path: Path) -> Path:
    fig, axes = _figure(11.0, 4.2, cols=2)
    color, law = _colors(fit), fit.approach3.law
    r = np.log(fit.loss) - np.log(law.loss(fit.n, fit.d))
    for ax, x, name in ((axes[0], fit.n, f"{_n(fit)} N"),
                        (axes[1], fit.d / fit.n, f"{fit.unit} per parameter D/N")):
        ax.scatter(x, r, s=14, color=[color(fit.budgets[g]) for g in fit.labels])
        ax.axhline(0, color="black", lw=0.8)
        ax.set(xscale="log", xlabel=name, ylabel="log L - log L_fit")
    axes[0].set_title(f"residuals of the law (rms {np.sqrt(np.mean(r ** 2)):.4f}, coloured by budget)")
    return _save(fig, path)


def write_plots(fit: ScalingFit, out: Path) -> list[Path]:
    """All four plots into `out`; returns their paths."""
    return [plot_isoflops(fit, out / "isoflops.png"), plot_frontier(fit, out / "frontier.png"),
            plot_optimal(fit, out / "optimal.png"), plot_residuals(fit, out / "residuals.png")]
