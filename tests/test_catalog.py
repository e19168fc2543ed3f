"""Catalog reading (CSV, Parquet, JSON Lines), id/URI/label validation, URI resolution and fetching."""

from __future__ import annotations

import http.server
import json
import os
import socket
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import SAMPLE

from fashionlabel.catalog import (
    REASONS,
    SAFE_ID,
    CatalogError,
    CatalogRow,
    FetchError,
    HostGate,
    check_ids,
    fetch,
    product_key,
    read_catalog,
    resolve_uri,
    validate,
)
from fashionlabel.shards.pack import fetched
from fashionlabel.taxonomy import Taxonomy


def test_gzip_compressed_catalogs_are_read_and_a_broken_one_is_named(tmp_path):
    """Exports are often compressed: a gzip file named .csv was refused as "has no rows" (its bytes read as
    text), and catalog.jsonl.gz was read as a CSV."""
    import gzip

    csv_text = "product_id,image_uri,gender\n1,a.jpg,Men\n2,b.jpg,Women\n"
    (tmp_path / "c.csv.gz").write_bytes(gzip.compress(csv_text.encode()))
    (tmp_path / "c.jsonl.gz").write_bytes(gzip.compress(b'{"product_id": 3, "image_uri": "c.jpg"}\n'))
    rows, bad = read_catalog(tmp_path / "c.csv.gz")
    assert bad == [] and [(r["product_id"], r["gender"]) for r in rows] == [("1", "Men"), ("2", "Women")]
    rows, bad = read_catalog(tmp_path / "c.jsonl.gz")  # JSON Lines under its .gz
    assert bad == [] and rows == [{"product_id": "3", "image_uri": "c.jpg"}]
    (tmp_path / "named.csv").write_bytes(gzip.compress(csv_text.encode()))  # compressed, named as if not
    assert [r["product_id"] for r in read_catalog(tmp_path / "named.csv")[0]] == ["1", "2"]
    (tmp_path / "cut.csv").write_bytes(gzip.compress(csv_text.encode())[:20])  # a download cut short
    with pytest.raises(CatalogError, match=r"cut.csv is gzip-compressed but does not decompress"):
        read_catalog(tmp_path / "cut.csv")
    (tmp_path / "cut.csv.gz").write_bytes(gzip.compress(csv_text.encode())[:20])
    with pytest.raises(CatalogError, match=r"cannot read catalog .*cut.csv.gz: Truncated compressed stream"):
        read_catalog(tmp_path / "cut.csv.gz")


def test_csv_bom_quotes_and_malformed_lines(tmp_path):
    p = tmp_path / "c.csv"
    p.write_bytes(
        "\ufeffname,product_id,image_uri\n"
        '"Shirt, blue",A1,a.jpg\n'
        "short,A2\n"
        "x,A3,b.jpg,extra\n"
        "\n"
        "ok,A4,c.jpg\n".encode()
    )
    rows, bad = read_catalog(p)
    assert [r["product_id"] for r in rows] == ["A1", "A4"] and rows[0]["name"] == "Shirt, blue"
    # the product_id of a malformed line is taken from its own column, not from the first field
    assert [(b.product_id, b.reason) for b in bad] == [("A2", "malformed_row"), ("A3", "malformed_row")]
    assert "line 3" in bad[0].detail and "2 fields" in bad[0].detail


def test_csv_quote_never_closed_loses_no_row(tmp_path):
    # one stray quote would make every line after it part of one field: the rows below it vanish
    p = tmp_path / "c.csv"
    rest = "".join(f"A{i},{i}.jpg,Men\n" for i in range(3, 9))
    p.write_text('product_id,image_uri,gender\nA1,1.jpg,Men\nA2,2.jpg,"Men\n' + rest)
    rows, bad = read_catalog(p)
    assert [r["product_id"] for r in rows] == ["A1"] + [f"A{i}" for i in range(3, 9)]
    assert [(b.product_id, b.image_uri, b.reason) for b in bad] == [("A2", "2.jpg", "malformed_row")]
    assert "line 3" in bad[0].detail and "never closed" in bad[0].detail
    # the same with more text after it than one field may hold (the csv module's 128 KiB): not a failure
    # of the whole catalog, and the rows are all there
    big = "".join(f"B{i},{i}.jpg,Men\n" for i in range(20000))
    p.write_text('product_id,image_uri,gender\nA2,2.jpg,"Men\n' + big)
    rows, bad = read_catalog(p)
    assert len(rows) == 20000 and [(b.product_id, b.reason) for b in bad] == [("A2", "malformed_row")]
    # blank lines before the header are skipped, not taken for an empty catalog
    p.write_text("\n\nproduct_id,image_uri\nA1,1.jpg\n")
    assert [r["product_id"] for r in read_catalog(p)[0]] == ["A1"]
    # a quoted newline that does close is one field, as before, even on the last line
    p.write_text('product_id,image_uri,name\nA1,1.jpg,"two\nlines"\nA2,2.jpg,"end\n"\n')
    rows, bad = read_catalog(p)
    assert [r["name"] for r in rows] == ["two\nlines", "end\n"] and bad == []
    # a stray quote closed by the opening quote of a later field: the lines between are rows again
    p.write_text('product_id,image_uri,name\nA1,1.jpg,"x\nA2,2.jpg,y\nA3,3.jpg,"z"\nA4,4.jpg,w\n')
    rows, bad = read_catalog(p)
    assert [r["product_id"] for r in rows] == ["A2", "A3", "A4"] and rows[1]["name"] == "z"
    assert [(b.product_id, b.reason) for b in bad] == [("A1", "malformed_row")]
    assert "closes mid-field" in bad[0].detail and "lines 2-4" in bad[0].detail


