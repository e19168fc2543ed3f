import re
import shutil

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fashionlabel.label.pipeline import label_shards
from fashionlabel.report import drift, write_report


def test_report_has_every_chart(ray_session, small_shards, tiny_model, tmp_path):
    s = label_shards(str(small_shards), str(tiny_model), str(tmp_path / "labels"), "2026-02-01")
    # a re-run with nothing to do leaves the manifest (and the throughput it reports) of the run that worked
    label_shards(str(small_shards), str(tiny_model), str(tmp_path / "labels"), "2026-02-01")
    # a Parquet file dropped in by hand is no labels: the parts alone are read, as query reads them
    stray = pa.table({"product_id": ["x", "y", "z"], "note": ["a", "b", "c"]})
    pq.write_table(stray, tmp_path / "labels" / "history" / "run_date=2026-02-01" / "notes.parquet")
    r = write_report(str(tmp_path / "labels"), tmp_path / "report.html")
    html = (tmp_path / "report.html").read_text()
    heads = [
        "gender",
        "masterCategory",
        "subCategory",
        "articleType",
        "baseColour",
        "season",
        "usage",
        "attributes",
    ]
    assert r["charts"] == [f"dist-{h}" for h in heads] + ["review"]
    for c in r["charts"]:
        assert f'id="{c}"><img alt="{c}" src="data:image/png;base64,' in html
    assert r["products"] == 600 and r["run"] == s["run_id"] and s["run_id"] in html
    # the next incremental run finds nothing new: its report says so, instead of rates of nothing
    nothing = label_shards(
        str(small_shards), str(tiny_model), str(tmp_path / "labels"), "2026-02-02", incremental=True
    )
    assert (nothing["labelled"], nothing["skipped"]) == (0, 600)
    empty = write_report(str(tmp_path / "labels"), tmp_path / "empty.html")
    assert (empty["products"], empty["skipped (labelled before by this model)"], empty["needs review"]) == (
        0,
        600,
        "n/a",
    )
    assert empty["model version"] == s["model_version"] and not re.search(
        r">nan|nan%", (tmp_path / "empty.html").read_text()
    )
    assert (
        r["throughput"]
        == f"{s['images_per_s']:.0f} img/s (the run that completed it; first labels after "
        f"{s['first_batch_seconds']:.1f} s)"
        and s["images_per_s"] > 0
    )


def test_night_report_has_every_chart_drift_and_counts(tmp_path):
    from labels_factory import two_nights

    from fashionlabel import latest
    from fashionlabel.report import write_night_report

    labels = str(tmp_path / "labels")
    two_nights(labels)
    manifest = {
        "new": 2,
        "changed": 4,
        "unchanged": 14,
        "quarantined": 1,
        "labelled": 6,
        "relabelled": 0,
        "errors": 1,
        "shard_images_per_s": 120.0,
        "label_images_per_s": 300.0,
    }
    r = write_night_report(labels, "2026-05-02", tmp_path / "night.html", manifest)
    html = (tmp_path / "night.html").read_text()
    single = ["gender", "masterCategory", "subCategory", "articleType", "baseColour", "season", "usage"]
    assert r["charts"] == (
        [f"dist-{h}" for h in single]
        + ["dist-attributes", "review"]
        + [f"drift-{h}" for h in single]
        + ["run"]
    )
    for c in r["charts"]:
        assert f'id="{c}"><img alt="{c}" src="data:image/png;base64,' in html
    # p02-p05 went from Tshirts to Shirts; every other head kept its label
    assert r["drift"] == {h: 4 if h == "articleType" else 0 for h in single}
    assert "p02: Tshirts → Shirts" in html and r["previous night"] == "2026-05-01"
    assert r["active products"] == 20 and r["inactive (gone from catalog)"] == 2
    assert r["needs review"] == "15.0%"  # 3 of 20 active products
    assert r["labelled tonight"] == 6 and "<th>errors tonight</th><td>1</td>" in html
    # the first night has nothing to compare with: no drift charts, and says so
    first = write_night_report(labels, "2026-05-01", tmp_path / "first.html")
    assert not [c for c in first["charts"] if c.startswith("drift-")]
    assert "first night" in (tmp_path / "first.html").read_text()
    # night 2 once night 1's snapshot is pruned: nothing to compare with, but not the first night
    shutil.rmtree(latest.snapshot_dir(labels, "2026-05-01"))
    r = write_night_report(labels, "2026-05-02", tmp_path / "pruned.html", manifest)
    assert r["previous night"] == "2026-05-01 (its latest snapshot is no longer kept: no drift)"
    assert "first night" not in (tmp_path / "pruned.html").read_text() and r["drift"] == {}


