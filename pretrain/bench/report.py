"""The kernel benchmark's outputs: one long-format CSV, one plot per op and x-axis, a W&B run.

The CSV has Liger-Kernel's benchmark-data columns (its `all_benchmark_data.csv`), `liger_version` renamed
`pretrain_version`: one row per (kernel, provider, mode, metric, x value) with the median and the 20th and
80th percentiles, so that the same plotting and comparison tools read either, and rows from several
machines or commits concatenate. `extra_benchmark_config_str` is the JSON of the dimensions held fixed
and the dtype.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections import defaultdict
from importlib import metadata
from pathlib import Path

from pretrain.atomic import atomic_write
from pretrain.metrics.sinks import wandb_mode

COLUMNS = ("kernel_name", "kernel_provider", "kernel_operation_mode", "metric_name", "metric_unit", "x_name",
           "x_label", "x_value", "y_value_50", "y_value_20", "y_value_80", "extra_benchmark_config_str",
           "gpu_name", "timestamp", "pretrain_version")
UNITS = {"speed": "ms", "memory": "MB"}
PANELS = (("speed", "forward"), ("speed", "backward"), ("speed", "full"), ("memory", "full"))


def version() -> str:
    try:
        return metadata.version("pretrain")
    except metadata.PackageNotFoundError:  # a source tree that was never installed
        return "unknown"


def row(op: str, provider: str, mode: str, metric: str, axis, x: int, ys: tuple[float, ...], extra: dict,
        device: str, timestamp: str) -> dict:
    """One CSV row; `ys` is (median, p20, p80)."""
    return {"kernel_name": op, "kernel_provider": provider, "kernel_operation_mode": mode,
            "metric_name": metric, "metric_unit": UNITS[metric], "x_name": axis.name, "x_label": axis.label,
            "x_value": x,
            "y_value_50": ys[0], "y_value_20": ys[1], "y_value_80": ys[2],
            "extra_benchmark_config_str": json.dumps(extra, sort_keys=True), "gpu_name": device,
            "timestamp": timestamp, "pretrain_version": version()}


def write_csv(rows: list[dict], path: Path, columns=COLUMNS) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="raise")
    w.writeheader()
    w.writerows(rows)
    atomic_write(path, buf.getvalue())


def read_csv(path: Path) -> list[dict]:
    """Rows of a CSV that `write_csv` wrote, with numbers as numbers (to plot a saved or partial sweep)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["x_value"] = int(float(r["x_value"]))
        for k in ("y_value_50", "y_value_20", "y_value_80"):
            r[k] = float(r[k])
    return rows


def plot(rows: list[dict], out: Path) -> list[Path]:
    """One PNG per (kernel, x-axis): a panel per (metric, mode) present, a line per provider at the median
    with the 20-80 percentile band shaded. Returns the files written."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a cluster node or in CI
    import matplotlib.pyplot as plt

    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["kernel_name"], r["x_name"])].append(r)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for (op, x_name), rs in groups.items():
        panels = [p for p in PANELS if any((r["metric_name"], r["kernel_operation_mode"]) == p for r in rs)]
        fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
        for ax, (metric, mode) in zip(axes[0], panels, strict=True):
            by_provider: dict[str, list[dict]] = defaultdict(list)
            for r in rs:
                if (r["metric_name"], r["kernel_operation_mode"]) == (metric, mode):
                    by_provider[r["kernel_provider"]].append(r)
            for provider, prs in by_provider.items():
                prs.sort(key=lambda r: r["x_value"])
                xs = [r["x_value"] for r in prs]
                line, = ax.plot(xs, [r["y_value_50"] for r in prs], marker="o", ms=3, label=provider)
                ax.fill_between(xs, [r["y_value_20"] for r in prs], [r["y_value_80"] for r in prs],
                                color=line.get_color(), alpha=0.25, lw=0)
            xs_all = sorted({r["x_value"] for r in rs})
            if xs_all[0] > 0 and xs_all[-1] / xs_all[0] >= 8:  # powers-of-two sweeps read best on a log axis
                ax.set_xscale("log", base=2)
            ys = [r["y_value_50"] for prs in by_provider.values() for r in prs]
            if min(ys) > 0 and max(ys) / min(ys) >= 30:  # providers apart by orders of magnitude: log y
                ax.set_yscale("log")
            ax.set_title(f"{metric} · {mode}", fontsize=10)
            ax.set_xlabel(rs[0]["x_label"])
            ax.set_ylabel(UNITS[metric])
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        extra = json.loads(rs[0]["extra_benchmark_config_str"])
        fig.suptitle(f"{op} on {rs[0]['gpu_name']} ({extra.get('dtype', '')}; median, 20-80% band)",
                     fontsize=11)
        fig.tight_layout()
        path = out / f"{op}_{x_name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path)
    return files


def log_wandb(rows: list[dict], checks: list[dict], plots: list[Path], out: Path) -> str:
    """Log the CSV rows and the correctness sweep as tables and each plot as an image to one W&B run
    (offline unless WANDB_API_KEY or WANDB_MODE says otherwise); returns the run's directory."""
    import wandb

    mode = wandb_mode()
    run = wandb.init(project="pretrain-bench", job_type="bench-kernels", dir=str(out), mode=mode,
                     settings=wandb.Settings(console="off", silent=True))
    data = {}
    if rows:
        data["kernels"] = wandb.Table(columns=list(COLUMNS),
                                      data=[[_cell(r[c]) for c in COLUMNS] for r in rows])
    if checks:
        cols = list(checks[0])
        data["correctness"] = wandb.Table(columns=cols, data=[[_cell(r[c]) for c in cols] for r in checks])
    data.update({f"plots/{p.stem}": wandb.Image(str(p)) for p in plots})
    run.log(data)
    where = run.dir
    run.finish()
    return where


def _cell(v):
    return None if isinstance(v, float) and math.isnan(v) else v
