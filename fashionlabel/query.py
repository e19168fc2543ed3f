"""``fashionlabel query``: DuckDB over the labels tables, local or on S3, with no DuckDB extension needed.

Four views are registered on an in-memory DuckDB connection:

- ``latest``: the published snapshot of ``labels/latest`` (resolved through ``latest/_CURRENT.json``, so a
  query never sees two nights mixed), one row per product, with ``run_date`` and ``active``;
- ``history``: every ``labels/history/run_date=D/part-*.parquet``, with the hive column ``run_date``;
- ``nights``: one ``run_date`` per finished run (``history/run_date=D/_SUCCESS``), quiet nights included:
  a night that labelled nothing has no rows in ``history``, so "tonight" is ``max(run_date)`` here. Where
  ``latest`` is published, a night after its snapshot is not listed yet: ``_SUCCESS`` of the run folder is
  written before the night's snapshot, and "tonight" must be the night that ``latest`` shows;
- ``snapshots``: every kept ``latest`` snapshot up to the published one, each row with its ``snapshot``
  (the night it shows): the catalog's labels as they stood on each of those nights, ``active`` included.

``run_date`` is a DATE in every view, as ``latest`` stores it: the folder names of ``history`` are read as
dates, so the views join, compare and subtract their nights without a cast (the files are not changed:
Athena and pandas read ``history``'s ``run_date`` as the folder's string).

Files are opened through pyarrow datasets (local or ``s3://`` with the storage module's credentials and
endpoint) and scanned lazily by DuckDB with projection and filter push-down, so no ``httpfs`` extension
download is needed on a locked-down host. :func:`query` runs its SQL read-only: once the views are
registered, DuckDB's access to files and extensions is turned off and its configuration locked.
"""

from __future__ import annotations

import datetime as dt
import re
import sys
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.dataset as pads

from fashionlabel import latest, settings, storage
from fashionlabel.label.writer import is_part

if TYPE_CHECKING:
    import duckdb
    import pandas as pd


def run_folders(labels: str) -> dict[str, list[str]]:
    """The file names in each ``labels/history/run_date=D/`` folder, oldest night first: one listing per
    folder, shared by the ``history`` and ``nights`` views."""
    base = storage.join(labels, "history")
    runs = storage.listdirs(base, "run_date=")
    # a folder whose name is no date (a copy, run_date=2026-05-01.bak) failed every query with pyarrow's
    # "error parsing '2026-05-01.bak' as scalar of type date32[day]", naming no folder
    if odd := [r for r in runs if not settings.is_date(r.removeprefix("run_date="))]:
        raise ValueError(
            f"{storage.join(base, odd[0])} is not a run folder (history/run_date=YYYY-MM-DD): move it out "
            "of history"
        )
    return {r: storage.listdir(storage.join(base, r)) for r in runs}


# The night of a row, in every view: a DATE, as latest stores it (history's folder names are parsed).
RUN_DATE = pa.field("run_date", pa.date32())


def finished_nights(runs: dict[str, list[str]], upto: str | None = None) -> pa.Table:
    """``run_date`` (a date) of every run folder that holds its ``_SUCCESS`` manifest, oldest first; with
    ``upto`` (the published ``latest`` snapshot), none after it."""
    dates = [r.removeprefix("run_date=") for r, names in runs.items() if "_SUCCESS" in names]
    dates = [dt.date.fromisoformat(d) for d in dates if upto is None or d <= upto]
    return pa.table({"run_date": pa.array(dates, RUN_DATE.type)})


class _UncachedDataset(pads.FileSystemDataset):
    """A dataset whose scans keep no file footers.

    A scan caches each Parquet file's footer in the dataset's fragment by default (~140 KB a history part
    in memory, for every part the scan opened, until the dataset is gone): a whole-history query over a
    year of 100 parts a night held ~5 GB. DuckDB asks a registered dataset for a scanner with its
    projection and filter only (``type(ds).scanner(ds, columns=..., filter=...)``), so the default is
    turned off here; a query that scans ``history`` twice reads the footers twice.
    """

    def scanner(self, *args, **kwargs) -> pads.Scanner:
        kwargs.setdefault("cache_metadata", False)
        return super().scanner(*args, **kwargs)


