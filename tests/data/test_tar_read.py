"""Shard reading: the fast ustar walk gives exactly what webdataset's tar iterator gives, and hands every other
kind of uncompressed tar (pax, GNU, directories, a bad checksum) to tarfile, which reads it as that iterator
does; compressed tars and a manifest entry without sha256 are refused. Mutated shards: test_shard_fuzz.py."""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import lzma
import tarfile

import pytest
from webdataset.tariterators import tar_file_iterator

from pretrain.data.shards import ShardWriter, _plain_ustar, read_shard
from pretrain.errors import DataError


def _read(path, data: bytes):
    """read_shard of `data` written at `path`, with a manifest entry that matches it."""
    path.write_bytes(data)
    return read_shard(str(path), sha256=hashlib.sha256(data).hexdigest(), nbytes=len(data), label="s")


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


@pytest.mark.parametrize("case", ["pax", "gnu", "directory"])
def test_other_tars_go_to_tarfile_with_webdatasets_result(tmp_path, case):
    if case == "pax":
        data = _tar({"é" * 120 + ".bin": b"x", **FILES}, fmt=tarfile.PAX_FORMAT)
    elif case == "gnu":
        data = _tar({"b" * 150 + ".bin": b"x", **FILES}, fmt=tarfile.GNU_FORMAT)
    else:
        data = _tar(FILES, dirs=("d",))
    assert _plain_ustar(data) is None
    got = _read(tmp_path / "s.tar", data)
    want: dict[str, dict[str, bytes]] = {}
    for name, payload in _members(data):
        key, _, ext = name.partition(".")
        want.setdefault(key, {})[ext] = payload
    assert dict(got) == want


@pytest.mark.parametrize("kind,compress", [("gzip", gzip.compress), ("bzip2", bz2.compress), ("xz", lzma.compress)])
def test_compressed_tar_is_refused(tmp_path, kind, compress):
    with pytest.raises(DataError, match=rf"^shard s: a {kind}-compressed tar; shards are read as uncompressed tar only$"):
        _read(tmp_path / "s.tar", compress(_tar(FILES)))


def test_shard_without_sha256_is_refused(tmp_path):
    data = _tar(FILES)
    (tmp_path / "s.tar").write_bytes(data)
    with pytest.raises(DataError, match=r"^shard s: the manifest gives no sha256 \(64 hex digits\) for it"):
        read_shard(str(tmp_path / "s.tar"), sha256=None, nbytes=len(data), label="s")


def test_local_shard_of_another_size_is_refused_before_it_is_read(tmp_path, monkeypatch):
    data = _tar(FILES)
    (tmp_path / "s.tar").write_bytes(data + bytes(512))
    monkeypatch.setattr("pretrain.data.shards.read_bytes", lambda url: pytest.fail("read a shard of the wrong size"))
    with pytest.raises(DataError, match=rf"^shard s: {len(data) + 512} bytes, the manifest says {len(data)} "):
        read_shard(str(tmp_path / "s.tar"), sha256=hashlib.sha256(data).hexdigest(), nbytes=len(data), label="s")


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
    if damage == "truncated":  # the walk sees the last member run past the end
        with pytest.raises(ValueError, match=r"member 11 at byte \d+: size 5000 runs past the end of the \d+-byte tar"):
            _plain_ustar(bytes(data))
    else:
        assert _plain_ustar(bytes(data)) is None
    if damage == "no-end":  # tarfile reads what is whole: so does read_shard
        assert len(_read(tmp_path / "s.tar", bytes(data))) == len(FILES) // 2
        return
    with pytest.raises(DataError, match="corrupt or truncated"):
        _read(tmp_path / "s.tar", bytes(data))
