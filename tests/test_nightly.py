"""Nightly runs on a 300-product catalog: first night, a night with 5% new and 5% changed products, a
re-run of a complete night, a new model version, relabelling by age, and gone products kept as inactive."""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import json
import threading
from pathlib import Path

import duckdb
import pytest
from conftest import resave_artifact, sample_rows, write_catalog

from fashionlabel.label.pipeline import LabelConfig
from fashionlabel.nightly import NightlyConfig, NightlyError, run_nightly
from fashionlabel.shards import ShardConfig, ShardJobError

CFG = NightlyConfig(shard=ShardConfig(samples_per_shard=100, max_side=96), label=LabelConfig(batch_size=64))


def _good_and_bad():
    rows = sample_rows()
    good = [r for r in rows if Path(r["image_uri"]).exists()]
    bad = [r for r in rows if not Path(r["image_uri"]).exists()]
    return good, bad


def _tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def nights(ray_session, tiny_model, tmp_path_factory):
    """Night 1: 300 products + the sample's 6 bad rows; night 2: 10 gone, 15 new, 15 changed images."""
    tmp = tmp_path_factory.mktemp("nightly")
    good, bad = _good_and_bad()
    base, extra = good[1000:1300], good[1300:1400]
    cat1 = write_catalog(tmp / "c1" / "catalog.csv", base + bad)
    m1 = run_nightly(str(cat1), str(tiny_model), str(tmp / "root"), "2026-03-01", CFG)
    gone = {r["product_id"] for r in base[:10]}
    changed = {r["product_id"] for r in base[10:25]}
    rows2 = []
    for r in base[10:]:
        r = dict(r)
        if r["product_id"] in changed:  # same product, a different photo
            r["image_uri"] = extra[50 + len(rows2) % 40]["image_uri"]
        rows2.append(r)
    new = extra[:15]
    cat2 = write_catalog(tmp / "c2" / "catalog.csv", rows2 + new + bad)
    m2 = run_nightly(str(cat2), str(tiny_model), str(tmp / "root"), "2026-03-02", CFG)
    return {
        "root": tmp / "root",
        "m1": m1,
        "m2": m2,
        "cat2": cat2,
        "gone": gone,
        "changed": changed,
        "new": {r["product_id"] for r in new},
        "all": {r["product_id"] for r in base + new},
    }


def test_first_night(nights):
    m, root = nights["m1"], nights["root"]
    assert (m["new"], m["changed"], m["unchanged"]) == (300, 0, 0)
    assert m["quarantined"] == 6 and m["reasons"] == {"image_not_found": 6}
    assert m["labelled"] == 300 and m["relabelled"] == 0 and m["errors"] == 0
    assert 0 < m["seconds"]["label_first_batch"] < m["seconds"]["label"]
    assert m["latest_rows"] == 300 and m["latest_inactive"] == 0
    assert (root / "manifests" / "2026-03-01.json").is_file() and (
        root / "reports" / "2026-03-01.html"
    ).is_file()


def test_second_night_labels_only_new_and_changed(nights):
    m, root = nights["m2"], nights["root"]
    assert (m["new"], m["changed"], m["unchanged"]) == (15, 15, 275)
    assert m["sharded"] == 30 and m["labelled"] == 30 and m["relabelled"] == 0
    con = duckdb.connect()
    night = con.execute(
        f"SELECT product_id FROM '{root}/labels/history/run_date=2026-03-02/*.parquet'"
    ).fetchall()
    assert {p for (p,) in night} == nights["new"] | nights["changed"] and len(night) == 30
    from fashionlabel.query import connect

    q = connect(str(root / "labels"))
    assert q.execute("SELECT count(*), count(DISTINCT product_id) FROM latest").fetchall() == [(315, 315)]
    inactive = q.execute("SELECT product_id FROM latest WHERE NOT active").fetchall()
    assert {p for (p,) in inactive} == nights["gone"]
    # changed products carry tonight's image digest and run date; unchanged ones keep night 1's label
    got = dict(q.execute("SELECT product_id, run_date::VARCHAR FROM latest").fetchall())
    assert {p for p, d in got.items() if d == "2026-03-02"} == nights["new"] | nights["changed"]
    sha2 = dict(
        q.execute("SELECT product_id, image_sha256 FROM history WHERE run_date = '2026-03-02'").fetchall()
    )
    sha1 = dict(
        q.execute("SELECT product_id, image_sha256 FROM history WHERE run_date = '2026-03-01'").fetchall()
    )
    assert all(sha2[p] != sha1[p] for p in nights["changed"])


