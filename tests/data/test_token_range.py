"""Token ids and targets outside the manifest's vocabulary are errors of the input: reading such a shard ends
in one DataError line naming the shard, the sample, the value and vocab_size, since an id past the embedding
would be a device-side assert on a GPU (retried as a lost machine). Shards are written by the project's own
writers, then one sample is rewritten with `ShardWriter` and the manifest entry (bytes, sha256) updated, as
a writer with a wrong tokenizer would have left it."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from pretrain.config import DataConfig
from pretrain.data import build_train_stream, build_val_batches
from pretrain.data.manifest import MANIFEST, resolve, write_manifest
from pretrain.data.reader import ShardReader
from pretrain.data.sample_spec import spec_of
from pretrain.data.shards import ShardWriter, read_shard
from pretrain.data.write_sft import write_sft
from pretrain.errors import DataError
from tests.data.test_sft import records, write_jsonl
from tests.helpers import make_chat_tokenizer

Mutate = Callable[[dict[str, bytes]], dict[str, bytes]]


def rewrite_sample(src: Path, dst: Path, shard: int, sample: int, mutate: Mutate) -> tuple[str, str]:
    """A copy of the shard directory `src` at `dst` whose shard `shard` has sample `sample`'s members
    replaced by `mutate(members)`, with the manifest's bytes and sha256 of that shard updated. Returns the
    shard's path and the sample's key."""
    shutil.copytree(src, dst)
    m = json.loads((dst / MANIFEST).read_text())
    entry = m["shards"][shard]
    path = dst / entry["name"]
    samples = read_shard(str(path), sha256=entry["sha256"], nbytes=entry["bytes"], label=str(path))
    writer = ShardWriter(path)
    for k, (key, members) in enumerate(samples):
        writer.add(key, mutate(dict(members)) if k == sample else members)
    entry.update(writer.close())
    write_manifest(dst, m)
    return str(path), samples[sample][0]


def set_value(member: str, dtype: str, position: int, value: int) -> Mutate:
    """A mutation writing `value` at `position` of the array in `member`."""
    def mutate(members: dict[str, bytes]) -> dict[str, bytes]:
        arr = np.frombuffer(members[member], dtype=dtype).copy()
        arr[position] = value
        return {**members, member: arr.tobytes()}
    return mutate


def _read_all(directory: Path, skip_corrupt: bool = False) -> ShardReader:
    src = resolve(str(directory), None, "data.train")
    reader = ShardReader([src], spec_of(src, "data.train"), seed=0, skip_corrupt=skip_corrupt)
    for j in range(len(src.shards)):
        reader.shard(0, j)
    return reader


GPT2_VOCAB = 50257


@pytest.mark.parametrize("value", [GPT2_VOCAB, 65535])
def test_a_token_id_past_the_vocabulary_is_named(sources, tmp_path, value):
    path, key = rewrite_sample(sources["prose"], tmp_path / "bad", 1, 2, set_value("tokens.u16", "<u2", 5, value))
    with pytest.raises(DataError) as e:
        _read_all(tmp_path / "bad")
    assert str(e.value) == (f"shard {path}: sample {key} has token id {value} at position 5, outside "
                            f"[0, {GPT2_VOCAB}) of the manifest's vocab_size")
    # The training stream (its dataloader worker sends the error back as a value) says the same line.
    stream = build_train_stream(DataConfig(train=str(tmp_path / "bad"), num_workers=1), seed=0, rank=0,
                                world_size=1, micro_batch_size=4, grad_accum=1)
    with pytest.raises(DataError) as e2:
        for _ in range(10_000):
            next(stream)
    assert str(e2.value) == str(e.value)


def test_the_last_id_of_the_vocabulary_reads(tiny_shards, tmp_path):
    rewrite_sample(tiny_shards / "train", tmp_path / "edge", 0, 0, set_value("tokens.u16", "<u2", 0, GPT2_VOCAB - 1))
    reader = _read_all(tmp_path / "edge")
    assert int(reader.shard(0, 0)[1]["input_ids"][0, 0]) == GPT2_VOCAB - 1


def test_skip_corrupt_skips_and_counts_a_shard_with_a_bad_id(tiny_shards, tmp_path):
    path, _ = rewrite_sample(tiny_shards / "train", tmp_path / "bad", 0, 0, set_value("tokens.u16", "<u2", 0, 60000))
    assert _read_all(tmp_path / "bad", skip_corrupt=True).corrupt == {path}


@pytest.fixture(scope="module")
def sft_shards(tmp_path_factory) -> tuple[Path, int]:
    """Packed supervised shards (a tiny chat tokenizer, vocabulary under 400), several per split, and the
    manifest's vocab_size."""
    root = tmp_path_factory.mktemp("sft-range")
    tokdir = make_chat_tokenizer(root / "tok")
    src = write_jsonl(root / "chat.jsonl", records(120))
    m = write_sft([str(src)], tokenizer=str(tokdir), out=root / "out", seq_len=64, shard_bytes=20 << 10)["train"]
    assert len(m["shards"]) >= 2
    return root / "out" / "train", int(m["vocab_size"])


@pytest.mark.parametrize("member,value,what", [
    ("targets.i32", -7, "target"), ("targets.i32", "V+3", "target"), ("input_ids.i32", -1, "token id"),
    ("input_ids.i32", "V", "token id"),
])
def test_sft_targets_and_ids_outside_the_vocabulary_are_named(sft_shards, tmp_path, member, value, what):
    train, vocab = sft_shards
    value = {"V": vocab, "V+3": vocab + 3}.get(value, value)
    path, key = rewrite_sample(train, tmp_path / "bad", 1, 3, set_value(member, "<i4", 10, value))
    with pytest.raises(DataError) as e:
        _read_all(tmp_path / "bad")
    allowed = f"neither -100 nor in [0, {vocab})" if what == "target" else f"outside [0, {vocab})"
    assert str(e.value) == (f"shard {path}: sample {key} has {what} {value} at position 10, {allowed} of the "
                            f"manifest's vocab_size")
    # Validation batches read through the same reader.
    with pytest.raises(DataError, match=f"shard {path}: sample {key} has {what} {value}"):
        build_val_batches(DataConfig(train=str(tmp_path / "bad"), val=str(tmp_path / "bad")), rank=0,
                          world_size=1, micro_batch_size=1, max_batches=10_000)


def test_sft_ignored_targets_read(sft_shards):
    """The writer's own rows (targets -100 where unsupervised) read without complaint."""
    train, _ = sft_shards
    reader = _read_all(train)
    assert (reader.shard(0, 0)[1]["targets"] == -100).any()