def test_parquet_keeps_ids_exact_and_nulls(tmp_path):
    t = pa.table(
        {
            "product_id": pa.array([1623, 17, None], pa.int64()),
            "image_uri": ["a.jpg", None, "c.jpg"],
            "year": pa.array([2011.0, None, 2012.5]),
        }
    )
    pq.write_table(t, tmp_path / "c.parquet")
    rows, bad = read_catalog(tmp_path / "c.parquet")
    assert [r["product_id"] for r in rows] == ["1623", "17", None]  # never "1623.0"
    assert rows[1]["image_uri"] is None and rows[0]["year"] == "2011.0" and bad == []
    ok, rej = check_ids(rows, str(tmp_path / "c.parquet"))
    assert [r.product_id for r in ok] == ["1623"]
    assert [(r.product_id, r.reason) for r in rej] == [
        ("17", "missing_image_uri"),
        ("", "missing_product_id"),
    ]


def test_parquet_metadata_of_any_type_is_packed_as_json(tmp_path):
    """A retailer's Parquet export carries structs, bytes, decimals, timestamps and lists of them. Each row's
    metadata goes into its shard's JSON: once, a list of bytes quarantined every row (``json.dumps`` cannot
    write bytes) and a struct went in as Python's repr. Now structs are JSON text, bytes their UTF-8 text
    or base64, and every row packs."""
    import datetime
    import decimal

    from fashionlabel.shards.pack import pack_row
    from fashionlabel.shards.spec import ShardConfig

    (tmp_path / "a.jpg").write_bytes((SAMPLE / "images" / "1623.jpg").read_bytes())
    item = pa.struct([("sku", pa.string()), ("price", pa.decimal128(5, 2)), ("raw", pa.binary())])
    t = pa.table(
        {
            "product_id": ["1"],
            "image_uri": ["a.jpg"],
            "gender": ["Men"],
            "dims": pa.array([{"w": 60, "h": 80, "unit": "px", "ok": True}]),
            "blob": pa.array([b"\x00\xffraw"], pa.binary()),
            "text_bytes": pa.array(["café".encode()], pa.binary()),
            "price": pa.array([decimal.Decimal("12.50")], pa.decimal128(10, 2)),
            "added": pa.array([datetime.datetime(2026, 1, 2, 3, 4, 5)], pa.timestamp("us")),
            "sizes": pa.array([[38, None, 42]], pa.list_(pa.int32())),
            "tags": pa.array([[b"a", b"\xff"]], pa.list_(pa.binary())),
            "variants": pa.array(
                [[{"sku": "A", "price": decimal.Decimal("1.10"), "raw": b"\xff"}]], pa.list_(item)
            ),
        }
    )
    pq.write_table(t, tmp_path / "c.parquet")
    rows, bad = read_catalog(tmp_path / "c.parquet")
    valid, rejected = validate(rows, str(tmp_path / "c.parquet"), Taxonomy.load("fashion-product-images"))
    assert bad == [] and rejected == [] and len(valid) == 1
    _, sidecar, _ = pack_row(valid[0], "shard-000000", ShardConfig())
    meta = json.loads(sidecar)["meta"]
    assert json.loads(meta["dims"]) == {"w": 60, "h": 80, "unit": "px", "ok": True}  # JSON, not repr
    assert meta["blob"] == "AP9yYXc=" and meta["text_bytes"] == "café"  # base64 only where not UTF-8
    assert meta["price"] == "12.50" and meta["added"] == "2026-01-02 03:04:05"
    assert meta["sizes"] == ["38", None, "42"] and meta["tags"] == ["a", "/w=="]
    assert [json.loads(v) for v in meta["variants"]] == [{"sku": "A", "price": "1.10", "raw": "/w=="}]


def test_ids_that_are_floats_are_refused_not_read_as_1623_0(tmp_path):
    """pandas writes an integer id column with one missing value as floats: every id would read '1623.0'
    and match nothing downstream. A Parquet float id column is refused by name; a JSON Lines id 1623.0 is
    quarantined, and an integer 1623 still reads '1623'."""
    import pandas as pd

    df = pd.DataFrame({"product_id": [1623, 17, None], "image_uri": ["a.jpg", "b.jpg", "c.jpg"]})
    df.to_parquet(tmp_path / "c.parquet")
    assert df["product_id"].dtype == "float64"
    with pytest.raises(CatalogError, match=r"product_id is a double column, so id 1623 would read '1623.0'"):
        read_catalog(tmp_path / "c.parquet")
    (tmp_path / "c.jsonl").write_text(
        '{"product_id": 1623.0, "image_uri": "a.jpg"}\n{"product_id": 17, "image_uri": "b.jpg"}\n'
    )
    rows, bad = read_catalog(tmp_path / "c.jsonl")
    assert [r["product_id"] for r in rows] == ["17"]
    assert [(b.product_id, b.reason) for b in bad] == [("1623.0", "invalid_product_id")]
    assert "would read '1623.0'" in bad[0].detail


