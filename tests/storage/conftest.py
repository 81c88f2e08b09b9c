"""Fixtures of the storage tests: a real S3-compatible server on the loopback address (the 1-rank group,
`one_rank_group`, is tests/conftest.py's).

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