def _by_folder(base: str, files: dict[str, list[str]], part: pa.Field, flavor: str | None) -> pads.Dataset:
    """One dataset over ``files`` (folder under ``base`` → its Parquet URIs), with the partition column
    ``part`` read from the folder names (``flavor`` as pyarrow names it). Its scans keep no footers
    (:class:`_UncachedDataset`).

    A dataset takes its columns from its first file: a head that a later taxonomy added would be missing.
    Every file of a folder is written by one model, so one footer per folder gives them all; a column whose
    type widened between folders is read as the wider."""
    fs, root = storage.filesystem(base)
    schema = pa.unify_schemas(
        [storage.read_parquet_schema(f[0]) for f in files.values()] + [pa.schema([part])],
        promote_options="permissive",
    )
    ds = pads.dataset(
        [storage.filesystem(x)[1] for f in files.values() for x in f],
        schema=schema,
        filesystem=fs,
        format="parquet",
        partitioning=pads.partitioning(pa.schema([part]), flavor=flavor),
        partition_base_dir=root,
    )
    return _UncachedDataset(list(ds.get_fragments()), ds.schema, ds.format, ds.filesystem)


def history_dataset(labels: str, runs: dict[str, list[str]]) -> pads.Dataset | None:
    """The Parquet parts of ``runs`` (:func:`run_folders`) as one dataset with the hive column ``run_date``
    (a date), or None when there is none."""
    base = storage.join(labels, "history")
    files = {
        # the parts alone: a file someone left in a run folder is not labels (a zero-byte one failed every
        # query, naming no file; one of another schema added rows of nulls)
        r: [storage.join(base, r, n) for n in names if is_part(n)]
        for r, names in runs.items()
    }
    files = {r: f for r, f in files.items() if f}
    return _by_folder(base, files, RUN_DATE, "hive") if files else None


def latest_dataset(labels: str, pointer: dict | None = None) -> pads.Dataset | None:
    """The files of the published ``latest`` snapshot (``pointer``, default: read ``latest/_CURRENT.json``)
    as one dataset, or None before the first night."""
    cur = pointer if pointer is not None else latest.current(labels)
    files = [storage.join(labels, "latest", f) for f in cur["files"]] if cur else []
    if not files:
        return None
    fs, _ = storage.filesystem(files[0])
    return pads.dataset([storage.filesystem(f)[1] for f in files], filesystem=fs, format="parquet")


# The night a row of the ``snapshots`` view shows: the snapshot's folder name, read as a date.
SNAPSHOT = pa.field("snapshot", pa.date32())


def snapshots_dataset(labels: str, upto: str | None) -> pads.Dataset | None:
    """Every complete ``latest`` snapshot up to ``upto`` (the published one) as one dataset, with the
    column ``snapshot`` (a date: the night whose ``latest`` the row is), or None when there is none.

    Each snapshot's files are those its ``_SUCCESS`` names (a killed publish may have left more in its
    folder), and its columns come from one of their footers: a snapshot published after the taxonomy
    gained a head has that column, the older ones read it as null. Snapshots are kept for
    ``nightly --keep-snapshots`` nights (7 by default); a night completing while a query reads the oldest one
    deletes it, and the query fails on a missing file (run it again)."""
    dates = [d for d in latest.snapshots(labels) if upto is not None and d <= upto]
    files = {d: latest.snapshot_files(labels, d) for d in dates}
    files = {d: f for d, f in files.items() if f}
    # snapshots/<date>/part-*.parquet: the folder name is the date
    return _by_folder(storage.join(labels, "latest", "snapshots"), files, SNAPSHOT, None) if files else None


def labels_root_above(path: str) -> str | None:
    """The labels root that ``path`` lies in, for a path given as one: its ``history/`` folder or one of its
    run folders (the folder a labelling summary names as its output), else None."""
    p = storage.absolute(path).rstrip("/")
    parent, _, name = p.rpartition("/")
    if name.startswith("run_date=") and parent.endswith("/history"):
        return parent.rpartition("/")[0]
    if name == "history" and storage.listdirs(p, "run_date="):
        return parent
    return None


