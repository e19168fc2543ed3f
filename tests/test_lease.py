"""The nightly lease: one job per root, free again at once after a local kill, after its TTL elsewhere."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time

import pytest

from fashionlabel.lease import Lease, LeaseHeld
from fashionlabel.nightly import NightlyError, run_nightly


def _read(uri):
    with open(uri) as f:
        return json.load(f)


def test_a_live_holder_is_refused_by_name_and_the_lease_goes_with_its_block(tmp_path):
    uri = str(tmp_path / "lease")
    with Lease(uri, "root R", settle=0.05) as first:
        with pytest.raises(LeaseHeld, match=rf"root R is being run by another job \(pid {os.getpid()} on "):
            Lease(uri, "root R", settle=0.05).__enter__()
        assert _read(uri)["owner"] == first.me["owner"]  # untouched by the refusal
    assert not os.path.exists(uri)
    with Lease(uri, "root R", settle=0.05):  # free again
        pass


def test_a_holder_whose_lease_was_taken_over_leaves_the_new_holders_lease_in_place(tmp_path):
    """A holder that stalled past its TTL has lost the lease to another job: ending its block must not
    delete that job's lease, or a third job would start beside it."""
    uri = tmp_path / "lease"
    other = {"owner": "y", "host": "elsewhere", "pid": 42, "heartbeat": time.time()}
    with Lease(str(uri), "root R", beat=60, settle=0.05):
        uri.write_text(json.dumps(other))  # taken over once this holder's lease had lapsed
    assert _read(uri) == other
    with pytest.raises(LeaseHeld, match=r"pid 42 on elsewhere"):
        Lease(str(uri), "root R", settle=0.05).__enter__()


def test_a_holder_killed_on_this_host_frees_it_at_once(tmp_path):
    uri = tmp_path / "lease"
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    pid = int(dead.stdout)  # a process that has exited: what a kill -9 leaves behind
    uri.write_text(
        json.dumps({"owner": "x", "host": socket.gethostname(), "pid": pid, "heartbeat": time.time()})
    )
    with Lease(str(uri), "root R", settle=0.05) as lease:
        assert json.loads(uri.read_text())["owner"] == lease.me["owner"]


def test_a_lease_file_of_another_shape_is_named_and_taken_as_free(tmp_path, caplog):
    """A lease whose heartbeat or pid is not a number (edited by hand, written by another tool) failed
    the job with float()'s "could not convert string to float: 'soon'", naming no lease."""
    for odd in ({"heartbeat": "soon"}, {"heartbeat": time.time(), "pid": "42"}, {"heartbeat": True}):
        uri = tmp_path / "lease"
        uri.write_text(json.dumps({"owner": "x", "host": "elsewhere", "pid": 42} | odd))
        caplog.clear()
        with Lease(str(uri), "root R", settle=0.05) as lease:
            assert _read(uri)["owner"] == lease.me["owner"]
        assert f"the lease {uri} is not one this code writes" in caplog.text


def test_a_holder_on_another_host_holds_it_until_its_heartbeat_lapses(tmp_path, caplog):
    uri = tmp_path / "lease"
    other = {"owner": "x", "host": "node-7", "pid": 1, "started": "2026-11-24T01:00:00Z"}
    uri.write_text(json.dumps(other | {"heartbeat": time.time() - 30}))
    with pytest.raises(LeaseHeld, match=r"pid 1 on node-7, started 2026-11-24T01:00:00Z, last seen 30 s ago"):
        Lease(str(uri), "root R", ttl=120, beat=20, settle=0.05).__enter__()
    uri.write_text(json.dumps(other | {"heartbeat": time.time() - 121}))
    with Lease(str(uri), "root R", ttl=120, settle=0.05):
        pass
    # two beats missed: the holder is taken for dead and its lease waited out, not refused
    # (timed from before the write: a stall between the write and the clock read cannot shorten the wait
    # the test sees, which is at least ttl - 2.5 s from the heartbeat)
    t0 = time.time()
    uri.write_text(json.dumps(other | {"heartbeat": t0 - 2.5}))
    with (
        caplog.at_level("INFO", logger="fashionlabel.lease"),
        Lease(str(uri), "root R", ttl=4, beat=1, settle=0.05),
    ):
        assert 1.0 < time.time() - t0 < 3.5
    # what is waited on and for how long, said once for the whole wait (it was "waiting 1 s for the lease of
    # a job last seen 2 s ago" at every beat, naming neither the holder nor the end of the wait)
    said = [r.getMessage() for r in caplog.records if "waiting" in r.getMessage()]
    assert len(said) == 1, said
    assert re.fullmatch(
        rf"root R: the lease {uri} is held by pid 1 on node-7, not renewed for \d s \(renewed every 1 s while "
        r"its job runs\): waiting up to \d s more, until \d\d:\d\d:\d\d UTC, for it to lapse",
        said[0],
    ), said