def test_ids_and_image_uris_that_are_lists_objects_or_booleans_are_quarantined(tmp_path):
    """A JSON Lines or Parquet id or image that is not one value was read as its Python text: the product
    was packed under the id "['a', 'b']" or "True", and a list of images was fetched from the path
    "<catalog folder>/['p.jpg']". Each such row is quarantined, the value shown as JSON."""
    lines = [
        {"product_id": ["a", "b"], "image_uri": "x.jpg"},
        {"product_id": {"k": 1}, "image_uri": "y.jpg"},
        {"product_id": True, "image_uri": "z.jpg"},
        {"product_id": "p1", "image_uri": ["p.jpg", "q.jpg"]},
        {"product_id": "p2", "image_uri": "r.jpg"},
    ]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    rows, bad = read_catalog(tmp_path / "c.jsonl")
    assert [r["product_id"] for r in rows] == ["p2"]
    assert [(b.product_id, b.image_uri, b.reason) for b in bad] == [
        ('["a", "b"]', "x.jpg", "invalid_product_id"),
        ('{"k": 1}', "y.jpg", "invalid_product_id"),
        ("true", "z.jpg", "invalid_product_id"),
        ("p1", '["p.jpg", "q.jpg"]', "image_unreadable"),
    ]
    assert bad[0].detail == 'product_id is a list, not one id: ["a", "b"]'
    assert bad[3].detail == 'image_uri is a list, not one URI: ["p.jpg", "q.jpg"]'
    # an export that wrote each product's images as one list column
    pq.write_table(
        pa.table({"product_id": ["p3", "p4"], "image_uri": [["a.jpg"], None]}), tmp_path / "c.parquet"
    )
    rows, bad = read_catalog(tmp_path / "c.parquet")
    assert [r["product_id"] for r in rows] == ["p4"]  # no image: check_ids quarantines it by name
    assert [(b.product_id, b.reason) for b in bad] == [("p3", "image_unreadable")]


