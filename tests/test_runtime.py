"""The local Ray a command starts is stopped whole however the command is stopped: Ctrl-C while Ray is still
starting, or a SIGTERM (``kill``, ``timeout``, a scheduler) mid-run. The command exits 130 with one line,
nothing outlives it, and the same command re-run completes."""

from __future__ import annotations

import os
import signal
import time

import duckdb
import pytest

from tests.reliability.faults import Cli, cmdline, ray_workers, run_cli, session_pids


def _left_after(c: Cli, grace: float) -> list[str]:
    """Command lines of the processes of the command's session still alive ``grace`` seconds on."""
    deadline = time.time() + grace
    while (left := session_pids(c.sid)) and time.time() < deadline:
        time.sleep(0.2)
    return [cmdline(p)[:80] for p in left]


def _stop(c: Cli, send) -> tuple[int, list[str]]:
    """Send the signal; the command's exit code and what of it is still alive 15 s later."""
    send()
    rc = c.proc.wait(120)
    return rc, _left_after(c, 15)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ctrl_c_while_the_local_ray_starts_stops_it_whole(small_catalog, tmp_path):
    out = tmp_path / "shards"
    c = Cli(["shard", "--catalog", str(small_catalog), "--out", str(out)], tmp_path)
    try:
        # Ray's agents are up (renamed ray::…Agent once started), ray.init has not returned yet
        started = c.wait_for(
            lambda: (
                "ray ready" not in c.output
                and any(cmdline(p).startswith("ray::") and "Agent" in cmdline(p) for p in session_pids(c.sid))
            ),
            timeout=120,
            poll=0.005,
        )
        assert started, c.output[-2000:]
        # what a terminal sends on Ctrl-C; the agents of a start cut short outlived the command for a minute
        rc, left = _stop(c, lambda: os.killpg(c.sid, signal.SIGINT))
    finally:
        c.kill()
    assert rc == 130 and "fashionlabel: interrupted" in c.output, (rc, c.output[-2000:])
    assert not left, left


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigterm_stops_a_job_like_ctrl_c(small_shards, tiny_model, tmp_path):
    out = tmp_path / "labels"
    args = ["label", "--shards", str(small_shards), "--model", str(tiny_model), "--out", str(out)]
    args += ["--run-date", "2026-06-01", "--batch-size", "16"]
    c = Cli(args, tmp_path, name="killed")
    try:
        assert c.wait_for(lambda: bool(ray_workers(c.sid, "MapBatches(Labeler)")), timeout=300), c.output
        # To the command alone, as `kill PID` and a container runtime send it. (Sent to the whole group,
        # it also reaches the raylet, and when that dies first Ray ends the driver itself with exit 1:
        # docs/reliability.md. That race is Ray's, so the test leaves it out.)
        rc, left = _stop(c, lambda: os.kill(c.proc.pid, signal.SIGTERM))
    finally:
        c.kill()
    # the driver used to die of SIGABRT in Ray's own SIGTERM handling, its local Ray left running
    assert rc == 130 and "fashionlabel: interrupted" in c.output, (rc, c.output[-2000:])
    assert not left, left

    rc, log = run_cli(args, tmp_path, name="rerun")
    assert rc == 0, log[-2000:]
    run = out / "history" / "run_date=2026-06-01"
    con = duckdb.connect()
    rows, distinct = con.execute(
        f"SELECT count(*), count(DISTINCT product_id) FROM '{run}/*.parquet'"
    ).fetchone()
    packed = con.execute(f"SELECT count(*) FROM '{small_shards}/index.parquet'").fetchone()[0]
    assert rows == distinct == packed


def test_a_training_worker_never_asks_for_more_cpus_than_a_node_has():
    """Each CPU worker asked for its share of the whole cluster's CPUs: on a cluster of several nodes
    that share can exceed every node (4 CPUs for one worker on two nodes of 2; a night's 16 CPU workers
    of 32 make 2 workers ask 258 each), and Ray Train waited for ever for a worker group it cannot place
    (`ray job submit -- python -m jobs.train … --workers 1` on two 2-CPU nodes: "No available node types
    can fulfill resource request {'CPU': 4.0}", for minutes). The share is now the largest that places
    one bundle per worker on the nodes there are."""
    from fashionlabel.runtime import worker_cpus

    assert worker_cpus(1, [2.0]) == 2.0  # one node: the cluster's share, as before
    assert worker_cpus(2, [2.0]) == 1.0
    assert worker_cpus(4, [2.0]) == 0.5  # more workers than CPUs share them
    assert worker_cpus(1, [2.0, 2.0]) == 2.0
    assert worker_cpus(2, [2.0, 2.0]) == 2.0
    assert worker_cpus(3, [2.0, 2.0]) == 1.0  # 4/3 each would place only two
    assert worker_cpus(2, [4.0] + [32.0] * 16) == 32.0
    assert worker_cpus(3, [4.0, 3.0]) == 2.0
    for workers in range(1, 9):
        for nodes in ([2.0, 2.0], [4.0, 3.0], [1.0, 8.0, 8.0], [6.0]):
            c = worker_cpus(workers, nodes)
            assert sum(int(n / c + 1e-9) for n in nodes) >= workers  # every worker placed
            assert c <= sum(nodes) / workers
