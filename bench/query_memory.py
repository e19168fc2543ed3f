"""Memory and time of a whole-history ``fashionlabel query`` over many small history parts.

    PYTHONPATH=$PWD python bench/query_memory.py                           # 365 nights of 10 parts, 3 rounds
    PYTHONPATH=$PWD python bench/query_memory.py --nights 100 --parts 100  # 10,000 parts

The labels root is synthetic (``tests/labels_factory.py`` rows of the built-in taxonomy, ``--rows`` per
part, one Parquet file copied into every part). Each measurement runs in a fresh process that imports the
same modules first; the figure is its peak resident memory above the peak after ``connect``:

- **ours**: ``fashionlabel.query.connect`` as the command runs it (its ``history`` keeps no footers);
- **plain**: the same dataset registered with pyarrow's default scan, which keeps each part's footer in
  its fragment once read (what ``history`` was before).

Rounds alternate which goes first; the medians and their ratio are printed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import statistics
import sys
import tempfile
from pathlib import Path

from _fresh import in_fresh_process

ROOT = Path(__file__).resolve().parents[1]
SQL = "SELECT articleType, count(*), avg(articleType_score) FROM history GROUP BY 1"

CHILD = r"""
import json, resource, sys, time
import pyarrow.dataset as pads
from fashionlabel import query
labels, which, sql = sys.argv[1:4]
t = time.perf_counter()
con = query.connect(labels)
if which == "plain":  # the same files, schema and partitioning, scanned with pyarrow's defaults
    ds = query.history_dataset(labels, query.run_folders(labels))
    con.register("history", pads.FileSystemDataset(list(ds.get_fragments()), ds.schema, ds.format, ds.filesystem))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
rows = con.execute(sql).fetchall()
seconds = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
print(json.dumps({"rows": sum(r[1] for r in rows), "seconds": seconds, "peak_mb": peak}))
"""


def write_root(labels: Path, nights: int, parts: int, rows: int) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    import pyarrow.parquet as pq
    from labels_factory import make_rows

    buf = io.BytesIO()
    pq.write_table(
        make_rows([f"p{i:06d}" for i in range(rows)], "2026-01-01", "Tshirts"), buf, compression="zstd"
    )
    for n in range(nights):
        run = labels / "history" / f"run_date={dt.date(2026, 1, 1) + dt.timedelta(days=n)}"
        run.mkdir(parents=True)
        for p in range(parts):
            (run / f"part-shard-{p:06d}.parquet").write_bytes(buf.getvalue())
        (run / "_SUCCESS").write_text("{}")


def measure(labels: Path, which: str) -> dict[str, float]:
    return in_fresh_process(CHILD, str(labels), which, SQL)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nights", type=int, default=365)
    ap.add_argument("--parts", type=int, default=10)
    ap.add_argument("--rows", type=int, default=200, help="rows per part")
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    files = a.nights * a.parts
    with tempfile.TemporaryDirectory() as tmp:
        labels = Path(tmp) / "labels"
        write_root(labels, a.nights, a.parts, a.rows)
        print(f"history: {a.nights} nights x {a.parts} parts = {files:,} files, {files * a.rows:,} rows")
        runs: dict[str, list[dict[str, float]]] = {"ours": [], "plain": []}
        for i in range(a.rounds):
            for which in ("ours", "plain") if i % 2 == 0 else ("plain", "ours"):
                r = measure(labels, which)
                assert r["rows"] == files * a.rows, r
                runs[which].append(r)
                print(f"  round {i + 1} {which:5s}: peak +{r['peak_mb']:,.0f} MB, {r['seconds']:.2f} s")
    med = {
        w: {k: statistics.median(r[k] for r in rs) for k in ("peak_mb", "seconds")} for w, rs in runs.items()
    }
    for w in ("ours", "plain"):
        per_file = med[w]["peak_mb"] * 1024 / files
        print(
            f"{w:5s}: peak +{med[w]['peak_mb']:,.0f} MB ({per_file:,.1f} KB/file), {med[w]['seconds']:.2f} s (medians)"
        )
    print(f"plain / ours, peak memory: {med['plain']['peak_mb'] / max(med['ours']['peak_mb'], 1):.1f}x")


if __name__ == "__main__":
    main()
