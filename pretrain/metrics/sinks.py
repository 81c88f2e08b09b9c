"""Where metrics go: metrics.jsonl, a W&B run, or nowhere (ranks other than 0).

Every sink takes one flat dict per event (`{"step": ..., "loss": ...}` or `{"step": ..., "val_loss": ...}`).
The JSONL file is the source of truth for resume: `truncate_after(step)` drops lines past a checkpoint
so a resumed run writes each step exactly once.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

from pretrain.atomic import atomic_write


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


def truncate_after(path: Path, step: int) -> None:
    """Keep the lines of steps <= `step` (rewritten atomically)."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
    atomic_write(path, "".join(ln + "\n" for ln in keep))


class WandbSink(Sink):
    """One W&B run per run directory; its id is kept there so a resumed run continues the same run.
    Offline unless an API key is configured (no account needed; `wandb sync` uploads later)."""

    def __init__(self, run_dir: Path, project: str, name: str, config: dict, unit: str = "tokens"):
        import wandb

        id_file = run_dir / "wandb_id"
        if not id_file.exists():
            atomic_write(id_file, uuid.uuid4().hex[:12])
        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        self._run = wandb.init(
            project=project, name=name, id=id_file.read_text().strip(), resume="allow", dir=str(run_dir),
            config=config, mode=mode, settings=wandb.Settings(console="off", silent=True),
        )
        # Scaling-law views: loss against compute and against units of data (tokens, images), not only steps.
        self.unit = unit
        for x in ("flops", unit):
            self._run.define_metric(f"loss_vs_{x}/*", step_metric=x)
            self._run.define_metric(x)

    def log(self, row: dict) -> None:
        data = {k: v for k, v in row.items() if k != "step"}
        if "loss" in row:
            data["loss_vs_flops/loss"] = data[f"loss_vs_{self.unit}/loss"] = row["loss"]
        self._run.log(data, step=row["step"])

    def image(self, step: int, name: str, path: Path) -> None:
        import wandb

        self._run.log({name: wandb.Image(str(path))}, step=step)

    def summary(self, values: dict) -> None:
        self._run.summary.update(values)

    def close(self) -> None:
        self._run.finish()


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
