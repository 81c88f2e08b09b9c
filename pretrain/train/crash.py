"""Crash injection for the tests: PRETRAIN_CKPT_CRASH=<point> raises at that point of a checkpoint save (in its upload
thread, pretrain/train/checkpoint.py), leaving the location as a crash there would."""

from __future__ import annotations

import os

CRASH_ENV = "PRETRAIN_CKPT_CRASH"
# The points, in the order a save passes them:
CRASH_POINTS = ("after-rank-files", "after-meta", "before-latest", "after-latest", "pruning")


class InjectedCrash(RuntimeError):
    """The crash a test asked for."""


def crash_point(name: str) -> None:
    if os.environ.get(CRASH_ENV) == name:
        raise InjectedCrash(f"injected crash at {name}")
