"""The driver's watcher: every rank's heartbeat (pretrain/train/pulse.py), hangs found and named, and the
driver's stop request passed on to the ranks.

Each rank sends its step, phase and a sequence number (one more at every phase it enters) once a second as
a UDP datagram to a socket this watcher binds on the driver's node address; the datagram carries a random
token of this command, and anything else arriving there is ignored. A worker group's start (an attempt) is
told by its process group's rendezvous address, which every rank of one group shares and every restart
changes; beats of a group already replaced are ignored.

A hang: no rank's sequence number moved for `cluster.hang_timeout_s` (by default 10 x the slowest rank's
median step time, at least 120 s), or `cluster.startup_timeout_s` while a rank is in a long phase (start-up,
evaluation, checkpoint, finish) or before the attempt's first step. Then:

1. the stuck ranks are named: those that stopped beating (a stopped process, a dead mount), else those
   outside a collective (the ones the others wait for), else those at the lowest step;
2. every rank's Python stacks go to `<run>/hangs/<attempt>/rank-<R>.txt`, under a header with its phase,
   step, host and pid: `py-spy dump` where it can read the process, else the rank's own `faulthandler`
   (armed at its start, on SIGUSR1; a stopped process is continued for it), both run by a Ray task on the
   rank's node;
3. one line on stderr names the stuck ranks, hosts and phase;
4. every rank's process is killed: Ray Train sees the worker group fail (one of `cluster.max_failures`)
   and starts a new one, which resumes from the newest complete checkpoint.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import os
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from pretrain.atomic import atomic_write
from pretrain.train.goodput import note_hang
from pretrain.train.pulse import HEARTBEAT_S, LONG_PHASES

SILENT_S = 3 * HEARTBEAT_S  # a rank this long without a beat has stopped beating
FLOOR_S = 120.0  # the automatic hang timeout's floor, and its multiple of the median step
MULTIPLE = 10.0


class Watcher:
    """Heartbeats in, hangs out; `address` and `token` go to every rank (launch/local.py)."""

    def __init__(self, cluster, rdir: Path, *, world: int, command: float, say=None):
        self.cluster, self.rdir, self.world, self.command = cluster, rdir, world, command
        self.say = say or (lambda line: print(line, file=sys.stderr, flush=True))
        self.token = secrets.token_hex(16)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((_node_ip(), 0))
        host, port = self.sock.getsockname()[:2]
        self.address = f"{host}:{port}"
        self.attempts: list[str] = []  # rendezvous addresses of the worker groups seen, in order
        self.ranks: dict[int, dict] = {}  # the current attempt's: the last beat of each rank, and when it moved
        self.stopping: str | None = None  # why the driver asked the ranks to stop
        self._declared = False
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="pretrain-watcher", daemon=True)
        self._thread.start()

    # -- heartbeats -------------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._closed.is_set():
            ready, _, _ = select.select([self.sock], [], [], 0.25)
            if ready:
                try:
                    data, peer = self.sock.recvfrom(4096)
                    beat = json.loads(data)
                except (OSError, ValueError):
                    continue
                if isinstance(beat, dict) and hmac.compare_digest(str(beat.get("t", "")), self.token):
                    self._beat(beat, peer)
            try:
                self._check()
            except Exception as e:  # noqa: BLE001 - the watcher must not die quietly: say why, keep watching
                self.say(f"warning: hang handling failed: {type(e).__name__}: {e}")

    def _beat(self, beat: dict, peer) -> None:
        now = time.monotonic()
        group = str(beat.get("g", ""))
        with self._lock:
            if group not in self.attempts:
                self.attempts.append(group)
                self.ranks, self._declared = {}, False
            elif group != self.attempts[-1]:
                return  # a replaced group's last beats
            rank = int(beat["r"])
            old = self.ranks.get(rank)
            moved = old is None or old["q"] != beat.get("q") or old["pid"] != beat.get("pid")
            self.ranks[rank] = {**beat, "seen": now, "moved": now if moved else old["moved"], "peer": peer}
        if self.stopping is not None:
            self.sock.sendto(f"stop {self.token}".encode(), peer)

    def request_stop(self, reason: str) -> None:
        """Ask every rank to save a checkpoint at its step and stop: told at once where its heartbeat's address
        is known, and again in reply to each next beat (a rank not yet heard from hears it then). Waiting for
        the next beat alone let a fast run finish up to HEARTBEAT_S of steps first, and exit 0 after a SIGTERM."""
        self.stopping = reason
        with self._lock:
            peers = [v["peer"] for v in self.ranks.values() if v.get("peer") is not None]
        for peer in peers:
            try:
                self.sock.sendto(f"stop {self.token}".encode(), peer)
            except OSError:
                pass  # that rank's next beat gets the reply instead

    # -- hangs ------------------------------------------------------------------------------------------

    def timeout(self, ranks: dict[int, dict]) -> float:
        """The limit that applies now: long phases and the attempt's first step get cluster.startup_timeout_s."""
        medians = [r["m"] for r in ranks.values() if r.get("m")]
        if not medians or any(r.get("p") in LONG_PHASES for r in ranks.values()):
            return float(self.cluster.startup_timeout_s)
        if self.cluster.hang_timeout_s:
            return float(self.cluster.hang_timeout_s)
        return max(FLOOR_S, MULTIPLE * max(medians))

    def _check(self) -> None:
        with self._lock:
            if self._declared or not self.ranks:
                return
            ranks = {r: dict(v) for r, v in self.ranks.items()}
        now = time.monotonic()
        quiet = now - max(r["moved"] for r in ranks.values())
        limit = self.timeout(ranks)
        if quiet < limit:
            return
        with self._lock:
            self._declared = True
        self._hang(ranks, quiet, limit, now)

    def _hang(self, ranks: dict[int, dict], quiet: float, limit: float, now: float) -> None:
        silent = sorted(r for r, v in ranks.items() if now - v["seen"] > SILENT_S)
        waiting = sorted(r for r, v in ranks.items() if v.get("p") != "collective")
        low = min(v.get("s", 0) for v in ranks.values())
        stuck = silent or waiting or sorted(r for r, v in ranks.items() if v.get("s", 0) == low)
        attempt = len(self.attempts)
        out = self.rdir / "hangs" / str(attempt)
        out.mkdir(parents=True, exist_ok=True)
        stacks = dump_stacks(ranks, first=[r for r in ranks if r not in silent])
        for rank, v in sorted(ranks.items()):
            head = (f"rank {rank}  pid {v['pid']}  host {v['host']}  step {v.get('s')}  phase {v.get('p')}  "
                    f"(at its last heartbeat, {now - v['seen']:.1f} s ago)  {'STUCK' if rank in stuck else 'waiting'}\n\n")
            atomic_write(out / f"rank-{rank}.txt", head + stacks.get(rank, "(no stacks: the dump failed)\n"))
        missing = sorted(set(range(self.world)) - set(ranks))
        names = ", ".join(f"rank {r} on {ranks[r]['host']} (pid {ranks[r]['pid']}, step {ranks[r].get('s')}, "
                          f"{'no heartbeat for ' + format(now - ranks[r]['seen'], '.0f') + ' s' if r in silent else 'phase ' + str(ranks[r].get('p'))})"
                          for r in stuck)
        line = (f"hang: no rank advanced for {quiet:.0f} s (limit {limit:.0f} s); stuck: {names}"
                + (f"; ranks {missing} never reported" if missing else "")
                + f"; stacks in {out}; restarting the worker group")
        record = {"attempt": attempt, "quiet_s": round(quiet, 3), "limit_s": limit, "stuck": stuck,
                  "ranks": {str(r): {k: v.get(k) for k in ("pid", "host", "s", "p")} for r, v in ranks.items()},
                  "line": line, "t": time.time()}
        atomic_write(out / "hang.json", json.dumps(record, indent=2) + "\n")
        note_hang(self.rdir, self.command, time.time(), quiet)  # for the goodput accounting
        self.say(line)
        kill(ranks)

    def close(self) -> None:
        """Stop watching; the ranks' faulthandler files go (the run's `hangs/` stays only if a hang was written)."""
        self._closed.set()
        self._thread.join(timeout=2)
        self.sock.close()
        shutil.rmtree(self.rdir / "hangs" / ".live", ignore_errors=True)
        with contextlib.suppress(OSError):
            (self.rdir / "hangs").rmdir()  # empty: no hang


