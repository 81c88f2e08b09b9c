"""Fixtures of the storage tests: a real S3-compatible server on the loopback address, and a 1-rank group.

The server is moto's standalone one (`python -m moto.server`), started on a free port for the session; the
AWS_* standard variables point every client at it (s3fs here, and the Ray workers a test starts after it,
which inherit this process's environment), as they would at AWS, MinIO or Ceph.
"""

from __future__ import annotations

import pytest

from tests.helpers import moto_server

BUCKET = "ckpt"


@pytest.fixture(scope="session")
def s3_bucket(tmp_path_factory):
    """`s3://ckpt` on a moto server of this session; yields the bucket's URL."""
    with moto_server(tmp_path_factory.mktemp("aws")):
        import boto3

        boto3.client("s3").create_bucket(Bucket=BUCKET)
        yield f"s3://{BUCKET}"


@pytest.fixture(scope="module")
def one_rank_group(tmp_path_factory):
    """A real 1-rank gloo process group for a module (rendezvous through a file: no port to pick). One per
    module: DeepSpeed keeps the world group it first saw, so a new group per test would not reach it."""
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
