import os

import pyarrow as pa
import pytest

from fashionlabel import latest, storage
from fashionlabel.latest import latest_schema, publish
from fashionlabel.taxonomy import Taxonomy


def test_write_bytes_replaces_whole_or_not_at_all(tmp_path, monkeypatch):
    dest = tmp_path / "stats.json"
    storage.write_bytes(dest, b"old")

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(os, "fsync", full_disk)
        with pytest.raises(OSError, match="No space left"):
            storage.write_bytes(dest, b"new and longer")
    assert dest.read_bytes() == b"old"  # never truncated in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stats.json"]  # and no temp file left
    storage.write_bytes(dest, b"new")
    assert dest.read_bytes() == b"new"


def test_a_write_that_fails_names_the_file_it_publishes(tmp_path):
    """A full disk (here a file-size limit, ``ulimit -f``, which fails the write the same way) said
    "[Errno 27] File too large" and nothing more: the report, label part or manifest being written was not
    named; a read-only folder named only the temporary (``.report.html.1a2b3c4d.tmp``)."""
    import resource

    dest = tmp_path / "report.html"
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, limits[1]))
    try:
        with pytest.raises(OSError, match=rf"^\[Errno 27\] File too large: '{dest}'$"):
            storage.write_bytes(dest, b"x" * 8192)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
    assert list(tmp_path.iterdir()) == []  # nothing half-written, no temporary
    storage.write_bytes(dest, b"x" * 8192)  # the cause removed, the same write succeeds
    assert dest.stat().st_size == 8192


def _snapshot(tax: Taxonomy, ids: list[str]) -> pa.Table:
    schema = latest_schema(tax)
    rows = [
        {f.name: None for f in schema}
        | {
            "product_id": p,
            "model_version": "v",
            "taxonomy_version": tax.version,
            "run_id": "r",
            "labeled_at": 0,
            "run_date": 0,
            "active": True,
        }
        for p in ids
    ]
    return pa.Table.from_pylist(rows, schema=schema)


def test_latest_pointers_move_only_after_every_snapshot_file_is_written(tmp_path, monkeypatch):
    """A publish that dies after some of its files leaves both pointers on the previous snapshot, every
    file they name still there; the same night published again then moves them."""
    tax = Taxonomy.load("fashion-product-images")
    root = str(tmp_path)
    publish(root, "2026-05-01", _snapshot(tax, ["a", "b"]), rows_per_file=1)
    manifest = tmp_path / "latest/_symlink_format_manifest/manifest"
    before = (latest.current(root), manifest.read_text())

    real, calls = storage.write_parquet, []

    def dies_on_the_second_file(table, uri, *a, **kw):
        calls.append(uri)
        if len(calls) == 2:
            raise OSError("killed while publishing")
        return real(table, uri, *a, **kw)

    with monkeypatch.context() as m:
        m.setattr(storage, "write_parquet", dies_on_the_second_file)
        with pytest.raises(OSError, match="killed while publishing"):
            publish(root, "2026-05-02", _snapshot(tax, ["a", "b", "c"]), rows_per_file=1)
    assert (latest.current(root), manifest.read_text()) == before
    assert all(storage.exists(f) for f in latest.current_files(root))
    assert latest.snapshots(root) == ["2026-05-01"]  # the half-written night is not a snapshot

    publish(root, "2026-05-02", _snapshot(tax, ["a", "b", "c"]), rows_per_file=1)
    assert latest.current(root)["snapshot"] == "2026-05-02" and latest.current(root)["rows"] == 3
    assert sorted(latest.read_snapshot(root, "2026-05-02")["product_id"].to_pylist()) == ["a", "b", "c"]


def test_node_staging_for_s3_outputs_drops_only_abandoned_files(tmp_path, monkeypatch):
    monkeypatch.setenv("FASHIONLABEL_TMP", str(tmp_path))
    d = storage.staging_dir("s3://bucket/shards")
    old, fresh = d / "shard-000001.1.tar.tmp", d / "shard-000002.2.tar.tmp"
    old.write_bytes(b"killed two days ago")
    fresh.write_bytes(b"being written")
    os.utime(old, (0, os.path.getmtime(old) - 2 * storage.STALE_STAGING_S))
    assert storage.staging_dir("s3://bucket/other") == d
    assert sorted(p.name for p in d.iterdir()) == [fresh.name]


def test_a_snapshot_reads_the_files_its_success_names_not_leftovers(tmp_path):
    """A night published again (killed after writing more parts than the final run writes) leaves parts
    that its ``_SUCCESS`` does not name: the next night must not merge them in."""
    tax = Taxonomy.load("fashion-product-images")
    table = _snapshot(tax, ["p0", "p1", "p2"])
    root = str(tmp_path)
    publish(root, "2026-05-01", table, rows_per_file=1)  # three parts: the earlier, killed attempt
    publish(root, "2026-05-01", table, rows_per_file=3)  # one part: what _SUCCESS names
    assert len(list((tmp_path / "latest/snapshots/2026-05-01").glob("*.parquet"))) == 3
    assert sorted(latest.read_snapshot(root, "2026-05-01")["product_id"].to_pylist()) == ["p0", "p1", "p2"]


def test_delete_tree_of_a_prefix_that_vanishes_before_the_delete(monkeypatch):
    """An object store that still lists a prefix whose objects were just deleted (SeaweedFS drops empty
    folders lazily), or a second attempt deleting it first: the folder is gone, which is what was asked
    (a re-run of a complete night drops its scratch this way)."""
    import pyarrow.fs as pafs

    class StaleListing:
        def get_file_info(self, path):
            return pafs.FileInfo(path, pafs.FileType.Directory)

        def delete_dir(self, path):
            raise FileNotFoundError(f"Path does not exist '{path}/'")

    monkeypatch.setattr(storage, "filesystem", lambda uri: (StaleListing(), "bucket/root/work/relabel-d"))
    storage.delete_tree("s3://bucket/root/work/relabel-d")
