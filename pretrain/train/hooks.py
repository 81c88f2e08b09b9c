"""Hooks: what runs beside the training step, attached to the one loop as (every N steps, function)
(levanter's `add_hook`). Logging, evaluation, checkpoints and the end-of-run artefact are hooks; EMA
and sample grids attach the same way. Hooks run in the order they were added, on every rank (a hook
that writes files checks the rank itself; one that evaluates is a collective).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Hook:
    fn: Callable[[Any], None]  # called with the loop's state
    every: int  # on steps that are multiples of this (0: never on a schedule)
    at_end: bool = True  # also after the last step
    at_start: bool = False  # also at step 0 of a run that starts fresh


class Hooks:
    def __init__(self) -> None:
        self._hooks: list[Hook] = []

    def add(self, fn: Callable[[Any], None], every: int, *, at_end: bool = True, at_start: bool = False) -> None:
        self._hooks.append(Hook(fn, every, at_end, at_start))

    def extend(self, hooks: list[Hook]) -> None:
        self._hooks.extend(hooks)

    def start(self, state: Any) -> None:
        for h in self._hooks:
            if h.at_start:
                h.fn(state)

    def after_step(self, state: Any, step: int, last: bool) -> None:
        for h in self._hooks:
            if (h.every and step % h.every == 0) or (last and h.at_end):
                h.fn(state)
