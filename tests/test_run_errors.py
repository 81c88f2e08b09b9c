"""Errors of the input end a run once: every one is a `RunError`, and one raised inside a worker of a real
2-worker Ray Train run with restarts to spare (`cluster.max_failures=3`) ends the run after one attempt with
its line; at the command line the same error is exit code 2 and one line."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest

from pretrain import errors
from pretrain.data.manifest import MANIFEST, write_manifest
from pretrain.data.shards import read_shard
from pretrain.errors import DataError, LengthError, RunError, StorageError, is_deterministic
from pretrain.load import load_config
from tests.data.test_token_range import rewrite_sample, set_value
from tests.test_faults import workers_seen_while
from tests.test_train import TINY

ROOT = Path(__file__).resolve().parents[1]


def test_every_error_of_the_input_is_a_run_error_and_nothing_else_is():
    """The taxonomy is the class tree, not a list: each error class of pretrain.errors is a RunError."""
    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, BaseException)]
    assert len(classes) >= 12 and all(issubclass(c, RunError) for c in classes)
    assert is_deterministic(StorageError("x")) and is_deterministic(LengthError("x"))
    assert not is_deterministic(RuntimeError("a lost worker")) and not is_deterministic(OSError("a store"))


def _cfg(tmp_path: Path, shards: Path, *extra: str):
    return load_config(ROOT / "configs/gpt-tiny.yaml", [
        *TINY, f"run.dir={tmp_path / 'runs'}", "run.name=bad", "train.steps=4", f"data.train={shards / 'train'}",
        f"data.val={shards / 'val'}", "cluster.workers=2", "cluster.max_failures=3", *extra])


@pytest.mark.slow
@pytest.mark.ray
def test_a_storage_error_in_a_worker_ends_the_run_once(tmp_path, tiny_shards):
    """A checkpoint location the workers cannot open (on a cluster: a worker image without that filesystem's
    library): each worker raises StorageError; the group is not restarted although 3 restarts are allowed."""
    error, seen = _run_workers(tmp_path, _cfg(tmp_path, tiny_shards, "cluster.storage=nosuch://bucket/ckpts"))
    assert str(error) == ("nosuch://bucket/ckpts/bad/checkpoints: cannot open this checkpoint location "
                          "(Protocol not known: nosuch)")
    assert len(seen) <= 2, f"restarted: {len(seen)} worker processes"


def _run_workers(tmp_path: Path, cfg) -> tuple[RunError, set[int]]:
    """The run's worker function on a 2-worker Ray Train group, as launch would start it but without the driver's
    own checks (launch opens the storage before Ray starts), Ray keeping its metadata locally: (the error the
    workers recorded, every worker process seen). Ray Train must have counted no failure."""
    import ray

    from pretrain.config import run_dir
    from pretrain.launch.local import ray_trainer, resolve_paths
    from pretrain.launch.worker_error import recorded_error

    cfg = resolve_paths(cfg)
    run_dir(cfg).mkdir(parents=True)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        trainer = ray_trainer(cfg, {"cfg": cfg.model_dump(mode="json"), "started_at": time.time(), "marks": [],
                                    "steps": 4}, storage_path=str(tmp_path / "ray"))
        raised: list = []
        thread = threading.Thread(target=lambda: _fit(trainer, raised), daemon=True)
        thread.start()
        seen = workers_seen_while(thread)
    finally:
        ray.shutdown()
    assert raised == [], raised  # returned normally: Ray Train counted no failure
    error = recorded_error(run_dir(cfg))
    assert isinstance(error, RunError)
    return error, seen


def _negative_member_size(train: Path) -> str:
    """Give the second member of the first shard of `train` a negative size (header checksum fixed), with the
    manifest's sha256 updated to the new bytes, as a crafted manifest would; returns the shard's path."""
    m = json.loads((train / MANIFEST).read_text())
    entry = m["shards"][0]
    path = train / entry["name"]
    data = path.read_bytes()
    at = tarfile.open(fileobj=io.BytesIO(data)).getmembers()[1].offset
    h = bytearray(data[at:at + 512])
    h[124:136], h[148:156] = b"-0000001000\0", b" " * 8
    h[148:156] = b"%06o\0 " % sum(h)
    data = data[:at] + bytes(h) + data[at + 512:]
    path.write_bytes(data)
    entry["sha256"] = hashlib.sha256(data).hexdigest()
    write_manifest(train, m)
    return str(path)


def _bad_shards(tmp_path: Path, tiny_shards: Path, case: str) -> tuple[Path, str]:
    """A copy of the tiny shards whose training shard holds a token id past every vocabulary ("id") or a
    corrupt tar ("tar"), and the line reading it gives."""
    root = tmp_path / "shards"
    shutil.copytree(tiny_shards / "val", root / "val")
    if case == "id":
        path, key = rewrite_sample(tiny_shards / "train", root / "train", 0, 3, set_value("tokens.u16", "<u2", 5, 60000))
        return root, (f"shard {path}: sample {key} has token id 60000 at position 5, outside [0, 50257) of the "
                      f"manifest's vocab_size")
    shutil.copytree(tiny_shards / "train", root / "train")
    path = _negative_member_size(root / "train")
    entry = json.loads((root / "train" / MANIFEST).read_text())["shards"][0]
    with pytest.raises(DataError) as e:
        read_shard(path, sha256=entry["sha256"], nbytes=entry["bytes"], label=path)
    return root, str(e.value)


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.parametrize("case", ["id", "tar"])
def test_a_bad_shard_in_a_worker_ends_the_run_once(tmp_path, tiny_shards, case):
    """A token id past the model's embedding (a device-side assert on a GPU, which Ray would retry as a lost
    machine) or a tar with a negative member size, in the one training shard both workers read: each worker
    raises DataError; the group is not restarted although 3 restarts are allowed, and the run's error is
    the reader's line."""
    shards, line = _bad_shards(tmp_path, tiny_shards, case)
    assert line.startswith(f"shard {shards / 'train'}/shard-")
    error, seen = _run_workers(tmp_path, _cfg(tmp_path, shards))
    assert str(error) == line
    assert len(seen) <= 2, f"restarted: {len(seen)} worker processes"


def _fit(trainer, raised: list) -> None:
    try:
        trainer.fit()
    except BaseException as e:  # noqa: BLE001 - reported by the test
        raised.append(e)


def test_pretrain_train_exits_2_with_one_line_on_a_bad_storage(tmp_path, tiny_shards):
    """The driver opens the location before anything is written or Ray starts: exit 2, one line, no run directory."""
    r = subprocess.run([sys.executable, "-m", "pretrain.cli", "train", str(ROOT / "configs/gpt-tiny.yaml"), *TINY,
                        f"run.dir={tmp_path / 'runs'}", f"data.train={tiny_shards / 'train'}",
                        f"data.val={tiny_shards / 'val'}", "cluster.max_failures=3",
                        "cluster.storage=nosuch://bucket/ckpts"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith("[")]
    assert lines == ["error: nosuch://bucket/ckpts: cannot open this checkpoint location (Protocol not known: nosuch)"], r.stderr
    assert not (tmp_path / "runs").exists()  # nothing written: no run directory, no lock
