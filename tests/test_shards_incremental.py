"""Incremental sharding: only new products and products whose source bytes or labels changed are packed."""

import hashlib
import json
import os
import shutil
from pathlib import Path

import duckdb
from conftest import sample_rows, write_catalog

from fashionlabel.shards import ShardConfig, shard_catalog
from fashionlabel.taxonomy import Taxonomy

TAX = Taxonomy.load("fashion-product-images")
CFG = ShardConfig(samples_per_shard=16)


def _own_images(rows, folder):
    """Copy each row's image into ``folder`` so the test may change bytes under an unchanged URI."""
    folder.mkdir()
    for r in rows:
        dst = folder / f"{r['product_id']}.jpg"
        shutil.copy(r["image_uri"], dst)
        r["image_uri"] = str(dst)
    return rows


def _ids(out):
    q = f"SELECT product_id FROM '{out}/index.parquet' ORDER BY product_id"
    return [r[0] for r in duckdb.connect().execute(q).fetchall()]


def test_incremental_packs_only_new_and_changed(ray_session, tmp_path):
    good = [r for r in sample_rows(80) if os.path.exists(r["image_uri"])]
    rows = _own_images([dict(r) for r in good[:45]], tmp_path / "img")
    first, extra = rows[:40], rows[40:]
    prev = tmp_path / "night1"
    s1 = shard_catalog(str(write_catalog(tmp_path / "c1.csv", first)), str(prev), TAX, CFG)
    assert s1.packed == 40 and s1.new == 40 and s1.unchanged == 0

    # night 2: two products gone, one image rewritten in place, two pointed at other bytes, one relabelled,
    # one with only a metadata column changed (not a label: stays unchanged), five new
    tonight = [dict(r) for r in first[2:]]
    shutil.copy(first[0]["image_uri"], tonight[0]["image_uri"])  # same URI, new bytes
    tonight[1]["image_uri"], tonight[2]["image_uri"] = first[1]["image_uri"], first[0]["image_uri"]
    tonight[3]["baseColour"] = "White" if tonight[3]["baseColour"] != "White" else "Black"
    tonight[4]["year"] = "1999"
    changed = sorted(r["product_id"] for r in tonight[:4])
    new = sorted(r["product_id"] for r in extra)
    cat2 = write_catalog(tmp_path / "c2.csv", tonight + extra)

    out = tmp_path / "night2"
    s2 = shard_catalog(str(cat2), str(out), TAX, CFG, incremental_from=str(prev))
    assert (s2.new, s2.changed, s2.unchanged) == (5, 4, 34)
    assert s2.packed == 9 and s2.quarantined == 0
    assert _ids(out) == sorted(new + changed)
    stats = json.loads((out / "stats.json").read_text())
    assert (stats["new"], stats["changed"], stats["unchanged"]) == (5, 4, 34)
    assert stats["incremental_from"] == str(prev)

    # the sha256 in the new index is the sha256 of the new bytes
    q = f"SELECT sha256 FROM '{out}/index.parquet' WHERE product_id = '{tonight[0]['product_id']}'"
    assert (
        duckdb.connect().execute(q).fetchall()[0][0]
        == hashlib.sha256(Path(tonight[0]["image_uri"]).read_bytes()).hexdigest()
    )

    # a re-run reuses the saved plan: nothing packed twice, same counts
    s3 = shard_catalog(str(cat2), str(out), TAX, CFG, incremental_from=str(prev))
    assert s3.shards_skipped == s3.shards and (s3.new, s3.changed, s3.unchanged) == (5, 4, 34)
    assert _ids(out) == sorted(new + changed)

    # the relabelled product's new index row carries its new label
    q = f"SELECT baseColour FROM '{out}/index.parquet' WHERE product_id = '{tonight[3]['product_id']}'"
    assert duckdb.connect().execute(q).fetchall()[0][0] == tonight[3]["baseColour"]

    # the previous index may be named directly: night 2's holds only its 9 products, so the rest is new
    s4 = shard_catalog(
        str(cat2), str(tmp_path / "night3"), TAX, CFG, incremental_from=str(out / "index.parquet")
    )
    assert (s4.new, s4.changed, s4.unchanged, s4.packed) == (34, 0, 9, 34)


def test_a_known_product_whose_image_is_gone_is_packed_again_and_quarantined(ray_session, tmp_path):
    """The hash pass cannot fingerprint a product whose image disappeared since the previous run: it is
    not "unchanged" (skipped, its old label kept in silence) but packed again, so its fetch quarantines it
    with the reason."""
    good = [r for r in sample_rows(20) if os.path.exists(r["image_uri"])]
    rows = _own_images([dict(r) for r in good[:6]], tmp_path / "img")
    catalog = str(write_catalog(tmp_path / "c.csv", rows))
    prev = tmp_path / "night1"
    assert shard_catalog(catalog, str(prev), TAX, CFG).packed == 6
    os.remove(rows[2]["image_uri"])
    s = shard_catalog(catalog, str(tmp_path / "night2"), TAX, CFG, incremental_from=str(prev))
    assert (s.new, s.changed, s.unchanged, s.packed, s.quarantined) == (0, 1, 5, 0, 1)
    q = f"SELECT product_id, reason FROM '{tmp_path / 'night2'}/quarantine.parquet'"
    assert duckdb.connect().execute(q).fetchall() == [(rows[2]["product_id"], "image_not_found")]


