"""One-line errors: `raise fail("data.train: no index.json in shards/")` prints `error: ...` on stderr and
exits with the code (2: bad input; 1: a run that failed). And the line between an error and a failure
inside a run: a deterministic error (bad config, data, shapes) ends the run at once with its line; only
a lost worker or a broken collective is a failure that Ray Train retries (`cluster.max_failures`)."""

from __future__ import annotations

import typer


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print `error: <message>` on stderr; return the Exit to raise (so call sites read `raise fail(...)`)."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


class RunError(ValueError):
    """A deterministic error of a run: the same input fails the same way on a restart, so retrying it
    would only burn `cluster.max_failures` (forever with -1). One line naming the key, file or shard.
    Raise it (or a subclass) for new errors of this kind; the project's older error classes count too
    (`is_deterministic`)."""


class RunLockedError(RunError):
    """Another live run holds the run directory (`pretrain.launch.runlock`)."""


def _deterministic_classes() -> tuple[type[BaseException], ...]:
    # Imported here: each lives beside the code that raises it, and this module stays light (no torch).
    from pretrain.checkpoints.errors import CheckpointError
    from pretrain.config import ConfigError
    from pretrain.data.errors import DataError
    from pretrain.objectives import ObjectiveError
    from pretrain.train.checkpoint import CheckpointPickleError

    return RunError, ConfigError, DataError, ObjectiveError, CheckpointError, CheckpointPickleError


def is_deterministic(e: BaseException) -> bool:
    """Whether `e` is an error of the input (config, data, shapes, checkpoint contents) rather than of the
    machines: those would fail again on every restart."""
    return isinstance(e, _deterministic_classes())


# A deterministic error found on a worker travels to the driver as this file in the run directory
# (which the driver reads anyway: metrics.jsonl, summary.json). The worker writes it and returns
# normally, so Ray Train sees no failure and does not restart; the driver raises its line.
ERROR_FILE = "error.json"


def record_error(run_dir, e: BaseException, rank: int) -> None:
    """Write `e`'s one line where the driver looks (atomic: a reader never sees half of it)."""
    import json

    from pretrain.atomic import atomic_write

    line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    atomic_write(run_dir / ERROR_FILE, json.dumps({"error": line, "type": type(e).__name__, "rank": rank}) + "\n")


def recorded_error(run_dir) -> RunError | None:
    """The error a worker recorded in this run directory, as a RunError with its line; None if none."""
    import json

    f = run_dir / ERROR_FILE
    if not f.is_file():
        return None
    return RunError(json.loads(f.read_text())["error"])
