"""The benchmarks stay runnable: every script's imports and options, and one real labelling run at toy size
that prints our path, the plain loop and their ratio as the README shows."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from procs import stop_processes

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.name for p in (ROOT / "bench").glob("*.py"))


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_bench_script_imports_and_parses(script):
    r = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), "--help"],
        env=os.environ | {"PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0 and "usage:" in r.stdout, r.stderr[-2000:]


@pytest.mark.slow
def test_label_bench_prints_ours_plain_and_their_ratio():
    tmp = tempfile.mkdtemp(prefix="flbench-", dir="/tmp")  # Ray's socket paths must stay short
    try:
        r = subprocess.run(
            [
                sys.executable,
                str(ROOT / "bench" / "label_throughput.py"),
                *("--synthetic", "--products", "400", "--models", "small", "--repeats", "1"),
                *("--size", "80", "60", "--samples-per-shard", "100"),
            ],
            cwd=tmp,
            env=os.environ | {"PYTHONPATH": str(ROOT), "RAY_TMPDIR": tmp, "TMPDIR": tmp},
            capture_output=True,
            text=True,
            timeout=500,
        )
    finally:
        stop_processes(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
    assert r.returncode == 0, r.stderr[-3000:]
    row = next(ln for ln in r.stdout.splitlines() if ln.startswith("small (fl_small)"))
    ours, plain, ratio = re.search(r"400\s+([\d,]+)\s+([\d,]+)\s+([\d.]+)×", row).groups()
    ours, plain = (float(x.replace(",", "")) for x in (ours, plain))
    assert ours > 0 and plain > 0 and abs(float(ratio) - ours / plain) < 0.01 + 0.005 * float(ratio)
    assert row.rstrip().endswith("100.0%")  # the same labels from both paths
