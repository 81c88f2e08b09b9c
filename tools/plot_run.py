"""Plot a run's curves from its metrics.jsonl: the training loss and every objective metric against
steps, with the validation points on top. Writes a PNG.

    .venv/bin/python tools/plot_run.py runs/bert-tiny --out bench-out/bert-tiny.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SKIP = {"step", "lr", "grad_norm", "flops", "mfu", "step_time_s", "corrupt_shards_skipped"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="run directory (holding metrics.jsonl)")
    ap.add_argument("--out", type=Path, default=None, help="PNG to write (default <run>/curves.png)")
    args = ap.parse_args()
    rows = [json.loads(ln) for ln in (args.run / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    train = [r for r in rows if "loss" in r]
    val = [r for r in rows if "val_loss" in r]
    unit = json.loads((args.run / "summary.json").read_text()).get("unit", "tokens") if (args.run / "summary.json").exists() else "tokens"
    names = [k for k in train[0] if k not in SKIP and "/" not in k and isinstance(train[0][k], float)
             and not k.endswith("_per_s") and k != unit]
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 3.6), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        ax.plot([r["step"] for r in train], [r[name] for r in train], lw=1, alpha=0.7, label=f"train {name}")
        if val and f"val_{name}" in val[0]:
            ax.plot([r["step"] for r in val], [r[f"val_{name}"] for r in val], "o-", label=f"val {name}")
        ax.set_xlabel("step")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{args.run.name}: {train[-1]['step']} steps, {train[-1][unit]:,} {unit}")
    fig.tight_layout()
    out = args.out or args.run / "curves.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(out)


if __name__ == "__main__":
    main()
