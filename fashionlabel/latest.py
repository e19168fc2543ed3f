"""``labels/latest``: one row per product, newest label wins, published as an immutable snapshot.

Each night builds ``latest/snapshots/D/part-*.parquet`` from the previous snapshot plus that night's
``history/run_date=D`` rows (newest ``run_date``, then ``labeled_at``, wins), flags every product that is no
longer in the catalog with ``active = false`` (never deleted), then *swaps a pointer*:

    latest/snapshots/D/part-00000.parquet …   immutable once its ``_SUCCESS`` exists
    latest/_symlink_format_manifest/manifest  absolute URIs of the current snapshot's files (Athena/Glue
                                              SymlinkTextInputFormat, the Delta-Lake-on-Athena pattern)
    latest/_CURRENT.json                      the same, relative to ``latest/`` (DuckDB, pandas, query.py)

Both pointers are single objects written atomically (rename locally, one PUT on S3), so a reader sees the
old snapshot or the new one, never a mix. Old snapshots are kept for ``keep`` nights so that a query that
resolved the pointer just before the swap still finds its files.
"""

from __future__ import annotations

import logging

import pyarrow as pa
import pyarrow.compute as pc

from fashionlabel import settings, storage
from fashionlabel.label.schema import labels_schema
from fashionlabel.taxonomy import Taxonomy

log = logging.getLogger(__name__)

LATEST_EXTRA = [
    pa.field("run_date", pa.date32(), nullable=False),
    pa.field("active", pa.bool_(), nullable=False),
]


# The columns that decide which of a product's rows is its latest (see :func:`merge`).
MERGE_KEYS = ("product_id", "image_sha256", "run_date", "labeled_at", "run_id", "error")


def latest_schema(taxonomy: Taxonomy) -> pa.Schema:
    """The labels schema plus ``run_date`` (night of the winning label) and ``active`` (in tonight's catalog)."""
    return pa.schema(list(labels_schema(taxonomy)) + LATEST_EXTRA)


def snapshot_dir(labels: str, date: str) -> str:
    """The folder of snapshot ``date``: ``<labels>/latest/snapshots/<date>``."""
    return storage.join(labels, "latest", "snapshots", date)


def snapshots(labels: str) -> list[str]:
    """Dates of the complete snapshots (with ``_SUCCESS``), oldest first. A folder whose name is no date (a
    copy, ``snapshots/2026-05-01.bak``) is refused by name, as copied night and run folders are: it sorted
    after its night, was taken for the snapshot before the next night, and pruning kept it for a real one."""
    base = storage.join(labels, "latest", "snapshots")
    found = storage.listdirs(base)
    if odd := [d for d in found if not settings.is_date(d)]:
        raise ValueError(
            f"{storage.join(base, odd[0])} is not a snapshot folder (latest/snapshots/YYYY-MM-DD): "
            "move it out of snapshots"
        )
    return [d for d in found if storage.exists(storage.join(base, d, "_SUCCESS"))]


def current(labels: str) -> dict | None:
    """The published pointer ``{"snapshot": D, "files": [...relative], "rows": N}``, or None."""
    uri = storage.join(labels, "latest", "_CURRENT.json")
    if not storage.exists(uri):
        return None
    try:
        pointer = storage.read_json(uri)
        if not isinstance(pointer, dict) or not isinstance(pointer.get("files"), list):
            raise ValueError("no list of files in it")
    except ValueError as e:  # JSON's own message names neither the file nor the way on
        done = snapshots(labels)
        fix = (
            f"copy {storage.join(snapshot_dir(labels, done[-1]), '_SUCCESS')} (the newest complete snapshot's "
            "pointer, the same content) over it"
            if done
            else "re-run the last night"
        )
        raise ValueError(f"{uri} is damaged ({e}): {fix}") from None
    return pointer


def current_files(labels: str) -> list[str]:
    """Absolute URIs of the files of the published snapshot ([] before the first night)."""
    cur = current(labels)
    return [storage.join(labels, "latest", f) for f in cur["files"]] if cur else []


def snapshot_files(labels: str, date: str) -> list[str]:
    """The files of complete snapshot ``date``: those its ``_SUCCESS`` names, not whatever the folder
    holds (a killed earlier publish of the same night may have left more parts there)."""
    pointer = storage.read_json(storage.join(snapshot_dir(labels, date), "_SUCCESS"))
    return [storage.join(labels, "latest", f) for f in pointer["files"]]


def snapshot_schema(labels: str, date: str) -> pa.Schema:
    """The columns of complete snapshot ``date``, from one file's footer (one publish writes them all)."""
    files = snapshot_files(labels, date)
    return storage.read_parquet_schema(files[0]) if files else pa.schema([])


