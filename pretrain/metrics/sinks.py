"""Where metrics go: metrics.jsonl, a W&B run, or nowhere (ranks other than 0).

Every sink takes one flat dict per event (`{"step": ..., "loss": ...}` or `{"step": ..., "val_loss": ...}`).
The JSONL file is the source of truth for resume: `truncate_after(step)` drops lines past a checkpoint
(all of them without one) so a restarted run writes each step exactly once; the W&B sink skips the
steps an earlier attempt already sent (`last_step`).
"""

from __future__ import annotations

import copy
import json
import os
import uuid
from concurrent.futures import Future
from pathlib import Path

from pretrain.atomic import atomic_write
from pretrain.redact import redacted_tree


class Sink:
    def log(self, row: dict) -> None: ...
    def image(self, step: int, name: str, path: Path) -> None: ...  # a PNG already written to the run dir
    def summary(self, values: dict) -> None: ...
    def close(self) -> None: ...


class JsonlSink(Sink):
    def __init__(self, path: Path):
        self.path = path
        self._f = open(path, "a", buffering=1)  # line-buffered: a reader (the console) sees whole lines

    def log(self, row: dict) -> None:
        self._f.write(json.dumps(row) + "\n")

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


def last_step(path: Path) -> int:
    """The highest step the file records (-1 for none): what an earlier attempt of the run has logged."""
    return max((row.get("step", 0) for _, row in _rows(path)), default=-1)


def wandb_mode() -> str:
    """W&B's mode for every run we start: WANDB_MODE when set, else online with an API key and offline
    without one (no account needed; `wandb sync` uploads later)."""
    return os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")


class WandbSink(Sink):
    """One W&B run per run directory; its id is kept there so a resumed run continues the same run.
    Offline unless an API key is configured (no account needed; `wandb sync` uploads later).

    W&B keeps what it was sent: metrics.jsonl can be cut back to the checkpoint, a W&B run cannot (and
    an offline one does not even know its earlier steps). So after a restart the steps up to
    `logged_through` (the last one an earlier attempt logged) are not sent again; a resumed run
    reproduces them exactly, so nothing is lost, and each step appears once, in step order."""

    def __init__(self, run_dir: Path, project: str, name: str, config: dict, unit: str = "tokens",
                 logged_through: int = -1):
        import wandb

        self.logged_through = logged_through

        id_file = run_dir / "wandb_id"
        if not id_file.exists():
            atomic_write(id_file, uuid.uuid4().hex[:12])
        mode = wandb_mode()
        self._run = wandb.init(
            project=project, name=name, id=id_file.read_text().strip(), resume="allow", dir=str(run_dir),
            config=redacted_tree(config), mode=mode, settings=wandb.Settings(console="off", silent=True),
        )
        # Scaling-law views: loss against compute and against units of data (tokens, images), not only steps.
        self.unit = unit
        for x in ("flops", unit):
            self._run.define_metric(f"loss_vs_{x}/*", step_metric=x)
            self._run.define_metric(x)

    def log(self, row: dict) -> None:
        if row["step"] <= self.logged_through:
            return
        data = {k: v for k, v in row.items() if k != "step"}
        if "loss" in row:
            data["loss_vs_flops/loss"] = data[f"loss_vs_{self.unit}/loss"] = row["loss"]
        self._run.log(data, step=row["step"])

    def image(self, step: int, name: str, path: Path) -> None:
        import wandb

        if step > self.logged_through:
            self._run.log({name: wandb.Image(str(path))}, step=step)

    def summary(self, values: dict) -> None:
        self._run.summary.update(values)

    def close(self) -> None:
        self._run.finish()


class Deferred(Sink):
    """A sink still being made on another thread (W&B's: wandb.init waits on its service process). Calls made
    before it is ready are kept in order and replayed once it is, so the first steps never wait for it;
    `close` waits for it, and an error its construction raised comes out of the first call after it failed."""

    def __init__(self, future: Future):
        self._future, self._sink, self._pending = future, None, []

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

    def close(self) -> None:
        for s in self.sinks:
            s.close()
