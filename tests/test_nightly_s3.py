"""A night with the catalog, its images and the whole nightly root on S3 (SeaweedFS), run as the job entry
point in a subprocess that starts its own local Ray (so that every Ray worker gets the S3 settings), then
queried on S3 and re-run."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from conftest import sample_rows
from procs import run_job

from fashionlabel import storage
from fashionlabel.query import connect

COLUMNS = ["gender", "masterCategory", "subCategory", "articleType", "baseColour", "season", "usage"]


def _job(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return run_job("jobs.nightly", args, env, timeout=500)


@pytest.mark.slow
@pytest.mark.timeout(1200)  # two nights, each a job with its own local Ray
def test_a_night_on_s3(s3, tiny_model, tmp_path):
    bucket = s3.make_bucket("nightly")
    rows = [r for r in sample_rows() if Path(r["image_uri"]).exists()][1400:1420]
    for r in rows:  # images on S3 too, referenced relative to the catalog
        storage.write_bytes(
            f"s3://{bucket}/catalog/images/{r['product_id']}.jpg", Path(r["image_uri"]).read_bytes()
        )
    lines = ["product_id,image_uri," + ",".join(COLUMNS)]
    lines += [
        f"{r['product_id']},images/{r['product_id']}.jpg," + ",".join(r[c] for c in COLUMNS) for r in rows
    ]
    catalog = f"s3://{bucket}/catalog/catalog.csv"
    storage.write_bytes(catalog, ("\n".join(lines) + "\n").encode())
    args = [
        "--catalog",
        catalog,
        "--model",
        str(tiny_model),
        "--root",
        f"s3://{bucket}/root",
        "--date",
        "2026-03-01",
        "--samples-per-shard",
        "10",
        "--actors",
        "1",
    ]
    r = _job(args, s3.env())
    assert r.returncode == 0, r.stderr[-3000:]
    assert "20 / 0 / 0" in r.stdout  # new / changed / unchanged
    manifest = json.loads(storage.read_bytes(f"s3://{bucket}/root/manifests/2026-03-01.json"))
    assert manifest["labelled"] == 20 and manifest["quarantined"] == 0
    assert storage.exists(f"s3://{bucket}/root/reports/2026-03-01.html")
    q = connect(f"s3://{bucket}/root/labels")
    assert q.execute("SELECT count(*), count(DISTINCT product_id) FROM latest WHERE active").fetchall() == [
        (20, 20)
    ]
    again = _job(args, s3.env())
    assert again.returncode == 0 and "already complete" in again.stdout
    # the report command finds the night's manifest beside the S3 labels, as it does on a local root
    from fashionlabel.cli import run

    report = tmp_path / "night.html"
    assert run(["report", "--labels", f"s3://{bucket}/root/labels", "--out", str(report)]) == 0
    html = report.read_text()
    assert "20 / 0 / 0" in html and "? / ? / ?" not in html


@pytest.mark.timeout(600)
def test_a_night_reads_its_catalog_once(s3, ray_session, tiny_model, tmp_path, monkeypatch):
    """The catalog is fetched once a night: its membership (which products are gone) and its shards come
    from one read. The night fetched it twice (for its membership, then again to shard it): twice the
    transfer and parsing for a catalog of millions of rows on S3, and two reads of an export that may be
    replaced in between."""
    from s3proxy import RecordingProxy

    from fashionlabel.nightly import NightlyConfig, run_nightly
    from fashionlabel.shards import ShardConfig

    bucket = s3.make_bucket("readonce")
    rows = [r for r in sample_rows() if Path(r["image_uri"]).exists()][1420:1430]
    lines = ["product_id,image_uri," + ",".join(COLUMNS)]
    lines += [",".join([r["product_id"], r["image_uri"], *(r[c] for c in COLUMNS)]) for r in rows]
    storage.write_bytes(f"s3://{bucket}/catalog.csv", ("\n".join(lines) + "\n").encode())
    cfg = NightlyConfig(shard=ShardConfig(samples_per_shard=10, max_side=96))
    with RecordingProxy(s3.port) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)  # the driver reads the catalog through it
        m = run_nightly(
            f"s3://{bucket}/catalog.csv", str(tiny_model), str(tmp_path / "root"), "2026-03-01", cfg
        )
        gets = [
            p for method, p, _ in proxy.requests if method == "GET" and p.startswith(f"/{bucket}/catalog.csv")
        ]
    assert (m["catalog_products"], m["labelled"]) == (10, 10)
    assert len(gets) == 1, gets