def test_jsonl_objects_lists_and_broken_lines(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text(
        "\n".join(
            [
                json.dumps({"product_id": 5, "image_uri": "a.jpg", "tags": ["x", "y"]}),
                '{"product_id": "6", "image_uri": ',
                "[1, 2]",
                json.dumps({"image_uri": "b.jpg"}),  # no product_id key at all
                '{"product_id": "7", "image_uri": "c.jpg", "note": "\\udc80"}',  # a lone surrogate
                '{"product_id": "8", "image_uri": "d.jpg", "note": "caf\\u00e9"}',  # an escaped é is fine
            ]
        )
    )
    rows, bad = read_catalog(p)
    assert rows[0] == {"product_id": "5", "image_uri": "a.jpg", "tags": ["x", "y"]}
    assert [b.reason for b in bad] == ["malformed_row"] * 3
    assert bad[2].detail == "line 5: a \\u escape that is not a character"
    assert rows[-1]["note"] == "café"
    _, rej = check_ids(rows, str(p))
    assert [r.reason for r in rej] == ["missing_product_id"]


@pytest.mark.parametrize(
    "content,match",
    [
        (b"", "is empty"),
        (
            b"id,url\n1,a.jpg\n",
            r"needs columns product_id and image_uri; has \['id', 'url'\]: name the export's id column product_id "
            r"and its image column image_uri \('url' holds image paths or URLs\)$",
        ),
        # Excel in many locales saves "CSV" with ';' between fields (and a BOM)
        (
            b"\xef\xbb\xbfproduct_id;image_uri;Dept\r\n1;a.jpg;Shoes\r\n",
            r"has \['product_id;image_uri;Dept'\] \(one column with ';' in its name: write the CSV with ','",
        ),
        (b"product_id,product_id,image_uri\n", "duplicate columns"),
        (b"product_id,image_uri,gender\n", "has no rows"),  # an export cut short after its header
    ],
)
def test_unusable_catalogs_raise(tmp_path, content, match):
    (tmp_path / "c.csv").write_bytes(content)
    with pytest.raises(CatalogError, match=match):
        read_catalog(tmp_path / "c.csv")
    with pytest.raises(CatalogError, match="not found"):
        read_catalog(tmp_path / "none.csv")
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(CatalogError, match="cannot read catalog"):
        read_catalog(tmp_path / "bad.parquet")


def test_ids_duplicates_and_labels():
    tax = Taxonomy.load("fashion-product-images")
    rows = [
        {"product_id": p, "image_uri": "x.jpg", "gender": g}
        for p, g in [
            ("a1", "Men"),
            ("a1", "Women"),
            ("a-2_B", "Martian"),
            ("a/b", "Men"),
            ("..", "Men"),
            ("é", "Men"),
            ("SKU.12 A", "Men"),
            ("x" * 256, "Men"),
            ("", "Men"),
            (" ", "Men"),
            (" a2", "Men"),
            ("a\nb", "Men"),
            ("x" * 257, "Men"),
            ("ok", "NA"),
        ]
    ]
    valid, bad = validate(rows, "/cat/catalog.csv", tax)
    derived = ["a/b", "..", "é", "SKU.12 A", "x" * 256]
    assert [(v.product_id, v.labels["gender"]) for v in valid] == [("a1", "Men")] + [
        (p, "Men") for p in derived
    ] + [("ok", None)]
    assert valid[0].image_uri == "/cat/x.jpg" and valid[0].key == "a1" and valid[-1].key == "ok"
    assert sorted((b.product_id, b.reason) for b in bad) == sorted(
        [
            ("a1", "duplicate_product_id"),
            ("a-2_B", "label_outside_taxonomy"),
            ("", "missing_product_id"),
            (" ", "missing_product_id"),
            (" a2", "invalid_product_id"),
            ("a\nb", "invalid_product_id"),
            ("x" * 257, "invalid_product_id"),
        ]
    )
    assert {b.reason for b in bad} <= set(REASONS)
    assert next(b.detail for b in bad if b.product_id == "a1").startswith("first occurrence kept (image_uri")
    # a first row quarantined later (its label outside the taxonomy): the duplicate names the row it defers
    # to and says it may be quarantined, where it said "first occurrence kept" of a product never packed
    _, bad = validate(
        [
            {"product_id": "c", "image_uri": "c1.jpg", "articleType": "Tshirt"},
            {"product_id": "c", "image_uri": "c2.jpg", "articleType": "Tshirts"},
        ],
        "/c.csv",
        tax,
    )
    assert [b.reason for b in bad] == ["duplicate_product_id", "label_outside_taxonomy"]
    assert bad[0].detail == (
        "first occurrence kept (image_uri 'c1.jpg'; packed from it, or quarantined for its own reason)"
    )
    # the first row of an id quarantined: the duplicate says so instead of claiming a kept row
    _, bad = validate(
        [{"product_id": "b", "image_uri": ""}, {"product_id": "b", "image_uri": "b.jpg"}], "/c.csv", tax
    )
    assert [(b.reason, b.detail) for b in bad] == [
        ("missing_image_uri", "image_uri is empty"),
        ("duplicate_product_id", "first occurrence was missing_image_uri"),
    ]
    # an image_uri of spaces names no image either: it is missing, not the catalog's own folder to fetch
    valid, bad = validate([{"product_id": "s", "image_uri": " \t "}], "/c.csv", tax)
    assert valid == [] and [(b.reason, b.detail) for b in bad] == [
        ("missing_image_uri", "image_uri is empty")
    ]


def test_resolve_uri(tmp_path):
    assert resolve_uri("img/a.jpg", str(tmp_path / "c.csv")) == str(tmp_path / "img" / "a.jpg")
    assert resolve_uri(" /abs/a.jpg ", "s3://b/c.csv") == "/abs/a.jpg"
    assert resolve_uri("img/a.jpg", "s3://b/cat/c.csv") == "s3://b/cat/img/a.jpg"
    # "." and ".." resolve as they do on disk: S3 has no folders, so "cat/../img/a.jpg" is no key of an image
    assert resolve_uri("../img/a.jpg", "s3://b/cat/c.csv") == "s3://b/img/a.jpg"
    assert resolve_uri("./img//a.jpg", "s3://b/x/cat/c.csv") == "s3://b/x/cat/img//a.jpg"
    assert resolve_uri("../../img/a.jpg", "s3://b/x/cat/c.csv") == "s3://b/img/a.jpg"
    assert (
        resolve_uri("../img/a.jpg", "s3://b/c.csv") == "s3://b/../img/a.jpg"
    )  # above the bucket: as written
    assert resolve_uri("img/a.jpg", f"file://{tmp_path}/c.csv") == str(tmp_path / "img" / "a.jpg")
    for u in ("https://h/a.jpg", "s3://b/a.jpg", "file:///a.jpg", "gs://b/a.jpg"):
        assert resolve_uri(u, "/c.csv") == u
    # a scheme is case-blind: written in capitals by an export, it is the supported one, not another
    for u, want in (
        ("HTTPS://H/A.jpg", "https://H/A.jpg"),
        ("Http://h/a.jpg", "http://h/a.jpg"),
        ("S3://b/Img/a.jpg", "s3://b/Img/a.jpg"),
        ("FILE:///Img/a.jpg", "file:///Img/a.jpg"),
        ("GS://b/a.jpg", "GS://b/a.jpg"),
    ):
        assert resolve_uri(u, "s3://b/cat/c.csv") == want


def test_relative_local_paths_resolve_as_pathlib_does(tmp_path, monkeypatch):
    # resolve_uri caches each folder's resolution; every spelling must still give pathlib's answer
    monkeypatch.chdir(tmp_path)
    names = ["a.jpg", "img/a.jpg", "./a.jpg", "img/./a.jpg", "img//a.jpg", "../x/a.jpg", "img/", "img/."]
    names += ["img/..", "a b/ü.jpg", "x/y/../w.jpg", ".hidden.jpg"]
    for catalog in (str(tmp_path / "c.csv"), "rel/c.csv", "/c.csv", f"file://{tmp_path}/c.csv", "c.csv"):
        folder = Path(catalog.removeprefix("file://")).absolute().parent
        for name in names:
            assert resolve_uri(name, catalog) == str(folder / name), (catalog, name)


def _reason(uri: str, **kw) -> str:
    with pytest.raises(FetchError) as e:
        fetch(uri, **kw)
    return e.value.reason


def test_fetch_local(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"abc")
    assert fetch(str(tmp_path / "a.jpg")) == fetch(f"file://{tmp_path}/a.jpg") == b"abc"
    assert _reason(str(tmp_path / "none.jpg")) == "image_not_found"
    assert _reason(str(tmp_path)) == "image_not_found"  # a folder is not an image file
    assert _reason(str(tmp_path / "a.jpg"), max_bytes=2) == "image_too_large"
    assert _reason("gs://bucket/a.jpg") == "image_unreadable"
    # not regular files: a device never ends and a FIFO blocks a plain open; both must be refused at once
    os.mkfifo(tmp_path / "pipe.jpg")
    t0 = time.time()
    assert _reason(str(tmp_path / "pipe.jpg")) == "image_unreadable"
    assert _reason("/dev/zero") == "image_unreadable"
    assert time.time() - t0 < 5


class _Flaky(http.server.BaseHTTPRequestHandler):
    hits: dict[str, int] = {}

    def log_message(self, *a):
        pass

    def do_GET(self):  # noqa: N802
        n = self.hits[self.path] = self.hits.get(self.path, 0) + 1
        code, body, ctype = {
            "/ok.jpg": (200, b"\xff\xd8jpeg", "image/jpeg"),
            "/flaky.jpg": (503 if n == 1 else 200, b"\xff\xd8later", "image/jpeg"),
            "/down.jpg": (503, b"", "text/plain"),
            "/forbidden.jpg": (403, b"", "text/plain"),
            "/page.jpg": (200, b"<html/>", "text/html; charset=utf-8"),
            "/big.jpg": (200, b"x" * 5000, "image/jpeg"),
        }.get(self.path, (404, b"", "text/plain"))
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def test_fetch_http():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        assert fetch(f"{base}/ok.jpg") == b"\xff\xd8jpeg"
        assert fetch(f"{base}/flaky.jpg") == b"\xff\xd8later"  # a 503 is retried
        assert _reason(f"{base}/down.jpg") == "image_unreadable" and _Flaky.hits["/down.jpg"] == 3
        assert _reason(f"{base}/forbidden.jpg") == "image_unreadable" and _Flaky.hits["/forbidden.jpg"] == 1
        assert _reason(f"{base}/missing.jpg") == "image_not_found"
        assert _reason(f"{base}/page.jpg") == "not_an_image"
        assert _reason(f"{base}/big.jpg", max_bytes=4096) == "image_too_large"
    finally:
        server.shutdown()
    assert _reason("http://127.0.0.1:9/x.jpg", retries=0) == "image_unreadable"


def test_image_uris_with_their_scheme_in_capitals_are_fetched(tmp_path):
    # HTTP://… and FILE://… were quarantined as "unsupported URI scheme" though their images were there
    (tmp_path / "a.jpg").write_bytes(b"\xff\xd8local")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    rows = [
        {"product_id": "p1", "image_uri": f"FILE://{tmp_path}/a.jpg"},
        {"product_id": "p2", "image_uri": f"HTTP://127.0.0.1:{server.server_address[1]}/ok.jpg"},
    ]
    try:
        ok, bad = check_ids(rows, str(tmp_path / "c.csv"))
        assert not bad and [fetch(r.image_uri) for r in ok] == [b"\xff\xd8local", b"\xff\xd8jpeg"]
    finally:
        server.shutdown()


def test_fetch_and_read_catalog_on_s3(s3):
    c = s3.client()
    s3.make_bucket("cat-unit")
    c.put_object(Bucket="cat-unit", Key="img/a.jpg", Body=b"\xff\xd8bytes")
    c.put_object(Bucket="cat-unit", Key="c.jsonl", Body=b'{"product_id": "p1", "image_uri": "img/a.jpg"}\n')
    rows, _ = read_catalog("s3://cat-unit/c.jsonl")
    ok, _ = check_ids(rows, "s3://cat-unit/c.jsonl")
    assert ok[0].image_uri == "s3://cat-unit/img/a.jpg" and fetch(ok[0].image_uri) == b"\xff\xd8bytes"
    assert _reason("s3://cat-unit/img/none.jpg") == "image_not_found"
    # a missing bucket is not this image's fault: an outage (a shard fails rather than quarantine it all)
    with pytest.raises(FetchError) as e:
        fetch("s3://no-such-bucket-here/img/a.jpg")
    assert (e.value.reason, e.value.outage) == (
        "image_unreadable",
        True,
    ) and "no such bucket" in e.value.detail
    s3.make_bucket("no-such-bucket-here")  # created later: the next miss is this image's own again
    assert _reason("s3://no-such-bucket-here/img/a.jpg") == "image_not_found"
    assert _reason("s3://cat-unit/img/a.jpg", max_bytes=3) == "image_too_large"
    with pytest.raises(CatalogError, match="not found"):
        read_catalog("s3://cat-unit/none.csv")


def test_keys_derived_from_any_id_are_safe_stable_and_distinct():
    ids = ["a/b", "a_b", "a.b", "a b", "..", "../../etc/x", "/etc/passwd", "café-42", "カフェ", "SKU.12/A"]
    ids += ["x" * 256, "x" * 255 + "y", "_lead", "-rf"]
    keys = [product_key(p) for p in ids]
    assert len(set(keys)) == len(ids)  # distinct ids never share a key
    assert all(SAFE_ID.match(k) for k in keys), keys  # safe tar member / file names, no dots
    assert product_key("a_b") == "a_b" and product_key("A-1") == "A-1"  # a safe id is its own key
    assert product_key("café-42").startswith("cafe-42--") and product_key("SKU.12/A").startswith("SKU_12_A--")
    assert product_key("カフェ").startswith("id--")
    assert [product_key(p) for p in ids] == keys  # deterministic: the same key every night


def test_a_key_collision_is_quarantined_not_merged():
    tax = Taxonomy.load("fashion-product-images")
    taken = product_key("a.b")
    rows = [{"product_id": p, "image_uri": "x.jpg"} for p in ("a.b", taken)]
    valid, bad = validate(rows, "/cat/catalog.csv", tax)
    assert [v.product_id for v in valid] == ["a.b"]
    assert [(b.product_id, b.reason) for b in bad] == [(taken, "duplicate_product_id")]
    assert "'a.b'" in bad[0].detail


def test_a_folder_uri_leaks_no_file_descriptor(tmp_path):
    # every row whose image_uri names a folder ("images/", ".") must not keep a descriptor open: a worker
    # that packs thousands of them would run out and then fail every good image after them
    (tmp_path / "a.jpg").write_bytes(b"abc")
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(50):
        with pytest.raises(FetchError) as e:
            fetch(str(tmp_path))
    assert e.value.reason == "image_not_found" and e.value.detail == "a folder, not a file"
    assert len(os.listdir("/proc/self/fd")) == before
    assert fetch(str(tmp_path / "a.jpg")) == b"abc"


def test_file_uris_are_read_as_rfc_8089_says(tmp_path):
    (tmp_path / "a shirt.jpg").write_bytes(b"abc")
    (tmp_path / "été.jpg").write_bytes(b"def")
    assert fetch(f"file://{tmp_path}/a%20shirt.jpg") == b"abc"  # percent-encoded, as file URIs are
    assert fetch(f"file://localhost{tmp_path}/%C3%A9t%C3%A9.jpg") == b"def"  # the local host named
    assert fetch(f"file://{tmp_path}/été.jpg") == b"def"  # unencoded text is taken as it is
    # a host other than this one, or a relative "file://img/a.jpg", is not read relative to the worker's
    # folder (which differs from node to node): refused with a reason that says why
    with pytest.raises(FetchError, match="host 'img'") as e:
        fetch("file://img/a.jpg")
    assert e.value.reason == "image_unreadable" and not e.value.outage


class _Lying(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def do_GET(self):  # noqa: N802
        body = b"\xff\xd8" + b"x" * 998
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        if self.path == "/short.jpg":  # says 1000 bytes, sends 100, hangs up
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(body[:100])
            self.close_connection = True
        elif self.path == "/trickle.jpg":  # one byte every 0.2 s: never idle long enough to time out
            self.send_header("Content-Length", "1000")
            self.end_headers()
            for i in range(1000):
                try:
                    self.wfile.write(body[i : i + 1])
                    self.wfile.flush()
                except OSError:
                    return
                time.sleep(0.2)
        else:  # any other path exists, so a URL that reaches the server is fetched
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)


def test_fetch_http_hostile_servers_and_urls():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Lying)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        # a body cut short is a failed transfer (retried, then unreadable), not an image that is "not one"
        with pytest.raises(FetchError, match="100 of 1000 bytes") as e:
            fetch(f"{base}/short.jpg", retries=0)
        assert e.value.reason == "image_unreadable"
        # a server that trickles never trips the per-read timeout: the whole download has a deadline
        t0 = time.time()
        with pytest.raises(FetchError, match="deadline") as e:
            fetch(f"{base}/trickle.jpg", timeout=1.0, deadline=2.0, retries=0)
        assert e.value.reason == "image_unreadable" and time.time() - t0 < 5
        # spaces and non-ASCII in a URL are sent percent-encoded, as a browser sends them
        assert fetch(f"{base}/a shirt.jpg").startswith(b"\xff\xd8")
        assert fetch(f"{base}/été.jpg?v=1 2").startswith(b"\xff\xd8")
    finally:
        server.shutdown()
    # a URL that is malformed is this row's fault: never retried, never counted as the source being down
    for bad in ("http://127.0.0.1:port/a.jpg", "http:///a.jpg", "http://"):
        with pytest.raises(FetchError) as e:
            fetch(bad)
        assert (e.value.reason, e.value.outage, e.value.retryable) == ("image_unreadable", False, False), bad


