"""Shard files: deterministic tar writing (fixed mtime/uid, durable atomic rename) and verified reading.

Writing uses `tarfile` directly so every header field is pinned and the same corpus gives byte-identical
shards. Reading goes through webdataset (`gopen` for local paths, `pipe:` and object-store URLs, and its tar
iterator) with the bytes hashed on the way in: a flipped byte inside a payload leaves a valid tar, so only
the manifest's sha256 can catch it.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from pathlib import Path

import webdataset as wds
from webdataset.tariterators import tar_file_iterator

from pretrain.atomic import fsync_dir
from pretrain.data.errors import DataError


class ShardWriter:
    """One tar shard streamed into `<name>.tmp` and renamed into place by `close()`; sha256 computed
    as it is written. A crash leaves only the `.tmp` file, which the next run overwrites, never a partial
    shard under the final name. (A long-lived streaming writer, so not `pretrain.atomic.atomic_open`, but
    the same guarantees: file fsynced before the rename, directory fsynced after it.)"""

    def __init__(self, path: Path):
        self.path = path
        self.tmp = path.with_name(path.name + ".tmp")
        self._f = open(self.tmp, "wb")
        self._hash = hashlib.sha256()
        self._tar = tarfile.open(fileobj=_HashingWriter(self._f, self._hash), mode="w", format=tarfile.USTAR_FORMAT)
        self.samples = 0

    def add(self, key: str, members: dict[str, bytes]) -> None:
        """Write one sample: files `<key>.<ext>` in sorted extension order (webdataset groups by key)."""
        for ext in sorted(members):
            data = members[ext]
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))
        self.samples += 1

    def close(self) -> dict:
        """Finish the tar, fsync, rename to the final name, fsync the directory (so the rename survives a
        power loss); returns {"name", "bytes", "sha256"}."""
        self._tar.close()
        self._f.flush()
        os.fsync(self._f.fileno())
        size = self._f.tell()
        self._f.close()
        os.replace(self.tmp, self.path)
        fsync_dir(self.path.parent)
        return {"name": self.path.name, "bytes": size, "sha256": self._hash.hexdigest()}

    def abort(self) -> None:
        self._f.close()
        self.tmp.unlink(missing_ok=True)


class _HashingWriter:
    """File-like wrapper that feeds every written byte to a hash (tarfile only calls write)."""

    def __init__(self, f, h):
        self._f, self._h = f, h

    def write(self, b) -> int:
        self._h.update(b)
        return self._f.write(b)

    def tell(self) -> int:
        return self._f.tell()


class _HashingReader:
    """File-like wrapper hashing every byte read, so verification costs no second pass."""

    def __init__(self, f):
        self._f, self.hash, self.bytes = f, hashlib.sha256(), 0

    def read(self, n: int = -1) -> bytes:
        b = self._f.read(n)
        self.hash.update(b)
        self.bytes += len(b)
        return b

    def drain(self) -> None:
        while self.read(1 << 20):
            pass

    def close(self) -> None:
        self._f.close()


def open_url(url: str):
    """webdataset's `gopen` (local paths, file:, pipe:, http(s) via curl, gs: via gsutil, ais:), plus s3://
    through the AWS CLI, which gopen has no handler for."""
    if url.startswith("s3://"):
        url = f"pipe:aws s3 cp {url} -"
    return wds.gopen(url, "rb")


def read_shard(url: str, *, sha256: str | None, nbytes: int | None, label: str) -> list[tuple[str, dict[str, bytes]]]:
    """All samples of one shard in file order as (key, {ext: bytes}); raises DataError naming `label`
    (the shard) on a truncated/corrupt tar or a size or sha256 that differs from the manifest's."""
    try:
        stream = open_url(url)
    except Exception as e:
        raise DataError(f"shard {label}: cannot open: {_first_line(e)}") from None
    reader = _HashingReader(stream)
    samples: list[tuple[str, dict[str, bytes]]] = []
    try:
        for item in tar_file_iterator(reader):
            key, _, ext = item["fname"].partition(".")
            if samples and samples[-1][0] == key:
                samples[-1][1][ext] = item["data"]
            else:
                samples.append((key, {ext: item["data"]}))
        reader.drain()  # the tar end padding is part of the file's hash
    except DataError:
        raise
    except Exception as e:  # tarfile.ReadError, EOFError, a failed pipe: all mean this shard is unusable
        raise DataError(f"shard {label}: corrupt or truncated tar ({_first_line(e)})") from None
    finally:
        try:
            reader.close()
        except Exception as e:  # webdataset's Pipe raises here when the command failed
            raise DataError(f"shard {label}: cannot read: {_first_line(e)}") from None
    if nbytes is not None and reader.bytes != nbytes:
        raise DataError(f"shard {label}: {reader.bytes} bytes, the manifest says {nbytes} (truncated or replaced)")
    if sha256 is not None and reader.hash.hexdigest() != sha256:
        raise DataError(f"shard {label}: sha256 differs from the manifest (corrupt or replaced shard)")
    return samples


def token_ext(vocab_size: int) -> tuple[str, str]:
    """(member extension, numpy dtype) of a token sample: uint16 while the vocabulary fits, else uint32."""
    return ("tokens.u16", "<u2") if vocab_size <= 65536 else ("tokens.u32", "<u4")


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__
