import csv
import hashlib
import io
import json
import logging
import re
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest
from conftest import sample_rows, write_catalog
from PIL import Image

from fashionlabel.shards import ShardConfig, ShardJobError, iter_shard, list_shards, shard_catalog
from fashionlabel.shards.job import progress_line
from fashionlabel.taxonomy import Taxonomy


def test_shard_round_trip(small_shards, small_catalog):
    index = pq.read_table(small_shards / "index.parquet").to_pandas()
    quarantine = pq.read_table(small_shards / "quarantine.parquet").to_pandas()
    assert len(index) == 600 and index["product_id"].is_unique
    # the sample's real bad rows: products whose image file does not exist
    assert len(quarantine) == 6 and set(quarantine["reason"]) == {"image_not_found"}
    stats = json.loads((small_shards / "stats.json").read_text())
    assert stats["packed"] == 600 and stats["reasons"] == {"image_not_found": 6}
    uris = list_shards(str(small_shards))
    assert [u.rsplit("/", 1)[1] for u in uris] == [f"shard-{i:06d}.tar" for i in range(4)]
    seen = {}
    for u in uris:
        for s in iter_shard(u):
            assert set(s) == {"__key__", "jpg", "json"}
            assert s["jpg"][:2] == b"\xff\xd8"  # a JPEG
            seen[s["__key__"]] = s["json"]
    assert len(seen) == 600
    row = index.iloc[0]
    meta = seen[row["key"]]
    assert meta["sha256"] == row["sha256"] and meta["labels"]["articleType"] == row["articleType"]
    assert meta["orig_size"] == [row["orig_width"], row["orig_height"]]


def test_progress_before_the_first_shard_says_so_not_nan():
    # products are counted per finished shard: before the first, there is no rate (it printed "0 img/s,
    # eta nan s" while the tasks were still fetching, which read as a stalled job)
    line = progress_line(0, 4, 0, 200, 0, 6.2)
    assert line == "0/4 shards, 0/200 products (0 packed), 6 s in; rate and eta once the first shard is done"
    assert "nan" not in line
    assert (
        progress_line(1, 4, 50, 200, 48, 5.0) == "1/4 shards, 50/200 products (48 packed), 10 img/s, eta 15 s"
    )


def test_rerun_skips_finished_shards(ray_session, small_catalog, small_shards):
    before = {p.name: p.stat().st_mtime_ns for p in small_shards.glob("*.tar")}
    s = shard_catalog(
        str(small_catalog),
        str(small_shards),
        Taxonomy.load("fashion-product-images"),
        ShardConfig(samples_per_shard=150),
    )
    # 606 rows in groups of 150: 5 planned shards; the 5th holds only the 6 bad rows, so no tar, and the
    # summary counts the 4 tars there are
    assert s.shards_skipped == s.shards == len(before) == 4 and s.packed == 600
    assert {p.name: p.stat().st_mtime_ns for p in small_shards.glob("*.tar")} == before
    n = (
        duckdb.connect()
        .execute(f"SELECT count(*), count(DISTINCT product_id) FROM '{small_shards}/index.parquet'")
        .fetchall()
    )
    assert n == [(600, 600)]


def _tar_state(folder: Path) -> dict[str, tuple[str, int]]:
    return {
        p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in folder.glob("*.tar")
    }


def test_rerun_with_other_settings_is_refused(ray_session, small_catalog, small_shards):
    before = _tar_state(small_shards)
    assert len(before) == 4
    with pytest.raises(
        ShardJobError, match=r"holds shards of other settings \(samples_per_shard 150 → 100\)"
    ):
        shard_catalog(
            str(small_catalog),
            str(small_shards),
            Taxonomy.load("fashion-product-images"),
            ShardConfig(samples_per_shard=100),
        )
    # a taxonomy edited since (a value added): named, with both versions, so the fix is a new --out
    d = Taxonomy.load("fashion-product-images").to_dict()
    d["heads"][0]["values"].append("Kids")
    edited = Taxonomy.from_dict(d)
    old = Taxonomy.load("fashion-product-images").version
    with pytest.raises(
        ShardJobError,
        match=rf"holds shards of another taxonomy \('fashion-product-images' version {old}; this run's is "
        rf"'fashion-product-images' version {edited.version}\); use a new --out",
    ):
        shard_catalog(str(small_catalog), str(small_shards), edited, ShardConfig(samples_per_shard=150))
    # the refusal happens before any packing: the finished shards are untouched, byte for byte
    assert _tar_state(small_shards) == before
    # how many fetches overlap does not change what the shards hold: a finished set, nothing to do
    s = shard_catalog(
        str(small_catalog),
        str(small_shards),
        Taxonomy.load("fashion-product-images"),
        ShardConfig(samples_per_shard=150, fetches_in_flight=1),
    )
    assert s.shards_skipped == len(before) and _tar_state(small_shards) == before