def test_rerun_of_a_complete_night_changes_nothing(nights, tiny_model, tmp_path):
    root = nights["root"]
    before = _tree(root)
    m = run_nightly(str(nights["cat2"]), str(tiny_model), str(root), "2026-03-02", CFG)
    assert m["already_complete"] and m["labelled"] == 30
    assert _tree(root) == before
    # another model for a finished night is refused, not ignored with "nothing to do"
    other = tmp_path / "model"
    resave_artifact(tiny_model, other, "another")
    with pytest.raises(NightlyError, match="2026-03-02 is already complete, labelled by model version"):
        run_nightly(str(nights["cat2"]), str(other), str(root), "2026-03-02", CFG)
    assert _tree(root) == before


def test_a_night_that_would_roll_latest_back_or_retire_most_products_is_refused(nights, tiny_model, tmp_path):
    from fashionlabel.catalog import CatalogError

    root = nights["root"]
    before = _tree(root)
    # an older date (a typo, a backfill) would publish older labels as latest
    with pytest.raises(NightlyError, match="night 2026-02-28 is older than night 2026-03-02, which has run"):
        run_nightly(str(nights["cat2"]), str(tiny_model), str(root), "2026-02-28", CFG)
    # a truncated export: 100 of last night's 305 active products
    with open(nights["cat2"]) as f:
        lines = f.read().splitlines(keepends=True)
    short = tmp_path / "short.csv"
    short.write_text("".join(lines[:101]))
    with pytest.raises(
        NightlyError, match=r"lacks 205 of the 305 products active last night \(67%.*max-catalog-drop 1"
    ):
        run_nightly(str(short), str(tiny_model), str(root), "2026-03-03", CFG)
    # a header and no rows: refused, not every product retired
    empty = tmp_path / "empty.csv"
    empty.write_text(lines[0])
    with pytest.raises(CatalogError, match="has no rows"):
        run_nightly(str(empty), str(tiny_model), str(root), "2026-03-03", CFG)
    assert _tree(root) == before


def test_an_earlier_incomplete_night_blocks_the_next(nights, tiny_model, tmp_path):
    root = tmp_path / "root"
    (root / "shards" / "night=2026-01-01").mkdir(parents=True)
    with pytest.raises(NightlyError, match="2026-01-01 started but is not complete"):
        run_nightly(str(nights["cat2"]), str(tiny_model), str(root), "2026-01-02", CFG)


def test_new_model_version_relabels_every_active_product(nights, tiny_model, tmp_path_factory, monkeypatch):
    import shutil

    from fashionlabel import nightly
    from fashionlabel.query import connect
    from fashionlabel.report import write_night_report

    v2 = tmp_path_factory.mktemp("m2") / "model"
    resave_artifact(tiny_model, v2, "v2")
    root = tmp_path_factory.mktemp("relabel") / "root"
    shutil.copytree(nights["root"], root)
    run_dir = root / "labels/history/run_date=2026-03-03"

    # Killed while relabelling: the night's own labelling is done, the relabel parts are not all in. The
    # folder must not count as a finished night yet (readers take _SUCCESS, and the nights view, as that).
    def killed(*a, **kw):
        raise KeyboardInterrupt("killed while relabelling")

    with monkeypatch.context() as mp:
        mp.setattr(nightly, "relabel_products", killed)
        with pytest.raises(KeyboardInterrupt):
            run_nightly(str(nights["cat2"]), str(v2), str(root), "2026-03-03", CFG)
    assert run_dir.is_dir() and not (run_dir / "_SUCCESS").exists()
    nights_seen = connect(str(root / "labels")).execute("SELECT max(run_date) FROM nights").fetchall()
    assert str(nights_seen[0][0]) == "2026-03-02"

    m = run_nightly(str(nights["cat2"]), str(v2), str(root), "2026-03-03", CFG)
    assert (m["new"], m["changed"], m["labelled_new_or_changed"]) == (0, 0, 0)
    assert m["relabelled"] == 305 and m["relabel_reason"] == "model version changed"
    con = duckdb.connect()
    hist = f"'{root}/labels/history/run_date=2026-03-03/*.parquet'"
    assert con.execute(f"SELECT count(*), count(DISTINCT product_id) FROM {hist}").fetchall() == [(305, 305)]
    # the run folder's manifest counts the relabelled parts too
    success = json.loads((root / "labels/history/run_date=2026-03-03/_SUCCESS").read_text())
    assert (success["rows"], success["labelled"], success["relabelled"]) == (305, 305, 305)
    assert success["model_version"] == m["model_version"]
    assert not list(run_dir.glob("_NIGHT*"))  # the night's own manifest became _SUCCESS
    assert not (root / "work" / "relabel-2026-03-03").exists()  # a complete night's scratch is gone
    assert not (root / "work" / "map-before-2026-03-03.parquet").exists()
    # the product map up to the complete night, for the next one (which relabelled from night 2's)
    assert [p.name for p in (root / "work").glob("map-through-*")] == ["map-through-2026-03-03.parquet"]

    q = connect(str(root / "labels"))
    versions = q.execute(
        "SELECT active, model_version = ?, count(*) FROM latest GROUP BY ALL ORDER BY 1", [m["model_version"]]
    ).fetchall()
    assert versions == [(False, False, 10), (True, True, 305)]  # gone products are not relabelled
    r = write_night_report(str(root / "labels"), "2026-03-03", root / "r.html", m)
    assert "model version changed" in (root / "r.html").read_text() and r["relabelled"] == 305


