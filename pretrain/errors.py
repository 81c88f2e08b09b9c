"""The error taxonomy: every error of the input is a `RunError`, and nothing else is.

An error of the input (config, data, objective, checkpoint contents, storage, run length, scaling, plan,
resume, a pickle nobody vouched for) fails the same way on every restart: it ends a run once, with its one
line, exit code 2, and is never retried. Anything else raised inside a run (a lost worker, a broken
collective, a store that did not answer) is a failure of the machines, which Ray Train retries up to
`cluster.max_failures`. So "retry or stop" is one `isinstance`, never a list.

A leaf: this module imports nothing of the project (the layer contract in pyproject.toml checks it).
"""

from __future__ import annotations


class RunError(ValueError):
    """An error of the input: one line naming the key, file, shard or value. Never retried."""


class ConfigError(RunError):
    """A bad config file, key or value (`pretrain.config`); the line names the key."""


class PlanError(ConfigError):
    """A run that cannot fit the named GPU (`pretrain plan`, `pretrain submit`)."""


class DataError(RunError):
    """Bad data (missing path, corrupt shard, mismatched manifest or tokenizer); the line names it."""


class ObjectiveError(RunError):
    """The data or the model does not fit the objective; the line names the key."""


class CheckpointError(RunError):
    """A released checkpoint we refuse (missing shard, shape against config.json, unsupported setting or GGUF
    architecture, tokenizer larger than the model's vocabulary); the line names the file and the field."""


class CheckpointPickleError(RunError):
    """A training-checkpoint file that would have to be unpickled without the user's opt-in."""


class ResumeError(RunError):
    """No checkpoint where one was asked for (`checkpoint.branch_from`), or one that cannot be resumed."""


class StorageError(RunError):
    """A `cluster.storage` location we cannot use (unknown scheme, missing client library)."""


class LengthError(RunError):
    """A run length that cannot be met (tokens or FLOPs that buy no step, a model whose FLOPs are unknown)."""


class ScalingError(RunError):
    """Bad input to a scaling fit or ladder (missing columns, too few runs, mixed data)."""


class RunLockedError(RunError):
    """Another live run holds the run directory or the storage prefix (`pretrain.launch.runlock`)."""


class LockLostError(RunLockedError):
    """This run's lock was taken over while it ran (it stalled past the stale limit): it stops and writes nothing
    more (`pretrain.train.owner`)."""


def is_deterministic(e: BaseException) -> bool:
    """Whether `e` is an error of the input, which a restart would only repeat."""
    return isinstance(e, RunError)


def first_line(e: BaseException | str) -> str:
    """The first non-empty line of an error (or its class name when it has no message): what a one-line
    report shows."""
    text = str(e).strip()
    if not text:
        return type(e).__name__ if isinstance(e, BaseException) else ""
    return text.splitlines()[0].strip()
