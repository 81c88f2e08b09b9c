"""The console sink: progress lines of a run, read from its metrics.jsonl while the workers train.

Following the file rather than worker stdout keeps the display independent of where rank 0 runs and
of Ray's log forwarding: one line per logging interval, one per validation.
"""

from __future__ import annotations

import contextlib
import json
import threading
from pathlib import Path

from rich.console import Console

console = Console(highlight=False, soft_wrap=True)  # one line per row, even in a narrow or piped terminal


def _fmt_duration(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


_SHOWN = {"loss", "lr", "grad_norm", "step_time_s", "mfu", "flops"}  # the loop's own: printed apart or not at all


def _extra(row: dict, prefix: str = "") -> str:
    """The objective's own metrics (accuracy, ...), after the loss: float values other than the loop's."""
    keys = [k for k in row if k.startswith(prefix) and k.removeprefix(prefix) not in _SHOWN
            and "/" not in k and isinstance(row[k], float) and not k.endswith("_per_s")]
    return "".join(f"  {k} {row[k]:.4f}" for k in keys)


# A straggler window is printed when its slowest rank is this much slower than the median rank (below it the
# ranks are even, and the line would be noise between the progress lines); metrics.jsonl keeps every window.
STRAGGLE_SHOWN = 1.1


def format_row(row: dict, total_steps: int, unit: str = "tokens") -> str | None:
    """The console line of one metrics row; None for a row not worth a line (an even straggler window)."""
    if "warning" in row:  # a straggler named, a step skipped: said once, in the run's own words
        return f"[yellow]warning: {row['warning']}[/]"
    if "val_loss" in row:
        return f"[bold]step {row['step']:>6}/{total_steps}  val_loss {row['val_loss']:.4f}{_extra(row, 'val_')}[/]"
    if "straggle" in row and "loss" not in row:  # a straggler window (pretrain/train/straggle.py)
        if row["straggle"] < STRAGGLE_SHOWN:
            return None
        return f"[dim]step {row['step']:>6}/{total_steps}  straggle {row['straggle']:.2f} (rank {row['slowest_rank']})[/]"
    if "loss" not in row:  # an objective's evaluation (fd, class_agreement of samples)
        return f"[bold]step {row['step']:>6}/{total_steps} {_extra(row)}[/]"
    eta = (total_steps - row["step"]) * row["step_time_s"]
    grad = row["grad_norm"] if row["grad_norm"] is not None else float("nan")
    mfu = f"{100 * row['mfu']:.1f}%" if row.get("mfu") is not None else "n/a"  # no entry: the device's peak is unknown
    return (
        f"step {row['step']:>6}/{total_steps}  loss {row['loss']:.4f}{_extra(row)}  lr {row['lr']:.2e}  "
        f"grad {grad:.2f}  {row[f'{unit}_per_s']:,.0f} {unit}/s  mfu {mfu}  eta {_fmt_duration(eta)}"
    )


@contextlib.contextmanager
def follow_metrics(path: Path, total: int, unit: str, log_every: int = 1, enabled: bool = True, poll_s: float = 0.5):
    """Print new rows of `path` while the body runs (rows that exist already are history: skipped); `total` is
    the run's steps (the driver derives it once), a loss row is printed every `log_every` steps."""
    if not enabled:
        yield
        return
    stop = threading.Event()
    offset = path.stat().st_size if path.exists() else 0

    def run() -> None:
        nonlocal offset
        buf = ""
        while True:
            done = stop.is_set()
            if path.exists():
                if path.stat().st_size < offset:  # truncated by a resume: start over at its end
                    offset = path.stat().st_size
                with open(path) as f:
                    f.seek(offset)
                    buf += f.read()
                    offset = f.tell()
                *lines, buf = buf.split("\n")
                for ln in lines:
                    row = json.loads(ln)
                    step = row["step"]
                    if "loss" not in row or step % log_every == 0 or step in (1, total):
                        line = format_row(row, total, unit)
                        if line is not None:
                            console.print(line)
            if done:
                return
            stop.wait(poll_s)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)
