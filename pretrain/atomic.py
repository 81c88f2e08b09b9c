"""Atomic file writes: the one helper every writer of a file that others read uses; and the atomic
placing of a finished directory (`replace_dir`, `rename_if_absent`).

The content goes to a temporary file in the same directory, is flushed and fsynced, and is renamed
over the target (`os.replace`, atomic on POSIX); the directory is fsynced so the rename itself
survives a power loss. A reader sees the old file or the new one, never a torn one; a crash leaves
at most a `.tmp-*` file that the next write replaces.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make a rename or a new entry in `directory` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def make_dirs(path: str | os.PathLike) -> None:
    """`mkdir -p` that makes each directory it creates durable: the parent of every new directory is fsynced
    (a new directory's entry is in its parent, which a power loss could otherwise forget)."""
    path = Path(path)
    missing = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    for d in reversed(missing):
        d.mkdir(exist_ok=True)
        fsync_dir(d.parent)


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# Read once at import (os.umask can only be read by setting it, which is not thread-safe).
_UMASK = _read_umask()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, fsync: bool = True) -> Iterator[Path]:
    """For writers that take a file name (safetensors, torch.save): yields a temporary path in the same
    directory; when the block ends the file is fsynced and renamed to `path` (removed on an exception)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; the result has an ordinary file's mode
    os.close(fd)
    try:
        yield Path(tmp)
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if fsync:
        fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", *, fsync: bool = True) -> Iterator[IO]:
    """`with atomic_open(p, "wb") as f: ...` writes `p` whole or not at all (also on an exception)."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open: mode must be 'w' or 'wb', got {mode!r}")
    with atomic_path(path, fsync=fsync) as tmp, open(tmp, mode) as f:
        yield f


def atomic_write(path: str | os.PathLike, data: str | bytes, *, fsync: bool = True) -> None:
    """Write text or bytes to `path` atomically (see the module docstring)."""
    with atomic_open(path, "wb" if isinstance(data, bytes) else "w", fsync=fsync) as f:
        f.write(data)


def replace_dir(tmp: str | os.PathLike, out: str | os.PathLike) -> None:
    """Rename the finished directory `tmp` to `out`, replacing (never merging into) what was there: stale files
    of an earlier, bigger write (shards) must not survive. `tmp` must sit beside `out` (same file system)."""
    tmp, out = Path(tmp), Path(out)
    fsync_dir(tmp)
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(out, old)
    os.rename(tmp, out)
    fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old)


def rename_if_absent(tmp: str | os.PathLike, out: str | os.PathLike, *,
                     present: Callable[[Path], bool] = Path.is_dir) -> bool:
    """Rename the finished directory `tmp` to `out`, unless another writer's copy got there first (a cache
    filled by concurrent processes: same key, same inputs, theirs is as good as ours); then `tmp` is removed
    and False returned. `present(out)` says whether what is at `out` is such a copy; a failed rename with
    none there is raised. `tmp` must sit beside `out` (same file system)."""
    tmp, out = Path(tmp), Path(out)
    try:
        os.rename(tmp, out)
    except OSError:
        if not present(out):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        return False
    fsync_dir(out.parent)
    return True
