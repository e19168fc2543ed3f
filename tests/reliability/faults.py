"""Process tools for fault injection, read straight from ``/proc`` (Linux): no extra dependency.

A command under test is started in its own session (``start_new_session=True``), so the command, the
local Ray it starts (GCS, raylet, workers, agents) and nothing else share its session id. That lets a
test find a Ray worker to kill, sum the memory of the whole tree, list its listening sockets, and end
every process it started without touching anyone else's.
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def session_pids(sid: int) -> list[int]:
    """Live processes whose session id is ``sid`` (the leader included)."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            with contextlib.suppress(OSError):
                # zombies (exited, not yet reaped by their parent) hold nothing and cannot be killed
                if (
                    os.getsid(int(d)) == sid
                    and Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
                ):
                    out.append(int(d))
    return out


def ray_workers(sid: int, name: str = "") -> list[int]:
    """Ray worker processes of session ``sid`` that run a task or actor whose name contains ``name``.

    A busy Ray worker renames itself ``ray::<task or actor>``; idle workers are ``ray::IDLE``.
    """
    return [
        p
        for p in session_pids(sid)
        if (c := cmdline(p)).startswith("ray::") and "IDLE" not in c and name in c
    ]


def kill_one(sid: int, name: str) -> bool:
    """SIGKILL one busy Ray worker of session ``sid`` running ``name``; False if none runs right now."""
    for p in ray_workers(sid, name):
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)
            return True
    return False


def rss_bytes(pids: Sequence[int]) -> int:
    """Sum of resident set sizes (an upper bound: pages shared between processes count once each)."""
    total = 0
    for p in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
    return total


def kill_session(sid: int, timeout: float = 20.0) -> None:
    """SIGKILL every process of session ``sid`` until none is left (Ray may still be forking)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        pids = session_pids(sid)
        if not pids:
            return
        for p in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(p, signal.SIGKILL)
        time.sleep(0.2)
    raise RuntimeError(f"processes of session {sid} still alive: {session_pids(sid)}")


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    return inodes


def _hex_addr(h: str, v6: bool) -> str:
    ip, port = h.split(":")
    if not v6:
        return ".".join(str(int(ip[i : i + 2], 16)) for i in (6, 4, 2, 0)) + f":{int(port, 16)}"
    words = [ip[i : i + 8] for i in range(0, 32, 8)]
    raw = b"".join(bytes.fromhex(w)[::-1] for w in words)
    return f"[{ipaddress.IPv6Address(raw)}]:{int(port, 16)}"


def listening(pids: Sequence[int]) -> list[tuple[int, str]]:
    """(pid, "ip:port") of every TCP socket in LISTEN state owned by ``pids``."""
    owner = {ino: p for p in pids for ino in _socket_inodes(p)}
    out = []
    for table, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                f = line.split()
                if f[3] == "0A" and f[9] in owner:  # 0A: TCP_LISTEN
                    out.append((owner[f[9]], _hex_addr(f[1], v6)))
    return out


def is_loopback(addr: str) -> bool:
    ip = ipaddress.ip_address(addr.rsplit(":", 1)[0].strip("[]"))
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


class Cli:
    """``python -m fashionlabel.cli ARGS`` in its own session, with its own Ray temp dir and log file.

    A command whose local Ray could not even start (Ray gives its raylet 30 s to register; a heavily
    loaded machine can miss that) is started again, up to ``RAY_START_RETRIES`` times, and says so in its
    log: that is the machine, not a fault under test.
    """

    RAY_START_RETRIES = 3

    def __init__(
        self,
        args: Sequence[str],
        tmp: Path,
        env: dict[str, str] | None = None,
        name: str = "cli",
        argv: Sequence[str] | None = None,
    ):
        self.tmp = Path(tmp)
        self.tmp.mkdir(parents=True, exist_ok=True)
        # Ray's socket paths must fit in 107 bytes: its temp dir is short, under /tmp, removed at exit.
        self.ray_tmp = Path(tempfile.mkdtemp(prefix="flr-"))
        atexit.register(shutil.rmtree, self.ray_tmp, True)
        self.log = self.tmp / f"{name}.log"
        self.log.write_bytes(b"")
        self.env = os.environ | {
            "PYTHONPATH": str(ROOT),
            "RAY_TMPDIR": str(self.ray_tmp),
            "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
        }
        self.env.pop("RAY_ADDRESS", None)
        self.env |= env or {}
        self.argv = list(argv) if argv else [sys.executable, "-m", "fashionlabel.cli", *args]
        self.restarts = 0
        self.peak_rss = 0
        self._done = False
        self._sampler: threading.Thread | None = None
        self._start()

    def _start(self) -> None:
        self._offset = self.log.stat().st_size
        with open(self.log, "ab") as f:
            self.proc = subprocess.Popen(
                self.argv, cwd=ROOT, env=self.env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.sid = self.proc.pid

    def _restarted(self) -> bool:
        """The command exited because its local Ray did not start: start it again (True) if allowed."""
        if self.proc.poll() is None or self.restarts >= self.RAY_START_RETRIES:
            return False
        with open(self.log, "rb") as f:
            f.seek(self._offset)
            tail = f.read().decode(errors="replace")
        if "timed out during startup" not in tail:
            return False
        kill_session(self.sid)
        self.restarts += 1
        with open(self.log, "a") as f:
            f.write(
                f"\n[test harness] local Ray did not start in time; starting the command again "
                f"({self.restarts}/{self.RAY_START_RETRIES})\n"
            )
        self._start()
        return True

    def sample_memory(self, every: float = 0.25) -> None:
        """Track the peak summed RSS of the whole process tree in a background thread."""

        def run() -> None:
            while not self._done:
                self.peak_rss = max(self.peak_rss, rss_bytes(session_pids(self.sid)))
                time.sleep(every)

        self._sampler = threading.Thread(target=run, daemon=True)
        self._sampler.start()

    def wait_for(self, cond: Callable[[], bool], timeout: float = 120.0, poll: float = 0.01) -> bool:
        """Poll ``cond`` until true (True) or the command exits / times out (False)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if cond():
                return True
            if self.proc.poll() is not None:
                if not self._restarted():
                    return False
                deadline = time.time() + timeout  # the wait starts again with the command
            time.sleep(poll)
        return False

    def kill(self) -> None:
        """kill -9 the command (the driver), then every process it left behind."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)
        kill_session(self.sid)
        self._done = True

    def finish(self, timeout: float = 300.0) -> int:
        deadline = time.time() + timeout
        try:
            while True:
                rc = self.proc.wait(max(1.0, deadline - time.time()))
                if not self._restarted():
                    if rc == 0:  # a finished command stops the local Ray it started
                        self._assert_session_empty()
                    return rc
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        finally:
            kill_session(self.sid)
            self._done = True
            if self._sampler:
                self._sampler.join(5)

    def _assert_session_empty(self, grace: float = 60.0) -> None:
        deadline = time.time() + grace
        while (left := session_pids(self.sid)) and time.time() < deadline:
            time.sleep(0.2)
        if left:
            raise AssertionError(
                f"{len(left)} processes outlived the command: {[cmdline(p) for p in left[:5]]}"
            )

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace")


def run_cli(
    args: Sequence[str],
    tmp: Path,
    env: dict[str, str] | None = None,
    name: str = "cli",
    timeout: float = 300.0,
) -> tuple[int, str]:
    c = Cli(args, tmp, env, name)
    rc = c.finish(timeout)
    return rc, c.output
