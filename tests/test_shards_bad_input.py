"""Every kind of bad catalog row ends in quarantine with its stable reason; the rest is packed.

One real run of ``shard_catalog`` on local Ray over a catalog that mixes good products (bundled sample
images, addressed as relative path, absolute path, ``file://`` and ``http://`` from a local server) with
one row per bad-input kind, in CSV, Parquet and JSON Lines.
"""

from __future__ import annotations

import csv
import functools
import http.server
import io
import json
import os
import re
import shutil
import tarfile
import threading
from collections import Counter
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import SAMPLE
from PIL import Image
from test_images import _png_header_only

from fashionlabel.catalog import REASONS
from fashionlabel.shards import (
    ShardConfig,
    ShardJobError,
    index_schema,
    iter_shard,
    list_shards,
    shard_catalog,
)
from fashionlabel.taxonomy import Taxonomy

TAX = Taxonomy.load("fashion-product-images")
COLS = [
    "product_id",
    "image_uri",
    "gender",
    "masterCategory",
    "subCategory",
    "articleType",
    "baseColour",
    "season",
    "year",
    "usage",
    "productDisplayName",
]


class _Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *a):  # keep test output clean
        pass

    def do_GET(self):  # noqa: N802 - http.server's naming
        if self.path.startswith("/error500"):
            self.send_error(500)
        elif self.path.startswith("/page.jpg"):
            body = b"<html>not here</html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        else:
            super().do_GET()


@pytest.fixture(scope="module")
def http_images(tmp_path_factory):
    root = tmp_path_factory.mktemp("www")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=root))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


