"""Shared fixtures: seeds and dtype reset for every test, small real shards, one Ray per module, a real 1-rank
gloo group, and gloo ranks spawned as processes (tests.helpers.run_gloo_ranks)."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
import torch

from tests.helpers import make_fashion_shards, make_tiny_shards, run_gloo_ranks


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


@pytest.fixture(scope="session")
def fashion(tmp_path_factory) -> object:
    """train/ and val/ image shards of the first 480 training and 96 test images of Debian's Fashion-MNIST."""
    return make_fashion_shards(tmp_path_factory.mktemp("fashion"))


@pytest.fixture(scope="module")
def ray_local():
    """One embedded Ray per test module for in-process training runs (starting Ray costs seconds)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def one_rank_group(tmp_path_factory):
    """A real 1-rank gloo process group for a module (rendezvous through a file: no port to pick), with a
    worker's RANK/WORLD_SIZE/LOCAL_* variables. One per module: DeepSpeed keeps the world group it first saw,
    so a module-scoped engine needs the group to outlive each test."""
    import torch.distributed as dist

    with pytest.MonkeyPatch.context() as mp:
        for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}.items():
            mp.setenv(k, v)
        rendezvous = tmp_path_factory.mktemp("group") / "rendezvous"
        dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=0, world_size=1)
        from pretrain.train.engine import without_cpu_shm_op

        without_cpu_shm_op()  # as a run does: DeepSpeed's comm layer builds no CPU op
        try:
            yield
        finally:
            dist.destroy_process_group()
            from deepspeed.utils import groups

            groups._WORLD_GROUP = None  # the destroyed group: a later module's engine makes its own


@pytest.fixture
def gloo_ranks(tmp_path):
    """`gloo_ranks(fn, *args, world=2, timeout=600, env=None)`: `fn(rank, world, *args)` in spawned processes
    joined in one gloo group through a fresh rendezvous file under tmp_path (see tests.helpers.run_gloo_ranks);
    fails the test unless every rank exits with 0."""
    count = itertools.count()

    def run(fn, *args, **kwargs) -> None:
        run_gloo_ranks(fn, *args, rendezvous=tmp_path / f"rdzv-{next(count)}", **kwargs)
    return run