def read_snapshot(labels: str, date: str, columns: list[str] | None = None) -> pa.Table:
    """The rows of complete snapshot ``date`` (:func:`snapshot_files`); only ``columns`` if given."""
    files = snapshot_files(labels, date)
    if not files:
        return pa.table({})
    return pa.concat_tables([storage.read_parquet(f, columns=columns) for f in files])


def merge(
    previous: pa.Table | None, night: pa.Table, run_date: str, members: set[str], schema: pa.Schema
) -> pa.Table:
    """Newest label per product from ``previous`` ∪ ``night``; ``active`` = product in ``members``.

    An error row does not replace a label of the same image (same ``image_sha256``): a relabel that could
    not read a shard leaves the product's last good label in place (the error stays in ``history``).

    Args:
        previous: the previous snapshot (latest schema) or None on the first night.
        night: the night's history rows (labels schema); they get ``run_date``.
        members: every product id present in tonight's catalog.
    """
    import duckdb

    night = night.append_column("run_date", pa.array([_date(run_date)] * night.num_rows, pa.date32()))
    sources = [previous, night] if previous is not None and previous.num_rows else [night]
    # Which row wins is decided over the few columns that decide it, each row known by its position in
    # ``sources``; the winners' whole rows are then taken by position. DuckDB sorting the whole rows (a
    # list of top-k structs per head) needed 3.6 GB above its inputs for a 1M-product latest.
    narrow, offset = [], 0
    for t in sources:
        cols = {k: t[k].cast(schema.field(k).type) for k in MERGE_KEYS}
        narrow.append(pa.table(cols | {"pos": pa.array(range(offset, offset + t.num_rows), pa.int64())}))
        offset += t.num_rows
    con = duckdb.connect()
    con.register("s", pa.concat_tables(narrow))
    # pos last: of two rows alike in night, time and run, the later source (tonight's) wins, not either
    q = """
        WITH good AS (SELECT DISTINCT product_id, image_sha256 FROM s WHERE error IS NULL)
        SELECT pos
        FROM (SELECT product_id, pos, row_number() OVER (PARTITION BY product_id
                                          ORDER BY run_date DESC, labeled_at DESC, run_id DESC, pos DESC) AS rn
              FROM s
              WHERE error IS NULL OR NOT EXISTS (
                  SELECT 1 FROM good g
                  WHERE g.product_id = s.product_id AND g.image_sha256 IS NOT DISTINCT FROM s.image_sha256)
             ) AS w
        WHERE rn = 1 ORDER BY product_id"""
    pos = con.sql(q).to_arrow_table()["pos"]
    # every source in ``schema``'s columns (a head the previous model did not have: nulls), then the winners
    fields = [f for f in schema if f.name != "active"]
    wide = pa.concat_tables(
        [
            pa.Table.from_arrays(
                [
                    t[f.name].cast(f.type) if f.name in t.column_names else pa.nulls(t.num_rows, f.type)
                    for f in fields
                ],
                schema=pa.schema(fields),
            )
            for t in sources
        ]
    ).take(pos)
    active = pc.is_in(wide["product_id"], value_set=pa.array(list(members), pa.string()))
    cols = [active if f.name == "active" else wide[f.name] for f in schema]
    return pa.Table.from_arrays(cols, schema=schema)


def publish(labels: str, date: str, table: pa.Table, rows_per_file: int = 1_000_000) -> dict:
    """Write ``table`` as snapshot ``date``, then swap both pointers to it. Old snapshots stay until
    :func:`prune`: the night that publishes still reads the one before for its report, and a re-run of a
    night killed after its publish builds on it again."""
    d = snapshot_dir(labels, date)
    names = []
    for i, start in enumerate(range(0, max(table.num_rows, 1), rows_per_file)):
        name = f"part-{i:05d}.parquet"
        storage.write_parquet(table.slice(start, rows_per_file), storage.join(d, name))
        names.append(name)
    pointer = {"snapshot": date, "rows": table.num_rows, "files": [f"snapshots/{date}/{n}" for n in names]}
    storage.write_json(storage.join(d, "_SUCCESS"), pointer)
    symlinks = "".join(_uri(storage.join(d, n)) + "\n" for n in names)
    storage.write_bytes(
        storage.join(labels, "latest", "_symlink_format_manifest", "manifest"), symlinks.encode()
    )
    storage.write_json(storage.join(labels, "latest", "_CURRENT.json"), pointer)
    return pointer


def prune(labels: str, keep: int) -> None:
    """Delete all but the ``keep`` newest complete snapshots, never the published one."""
    cur = (current(labels) or {}).get("snapshot")
    old = [s for s in snapshots(labels)[:-keep] if s != cur] if keep > 0 else []
    for s in old:
        fs, path = storage.filesystem(snapshot_dir(labels, s))
        fs.delete_dir(path)
        log.info("latest: pruned snapshot %s", s)


def _uri(path: str) -> str:
    return path if storage.is_s3(path) else "file://" + path


def _date(s: str):
    import datetime as dt

    return dt.date.fromisoformat(s)
