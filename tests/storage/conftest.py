"""Fixtures of the storage tests: a real S3-compatible server on the loopback address, and a 1-rank group.

The server is moto's standalone one (`python -m moto.server`), started on a free port for the session; the
AWS_* standard variables point every client at it (s3fs here, and the Ray workers a test starts after it,
which inherit this process's environment), as they would at AWS, MinIO or Ceph.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request

import pytest

BUCKET = "ckpt"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _clear_s3_clients() -> None:
    # fsspec caches client instances by their arguments, not by the environment: one made for another
    # endpoint must not be reused.
    from s3fs import S3FileSystem

    S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="session")
def s3_bucket(tmp_path_factory):
    """`s3://ckpt` on a moto server of this session; yields the bucket's URL."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    none = tmp_path_factory.mktemp("aws") / "none"  # no user's ~/.aws config or profile leaks in
    with pytest.MonkeyPatch.context() as mp:
        for name, value in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
                            "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                            "AWS_CONFIG_FILE": str(none), "AWS_SHARED_CREDENTIALS_FILE": str(none)}.items():
            mp.setenv(name, value)
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
            mp.delenv(name, raising=False)
        try:
            deadline = time.time() + 30
            while True:
                try:
                    urllib.request.urlopen(endpoint, timeout=1).close()
                    break
                except OSError:
                    if time.time() > deadline or proc.poll() is not None:
                        raise RuntimeError("moto server did not start") from None
                    time.sleep(0.2)
            _clear_s3_clients()
            import boto3

            boto3.client("s3").create_bucket(Bucket=BUCKET)
            yield f"s3://{BUCKET}"
        finally:
            _clear_s3_clients()
            proc.terminate()
            proc.wait(timeout=10)


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
        try:
            yield
        finally:
            dist.destroy_process_group()
            from deepspeed.utils import groups

            groups._WORLD_GROUP = None  # the destroyed group: a later module's engine makes its own