def test_a_night_that_labelled_a_few_products_slowly_has_a_rate_not_zero():
    from fashionlabel.report import night_rate

    m = {"labelled": 1, "labelled_this_attempt": 1, "label_images_per_s": 0.25}
    assert night_rate(m, "label") == "0.25 img/s"
    assert night_rate(m | {"label_images_per_s": 3.14159}, "label") == "3.1 img/s"
    assert night_rate(m | {"label_images_per_s": 1234.5}, "label") == "1,234 img/s"
    assert night_rate(m | {"labelled_this_attempt": 0}, "label") == "n/a (done by an earlier run)"


def test_drift_compares_the_active_products_of_both_nights_and_signs_shares_by_tonight(tmp_path):
    """Share change is tonight's share less the previous night's (a label that grew is positive); flips are
    counted over products active in both snapshots: one that was gone from the catalog and is back with
    another label is no flip."""
    from labels_factory import add_night, make_rows

    from fashionlabel.report import write_night_report

    labels = str(tmp_path / "labels")
    ids = ["p0", "p1", "p2", "p3"]
    add_night(labels, "2026-05-01", make_rows([*ids, "back"], "2026-05-01", "Tshirts"), set(ids))
    tonight = make_rows(["p0", "back"], "2026-05-02", "Shirts", sha="b")
    add_night(labels, "2026-05-02", tonight, {*ids, "back"})
    r = write_night_report(labels, "2026-05-02", tmp_path / "night.html", {})
    assert r["drift"]["articleType"] == 1 and r["active products"] == 5
    assert "<td>1</td><td>4</td><td>p0: Tshirts → Shirts</td>" in (tmp_path / "night.html").read_text()
    # tonight Shirts 2 of 5 and Tshirts 3 of 5, the previous night Tshirts 4 of 4
    cur = pd.DataFrame(
        {"product_id": [*ids, "back"], "a": ["Shirts", "Tshirts", "Tshirts", "Tshirts", "Shirts"]}
    )
    prev = pd.DataFrame({"product_id": ids, "a": ["Tshirts"] * 4})
    d = drift(cur, prev, ["a"])["a"]
    assert d["share_change_pp"].round(6).to_dict() == {"Shirts": 40.0, "Tshirts": -40.0}
    assert (d["flipped"], d["compared"], d["examples"]) == (1, 4, [["p0", "Tshirts", "Shirts"]])
    # a third night compares with the second, the night before it, not the oldest snapshot kept
    add_night(labels, "2026-05-03", make_rows(["p1"], "2026-05-03", "Shirts", sha="c"), {*ids, "back"})
    r = write_night_report(labels, "2026-05-03", tmp_path / "night3.html", {})
    assert r["previous night"] == "2026-05-02" and r["drift"]["articleType"] == 1