def _node_ip() -> str:
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - no Ray here: loopback
        return "127.0.0.1"


# -- on the ranks' nodes --------------------------------------------------------------------------------


def _stopped(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("T", "t")
    except (OSError, IndexError):
        return False


def _py_spy(pid: int) -> str | None:
    """`py-spy dump` of a live process (it reads the process's memory; where ptrace is not allowed it fails)."""
    exe = Path(sys.executable).with_name("py-spy")
    try:
        done = subprocess.run([str(exe) if exe.exists() else "py-spy", "dump", "--pid", str(pid), "--nonblocking"],
                              capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 and done.stdout.strip() else None


def _faulthandler(pid: int, path: str | None, timeout_s: float = 5.0) -> str | None:
    """The rank's own dump: SIGUSR1 makes its faulthandler (pretrain.train.pulse.arm_stacks) write every
    thread's stack to its file; a stopped process is continued so that it can."""
    if not path or not os.path.isfile(path):
        return None
    size = os.path.getsize(path)
    os.kill(pid, signal.SIGUSR1)
    if _stopped(pid):
        os.kill(pid, signal.SIGCONT)
    deadline, last = time.monotonic() + timeout_s, -1
    while time.monotonic() < deadline:
        now = os.path.getsize(path)
        if now > size and now == last:  # written, and no longer growing
            break
        last = now
        time.sleep(0.1)
    with open(path) as f:
        f.seek(size)
        return f.read() or None


def stacks_here(procs: list[tuple[int, str | None]]) -> dict[int, str]:
    """Python stacks of these processes (pid, faulthandler file) on this node, in order (the running ones
    first: continuing a stopped one for its faulthandler lets the others move on)."""
    out = {}
    for pid, path in procs:
        text = _py_spy(pid)
        if text is not None:
            out[pid] = "py-spy dump:\n" + text
            continue
        text = _faulthandler(pid, path)
        out[pid] = ("faulthandler (py-spy could not read the process):\n" + text) if text else "(no stacks)\n"
    return out


def kill_here(procs: list[tuple[int, str | None]]) -> None:
    for pid, _ in procs:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _on_nodes(fn, ranks: dict[int, dict], order: list[int]) -> dict[int, object]:
    """`fn(pids)` run on each ranks' node (a Ray task pinned there), results by pid."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    by_node: dict[str | None, list[tuple[int, str | None]]] = {}
    for rank in order:
        by_node.setdefault(ranks[rank].get("node"), []).append((int(ranks[rank]["pid"]), ranks[rank].get("sf")))
    remote = ray.remote(num_cpus=0, max_retries=0)(fn)
    pending = [remote.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(pids)
               if node else remote.remote(pids) for node, pids in by_node.items()]
    out: dict = {}
    for result in ray.get(pending, timeout=90):
        out.update(result or {})
    return out


def dump_stacks(ranks: dict[int, dict], first: list[int]) -> dict[int, str]:
    """Every rank's stacks (by rank); the ranks in `first` are dumped before the rest."""
    order = first + [r for r in sorted(ranks) if r not in first]
    by_pid = _on_nodes(stacks_here, ranks, order)
    return {r: by_pid.get(int(v["pid"]), "(no stacks)\n") for r, v in ranks.items()}


def kill(ranks: dict[int, dict]) -> None:
    """Every rank's process, on its node: Ray Train sees the group fail and restarts it."""
    _on_nodes(kill_here, ranks, sorted(ranks))
