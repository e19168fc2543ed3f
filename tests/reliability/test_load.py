"""Load: a catalog of 100,000 products through shard → label on this machine, with the peak memory of
each command's whole process tree (driver + local Ray + workers) sampled and held under a stated bound.

The 100,000 products are new ids over the bundled sample's 2,500 real photos (each photo shared by 40
products): every product is fetched, decoded, normalised, packed, decoded again and labelled for real.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest
from faults import Cli

from tests.conftest import sample_rows

# Each test starts several commands, each with its own local Ray: minutes on a busy 2-core machine.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

N = int(os.environ.get("FASHIONLABEL_LOAD_PRODUCTS", "100000"))
# Bound on the summed RSS of a command's process tree (an over-count: shared pages count once per process).
# Labelling on CPU runs one predictor actor per core; each maps torch's libraries (~1.4 GiB of RSS, mostly
# pages shared with the other actor), so the sum grows by that much per core.
RSS_BOUND = 8 * 2**30


def test_100k_products_shard_and_label(tiny_model, tmp_path, ledger):
    photos = [r for r in sample_rows() if Path(r["image_uri"]).exists()]
    cat = tmp_path / "catalog.csv"
    with open(cat, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(photos[0]))
        w.writeheader()
        for i in range(N):
            w.writerow({**photos[i % len(photos)], "product_id": f"L{i:07d}"})
    expected = {f"L{i:07d}" for i in range(N)}
    shards, labels = tmp_path / "shards", tmp_path / "labels"

    c = Cli(
        ["shard", "--catalog", str(cat), "--out", str(shards), "--samples-per-shard", "2500"],
        tmp_path,
        name="load-shard",
    )
    c.sample_memory()
    rc = c.finish(900)
    assert rc == 0, c.output[-3000:]
    ledger.memory(f"shard {N:,} products", c.peak_rss)
    index = pq.read_table(shards / "index.parquet", columns=["product_id"]).column("product_id").to_pylist()
    assert ledger.products(expected, index) == (0, 0)

    c = Cli(
        [
            "label",
            "--shards",
            str(shards),
            "--model",
            str(tiny_model),
            "--out",
            str(labels),
            "--run-date",
            "2026-05-01",
        ],
        tmp_path,
        name="load-label",
    )
    c.sample_memory()
    rc = c.finish(900)
    assert rc == 0, c.output[-3000:]
    ledger.memory(f"label {N:,} products", c.peak_rss)
    q = f"SELECT product_id FROM read_parquet('{labels}/history/*/*.parquet') WHERE error IS NULL"
    got = [r[0] for r in duckdb.connect().execute(q).fetchall()]
    assert ledger.products(expected, got) == (0, 0) and len(got) == N
    assert {f"shard {N:,} products", f"label {N:,} products"} <= ledger.peak_rss.keys()  # both sampled
    for what, peak in ledger.peak_rss.items():
        assert 100 * 2**20 < peak < RSS_BOUND, (
            f"{what}: peak RSS {peak / 2**30:.2f} GiB over the {RSS_BOUND / 2**30:.0f} GiB bound"
        )
