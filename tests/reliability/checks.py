"""What a reader sees: every visible file of an output must be complete, whatever moment a job died."""

from __future__ import annotations

import tarfile
from pathlib import Path

import duckdb


def visible(root: Path, pattern: str) -> list[Path]:
    """Files a reader's glob finds: not staging folders, not hidden temporaries."""
    return [
        p
        for p in sorted(Path(root).rglob(pattern))
        if not any(part.startswith(("_tmp", ".")) for part in p.relative_to(root).parts)
    ]


def assert_no_torn_files(root: Path, at_least: int = 1) -> int:
    """Open every visible tar to its end and read every visible Parquet file with DuckDB; return files read.
    Fewer than ``at_least`` files fails too: a wrong root must not pass as "nothing torn"."""
    n = 0
    for t in visible(root, "*.tar"):
        with tarfile.open(t) as tar:
            members = [m for m in tar if m.isfile()]
            for m in members:
                tar.extractfile(m).read()
        assert members and len(members) % 2 == 0, f"{t}: {len(members)} members"
        n += 1
    con = duckdb.connect()
    for p in visible(root, "*.parquet"):
        con.execute(f"SELECT count(*) FROM read_parquet('{p}')").fetchall()
        n += 1
    assert n >= at_least, f"{root}: {n} visible tar/Parquet files, expected at least {at_least}"
    return n


def tar_keys(root: Path) -> list[str]:
    keys = []
    for t in visible(root, "*.tar"):
        with tarfile.open(t) as tar:
            keys += [m.name.rsplit(".", 1)[0] for m in tar if m.isfile() and m.name.endswith(".json")]
    return keys


def label_ids(labels: Path) -> list[str]:
    q = f"SELECT product_id FROM read_parquet('{labels}/history/*/*.parquet') WHERE error IS NULL"
    return [r[0] for r in duckdb.connect().execute(q).fetchall()]