def test_progress_is_logged(ray_session, small_catalog, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="fashionlabel.shards"):
        s = shard_catalog(
            str(small_catalog),
            str(tmp_path / "o"),
            Taxonomy.load("fashion-product-images"),
            ShardConfig(samples_per_shard=300),
        )
    lines = [r.getMessage() for r in caplog.records if "img/s" in r.getMessage()]
    assert lines and lines[-1].startswith("shard: 3/3 shards, 606/606 products (600 packed)")
    assert s.packed_this_run == 600 and s.images_per_s > 0


def test_max_side_bounds_every_packed_image(ray_session, tmp_path):
    rows = [r for r in sample_rows(40) if Path(r["image_uri"]).exists()][:20]
    catalog = write_catalog(tmp_path / "catalog.csv", rows)
    out = tmp_path / "shards"
    s = shard_catalog(
        str(catalog),
        str(out),
        Taxonomy.load("fashion-product-images"),
        ShardConfig(samples_per_shard=8, max_side=64),
    )
    assert s.packed == len(rows)
    index = {r["key"]: r for r in pq.read_table(out / "index.parquet").to_pylist()}
    sizes = {}
    for u in list_shards(str(out)):
        for smp in iter_shard(u):
            sizes[smp["__key__"]] = Image.open(io.BytesIO(smp["jpg"])).size
    assert sizes.keys() == index.keys()
    for key, (w, h) in sizes.items():
        row = index[key]
        # the sample photos are larger than 64 px, so each one was scaled down to exactly the bound
        assert max(row["orig_width"], row["orig_height"]) > 64
        assert max(w, h) == 64 and (row["width"], row["height"]) == (w, h), (key, w, h, row)
    assert json.loads((out / "stats.json").read_text())["config"]["max_side"] == 64


def test_sidecar_carries_the_metadata_columns(small_shards, small_catalog):
    tax = Taxonomy.load("fashion-product-images")
    with open(small_catalog, newline="") as f:
        catalog = {r["product_id"]: r for r in csv.DictReader(f)}
    # every column that is neither the id, the image nor a label source travels as metadata
    extra = set(next(iter(catalog.values()))) - {"product_id", "image_uri"} - tax.columns
    assert "year" in extra
    n = 0
    for u in list_shards(str(small_shards)):
        for smp in iter_shard(u):
            row = catalog[smp["json"]["product_id"]]
            meta = smp["json"]["meta"]
            assert {c: meta.get(c) for c in extra} == {c: row[c] for c in extra}
            n += 1
    assert n == 600


def test_a_sidecar_damaged_in_place_names_its_shard_and_member(tmp_path):
    """A tar's headers carry checksums, its payloads none: a sidecar damaged in place (a byte overwritten,
    the size unchanged) failed training and evaluation with json's own message ("Invalid control
    character"), naming neither the shard nor the sample, after the samples before it were handed on."""
    from fashionlabel.shards import ShardDamaged
    from fashionlabel.tarwriter import TarWriter

    tar = tmp_path / "shard-000000.tar"
    with TarWriter(open(tar, "wb")) as t:
        for key, sidecar in (("a", b'{"product_id": "a"}'), ("b", b'{"product_id": "b\x00')):
            t.add(f"{key}.jpg", b"jpeg bytes")
            t.add(f"{key}.json", sidecar)
    given = []
    with pytest.raises(
        ShardDamaged, match=r"shard .*shard-000000.tar is damaged \(member b.json is not JSON"
    ):
        given.extend(iter_shard(str(tar)))
    assert given == []  # nothing handed on before the damage is named


