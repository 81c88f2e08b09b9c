"""Kernel tests run the Triton kernels on CPU through the interpreter, or on a GPU when asked.

TRITON_INTERPRET=1 is set per test (and undone after), not at import: other test files in the same
process keep their own setting. That works in any import order because `pretrain.kernels` decorates its
kernels at launch time and avoids Triton's own @jit helpers (see kernels/_runtime.py).

PRETRAIN_TEST_DEVICE=cuda runs the tests that take the `kernel_device` fixture (the forward and backward
comparisons with the references) on the GPU with compiled kernels, the interpreter off: the only way the
kernels meet real hardware in the test suite (`tools/gpu_check.sh` sets it). Tests without the fixture
keep the interpreter on CPU tensors, so one run covers both.
"""

from __future__ import annotations

import os

import pytest
import torch

DEVICE = os.environ.get("PRETRAIN_TEST_DEVICE", "cpu")


def pytest_configure(config):
    if DEVICE not in ("cpu", "cuda"):
        raise pytest.UsageError(f"PRETRAIN_TEST_DEVICE={DEVICE!r}: want cpu or cuda")
    if DEVICE == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("PRETRAIN_TEST_DEVICE=cuda but torch sees no CUDA device")


@pytest.fixture
def kernel_device() -> torch.device:
    """Where the device-aware kernel tests put their tensors (PRETRAIN_TEST_DEVICE, default cpu)."""
    return torch.device(DEVICE)


@pytest.fixture(autouse=True)
def _triton_interpreter(request, monkeypatch):
    if DEVICE != "cpu" and "kernel_device" in request.fixturenames:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # compiled kernels on the GPU
    else:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield
