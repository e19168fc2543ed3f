"""Stop exactly the processes a test started: those whose command line holds a unique marker (a temp dir
of their own), plus their descendants. Never a global ``ray stop``, which would stop every Ray on the host."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path


def pids_of(marker: str) -> list[int]:
    """Processes whose command line holds ``marker``, plus all their descendants."""
    found, parent = set(), {}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            parent[int(p.name)] = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if marker in cmd and int(p.name) != os.getpid():
            found.add(int(p.name))
    grew = True
    while grew:
        kids = {c for c, pp in parent.items() if pp in found} - found
        found |= kids
        grew = bool(kids)
    return sorted(found)


def stop_processes(marker: str) -> None:
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        pids = pids_of(marker)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.time() + wait
        while pids and time.time() < deadline and pids_of(marker):
            time.sleep(0.2)


def assert_none_left(marker: str, grace: float = 60.0) -> None:
    """Fail when processes holding ``marker`` (a command's own Ray temp dir) outlive ``grace`` seconds."""
    deadline = time.time() + grace
    while (left := pids_of(marker)) and time.time() < deadline:
        time.sleep(0.2)
    if left:
        cmds = []
        for pid in left[:5]:
            with contextlib.suppress(OSError):
                cmds.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:100])
        raise AssertionError(f"{len(left)} processes outlived the command: {cmds}")


def run_job(module: str, args: list[str], env: dict[str, str] | None = None, timeout: float = 300):
    """``python -m <module> ARGS`` from the project root, as ``ray job submit`` runs it: its own local Ray in
    a short temp dir (Ray's socket paths must stay under 108 bytes), stopped afterwards even on a timeout.
    Returns the CompletedProcess (text output captured)."""
    import shutil
    import subprocess
    import sys
    import tempfile

    root = Path(__file__).resolve().parents[1]
    tmp = tempfile.mkdtemp(prefix="fljob-", dir="/tmp")
    full = os.environ | (env or {})
    full |= {"RAY_TMPDIR": tmp, "PYTHONPATH": str(root), "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    full.pop("RAY_ADDRESS", None)
    try:
        done = subprocess.run(
            [sys.executable, "-m", module, *args],
            cwd=root,
            env=full,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if done.returncode == 0:  # a finished job stops the local Ray it started: nothing may outlive it
            assert_none_left(tmp)
        return done
    finally:
        stop_processes(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
