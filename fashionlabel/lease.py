"""One nightly job at a time per root: a lease object with a heartbeat, on a local folder or S3 alike.

Two jobs on the same root (a manual re-run while the scheduled one still runs) would each read the other's
half-written parts. The lease makes the second one stop at once, naming the first. It has to survive
``kill -9`` without a janitor, so it is not a lock that someone must release:

- the holder rewrites it every ``beat`` seconds; a lease not rewritten for ``ttl`` seconds is free
  (a job killed on another node, or a node that died);
- a lease of a process on this host that no longer exists is free at once, so the usual "killed, run the
  same command again" on one machine never waits;
- a lease of a Ray driver on another host is free at once when the Ray cluster this job runs on has that
  driver's job marked finished (a driver killed: as soon as its node's raylet sees it go; a node that died:
  once the cluster declares it dead), so a job killed on another node of the same cluster and run again
  does not wait out the TTL;
- a lease that missed two beats is waited out rather than refused (a retry on a new node after its first
  attempt's node died starts once it lapses); one renewed lately is refused at once;
- two jobs that start in the same second both write it; each reads it back after ``settle`` seconds and
  only the one whose write landed last goes on.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from typing import Any

from fashionlabel import storage

log = logging.getLogger(__name__)


def _utc(t: float) -> str:
    return time.strftime("%H:%M:%S UTC", time.gmtime(t))


class LeaseHeld(RuntimeError):
    """Another live job holds the lease."""


def _last_seen(held: dict[str, Any]) -> float:
    """When the holder last renewed ``held`` (epoch seconds; 0 for a record without a heartbeat)."""
    return float(held.get("heartbeat", 0))


def alive(pid: int) -> bool:
    """Whether process ``pid`` of this host exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    return True


def _submission_id() -> str | None:
    """The submission id of the Ray job this process is the driver of, if it is one (``ray job submit``
    passes the job's config, its metadata included, to the driver in this variable)."""
    try:
        config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
        return str(config["metadata"]["job_submission_id"])
    except (ValueError, KeyError, TypeError):
        return None


def _ray_driver() -> dict[str, str]:
    """This driver's Ray job id and node id, when it is connected to Ray (Ray is not imported for it)."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return {}
    with contextlib.suppress(Exception):
        ctx = ray.get_runtime_context()
        return {"ray_job": ctx.get_job_id(), "ray_node": ctx.get_node_id()}
    return {}


def _ray_driver_gone(held: dict[str, Any]) -> bool:
    """Whether the Ray cluster this process is connected to has the job of the driver that holds ``held``
    marked finished. Only a driver of this very cluster counts: its node is one of the cluster's (node ids
    are random and never reused, while job ids restart at 01000000 with every cluster and pids repeat
    from container to container). False when unknown."""
    ray = sys.modules.get("ray")
    if not held.get("ray_job") or not held.get("ray_node") or ray is None or not ray.is_initialized():
        return False
    try:
        import ray._private.state

        if held["ray_node"] not in {n.get("NodeID") for n in ray.nodes()}:  # dead nodes are listed too
            return False
        jobs = ray._private.state.state.job_table()
    except Exception:  # noqa: BLE001 - an unknown answer is no answer: the TTL decides
        return False
    return any(
        j.get("JobID") == held["ray_job"] and j.get("DriverPid") == held.get("pid") and j.get("IsDead")
        for j in jobs
    )


class Lease:
    """``with Lease(uri, what):`` holds ``uri`` for the block, or raises :class:`LeaseHeld` naming the holder."""

    def __init__(self, uri: str, what: str, ttl: float = 120.0, beat: float = 20.0, settle: float = 0.5):
        self.uri, self.what, self.ttl, self.beat, self.settle = uri, what, ttl, beat, settle
        self.me = {"owner": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid()}
        if job := _submission_id():
            self.me["job"] = job
        self.me |= _ray_driver()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self) -> dict[str, Any] | None:
        try:
            held = storage.read_json(self.uri)
        except (OSError, storage.StorageError, ValueError):  # absent, or cut short by a kill mid-write
            return None
        if not isinstance(held, dict) or "owner" not in held:
            return None
        # only a lease as this code writes it holds: a heartbeat or pid of another type (a file edited by
        # hand, another tool's) would fail the job on float()/int() below instead of naming anything
        numbers = [held.get("heartbeat"), held.get("pid", 0)]
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in numbers):
            log.warning(
                "%s: the lease %s is not one this code writes; taken as free: %r", self.what, self.uri, held
            )
            return None
        return held

    def _free(self, held: dict[str, Any]) -> bool:
        if held["owner"] == self.me["owner"]:
            return True
        if time.time() - _last_seen(held) > self.ttl:
            return True
        if held.get("host") == self.me["host"]:
            return not alive(int(held.get("pid", -1)))
        return _ray_driver_gone(held)

    def _refuse(self, held: dict[str, Any]) -> LeaseHeld:
        age = time.time() - _last_seen(held)
        # a holder submitted with `ray job submit` is named by its submission id: what `ray job status`,
        # `ray job logs` and `ray job stop` take (a pid on a head node is of little use to the operator)
        job = f"Ray job {held['job']}, " if held.get("job") else ""
        lapses = _last_seen(held) + self.ttl
        return LeaseHeld(
            f"{self.what} is being run by another job ({job}pid {held.get('pid')} on {held.get('host')}, started "
            f"{held.get('started', '?')}, last seen {age:.0f} s ago): wait for it to finish. If that job is "
            f"gone, its lease {self.uri} lapses {self.ttl:.0f} s after it was last seen, in "
            f"{max(0.0, lapses - time.time()):.0f} s (at {_utc(lapses)}); run this again then"
        )

    def _write(self) -> None:
        storage.write_json(self.uri, self.me | {"heartbeat": time.time()})

    def __enter__(self) -> Lease:
        waited_on = None
        while (held := self._read()) and not self._free(held):
            age = time.time() - _last_seen(held)
            if age < 2 * self.beat:  # renewed lately: its holder is at work
                raise self._refuse(held)
            # two beats missed: a holder killed on another node (a retry on a new cluster). Wait for its
            # lease to lapse rather than fail the retry; a holder that beats again is refused above
            wait = min(self.ttl - age, self.beat) + 0.1
            if held.get("owner") != waited_on:  # said once per holder, with the whole wait
                waited_on = held.get("owner")
                log.warning(
                    "%s: the lease %s is held by pid %s on %s, not renewed for %.0f s (renewed every %.0f s "
                    "while its job runs): waiting up to %.0f s more, until %s, for it to lapse",
                    self.what,
                    self.uri,
                    held.get("pid"),
                    held.get("host"),
                    age,
                    self.beat,
                    self.ttl - age,
                    _utc(_last_seen(held) + self.ttl),
                )
            time.sleep(wait)
        self.me["started"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self._write()
        time.sleep(self.settle)  # a job that wrote in the same moment: the last write wins
        held = self._read()
        if not held or held["owner"] != self.me["owner"]:
            raise self._refuse(held or self.me)
        self._thread = threading.Thread(target=self._heartbeat, name="lease", daemon=True)
        self._thread.start()
        return self

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.beat):
            try:
                self._write()
            except (OSError, storage.StorageError) as e:  # a store that blinks: the next beat tries again
                log.warning("cannot renew the lease %s: %s", self.uri, storage.redact(e))

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        held = self._read()
        if held and held["owner"] == self.me["owner"]:
            storage.delete(self.uri)