def test_a_source_that_stops_answering_is_not_asked_again_for_a_while():
    silent = socket.socket()  # connections queue in its backlog and never get an answer
    silent.bind(("127.0.0.1", 0))
    silent.listen(128)
    dead = f"http://127.0.0.1:{silent.getsockname()[1]}"
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Lying)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    live = f"http://127.0.0.1:{server.server_address[1]}"
    gate = HostGate(after=3, cooldown=1.0, timeout=0.5, retries=0)
    try:
        rows = [CatalogRow(str(i), str(i), f"{dead}/{i}.jpg", {}) for i in range(40)]
        rows.insert(20, CatalogRow("ok", "ok", f"{live}/a.jpg", {}))
        t0 = time.monotonic()
        got = dict((r.product_id, v) for r, v in fetched(rows, 4, gate))
        took = time.monotonic() - t0
        # only the first wave waits for the timeout: about 0.5 s, not 40 × 0.5 s / 4 threads
        assert took < 2.5, took
        errors = [got[str(i)] for i in range(40)]
        assert all(isinstance(e, FetchError) and e.outage for e in errors)
        assert sum("not asked again" in e.detail for e in errors) >= 30
        assert got["ok"].startswith(b"\xff\xd8")  # another source is asked as usual
        time.sleep(1.1)  # after the cool-down the source is asked again
        with pytest.raises(FetchError) as e:
            gate.fetch(f"{dead}/again.jpg")
        assert "not asked again" not in e.value.detail
    finally:
        server.shutdown()
        silent.close()


