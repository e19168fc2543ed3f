"""Bad inputs: one catalog holding every kind of bad row and bad image we know of, plus good products and
odd-but-valid image formats, through shard → label. Each bad row must end in quarantine with its stable
reason (or, for damage found at labelling time, an ``error`` row), and every good product must be labelled
exactly once — the way a trusted batch system isolates bad records with a reason and carries on.
"""

from __future__ import annotations

import csv
import io
import json
import tarfile
from pathlib import Path

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest
from corpus import VALID, ImageServer, bomb_png, html_page, write
from PIL import Image

from fashionlabel.catalog import CatalogError, read_catalog, validate
from fashionlabel.label.pipeline import label_shards
from fashionlabel.shards import ShardConfig, iter_shard, list_shards, shard_catalog
from fashionlabel.taxonomy import Taxonomy
from tests.conftest import SAMPLE, sample_rows

TAX = Taxonomy.load("fashion-product-images")


def _truncated_jpeg() -> bytes:
    data = (SAMPLE / "images" / "10020.jpg").read_bytes()
    return data[: len(data) // 2]


def _truncated_png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 60, 3), np.uint8)).save(buf, "PNG")
    return buf.getvalue()[:-200]


def _one_px() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (1, 1), (1, 2, 3)).save(buf, "PNG")
    return buf.getvalue()


