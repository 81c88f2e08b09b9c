"""Checks the driver runs before any worker starts: the data exists and agrees with itself, and the
objective accepts the data and the model (data kind, vocabulary, sequence length, attention).
Reads manifests only; raises DataError or ObjectiveError with one line naming the key or path."""

from __future__ import annotations

from pretrain.config import Config
from pretrain.data import validate_data
from pretrain.objectives import build_objective


def preflight(cfg: Config):
    """The run's objective, checked against its data and model."""

    objective = build_objective(cfg, validate_data(cfg.data))
    objective.check()
    return objective
