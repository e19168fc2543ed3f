"""Object-store faults against the real SeaweedFS S3 server: wrong credentials, a missing bucket, the server
stopped in the middle of a run and started again. Each ends in a clear, non-zero exit whose message does not
contain the secret key, or in a re-run that completes; no partial object is ever published."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from faults import Cli
from s3server import SECRET_KEY

from tests.conftest import sample_rows, write_catalog

# Each test starts several commands, each with its own local Ray: minutes on a busy 2-core machine.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


@pytest.fixture(scope="module")
def s3_catalog(tmp_path_factory) -> tuple[Path, set[str]]:
    rows = [r for r in sample_rows() if Path(r["image_uri"]).exists()][:1200]
    return write_catalog(tmp_path_factory.mktemp("s3cat") / "catalog.csv", rows), {
        r["product_id"] for r in rows
    }


def _objects(s3, bucket: str, prefix: str) -> dict[str, bytes]:
    cli = s3.client()
    keys = [
        o["Key"]
        for page in cli.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        for o in page.get("Contents", [])
    ]
    return {k: _get(cli, bucket, k) for k in keys}


def _get(cli, bucket: str, key: str, tries: int = 20) -> bytes:
    """One object's bytes. Just after a restart the server answers some reads with InternalError while it
    reloads its volumes: that is the server warming up, so the read is tried again for a few seconds."""
    import time

    from botocore.exceptions import ClientError

    for attempt in range(tries):
        try:
            return cli.get_object(Bucket=bucket, Key=key)["Body"].read()
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") != "InternalError" or attempt == tries - 1:
                raise
            time.sleep(0.5)
    raise AssertionError("unreachable")


def _assert_objects_complete(objs: dict[str, bytes]) -> None:
    """Every published tar reads to its end; every published Parquet object is whole (DuckDB reads it)."""
    for k, data in objs.items():
        if k.endswith(".tar"):
            with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                names = [m.name for m in tar if m.isfile()]
                for m in tar:
                    tar.extractfile(m).read()
            assert names and len(names) % 2 == 0, k
        elif k.endswith(".parquet"):
            pq.read_table(io.BytesIO(data))


def _secret_free(texts: list[str], *secrets: str) -> None:
    for t in texts:
        for s in secrets:
            assert s not in t


def _ray_logs(c: Cli) -> list[str]:
    return [
        p.read_text(errors="replace")
        for p in c.ray_tmp.rglob("*")
        if p.is_file() and p.suffix in (".log", ".out", ".err", ".txt", ".json")
    ]


def test_wrong_credentials_fail_clearly(s3, s3_catalog, tmp_path, ledger):
    cat, _ = s3_catalog
    bucket = s3.make_bucket("rel-creds")
    wrong = "wrong-secret-0123456789abcdef"
    with ledger.fault("S3: wrong secret key"):
        c = Cli(
            ["shard", "--catalog", str(cat), "--out", f"s3://{bucket}/shards"],
            tmp_path,
            name="wrongcreds",
            env={"AWS_SECRET_ACCESS_KEY": wrong},
        )
        rc = c.finish(180)
        out = c.output
        assert rc != 0 and "fashionlabel shard: error:" in out and f"s3://{bucket}/shards" in out, out[-2000:]
        assert not _objects(s3, bucket, "shards")
        _secret_free([out, *_ray_logs(c)], wrong, SECRET_KEY)


def test_missing_bucket_fails_clearly(s3, s3_catalog, tmp_path, ledger):
    cat, _ = s3_catalog
    with ledger.fault("S3: output bucket does not exist"):
        c = Cli(
            ["shard", "--catalog", str(cat), "--out", "s3://no-such-bucket-fl/shards"],
            tmp_path,
            name="nobucket",
        )
        rc = c.finish(180)
        out = c.output
        assert rc != 0 and "cannot use output s3://no-such-bucket-fl/shards" in out, out[-2000:]
        _secret_free([out, *_ray_logs(c)], SECRET_KEY)


def test_server_stopped_mid_run_then_restarted(s3, s3_catalog, tmp_path, ledger):
    cat, expected = s3_catalog
    bucket = s3.make_bucket("rel-outage")
    uri = f"s3://{bucket}/shards"
    args = ["shard", "--catalog", str(cat), "--out", uri, "--samples-per-shard", "50"]
    cli = s3.client()

    def parts() -> int:
        r = cli.list_objects_v2(Bucket=bucket, Prefix="shards/_parts/shard-")
        return sum(
            1
            for o in r.get("Contents", [])
            if o["Key"].endswith(".parquet") and not o["Key"].endswith(".quarantine.parquet")
        )

    with ledger.fault("S3: server stopped mid-run, restarted, job re-run"):
        c = Cli(args, tmp_path, name="outage")
        try:
            hit = c.wait_for(lambda: parts() >= 3, 240, poll=0.2)
            s3.stop()
            rc = c.finish(300)  # must fail (after the client's bounded retries), not hang
        finally:
            if s3.proc is None:
                s3.start()
        assert hit, c.output[-3000:]
        assert rc != 0 and "error" in c.output, c.output[-3000:]
        _secret_free([c.output, *_ray_logs(c)], SECRET_KEY)
        before = _objects(s3, bucket, "shards")
        assert "shards/index.parquet" not in before  # the job never claimed completion
        _assert_objects_complete(before)

        c = Cli(args, tmp_path, name="outage-rerun")
        rc = c.finish(300)
        assert rc == 0, c.output[-3000:]
        assert "already done" in c.output
        objs = _objects(s3, bucket, "shards")
        _assert_objects_complete(objs)
        index = pq.read_table(io.BytesIO(objs["shards/index.parquet"])).column("product_id").to_pylist()
        assert ledger.products(expected, index) == (0, 0) and set(index) == expected
        keys = []
        for k, data in objs.items():
            if k.endswith(".tar"):
                with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                    keys += [m.name[:-5] for m in tar if m.name.endswith(".json")]
        assert ledger.products(expected, keys) == (0, 0)
        # Nothing any job wrote — objects, logs, Ray's session logs — carries the secret key.
        _secret_free(
            [c.output, *_ray_logs(c)] + [d.decode(errors="replace") for d in objs.values()], SECRET_KEY
        )