def build_corpus(d: Path, server_url: str) -> tuple[Path, dict, dict, list[str], list[str]]:
    """Write the corpus catalog; return (catalog, bad kinds → (product_id, reason), valid kinds → id,
    good ids, header)."""
    good = sample_rows(60)
    header = list(good[0])
    template = dict(good[0])
    imgs = d / "imgs"

    def row(pid: str, uri: str, **labels) -> dict[str, str]:
        return {**template, "product_id": pid, "image_uri": uri, **labels}

    bad: dict[str, tuple[str, str]] = {}
    rows: list[dict[str, str] | str] = []  # a str is a raw CSV line (for rows the writer cannot make)

    def add_bad(kind: str, pid: str, reason: str, uri: str, **labels) -> None:
        bad[kind] = (pid, reason)
        rows.append(row(pid, uri, **labels))

    add_bad("missing image file", "bad-missing", "image_not_found", str(imgs / "nope.jpg"))
    add_bad("directory instead of an image", "bad-dir", "image_not_found", str(d))
    add_bad("zero-byte file", "bad-zero", "image_empty", write(imgs / "zero.jpg", b""))
    add_bad("truncated JPEG", "bad-truncjpg", "image_truncated", write(imgs / "trunc.jpg", _truncated_jpeg()))
    add_bad("truncated PNG", "bad-truncpng", "image_truncated", write(imgs / "trunc.png", _truncated_png()))
    add_bad(
        "random bytes, not an image",
        "bad-random",
        "not_an_image",
        write(imgs / "random.jpg", np.random.default_rng(1).bytes(5000)),
    )
    add_bad(
        "PDF saved as .jpg",
        "bad-pdf",
        "not_an_image",
        write(imgs / "doc.jpg", b"%PDF-1.4\n%\xe2\xe3\n1 0 obj"),
    )
    add_bad(
        "HTML error page saved as .jpg", "bad-htmlfile", "not_an_image", write(imgs / "err.jpg", html_page())
    )
    add_bad(
        "HTML error page served as an image (HTTP 200)",
        "bad-html200",
        "not_an_image",
        f"{server_url}/error-page.jpg",
    )
    add_bad("HTTP 404", "bad-http404", "image_not_found", f"{server_url}/gone.jpg")
    add_bad("HTTP 500", "bad-http500", "image_unreadable", f"{server_url}/boom.jpg")
    add_bad(
        "unreachable host (connection refused)", "bad-refused", "image_unreadable", "http://127.0.0.1:9/x.jpg"
    )
    add_bad(
        "decompression bomb (40000x40000 PNG header)",
        "bad-bomb",
        "image_too_large",
        write(imgs / "bomb.png", bomb_png()),
    )
    add_bad("1x1 image", "bad-1px", "image_too_small", write(imgs / "1px.png", _one_px()))
    add_bad("empty product_id", "", "missing_product_id", str(SAMPLE / "images" / "10020.jpg"))
    add_bad("whitespace product_id", "   ", "missing_product_id", str(SAMPLE / "images" / "10020.jpg"))
    add_bad("product_id with a newline", "x\ny", "invalid_product_id", str(SAMPLE / "images" / "10020.jpg"))
    add_bad(
        "very long product_id (300 chars)",
        "L" * 300,
        "invalid_product_id",
        str(SAMPLE / "images" / "10020.jpg"),
    )
    add_bad(
        "product_id with a leading space", " 42", "invalid_product_id", str(SAMPLE / "images" / "10020.jpg")
    )
    add_bad("empty image_uri", "bad-nouri", "missing_image_uri", "")
    add_bad(
        "label outside the taxonomy",
        "bad-label",
        "label_outside_taxonomy",
        str(SAMPLE / "images" / "10020.jpg"),
        gender="Martian",
    )
    # Duplicate id: the first occurrence is kept (a good product below), the second quarantined.
    dup_pid = good[0]["product_id"]
    bad["duplicate product_id"] = (dup_pid, "duplicate_product_id")
    bad["line with too few fields"] = ("bad-fewfields", "malformed_row")
    bad["line with too many fields"] = ("bad-manyfields", "malformed_row")
    raw_lines = ["bad-fewfields,x.jpg,Men", "bad-manyfields," + ",".join(["x"] * (len(header) + 2))]

    valid: dict[str, str] = {}
    # Ids that are not safe file names are products all the same: they are packed under derived keys.
    for kind, pid in [
        ("product_id with /", "a/b"),
        ("product_id with ..", "../../etc/cron.d/x"),
        ("absolute path as product_id", "/etc/passwd"),
        ("product_id with spaces", "a b"),
        ("non-ASCII product_id", "café-42"),
        ("product_id with a dot (tar extension split)", "a.b"),
    ]:
        valid[kind] = pid
        rows.append(row(pid, str(SAMPLE / "images" / "10020.jpg")))
    for i, v in enumerate(VALID):
        pid = f"valid-{i:02d}"
        valid[v.kind] = pid
        rows.append(row(pid, write(imgs / f"v{i}{v.suffix}", v.data)))
    # Other URI forms of a good image: relative to the catalog, file://, and over HTTP as image/png.
    write(d / "rel" / "ok.jpg", (SAMPLE / "images" / "10020.jpg").read_bytes())
    for kind, pid, uri in [
        ("image path relative to the catalog", "uri-relative", "rel/ok.jpg"),
        ("file:// URI", "uri-file", f"file://{SAMPLE / 'images' / '10026.jpg'}"),
        ("image over HTTP (image/png)", "uri-http", f"{server_url}/ok.png"),
    ]:
        valid[kind] = pid
        rows.append(row(pid, uri))

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for r in good:
        w.writerow([r[h] for h in header])
    for r in rows:
        w.writerow([r[h] for h in header])
    w.writerow([good[0][h] for h in header])  # the duplicate
    text = buf.getvalue() + "\n".join(raw_lines) + "\n"
    cat = d / "catalog.csv"
    cat.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))  # a BOM, as spreadsheet exports write it
    return cat, bad, valid, [r["product_id"] for r in good], header