def test_a_host_that_answers_with_errors_for_a_few_images_is_asked_for_the_rest():
    # A 503 or a 403 for one image (a CDN in front of a bucket answers 403 for a missing key) is an answer,
    # not silence: three in a row shut the host for 30 s, its good images then failed at once as outages,
    # and the shard failed on every re-run though the host served them.
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    gate = HostGate(after=3, cooldown=30.0, retries=0)
    bad = ["down.jpg", "forbidden.jpg", "down.jpg", "forbidden.jpg"]
    rows = [CatalogRow(f"bad{i}", f"bad{i}", f"{base}/{p}", {}) for i, p in enumerate(bad)]
    rows += [CatalogRow(f"ok{i}", f"ok{i}", f"{base}/ok.jpg", {}) for i in range(10)]
    try:
        got = dict((r.product_id, v) for r, v in fetched(rows, 1, gate))
    finally:
        server.shutdown()
    errors = [got[f"bad{i}"] for i in range(len(bad))]
    assert [e.detail for e in errors] == ["HTTP 503", "HTTP 403", "HTTP 503", "HTTP 403"]
    assert all(e.outage for e in errors)  # still counted by the shard's OutageBreaker
    assert [got[f"ok{i}"] for i in range(10)] == [b"\xff\xd8jpeg"] * 10