def connect(labels: str, read_only: bool = False) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with the views ``latest``, ``history``, ``nights`` and ``snapshots`` of ``labels``
    registered (a view with no file yet is not).

    Args:
        labels: the labels root (``ROOT/labels``), local or ``s3://``.
        read_only: once the views are registered, turn off DuckDB's own access to files (``COPY … TO``,
            ``read_csv``, ``ATTACH``, extensions) and lock its settings, so that the connection's SQL
            reads the registered views and writes nothing.

    Raises FileNotFoundError when neither table has any file yet.
    """
    import duckdb

    con = duckdb.connect()
    # Without this, a table name DuckDB does not know is looked up among the calling Python frame's
    # variables (a module named `latest` here): only the registered views are tables.
    con.execute("SET python_enable_replacements = false")
    # DuckDB draws its progress bar on stdout for a query past 2 s, piped or not: into a CSV, a notebook's
    # output or a script's printed rows. Only a terminal gets it.
    if not sys.stdout.isatty():
        con.execute("SET enable_progress_bar = false")
    # The pointer first, read once: the run folders listed after it hold its night, and `latest` and
    # `nights` name the same night.
    pointer = latest.current(labels)
    runs = run_folders(labels)
    found = {"latest": latest_dataset(labels, pointer), "history": history_dataset(labels, runs)}
    if not any(v is not None for v in found.values()):
        inner = storage.join(labels, "labels")
        if latest.current(inner):
            raise FileNotFoundError(f"{labels} is a nightly root: its labels are under {inner}")
        if storage.listdirs(storage.join(inner, "history"), "run_date="):  # a demo's folder, say
            raise FileNotFoundError(f"{labels} keeps its labels under {inner}: give --labels {inner}")
        if root := labels_root_above(labels):
            raise FileNotFoundError(f"{labels} is inside a labels root: give --labels {root}")
        raise FileNotFoundError(f"no labels under {labels} (expected latest/_CURRENT.json or history/)")
    for name, ds in found.items():
        if ds is not None:
            con.register(name, ds)
    con.register("nights", finished_nights(runs, pointer["snapshot"] if pointer else None))
    if pointer and (snaps := snapshots_dataset(labels, pointer["snapshot"])) is not None:
        con.register("snapshots", snaps)
    if read_only:
        # The views are read through pyarrow, which these settings do not reach; DuckDB refuses to turn
        # external access back on, and the lock keeps every other setting (a temp folder, paths) as it is.
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")
    return con


WHERE = {
    "latest": "labels/latest is published by `fashionlabel nightly`; a `fashionlabel label` output has "
    "history only",
    "history": "labels/history/run_date=D/ is written by `fashionlabel label` and `nightly`",
    "snapshots": "labels/latest/snapshots/D/ are published by `fashionlabel nightly`, as latest is",
}


def query(labels: str, sql: str) -> pd.DataFrame:
    """``sql`` over the views of ``labels`` as a pandas DataFrame, read-only (:func:`connect`).

    A view that ``labels`` does not have is named with where it comes from, instead of DuckDB's bare "table
    does not exist"; SQL that would write a file, read another one or change a setting raises
    PermissionError, and SQL with no statement (blank, or comments alone) ValueError.
    """
    import duckdb

    con = connect(labels, read_only=True)
    try:
        result = con.execute(sql)
        if result is None:  # DuckDB runs nothing for blank SQL or comments alone, and says nothing
            raise ValueError(
                f"no SQL statement to run in {sql!r}: give a query such as 'SELECT count(*) FROM latest'"
            )
        return result.df()
    except (duckdb.PermissionException, duckdb.InvalidInputException) as e:
        if isinstance(e, duckdb.InvalidInputException) and "configuration has been locked" not in str(e):
            raise
        raise PermissionError(
            "query is read-only: it reads the views latest, history, nights and snapshots, and no other "
            f"file; it writes nothing and changes no setting ({str(e).splitlines()[0]}). To keep a result, print it "
            "with --csv and redirect it to a file"
        ) from None
    except duckdb.CatalogException as e:
        have = {r[0] for r in con.execute("SHOW TABLES").fetchall()}
        for view in WHERE.keys() - have:
            if re.search(rf"\b{view}\b", sql, re.IGNORECASE):
                raise FileNotFoundError(
                    f"{labels} has no {view} table ({WHERE[view]}); it has: {', '.join(sorted(have))}"
                ) from None
        # DuckDB's own suggestion for a mistyped table is one of its system tables (pg_sequences, ...)
        e.add_note(f"the tables of {labels}: {', '.join(sorted(have))}")
        raise
