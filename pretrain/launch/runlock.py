"""One writer per run: a lock file in the run directory that a second live run with the same name is
refused by, with one line naming the holder (host, pid, start time, Ray job).

The driver takes it (`pretrain train`, which is also the entrypoint of a `pretrain submit` job) before it
writes or deletes anything in the run directory, and holds it until the run ends. The file is created
with O_CREAT | O_EXCL, atomic on POSIX filesystems and on NFSv3 and later, so of two starting runs
exactly one wins. A heartbeat thread touches it every `heartbeat_s`.

A lock left by a run that died is taken over: at once when its holder was on this host and its pid is
gone; otherwise once its heartbeat is older than `stale_s` (which must exceed the clock skew between
hosts; a pid can be reused, a heartbeat cannot). Taking over is itself exclusive: a taker first creates
`run.lock.takeover` with O_EXCL, looks at the lock again (another taker may have replaced it
meanwhile), and only then removes and recreates it, so two takers never both believe they hold the run.

Before each heartbeat the holder reads the lock: when it holds another token (this run stalled past `stale_s`,
say a suspended VM, and another took the lock over), the run has lost it and `on_lost` is called once with the
line to stop on; the workers check the same file before every write of a save (pretrain/train/owner.py).

When checkpoints live in `cluster.storage` the same holder record goes there too (pretrain/launch/storelock.py),
taken beside this one: two clusters with different `run.dir`s share that prefix, not this directory.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from pretrain.atomic import fsync_dir
from pretrain.errors import RunLockedError
from pretrain.train.checkpoint_layout import holders
from pretrain.train.owner import Owner, describe, lost_line, parse_holder
from pretrain.train.storage import Storage

LOCK_FILE = "run.lock"
HEARTBEAT_S = 10.0
STALE_S = 60.0


def ray_job() -> str | None:
    """The submission id of the Ray job this process is the entrypoint of, if it is one (Ray passes the
    job's metadata, which holds it, to the entrypoint's environment)."""
    try:
        meta = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")).get("metadata") or {}
    except json.JSONDecodeError:
        return None
    return meta.get("job_submission_id")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _here(holder: dict | None) -> bool:
    return bool(holder) and holder.get("host") == socket.gethostname()


def is_live(holder: dict | None, age: float, stale_s: float) -> bool:
    """Whether a lock's holder (its record; None when torn) with a heartbeat `age` s old still holds it: not once
    the heartbeat is older than `stale_s`; on this host, only while its pid lives. Both locks judge by this."""
    if age > stale_s:
        return False
    return pid_alive(int(holder.get("pid", -1))) if _here(holder) else True


def inherited_trusts(old: dict) -> list[str]:
    """The trusts a taken-over holder hands on (pretrain/train/owner.py): those it had, and its own token when its
    process is known dead (on this host, its pid gone; a stale heartbeat alone proves nothing)."""
    dead = _here(old) and not pid_alive(int(old.get("pid", -1))) and old.get("token")
    return sorted(set(old.get("trusts", [])) | ({old["token"]} if dead else set()))


class RunLock:
    """The lock of one run directory. `with RunLock(rdir):` or `acquire()` / `release()`."""

    def __init__(self, rdir: Path, *, heartbeat_s: float = HEARTBEAT_S, stale_s: float = STALE_S,
                 on_lost: Callable[[str], None] | None = None):
        """`on_lost(line)`: called once, from the heartbeat thread, when the lock turns out taken over."""
        # Absolute: the workers check the lock through `owner()` from a working directory of their own.
        self.path = Path(rdir).absolute() / LOCK_FILE
        self.heartbeat_s, self.stale_s, self.on_lost = heartbeat_s, stale_s, on_lost
        self.holder = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
                       "ray_job": ray_job(), "token": uuid.uuid4().hex, "trusts": []}
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ reading a lock

    def _read(self) -> tuple[dict | None, float] | None:
        """(holder or None when unreadable, age of its heartbeat in s); None when there is no lock."""
        try:
            age = time.time() - self.path.stat().st_mtime
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        try:
            return json.loads(text), age
        except json.JSONDecodeError:  # being written right now (or torn by a crash): judged by its age
            return None, age

    # ------------------------------------------------------------------ taking and giving back

    def acquire(self) -> RunLock:
        """Take the lock, or raise RunLockedError naming the live holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        inherited: list[str] | None = None
        for _ in range(5):
            # Which earlier holders' checkpoints this run may prune (pretrain/train/owner.py): taking a free lock,
            # all whose markers are there; after a takeover, those the stale holder trusted (and it, when dead).
            self.holder["trusts"] = inherited if inherited is not None else sorted(
                holders(Storage(str(self.path.parent / "checkpoints"))))
            if self._create():
                self._thread = threading.Thread(target=self._beat, daemon=True, name="run-lock-heartbeat")
                self._thread.start()
                return self
            seen = self._read()
            if seen is None:
                continue  # released meanwhile: try again
            holder, age = seen
            if is_live(holder, age, self.stale_s):
                raise RunLockedError(f"run.name {self.path.parent.name}: the run directory {self.path.parent} is in "
                                     f"use by a live run, {describe(holder or {})}; wait for it, stop it, or choose "
                                     f"another run.name (lock: {self.path})")
            inherited = self._take_over()
        raise RunLockedError(f"{self.path}: could not take the lock (others keep taking it)")

    def owner(self) -> Owner:
        """What the workers check before each write of a save (pretrain/train/owner.py)."""
        return Owner(str(self.path.parent), LOCK_FILE, self.holder["token"], tuple(self.holder["trusts"]))

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(self.holder) + "\n")
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(self.path.parent)
        return True

    def _take_over(self) -> list[str] | None:
        """Remove a stale lock, exclusively: only the taker that holds the takeover file may, and only
        after it has seen that the lock is still stale. Returns the trusts it hands on (None: nothing removed)."""
        guard = self.path.with_name(LOCK_FILE + ".takeover")
        try:
            fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:  # a taker that died mid-takeover leaves it behind
                if time.time() - guard.stat().st_mtime > self.stale_s:
                    guard.unlink(missing_ok=True)
            except FileNotFoundError:
                pass
            time.sleep(0.1)
            return None
        os.close(fd)
        try:
            seen = self._read()
            if seen is not None and not is_live(*seen, self.stale_s):
                self.path.unlink(missing_ok=True)
                return inherited_trusts(seen[0] or {})
            return None
        finally:
            guard.unlink(missing_ok=True)

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                holder = parse_holder(self.path.read_text())
            except FileNotFoundError:  # removed by hand: nothing left to keep fresh
                return
            if holder is not None and holder.get("token") != self.holder["token"]:
                self.lost = lost_line(f"run.name {self.path.parent.name}: this run's lock {self.path}", holder,
                                      self.stale_s)
                if self.on_lost is not None:
                    self.on_lost(self.lost)
                return
            try:
                os.utime(self.path)
            except FileNotFoundError:
                return

    def release(self) -> None:
        """Give the lock back (only if it is still this holder's)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        seen = self._read()
        if seen is not None and seen[0] and seen[0].get("token") == self.holder["token"]:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

