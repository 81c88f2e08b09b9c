"""Shards in object stores and over HTTP, read through library clients, never a shell.

A real S3-compatible server (moto's standalone server) on the loopback address holds shards written by
`pretrain data text`; the AWS_* standard variables point the client at it, as they would at AWS, MinIO
or Ceph. A small HTTP server on the loopback address misbehaves on purpose: it fails the first reads of
every path, fails for good, stalls mid-body, or serves changed bytes. A failed read is retried and then
"unreadable" (the run stops); only bytes that arrived and are wrong are "corrupt".
"""

from __future__ import annotations

import http.server
import json
import shutil
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pretrain.cli.data import app
from pretrain.config import DataConfig
from pretrain.data import DataError, build_train_stream, build_val_batches, validate_data
from tests.helpers import make_tiny_shards, moto_server

BUCKET = "shards"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """train/ and val/ shards written by `pretrain data text` (tests.helpers.make_tiny_shards)."""
    return make_tiny_shards(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def s3(tiny, tmp_path_factory):
    """moto's S3 server on a free loopback port, the AWS_* variables set for it while this module runs,
    and `tiny` uploaded to s3://shards/tiny/{train,val}/ with boto3."""
    with moto_server(tmp_path_factory.mktemp("aws")):
        import boto3

        client = boto3.client("s3")
        client.create_bucket(Bucket=BUCKET)
        for f in sorted(tiny.rglob("*")):
            if f.is_file():
                client.upload_file(str(f), BUCKET, f"tiny/{f.relative_to(tiny)}")
        yield client


def _named(path: str, name: str) -> dict:
    return {"path": path, "name": name}  # the same name gives the same sample order


def _rows(cfg: DataConfig, world_size: int, micro: int, mb: int = 4) -> list[tuple[list[str], np.ndarray]]:
    out = []
    for rank in range(world_size):
        s = build_train_stream(cfg, seed=3, rank=rank, world_size=world_size, micro_batch_size=mb, grad_accum=1)
        try:
            for _ in range(micro):
                b = next(s)
                out.append((b["keys"], b["input_ids"].numpy()))
        finally:
            s.close()
    return out


def _same(a, b) -> None:
    assert len(a) == len(b)
    for (ka, xa), (kb, xb) in zip(a, b, strict=True):
        assert ka == kb and np.array_equal(xa, xb)


def test_s3_source_reads_the_rows_of_its_local_copy(tiny, s3):
    """validate_data, the training stream (in two DataLoader workers) and the validation batches read
    s3://shards/tiny/train exactly as the local directory it was uploaded from."""
    local = DataConfig(train=_named(str(tiny / "train"), "tiny"), val=_named(str(tiny / "val"), "tiny-val"))
    remote = DataConfig(train=_named(f"s3://{BUCKET}/tiny/train", "tiny"),
                        val=_named(f"s3://{BUCKET}/tiny/val", "tiny-val"), num_workers=2)
    info = validate_data(remote)
    assert info == validate_data(local) and info["commands"] == []
    micro = info["train_samples"] // 8 + 3  # past the end of the first epoch
    _same(_rows(remote, 2, micro), _rows(local, 2, micro))
    for rank in range(2):
        a, b = (build_val_batches(c, rank=rank, world_size=2, micro_batch_size=2, max_batches=3)
                for c in (remote, local))
        assert [x["keys"] for x in a] == [x["keys"] for x in b]
        assert all(np.array_equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b, strict=True))


def test_remote_manifest_with_a_command_is_refused(tiny, s3, tmp_path, monkeypatch):
    """A shard name holding a shell command in a remote index.json is refused with one line naming the
    manifest and the shard, on the driver, in a worker and in `data inspect --verify`; nothing runs."""
    monkeypatch.chdir(tmp_path)
    evil = "a.tar; touch PWNED #"
    m = json.loads((tiny / "train" / "index.json").read_text())
    m["shards"][0]["name"] = evil
    s3.put_object(Bucket=BUCKET, Key="evil/train/index.json", Body=json.dumps(m).encode())
    s3.upload_file(str(tiny / "train" / "shard-000000.tar"), BUCKET, f"evil/train/{evil}")
    url = f"s3://{BUCKET}/evil/train"
    expect = f"manifest {url}/index.json lists shard {evil!r}, not a file name inside the source"
    cfg = DataConfig(train=url)
    for attempt in (lambda: validate_data(cfg),
                    lambda: build_train_stream(cfg, seed=0, rank=0, world_size=1, micro_batch_size=2, grad_accum=1)):
        with pytest.raises(DataError) as e:
            attempt()
        assert str(e.value).startswith(f"data.train: {expect}") and "\n" not in str(e.value)
    result = CliRunner().invoke(app, ["inspect", url, "--verify"])
    assert result.exit_code == 2 and result.stderr.strip().splitlines() == [
        f"error: directory: {expect} (letters, digits, '.', '_', '-', ending .tar)"]
    assert not list(tmp_path.rglob("PWNED")) and not (Path.cwd() / "PWNED").exists()


