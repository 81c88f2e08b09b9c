"""Kernel tests run the Triton kernels on CPU through the interpreter.

TRITON_INTERPRET=1 is set per test (and undone after), not at import: other test files in the same
process keep their own setting. That works in any import order because `pretrain.kernels` decorates its
kernels at launch time and avoids Triton's own @jit helpers (see kernels/_runtime.py).
"""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _triton_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield
