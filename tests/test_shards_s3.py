"""Sharding from and to S3 against a real S3-compatible server (SeaweedFS), through the job entry point.

The job runs as ``python -m jobs.shard`` in a subprocess that starts its own local Ray, exactly as
``ray job submit`` would: the catalog, its images (relative keys and absolute ``s3://`` URIs) and the
output all live in buckets; the test reads the results back with boto3 and DuckDB.
"""

from __future__ import annotations

import csv
import io
import subprocess
from pathlib import Path

import duckdb
import pytest
from conftest import SAMPLE, sample_rows, write_catalog
from procs import run_job

from fashionlabel.shards import ShardConfig, ShardJobError, iter_shard, list_shards, shard_catalog
from fashionlabel.taxonomy import Taxonomy


def _job(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return run_job("jobs.shard", args, env)


@pytest.mark.slow
def test_s3_catalog_images_and_output(s3, tmp_path):
    c = s3.client()
    s3.make_bucket("catalogs")
    s3.make_bucket("shards")
    with open(SAMPLE / "catalog.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if (SAMPLE / r["image_uri"]).exists()][:30]
    for r in rows:
        c.put_object(
            Bucket="catalogs", Key=f"spring/{r['image_uri']}", Body=(SAMPLE / r["image_uri"]).read_bytes()
        )
    rows[0]["image_uri"] = f"s3://catalogs/spring/{rows[0]['image_uri']}"  # absolute s3:// URI
    missing = dict(rows[1], product_id="gone", image_uri="images/not-uploaded.jpg")
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows([*rows, missing])
    c.put_object(Bucket="catalogs", Key="spring/catalog.csv", Body=buf.getvalue().encode())

    args = [
        "--catalog",
        "s3://catalogs/spring/catalog.csv",
        "--out",
        "s3://shards/spring",
        "--samples-per-shard",
        "8",
    ]
    r = _job(args, s3.env())
    assert r.returncode == 0, r.stderr[-3000:]
    assert "image_not_found 1" in r.stdout

    keys = sorted(o["Key"] for o in c.list_objects_v2(Bucket="shards", Prefix="spring/")["Contents"])
    top = [k for k in keys if "/_parts/" not in k]
    assert top == [
        "spring/index.parquet",
        "spring/quarantine.parquet",
        *[f"spring/shard-{i:06d}.tar" for i in range(4)],
        "spring/stats.json",
    ]
    assert not [k for k in keys if k.endswith((".tmp", ".write-probe"))], keys
    index_obj = c.get_object(Bucket="shards", Key="spring/index.parquet")["Body"].read()
    (tmp_path / "index.parquet").write_bytes(index_obj)
    index = (
        duckdb.connect()
        .execute(f"SELECT product_id, key FROM '{tmp_path}/index.parquet' ORDER BY key")
        .fetchall()
    )
    assert sorted(p for p, _ in index) == sorted(r["product_id"] for r in rows)
    seen = sorted(s["__key__"] for u in list_shards("s3://shards/spring") for s in iter_shard(u))
    assert seen == [k for _, k in index]

    # a re-run finds every shard complete and rewrites none
    etags = {
        o["Key"]: o["ETag"] for o in c.list_objects_v2(Bucket="shards", Prefix="spring/shard-")["Contents"]
    }
    r = _job(args, s3.env())
    assert r.returncode == 0 and "(4 already done)" in r.stdout, r.stdout + r.stderr[-2000:]
    assert {
        o["Key"]: o["ETag"] for o in c.list_objects_v2(Bucket="shards", Prefix="spring/shard-")["Contents"]
    } == etags

    # incremental against the S3 index: one image replaced in place is the only product packed
    c.put_object(
        Bucket="catalogs",
        Key=f"spring/{rows[2]['image_uri']}",
        Body=(SAMPLE / rows[3]["image_uri"]).read_bytes(),
    )
    r = _job([*args[:3], "s3://shards/summer", "--incremental", "s3://shards/spring"], s3.env())
    assert r.returncode == 0, r.stderr[-3000:]
    # "gone" was quarantined last time, so it is not in the index: it counts as new (and fails again)
    assert "1 new, 1 changed, 29 unchanged" in r.stdout and "image_not_found 1" in r.stdout
    assert [s["__key__"] for u in list_shards("s3://shards/summer") for s in iter_shard(u)] == [
        rows[2]["product_id"]
    ]


def test_s3_output_without_access_stops_before_any_fetch(s3, ray_session, small_catalog, monkeypatch):
    s3.make_bucket("locked")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-0123456789")
    with pytest.raises(ShardJobError, match="cannot use output s3://locked/x") as e:
        shard_catalog(
            str(small_catalog), "s3://locked/x", Taxonomy.load("fashion-product-images"), ShardConfig()
        )
    assert "wrong-secret-0123456789" not in str(e.value)


@pytest.mark.slow
def test_images_unreadable_for_wrong_credentials_fail_the_job_and_a_rerun_packs_them(s3, tmp_path):
    c = s3.client()
    s3.make_bucket("photos")
    with open(SAMPLE / "catalog.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if (SAMPLE / r["image_uri"]).exists()][:30]
    for r in rows:
        c.put_object(Bucket="photos", Key=r["image_uri"], Body=(SAMPLE / r["image_uri"]).read_bytes())
        r["image_uri"] = f"s3://photos/{r['image_uri']}"
    catalog = tmp_path / "catalog.csv"
    with open(catalog, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    out = tmp_path / "shards"
    args = ["--catalog", str(catalog), "--out", str(out), "--samples-per-shard", "10"]

    # every fetch is refused (403): not 30 quarantined products and finished shards, but a failed job
    r = _job(args, s3.env() | {"AWS_SECRET_ACCESS_KEY": "wrong-secret-0123456789"})
    assert r.returncode == 1, r.stdout + r.stderr[-3000:]
    assert "cannot fetch the images of shard-" in r.stderr and "re-run the same command" in r.stderr
    assert "wrong-secret-0123456789" not in r.stdout + r.stderr
    assert not list(out.glob("_parts/shard-*.parquet")) and not (out / "index.parquet").exists()

    # with the right key the same command fetches them all: nothing was marked done or quarantined
    r = _job(args, s3.env())
    assert r.returncode == 0, r.stderr[-3000:]
    assert "packed        30" in r.stdout and "quarantined   0" in r.stdout, r.stdout


def test_images_in_a_missing_bucket_fail_the_shard_instead_of_quarantining_every_row(s3, tmp_path):
    rows = sample_rows(30)
    for r in rows:  # the bucket's name mistyped in the catalog export
        r["image_uri"] = "s3://photos-typo/images/" + r["image_uri"].rsplit("/", 1)[-1]
    catalog = write_catalog(tmp_path / "catalog.csv", rows)
    out = tmp_path / "shards"
    r = _job(["--catalog", str(catalog), "--out", str(out), "--samples-per-shard", "10"], s3.env())
    assert r.returncode == 1, r.stdout + r.stderr[-3000:]
    assert "no such bucket" in r.stderr and "re-run the same command" in r.stderr, r.stderr[-3000:]
    assert not list(out.glob("_parts/shard-*.parquet")) and not (out / "quarantine.parquet").exists()


def test_relative_image_paths_beside_an_s3_catalog_resolve_like_paths(s3, tmp_path):
    """A catalog at s3://shelf/exports/catalog.csv names its images ``../pics/a.jpg``, as it would on disk:
    the images are at s3://shelf/pics/ and are packed (the key ``exports/../pics/a.jpg`` holds nothing)."""
    c = s3.client()
    s3.make_bucket("shelf")
    rows = sample_rows(12)
    for i, r in enumerate(rows):
        name = r["image_uri"].rsplit("/", 1)[-1]
        c.put_object(Bucket="shelf", Key=f"pics/{name}", Body=Path(r["image_uri"]).read_bytes())
        r["image_uri"] = f"../pics/{name}" if i % 2 else f"./../pics/{name}"
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    c.put_object(Bucket="shelf", Key="exports/catalog.csv", Body=buf.getvalue().encode())
    # the job in its own process, as the others here: its Ray workers see the S3 endpoint and keys
    args = ["--catalog", "s3://shelf/exports/catalog.csv", "--out", str(tmp_path / "shards")]
    r = _job([*args, "--samples-per-shard", "8"], s3.env())
    assert r.returncode == 0, r.stderr[-3000:]
    assert "packed        12" in r.stdout and "quarantined   0" in r.stdout, r.stdout
    index = duckdb.connect().execute(f"SELECT image_uri FROM '{tmp_path}/shards/index.parquet'").fetchall()
    assert sorted(u for (u,) in index) == sorted(
        f"s3://shelf/pics/{r['image_uri'].rsplit('/', 1)[-1]}" for r in rows
    )


@pytest.mark.timeout(300)
def test_an_s3_catalog_not_there_or_unreadable_is_named_before_a_cluster_is_joined(s3, tmp_path):
    """In fresh processes pointed at an address where no cluster answers: an ``s3://`` catalog that is
    not there, or that the credentials cannot read, is named, not the address, as a local one already
    was. It was first read once a local Ray had started, 5 to 25 s in."""
    import os
    import socket
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{sock.getsockname()[1]}"
    s3.make_bucket("precheck")
    s3.client().put_object(Bucket="precheck", Key="catalog.csv", Body=b"product_id,image_uri\n1,a.jpg\n")
    cases = [
        ("s3://precheck/catalgo.csv", s3.env(), "catalog not found: s3://precheck/catalgo.csv"),
        (
            "s3://precheck/catalog.csv",
            s3.env() | {"AWS_SECRET_ACCESS_KEY": "not-the-secret"},
            "cannot read catalog s3://precheck/catalog.csv: ",
        ),
        ("s3://precheck/", s3.env(), "catalog s3://precheck/ names no file"),
        (
            "s3://prechek/catalog.csv",
            s3.env(),
            "catalog not found: s3://prechek/catalog.csv (no bucket 'prechek' at this S3 endpoint)",
        ),
    ]
    for catalog, env, message in cases:
        r = subprocess.run(
            [sys.executable, "-m", "fashionlabel.cli", "shard", "--catalog", catalog, "--out", str(tmp_path)]
            + ["--address", closed],
            capture_output=True,
            text=True,
            timeout=120,
            env=os.environ | env | {"PYTHONPATH": str(Path(__file__).resolve().parents[1])},
        )
        assert r.returncode == 1 and message in r.stderr, (catalog, r.stderr[-1000:])
        assert closed not in r.stderr, r.stderr[-1000:]