def _good_rows(n: int) -> list[dict[str, str]]:
    with open(SAMPLE / "catalog.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if (SAMPLE / r["image_uri"]).exists()]
    return [{"product_id": r["id"] if "id" in r else r["product_id"], **r} for r in rows[:n]]


def _bad_files(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    good = (SAMPLE / "images").glob("*.jpg").__next__().read_bytes()
    files = {
        "empty": b"",
        "truncated": good[: len(good) // 2],
        "text": b"id,name\n1,not an image\n",
        "bomb": _png_header_only(100_000, 100_000),
    }
    buf = io.BytesIO()
    Image.new("RGB", (1, 1), "white").save(buf, format="PNG")
    files["pixel"] = buf.getvalue()
    out = {}
    for name, data in files.items():
        (folder / f"{name}.jpg").write_bytes(data)
        out[name] = folder / f"{name}.jpg"
    return out


# ids that are not safe file names ('/', '..', spaces, non-ASCII, dots): packed under derived keys
ODD_BUT_VALID = ["a/b", "..", "../etc", "two words", "prodüct", "x.jpg", "SKU 12.5/B"]


def build_catalog(folder: Path, http_root: Path, http_base: str) -> tuple[list[dict], dict[str, str]]:
    """Rows for the catalog and ``{product_id: expected reason}`` for every bad row."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copytree(SAMPLE / "images", folder / "images", dirs_exist_ok=True)
    good = _good_rows(24)
    for i, r in enumerate(good):  # four ways to address an image
        path = folder / "images" / Path(r["image_uri"]).name
        r["image_uri"] = [f"images/{path.name}", str(path), f"file://{path}", f"{http_base}/{path.name}"][
            i % 4
        ]
        shutil.copy(path, http_root / path.name)
    bad_files = _bad_files(folder / "bad")
    tmpl = {k: v for k, v in good[0].items() if k not in ("product_id", "image_uri")}

    def row(pid: str, uri: str, **over: str) -> dict[str, str]:
        return {"product_id": pid, "image_uri": uri, **tmpl, **over}

    expect = {
        "b-missing": "image_not_found",
        "b-http404": "image_not_found",
        "b-empty": "image_empty",
        "b-unreachable": "image_unreadable",
        "b-http500": "image_unreadable",
        "b-scheme": "image_unreadable",
        "b-truncated": "image_truncated",
        "b-text": "not_an_image",
        "b-html": "not_an_image",
        "b-bomb": "image_too_large",
        "b-pixel": "image_too_small",
        "b-label": "label_outside_taxonomy",
        "b-nouri": "missing_image_uri",
    }
    bad = [
        row("b-missing", str(folder / "images" / "no-such-file.jpg")),
        row("b-http404", f"{http_base}/no-such.jpg"),
        row("b-empty", str(bad_files["empty"])),
        row("b-unreachable", "http://127.0.0.1:9/x.jpg"),  # discard port: connection refused
        row("b-http500", f"{http_base}/error500.jpg"),
        row("b-scheme", "ftp://example.invalid/x.jpg"),
        row("b-truncated", str(bad_files["truncated"])),
        row("b-text", str(bad_files["text"])),
        row("b-html", f"{http_base}/page.jpg"),
        row("b-bomb", str(bad_files["bomb"])),
        row("b-pixel", str(bad_files["pixel"])),
        row("b-label", good[1]["image_uri"], gender="Martian"),
        row("b-nouri", "  "),
    ]
    # ids no product can have: empty, blank, padded, control characters, too long; and a duplicate
    odd = {
        "": "missing_product_id",
        "   ": "missing_product_id",
        " 123": "invalid_product_id",
        "tab\tid": "invalid_product_id",
        "L" * 257: "invalid_product_id",
    }
    bad += [row(pid, good[2]["image_uri"]) for pid in odd]
    bad += [row(pid, good[2]["image_uri"]) for pid in ODD_BUT_VALID]
    dup = row(good[3]["product_id"], good[4]["image_uri"])  # second occurrence of a packed id
    rows = good[:12] + bad + [dup] + good[12:]
    return rows, expect | odd | {"__dup__": "duplicate_product_id"}


def _write(rows: list[dict], path: Path) -> Path:
    if path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif path.suffix == ".jsonl":
        with open(path, "w") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
            f.write('{"product_id": "b-broken", "image_uri": \n')  # a line that is not JSON
            f.write('["a", "list"]\n')  # JSON, but not an object
    else:
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLS)
            w.writeheader()
            w.writerows(rows)
            f.write("b-short,images/x.jpg,Men\n")  # too few fields
            f.write("b-long,images/x.jpg," + ",".join(["x"] * 12) + "\n")  # too many
    return path


@pytest.mark.parametrize("fmt", ["csv", "parquet", "jsonl"])
def test_every_bad_kind_is_quarantined_and_the_rest_packed(ray_session, http_images, tmp_path, fmt):
    rows, expect = build_catalog(tmp_path, *http_images)
    catalog = _write(rows, tmp_path / f"catalog.{fmt}")
    out = tmp_path / "shards"
    s = shard_catalog(str(catalog), str(out), TAX, ShardConfig(samples_per_shard=10, max_failure_rate=0.9))

    good_ids = [r["product_id"] for r in _good_rows(24)] + ODD_BUT_VALID
    con = duckdb.connect()
    index = con.execute(f"SELECT product_id, key, shard FROM '{out}/index.parquet'").fetchall()
    assert sorted(p for p, _, _ in index) == sorted(good_ids)  # every good product, once
    q = con.execute(
        f"SELECT product_id, reason, detail, image_uri FROM '{out}/quarantine.parquet'"
    ).fetchall()
    got = {p: r for p, r, _, _ in q if not (p in good_ids and r == "duplicate_product_id")}
    dups = [p for p, r, _, _ in q if r == "duplicate_product_id"]
    assert dups == [rows[next(i for i, r in enumerate(rows) if r["product_id"] == good_ids[3])]["product_id"]]
    want = {k: v for k, v in expect.items() if k != "__dup__"}
    malformed = {"csv": 2, "parquet": 0, "jsonl": 2}[fmt]
    assert {p: r for p, r in got.items() if r != "malformed_row"} == want
    assert sum(r == "malformed_row" for _, r, _, _ in q) == malformed
    if fmt == "csv":
        assert {p for p, r, _, _ in q if r == "malformed_row"} == {"b-short", "b-long"}
    assert set(r for _, r, _, _ in q) <= set(REASONS) and all(d for _, _, d, _ in q)

    # the summary and stats.json count every reason; nothing is dropped silently
    n_bad = len(want) + 1 + malformed
    assert s.packed == len(good_ids) and s.quarantined == n_bad
    assert s.catalog_rows == len(rows) + malformed
    stats = json.loads((out / "stats.json").read_text())
    assert stats["reasons"] == s.reasons and sum(s.reasons.values()) == n_bad
    assert s.reasons["invalid_product_id"] == 3 and s.reasons["missing_product_id"] == 2

    # tars hold exactly the indexed products, under safe member names, grouped by key
    keys, owners = [], []
    for uri in list_shards(str(out)):
        with tarfile.open(uri) as tar:
            names = tar.getnames()
        assert all(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*\.(jpg|json)", n) for n in names), names
        samples = list(iter_shard(uri))
        keys += [smp["__key__"] for smp in samples]
        owners += [(smp["json"]["product_id"], smp["__key__"]) for smp in samples]
    assert sorted(keys) == sorted(k for _, k, _ in index) and len(set(keys)) == len(keys)
    # each sample names its product exactly as the catalog spelled it, under the key the index gives it
    assert sorted(owners) == sorted((p, k) for p, k, _ in index)
    assert {p for p, k, _ in index if p != k} == set(ODD_BUT_VALID)
    assert not list(out.rglob("*.tmp"))


def test_failure_rate_fails_the_job_after_writing_its_outputs(ray_session, tmp_path):
    rows = _good_rows(4)
    for r in rows:
        r["image_uri"] = str(SAMPLE / r["image_uri"])
    rows += [{**rows[0], "product_id": f"gone-{i}", "image_uri": f"/nonexistent/{i}.jpg"} for i in range(6)]
    catalog = _write(rows, tmp_path / "c.csv")
    with pytest.raises(
        ShardJobError,
        match=r"8/12 rows quarantined \(image_not_found 6, malformed_row 2\), above --max-failure-rate 0.5, "
        r"e.g. product 'gone-0': image_not_found, .*/nonexistent/0.jpg.*; why each row is in .*/o/quarantine.parquet",
    ):
        shard_catalog(str(catalog), str(tmp_path / "o"), TAX, ShardConfig(samples_per_shard=5))
    # a catalog whose labels are the fault, not its images: the error shows one, and blames no image
    labelled = [{**r, "gender": r["gender"].lower()} for r in rows[:4]]
    with pytest.raises(
        ShardJobError,
        match=r"label_outside_taxonomy, gender='\w+' .*the taxonomy has '\w+'.*once the catalog, its images or the taxonomy",
    ):
        shard_catalog(str(_write(labelled, tmp_path / "l.csv")), str(tmp_path / "l"), TAX, ShardConfig())
    q = pq.read_table(tmp_path / "o" / "quarantine.parquet")
    assert q.num_rows == 8  # 6 missing + 2 malformed lines the CSV writer appends
    s = shard_catalog(
        str(catalog), str(tmp_path / "o2"), TAX, ShardConfig(samples_per_shard=5, max_failure_rate=0.9)
    )
    assert s.packed == 4


def test_job_cannot_proceed(ray_session, tmp_path):
    catalog = _write(_good_rows(2), tmp_path / "c.csv")
    blocker = tmp_path / "file"
    blocker.write_text("a file where the output folder should be")
    with pytest.raises(ShardJobError, match="cannot use output"):
        shard_catalog(str(catalog), str(blocker / "shards"), TAX)
    from fashionlabel.catalog import CatalogError

    with pytest.raises(CatalogError, match="not found"):
        shard_catalog(str(tmp_path / "none.csv"), str(tmp_path / "o"), TAX)
    (tmp_path / "nocols.csv").write_text("id,url\n1,a.jpg\n")
    with pytest.raises(CatalogError, match="needs columns product_id and image_uri"):
        shard_catalog(str(tmp_path / "nocols.csv"), str(tmp_path / "o"), TAX)
    assert not os.path.exists(tmp_path / "o" / "index.parquet")


def test_a_source_that_is_down_fails_the_shard_instead_of_quarantining_it(tmp_path):
    from conftest import sample_rows

    from fashionlabel.catalog import SourceUnavailable, check_ids
    from fashionlabel.shards import pack_shard

    good = [r for r in sample_rows(40) if Path(r["image_uri"]).exists()][:20]
    # nothing listens on port 9: every fetch is refused, as from a host that is down
    down = [dict(good[0], product_id=f"down{i}", image_uri=f"http://127.0.0.1:9/{i}.jpg") for i in range(6)]

    def pack(rows, out):
        valid, _ = check_ids(rows, str(tmp_path / "catalog.csv"))
        return pack_shard(0, valid, str(out), ShardConfig(), index_schema(TAX), TAX)

    # a couple of unreachable images among many: quarantined like any bad image, the shard is done
    r = pack(good + down[:2], tmp_path / "few")
    assert (r["packed"], r["rejected"]) == (20, 2)
    q = pq.read_table(tmp_path / "few" / "_parts" / "shard-000000.quarantine.parquet").to_pylist()
    assert {(x["product_id"], x["reason"]) for x in q} == {
        ("down0", "image_unreadable"),
        ("down1", "image_unreadable"),
    }
    # more than a few: the source is down, so the shard fails with a message that says so, and leaves no
    # tar, no quarantine and no completion marker behind: a re-run fetches everything again
    with pytest.raises(
        SourceUnavailable, match=r"cannot fetch the images of shard-000000: 4 fetches .*re-run"
    ):
        pack(good + down, tmp_path / "many")
    assert not list((tmp_path / "many").rglob("*.parquet")) and not list((tmp_path / "many").rglob("*.tar"))


def test_images_that_failed_last_time_failing_again_are_no_sign_of_an_outage(tmp_path):
    """A run after one that quarantined a few images of an answering host (HTTP 500) packs them again in a
    small shard of their own: counted as outage-like there, they failed the shard, and every re-run of it.
    Given as failed before, they are quarantined again instead; a new failure still counts."""
    from conftest import sample_rows

    from fashionlabel.catalog import SourceUnavailable, check_ids
    from fashionlabel.shards import pack_shard

    good = [r for r in sample_rows(40) if Path(r["image_uri"]).exists()][:2]
    down = [dict(good[0], product_id=f"down{i}", image_uri=f"http://127.0.0.1:9/{i}.jpg") for i in range(5)]
    valid, _ = check_ids(good + down[:4], str(tmp_path / "catalog.csv"))
    before = frozenset((r.product_id, r.image_uri) for r in valid if r.product_id.startswith("down"))

    def pack(rows, out, failed_before=frozenset()):
        return pack_shard(0, rows, str(out), ShardConfig(), index_schema(TAX), TAX, failed_before)

    with pytest.raises(SourceUnavailable, match="4 fetches failed as if the source were down"):
        pack(valid, tmp_path / "plain")
    r = pack(valid, tmp_path / "again", before)
    assert (r["packed"], r["rejected"]) == (2, 4)
    q = pq.read_table(tmp_path / "again" / "_parts" / "shard-000000.quarantine.parquet")
    assert sorted(q.column("product_id").to_pylist()) == [f"down{i}" for i in range(4)]
    # four new failures beside them still read as the source being down
    more, _ = check_ids(
        [dict(d, product_id=f"new{i}") for i, d in enumerate(down[:4])], str(tmp_path / "catalog.csv")
    )
    with pytest.raises(SourceUnavailable, match="4 fetches failed"):
        pack(valid + more, tmp_path / "new", before)


@pytest.mark.timeout(300)
def test_an_incremental_run_takes_the_previous_quarantine_as_failed_before(
    ray_session, http_images, tmp_path
):
    """``shard --incremental PREV``: PREV's quarantined products are packed again (an image may have been
    mended) and, when a host still answers them with an error, quarantined again; the run completes."""
    from conftest import sample_rows, write_catalog

    root, base = http_images
    good = [r for r in sample_rows(60) if Path(r["image_uri"]).exists()][:40]
    broken = [dict(good[0], product_id=f"e{i}", image_uri=f"{base}/error500/{i}.jpg") for i in range(4)]
    cat = write_catalog(tmp_path / "catalog.csv", good + broken)
    cfg = ShardConfig(samples_per_shard=100, max_side=96)
    first = shard_catalog(str(cat), str(tmp_path / "s1"), TAX, cfg)
    assert (first.packed, first.quarantined) == (40, 4)
    second = shard_catalog(str(cat), str(tmp_path / "s2"), TAX, cfg, incremental_from=str(tmp_path / "s1"))
    assert (second.new, second.unchanged, second.packed, second.quarantined) == (4, 40, 0, 4)
    assert second.reasons == {"image_unreadable": 4}


def test_an_unexpected_error_on_one_row_is_quarantined_and_the_rest_packed(
    ray_session, tmp_path, monkeypatch
):
    from conftest import sample_rows, write_catalog

    from fashionlabel.catalog import check_ids, read_catalog
    from fashionlabel.shards import pack as shard_pack

    good = [r for r in sample_rows(40) if Path(r["image_uri"]).exists()][:12]
    catalog = write_catalog(tmp_path / "catalog.csv", good)
    odd = good[5]
    odd_bytes = Path(odd["image_uri"]).read_bytes()
    assert [Path(r["image_uri"]).read_bytes() for r in good].count(odd_bytes) == 1
    normalise = shard_pack.normalise

    def fails_on_one_image(data: bytes, **kw):
        # a fault no quarantine reason foresees, raised while one specific photo is normalised
        if data == odd_bytes:
            raise RuntimeError("codec state corrupted")
        return normalise(data, **kw)

    # Patched in this process, so the packing of the shard runs here rather than in a Ray worker.
    cfg = ShardConfig(samples_per_shard=len(good))
    valid, _ = check_ids(read_catalog(catalog)[0], str(catalog))
    out = tmp_path / "shards"
    monkeypatch.setattr(shard_pack, "normalise", fails_on_one_image)
    r = shard_pack.pack_shard(0, valid, str(out), cfg, index_schema(TAX), TAX)
    monkeypatch.undo()
    assert (r["packed"], r["rejected"]) == (len(good) - 1, 1)

    # The job picks up the finished shard and completes: the row is counted under its reason, not lost.
    s = shard_catalog(str(catalog), str(out), TAX, cfg)
    assert (s.packed, s.shards_skipped, s.reasons) == (len(good) - 1, 1, {"processing_error": 1})
    q = pq.read_table(out / "quarantine.parquet").to_pylist()
    assert [(x["product_id"], x["reason"], x["detail"]) for x in q] == [
        (odd["product_id"], "processing_error", "RuntimeError: codec state corrupted")
    ]
    packed = [smp["json"]["product_id"] for u in list_shards(str(out)) for smp in iter_shard(u)]
    assert packed == [g["product_id"] for g in good if g is not odd]


def test_malformed_image_uris_are_quarantined_not_taken_for_a_source_that_is_down(tmp_path):
    from conftest import sample_rows

    from fashionlabel.catalog import check_ids
    from fashionlabel.shards import pack_shard

    good = [r for r in sample_rows(40) if Path(r["image_uri"]).exists()][:20]
    odd = ["s3://bucket/folder/", "s3://bucket", "s3:///a.jpg", "http:///a.jpg", "http://h:port/a.jpg"]
    odd += ["file://img/a.jpg"]
    bad = [dict(good[0], product_id=f"odd{i}", image_uri=u) for i, u in enumerate(odd)]
    valid, _ = check_ids(good + bad, str(tmp_path / "catalog.csv"))
    # each is one row's mistake: more of them than the outage limit (3) still leave a finished shard
    r = pack_shard(0, valid, str(tmp_path), ShardConfig(), index_schema(TAX), TAX)
    assert (r["packed"], r["rejected"]) == (20, len(odd))
    q = pq.read_table(tmp_path / "_parts" / "shard-000000.quarantine.parquet").to_pylist()
    assert {x["product_id"] for x in q} == {f"odd{i}" for i in range(len(odd))}


class _Slow(http.server.SimpleHTTPRequestHandler):
    """Answers after 0.2 s, as a distant CDN would, and counts how many requests it holds at once and how
    often each path was asked for.

    A request counts itself out before its answer is sent: counted out after, a client asking one at a
    time could be answered and ask again before the answering thread had counted itself out, and two
    would seem held at once."""

    lock, now, most = threading.Lock(), 0, 0
    asked: Counter[str] = Counter()  # path -> requests for it

    def log_message(self, *a):
        pass

    def do_GET(self):  # noqa: N802 - http.server's naming
        cls = type(self)
        with cls.lock:
            cls.asked[self.path] += 1
            cls.now += 1
            cls.most = max(cls.most, cls.now)
        try:
            threading.Event().wait(0.2)
        finally:
            with cls.lock:
                cls.now -= 1
        super().do_GET()


def test_a_shard_fetches_remote_images_several_at_a_time_and_packs_them_in_catalog_order(
    tmp_path, monkeypatch
):
    from conftest import sample_rows

    from fashionlabel import catalog
    from fashionlabel.catalog import check_ids
    from fashionlabel.shards import pack as shard_pack

    www = tmp_path / "www"
    www.mkdir()
    good = [r for r in sample_rows(60) if Path(r["image_uri"]).exists()][:24]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Slow, directory=www))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    rows = []
    for r in good:
        shutil.copy(r["image_uri"], www / Path(r["image_uri"]).name)
        rows.append(dict(r, image_uri=f"{base}/{Path(r['image_uri']).name}"))
    odd = rows[7]["image_uri"]
    fetch = catalog.fetch  # what the shard's fetch threads call, through their HostGate

    def fails_on_one(uri, *a, **kw):  # a fault no reason foresees, raised inside a fetch thread
        if uri == odd:
            raise RuntimeError("resolver state corrupted")
        return fetch(uri, *a, **kw)

    monkeypatch.setattr(catalog, "fetch", fails_on_one)
    try:
        valid, _ = check_ids(rows, str(tmp_path / "catalog.csv"))
        r = shard_pack.pack_shard(0, valid, str(tmp_path / "out"), ShardConfig(), index_schema(TAX), TAX)
        most, _Slow.most = _Slow.most, 0
        # a rate-limited host: one fetch at a time when asked
        one = shard_pack.pack_shard(
            0, valid[:4], str(tmp_path / "one"), ShardConfig(fetches_in_flight=1), index_schema(TAX), TAX
        )
    finally:
        server.shutdown()
    assert (r["packed"], r["rejected"]) == (23, 1)
    assert most >= 4  # one at a time, 24 images would take 4.8 s of waiting
    assert one["packed"] == 4 and _Slow.most == 1
    packed = [s["json"]["product_id"] for s in iter_shard(str(tmp_path / "out" / "shard-000000.tar"))]
    assert packed == [x["product_id"] for x in rows if x["image_uri"] != odd]
    q = pq.read_table(tmp_path / "out" / "_parts" / "shard-000000.quarantine.parquet").to_pylist()
    assert [(x["reason"], x["detail"]) for x in q] == [
        ("processing_error", "RuntimeError: resolver state corrupted")
    ]
