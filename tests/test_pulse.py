"""The heartbeat (pretrain.train.pulse): beats reach a real UDP socket on loopback once a second, and a rank
that leaves a long phase (start-up, evaluation, checkpoint) says so at once, not a second later: a rank that
hangs a few fast steps after its first was otherwise still "in start-up" to the watcher, under the long limit."""

from __future__ import annotations

import json
import socket
import threading
import time

from pretrain.train import pulse
from pretrain.train.pulse import HEARTBEAT_S, PULSE, start_heartbeats


def _recv(sock: socket.socket) -> dict:
    return json.loads(sock.recv(4096))


def test_leaving_start_up_is_beaten_at_once():
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(5)
    host, port = sock.getsockname()
    stop = threading.Event()
    saved = (PULSE.phase, PULSE.step, PULSE.seq)
    PULSE.at("start-up", 0)
    thread = start_heartbeats(f"{host}:{port}", "tok", rank=1, attempt="a", stop=stop)
    try:
        first = _recv(sock)  # the periodic beat, sent as the thread starts
        assert (first["r"], first["p"], first["s"], first["t"]) == (1, "start-up", 0, "tok")
        t0 = time.monotonic()
        PULSE.at("data", 1)  # the first step: out of turn
        beat = _recv(sock)
        assert time.monotonic() - t0 < HEARTBEAT_S / 2 and (beat["p"], beat["s"]) == ("data", 1)
        PULSE.at("forward")  # a short phase to another: no beat out of turn (the next is the periodic one)
        sock.settimeout(HEARTBEAT_S / 4)
        try:
            extra = _recv(sock)
        except TimeoutError:
            extra = None
        assert extra is None or time.monotonic() - t0 >= HEARTBEAT_S * 0.9, extra
    finally:
        stop.set()
        thread.join(timeout=5)
        PULSE.phase, PULSE.step, PULSE.seq = saved
        sock.close()
    assert PULSE.on_leave_long is None  # the ended thread's sender is unhooked
    assert pulse.LONG_PHASES >= {"start-up", "evaluation", "checkpoint"}
