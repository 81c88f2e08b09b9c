"""One writer per checkpoint location: the lock of `<cluster.storage>/<run.name>/`, beside the run directory's
(pretrain/launch/runlock.py), which two clusters with different `run.dir`s would not share.

The lock is one object, `run.lock`, made by a conditional create (S3's `If-None-Match: *`, O_EXCL on a shared
file system: `Storage.create`), so of two starting runs exactly one gets it; the other is refused with one line
naming the holder. The holder never rewrites it: its heartbeat is a second object of its own,
`run.lock.beat-<token>`, rewritten every `heartbeat_s` (an object store cannot touch a file's time, and a
rewrite of the lock itself could overwrite a successor's). A lock whose heartbeat is older than `stale_s` (which
must exceed the clock skew between hosts), or whose holder ran on this host and is gone, is taken over:
exclusively, through `run.lock.takeover` made the same way, after a second look.

Before each heartbeat the holder reads the lock: when it holds another token (a holder that stalled past
`stale_s`, then woke), the run has lost it, and `on_lost` is called once with the line to stop on. The workers
check the same object before every write of a save (pretrain/train/owner.py).

Which earlier holders' checkpoints this run may prune (`trusts`): taking a free lock, every holder whose markers
are in the location (each released its lock); taking over a stale one, those its holder trusted, and its holder
too when that process is known dead (on this host, its pid gone).
"""

from __future__ import annotations

import _thread
import contextlib
import json
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator

from pretrain.config import Config, run_dir
from pretrain.errors import LockLostError, RunLockedError, StorageError
from pretrain.launch.runlock import HEARTBEAT_S, STALE_S, inherited_trusts, is_live, ray_job
from pretrain.train.checkpoint_layout import holders
from pretrain.train.owner import Owner, describe, lost_line, parse_holder
from pretrain.train.storage import Storage

LOCK = "run.lock"


