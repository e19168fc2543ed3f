"""The local Ray a command starts is stopped whole however the command is stopped: Ctrl-C while Ray is still
starting, or a SIGTERM (``kill``, ``timeout``, a scheduler) mid-run. The command exits 130 with one line,
nothing outlives it, and the same command re-run completes. When that Ray itself dies under the command
(its raylet or GCS server killed), the command says so in one line and exits 1 at once."""

from __future__ import annotations

import os
import signal
import time

import duckdb
import pytest

from tests.conftest import sample_rows, write_catalog
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


def _ray_process(c: Cli, binary: str) -> int | None:
    """The pid of the command's local Ray process whose executable is named ``binary`` (raylet, gcs_server)."""
    return next((p for p in session_pids(c.sid) if cmdline(p).split(" ")[0].endswith(f"/{binary}")), None)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_local_ray_killed_under_a_command_ends_it_at_once_by_name(tmp_path):
    # the sample's photos four times over, under new ids: packing long enough to be killed mid-way
    rows = [r | {"product_id": f"{i}-{r['product_id']}"} for i in range(4) for r in sample_rows()]
    cat = write_catalog(tmp_path / "catalog.csv", rows)
    out = tmp_path / "shards"
    args = ["shard", "--catalog", str(cat), "--out", str(out), "--samples-per-shard", "50"]

    def parts() -> int:
        return len(list((out / "_parts").glob("shard-*.parquet"))) if (out / "_parts").is_dir() else 0

    said = "fashionlabel shard: error: the local Ray this command started has stopped: its {} (pid {}) "
    resume = "The job stopped where it was; run the same command again to resume it"
    # Each kill resumes what the one before left. A raylet SIGTERMed alone closes its object store first,
    # and Ray's core worker ends the driver itself at once (_Exit(1)): no word from the command's own
    # process can come out then, the sentinel beside it speaks.
    for binary, named, sig, how in (
        (
            "raylet",
            "raylet",
            signal.SIGKILL,
            "was killed by SIGKILL (by hand, or by the kernel's out-of-memory ",
        ),
        ("gcs_server", "GCS server", signal.SIGKILL, "was killed by SIGKILL"),
        ("raylet", "raylet", signal.SIGTERM, ""),
    ):
        c = Cli(args, tmp_path, name=f"kill-{binary}-{sig.name}")
        try:
            base = parts()
            assert c.wait_for(lambda base=base: parts() >= base + 2, timeout=300), c.output[-2000:]
            pid = _ray_process(c, binary)
            assert pid, [cmdline(p)[:80] for p in session_pids(c.sid)]
            os.kill(pid, sig)
            t0 = time.time()
            # Ray alone: 16 s and its own "local raylet died" (raylet SIGKILLed); a job that went on without
            # its GCS, agents left running for minutes; exit 1 and not a word (raylet SIGTERMed)
            rc = c.proc.wait(60)
            took = time.time() - t0
            left = _left_after(c, 15)
        finally:
            c.kill()
        last = c.output.strip().splitlines()[-1]
        assert rc == 1 and took < 5, (rc, took, c.output[-2000:])
        assert last.startswith(said.format(named, pid) + how) and last.endswith(resume), c.output[-2000:]
        assert not left, left
        assert parts() < len(rows) // 50, "the kill came after the job had finished"

    rc, log = run_cli(args, tmp_path, name="rerun")
    assert rc == 0, log[-2000:]
    packed = duckdb.connect().execute(f"SELECT product_id FROM '{out}/index.parquet'").fetchall()
    expected = {r["product_id"] for r in rows if os.path.exists(r["image_uri"])}
    assert sorted(p for (p,) in packed) == sorted(expected)


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


_PROBE = """
import os, signal, sys, time
import ray
from fashionlabel.runtime import ray_session

with ray_session(num_cpus=1, name="fashionlabel probe"):
    if sys.argv[1] == "stop-raylet":  # as a SIGTERM to the raylet alone does
        os.kill(ray._private.worker._global_node.all_processes["raylet"][0].process.pid, signal.SIGTERM)
        time.sleep(0.5)  # inside the grace an interrupt gets: Ray raises its symptom first
        raise ray.exceptions.LocalRayletDiedError()
    raise ValueError("the job's own error")
"""


@pytest.mark.timeout(300)
def test_ray_naming_its_own_loss_first_is_answered_with_the_loss(tmp_path):
    """A raylet SIGTERMed alone stops as asked (exit 0), so the watch gives the command 3 s to report an
    interrupt; within them Ray itself may raise "The task's local raylet died. Check raylet.out", and
    that symptom was the command's last line. The loss is named instead; a job's own error with its Ray
    alive goes on as it is."""
    import sys

    script = tmp_path / "probe.py"
    script.write_text(_PROBE)
    said = "fashionlabel probe: error: the local Ray this command started has stopped: its raylet (pid "
    outputs = {}
    for case in ("stop-raylet", "own"):
        c = Cli([], tmp_path, name=case, argv=[sys.executable, str(script), case])
        try:
            rc = c.proc.wait(240)
            left = _left_after(c, 15)
        finally:
            c.kill()
        outputs[case] = (rc, c.output.strip(), left)
    rc, out, left = outputs["stop-raylet"]
    last = out.splitlines()[-1]
    assert rc == 1 and last.startswith(said), out[-2000:]
    assert " was stopped (exit status 0" in last or " was killed by SIGTERM" in last, last
    assert "local raylet died" not in out.split(said)[-1] and not left, (out[-2000:], left)
    rc, out, left = outputs["own"]
    assert rc == 1 and out.endswith("ValueError: the job's own error"), out[-2000:]
    assert "has stopped" not in out and not left, (out[-2000:], left)
