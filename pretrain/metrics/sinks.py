"""Where metrics go: metrics.jsonl, a W&B run, or nowhere (ranks other than 0).

Every sink takes one flat dict per event (`{"step": ..., "loss": ...}` or `{"step": ..., "val_loss": ...}`).
The JSONL file is the source of truth for resume: `truncate_after(step)` drops lines past a checkpoint
(all of them without one) so a restarted run writes each step exactly once, and `sync` makes it durable
before a checkpoint can make its step resumable. The W&B run gets each step once too, decided from what
W&B holds (`WandbSink.held`), not from metrics.jsonl: rows an attempt wrote to the file but never got into
W&B (still waiting for `wandb.init`, or lost with the process) are sent again from the file (`Deferred`'s
backlog). A W&B that cannot start never fails the run (`open_wandb`).
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
import uuid
from concurrent.futures import Future
from pathlib import Path

from pretrain.atomic import atomic_write
from pretrain.compat import wandb_last_step
from pretrain.errors import first_line
from pretrain.redact import redact, redacted_tree


class Sink:
    def log(self, row: dict) -> None: ...
    def image(self, step: int, name: str, path: Path) -> None: ...  # a PNG already written to the run dir
    def summary(self, values: dict) -> None: ...
    def sync(self) -> None: ...  # what was logged so far is on disk (before a checkpoint makes its step resumable)
    def close(self) -> None: ...


class JsonlSink(Sink):
    def __init__(self, path: Path):
        self.path = path
        self._f = open(path, "a", buffering=1)  # line-buffered: a reader (the console) sees whole lines

    def log(self, row: dict) -> None:
        self._f.write(json.dumps(row) + "\n")

    def sync(self) -> None:
        """Every line written so far on disk, not only in the page cache: a power loss after a checkpoint of
        step N then cannot leave metrics.jsonl without the rows up to N (the resumed run starts at N + 1)."""
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()


def _rows(path: Path) -> list[tuple[str, dict]]:
    """(line, row) of each whole line; a line a crash cut short (only ever the last) is left out."""
    out = []
    for ln in path.read_text().splitlines() if path.exists() else []:
        try:
            out.append((ln, json.loads(ln)))
        except json.JSONDecodeError:
            continue
    return out


def truncate_after(path: Path, step: int) -> None:
    """Keep the lines of steps <= `step` (rewritten atomically); -1 empties the file (a run that restarts
    without a checkpoint logs everything again, step 0's validation included)."""
    if not path.exists():
        return
    keep = [ln for ln, row in _rows(path) if row.get("step", 0) <= step]
    atomic_write(path, "".join(ln + "\n" for ln in keep))


def rows(path: Path) -> list[dict]:
    """The whole rows of a metrics file, in order."""
    return [row for _, row in _rows(path)]


def last_step(path: Path) -> int:
    """The highest step the file records (-1 for none): what an earlier attempt of the run has logged."""
    return max((row.get("step", 0) for _, row in _rows(path)), default=-1)


def wandb_mode() -> str:
    """W&B's mode for every run we start: WANDB_MODE when set, else online with an API key and offline
    without one (no account needed; `wandb sync` uploads later)."""
    return os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")


def held_offline(run_dir: Path, run_id: str) -> int:
    """The last step this run's local W&B transaction logs hold (every attempt's, offline or online); -1 for none."""
    logs = (run_dir / "wandb").glob(f"*-{run_id}/run-{run_id}.wandb")
    return max((wandb_last_step(f) for f in logs), default=-1)


CLOSE_WAIT_S = 60.0


class WandbSink(Sink):
    """One W&B run per run directory; its id is kept there so a resumed run continues the same run.
    Offline unless an API key is configured (no account needed; `wandb sync` uploads later).

    W&B keeps what it was sent, and a step can only follow the steps before it. So the sink sends only steps
    past `held`, the last one W&B holds of this run: for an online run the resumed run's last step on the
    server, for an offline one the last step its local transaction logs hold (`held_offline`; W&B writes a
    step there once a later one starts it or the run finishes). A restarted run replays its steps past the
    checkpoint; the steps W&B lacks below it come from metrics.jsonl (`Deferred`'s backlog), so each step
    reaches W&B once, in step order. Images are not in metrics.jsonl: one W&B lost below the checkpoint is
    not sent again."""

    def __init__(self, run_dir: Path, project: str, name: str, config: dict, unit: str = "tokens",
                 mode: str | None = None):
        import wandb

        id_file = run_dir / "wandb_id"
        if not id_file.exists():
            atomic_write(id_file, uuid.uuid4().hex[:12])
        run_id, mode = id_file.read_text().strip(), mode or wandb_mode()
        offline = mode in ("offline", "dryrun")
        self.held = held_offline(run_dir, run_id) if offline else -1  # read before this attempt's log exists
        self._offline, self._dir, self._id, self._sent = offline, run_dir, run_id, self.held
        self._run = wandb.init(
            project=project, name=name, id=run_id, resume="allow", dir=str(run_dir),
            config=redacted_tree(config), mode=mode, settings=wandb.Settings(console="off", silent=True),
        )
        if not offline and mode != "disabled":  # the server's: a resumed run starts at the step after its last
            self.held = self._run.starting_step - 1
        # Scaling-law views: loss against compute and against units of data (tokens, images), not only steps.
        self.unit = unit
        for x in ("flops", unit):
            self._run.define_metric(f"loss_vs_{x}/*", step_metric=x)
            self._run.define_metric(x)

    def log(self, row: dict) -> None:
        if row["step"] <= self.held:
            return
        data = {k: v for k, v in row.items() if k != "step"}
        if "loss" in row:
            data["loss_vs_flops/loss"] = data[f"loss_vs_{self.unit}/loss"] = row["loss"]
        self._run.log(data, step=row["step"])
        self._sent = max(self._sent, row["step"])

    def image(self, step: int, name: str, path: Path) -> None:
        import wandb

        if step > self.held:
            self._run.log({name: wandb.Image(str(path))}, step=step)

    def summary(self, values: dict) -> None:
        self._run.summary.update(values)

    def close(self) -> None:
        """Finish the run; offline, also wait (up to `CLOSE_WAIT_S`) until its log holds the last step sent: W&B's
        service may still be writing when `finish` returns, and the next attempt decides from that log."""
        self._run.finish()
        deadline = time.monotonic() + CLOSE_WAIT_S
        while self._offline and held_offline(self._dir, self._id) < self._sent and time.monotonic() < deadline:
            time.sleep(0.2)


def _warn(line: str) -> None:
    print(f"warning: {line}", file=sys.stderr, flush=True)


def open_wandb(run_dir: Path, project: str, name: str, config: dict, unit: str = "tokens") -> Sink:
    """The run's W&B sink, and never an error: a W&B that cannot start online (no network, a bad key) logs
    offline instead, one that cannot start at all leaves the run without W&B; either with one warning line."""
    mode = wandb_mode()
    for attempt in dict.fromkeys((mode, "offline")):  # online, then offline; offline once
        try:
            sink = WandbSink(run_dir, project, name, config, unit, mode=attempt)
        except Exception as e:  # noqa: BLE001 - W&B is a view of the run: no failure of it may stop the training
            why = f"{type(e).__name__}: {redact(first_line(e))}"
            if attempt == "offline":
                _warn(f"W&B could not start ({why}); this run logs to metrics.jsonl only")
                return Sink()
            _warn(f"W&B could not start {attempt} ({why}); logging offline instead (`wandb sync {run_dir}/wandb` "
                  "uploads it later)")
            continue
        return sink
    return Sink()


class Deferred(Sink):
    """A sink still being made on another thread (W&B's: wandb.init waits on its service process). Calls made
    before it is ready are kept in order and replayed once it is, so the first steps never wait for it;
    `close` waits for it, and an error its construction raised comes out of the first call after it failed.

    `backlog`: rows logged before this attempt (metrics.jsonl, cut back to the checkpoint), logged first: the
    sink keeps those it lacks (`WandbSink.held`), so rows an earlier attempt never got into W&B are sent."""

    def __init__(self, future: Future, backlog: list[dict] = ()):
        self._future, self._sink = future, None
        self._pending: list[tuple[str, tuple]] = [("log", (row,)) for row in backlog]

    def _call(self, name: str, *args) -> None:
        if self._sink is None and self._future.done():
            self._ready()
        if self._sink is None:
            self._pending.append((name, copy.deepcopy(args)))  # the caller may reuse what it passed
        else:
            getattr(self._sink, name)(*args)

    def _ready(self) -> Sink:
        if self._sink is None:
            self._sink = self._future.result()
            for name, args in self._pending:
                getattr(self._sink, name)(*args)
            self._pending = []
        return self._sink

    def log(self, row: dict) -> None:
        self._call("log", row)

    def image(self, step: int, name: str, path: Path) -> None:
        self._call("image", step, name, path)

    def summary(self, values: dict) -> None:
        self._call("summary", values)

    def close(self) -> None:
        self._ready().close()


class Fanout(Sink):
    def __init__(self, sinks: list[Sink]):
        self.sinks = sinks

    def log(self, row: dict) -> None:
        for s in self.sinks:
            s.log(row)

    def image(self, step: int, name: str, path: Path) -> None:
        for s in self.sinks:
            s.image(step, name, path)

    def summary(self, values: dict) -> None:
        for s in self.sinks:
            s.summary(values)

    def sync(self) -> None:
        for s in self.sinks:
            s.sync()

    def close(self) -> None:
        for s in self.sinks:
            s.close()