@pytest.mark.parametrize("uri", ["s3://bucket/folder/", "s3://bucket", "s3:///a.jpg", "s3://"])
def test_an_s3_uri_that_names_no_object_is_the_rows_fault(uri):
    # refused from its form, before any request: not an outage, so a few such rows never fail a shard
    with pytest.raises(FetchError) as e:
        fetch(uri)
    assert e.value.reason in ("image_not_found", "image_unreadable") and not e.value.outage
    assert "s3://bucket/" in uri or "bucket" in e.value.detail


def test_reading_and_checking_a_catalog_peaks_well_under_its_former_memory(tmp_path):
    # The driver plans a whole night's catalog in memory: label values repeat and are held once, and
    # check_ids keeps each row's dict rather than a copy. Reading and checking this catalog peaked at
    # about 1.75 KB a row before (a million rows: 1.75 GB on the head node), about 1 KB now.
    import tracemalloc

    n = 20_000
    p = tmp_path / "c.csv"
    cols = "gender,masterCategory,subCategory,articleType,baseColour,season,year,usage,productDisplayName"
    labels = "Men,Apparel,Topwear,Tshirts,Navy Blue,Summer,2012,Casual"
    p.write_text(
        f"product_id,image_uri,{cols}\n"
        + "".join(f"SKU-{i:07d},images/{i}.jpg,{labels},Nike Men Navy Tee {i}\n" for i in range(n))
    )
    tracemalloc.start()
    rows, _ = read_catalog(p)
    ok, _ = check_ids(rows, str(p))
    del rows
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(ok) == n and ok[-1].raw["productDisplayName"] == f"Nike Men Navy Tee {n - 1}"
    assert ok[0].raw["articleType"] is ok[-1].raw["articleType"]  # one string for a repeated value
    assert peak / n < 1300, f"{peak / n:.0f} bytes per catalog row at the peak"


def test_a_parquet_catalog_is_read_in_about_the_memory_of_the_same_csv(tmp_path):
    # A Parquet catalog was turned into Python dicts whole before any repeated value was shared: about
    # 1.2 KB a row at the peak of reading this catalog (a million rows read and checked: 1.6 GB resident on
    # the head node against 0.95 GB as CSV). It is converted a batch at a time now: about 1 KB a row, the
    # rows the driver keeps.
    import tracemalloc

    n = 20_000
    p = tmp_path / "c.parquet"
    labels = ("Men", "Apparel", "Topwear", "Tshirts", "Navy Blue", "Summer", "2012", "Casual")
    cols = ("gender", "masterCategory", "subCategory", "articleType", "baseColour", "season", "year", "usage")
    table = {
        "product_id": [f"SKU-{i:07d}" for i in range(n)],
        "image_uri": [f"images/{i}.jpg" for i in range(n)],
        **{c: [int(v) if c == "year" else v] * n for c, v in zip(cols, labels, strict=True)},
        "productDisplayName": [f"Nike Men Navy Tee {i}" for i in range(n)],
    }
    pq.write_table(pa.table(table), p)
    tracemalloc.start()
    rows, bad = read_catalog(p)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(rows) == n and not bad and rows[-1]["productDisplayName"] == f"Nike Men Navy Tee {n - 1}"
    assert rows[0]["year"] == "2012" and rows[0]["articleType"] is rows[-1]["articleType"]
    assert peak / n < 1100, f"{peak / n:.0f} bytes per catalog row at the peak"


def test_reading_and_checking_a_large_catalog_say_how_far_they_are(tmp_path, monkeypatch, caplog):
    # A 1,000,000-row catalog took the driver 20-40 s to read and check with no line at all between
    # "ray ready" and the plan's; at 100M rows it would be most of an hour of silence.
    import logging
    import re

    monkeypatch.setattr("fashionlabel.catalog.PROGRESS_EVERY", 0.0)  # a line at every 4,096 rows
    caplog.set_level(logging.INFO, logger="fashionlabel.catalog")
    n = 10_000
    ids = [f"SKU-{i:07d}" for i in range(n)]
    table = pa.table({"product_id": ids, "image_uri": [f"images/{i}.jpg" for i in range(n)]})
    pq.write_table(table, tmp_path / "c.parquet")
    (tmp_path / "c.csv").write_text("product_id,image_uri\n" + "".join(f"{p},images/{p}.jpg\n" for p in ids))
    (tmp_path / "c.jsonl").write_text(
        "".join(json.dumps({"product_id": p, "image_uri": "a.jpg"}) + "\n" for p in ids)
    )
    for name, read in (
        ("c.csv", "4096/10001 lines"),
        ("c.jsonl", "4096/10000 lines"),
        ("c.parquet", "10000/10000 rows"),
    ):
        caplog.clear()
        rows, _ = read_catalog(tmp_path / name)
        check_ids(rows, str(tmp_path / name))
        lines = [r.getMessage() for r in caplog.records]
        at = re.escape(f"catalog {tmp_path / name}: ")
        assert any(re.fullmatch(at + re.escape(read) + r" read, \d+ s in", m) for m in lines), lines
        checked = r"8192/10000 rows checked \(ids, duplicates, image URIs\), \d+ s in"
        assert any(re.fullmatch(at + checked, m) for m in lines), lines


