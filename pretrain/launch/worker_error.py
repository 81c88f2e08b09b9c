"""How an error of the input found on a worker reaches the driver without a restart.

The worker writes the error's one line to `error.json` in the run directory (which the driver reads
anyway: metrics.jsonl, summary.json) and returns normally, so Ray Train sees no failure and does not
restart the group; the driver raises the line as a `RunError` (exit 2).
"""

from __future__ import annotations

import json
from pathlib import Path

from pretrain.atomic import atomic_write
from pretrain.errors import RunError, first_line

ERROR_FILE = "error.json"


def record_error(run_dir: Path, e: BaseException, rank: int) -> None:
    """Write `e`'s one line where the driver looks (atomic: a reader never sees half of it)."""
    atomic_write(run_dir / ERROR_FILE, json.dumps({"error": first_line(e), "type": type(e).__name__, "rank": rank}) + "\n")


def recorded_error(run_dir: Path) -> RunError | None:
    """The error a worker recorded in this run directory, as a RunError with its line; None if none."""
    f = run_dir / ERROR_FILE
    if not f.is_file():
        return None
    return RunError(json.loads(f.read_text())["error"])
