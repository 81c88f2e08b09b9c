"""This rank's pulse: the step and phase it is in, its compute time, and whether it was asked to stop.

The loop marks phases as it passes them (`PULSE.at("forward")`: a few attribute writes, no collective, no
I/O), and a daemon thread (`start_heartbeats`) sends the latest of them to the driver's watcher
(pretrain/launch/watch.py) once a second as one UDP datagram. The watcher declares a hang when no rank
has advanced for `cluster.hang_timeout_s` (`cluster.startup_timeout_s` in the long phases) and names the
ranks that stopped. A rank that is stopped (SIGSTOP, a dead mount in D state) stops sending too, which
the watcher sees the same way.

The other direction: the watcher answers a heartbeat with `stop` when the driver got SIGTERM; a worker's
own SIGTERM (installed on the worker actor's main thread, `install_sigterm`) and Ray Train's preemption
notice (read from its train context by the heartbeat thread) do the same. `stop_reason` is then set, and
the loop agrees on it in the step's metrics all-reduce, saves a checkpoint at the step and stops
(pretrain/train/loop.py).

Compute time, for stragglers (pretrain/train/straggle.py, which says why the backward is left out): each
rank's time reading and preparing its batches and running its forward passes, phases that wait on no other
rank under ZeRO 0-2. It is timed only once the straggler hook asks for it (`timing`). On CUDA the forward is
timed with events, read at the end of a window, never synchronised per step.
"""

from __future__ import annotations

import faulthandler
import json
import os
import select
import signal
import socket
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

# The phases a rank reports; in the long ones a hang is judged by cluster.startup_timeout_s.
PHASES = ("start-up", "data", "forward", "backward", "optimizer", "collective", "evaluation", "checkpoint", "finish")
LONG_PHASES = frozenset({"start-up", "evaluation", "checkpoint", "finish"})
HEARTBEAT_S = 1.0
PREEMPTED = "preempted.json"  # rank 0's note in the run directory: stopped early with a checkpoint (driver reads it)
TEST_SIGNAL_ENV = "PRETRAIN_TEST_SIGNAL"  # "<rank>:<step>:<SIGNAME>": the tests' real signal to this rank at a step


class Pulse:
    """Where this rank is; written by the training thread, read by the heartbeat thread (plain attribute
    reads and writes are atomic under the GIL, and a heartbeat a phase late is harmless)."""

    def __init__(self) -> None:
        self.step = 0
        self.phase = "start-up"
        self.seq = 0  # one more at every phase mark: the watcher's measure of progress
        self.stop_reason: str | None = None
        self.step_times: deque[float] = deque(maxlen=64)
        # Off until the straggler hook (2+ ranks) turns it on: on CUDA each forward records two events, which a
        # run without the hook would keep unread for ever.
        self.timing = False
        self._compute = 0.0
        self._t0 = 0.0
        self._events: list = []  # CUDA (start, end) event pairs of the forward passes since the last take
        self.spent: dict[str, float] = dict.fromkeys(PHASES, 0.0)  # wall seconds in each phase, for goodput
        self._since = time.perf_counter()
        # Called (by the training thread) when the rank leaves a long phase: the heartbeat's beat sent at once,
        # so the watcher moves to the short step limit without waiting up to HEARTBEAT_S for the next beat (a
        # rank that hung a few fast steps later was otherwise still "in start-up" to it, under the long limit).
        self.on_leave_long: Callable[[], None] | None = None

    def at(self, phase: str, step: int | None = None) -> None:
        now = time.perf_counter()
        self.spent[self.phase] += now - self._since
        self._since = now
        left_long = self.phase in LONG_PHASES and phase not in LONG_PHASES
        self.phase = phase
        self.seq += 1
        if step is not None:
            self.step = step
        if left_long and self.on_leave_long is not None:
            self.on_leave_long()

    def settle(self) -> None:
        """Count the current phase's time so far into `spent` (the phase stays)."""
        now = time.perf_counter()
        self.spent[self.phase] += now - self._since
        self._since = now

    def compute_begin(self, device=None) -> None:
        if not self.timing:
            return
        self._t0 = time.perf_counter()
        if device is not None and device.type == "cuda":
            import torch

            start = torch.cuda.Event(enable_timing=True)
            start.record()
            self._events.append([start, None])

    def compute_end(self, device=None) -> None:
        if not self.timing:
            return
        if self._events and self._events[-1][1] is None:
            import torch

            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._events[-1][1] = end
            return
        self._compute += time.perf_counter() - self._t0

    def take_compute(self) -> float:
        """Seconds of compute since the last take (CUDA events are complete by the end of a step)."""
        total, self._compute = self._compute, 0.0
        for start, end in self._events:
            if end is not None:
                total += start.elapsed_time(end) / 1000
        self._events.clear()
        return total

    def median_step_s(self) -> float | None:
        times = list(self.step_times)
        return statistics.median(times) if times else None

    def request_stop(self, reason: str) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason


