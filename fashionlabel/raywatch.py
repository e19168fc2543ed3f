"""A watch on the local Ray a command started: the command ends at once, by name, when that Ray dies.

Used by :func:`fashionlabel.runtime.ray_session` for a local Ray only (a cluster's processes are not the
command's to watch). Linux ``/proc`` and pidfds; elsewhere the command runs as it would unwatched.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time

log = logging.getLogger(__name__)


class LocalRayWatch:
    """Ends the command at once, by name, when the local Ray it started dies under it.

    With its raylet SIGKILLed, a ``shard`` of the full catalog ended 16 s later with Ray's "The task's
    local raylet died. Check raylet.out" after forty lines of the raylet's state dump; with its GCS server
    SIGKILLed the job went on without it and left two Ray agents running for minutes after it ended; with
    both, it stood still at "91/190 shards" for 60 s until Ray's C++ core ended the process ("Failed to
    connect to GCS within 60 seconds", exit 1). Raising in the main thread cannot do better: a main thread
    blocked in ``ray.get`` runs no Python signal handler until Ray itself gives up (measured: 13 s with the
    raylet gone, 60 s with the GCS gone), and ``ray.shutdown()`` then blocks 5 to 15 s in the core
    worker's shutdown.

    So a daemon thread polls the raylet and GCS server that ``ray.init`` started (its own children: a
    ``waitpid``, no signal sent) every ``every`` seconds. When one has died it prints one line, kills what
    is left of that Ray (the processes ``ray.init`` started, and the raylet's children: workers, and the
    agents that otherwise outlive it) and ends the process with ``os._exit(1)``. To the job that is a
    ``kill -9`` of its driver, which every job survives: the same command run again resumes where it
    stopped, and the run folder's lease, held by a process of this host that no longer exists, is free at
    once.

    Ray can be quicker than any poll: with its raylet gone, the core worker ends the driver itself, within
    60 ms, through ``QuickExit`` (``_Exit(1)``: no Python ``finally``, ``atexit``, signal handler or
    ``faulthandler`` runs), when it next touches the object store ("The connection to the plasma store is
    failed. Terminate the process", seen on a raylet SIGTERMed alone: exit 1 and not a word). Only another
    process can speak then, so a small sentinel (``_SENTINEL``) is started beside the command: it holds the
    read end of a pipe that only the command writes to, learns the pids to watch and to clean up, and when
    the pipe closes without the command saying it is done while the raylet or GCS server has gone, prints
    the line and kills what is left of that Ray.
    """

    WATCHED = {"raylet": "raylet", "gcs_server": "GCS server"}
    GRACE = 3.0  # seconds a command asked to stop has to say so itself

    def __init__(self, name: str, procs: dict, node: object, every: float):
        self.name, self.procs, self.node, self.every = name, procs, node, every
        self._lock = threading.Lock()
        self._stopped = False
        self._children: dict[int, str] = {}  # pid -> start time, of the raylet's children when last seen
        self._sentinel = self._start_sentinel()
        self._told: dict[int, str] = {}
        self._thread = threading.Thread(target=self._run, name="local-ray-watch", daemon=True)

    @classmethod
    def start(cls, name: str, every: float = 0.2) -> LocalRayWatch | None:
        """Watch the local Ray that ``ray.init`` started in this process (None when there is none)."""
        try:  # Ray's private node object: should a Ray release change it, the command runs unwatched
            import ray

            node = ray._private.worker._global_node
            procs = {
                kind: info.process
                for kind in cls.WATCHED
                for info in (getattr(node, "all_processes", {}) or {}).get(kind, [])[:1]
                if getattr(info, "process", None) is not None
            }
        except Exception as e:  # noqa: BLE001
            log.debug("the local Ray is not watched: %s", e)
            return None
        if not procs:
            return None
        w = cls(name, procs, node, every)
        w._tell({"watch": {cls.WATCHED[k]: p.pid for k, p in procs.items()}, "name": name})
        w._thread.start()
        return w

    def _start_sentinel(self):
        import subprocess
        import sys

        try:  # in the command's process group, so that a kill of the group ends it too
            return subprocess.Popen(
                [sys.executable, "-S", "-c", _SENTINEL],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                close_fds=True,
            )
        except OSError as e:
            log.debug("no sentinel for the local Ray: %s", e)
            return None

    def _tell(self, msg: dict) -> None:
        import json

        if self._sentinel and self._sentinel.stdin:
            with contextlib.suppress(OSError, ValueError):  # a sentinel gone: the thread still reports
                self._sentinel.stdin.write(json.dumps(msg).encode() + b"\n")
                self._sentinel.stdin.flush()

    def _close_sentinel(self) -> None:
        if self._sentinel and self._sentinel.stdin:
            self._tell({"done": True})
            with contextlib.suppress(OSError):
                self._sentinel.stdin.close()

    def stop(self) -> None:
        """The command stops its Ray itself now. Waits for a report under way, which ends the process."""
        with self._lock:
            self._stopped = True
            self._close_sentinel()
        if self._sentinel:
            with contextlib.suppress(Exception):
                self._sentinel.wait(5)

    def _dead(self) -> dict[str, int]:
        """Kind -> return code of the watched processes that have ended (``poll`` reaps them)."""
        return {k: p.returncode for k, p in self.procs.items() if p.poll() is not None}

    def report_if_lost(self, wait: float = 0.0) -> None:
        """With an error on its way out of the command: report a watched process gone instead (the line,
        then exit 1; does not return). A raylet stopped as asked (SIGTERM, exit 0) ends the command with
        Ray's "The task's local raylet died" within the grace the watch gives an interrupt, and that line
        named a symptom; ``wait`` is how long a raylet that closed its sockets has to finish exiting."""
        deadline = time.monotonic() + wait
        while True:
            with self._lock:
                if self._stopped:
                    return
                dead = self._dead()
                if dead:
                    self._report(dead)
            if time.monotonic() >= deadline:
                return
            time.sleep(0.05)

    def _run(self) -> None:
        last_scan = 0.0
        asked_at: float | None = None
        while True:
            time.sleep(self.every)
            with self._lock:
                if self._stopped:
                    return
                dead = self._dead()
                # Stopped as one asks a process to stop: most likely a Ctrl-C / SIGTERM sent to the whole
                # process group, which the command is handling too ("interrupted", exit 130) and will say
                # so once it reaches its own stop; give it the time to, then report.
                asked = dead and all(rc in _ASKED for rc in dead.values())
                if asked and asked_at is None:
                    asked_at = time.monotonic()
                if dead and (not asked or time.monotonic() - asked_at > self.GRACE):
                    self._report(dead)  # does not return
                if time.monotonic() - last_scan > 1.0:
                    self._children = _children(self.procs["raylet"].pid) if "raylet" in self.procs else {}
                    last_scan = time.monotonic()
                    procs = self._children | {
                        p.pid: s for p in self._started() if (s := _start_time(p.pid)) is not None
                    }
                    if procs != self._told:
                        self._tell({"procs": procs})
                        self._told = procs

    def _started(self) -> list:
        """The processes ray.init started (GCS, raylet, log monitor, …) as Popen objects."""
        infos = [i for infos in (getattr(self.node, "all_processes", {}) or {}).values() for i in infos]
        return [p for i in infos if (p := getattr(i, "process", None)) is not None]

    def _report(self, dead: dict[str, int]) -> None:
        import sys

        if "raylet" in self.procs and "raylet" not in dead:
            self._children = _children(self.procs["raylet"].pid)  # the agents outlive a raylet killed now
        what = _what_ended({f"{self.WATCHED[k]} (pid {self.procs[k].pid})": rc for k, rc in dead.items()})
        line = f"{self.name}: error: the local Ray this command started has stopped: {what}. {_RESUME}"
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        for h in logging.getLogger().handlers:
            with contextlib.suppress(Exception):
                h.flush()
        with contextlib.suppress(Exception):
            os.write(2, f"\n{line}\n".encode(errors="replace"))
        self._close_sentinel()  # said: the sentinel stays silent
        with contextlib.suppress(Exception):
            self._kill_the_rest()
        os._exit(1)

    def _kill_the_rest(self) -> None:
        """SIGKILL what is left of the local Ray: the raylet's children last seen, then what ray.init started."""
        for pid, started in self._children.items():
            if _start_time(pid) == started:  # not a new process that took the pid of one gone
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        for p in self._started():
            if p.poll() is None:
                with contextlib.suppress(OSError):
                    p.kill()


# a raylet or GCS server SIGTERMed exits 0 (a graceful stop) within 20 ms
_ASKED = (0, -signal.SIGTERM, -signal.SIGINT, -signal.SIGHUP)
_RESUME = "The job stopped where it was; run the same command again to resume it"

# Run as `python -S -c` beside a command with a local Ray (see LocalRayWatch): reads JSON lines on stdin
# until the command closes it, and watches the raylet and GCS server itself (pidfds) to know which died
# before the command did. It speaks only when the command ended without saying "done", a process it
# watched is gone, and the command was not killed by SIGKILL: a `kill -9` of the command alone also ends
# its raylet and GCS server (the kernel's fate sharing), just after it, and is not theirs to explain. The
# command's exit status is read from its /proc entry, still there while it exits (the pipe closes before
# its parent can reap it). Ctrl-C and SIGTERM are the command's to handle: they reach this process too
# (same process group) and are ignored; the command says "done" on its way out.
_SENTINEL = f"""
import json, os, select, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
command = os.getppid()
watch, procs, name, done, pidfds, first, buf = {{}}, {{}}, "fashionlabel", False, {{}}, [], b""

def stat(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None

def start_time(pid):
    fields = stat(pid)
    return None if not fields or fields[0] in "ZX" else fields[19]

while True:
    ready = select.select([0, *pidfds], [], [])[0]
    died = [pidfds.pop(fd) for fd in ready if fd in pidfds]
    chunk = os.read(0, 65536) if 0 in ready else None
    if chunk == b"":  # the command has gone: who died in the same moment cannot be ordered
        break
    first += died  # died while the command still ran
    if not chunk:
        continue
    *lines, buf = (buf + chunk).split(b"\\n")
    for line in lines:
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        for what, pid in msg.get("watch", {{}}).items():
            watch[what] = pid
            try:
                pidfds[os.pidfd_open(pid)] = what
            except (AttributeError, OSError):
                pass
        procs = msg.get("procs", procs)
        name = msg.get("name", name)
        done = done or bool(msg.get("done"))

fields = stat(command)
status = int(fields[49]) if fields and len(fields) > 49 else None
killed = status is not None and status & 0x7F == signal.SIGKILL
if not done and not killed and not first and status is not None and pidfds:
    select.select(list(pidfds), [], [], 2.0)  # a raylet SIGTERMed closes its sockets before it exits
# the one that went first (the raylet, when it is not known): the other follows the command, killed by the
# kernel when the command's main thread ends (fate sharing), which can come before the pipe closes
gone = (first or ([w for w, pid in watch.items() if start_time(pid) is None] if status is not None else []))[:1]
if not done and not killed and gone:
    os.write(2, ("%s: error: the local Ray this command started has stopped: its %s (pid %d) has gone, and "
                 "Ray ended the command with it. {_RESUME}\\n" % (name, gone[0], watch[gone[0]])).encode())
    for pid, started in procs.items():
        if start_time(int(pid)) == started:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except OSError:
                pass
"""


def _what_ended(dead: dict[str, int]) -> str:
    """ "its raylet (pid 7) and its GCS server (pid 5) were killed by SIGKILL (…)" from name -> return code."""

    def how(rc: int) -> str:
        if rc == 0:
            return "stopped (exit status 0: asked to stop, as by a SIGTERM)"
        if rc > 0:
            return f"exited with status {rc}"
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"

    ways = {how(rc) for rc in dead.values()}
    if len(ways) == 1:
        verb = "was" if len(dead) == 1 else "were"
        what = " and ".join(f"its {n}" for n in dead) + f" {verb} {ways.pop()}"
    else:
        what = " and ".join(f"its {n} {how(rc)}" for n, rc in dead.items())
    if -signal.SIGKILL in dead.values():  # no one asked the command to stop: say who else sends a SIGKILL
        what += " (by hand, or by the kernel's out-of-memory killer: see dmesg)"
    return what


def _start_time(pid: int) -> str | None:
    """The start time of process ``pid`` (Linux ``/proc``), None when it does not exist."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _children(pid: int) -> dict[int, str]:
    """pid -> start time of the children of process ``pid``, from Linux ``/proc`` (empty elsewhere)."""
    out: dict[int, str] = {}
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/children") as f:
                for c in f.read().split():
                    if (started := _start_time(int(c))) is not None:
                        out[int(c)] = started
    return out
