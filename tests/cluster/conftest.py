"""A real Ray head on this machine, started with `ray start --head` and token authentication on.

The head gets its own temp dir, its own free ports and its own token (through RAY_AUTH_TOKEN, so the
user's ~/.ray/auth_token is neither read nor written). Teardown kills exactly the processes this
fixture started, found by process group and by the temp dir in their command line or working
directory, never by name: other people's Ray instances on the machine are left alone.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import free_port

VENV_BIN = Path(sys.executable).parent


@dataclass
class RayHead:
    address: str  # the job API, http://127.0.0.1:<dashboard port>
    token: str
    tmp: Path  # temp dir of the head (sessions, logs) and the fixture's scratch files

    def env(self, token: bool = True, **extra: str) -> dict[str, str]:
        """Environment for a client command: the address unset, the token present or not."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "WANDB_"))}
        # An empty HOME: the client must not find a ~/.ray/auth_token of whoever runs the tests.
        env["HOME"] = str(self.tmp / "home")
        if token:
            env["RAY_AUTH_TOKEN"] = self.token
        env.update(extra)
        return env


def _pids_under(tmp: Path, pgid: int) -> list[int]:
    """Processes in our process group, or whose command line or cwd names our temp dir."""
    mine = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        pid = int(entry.name)
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            cwd = os.readlink(entry / "cwd")
            group = os.getpgid(pid)
        except (OSError, ProcessLookupError):
            continue
        if group == pgid or str(tmp) in cmdline or cwd.startswith(str(tmp)):
            mine.append(pid)
    return mine


def _kill(tmp: Path, pgid: int) -> None:
    for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 2.0)):
        pids = _pids_under(tmp, pgid)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while pids and time.monotonic() < deadline:
            time.sleep(0.2)
            pids = [p for p in pids if Path(f"/proc/{p}").exists() and _alive(p)]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie is dead, waiting for its parent to reap it


@pytest.fixture(scope="module")
def ray_head():
    # A short path: Ray's unix sockets live under it and socket paths are capped at 107 bytes.
    tmp = Path(tempfile.mkdtemp(prefix="rayjobs-", dir="/tmp"))
    (tmp / "home").mkdir()
    bindir = tmp / "bin"
    bindir.mkdir()
    if not (VENV_BIN / "pretrain").exists():
        # Without `pip install -e .` there is no console script; this one does what it would do.
        shim = bindir / "pretrain"
        shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -c "from pretrain.cli import main; main()" "$@"\n')
        shim.chmod(0o755)
    token = secrets.token_hex(16)
    dash = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(
        RAY_AUTH_MODE="token",  # what a 2.60 head does by default once it has a token; explicit here
        RAY_AUTH_TOKEN=token,
        PATH=f"{bindir}{os.pathsep}{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        HOME=str(tmp / "home"),
    )
    cmd = [
        str(VENV_BIN / "ray"), "start", "--head", "--disable-usage-stats",
        "--node-ip-address=127.0.0.1", f"--port={free_port()}",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
        f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
        "--num-cpus=2", f"--temp-dir={tmp}",
    ]
    # A new session: every daemon `ray start` leaves behind shares its process group.
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, start_new_session=True)
    pgid = -1
    try:
        assert proc.returncode == 0, proc.stdout + proc.stderr
        pgid = _session_pgid(tmp)
        yield RayHead(address=f"http://127.0.0.1:{dash}", token=token, tmp=tmp)
    finally:
        _kill(tmp, pgid)
        shutil.rmtree(tmp, ignore_errors=True)


def _session_pgid(tmp: Path) -> int:
    """The process group of the head's daemons (the GCS names the temp dir on its command line)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if "gcs_server" in cmdline and str(tmp) in cmdline:
                return os.getpgid(int(entry.name))
    raise AssertionError(f"no GCS process of the head under {tmp}")
