"""Kill the shard job in the middle (SIGKILL to the driver and its local Ray), re-run it, and check that
no product is missing or packed twice and that no partial shard is visible at any time."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter
from pathlib import Path

import duckdb
import pytest
from conftest import ROOT, sample_rows, write_catalog

from fashionlabel.shards import ShardConfig, iter_shard, list_shards, shard_catalog
from fashionlabel.taxonomy import Taxonomy

N, PER_SHARD = 4000, 50


def _kill_tree(ray_tmp: str, proc: subprocess.Popen) -> None:
    """SIGKILL the job's process group, then any process of its local Ray (found by its temp dir)."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if ray_tmp.encode() in cmd:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)


def _markers(out: Path) -> list[Path]:
    return [p for p in (out / "_parts").glob("shard-*.parquet") if not p.name.endswith(".quarantine.parquet")]


def _start_and_kill(catalog: Path, out: Path, ray_tmp: str, tmp_path: Path) -> int:
    """Start the shard job in its own session, SIGKILL it after a few shards; the shards done by then."""
    env = os.environ | {"RAY_TMPDIR": ray_tmp, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jobs.shard",
            "--catalog",
            str(catalog),
            "--out",
            str(out),
            "--samples-per-shard",
            str(PER_SHARD),
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "job.err", "wb"),  # noqa: SIM115
        start_new_session=True,
    )
    try:
        deadline = time.time() + 300
        while len(_markers(out)) < 3 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, (
            f"the job ended before the kill: {(tmp_path / 'job.err').read_text()[-2000:]}"
        )
    finally:
        _kill_tree(ray_tmp, proc)
    return len(_markers(out))


@pytest.mark.slow
def test_resume_after_kill(ray_session, tmp_path):
    base = [r for r in sample_rows() if Path(r["image_uri"]).exists()]
    rows = [
        dict(base[i % len(base)], product_id=f"{base[i % len(base)]['product_id']}r{i // len(base)}")
        for i in range(N)
    ]
    catalog = write_catalog(tmp_path / "catalog.csv", rows)
    out = tmp_path / "shards"
    # The job's own Ray temp folder, directly under /tmp: Ray's socket paths must stay short, and the kill
    # finds the job's Ray processes by this path
    ray_tmp = tempfile.mkdtemp(prefix="flray")
    try:
        done_at_kill = _start_and_kill(catalog, out, ray_tmp, tmp_path)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert 3 <= done_at_kill < N // PER_SHARD and not (out / "index.parquet").exists()
    # the set is not finished, and says so to its readers (label, train) rather than passing for whole
    from fashionlabel.shards import ShardSetIncomplete

    with pytest.raises(ShardSetIncomplete, match="is not finished"):
        list_shards(str(out))
    # whatever was visible at the kill is whole: every published tar reads to its end
    published = sorted(out.glob("shard-*.tar"))
    assert len(published) >= done_at_kill
    for uri in published:
        with tarfile.open(uri) as tar:
            assert len(tar.getmembers()) == 2 * PER_SHARD  # jpg + json of every product, none cut short

    s = shard_catalog(
        str(catalog),
        str(out),
        Taxonomy.load("fashion-product-images"),
        ShardConfig(samples_per_shard=PER_SHARD),
    )
    assert s.shards == N // PER_SHARD and s.shards_skipped >= done_at_kill
    assert s.packed == N and s.quarantined == 0
    con = duckdb.connect()
    assert con.execute(
        f"SELECT count(*), count(DISTINCT product_id) FROM '{out}/index.parquet'"
    ).fetchall() == [(N, N)]
    index = dict(con.execute(f"SELECT key, shard FROM '{out}/index.parquet'").fetchall())
    in_tars = Counter()
    for uri in list_shards(str(out)):
        shard = Path(uri).stem
        keys = [smp["__key__"] for smp in iter_shard(uri)]
        assert all(index[k] == shard for k in keys)
        in_tars.update(keys)
    assert set(in_tars) == set(index) and max(in_tars.values()) == 1  # none missing, none twice
    assert not list(out.rglob("*.tmp"))


def test_a_shard_set_missing_tars_is_refused_and_shard_packs_them_again(
    ray_session, small_catalog, small_shards, tiny_model, tmp_path
):
    """Tars that the index names but that are gone (deleted, not copied, a folder in their place) were
    left out of labelling without a word: 300 of 600 products had no row and the run wrote _SUCCESS. The
    shard set is refused by name, and `shard` re-run with the same catalog packs them again (a completion
    marker without its tar is not done)."""
    from fashionlabel.label.pipeline import label_shards
    from fashionlabel.shards import ShardSetIncomplete

    shards = tmp_path / "shards"
    shutil.copytree(small_shards, shards)
    want = {
        n: [s["json"]["product_id"] for s in iter_shard(str(shards / n))]
        for n in ("shard-000001.tar", "shard-000002.tar")
    }
    (shards / "shard-000001.tar").unlink()
    (shards / "shard-000002.tar").unlink()
    (shards / "shard-000002.tar").mkdir()
    out = tmp_path / "labels"
    refused = "places 300 products in 2 shard.s. that are not there .shard-000001.tar, shard-000002.tar."
    with pytest.raises(ShardSetIncomplete, match=refused):
        list_shards(str(shards))
    with pytest.raises(ShardSetIncomplete, match=refused):
        label_shards(str(shards), str(tiny_model), str(out), "2026-01-01")
    assert not out.exists()  # refused before any folder is made

    (shards / "shard-000002.tar").rmdir()
    s = shard_catalog(
        str(small_catalog),
        str(shards),
        Taxonomy.load("fashion-product-images"),
        ShardConfig(samples_per_shard=150),
    )
    assert s.shards_skipped == 2 and s.packed == 600
    assert len(list_shards(str(shards))) == 4
    for n, ids in want.items():
        assert [x["json"]["product_id"] for x in iter_shard(str(shards / n))] == ids


def test_a_shard_set_whose_shard_job_has_not_finished_is_refused_until_it_has(
    ray_session, small_catalog, small_shards, tiny_model, tmp_path
):
    """A shard job killed after packing 85 of 190 shards, before its index: `label` labelled the 85 tars as
    the whole set (16,863 of 37,497 products) and wrote _SUCCESS, silently leaving out the rest. A folder
    with a shard plan and no index is refused by name, and `shard` re-run with the same catalog finishes
    it. Here the job stopped before its last tar (the plan has 5 shards: the fifth, whose 6 images are
    missing, has no tar)."""
    from fashionlabel.label.pipeline import label_shards
    from fashionlabel.shards import ShardSetIncomplete

    shards = tmp_path / "shards"
    shutil.copytree(small_shards, shards)
    (shards / "index.parquet").unlink()
    (shards / "shard-000003.tar").unlink()
    (shards / "_parts" / "shard-000003.parquet").unlink()
    unfinished = (
        "is not finished: the shard job writing it has packed 3 of 5 shard.s. and not yet written index"
    )
    with pytest.raises(ShardSetIncomplete, match=unfinished):
        list_shards(str(shards))
    out = tmp_path / "labels"
    with pytest.raises(ShardSetIncomplete, match=unfinished):
        label_shards(str(shards), str(tiny_model), str(out), "2026-01-01")
    assert not out.exists()

    s = shard_catalog(
        str(small_catalog),
        str(shards),
        Taxonomy.load("fashion-product-images"),
        ShardConfig(samples_per_shard=150),
    )
    assert s.shards_skipped == 3 and s.packed == 600
    assert label_shards(str(shards), str(tiny_model), str(out), "2026-01-01")["labelled"] == 600
