"""Where the seconds before the first step go: wall-clock marks from the command to the first step.

The driver marks what it does (the command's start, Ray up) and hands its marks to the workers; rank 0
adds its own (worker started, imports, model, engine, data, first batch, first step) and writes them to
`start.json` in the run directory once the first step is done, as seconds since the command started.
`tools/bench_start.py` prints them as a table. Marks are wall-clock (time.time()): driver and worker are
different processes, on one machine for the runs this serves.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from pretrain.atomic import atomic_write
from pretrain.train.pulse import PULSE


class Marks:
    """Ordered (phase, time) pairs; a phase ends at its mark and began at the previous one."""

    def __init__(self, marks: list[tuple[str, float]] | None = None):
        self.marks: list[tuple[str, float]] = list(marks or [])

    def mark(self, phase: str) -> None:
        self.marks.append((phase, time.time()))
        PULSE.at(PULSE.phase)  # progress for the hang watcher (pretrain/train/pulse.py)

    def to_list(self) -> list[tuple[str, float]]:
        return list(self.marks)

    def table(self) -> dict:
        """{"phases": [{"phase", "s", "at_s"}...], "total_s", "started_at"}: each phase's duration and its end since the first mark."""
        t0 = self.marks[0][1]
        rows, prev = [], t0
        for name, t in self.marks[1:]:
            rows.append({"phase": name, "s": round(t - prev, 3), "at_s": round(t - t0, 3)})
            prev = t
        return {"phases": rows, "total_s": round(prev - t0, 3), "started_at": t0}

    def write(self, path: Path) -> None:
        atomic_write(path, json.dumps(self.table(), indent=2) + "\n")
