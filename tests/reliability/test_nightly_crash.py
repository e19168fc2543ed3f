"""Crash and re-run of ``fashionlabel nightly``: ``kill -9`` the night while it shards, while it labels and
while it publishes ``labels/latest``; the re-run completes the night with every product labelled once in
history and once in latest, and a second re-run finds the night complete and changes nothing."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import duckdb
import pytest
from checks import assert_no_torn_files
from faults import Cli
from s3server import SECRET_KEY

from fashionlabel import latest
from tests.conftest import sample_rows, write_catalog

# Each test starts several commands, each with its own local Ray: minutes on a busy 2-core machine.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]
DATE = "2026-06-01"


def _count(d: Path, pattern: str) -> int:
    return len(list(d.glob(pattern))) if d.is_dir() else 0


def test_nightly_survives_kills(tiny_model, tmp_path, ledger, s3):
    """(``s3`` puts the test server's real secret key in every command's environment: it must not leak.)"""
    rows = [r for r in sample_rows() if Path(r["image_uri"]).exists()][:600]
    cat = write_catalog(tmp_path / "catalog.csv", rows)
    expected = {r["product_id"] for r in rows}
    root = tmp_path / "root"
    shards_parts = root / "shards" / f"night={DATE}" / "_parts"
    history = root / "labels" / "history" / f"run_date={DATE}"
    manifest = root / "manifests" / f"{DATE}.json"
    args = [
        "nightly",
        "--catalog",
        str(cat),
        "--model",
        str(tiny_model),
        "--root",
        str(root),
        "--date",
        DATE,
        "--samples-per-shard",
        "50",
        "--batch-size",
        "64",
    ]
    points = [
        (
            "nightly: kill -9 while sharding (2 shards done)",
            lambda: _count(shards_parts, "shard-[0-9][0-9][0-9][0-9][0-9][0-9].parquet") >= 2,
        ),
        (
            "nightly: kill -9 while labelling (2 parts written)",
            lambda: _count(history, "part-*.parquet") >= 2,
        ),
        ("nightly: kill -9 while publishing latest and the report", lambda: (history / "_SUCCESS").exists()),
    ]
    with contextlib.ExitStack() as stack:
        for i, (name, cond) in enumerate(points):
            c = Cli(args, tmp_path, name=f"nightly-kill{i}")
            hit = c.wait_for(cond, 300)
            c.kill()
            assert hit, f"{name}: moment never reached\n{c.output[-3000:]}"
            # Each kill must land before the night completes, or the moment it names was never tested.
            assert not manifest.exists(), f"{name}: the night finished before the kill landed"
            stack.enter_context(ledger.fault(name))
            assert_no_torn_files(root, at_least=2)  # every moment comes after 2 shards were published

        c = Cli(args, tmp_path, name="nightly-rerun")
        rc = c.finish(600)
        assert rc == 0, c.output[-3000:]
        m = json.loads(manifest.read_text())
        assert m["status"] == "complete"
        con = duckdb.connect()
        hist = [
            r[0]
            for r in con.execute(
                f"SELECT product_id FROM read_parquet('{history}/*.parquet') WHERE error IS NULL"
            ).fetchall()
        ]
        assert ledger.products(expected, hist) == (0, 0) and set(hist) == expected
        files = latest.current_files(str(root / "labels"))
        snap = con.execute(f"SELECT product_id, active FROM read_parquet({files!r})").fetchall()
        assert ledger.products(expected, [p for p, _ in snap]) == (0, 0) and all(a for _, a in snap)
        assert_no_torn_files(root)

        c = Cli(args, tmp_path, name="nightly-again")
        rc = c.finish(300)
        assert rc == 0 and "already complete" in c.output, c.output[-2000:]
        assert json.loads(manifest.read_text()) == m
    # No credential in anything the night wrote (manifest, report, labels, shards) or logged.
    written = [p for p in root.rglob("*") if p.is_file()] + list(tmp_path.glob("*.log"))
    leaks = [p for p in written if SECRET_KEY.encode() in p.read_bytes()]
    assert len(written) > 20 and not leaks, leaks