def test_the_hash_pass_says_how_far_it_is_while_it_runs(ray_session, caplog):
    """The hash pass fetches every known product's image again before anything is packed: a whole catalog
    is minutes of it (hours on S3 at 100M products), and it said nothing until its end."""
    import re
    import time

    import ray

    from fashionlabel.shards.plan import _gather_fingerprints, hash_progress_line

    @ray.remote
    def part(i):
        time.sleep(0.4 * i)
        return [(f"p{i}-{j}", b"s" * 16) for j in range(10)]

    with caplog.at_level("INFO", logger="fashionlabel.shards.plan"):
        got = _gather_fingerprints([part.remote(i) for i in range(4)], 40, every=0.2)
    assert len(got) == 40
    lines = [r.getMessage() for r in caplog.records if "known products fingerprinted" in r.getMessage()]
    assert lines, "no progress line while the hash pass ran"
    line = r"incremental: \d+/40 known products fingerprinted \(fetch \+ sha256\), "
    for text in lines:
        assert re.fullmatch(
            line + r"(\d+/s, eta \d+ s|\d+ s in; rate and eta once the first task is done)", text
        )
    assert (
        hash_progress_line(10, 40, 5.0)
        == "10/40 known products fingerprinted (fetch + sha256), 2/s, eta 15 s"
    )


def test_a_previous_index_that_is_not_there_is_refused_before_anything_is_written(ray_session, tmp_path):
    import pytest

    from fashionlabel.shards import ShardJobError

    catalog = write_catalog(tmp_path / "catalog.csv", sample_rows(5))
    out = tmp_path / "shards"
    with pytest.raises(
        ShardJobError, match=r"--incremental .*nope: no previous index at .*nope/index.parquet"
    ):
        shard_catalog(
            str(catalog),
            str(out),
            Taxonomy.load("fashion-product-images"),
            incremental_from=str(tmp_path / "nope"),
        )
    assert not out.exists()


def test_the_previous_index_costs_the_driver_little_memory(tmp_path):
    # The driver holds one entry per known product while it plans a night: about 450 bytes as Python
    # strings (a million products: 0.45 GB, and twice that with tonight's fingerprints), about 130 as a
    # 16-byte digest.
    import tracemalloc

    import pyarrow as pa
    import pyarrow.parquet as pq

    from fashionlabel.shards import previous_index

    n = 20_000
    pq.write_table(
        pa.table(
            {
                "product_id": [f"SKU-{i:07d}" for i in range(n)],
                "sha256": [hashlib.sha256(str(i).encode()).hexdigest() for i in range(n)],
                "gender": ["Men", "Women"] * (n // 2),
                "articleType": ["Tshirts", "Shirts", "Jeans", "Watches"] * (n // 4),
                "baseColour": ["Navy Blue"] * n,
                "attributes": [["printed", "cotton"], []] * (n // 2),
            }
        ),
        tmp_path / "index.parquet",
    )
    tracemalloc.start()
    before, heads = previous_index(str(tmp_path), TAX)
    held, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert heads == ["gender", "articleType", "baseColour", "attributes"] and len(before) == n
    # one product differs from another by its labels or its bytes, and only then
    assert before["SKU-0000000"] != before["SKU-0000002"] and len(set(before.values())) == n
    assert held / n < 250, f"{held / n:.0f} bytes held per known product"


def test_the_hash_pass_fetches_each_remote_image_once_several_at_a_time(tmp_path):
    # The hash pass fetched one image after another, each waiting its round trip (33 GETs a second per
    # task at S3's 30 ms: 800 core-hours a night for 100M known products), and an image shared by several
    # products once per product. It fetches each distinct image once, several at a time, as packing does.
    import functools
    import http.server
    import threading

    from test_shards_bad_input import _Slow

    from fashionlabel.catalog import check_ids, check_labels
    from fashionlabel.shards.plan import _labels_key, _state, fingerprint_rows

    www = tmp_path / "www"
    www.mkdir()
    good = [r for r in sample_rows(40) if Path(r["image_uri"]).exists()][:16]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Slow, directory=www))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    rows = []
    for r in good:  # each image is two products' (colour variants photographed once)
        shutil.copy(r["image_uri"], www / Path(r["image_uri"]).name)
        uri = f"{base}/{Path(r['image_uri']).name}"
        rows += [dict(r, image_uri=uri), dict(r, product_id=f"{r['product_id']}-b", image_uri=uri)]
    valid, _ = check_ids(rows, str(tmp_path / "catalog.csv"))
    heads = [h.name for h in TAX.heads]
    _Slow.most = 0
    _Slow.asked.clear()
    try:
        got = fingerprint_rows(valid, TAX, heads, keep_outside=True, in_flight=8)
    finally:
        server.shutdown()
    assert len(_Slow.asked) == 16 and set(_Slow.asked.values()) == {1}  # 32 products, 16 images, 16 GETs
    assert _Slow.most >= 4  # one at a time, 16 images would take 3.2 s of waiting
    want = []
    for v in valid:
        sha = hashlib.sha256((www / Path(v.image_uri).name).read_bytes()).hexdigest()
        labels = check_labels(v, TAX, keep_outside=True).labels
        want.append((v.product_id, _state(sha, _labels_key({h: labels.get(h) for h in heads}))))
    assert got == want
