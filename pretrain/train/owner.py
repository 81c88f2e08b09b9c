"""Who may write a checkpoint location: the run holding its lock (pretrain/launch/runlock.py for a run directory,
pretrain/launch/storelock.py for `<cluster.storage>/<run.name>`), as the workers see it.

The driver holds the lock; its token is the run's nonce. Every marker a save writes (`owner.json` when a step's
save begins, each rank's `rank-<R>.done`, `COMPLETE`) carries `<token>.<attempt>`, the attempt being one worker
group's (a restart draws a new one). So:

- resume trusts a complete step only when every rank's marker carries its `COMPLETE`'s nonce: a marker can
  never vouch for another attempt's files (`checkpoint_layout.verified`);
- pruning and the removal of an unfinished step touch only what this holder or a trusted one wrote (`trusted`):
  the holders whose checkpoints were already in the location when the lock was free (they had released it),
  or whose process is known dead. A holder whose lock was taken over while it may still be alive (it stalled
  past the stale limit) keeps every checkpoint it wrote;
- before each save writes anything, and again before its `COMPLETE` and its pruning, each rank reads the lock
  (`check`): a run whose lock was taken over stops with one line (`LockLostError`) and writes nothing more.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime

from pretrain.errors import LockLostError
from pretrain.train.storage import Storage


def describe(holder: dict) -> str:
    """`host pid N since 2026-01-02 03:04:05 (Ray job raysubmit_x)`."""
    since = datetime.fromtimestamp(holder.get("started", 0)).isoformat(sep=" ", timespec="seconds")
    job = f" (Ray job {holder['ray_job']})" if holder.get("ray_job") else ""
    return f"{holder.get('host', '?')} pid {holder.get('pid', '?')} since {since}{job}"


def lost_line(what: str, holder: dict | None, stale_s: float | None = None) -> str:
    """The one line of a run whose lock (`what`) was taken over, naming the new holder."""
    now = f"now held by {describe(holder)}" if holder else "now held by no one"
    limit = f" ({stale_s:.0f} s)" if stale_s is not None else ""
    return (f"{what} was taken over ({now}); it stalled past the lock's stale limit{limit} and stops without "
            "writing anything more")


def holder_of(nonce: str) -> str:
    """The lock token a marker's nonce (`<token>.<attempt>`) belongs to."""
    return nonce.split(".", 1)[0]


def parse_holder(text: str | None) -> dict | None:
    """A lock file's holder record; None when absent or torn."""
    if text is None:
        return None
    try:
        holder = json.loads(text)
    except json.JSONDecodeError:
        return None
    return holder if isinstance(holder, dict) else None


@dataclass(frozen=True)
class Owner:
    """The lock a run's workers check (`lock_dir`/`lock_name`, read through pretrain.train.storage), its token,
    and the earlier holders it trusts. The default, no lock: every check passes and every marker is trusted
    (tools and tests that write checkpoints outside a run)."""

    lock_dir: str = ""
    lock_name: str = ""
    token: str = ""
    trusts: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> Owner:
        if not d:
            return cls()
        return cls(d["lock_dir"], d["lock_name"], d["token"], tuple(d.get("trusts", ())))

    def check(self) -> None:
        """Raise LockLostError unless the lock still holds this run's token."""
        if not self.lock_dir:
            return
        holder = parse_holder(Storage(self.lock_dir).read_text(self.lock_name))
        if holder is not None and holder.get("token") == self.token:
            return
        raise LockLostError(lost_line(f"{self.lock_dir}/{self.lock_name}: this run's lock", holder))

    def trusted(self, nonce: str | None) -> bool:
        """Whether this run may remove what a marker with `nonce` vouches for (None: an earlier version's, which
        had no nonces: trusted as before)."""
        if nonce is None or not self.token:
            return True
        holder = holder_of(nonce)
        return holder == self.token or holder in self.trusts