def _hostile_shard(path: Path) -> None:
    """Damage found only at labelling time: a shard with a corrupt JPEG and a sample without any image."""
    with tarfile.open(path, "w") as tar:
        for name, data in [
            ("labelcorrupt.jpg", b"\xff\xd8\xff\xe0garbage"),
            ("labelcorrupt.json", json.dumps({"product_id": "labelcorrupt", "sha256": "x"}).encode()),
            ("labelnojpg.json", json.dumps({"product_id": "labelnojpg", "sha256": "y"}).encode()),
        ]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_bad_input_corpus(ray_session, tiny_model, tmp_path, ledger):
    png = io.BytesIO()
    Image.new("RGB", (60, 80), (0, 0, 255)).save(png, "PNG")
    routes = {
        "/error-page.jpg": (200, "text/html; charset=utf-8", html_page()),
        "/boom.jpg": (500, "text/html", b"<html>Internal Server Error</html>"),
        "/ok.png": (200, "image/png", png.getvalue()),
    }
    with ImageServer(routes) as srv:
        cat, bad, valid, good, _ = build_corpus(tmp_path, srv.url)
        out = tmp_path / "shards"
        s = shard_catalog(str(cat), str(out), TAX, ShardConfig(samples_per_shard=25))
    assert len(bad) + len(valid) >= 25
    _hostile_shard(out / "shard-000900.tar")
    labels = tmp_path / "labels"
    lb = label_shards(str(out), str(tiny_model), str(labels), "2026-02-01")

    q = pq.read_table(out / "quarantine.parquet").to_pylist()
    index = pq.read_table(out / "index.parquet").to_pandas()
    con = duckdb.connect()
    lab = con.execute(
        f"SELECT product_id, error FROM read_parquet('{labels}/history/*/*.parquet')"
    ).fetchall()
    labelled = [p for p, e in lab if e is None]
    errors = {p: e for p, e in lab if e is not None}

    failures = []
    for kind, (pid, reason) in bad.items():
        hits = [r for r in q if r["product_id"] == pid and r["reason"] == reason]
        if kind == "duplicate product_id":
            ok = len(hits) == 1 and labelled.count(pid) == 1  # first occurrence labelled once
        else:
            ok = len(hits) == 1 and pid not in labelled
        ledger.bad_input(kind, f"quarantined: {reason}" if ok else None)
        if not ok:
            failures.append((kind, pid, reason, [r for r in q if r["product_id"] == pid]))

    samples, sidecars = {}, {}
    for u in list_shards(str(out)):
        if u.endswith("shard-000900.tar"):  # the hand-damaged one
            continue
        for smp in iter_shard(u):
            if "jpg" in smp:
                samples[smp["json"]["product_id"]] = np.asarray(Image.open(io.BytesIO(smp["jpg"])))
                sidecars[smp["json"]["product_id"]] = smp["json"]
    checks = {v.kind: v.check for v in VALID}
    for kind, pid in valid.items():
        img = samples.get(pid)
        ok = (
            img is not None
            and img.ndim == 3
            and img.shape[2] == 3
            and labelled.count(pid) == 1
            and checks.get(kind, lambda a: True)(img)
        )
        outcome = (
            "packed under a derived key, labelled"
            if "product_id" in kind
            else "packed, normalised to RGB, labelled"
        )
        ledger.bad_input(kind, outcome if ok else None)
        if not ok:
            failures.append(
                (kind, pid, None if img is None else img.shape, [r for r in q if r["product_id"] == pid])
            )

    for pid in ("labelcorrupt", "labelnojpg"):
        ok = bool(errors.get(pid)) and pid not in labelled  # an error row that says why, no label
        kind = {"labelcorrupt": "corrupt JPEG inside a shard", "labelnojpg": "shard sample without an image"}[
            pid
        ]
        ledger.bad_input(kind, f"error row: {errors.get(pid)}" if ok else None)
        if not ok:
            failures.append((kind, pid, errors.get(pid)))
    # The BOM sits right before the header's first column and the first product follows it: both must come
    # through intact, and no column name may carry the BOM along.
    first = sidecars.get(good[0], {})
    columns = [*read_catalog(cat)[0][0], *first.get("meta", {})]
    bom_ok = good[0] in set(index["product_id"]) and not any("\ufeff" in c for c in columns)
    ledger.bad_input(
        "catalog with a UTF-8 BOM", "read; first product and column names intact" if bom_ok else None
    )
    if not bom_ok:
        failures.append(("catalog with a UTF-8 BOM", good[0], columns))

    assert not failures, failures
    # The rest of the catalog is labelled, each product exactly once; nothing is silently dropped.
    expected = set(good) | set(valid.values())
    lost, dup = ledger.products(expected, labelled)
    assert (lost, dup) == (0, 0)
    assert set(labelled) == expected
    assert set(index["product_id"]) == expected and index["product_id"].is_unique
    assert s.packed == len(expected) and s.quarantined == len(q) == len(bad)
    assert s.catalog_rows == len(good) + len(bad) + len(
        valid
    )  # bad includes the duplicate and 2 malformed lines
    assert lb["errored"] == 2 and lb["labelled"] == len(expected)
    # quarantine reasons are the stable vocabulary, and each row says why
    assert all(r["reason"] and r["detail"] is not None for r in q)


