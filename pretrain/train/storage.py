"""Where checkpoints live: one location, a local (or shared) path or an object-store URL, through fsspec.

Checkpoints are written and read through this class whatever the location is: `s3://` (s3fs), `gs://`
(gcsfs), `az://` (adlfs) or a path on this machine's file system (fsspec's local file system), so the
checkpoint code has one path for all of them. Endpoint and credentials come from the client's standard
variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION for s3), as for
data (`pretrain.urls`), so AWS, GCS's S3 interface, MinIO or Ceph need no setting of ours.

What differs between the two kinds is kept inside: on a local file system a write is made durable by fsync
and a small file replaced atomically by rename (`pretrain.atomic`); an object store has neither, but a PUT
is all-or-nothing and durable once it returns. Listings are never cached: ranks poll for each other's
markers, and a cached listing would never show them.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pretrain.atomic import atomic_write, fsync_dir, make_dirs
from pretrain.errors import StorageError


class Storage:
    """A checkpoint location. Paths given to the methods are relative to it, '/'-separated."""

    def __init__(self, url: str):
        self.url = url.rstrip("/") or url
        protocol = self.url.split("://", 1)[0] if "://" in self.url else "file"
        options = {} if protocol in ("file", "local") else {"use_listings_cache": False}
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.url, **options)
        except (ImportError, ValueError) as e:  # "install gcsfs to access gs://", an unknown protocol
            raise StorageError(f"{self.url}: cannot open this checkpoint location ({e})") from None
        self.local = isinstance(self.fs, LocalFileSystem)

    def __repr__(self) -> str:
        return f"Storage({self.url!r})"

    def _abs(self, rel: str = "") -> str:
        return f"{self.root}/{rel}".rstrip("/") if rel else self.root

    def child(self, rel: str) -> Storage:
        """The location `rel` below this one (a run directory's `checkpoints`)."""
        return Storage(f"{self.url}/{rel}")

    def local_path(self, rel: str = "") -> Path:
        """The real path of `rel`, for a local location only (readers that need a directory: DeepSpeed)."""
        assert self.local, self.url
        return Path(self._abs(rel))

    # ------------------------------------------------------------------ reading

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self._abs(rel))

    def children(self, rel: str = "") -> list[str]:
        """Names of the entries directly below `rel` (directories and files); [] when there is none."""
        try:
            entries = self.fs.ls(self._abs(rel), detail=False)
        except FileNotFoundError:
            return []
        return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries)

    def read_text(self, rel: str) -> str | None:
        """The text of `rel`, or None when it does not exist."""
        try:
            return self.fs.cat_file(self._abs(rel)).decode("utf-8")
        except FileNotFoundError:
            return None

    def download(self, rels: list[str], into: Path) -> None:
        """Copy the files `rels` to `into/<rel>` (in parallel on object stores)."""
        if not rels:
            return
        targets = [into / r for r in rels]
        for t in targets:
            t.parent.mkdir(parents=True, exist_ok=True)
        self.fs.get([self._abs(r) for r in rels], [str(t) for t in targets])

    # ------------------------------------------------------------------ writing

    def write_text(self, rel: str, text: str) -> None:
        """Replace `rel` whole: an atomic, fsynced rename locally; one PUT on an object store."""
        if self.local:
            path = self.local_path(rel)
            make_dirs(path.parent)
            atomic_write(path, text)
        else:
            self.fs.pipe_file(self._abs(rel), text.encode("utf-8"))

    def create(self, rel: str, text: str) -> bool:
        """Write `rel` only if nothing is there, as one exclusive create (O_EXCL locally, S3's `If-None-Match: *`
        through fsspec's "create" mode): of two writers exactly one gets True. Durable when it returns."""
        if self.local:
            make_dirs(self.local_path(rel).parent)
        try:
            self.fs.pipe_file(self._abs(rel), text.encode("utf-8"), mode="create")
        except FileExistsError:
            return False
        if self.local:
            with open(self.local_path(rel), "rb") as fh:
                os.fsync(fh.fileno())
            fsync_dir(self.local_path(rel).parent)
        return True

    def put(self, local_dir: Path, files: list[str], rel: str) -> None:
        """Move the files `files` (relative to `local_dir`) to `rel/<file>`, durably: locally a rename when the
        staging directory is on the same file system (else a copy), then fsync of every file and directory;
        on an object store an upload (in parallel), durable when it returns. The local copies are consumed."""
        if not files:
            return
        if not self.local:
            self.fs.put([str(local_dir / f) for f in files], [self._abs(f"{rel}/{f}" if rel else f) for f in files])
            return
        dest = self.local_path(rel)
        dirs = {dest}
        for f in files:
            target = dest / f
            make_dirs(target.parent)  # the first save's new directories (the run's prefix too) made durable
            dirs.add(target.parent)
            shutil.move(str(local_dir / f), target)
            with open(target, "rb") as fh:  # written by torch.save without fsync: make it durable here
                os.fsync(fh.fileno())
        for d in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
            fsync_dir(d)
        fsync_dir(dest.parent)

    def remove(self, rel: str) -> None:
        """Remove `rel` and everything below it; nothing when it is not there."""
        path = self._abs(rel)
        if self.local:
            p = Path(path)
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            return
        try:
            self.fs.rm(path, recursive=True)
        except FileNotFoundError:
            pass