def test_labels_older_than_the_age_limit_are_relabelled_and_no_others(nights, tiny_model, tmp_path_factory):
    import shutil

    from fashionlabel.query import connect

    # latest holds labels of two ages: 2026-03-01 (night 1's products still active, image unchanged) and
    # 2026-03-02 (night 2's new and changed products)
    root = tmp_path_factory.mktemp("age") / "root"
    shutil.copytree(nights["root"], root)
    old = nights["all"] - nights["gone"] - nights["new"] - nights["changed"]
    assert len(old) == 275
    # the same model on 2026-03-03: the cutoff is 2026-03-02, so only labels from before it are relabelled
    m = run_nightly(
        str(nights["cat2"]),
        str(tiny_model),
        str(root),
        "2026-03-03",
        NightlyConfig(shard=CFG.shard, label=CFG.label, relabel_older_than_days=1),
    )
    assert (m["labelled_new_or_changed"], m["relabelled"]) == (0, 275)
    assert m["relabel_reason"] == "labels older than 1 day"
    q = connect(str(root / "labels"))
    night = q.execute("SELECT product_id FROM history WHERE run_date = '2026-03-03'").fetchall()
    assert {p for (p,) in night} == old and len(night) == 275
    dates = q.execute("SELECT run_date::VARCHAR, count(*) FROM latest WHERE active GROUP BY 1 ORDER BY 1")
    assert dates.fetchall() == [("2026-03-02", 30), ("2026-03-03", 275)]  # a day old is not older than 1 day


def test_one_kept_snapshot_still_reports_drift_and_prunes_only_a_complete_night(
    nights, tiny_model, tmp_path_factory
):
    import shutil

    from fashionlabel import latest

    root = tmp_path_factory.mktemp("keep1") / "root"
    shutil.copytree(nights["root"], root)
    cfg = NightlyConfig(shard=CFG.shard, label=CFG.label, keep_snapshots=1)
    # the night's report compares with 2026-03-02, the snapshot that the night's publish would prune
    m = run_nightly(str(nights["cat2"]), str(tiny_model), str(root), "2026-03-03", cfg)
    assert m["previous_night"] == "2026-03-02" and m["latest_rows"] == 315
    assert 'id="drift-articleType"' in (root / "reports" / "2026-03-03.html").read_text()
    assert latest.snapshots(str(root / "labels")) == ["2026-03-03"]


