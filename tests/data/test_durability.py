"""Writers go through `pretrain.atomic` (durable, no temporaries left) and sources through `pretrain.urls`."""

from __future__ import annotations

import json

import pytest

from pretrain.config import DataConfig
from pretrain.data import load_tokenizer, tokenizer_for, validate_data
from pretrain.data import shards as shards_mod
from pretrain.data import write_text as wt
from pretrain.data.manifest import resolve
from tests.helpers import write_corpus

KW = dict(seq_len=16, shard_bytes=8 << 10, workers=1)


def _files(d) -> dict:
    return {p.relative_to(d): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_shards_renamed_durably_and_no_temporaries_left(tmp_path, monkeypatch):
    synced = []
    monkeypatch.setattr(shards_mod, "fsync_dir", lambda d: synced.append(d))
    files = [str(f) for f in write_corpus(tmp_path / "c", n_docs=3, words_per_doc=400)]
    m = wt.write_text(files, tokenizer="gpt2", out=tmp_path / "o", **KW)["train"]
    d = tmp_path / "o" / "train"
    assert synced == [d] * len(m["shards"])  # the directory fsynced after every shard's rename
    assert not [p for p in d.iterdir() if "tmp" in p.name]
    assert (d / "index.json").read_text() == json.dumps(m, indent=1, sort_keys=True) + "\n"


def test_temporaries_of_a_killed_run_are_swept(tmp_path):
    files = [str(f) for f in write_corpus(tmp_path / "c", n_docs=3, words_per_doc=400)]
    wt.write_text(files, tokenizer="gpt2", out=tmp_path / "clean", **KW)
    d = tmp_path / "x" / "train"
    d.mkdir(parents=True)
    for name in (".progress.json.tmp-abc123", ".index.json.tmp-x9", "progress.json.tmp", "index.json.tmp",
                 "shard-000000.tar.tmp", "shard-000042.tar.tmp"):
        (d / name).write_bytes(b"torn")
    wt.write_text(files, tokenizer="gpt2", out=tmp_path / "x", **KW)
    assert _files(tmp_path / "x") == _files(tmp_path / "clean")


@pytest.mark.parametrize("tail", ["", " /dev/null"])
def test_tokenizer_json_found_beside_pipe_shards(tmp_path, tail):
    """A `pipe:` source finds its tokenizer.json like its manifest: the shard's file name replaced in the
    command (`pipe:aws s3 cp s3://b/t/shard-000000.tar -` keeps its `-`), not by cutting at the last '/'."""
    tok_file = tmp_path / "tok.json"
    load_tokenizer("gpt2").save(str(tok_file))
    files = [str(f) for f in write_corpus(tmp_path / "c", n_docs=3, words_per_doc=400)]
    wt.write_text(files, tokenizer=str(tok_file), out=tmp_path / "o", **KW)
    d = tmp_path / "o" / "train"
    n = len(json.loads((d / "index.json").read_text())["shards"])
    path = f"pipe:cat {d}/shard-{{000000..{n - 1:06d}}}.tar{tail}"
    assert not resolve(path, None, "data.train").local
    cfg = DataConfig(train=path)
    assert validate_data(cfg)["tokenizer"] == f"pipe:cat {d}/tokenizer.json{tail}"
    assert tokenizer_for(cfg).to_str() == load_tokenizer(str(tok_file)).to_str()
    local = DataConfig(train=f"{d}/shard-{{000000..{n - 1:06d}}}.tar")
    assert validate_data(local)["tokenizer"] == f"{d}/tokenizer.json"
    assert tokenizer_for(local).to_str() == tokenizer_for(cfg).to_str()
