"""Bad input: every failure is a DataError naming the shard, path or setting, raised within seconds."""

from __future__ import annotations

import json
import shutil
import time

import pytest
from typer.testing import CliRunner

from pretrain.cli.data import app
from pretrain.config import DataConfig
from pretrain.data import DataError, build_train_stream, tokenizer_for, validate_data
from tests.data.conftest import write_source


def _copy(src, tmp_path):
    d = tmp_path / "copy"
    shutil.copytree(src, d)
    return d


def _drain_epoch(cfg: DataConfig, n: int) -> list:
    s = build_train_stream(cfg, seed=0, rank=0, world_size=1, micro_batch_size=4, grad_accum=1)
    try:
        return [next(s) for _ in range(-(-n // 4))]
    finally:
        s.close()


def test_validate_reports(sources):
    info = validate_data(DataConfig(train=str(sources["prose"]), val=str(sources["val"])))
    m = json.loads((sources["prose"] / "index.json").read_text())
    assert info == {"kind": "tokens", "seq_len": 16, "tokenizer": "gpt2", "vocab_size": 50257, "train_samples": m["samples"],
                    "val_samples": json.loads((sources["val"] / "index.json").read_text())["samples"], "commands": []}


def test_missing_directory_and_manifest(sources, tmp_path):
    with pytest.raises(DataError, match=r"^data.train: no such directory: runs/x$"):
        validate_data(DataConfig(train="runs/x"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"^data.val: no manifest .*empty/index.json"):
        validate_data(DataConfig(train=str(sources["prose"]), val=str(tmp_path / "empty")))


def test_empty_shard_list(sources, tmp_path):
    d = _copy(sources["prose"], tmp_path)
    m = json.loads((d / "index.json").read_text())
    m["shards"] = []
    (d / "index.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match="lists no shards"):
        validate_data(DataConfig(train=str(d)))


@pytest.mark.parametrize("change", ["truncate", "delete"])
def test_manifest_not_matching_shards(sources, tmp_path, change):
    d = _copy(sources["prose"], tmp_path)
    shard = d / "shard-000003.tar"
    if change == "truncate":
        shard.write_bytes(shard.read_bytes()[:1500])
    else:
        shard.unlink()
    with pytest.raises(DataError, match="shard-000003.tar"):
        validate_data(DataConfig(train=str(d)))


@pytest.mark.parametrize("sha256", [None, "", "0" * 63, 12])
def test_shard_without_sha256_is_refused_everywhere(sources, tmp_path, sha256):
    """Without a sha256 a changed shard would be read unchecked: the driver, a worker and `data inspect
    --verify` refuse the manifest with one line naming the shard (inspect used to end in a KeyError)."""
    d = _copy(sources["prose"], tmp_path)
    m = json.loads((d / "index.json").read_text())
    if sha256 is None:
        del m["shards"][1]["sha256"]
    else:
        m["shards"][1]["sha256"] = sha256
    (d / "index.json").write_text(json.dumps(m))
    want = r"data.train: manifest .*index.json: shard shard-000001.tar has no sha256 \(64 hex digits\)"
    cfg = DataConfig(train=str(d))
    with pytest.raises(DataError, match=want):
        validate_data(cfg)
    with pytest.raises(DataError, match=want):
        build_train_stream(cfg, seed=0, rank=0, world_size=1, micro_batch_size=4, grad_accum=1)
    result = CliRunner().invoke(app, ["inspect", str(d), "--verify"])
    assert result.exit_code == 2 and result.exception is not None and not isinstance(result.exception, KeyError)
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "shard shard-000001.tar has no sha256" in lines[0], result.output


def test_flipped_bytes_named_within_seconds(sources, tmp_path):
    """A flipped payload byte leaves a valid tar: the sha256 check names the shard."""
    d = _copy(sources["prose"], tmp_path)
    shard = d / "shard-000002.tar"
    raw = bytearray(shard.read_bytes())
    raw[520] ^= 0xFF  # inside the first sample's tokens
    shard.write_bytes(bytes(raw))
    cfg = DataConfig(train=str(d))
    n = validate_data(cfg)["train_samples"]  # sizes still match: the manifest check cannot see it
    t0 = time.time()
    with pytest.raises(DataError, match=r"shard .*shard-000002\.tar: sha256"):
        _drain_epoch(cfg, n)
    assert time.time() - t0 < 10


def test_corrupt_header_named_with_workers(sources, tmp_path):
    d = _copy(sources["prose"], tmp_path)
    shard = d / "shard-000001.tar"
    raw = bytearray(shard.read_bytes())
    raw[100:140] = b"\x00garbage" * 5  # inside a tar header: the tar itself is broken
    shard.write_bytes(bytes(raw))
    cfg = DataConfig(train=str(d), num_workers=2)
    t0 = time.time()
    with pytest.raises(DataError, match=r"shard-000001\.tar") as e:
        _drain_epoch(cfg, validate_data(cfg)["train_samples"])
    assert "\n" not in str(e.value) and time.time() - t0 < 10


def test_corrupt_shard_skipped_and_counted(sources, tmp_path):
    d = _copy(sources["prose"], tmp_path)
    raw = bytearray((d / "shard-000002.tar").read_bytes())
    raw[520] ^= 0xFF
    (d / "shard-000002.tar").write_bytes(bytes(raw))
    cfg = DataConfig(train=str(d), skip_corrupt=True)
    n = validate_data(cfg)["train_samples"]
    s = build_train_stream(cfg, seed=0, rank=0, world_size=1, micro_batch_size=4, grad_accum=1)
    keys = [k for _ in range(-(-n // 4)) for k in next(s)["keys"]]
    bad = {f"{i:010d}" for i in range(24, 36)}  # shard 2 holds samples 24..35 (12 per shard)
    assert not bad & set(keys)
    assert s.stats()["corrupt_shards_skipped"] == 1
    assert s.state_dict()["corrupt_shards"] == [str(d / "shard-000002.tar")]


def test_sources_must_agree(sources, tmp_path):
    other = write_source(tmp_path, "long", seed=3, seq_len=24) / "train"
    with pytest.raises(DataError, match=r"data.train\[1\]: .* another seq_len"):
        validate_data(DataConfig(train=[str(sources["prose"]), str(other)]))


def test_tokenizer_differs_from_manifest(sources, tmp_path):
    d = _copy(sources["prose"], tmp_path)
    m = json.loads((d / "index.json").read_text())
    m["tokenizer_sha256"] = "0" * 64
    (d / "index.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match="tokenizer gpt2 differs"):
        tokenizer_for(DataConfig(train=str(d)))
    with pytest.raises(DataError, match="another tokenizer"):
        validate_data(DataConfig(train=[str(sources["prose"]), str(d)]))


@pytest.mark.parametrize("name", ["-x.json", "--version.json", "-.json", "--files-from=t.json"])
def test_option_like_tokenizer_name_is_refused(sources, tmp_path, monkeypatch, name):
    """A user's `pipe:` source finds its tokenizer by putting the manifest's tokenizer name where the shard's
    was (`pipe:cat shard-000000.tar` -> `pipe:cat tokenizer.json`): a name starting with '-' would reach the
    command as an option. It is refused in one line wherever the manifest is read."""
    d = _copy(sources["prose"], tmp_path)
    m = json.loads((d / "index.json").read_text())
    m["tokenizer"] = name
    (d / "index.json").write_text(json.dumps(m))
    monkeypatch.chdir(d)
    want = rf"^data.train: manifest .*index.json names tokenizer '{name}', neither 'gpt2' nor a file name"
    pipe = DataConfig(train=f"pipe:cat shard-{{000000..{len(m['shards']) - 1:06d}}}.tar")
    for attempt in (lambda: validate_data(DataConfig(train=str(d))), lambda: validate_data(pipe),
                    lambda: tokenizer_for(pipe)):
        with pytest.raises(DataError, match=want) as e:
            attempt()
        assert "\n" not in str(e.value)
    result = CliRunner().invoke(app, ["inspect", str(d)])
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, result.output
