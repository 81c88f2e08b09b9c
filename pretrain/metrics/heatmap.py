"""Heatmaps of per-layer vectors in the metrics (a mixture of experts' load: layers x experts), averaged over the steps
since the last evaluation and drawn at each one (`Grids`, a pair of hooks the trainer adds when the model's family
offers `grids`). Rank 0 writes `heatmaps/<name>-step-<N>.png` under the run directory and hands it to the sinks that
show images (W&B). The family says what to draw; the trainer knows nothing of experts.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from pretrain.atomic import atomic_path


def save_heatmap(values: np.ndarray, rows: list[str], title: str, path: Path, *, xlabel: str = "",
                 cbar: str = "") -> None:
    """`values` (rows x columns) as a heatmap PNG at `path` (written atomically), each cell annotated when few."""
    from matplotlib.figure import Figure

    values = np.asarray(values, dtype=float)
    n_rows, n_cols = values.shape
    fig = Figure(figsize=(max(4.0, 0.5 * n_cols + 2.0), max(2.0, 0.4 * n_rows + 1.2)))
    ax = fig.add_subplot()
    im = ax.imshow(values, aspect="auto", cmap="viridis", interpolation="nearest")
    fig.colorbar(im, ax=ax, label=cbar)
    ax.set_yticks(range(n_rows), rows)
    ax.set_xticks(range(n_cols))
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    if n_cols * n_rows <= 256:
        mid = (values.max() + values.min()) / 2
        for (r, c), v in np.ndenumerate(values):
            ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=7, color="black" if v > mid else "white")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")


class Grids:
    """Two hooks: `add` (every step) sums the family's grids of the step's row, `draw` (at each evaluation and the
    end) draws their means since the last draw. `grids(row)` -> {name: (row labels, values, x label, colour-bar label)}."""

    def __init__(self, grids: Callable[[dict], dict]):
        self.grids = grids
        self.sums: dict[str, np.ndarray] = {}
        self.meta: dict[str, tuple] = {}
        self.steps = 0
        self.first = None

    def add(self, v) -> None:
        if self.grids is None or not v.row:
            return
        got = self.grids(dict(v.row))
        if not got and not self.sums:  # a model without grids (a dense one): nothing more to look for
            self.grids = None
            return
        for name, (rows, values, xlabel, cbar) in got.items():
            values = np.asarray(values, dtype=float)
            self.sums[name] = self.sums.get(name, 0) + values
            self.meta[name] = (rows, xlabel, cbar)
        if got:
            self.steps += 1
            self.first = self.first or v.step

    def draw(self, v) -> None:
        if not self.steps:
            return
        if v.rank == 0:
            for name, total in self.sums.items():
                rows, xlabel, cbar = self.meta[name]
                path = v.rdir / "heatmaps" / f"{name.replace('/', '-')}-step-{v.step}.png"
                save_heatmap(total / self.steps, rows, f"{name}, steps {self.first}-{v.step}", path, xlabel=xlabel,
                             cbar=cbar)
                v.image(v.step, name, path)
        self.sums, self.steps, self.first = {}, 0, None