# ---- catalog-level bad inputs: the whole file is odd --------------------------------------------------
def _csv(header: list[str], rows: list[list[str]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


HEADER = ["product_id", "image_uri", "gender", "productDisplayName"]


def test_mixed_encodings_keep_every_row(tmp_path, ledger, caplog):
    """A UTF-8 catalog (with BOM) into which a legacy tool appended one cp1252 line: every row is read,
    UTF-8 text stays intact, and the cp1252 line decodes to the right characters. Since cp1252 reads any
    bytes (a Shift-JIS catalog comes out as mojibake, silently), the lines read so are named."""
    utf8 = _csv(HEADER, [["p1", "a.jpg", "Women", "Robe brodée"], ["p2", "b.jpg", "Men", "Crème tee"]])
    data = b"\xef\xbb\xbf" + utf8.encode() + "p3,c.jpg,Men,Caf\xe9 shirt\n".encode("cp1252")
    (tmp_path / "mixed.csv").write_bytes(data)
    rows, bad = read_catalog(tmp_path / "mixed.csv")
    names = {r["product_id"]: r["productDisplayName"] for r in rows}
    ok = not bad and names == {"p1": "Robe brodée", "p2": "Crème tee", "p3": "Café shirt"}
    ledger.bad_input(
        "mixed encodings (UTF-8 + BOM with a cp1252 line)", "every row read, text intact" if ok else None
    )
    assert ok, (names, bad)
    assert (
        "1 line(s) are not UTF-8 and were read as Windows-1252 (cp1252), e.g. line 4: 'p3,c.jpg"
        in caplog.text
    )
    caplog.clear()
    (tmp_path / "sjis.csv").write_bytes(
        b"product_id,image_uri,productDisplayName\np1,a.jpg," + "ドレス".encode("shift_jis")
    )
    read_catalog(tmp_path / "sjis.csv")
    assert "e.g. line 2: 'p1,a.jpg,ƒhƒŒƒX'; if the file is in another encoding (Shift-JIS" in caplog.text


@pytest.mark.parametrize(
    "kind,data,needle",
    [
        (
            "duplicate header column",
            _csv(["product_id", "image_uri", "gender", "gender"], [["1", "a.jpg", "Men", "Men"]]),
            "duplicate columns",
        ),
        (
            "catalog without product_id/image_uri columns",
            _csv(["id", "url"], [["1", "a.jpg"]]),
            "needs columns",
        ),
        ("empty catalog file", "", "empty"),
    ],
)
def test_unusable_catalog_fails_clearly(tmp_path, ledger, kind, data, needle):
    path = tmp_path / "c.csv"
    path.write_text(data)
    with pytest.raises(CatalogError) as e:
        read_catalog(path)
    ok = needle in str(e.value) and str(path) in str(e.value)
    ledger.bad_input(kind, f"job refused, clear error ({needle})" if ok else None)
    assert ok, str(e.value)


def test_jsonl_catalog_bad_lines(tmp_path, ledger):
    lines = [
        json.dumps({"product_id": "j1", "image_uri": "a.jpg"}),
        "{not json",
        "[1, 2]",
        json.dumps({"product_id": "j2", "image_uri": "b.jpg"}),
    ]
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n")
    rows, bad = read_catalog(tmp_path / "c.jsonl")
    valid, rejected = validate(rows, str(tmp_path / "c.jsonl"), TAX)
    ok = [r.product_id for r in valid] == ["j1", "j2"] and [b.reason for b in bad] == ["malformed_row"] * 2
    ledger.bad_input(
        "JSON Lines catalog with broken and non-object lines", "quarantined: malformed_row" if ok else None
    )
    assert ok, (valid, bad, rejected)
