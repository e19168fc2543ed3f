"""A night killed (SIGKILL, the whole process group) in the middle of labelling, then re-run: it completes,
with every product labelled exactly once and nothing missing."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import duckdb
import pytest
from conftest import ROOT, sample_rows, write_catalog
from procs import pids_of, stop_processes

from fashionlabel.label.pipeline import LabelConfig
from fashionlabel.nightly import NightlyConfig, run_nightly
from fashionlabel.shards import ShardConfig


@pytest.mark.slow
@pytest.mark.timeout(900)  # up to 400 s to the kill moment, then the whole night again in-process
def test_killed_night_completes_on_rerun(ray_session, tiny_model, tmp_path):
    good = [r for r in sample_rows() if Path(r["image_uri"]).exists()][1500:1620]
    catalog = write_catalog(tmp_path / "catalog.csv", good)
    root = tmp_path / "root"
    history = root / "labels" / "history" / "run_date=2026-06-01"
    raytmp = tempfile.mkdtemp(prefix="flkill-", dir="/tmp")
    env = os.environ | {"RAY_TMPDIR": raytmp, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    env.pop("RAY_ADDRESS", None)
    cmd = [
        sys.executable,
        "-m",
        "jobs.nightly",
        "--catalog",
        str(catalog),
        "--model",
        str(tiny_model),
        "--root",
        str(root),
        "--date",
        "2026-06-01",
        "--samples-per-shard",
        "10",
        "--actors",
        "1",
        "--batch-size",
        "10",
        "--max-side",
        "96",
    ]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.time() + 400
        while time.time() < deadline and proc.poll() is None and not list(history.glob("part-*.parquet")):
            time.sleep(0.05)
        assert proc.poll() is None, "the night ended before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
        proc.wait(30)
    finally:
        stop_processes(raytmp)
        shutil.rmtree(raytmp, ignore_errors=True)
    assert not pids_of(raytmp)
    parts_before = len(list(history.glob("part-*.parquet")))
    assert 1 <= parts_before < 12 and not (root / "manifests" / "2026-06-01.json").exists()

    cfg = NightlyConfig(
        shard=ShardConfig(samples_per_shard=10, max_side=96), label=LabelConfig(batch_size=10)
    )
    m = run_nightly(str(catalog), str(tiny_model), str(root), "2026-06-01", cfg)
    assert m["status"] == "complete" and m["new"] == 120 and m["latest_rows"] == 120
    assert (
        m["labelled"] == 120 and m["labelled_this_attempt"] < 120
    )  # the parts done before the kill are kept
    # the killed attempt had packed every shard: this one rates only what it did, and says so
    assert (m["sharded"], m["sharded_this_attempt"], m["shard_images_per_s"]) == (120, 0, 0)
    report = (root / "reports" / "2026-06-01.html").read_text()
    assert "n/a (done by an earlier run)" in report
    con = duckdb.connect()
    rows = con.execute(f"SELECT product_id FROM '{history}/*.parquet'").fetchall()
    assert len(rows) == 120 and {p for (p,) in rows} == {r["product_id"] for r in good}
    latest = con.execute(
        f"SELECT count(*), count(DISTINCT product_id) FROM '{root}/labels/latest/snapshots/2026-06-01/*.parquet'"
    ).fetchall()
    assert latest == [(120, 120)]