@pytest.mark.timeout(180)
def test_a_ray_driver_killed_on_another_node_frees_it_once_its_cluster_marks_its_job_finished(
    ray_session, tmp_path
):
    uri = tmp_path / "lease"
    # a driver of the same cluster that takes the lease as if on another node, then is killed there
    holder = f"""
import socket, time, ray
socket.gethostname = lambda: "node-7"
ray.init(address={ray_session.get_runtime_context().gcs_address!r}, logging_level="ERROR", log_to_driver=False)
from fashionlabel.lease import Lease
with Lease({str(uri)!r}, "root R", settle=0.05):
    print("held", flush=True)
    time.sleep(600)
"""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = os.environ | {"PYTHONPATH": root}
    p = subprocess.Popen([sys.executable, "-c", holder], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert p.stdout.readline().strip() == "held"
        held = _read(uri)
        assert held["host"] == "node-7" and held["ray_job"] and held["ray_node"]
        with pytest.raises(
            LeaseHeld, match=r"pid \d+ on node-7, .* lapses 120 s after it was last seen, in 1\d\d s"
        ):
            Lease(str(uri), "root R", settle=0.05).__enter__()  # alive: refused
    finally:
        p.kill()
        p.wait()
    t0 = time.time()
    while True:  # it was refused for 40 s (two beats), then waited out until 120 s after its last beat
        try:
            with Lease(str(uri), "root R", settle=0.05):
                break
        except LeaseHeld:
            assert time.time() - t0 < 20, "still held 20 s after its driver was killed"
            time.sleep(0.2)
    print(f"free {time.time() - t0:.1f} s after the kill")

    # the same job id and pid on another cluster (job ids restart with every cluster, pids repeat from
    # container to container) are not that driver: its lease is left to its heartbeat
    uri.write_text(json.dumps(held | {"ray_node": "ab" * 28, "heartbeat": time.time()}))
    with pytest.raises(LeaseHeld):
        Lease(str(uri), "root R", settle=0.05).__enter__()


def test_the_holder_renews_it_and_of_two_at_once_only_one_goes_on(tmp_path):
    uri = str(tmp_path / "lease")
    with Lease(uri, "root R", beat=0.1, settle=0.05):
        t = _read(uri)["heartbeat"]
        time.sleep(0.5)
        assert _read(uri)["heartbeat"] > t  # a long night is not taken as dead
    results = []

    def start():
        try:
            with Lease(uri, "root R", settle=0.5):
                results.append("ran")
                time.sleep(0.5)
        except LeaseHeld:
            results.append("refused")

    threads = [threading.Thread(target=start) for _ in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert sorted(results) == ["ran", "refused"]


def test_a_second_nightly_on_the_same_root_is_refused_before_it_does_anything(tmp_path):
    root = tmp_path / "root"
    lease = Lease(str(root / "work" / "_nightly.lease"), "the scheduled night", settle=0.05)
    refusal = pytest.raises(NightlyError, match=r"is being run by another job \(pid \d+ on .*wait for it")
    with lease, refusal:
        run_nightly(str(tmp_path / "catalog.csv"), str(tmp_path / "model"), str(root), "2026-11-24")
    assert sorted(p.name for p in root.rglob("*")) == ["work"]  # nothing written but the lease's folder


def test_a_holder_submitted_as_a_ray_job_is_named_by_its_submission_id(tmp_path, monkeypatch):
    """A second nightly submitted while the first runs names the first by what `ray job stop` takes."""
    config = {"runtime_env": {}, "metadata": {"job_submission_id": "nightly-2026-03-01", "job_name": "x"}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(config))
    uri = str(tmp_path / "lease")
    with Lease(uri, "root R", settle=0):
        monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(config | {"metadata": {}}))
        with (
            pytest.raises(
                LeaseHeld, match=rf"another job \(Ray job nightly-2026-03-01, pid {os.getpid()} on "
            ),
            Lease(uri, "root R", settle=0),
        ):
            pass
