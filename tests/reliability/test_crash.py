"""Crash and re-run: ``kill -9`` the driver, and separately a Ray worker, at several moments of ``shard``
and ``label``; after every kill no reader sees a torn file, and the re-run ends with exactly the expected
products, each once.

The commands run as real subprocesses (``python -m fashionlabel.cli``) with their own local Ray, each in its
own session so that the kill takes the whole tree down and nothing leaks. Kill moments are chosen on
observable files (the write probe, a staging tar being written, completion markers), not on sleeps. The
kills are chained on one output — each re-run resumes what the previous killed run left — which is how a
real scheduler retries a job.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from checks import assert_no_torn_files, label_ids, tar_keys
from faults import Cli, kill_one, ray_workers

from tests.conftest import sample_rows, write_catalog

# Each test starts several commands, each with its own local Ray: minutes on a busy 2-core machine.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


def _parts(out: Path) -> int:
    return (
        len(list((out / "_parts").glob("shard-[0-9][0-9][0-9][0-9][0-9][0-9].parquet")))
        if (out / "_parts").is_dir()
        else 0
    )


def _staging_tar(out: Path) -> bool:
    return (
        any(p.stat().st_size > 0 for p in (out / "_tmp").glob("*.tar.tmp"))
        if (out / "_tmp").is_dir()
        else False
    )


@pytest.fixture(scope="module")
def crash_catalog(tmp_path_factory) -> tuple[Path, set[str]]:
    rows = sample_rows()
    cat = write_catalog(tmp_path_factory.mktemp("crashcat") / "catalog.csv", rows)
    return cat, {r["product_id"] for r in rows if Path(r["image_uri"]).exists()}


@pytest.fixture(scope="module")
def crashed_shards(crash_catalog, tmp_path_factory, ledger) -> Path:
    """The sample catalog sharded through four kills; returns the finished shard folder."""
    cat, expected = crash_catalog
    tmp = tmp_path_factory.mktemp("crash-shard")
    out = tmp / "shards"
    args = ["shard", "--catalog", str(cat), "--out", str(out), "--samples-per-shard", "100"]
    faults = [
        (
            "shard: kill -9 driver early (plan saved, packing starts)",
            lambda base: (out / "_parts" / "_plan.json").exists(),
        ),
        ("shard: kill -9 driver while a shard tar is being written", lambda base: _staging_tar(out)),
        ("shard: kill -9 driver midway (8 more shards done)", lambda base: _parts(out) >= 8 + base),
    ]
    with contextlib.ExitStack() as stack:
        for i, (name, cond) in enumerate(faults):
            stack.enter_context(ledger.fault(name))
            base = _parts(out)
            c = Cli(args, tmp, name=f"shard-kill{i}")
            hit = c.wait_for(lambda cond=cond, base=base: cond(base), 180)
            c.kill()
            assert hit, f"{name}: moment never reached:\n{c.output[-2000:]}"
            assert _parts(out) < 26, "the kill came after the job had finished"
            assert_no_torn_files(out, at_least=0)  # the first kill may come before any shard
        # A Ray worker dies mid-task: the task is retried and the same run completes.
        stack.enter_context(ledger.fault("shard: kill -9 a Ray worker running pack_shard"))
        c = Cli(args, tmp, name="shard-worker-kill")
        base = _parts(out)
        assert c.wait_for(lambda: _parts(out) >= base + 2 and kill_one(c.sid, "pack_shard"), 180), c.output[
            -2000:
        ]
        rc = c.finish(300)
        assert rc == 0, c.output[-3000:]
        index = pq.read_table(out / "index.parquet").column("product_id").to_pylist()
        assert ledger.products(expected, index) == (0, 0) and set(index) == expected
        assert ledger.products(expected, tar_keys(out)) == (0, 0)
        assert pq.read_table(out / "quarantine.parquet").num_rows == 6
        assert_no_torn_files(out, at_least=26)
    return out


def test_shard_survives_kills(crashed_shards, crash_catalog):
    _, expected = crash_catalog
    out = crashed_shards
    assert sorted(p.name for p in out.glob("*.tar")) == [f"shard-{i:06d}.tar" for i in range(26)]
    assert set(tar_keys(out)) == expected


def test_label_survives_kills(crashed_shards, crash_catalog, tiny_model, tmp_path, ledger):
    _, expected = crash_catalog
    labels = tmp_path / "labels"
    run = labels / "history" / "run_date=2026-03-01"
    args = [
        "label",
        "--shards",
        str(crashed_shards),
        "--model",
        str(tiny_model),
        "--out",
        str(labels),
        "--run-date",
        "2026-03-01",
        "--batch-size",
        "64",
    ]

    def parts() -> int:
        return len(list(run.glob("part-*.parquet"))) if run.is_dir() else 0

    with contextlib.ExitStack() as stack:
        stack.enter_context(ledger.fault("label: kill -9 driver early (predictor actor starting)"))
        c = Cli(args, tmp_path, name="label-kill0")
        hit = c.wait_for(
            lambda: bool(ray_workers(c.sid, "Labeler")) or bool(ray_workers(c.sid, "MapBatches")), 180
        )
        c.kill()
        assert hit, c.output[-2000:]
        assert parts() < 26
        assert_no_torn_files(labels, at_least=0)  # killed as the actors started: maybe nothing written yet

        stack.enter_context(ledger.fault("label: kill -9 driver midway (5 shards labelled)"))
        c = Cli(args, tmp_path, name="label-kill1")
        base = parts()
        hit = c.wait_for(lambda: parts() >= base + 5, 240)
        c.kill()
        assert hit, c.output[-2000:]
        assert parts() < 26 and not (run / "_SUCCESS").exists()
        assert_no_torn_files(labels, at_least=5)

        stack.enter_context(ledger.fault("label: kill -9 the predictor actor's worker"))
        c = Cli(args, tmp_path, name="label-worker-kill")
        base = parts()
        assert c.wait_for(lambda: parts() >= base + 2 and kill_one(c.sid, "Labeler"), 240), c.output[-2000:]
        rc = c.finish(300)
        assert rc == 0, c.output[-3000:]
        assert parts() == 26 and (run / "_SUCCESS").is_file()
        got = label_ids(labels)
        assert ledger.products(expected, got) == (0, 0) and set(got) == expected
        assert_no_torn_files(labels, at_least=26)