# ------------------------------------------------------------------------------------- a flaky HTTP server
class _Server(http.server.ThreadingHTTPServer):
    """Serves files under `root`; the first `fail_each` GETs of every path, and every GET of a path in
    `broken`, answer 500; a path in `stalled` sends half its body and then nothing."""

    daemon_threads, block_on_close = True, False

    def __init__(self, root: Path):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.root, self.release = root, threading.Event()
        self.reset()

    def reset(self) -> None:
        self.hits: Counter[str] = Counter()
        self.fail_each, self.broken, self.stalled = 0, set(), set()

    def url(self, rel: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/{rel}"


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's naming)
        srv: _Server = self.server
        srv.hits[self.path] += 1
        f = srv.root / self.path.lstrip("/")
        if srv.hits[self.path] <= srv.fail_each or self.path in srv.broken:
            self.send_error(500)
            return
        if not f.is_file():
            self.send_error(404)
            return
        data = f.read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.path in srv.stalled:
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            srv.release.wait(10)
            return
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def server(tiny, sources, tmp_path_factory):
    """The HTTP server over a root holding tiny/{train,val} and a many-shard copy of the prose source."""
    root = tmp_path_factory.mktemp("www")
    shutil.copytree(tiny, root / "tiny")
    shutil.copytree(sources["prose"], root / "prose" / "train")
    srv = _Server(root)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.release.set()
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def www(server):
    server.reset()
    yield server
    server.reset()


def test_shard_server_failing_twice_is_read_on_the_third(tiny, www):
    """Every path answers 500 twice, then its bytes: the manifest and the shards are read on the third
    attempt, and the run sees exactly the rows of the local copy."""
    www.fail_each = 2
    remote = DataConfig(train=_named(www.url("tiny/train"), "tiny"))
    local = DataConfig(train=_named(str(tiny / "train"), "tiny"))
    assert validate_data(remote)["train_samples"] == validate_data(local)["train_samples"]
    _same(_rows(remote, 1, 5), _rows(local, 1, 5))
    assert www.hits["/tiny/train/shard-000000.tar"] == 3 and www.hits["/tiny/train/index.json"] >= 3


def test_shard_that_never_reads_is_unreadable_not_corrupt(www, monkeypatch):
    """A shard that fails every attempt stops the run with one line naming it, even with
    data.skip_corrupt: skipping it would silently train on other data."""
    monkeypatch.setenv("PRETRAIN_READ_ATTEMPTS", "2")
    shard = "/prose/train/shard-000000.tar"
    www.broken = {shard}
    cfg = DataConfig(train=www.url("prose/train"), skip_corrupt=True)
    s = build_train_stream(cfg, seed=0, rank=0, world_size=1, micro_batch_size=4, grad_accum=1)
    with pytest.raises(DataError) as e:
        for _ in range(validate_data(cfg)["train_samples"] // 4 + 1):
            next(s)
    assert str(e.value).startswith(f"shard {www.url(shard[1:])}: unreadable after 2 attempts: 500")
    assert "\n" not in str(e.value) and www.hits[shard] == 2


def test_stalled_read_times_out_and_is_retried(www, monkeypatch):
    """A read that stalls mid-body ends after the per-read timeout, each attempt, instead of hanging."""
    monkeypatch.setenv("PRETRAIN_READ_ATTEMPTS", "2")
    monkeypatch.setenv("PRETRAIN_READ_TIMEOUT_S", "0.5")
    shard = "/tiny/train/shard-000000.tar"
    www.stalled = {shard}
    s = build_train_stream(DataConfig(train=www.url("tiny/train")), seed=0, rank=0, world_size=1,
                           micro_batch_size=4, grad_accum=1)
    t0 = time.time()
    with pytest.raises(DataError, match=r"unreadable after 2 attempts"):
        next(s)
    assert time.time() - t0 < 6 and www.hits[shard] == 2


def test_changed_bytes_are_corrupt_and_read_once(www, sources):
    """Bytes that arrive but differ from the manifest (one flipped, one shard cut short) are corrupt:
    read once, not retried, and skipped and counted with data.skip_corrupt; an error naming the shard
    without it."""
    d = www.root / "damaged" / "train"
    shutil.copytree(sources["prose"], d)
    raw = bytearray((d / "shard-000001.tar").read_bytes())
    raw[520] ^= 0xFF
    (d / "shard-000001.tar").write_bytes(bytes(raw))
    (d / "shard-000002.tar").write_bytes((d / "shard-000002.tar").read_bytes()[:1500])
    base = www.url("damaged/train")
    with pytest.raises(DataError, match=r"shard .*shard-00000[12]\.tar: (sha256 differs|1500 bytes)"):
        cfg = DataConfig(train=base)
        s = build_train_stream(cfg, seed=0, rank=0, world_size=1, micro_batch_size=4, grad_accum=1)
        for _ in range(validate_data(cfg)["train_samples"] // 4 + 1):
            next(s)
    www.reset()
    cfg = DataConfig(train=base, skip_corrupt=True)
    s = build_train_stream(cfg, seed=0, rank=0, world_size=1, micro_batch_size=4, grad_accum=1)
    for _ in range(validate_data(cfg)["train_samples"] // 4 + 1):
        next(s)
    assert s.stats()["corrupt_shards_skipped"] == 2
    assert s.state_dict()["corrupt_shards"] == [f"{base}/shard-000001.tar", f"{base}/shard-000002.tar"]
    assert www.hits["/damaged/train/shard-000001.tar"] == 1 and www.hits["/damaged/train/shard-000002.tar"] == 1