class StoreLock:
    """The lock of a run's prefix in `cluster.storage` (`url`: `<storage>/<run.name>`; its checkpoints are at
    `<url>/checkpoints`). `acquire()` / `release()`, or `with StoreLock(url):`."""

    def __init__(self, url: str, *, run_dir: str = "", heartbeat_s: float = HEARTBEAT_S, stale_s: float = STALE_S,
                 on_lost: Callable[[str], None] | None = None):
        self.store = Storage(url)
        self.heartbeat_s, self.stale_s, self.on_lost = heartbeat_s, stale_s, on_lost
        self.holder = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
                       "ray_job": ray_job(), "run_dir": run_dir, "token": uuid.uuid4().hex, "trusts": []}
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def token(self) -> str:
        return self.holder["token"]

    def owner(self) -> Owner:
        """What the workers check (pretrain/train/owner.py); a local location by its absolute path, since the
        workers run in a working directory of their own."""
        where = self.store.root if self.store.local else self.store.url
        return Owner(where, LOCK, self.token, tuple(self.holder["trusts"]))

    # ------------------------------------------------------------------ reading

    def _beat_name(self, token: str) -> str:
        return f"{LOCK}.beat-{token}"

    def _seen(self) -> tuple[dict | None, float] | None:
        """(holder or None when torn, seconds since its last sign of life); None when there is no lock."""
        text = self.store.read_text(LOCK)
        if text is None:
            return None
        holder = parse_holder(text)
        beat = None
        if holder and holder.get("token"):
            beat = parse_holder(self.store.read_text(self._beat_name(holder["token"])))
        last = max((beat or {}).get("t", 0.0), (holder or {}).get("started", 0.0))
        return holder, time.time() - last

    # ------------------------------------------------------------------ taking and giving back

    def acquire(self) -> StoreLock:
        """Take the lock, or raise RunLockedError naming the live holder."""
        inherited: list[str] | None = None
        for _ in range(5):
            if self._create(inherited):
                return self
            seen = self._seen()
            if seen is None:
                continue  # released meanwhile
            holder, age = seen
            if is_live(holder, age, self.stale_s):
                where = f" (run directory {holder['run_dir']})" if holder and holder.get("run_dir") else ""
                raise RunLockedError(f"cluster.storage {self.store.url}: this run's checkpoint location is in use by a "
                                     f"live run, {describe(holder or {})}{where}; wait for it, stop it, or choose "
                                     f"another run.name (lock: {self.store.url}/{LOCK})")
            inherited = self._take_over()
        raise RunLockedError(f"{self.store.url}/{LOCK}: could not take the lock (others keep taking it)")

    def _create(self, inherited: list[str] | None) -> bool:
        """Create the lock; its trusts are those a takeover handed on, else (a free lock: every earlier holder
        released it) every holder with markers in the location."""
        self.holder["trusts"] = inherited if inherited is not None else sorted(holders(self.store.child("checkpoints")))
        if not self.store.create(LOCK, json.dumps(self.holder)):
            return False
        self._write_beat()
        self._thread = threading.Thread(target=self._beat, daemon=True, name="store-lock-heartbeat")
        self._thread.start()
        return True

    def _take_over(self, *, force: bool = False) -> list[str] | None:
        """Remove a stale lock, exclusively (see the module docstring); returns the trusts it hands on (None when
        this taker removed nothing). `force`: whatever its state (tests of two writers only)."""
        guard = f"{LOCK}.takeover"
        if not self.store.create(guard, json.dumps({"t": time.time()})):
            stale = parse_holder(self.store.read_text(guard))
            if stale is None or time.time() - stale.get("t", 0.0) > self.stale_s:  # a taker that died mid-takeover
                self.store.remove(guard)
            time.sleep(0.1)
            return None
        try:
            seen = self._seen()
            if seen is not None and (force or not is_live(*seen, self.stale_s)):
                old = seen[0] or {}
                self.store.remove(LOCK)
                if old.get("token"):
                    self.store.remove(self._beat_name(old["token"]))
                return inherited_trusts(old)
            return None
        finally:
            self.store.remove(guard)

    def take_over_for_tests(self) -> StoreLock:
        """Take the lock from a live holder (what a stall past `stale_s` amounts to): tests of two writers."""
        if not self._create(self._take_over(force=True) or []):
            raise RunLockedError(f"{self.store.url}/{LOCK}: taken by another run during the takeover")
        return self

    def _write_beat(self) -> None:
        self.store.write_text(self._beat_name(self.token), json.dumps({"t": time.time()}))

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                holder = parse_holder(self.store.read_text(LOCK))
                if holder is None or holder.get("token") != self.token:
                    self._lose(holder)
                    return
                self._write_beat()
            except Exception:  # noqa: BLE001 - a store that fails a beat: the next one tries again
                continue

    def _lose(self, holder: dict | None) -> None:
        self.lost = lost_line(f"cluster.storage {self.store.url}: this run's lock", holder, self.stale_s)
        if self.on_lost is not None:
            self.on_lost(self.lost)

    def release(self) -> None:
        """Give the lock back (only if it is still this holder's)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        holder = parse_holder(self.store.read_text(LOCK))
        if holder is not None and holder.get("token") == self.token:
            self.store.remove(LOCK)
        self.store.remove(self._beat_name(self.token))

    def __enter__(self) -> StoreLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def run_locks(cfg: Config) -> Iterator[Owner]:
    """The locks a run holds while it trains: its run directory's and, with `cluster.storage`, its checkpoint
    location's. Yields the `Owner` the workers check (of the lock that governs the checkpoints). When a lock is
    lost, its line goes to stderr and, in the main thread (`pretrain train`), the driver is interrupted at once:
    the block raises `LockLostError` with the line. Elsewhere (a ladder's run) the workers stop at their next save."""
    from pretrain.launch.runlock import RunLock

    main = threading.current_thread() is threading.main_thread()
    lost: list[str] = []

    def on_lost(line: str) -> None:
        if not lost:
            lost.append(line)
            print(f"error: {line}", file=sys.stderr, flush=True)
            if main:
                _thread.interrupt_main()

    try:
        rlock = RunLock(run_dir(cfg), on_lost=on_lost).acquire()
    except OSError as e:  # a read-only or missing mount: the input's, one line
        raise StorageError(f"run.dir {run_dir(cfg)}: cannot write the run directory ({e.strerror or e})") from None
    slock = None
    try:
        if cfg.cluster.storage:
            slock = StoreLock(f"{cfg.cluster.storage.rstrip('/')}/{cfg.run.name}", run_dir=str(run_dir(cfg)),
                              on_lost=on_lost).acquire()
        try:
            yield (slock or rlock).owner()
        except KeyboardInterrupt:
            if lost:
                raise LockLostError(lost[0]) from None
            raise
        if lost:
            raise LockLostError(lost[0])
    finally:
        if slock is not None:
            slock.release()
        rlock.release()
