"""Shard reading: the fast ustar walk gives exactly what webdataset's tar iterator gives, and hands every other
kind of tar (pax, GNU, compressed, directories, a bad checksum) to it."""

from __future__ import annotations

import gzip
import io
import tarfile

import pytest
from webdataset.tariterators import tar_file_iterator

from pretrain.data.shards import ShardWriter, _plain_ustar, read_shard
from pretrain.errors import DataError


def _members(data: bytes) -> list[tuple[str, bytes]]:
    return [(m["fname"], m["data"]) for m in tar_file_iterator(io.BytesIO(data))]


def _tar(files: dict[str, bytes], fmt=tarfile.USTAR_FORMAT, dirs: tuple[str, ...] = ()) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for d in dirs:
            info = tarfile.TarInfo(d)
            info.type = tarfile.DIRTYPE
            tf.addfile(info)
        for name, payload in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


FILES = {f"{k:06d}.{ext}": bytes([k % 251]) * size for k, size in enumerate([0, 1, 511, 512, 513, 5000])
         for ext in ("tokens.u16", "json")}


def test_shard_writer_output_read_fast_and_identically(tmp_path):
    w = ShardWriter(tmp_path / "s.tar")
    samples: dict[str, dict[str, bytes]] = {}
    for name, payload in FILES.items():
        key, _, ext = name.partition(".")
        samples.setdefault(key, {})[ext] = payload
    for key, members in samples.items():
        w.add(key, members)
    w.close()
    data = (tmp_path / "s.tar").read_bytes()
    fast = _plain_ustar(data)
    assert fast is not None and fast == _members(data)
    assert len(fast) == len(FILES)


def test_ustar_with_prefix_and_meta_members_matches_webdataset():
    files = {"a/" * 60 + "x.bin": b"deep", "__meta__": b"skipped", "__index__/k.txt": b"skipped", **FILES}
    data = _tar(files)
    assert _plain_ustar(data) == _members(data)
    assert not any(n.startswith("__") for n, _ in _plain_ustar(data))


@pytest.mark.parametrize("case", ["pax", "gnu", "gzip", "directory"])
def test_other_tars_go_to_webdataset_with_the_same_result(tmp_path, case):
    if case == "pax":
        data = _tar({"é" * 120 + ".bin": b"x", **FILES}, fmt=tarfile.PAX_FORMAT)
    elif case == "gnu":
        data = _tar({"b" * 150 + ".bin": b"x", **FILES}, fmt=tarfile.GNU_FORMAT)
    elif case == "gzip":
        data = gzip.compress(_tar(FILES))
    else:
        data = _tar(FILES, dirs=("d",))
    assert _plain_ustar(data) is None
    path = tmp_path / "s.tar"
    path.write_bytes(data)
    got = read_shard(str(path), sha256=None, nbytes=None, label="s")
    want: dict[str, dict[str, bytes]] = {}
    for name, payload in _members(data):
        key, _, ext = name.partition(".")
        want.setdefault(key, {})[ext] = payload
    assert dict(got) == want


@pytest.mark.parametrize("damage", ["checksum", "truncated", "no-end"])
def test_damaged_tar_is_corrupt(tmp_path, damage):
    data = bytearray(_tar(FILES))
    last = tarfile.open(fileobj=io.BytesIO(bytes(data))).getmembers()[-1]
    if damage == "checksum":
        data[5] ^= 0x01  # a byte of the first member's name: its header checksum no longer holds
    elif damage == "truncated":
        data = data[: last.offset_data + last.size // 2]  # the last payload cut short
    else:
        data = data[: last.offset_data + -(-last.size // 512) * 512]  # members whole, no end-of-archive blocks
    assert _plain_ustar(bytes(data)) is None
    path = tmp_path / "s.tar"
    path.write_bytes(bytes(data))
    if damage == "no-end":  # tarfile reads what is whole: so does read_shard
        assert len(read_shard(str(path), sha256=None, nbytes=None, label="s")) == len(FILES) // 2
        return
    with pytest.raises(DataError, match="corrupt or truncated"):
        read_shard(str(path), sha256=None, nbytes=None, label="s")