def test_a_shard_the_output_cannot_take_fails_the_job_with_one_line_and_resumes(ray_session, tmp_path):
    """A shard task that cannot write into ``--out`` (here a file where its ``_tmp`` folder goes; a full disk
    or a folder turned read-only fail the same way) failed the job with Ray's traceback of the task as its
    error, naming neither the shard nor the output."""
    rows = [r for r in sample_rows(20) if Path(r["image_uri"]).exists()][:10]
    catalog = write_catalog(tmp_path / "catalog.csv", rows)
    out = tmp_path / "shards"
    out.mkdir()
    (out / "_tmp").write_text("not a folder")
    tax, cfg = Taxonomy.load("fashion-product-images"), ShardConfig(samples_per_shard=5)
    with pytest.raises(ShardJobError) as e:
        shard_catalog(str(catalog), str(out), tax, cfg)
    assert re.fullmatch(
        rf"cannot write shard-00000[01] into {out}: \[Errno 17\] File exists: '{out}/_tmp'; once the cause "
        r"is removed, the same command resumes \(shards already packed are kept\)",
        str(e.value),
    ), str(e.value)
    assert not list(out.glob("*.tar"))
    (out / "_tmp").unlink()
    s = shard_catalog(str(catalog), str(out), tax, cfg)
    assert s.packed == len(rows) and s.shards == 2
    assert sorted(pq.read_table(out / "index.parquet")["product_id"].to_pylist()) == sorted(
        r["product_id"] for r in rows
    )


def test_a_shard_task_on_a_node_that_does_not_see_the_output_fails_the_job_by_name(ray_session, tmp_path):
    """On a cluster a local ``--out`` is each node's own disk unless every node mounts it. A shard task on
    another node published its tar there, where nobody reads it, and the job failed after packing
    everything, naming only a missing index part. The task now checks that it sees the plan the driver
    saved (here: no plan, as on a node without the folder) and the job fails with one line, having
    published nothing."""
    from fashionlabel.catalog import check_ids
    from fashionlabel.shards.job import _run_tasks
    from fashionlabel.shards.spec import index_schema

    tax = Taxonomy.load("fashion-product-images")
    rows = [r for r in sample_rows(20) if Path(r["image_uri"]).exists()][:5]
    valid, _ = check_ids(rows, str(tmp_path / "catalog.csv"))
    out = tmp_path / "out"
    with pytest.raises(
        ShardJobError,
        match=r"^output folder .*/out is not on node [\d.]+, where a Ray task runs \(_parts/_plan\.json "
        r"missing there\): on a cluster a local folder must be one every node mounts; use an s3:// location$",
    ):
        _run_tasks([(0, valid)], str(out), ShardConfig(), index_schema(tax), tax)
    assert not out.exists()


def test_a_second_shard_job_on_the_same_output_is_refused_and_a_killed_ones_temporaries_go(
    ray_session, small_catalog, tmp_path
):
    """Two `shard` jobs into one --out at once both packed every shard, and the first to finish deleted
    the other's tars in progress from _tmp/ (its tasks failed on the rename and were retried). The output
    is leased: the second is refused by name and packs nothing. A job that holds the lease also removes
    the temporary files a `kill -9` mid-write left beside the index and the markers."""
    from fashionlabel.lease import Lease, LeaseHeld

    out = tmp_path / "shards"
    tax = Taxonomy.load("fashion-product-images")
    cfg = ShardConfig(samples_per_shard=150)
    with Lease(str(out / "_parts" / "_shard.lease"), "the first shard job", settle=0.05):
        with pytest.raises(LeaseHeld, match=r"sharding into .*shards is being run by another job"):
            shard_catalog(str(small_catalog), str(out), tax, cfg)
        assert not list(out.glob("*.tar")) and not (out / "_parts" / "_plan.json").exists()

    stale = [out / ".index.parquet.0badf00d.tmp", out / "_parts" / ".shard-000002.parquet.0badf00d.tmp"]
    for f in stale:
        f.write_bytes(b"PAR1 cut short by a kill")
    s = shard_catalog(str(small_catalog), str(out), tax, cfg)
    assert s.packed == 600 and s.shards == 4
    assert not [p for p in out.rglob("*") if p.name.endswith((".tmp", ".lease"))]