def test_night_report_after_a_model_that_adds_a_head(tmp_path):
    """Tonight's model predicts a head last night's did not (the taxonomy grew a ``usage`` head): the
    report compares the heads both nights have and names the new one. It raised KeyError, which left the
    night incomplete and so blocked every later night."""
    from labels_factory import TAX, add_night, make_rows

    from fashionlabel import latest, storage
    from fashionlabel.report import write_night_report
    from fashionlabel.taxonomy import Taxonomy

    labels = str(tmp_path / "labels")
    ids = [f"p{i:02d}" for i in range(10)]
    d = TAX.to_dict()
    old = Taxonomy.from_dict(d | {"heads": [h for h in d["heads"] if h["name"] != "usage"]})
    night1 = make_rows(ids, "2026-05-01", "Tshirts").drop_columns(["usage", "usage_score", "usage_topk"])
    storage.write_parquet(night1, f"{labels}/history/run_date=2026-05-01/part-shard-000000.parquet")
    storage.write_json(f"{labels}/history/run_date=2026-05-01/_SUCCESS", {"rows": night1.num_rows})
    snap = latest.merge(None, night1, "2026-05-01", set(ids), latest.latest_schema(old))
    latest.publish(labels, "2026-05-01", snap)
    add_night(labels, "2026-05-02", make_rows(ids, "2026-05-02", "Shirts"), set(ids))

    r = write_night_report(labels, "2026-05-02", tmp_path / "night.html")
    assert r["new heads"] == ["usage"] and "usage" not in r["drift"]
    assert r["drift"]["articleType"] == 10 and r["drift"]["gender"] == 0
    html = (tmp_path / "night.html").read_text()
    assert (
        "new heads tonight, which the previous night's model did not predict (nothing to compare): usage"
        in html
    )
    assert 'id="dist-usage"' in html and 'id="drift-usage"' not in html


def test_a_single_head_named_like_a_multi_heads_score_column_is_reported(tmp_path):
    """A single head named ``usage_scores`` (its columns: usage_scores, usage_scores_score, _topk) was taken
    for a multi head ``usage`` by its suffix: the night report failed on a column ``usage`` that the
    table does not have, and the night stayed incomplete."""
    from labels_factory import TAX, make_rows

    from fashionlabel import latest, storage
    from fashionlabel.report import write_night_report
    from fashionlabel.taxonomy import Taxonomy

    d = TAX.to_dict()
    tax = Taxonomy.from_dict(
        d | {"heads": [h | {"name": "usage_scores"} if h["name"] == "usage" else h for h in d["heads"]]}
    )
    ids = [f"p{i:02d}" for i in range(10)]
    rows = make_rows(ids, "2026-05-01", "Tshirts")
    rows = rows.rename_columns([c.replace("usage", "usage_scores") for c in rows.column_names])
    labels = str(tmp_path / "labels")
    storage.write_parquet(rows, f"{labels}/history/run_date=2026-05-01/part-shard-000000.parquet")
    storage.write_json(f"{labels}/history/run_date=2026-05-01/_SUCCESS", {"rows": rows.num_rows})
    snap = latest.merge(None, rows, "2026-05-01", set(ids), latest.latest_schema(tax))
    latest.publish(labels, "2026-05-01", snap)

    for r in (
        write_night_report(labels, "2026-05-01", tmp_path / "night.html"),
        write_report(labels, tmp_path / "run.html"),
    ):
        assert "dist-usage_scores" in r["charts"] and "dist-usage" not in r["charts"]
        assert "dist-attributes" in r["charts"]  # the multi head, still told by its list columns


def test_cli_report_on_a_nightly_root_renders_the_newest_night(tmp_path, capsys):
    from labels_factory import two_nights

    from fashionlabel.cli import run

    two_nights(str(tmp_path / "labels"))
    assert run(["report", "--labels", str(tmp_path / "labels"), "--out", str(tmp_path / "r.html")]) == 0
    html = (tmp_path / "r.html").read_text()
    assert "fashionlabel night 2026-05-02" in html and 'id="drift-articleType"' in html
    assert (
        run(
            [
                "report",
                "--labels",
                str(tmp_path / "labels"),
                "--out",
                str(tmp_path / "x.html"),
                "--date",
                "2026-04-01",
            ]
        )
        == 1
    )
    assert "no latest snapshot for 2026-04-01" in capsys.readouterr().err
    # a date that is not one, a nightly root given for its labels, --date on the labels of `label`
    report = ["report", "--out", str(tmp_path / "y.html")]
    assert run([*report, "--labels", str(tmp_path / "labels"), "--date", "2026-5-2"]) == 1
    assert "run date '2026-5-2' is not a date (YYYY-MM-DD)" in capsys.readouterr().err
    assert run([*report, "--labels", str(tmp_path)]) == 1
    assert f"{tmp_path} is a nightly root: give --labels {tmp_path}/labels" in capsys.readouterr().err
    plain = tmp_path / "plain" / "history" / "run_date=2026-05-01"
    plain.mkdir(parents=True)
    shutil.copy(next((tmp_path / "labels/history/run_date=2026-05-01").glob("*.parquet")), plain)
    assert run([*report, "--labels", str(tmp_path / "plain"), "--date", "2026-05-01"]) == 1
    assert "--date needs the labels of a nightly root" in capsys.readouterr().err
    # the history folder given for its labels root ("no labels Parquet under …/history" before)
    assert run([*report, "--labels", str(tmp_path / "plain" / "history")]) == 1
    err = capsys.readouterr().err
    assert f"is the history folder of a labels root: give --labels {tmp_path / 'plain'}" in err
    # the folder of a demo, whose labels root is demo/labels: "no labels Parquet under demo" before
    shutil.copytree(tmp_path / "plain", tmp_path / "demo" / "labels")
    assert run([*report, "--labels", str(tmp_path / "demo")]) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path}/demo keeps its labels under {tmp_path}/demo/labels: give --labels" in err, err
    assert not (tmp_path / "y.html").exists()
    # one run folder is reported as it is
    assert run(["report", "--labels", str(plain), "--out", str(tmp_path / "run.html")]) == 0