def test_a_relabel_that_cannot_read_a_shard_keeps_the_last_good_labels(nights, tiny_model, tmp_path_factory):
    import shutil

    from fashionlabel.query import connect

    root = tmp_path_factory.mktemp("damaged") / "root"
    shutil.copytree(nights["root"], root)
    old = nights["all"] - nights["gone"] - nights["new"] - nights["changed"]
    shard = root / "shards" / "night=2026-03-01" / "shard-000000.tar"
    whole = shard.read_bytes()
    shard.write_bytes(whole[: len(whole) // 2])  # the disk lost the second half of night 1's first shard
    age = NightlyConfig(shard=CFG.shard, label=CFG.label, relabel_older_than_days=1)
    m = run_nightly(str(nights["cat2"]), str(tiny_model), str(root), "2026-03-03", age)
    assert m["relabelled"] == 275 and m["errors"] > 0
    q = connect(str(root / "labels"))
    failed = {
        p
        for (p,) in q.execute(
            "SELECT product_id FROM history WHERE run_date = '2026-03-03' AND error IS NOT NULL"
        ).fetchall()
    }
    assert len(failed) == m["errors"] and failed <= old
    rows = q.execute(
        "SELECT product_id, run_date::VARCHAR, error, articleType FROM latest WHERE active"
    ).fetchall()
    by = {p: (d, e, a) for p, d, e, a in rows}
    for p in failed:  # the image did not change: its good label from night 1 stays in latest
        assert by[p][:2] == ("2026-03-01", None) and by[p][2] is not None, p
    assert all(by[p][0] == "2026-03-03" and by[p][1] is None for p in old - failed)
    # repaired: the next night with the same rule relabels the products it could not read (still on their
    # 03-01 labels) and night 2's, now a day old too; no others
    shard.write_bytes(whole)
    m = run_nightly(str(nights["cat2"]), str(tiny_model), str(root), "2026-03-04", age)
    assert m["relabelled"] == len(failed) + len(nights["new"] | nights["changed"]) and m["errors"] == 0
    q = connect(str(root / "labels"))
    assert q.execute("SELECT count(*) FROM latest WHERE active AND error IS NOT NULL").fetchall() == [(0,)]


def test_a_killed_night_rerun_with_another_catalog_names_the_way_on(
    ray_session, tiny_model, tmp_path, monkeypatch
):
    """The catalog at a fixed path is replaced by the next export before a killed night is re-run: the
    refusal names the night and how to go on (the night has no --out to change), and following it
    completes the night from the new catalog."""
    import shutil

    from fashionlabel import nightly

    good, _ = _good_and_bad()
    cfg = NightlyConfig(
        shard=ShardConfig(samples_per_shard=10, max_side=96), label=LabelConfig(batch_size=64)
    )
    root = tmp_path / "root"
    run_nightly(
        str(write_catalog(tmp_path / "c1.csv", good[:20])), str(tiny_model), str(root), "2026-03-01", cfg
    )
    first = write_catalog(tmp_path / "c2.csv", good[:30])

    def killed(*a, **kw):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:  # killed once the night's shards are packed
        m.setattr(nightly, "label_shards", killed)
        with pytest.raises(KeyboardInterrupt) as stop:
            run_nightly(str(first), str(tiny_model), str(root), "2026-03-02", cfg)
    assert stop.value.__notes__ == [  # the command line prints it under "interrupted"
        "night 2026-03-02 stopped while labelling the night's shards; what it finished is kept: the same "
        "command (same --date) resumes the night from there"
    ]
    export = write_catalog(tmp_path / "c2.csv", good[:35])  # the next export lands at the same path
    with pytest.raises(
        NightlyError, match=r"night 2026-03-02 started with another catalog .* deleting (.*)"
    ) as e:
        run_nightly(str(export), str(tiny_model), str(root), "2026-03-02", cfg)
    named = str(e.value).rpartition("deleting ")[2].removesuffix(" first").replace(" and ", ", ").split(", ")
    assert named[0] == str(root / "shards" / "night=2026-03-02")
    for p in named:
        shutil.rmtree(p, ignore_errors=True)
    m = run_nightly(str(export), str(tiny_model), str(root), "2026-03-02", cfg)
    assert m["status"] == "complete" and (m["new"], m["unchanged"], m["latest_rows"]) == (15, 20, 35)


def test_a_night_over_the_failure_rate_names_the_reasons(ray_session, tiny_model, tmp_path):
    """A catalog whose images are mostly missing fails the night, naming why the rows were quarantined
    (not only how many): what to fix, without opening the quarantine first."""
    good, _ = _good_and_bad()
    rows = good[:4] + [
        dict(good[0], product_id=f"gone-{i}", image_uri=f"/nonexistent/{i}.jpg") for i in range(8)
    ]
    cat = write_catalog(tmp_path / "catalog.csv", rows)
    with pytest.raises(
        ShardJobError,
        match=r"8/12 catalog rows quarantined \(image_not_found 8\), above --max-failure-rate 0.5",
    ):
        run_nightly(str(cat), str(tiny_model), str(tmp_path / "root"), "2026-03-01", CFG)


def test_a_model_with_a_head_of_another_kind_under_an_old_name_is_refused_first(
    tiny_model, tmp_path, monkeypatch
):
    """latest holds ``season`` from a multi-label head; tonight's model has a single ``season`` head. One
    column cannot hold a list and a string: refused by name before the night shards or labels anything
    (it failed at the merge into latest, after labelling, with a DuckDB conversion error)."""
    import labels_factory

    from fashionlabel import latest
    from fashionlabel.taxonomy import Taxonomy

    d = labels_factory.TAX.to_dict()
    heads = [
        h if h["name"] != "season" else {"name": "season", "kind": "multi", "values": h["values"]}
        for h in d["heads"]
    ]
    multi = Taxonomy.from_dict(d | {"heads": heads})
    monkeypatch.setattr(labels_factory, "TAX", multi)
    good, _ = _good_and_bad()
    ids = [r["product_id"] for r in good[:20]]
    labels = str(tmp_path / "root" / "labels")
    labels_factory.add_night(
        labels, "2026-05-01", labels_factory.make_rows(ids, "2026-05-01", "Tshirts"), set(ids)
    )
    assert (
        str(latest.read_snapshot(labels, "2026-05-01").schema.field("season").type) == "list<element: string>"
    )
    cat = write_catalog(tmp_path / "catalog.csv", good[:20])
    with pytest.raises(
        NightlyError,
        match=r"head 'season' of model .* is a single head, whose column 'season' is string; labels/latest holds 'season' as list<element: string>.*give the head a new name",
    ):
        run_nightly(str(cat), str(tiny_model), str(tmp_path / "root"), "2026-05-02", CFG)
    assert not (tmp_path / "root" / "shards").exists()


@pytest.mark.timeout(900)
def test_a_product_with_a_value_new_to_the_taxonomy_is_labelled_not_quarantined(
    ray_session, tiny_model, tmp_path
):
    """A catalog value the model's taxonomy lacks (a new article type) keeps a product out of training, not
    out of the night: labelling reads no label column. Such products were quarantined every night and never
    labelled; they are now labelled with the values the model knows, counted per head, and packed once (an
    unchanged one is not packed again the next night)."""
    good, _ = _good_and_bad()
    rows = [dict(r) for r in good[1500:1520]]
    ponchos = {r["product_id"] for r in rows[:3]}
    for r in rows[:3]:
        r["articleType"] = "Ponchos"
    cat = write_catalog(tmp_path / "catalog.csv", rows)
    root = tmp_path / "root"
    m1 = run_nightly(str(cat), str(tiny_model), str(root), "2026-03-01", CFG)
    assert (m1["quarantined"], m1["labelled"], m1["errors"]) == (0, 20, 0)
    assert m1["labels_outside_taxonomy"] == {"articleType": 3}
    got = duckdb.sql(
        f"SELECT product_id, articleType FROM '{root}/labels/latest/snapshots/2026-03-01/*.parquet' "
        "WHERE articleType IS NOT NULL"
    ).fetchall()
    assert ponchos <= {p for p, _ in got} and len(got) == 20
    m2 = run_nightly(str(cat), str(tiny_model), str(root), "2026-03-02", CFG)
    assert (m2["new"], m2["changed"], m2["unchanged"], m2["quarantined"]) == (0, 0, 20, 0)


@pytest.mark.timeout(900)
def test_labels_outside_the_taxonomy_are_counted_for_the_whole_night_when_it_resumes(
    ray_session, tiny_model, tmp_path
):
    """The manifest's ``labels_outside_taxonomy`` covers every product packed tonight, not only those the
    last attempt packed: a night that failed after packing its shards (too many missing images) and was
    re-run as the error says reported none of its new values (``{}``) and printed no summary line."""
    good, _ = _good_and_bad()
    rows = [dict(r) for r in good[1520:1540]]
    for r in rows[:4]:
        r["articleType"] = "Ponchos"
    missing = [dict(good[0], product_id=f"gone-{i}", image_uri=f"/nonexistent/{i}.jpg") for i in range(30)]
    cat = write_catalog(tmp_path / "catalog.csv", rows + missing)
    root = tmp_path / "root"
    shard = ShardConfig(samples_per_shard=10, max_side=96)
    with pytest.raises(ShardJobError, match="30/50 catalog rows quarantined"):
        run_nightly(str(cat), str(tiny_model), str(root), "2026-03-01", NightlyConfig(shard=shard))
    shard = dataclasses.replace(shard, max_failure_rate=1.0)  # as the error says
    m = run_nightly(str(cat), str(tiny_model), str(root), "2026-03-01", NightlyConfig(shard=shard))
    assert (m["sharded"], m["sharded_this_attempt"], m["labelled"]) == (20, 0, 20)
    assert m["labels_outside_taxonomy"] == {"articleType": 4}


@pytest.mark.timeout(600)  # a job with its own local Ray
def test_a_failed_night_job_ends_naming_its_stage_and_how_to_resume(tiny_model, tmp_path):
    """The job's last line (what an operator reads in `ray job logs`) names the stage the night failed in
    and that the same command resumes it, under the error itself; done as the error says, the night
    completes."""
    from procs import run_job

    good, _ = _good_and_bad()
    missing = [dict(good[0], product_id=f"gone-{i}", image_uri=f"/nonexistent/{i}.jpg") for i in range(8)]
    cat = write_catalog(tmp_path / "catalog.csv", good[:4] + missing)
    args = ["--catalog", str(cat), "--model", str(tiny_model), "--root", str(tmp_path / "root")]
    args += ["--date", "2026-03-01", "--samples-per-shard", "10", "--actors", "1"]
    r = run_job("jobs.nightly", args)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1, r.stderr[-3000:]
    assert lines[-2].startswith(
        "fashionlabel nightly: error: 8/12 catalog rows quarantined (image_not_found 8)"
    )
    assert lines[-1] == (
        "fashionlabel nightly: night 2026-03-01 failed while sharding the catalog; what it finished is kept: "
        "the same command (same --date) resumes the night from there, once the error above is dealt with"
    )
    r = run_job("jobs.nightly", [*args, "--max-failure-rate", "0.9"])  # as the error says
    assert r.returncode == 0, r.stderr[-3000:]
    manifest = json.loads((tmp_path / "root" / "manifests" / "2026-03-01.json").read_text())
    assert (manifest["labelled"], manifest["quarantined"]) == (4, 8)


class _Errors(http.server.BaseHTTPRequestHandler):
    """A host that is up but answers every image it is asked for with HTTP 500."""

    def log_message(self, *a):  # keep test output clean
        pass

    def do_GET(self):  # noqa: N802 - http.server's naming
        self.send_error(500)


@pytest.mark.timeout(900)
def test_a_few_images_a_host_keeps_failing_do_not_fail_every_later_night(ray_session, tiny_model, tmp_path):
    """Products quarantined one night come back the next, in that night's small shard. Four images an
    answering host keeps failing (HTTP 500) were "4 fetches failed as if the source were down" there, and
    the night failed, and every re-run of it; now they are quarantined again and the night completes."""
    good, _ = _good_and_bad()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Errors)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        broken = [dict(good[0], product_id=f"e{i}", image_uri=f"{base}/{i}.jpg") for i in range(4)]
        rows = [dict(r) for r in good[1540:1580]]
        twice = dict(rows[0], image_uri=good[1580]["image_uri"])  # an id listed again, with another photo
        cat = write_catalog(tmp_path / "catalog.csv", rows + broken + [twice])
        root = tmp_path / "root"
        m1 = run_nightly(str(cat), str(tiny_model), str(root), "2026-03-01", CFG)
        # rows and products both: quarantined counts rows (the repeated id is one)
        assert (m1["catalog_products"], m1["catalog_rows"]) == (44, 45)
        assert (m1["labelled"], m1["quarantined"]) == (40, 5)
        m2 = run_nightly(str(cat), str(tiny_model), str(root), "2026-03-02", CFG)
        assert (m2["status"], m2["unchanged"], m2["quarantined"], m2["reasons"]) == (
            "complete",
            40,
            5,
            {"image_unreadable": 4, "duplicate_product_id": 1},
        )
    finally:
        server.shutdown()
