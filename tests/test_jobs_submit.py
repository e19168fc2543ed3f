"""``ray job submit`` of the nightly job to a real Ray cluster started with ``ray start --head`` on loopback.

The cluster runs with token authentication on (Ray 2.60's default for new clusters, made explicit here
with ``RAY_AUTH_MODE=token`` and a token in ``RAY_AUTH_TOKEN``), its own temp dir and free ports, and is
stopped by killing exactly the processes it started (found by its unique temp dir), never by a global
``ray stop``, which would stop every Ray on the machine.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import duckdb
import pytest
from conftest import sample_rows, write_catalog
from ports import free_port
from procs import stop_processes

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")


@pytest.fixture(scope="module")
def ray_cluster():
    tmp = tempfile.mkdtemp(prefix="flray-", dir="/tmp")  # short: Ray's unix sockets live under it
    dash = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") and k != "PYTHONPATH"}
    env |= {
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(16),
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    cmd = [
        RAY,
        "start",
        "--head",
        "--node-ip-address=127.0.0.1",
        f"--port={free_port()}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}",
        "--include-dashboard=true",
        f"--ray-client-server-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        "--num-cpus=2",
        f"--temp-dir={tmp}",
        "--disable-usage-stats",
    ]
    try:
        subprocess.run(cmd, env=env, check=True, timeout=240, capture_output=True)
        yield {"address": f"http://127.0.0.1:{dash}", "env": env}
    finally:
        stop_processes(tmp)
        shutil.rmtree(tmp, ignore_errors=True)


def _ray(args: list[str], env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([RAY, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
@pytest.mark.timeout(1500)  # a job on a contended 2-core host takes minutes; uncontended about one
def test_ray_job_submit_nightly(ray_cluster, tiny_model, tmp_path):
    env, address = ray_cluster["env"], ray_cluster["address"]
    assert _ray(["job", "list", "--address", address], env).returncode == 0  # with the token: allowed
    # without the cluster's token the job API refuses every call
    denied = _ray(["job", "list", "--address", address], env | {"RAY_AUTH_TOKEN": "not-the-token"})
    assert denied.returncode != 0
    good = [r for r in sample_rows() if Path(r["image_uri"]).exists()][2000:2030]
    catalog = write_catalog(tmp_path / "catalog.csv", good)
    root = tmp_path / "root"
    runtime_env = {
        "env_vars": {"RAY_DATA_DISABLE_PROGRESS_BARS": "1"},
        "excludes": [".git", "examples/sample/images", "demo-out", "*.tar", "tests"],
    }
    sid = f"nightly-test-{secrets.token_hex(4)}"
    sub = _ray(
        [
            "job",
            "submit",
            "--address",
            address,
            "--submission-id",
            sid,
            "--no-wait",
            "--working-dir",
            ".",
            "--runtime-env-json",
            json.dumps(runtime_env),
            "--",
            "python",
            "-m",
            "jobs.nightly",
            "--catalog",
            str(catalog),
            "--model",
            str(tiny_model),
            "--root",
            str(root),
            "--date",
            "2026-04-01",
            "--samples-per-shard",
            "30",
            "--actors",
            "1",
        ],
        env,
    )
    assert sub.returncode == 0, sub.stderr
    deadline, status = time.time() + 1000, ""
    while time.time() < deadline:
        status = _ray(["job", "status", "--address", address, sid], env).stdout.lower()
        if any(s in status for s in ("succeeded", "failed", "stopped")):
            break
        time.sleep(3)
    logs = _ray(["job", "logs", "--address", address, sid], env).stdout
    assert f"job '{sid}' succeeded" in status, status + logs[-3000:]
    assert "== nightly" in logs and "30 / 0 / 0" in logs  # the summary: 30 new, 0 changed, 0 unchanged
    manifest = json.loads((root / "manifests" / "2026-04-01.json").read_text())
    assert manifest["status"] == "complete" and manifest["labelled"] == 30
    got = (
        duckdb.connect()
        .execute(
            f"SELECT count(*), count(DISTINCT product_id) FROM '{root}/labels/latest/snapshots/2026-04-01/*.parquet'"
        )
        .fetchall()
    )
    assert got == [(30, 30)]


_FIND_OWN_CLUSTER = """
import ray
from ray._private.services import canonicalize_bootstrap_address_or_die
from fashionlabel.runtime import ray_session

@ray.remote
def found():  # as Ray Train's placement-group cleaner finds its cluster, from inside a worker
    return canonicalize_bootstrap_address_or_die(None), ray.get_runtime_context().gcs_address

with ray_session(num_cpus=1):
    print("FOUND", *ray.get(found.remote(), timeout=120))
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_local_command_beside_a_running_cluster_finds_its_own_ray(ray_cluster, tmp_path):
    """With a `ray start` cluster running on the machine, Ray Train's placement-group cleaner in a local
    command's Ray could not tell which Ray was its own: its thread died with a "Found multiple active Ray
    instances" traceback in the command's output (every `fashionlabel train` and `demo`). A local Ray's
    workers are told their own cluster's address."""
    env = {k: v for k, v in ray_cluster["env"].items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    env |= {"PYTHONPATH": str(ROOT), "RAY_TMPDIR": tempfile.mkdtemp(prefix="flr", dir="/tmp")}
    try:
        r = subprocess.run(
            [sys.executable, "-c", _FIND_OWN_CLUSTER],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=240,
        )
    finally:
        shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)
    assert r.returncode == 0, r.stderr[-3000:]
    found, own = next(line.split()[1:] for line in r.stdout.splitlines() if line.startswith("FOUND"))
    assert found == own