def test_cli_report_shows_the_night_latest_shows_not_a_snapshot_still_being_published(tmp_path, capsys):
    from labels_factory import two_nights

    from fashionlabel import latest, storage
    from fashionlabel.cli import run

    labels = str(tmp_path / "labels")
    two_nights(labels)
    # night 3 killed between its snapshot's _SUCCESS and the swap of the pointer: not published
    snap = latest.read_snapshot(labels, "2026-05-02").slice(0, 5)
    d = latest.snapshot_dir(labels, "2026-05-03")
    storage.write_parquet(snap, storage.join(d, "part-00000.parquet"))
    storage.write_json(
        storage.join(d, "_SUCCESS"),
        {"snapshot": "2026-05-03", "rows": 5, "files": ["snapshots/2026-05-03/part-00000.parquet"]},
    )
    assert run(["report", "--labels", labels, "--out", str(tmp_path / "r.html")]) == 0
    html = (tmp_path / "r.html").read_text()
    assert "fashionlabel night 2026-05-02" in html and "<th>active products</th><td>20</td>" in html
    capsys.readouterr()
    # named with --date, the unpublished night is reported all the same (what its re-run will publish)
    out = str(tmp_path / "d.html")
    assert run(["report", "--labels", labels, "--out", out, "--date", "2026-05-03"]) == 0


def test_report_skips_a_run_that_is_not_finished(ray_session, small_shards, tiny_model, tmp_path):
    labels = tmp_path / "labels"
    done = label_shards(str(small_shards), str(tiny_model), str(labels), "2026-02-01")
    # a newer run stopped after its parts, before its manifest: every part there, no _SUCCESS
    label_shards(str(small_shards), str(tiny_model), str(labels), "2026-02-03")
    (labels / "history" / "run_date=2026-02-03" / "_SUCCESS").unlink()
    r = write_report(str(labels), tmp_path / "report.html")
    assert r["run"] == done["run_id"] and r["products"] == 600
    assert "run_date=2026-02-01" in (tmp_path / "report.html").read_text()
    # no finished run at all: refused by name, not reported as a whole run
    shutil.rmtree(labels / "history" / "run_date=2026-02-01")
    with pytest.raises(FileNotFoundError, match=r"no finished run .*run_date=2026-02-03 has no _SUCCESS"):
        write_report(str(labels), tmp_path / "partial.html")
    assert not (tmp_path / "partial.html").exists()


