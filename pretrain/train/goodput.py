"""Where a run's wall time went, across every attempt of one command: start-up, productive steps, evaluation,
checkpoint stalls, lost work (steps computed again after a restart or a rollback), detection and recovery,
and the end of the run (final weights, summary).

Rank 0 appends one line per attempt start and one per step to `<run>/timeline.jsonl`, flushed (no fsync:
a lost line costs a figure, never the run), and never truncates it within a command, so a hung or killed
attempt's steps are still there when a later attempt computes them again. `account` reads the lines of
one command (its start time) and splits its wall time:

- start-up: an attempt's start (the command's for the first, the worker's for a restart) to its first step;
- productive: the last computation of every step number; lost: every earlier one of the same number;
- evaluation and checkpoint: time in those phases (`pretrain.train.pulse`), the stall only for checkpoints;
- detection and recovery: from an attempt's last line to the next attempt's start (the hang timeout, the
  teardown, the restart), plus in-process rollbacks (`recover` lines); an attempt that hung before its first
  step is known by the driver's `hang` line (its start-up ends where it stopped progressing);
- end: from the last step to the summary.

Goodput is productive / wall. The parts are measured each on its own, so their sum against the wall time
is a check of the accounting (`unaccounted_s`), not a definition.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

TIMELINE = "timeline.jsonl"
PARTS = ("startup_s", "productive_s", "evaluation_s", "checkpoint_s", "lost_s", "recovery_s", "end_s")


class Timeline:
    """Rank 0's side: lines to `<run>/timeline.jsonl`. Other ranks get a Timeline that writes nothing."""

    def __init__(self, rdir: Path, rank: int, command: float):
        self.path, self.command = rdir / TIMELINE, command
        self._fh = None
        if rank == 0:
            if not any(r.get("command") == command for r in read(self.path)):
                self.path.unlink(missing_ok=True)  # an earlier command's: this one's accounting starts here
            self._fh = open(self.path, "a")  # noqa: SIM115 - open for the run, closed by close()

    def _line(self, row: dict) -> None:
        if self._fh is not None:
            self._fh.write(json.dumps(row) + "\n")
            self._fh.flush()

    def attempt(self, start: float, resumed_from: int) -> None:
        self._line({"command": self.command, "attempt": start, "from": resumed_from, "first": time.time()})

    def step(self, step: int, step_s: float, evaluation_s: float, checkpoint_s: float) -> None:
        self._line({"command": self.command, "step": step, "dt": round(step_s, 6), "ev": round(evaluation_s, 6),
                    "ck": round(checkpoint_s, 6), "t": time.time()})

    def recover(self, seconds: float) -> None:
        self._line({"command": self.command, "recover": round(seconds, 6), "t": time.time()})

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def note_hang(rdir: Path, command: float, declared: float, quiet_s: float) -> None:
    """The driver's line (pretrain/launch/watch.py): a hang declared at `declared` after `quiet_s` without
    progress. An attempt that hung before its own first line is known by this line alone."""
    with open(rdir / TIMELINE, "a") as fh:  # one short O_APPEND write: whole beside rank 0's lines
        fh.write(json.dumps({"command": command, "hang": declared, "quiet": round(quiet_s, 6)}) + "\n")


def read(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue  # a line torn by a killed process
    return rows


def account(path: Path, command: float, now: float | None = None) -> dict:
    """The split of this command's wall time (command start to `now`), from the timeline at `path`."""
    now = time.time() if now is None else now
    rows = [r for r in read(path) if r.get("command") == command]
    parts = dict.fromkeys(PARTS, 0.0)
    last_t, seen, restarts, open_attempt = command, {}, 0, False
    for r in rows:
        if "attempt" in r:
            start = command
            if restarts:  # a restart: from the last line of the attempt before to this one's start
                start = max(r["attempt"], last_t)
                parts["recovery_s"] += start - last_t
            parts["startup_s"] += r["first"] - start
            last_t, restarts, open_attempt = r["first"], restarts + 1, True
        elif "hang" in r:
            if not open_attempt:  # it hung starting: start-up until its last progress, then detection
                stalled = max(last_t, r["hang"] - r["quiet"])
                parts["startup_s"] += stalled - last_t
                last_t, restarts = stalled, restarts + 1
            open_attempt = False
        elif "step" in r:
            if r["step"] in seen:
                parts["lost_s"] += seen[r["step"]]
            seen[r["step"]] = r["dt"]
            parts["evaluation_s"] += r["ev"]
            parts["checkpoint_s"] += r["ck"]
            last_t = r["t"]
        elif "recover" in r:
            parts["recovery_s"] += r["recover"]
            last_t = r["t"]
    parts["productive_s"] = sum(seen.values())
    parts["end_s"] = max(0.0, now - last_t)
    wall = now - command
    out = {k: round(v, 3) for k, v in parts.items()}
    out.update(wall_s=round(wall, 3), unaccounted_s=round(wall - sum(parts.values()), 3),
               goodput=round(parts["productive_s"] / wall, 4) if wall > 0 else None, attempts=restarts)
    return out


def describe(g: dict) -> str:
    """One line for the console: goodput and the largest losses."""
    others = sorted(((g[k], k[:-2]) for k in PARTS if k != "productive_s" and g.get(k)), reverse=True)[:3]
    tail = ", ".join(f"{name} {s:.1f} s" for s, name in others)
    return (f"goodput {g['goodput']:.0%} of {g['wall_s']:.1f} s over {g['attempts']} attempt"
            f"{'s' if g['attempts'] != 1 else ''} ({tail})")
