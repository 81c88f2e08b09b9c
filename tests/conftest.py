"""Shared fixtures: seeds and dtype reset for every test, small real shards, one Ray per session."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from tests.helpers import make_tiny_shards


@pytest.fixture(autouse=True)
def _reset_state():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> object:
    """train/ and val/ webdataset shards (GPT-2 BPE, seq_len 32) of a small generated corpus."""
    return make_tiny_shards(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def ray_local():
    """One embedded Ray per test module for in-process training runs (starting Ray costs seconds)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield ray
    ray.shutdown()