def test_night_report_reads_no_score_lists_of_a_large_snapshot(tmp_path):
    """The top-k and score lists are most of a snapshot and no chart draws them: read whole, the report of
    a 1M-product night held 13 GB on the head (now ~1 KB a product at the peak, the lists read never)."""
    import tracemalloc

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401 - imported before measuring: its import is not per product
    from labels_factory import add_night, make_rows

    from fashionlabel.report import write_night_report

    labels, n = str(tmp_path / "labels"), 20_000
    ids = [f"p{i:06d}" for i in range(n)]
    add_night(labels, "2026-05-01", make_rows(ids, "2026-05-01", "Tshirts"), set(ids))
    add_night(labels, "2026-05-02", make_rows(ids[: n // 10], "2026-05-02", "Shirts", sha="b"), set(ids))
    tracemalloc.start()
    try:
        r = write_night_report(labels, "2026-05-02", tmp_path / "r.html")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert r["drift"]["articleType"] == n // 10 and r["active products"] == n
    assert peak / n < 2_000, f"{peak / n:.0f} bytes per product at the peak (6,163 when read whole)"


def test_run_report_reads_no_score_lists_of_a_large_run(tmp_path):
    """The report of a labelling run (``fashionlabel report`` after ``label`` over a whole catalog) reads
    the columns it draws, as the night report does: it read the run whole, top-k lists and all (3,352 B a
    product at the peak here, ~10 KB with a model's five labels per head)."""
    import tracemalloc

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401 - imported before measuring: its import is not per product
    from labels_factory import make_rows

    from fashionlabel import storage

    labels, n = str(tmp_path / "labels"), 20_000
    run = storage.join(labels, "history", "run_date=2026-05-01")
    table = make_rows([f"p{i:06d}" for i in range(n)], "2026-05-01", "Tshirts", review=True)
    storage.write_parquet(table, storage.join(run, "part-shard-000000.parquet"))
    storage.write_json(storage.join(run, "_SUCCESS"), {"run_date": "2026-05-01", "rows": n})
    tracemalloc.start()
    try:
        r = write_report(labels, tmp_path / "r.html")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (r["products"], r["labelled"], r["needs review"], r["model version"]) == (n, n, "50.0%", "m1")
    assert r["charts"][-1] == "review" and len(r["charts"]) == 9
    assert peak / n < 1_500, f"{peak / n:.0f} bytes per product at the peak (3,352 when read whole)"


def test_a_copied_run_folder_is_named_as_query_names_it_not_reported_as_the_newest_run(tmp_path, capsys):
    """``history/run_date=2026-05-01.bak`` (a copy an operator made) sorts after its night: the report took
    it for the newest run and reported it without a word, while ``query`` refuses it by name. Both name it."""
    from labels_factory import make_rows

    from fashionlabel import storage
    from fashionlabel.cli import run

    labels = str(tmp_path / "labels")
    night = storage.join(labels, "history", "run_date=2026-05-01")
    storage.write_parquet(
        make_rows(["a", "b"], "2026-05-01", "Tshirts"), storage.join(night, "part-x.parquet")
    )
    storage.write_json(storage.join(night, "_SUCCESS"), {"run_date": "2026-05-01", "last_run_id": "the-run"})
    assert write_report(labels, tmp_path / "r.html")["run"] == "the-run"
    shutil.copytree(night, night + ".bak")
    named = f"{night}.bak is not a run folder (history/run_date=YYYY-MM-DD): move it out of history"
    with pytest.raises(ValueError, match=re.escape(named)):
        write_report(labels, tmp_path / "r.html")
    for argv in (
        ["report", "--labels", labels, "--out", str(tmp_path / "r.html")],
        ["query", "--labels", labels, "SELECT 1"],
    ):
        assert run(argv) == 1
        assert named in capsys.readouterr().err, argv


def test_cli_report_to_a_missing_bucket_is_refused_before_the_labels_are_read(s3, tmp_path, capsys):
    from labels_factory import two_nights

    from fashionlabel.cli import run

    labels = str(tmp_path / "labels")
    two_nights(labels)
    bucket = s3.make_bucket("fl-report-out")
    out = ["report", "--labels", labels, "--out"]
    # the write probe names the output; the report was drawn in full before, then its upload failed
    assert run([*out, "s3://fl-no-such-bucket/r.html"]) == 1
    err = capsys.readouterr().err
    assert "s3://fl-no-such-bucket/r.html is not writable" in err and "NO_SUCH_BUCKET" in err, err
    assert s3.client().list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0
    assert run([*out, f"s3://{bucket}/r.html"]) == 0
    # the probe leaves nothing beside the report
    keys = [o["Key"] for o in s3.client().list_objects_v2(Bucket=bucket)["Contents"]]
    assert keys == ["r.html"], keys