def test_values_are_shared_only_in_columns_that_repeat(tmp_path, monkeypatch):
    monkeypatch.setattr("fashionlabel.catalog.SHARED_VALUES_PER_COLUMN", 3)
    p = tmp_path / "c.parquet"
    pq.write_table(
        pa.table(
            {
                "product_id": [f"p{i}" for i in range(8)],
                "image_uri": [f"{i}.jpg" for i in range(8)],
                "colour": ["Red", "Blue"] * 4,
                "name": [f"name {i}" for i in range(8)],
                "year": [2011, 2012] * 4,  # numbers become strings, shared as well
            }
        ),
        p,
    )
    rows, _ = read_catalog(p)
    assert rows[0]["colour"] is rows[6]["colour"] and rows[1]["year"] is rows[7]["year"] == "2012"
    assert [r["name"] for r in rows] == [f"name {i}" for i in range(8)]  # past 3 distinct: left alone
    ok, _ = check_ids(rows, str(p))
    assert ok[2].raw is rows[2]  # the row itself, not a copy


def test_the_own_catalog_walkthrough_builds_a_catalog_its_taxonomy_accepts(tmp_path, monkeypatch):
    """docs/own-catalog.md: its snippet builds a catalog from the sample with other columns and ids, its
    taxonomy file loads, and every row is valid under it (no label outside the taxonomy, images found)."""
    import re

    root = Path(__file__).resolve().parents[1]
    doc = (root / "docs" / "own-catalog.md").read_text()
    blocks = dict(re.findall(r"```(python|yaml)\n(.*?)```", doc, re.S))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "examples").symlink_to(root / "examples")
    exec(compile(blocks["python"], "docs/own-catalog.md", "exec"), {})
    (tmp_path / "shop" / "taxonomy.yaml").write_text(blocks["yaml"])
    tax = Taxonomy.load("shop/taxonomy.yaml")
    assert [(h.name, h.kind, h.column) for h in tax.heads] == [
        ("department", "single", "Dept"),
        ("product_type", "single", "Product Type"),
        ("colour", "single", "Colour"),
        ("collar", "single", "Collar"),
        ("tags", "multi", "Tags"),
    ]
    rows, bad = read_catalog("shop/catalog.csv")
    valid, rejected = validate(rows, "shop/catalog.csv", tax)
    assert (len(valid), bad, rejected) == (1412, [], [])
    assert all(Path(v.image_uri).is_file() for v in valid)
    assert {v.labels["collar"] for v in valid} == {"n/v", "polo", "plain"}
    assert valid[0].product_id == "BA-1623/é" and valid[0].meta == {"Brand": "reebok"}


def test_a_catalog_without_the_contract_columns_says_which_to_rename(tmp_path):
    """A catalog with its own id and image column names (``sku``, ``Image URL``) was refused naming the
    columns it has, not what to do. The error names the missing columns to rename to and the column that
    holds image paths."""
    p = tmp_path / "c.parquet"
    pq.write_table(pa.table({"product_id": ["AB-12/34"], "Image URL": ["https://img.example/a.jpg"]}), p)
    with pytest.raises(
        CatalogError, match=r": name the export's image column image_uri \('Image URL' holds image"
    ):
        read_catalog(p)
    pq.write_table(pa.table({"sku": ["AB-12/34"], "image_uri": ["a.jpg"]}), p)
    with pytest.raises(
        CatalogError, match=r"has \['image_uri', 'sku'\]: name the export's id column product_id$"
    ):
        read_catalog(p)


def test_a_utf16_catalog_is_read_and_one_without_its_bom_is_named(tmp_path):
    """A catalog exported as "Unicode" (UTF-16 with a byte order mark) was refused for lacking product_id
    and image_uri, listing columns such as '\\x00p\\x00r\\x00o\\x00…'. It is read; without its BOM it is
    refused with what it looks like and what to do."""
    text = "product_id,image_uri,productDisplayName\r\nA1,a.jpg,Robe brodée\r\nA2,b.jpg,ドレス\r\n"
    for enc in ("utf-16", "utf-16-be"):
        p = tmp_path / f"{enc}.csv"
        p.write_bytes((text if enc == "utf-16" else "\ufeff" + text).encode(enc))  # "utf-16" adds its BOM
        rows, bad = read_catalog(p)
        assert not bad and [(r["product_id"], r["productDisplayName"]) for r in rows] == [
            ("A1", "Robe brodée"),
            ("A2", "ドレス"),
        ]
    (tmp_path / "nobom.csv").write_bytes(text.encode("utf-16-le"))
    with pytest.raises(CatalogError, match=r"nobom.csv has NUL bytes in its header: it looks UTF-16 encoded"):
        read_catalog(tmp_path / "nobom.csv")