PULSE = Pulse()


def install_sigterm() -> None:
    """On a worker actor's main thread (Ray runs actor methods there): SIGTERM asks the loop to checkpoint and
    stop instead of ending the process at once (Ray's own handler raises SystemExit)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: PULSE.request_stop("SIGTERM"))


def inject_signal(rank: int, step: int) -> None:
    """The tests' fault at a step: a real signal this process sends itself (SIGSTOP: stopped, never resumed)."""
    want = os.environ.get(TEST_SIGNAL_ENV)
    if not want:
        return
    r, s, name = want.split(":")
    if int(r) == rank and int(s) == step and not os.environ.get("PRETRAIN_TEST_SIGNAL_DONE"):
        marker = os.environ.get("PRETRAIN_TEST_SIGNAL_MARKER")  # once per test, not once per attempt
        if marker:
            if os.path.exists(marker):
                return
            open(marker, "w").close()
        os.kill(os.getpid(), getattr(signal, name))
        if name == "SIGTERM":  # its handler runs on the main thread: the signal arrived before this step's reduce
            deadline = time.monotonic() + 5
            while PULSE.stop_reason is None and time.monotonic() < deadline:
                time.sleep(0.01)


_stacks_file = None


def arm_stacks(directory: Path) -> Path:
    """SIGUSR1 makes this process write every thread's Python stack to a file of its own in `directory` (the
    run's `hangs/.live/`, which the driver removes at its end), returned (faulthandler's C-level handler: it
    runs even while the training thread is blocked in a collective)."""
    global _stacks_file
    path = directory / f"{socket.gethostname()}-{os.getpid()}.txt"
    if _stacks_file is None:
        directory.mkdir(parents=True, exist_ok=True)
        _stacks_file = open(path, "w")  # noqa: SIM115 - open for the process's life
        faulthandler.register(signal.SIGUSR1, file=_stacks_file, all_threads=True, chain=False)
    return path


def _node_id() -> str | None:
    try:
        import ray

        # Outside a Ray process get_runtime_context() would start a local Ray instance (~20 s, measured).
        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:  # noqa: BLE001 - outside Ray (tests of the loop alone)
        return None


def start_heartbeats(address: str | None, token: str, rank: int, attempt: str,
                     stop: threading.Event | None = None, stacks: Path | None = None) -> threading.Thread | None:
    """Send this rank's pulse to the watcher at `address` ("host:port") every HEARTBEAT_S seconds; none
    without an address. The worker group is told by its rendezvous address (`attempt` where there is none).
    `stacks`: the directory of its faulthandler's file (`arm_stacks`). `stop`, once set, ends the thread (a worker's is never set: it beats until the process ends). A beat
    takes ~10 us of the GIL once a second (tools/bench_pulse.py)."""
    if not address:
        return None
    host, port = address.rsplit(":", 1)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    # The worker group: its rendezvous address (Ray Train's, shared by its ranks, new at every restart).
    group = f"{os.environ.get('MASTER_ADDR', '')}:{os.environ.get('MASTER_PORT', '')}:{attempt if not os.environ.get('MASTER_PORT') else ''}"
    ident = {"t": token, "r": rank, "pid": os.getpid(), "host": socket.gethostname(), "node": _node_id(), "g": group,
             "sf": str(arm_stacks(stacks)) if stacks is not None else None}

    def send() -> None:
        p = PULSE
        msg = {**ident, "s": p.step, "p": p.phase, "q": p.seq, "m": p.median_step_s()}
        sock.sendto(json.dumps(msg).encode(), (host, int(port)))

    def send_now() -> None:  # from the training thread, out of turn (Pulse.on_leave_long): one UDP datagram
        try:
            send()
        except OSError:
            pass  # the watcher is gone: the heartbeat thread says nothing either

    def beat() -> None:
        from pretrain import compat

        while stop is None or not stop.is_set():
            p = PULSE
            deadline = time.monotonic() + HEARTBEAT_S
            try:
                send()
                while (left := deadline - time.monotonic()) > 0:
                    ready, _, _ = select.select([sock], [], [], left)
                    if ready and sock.recv(256).decode(errors="replace") == f"stop {token}":
                        p.request_stop("the driver was asked to stop")
            except OSError:
                time.sleep(HEARTBEAT_S)  # the watcher is gone (the driver ended): nothing to report to
            if p.stop_reason is None and compat.ray_preemption_notice() is not None:
                p.request_stop("Ray's preemption notice")
        if PULSE.on_leave_long is send_now:
            PULSE.on_leave_long = None
        sock.close()

    PULSE.on_leave_long = send_now
    thread = threading.Thread(target=beat, name="pretrain-heartbeat", daemon=True)
    thread.start()
    return thread
