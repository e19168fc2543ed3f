"""Driver memory for a large catalog: what the shard job's driver holds to plan, against a plain reader.

    PYTHONPATH=$PWD python bench/catalog_memory.py                        # 1,000,000 rows, 3 rounds
    PYTHONPATH=$PWD python bench/catalog_memory.py --rows 200000 --rounds 5

The catalog repeats the bundled sample's rows (``examples/sample/catalog.csv``) under new product ids.
Each measurement runs in a fresh process that imports the same modules first; the figure is its peak
resident memory above the peak after those imports:

- **ours**: ``read_catalog`` + ``check_ids`` (ids, duplicates, URIs resolved), the rows the driver keeps;
- **plain**: ``list(csv.DictReader(f))``, the list of row dicts a first version would hold, with no
  checks at all.

Rounds alternate which goes first; the medians and their ratio are printed (plain / ours: above 1 means
ours holds less).
"""

from __future__ import annotations

import argparse
import csv
import statistics
import tempfile
from pathlib import Path

from _fresh import in_fresh_process

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import csv, json, resource, sys, time
from fashionlabel.catalog import check_ids, read_catalog  # both paths: the same interpreter and imports
path, which = sys.argv[1], sys.argv[2]
before_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
t = time.perf_counter()
if which == "ours":
    rows, _ = read_catalog(path)
    kept, _ = check_ids(rows, path)
    del rows
else:
    with open(path, newline="", encoding="utf-8") as f:
        kept = list(csv.DictReader(f))
seconds = time.perf_counter() - t
peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before_mb
print(json.dumps({"rows": len(kept), "seconds": seconds, "peak_mb": peak_mb}))
"""


def write_catalog(path: Path, rows: int) -> None:
    with open(ROOT / "examples/sample/catalog.csv", newline="", encoding="utf-8") as f:
        sample = list(csv.DictReader(f))
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(sample[0]))
        w.writeheader()
        for i in range(rows):
            r = dict(sample[i % len(sample)])
            r["product_id"] = f"{r['product_id']}x{i}"
            w.writerow(r)


def measure(path: Path, which: str) -> dict[str, float]:
    return in_fresh_process(CHILD, str(path), which)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "catalog.csv"
        write_catalog(path, a.rows)
        print(f"catalog: {a.rows:,} rows, {path.stat().st_size / 2**20:,.0f} MiB")
        runs: dict[str, list[dict[str, float]]] = {"ours": [], "plain": []}
        for i in range(a.rounds):
            for which in ("ours", "plain") if i % 2 == 0 else ("plain", "ours"):
                r = measure(path, which)
                runs[which].append(r)
                print(f"  round {i + 1} {which:5s}: peak {r['peak_mb']:,.1f} MB, {r['seconds']:.1f} s")
    med = {
        w: {k: statistics.median(r[k] for r in rs) for k in ("peak_mb", "seconds")} for w, rs in runs.items()
    }
    for w in ("ours", "plain"):
        per_row = med[w]["peak_mb"] * 2**20 / a.rows
        print(
            f"{w:5s}: peak {med[w]['peak_mb']:,.1f} MB ({per_row:,.0f} B/row), {med[w]['seconds']:.1f} s (medians)"
        )
    print(f"plain / ours, peak memory: {med['plain']['peak_mb'] / med['ours']['peak_mb']:.2f}x")


if __name__ == "__main__":
    main()
