"""DuckDB over ``latest`` and ``history``: local and on S3, the analyst SQL of docs/analysts.md, the CLI,
and no torn reads while a night publishes."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

import pytest
from labels_factory import TAX
from labels_factory import two_nights as _two_nights

from fashionlabel import latest, storage
from fashionlabel.cli import run
from fashionlabel.query import connect, query

VIEWS = ("latest", "history", "nights")
DOCS = Path(__file__).resolve().parents[1] / "docs" / "analysts.md"


@pytest.fixture(scope="module")
def labels(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("q") / "labels")
    _two_nights(out)
    return out


def test_views_latest_and_history(labels):
    con = connect(labels)
    assert con.execute(
        "SELECT count(*), count(DISTINCT product_id), sum(active::INT) FROM latest"
    ).fetchall() == [(22, 22, 20)]
    assert con.execute("SELECT run_date, count(*) FROM history GROUP BY 1 ORDER BY 1").fetchall() == [
        (dt.date(2026, 5, 1), 20),
        (dt.date(2026, 5, 2), 6),
    ]
    assert con.execute(
        "SELECT articleType, count(*) FROM latest WHERE active GROUP BY 1 ORDER BY 1"
    ).fetchall() == [("Shirts", 6), ("Tshirts", 14)]


def test_rows_fetched_as_python_values_carry_labeled_at_in_utc(labels):
    # fetchall() hands a TIMESTAMP WITH TIME ZONE to Python through pytz: a dependency of the project
    con = connect(labels)
    (pid, at), *_ = con.execute("SELECT product_id, labeled_at FROM latest ORDER BY 1").fetchall()
    assert pid == "p00" and at == dt.datetime(2026, 5, 1, 2, tzinfo=dt.UTC)
    assert con.execute("SELECT * FROM history ORDER BY product_id LIMIT 1").fetchall()[0][0] == "p00"


def _doc_queries() -> list[str]:
    return re.findall(r"```sql\n(.*?)```", DOCS.read_text(), re.S)


def test_every_analyst_query_in_the_docs_runs_and_answers(labels):
    queries = _doc_queries()
    assert len(queries) >= 6
    con = connect(labels)
    answers = [con.execute(q).fetchall() for q in queries]
    assert all(answers)  # every documented question has an answer on these two nights
    changed = {r[0]: r[1] for r in next(a for q, a in zip(queries, answers, strict=True) if "AS why" in q)}
    assert changed == {
        "p02": "new image",
        "p03": "new image",
        "p04": "new image",
        "p05": "new image",
        "p20": "new",
        "p21": "new",
    }
    flips = next(a for q, a in zip(queries, answers, strict=True) if "articleType_flips" in q)
    assert flips == [(4, 0, 4)]
    gone = next(a for q, a in zip(queries, answers, strict=True) if "NOT active" in q)
    assert [r[0] for r in gone] == ["p00", "p01"]
    review = next(a for q, a in zip(queries, answers, strict=True) if "LIMIT 100" in q)
    assert sorted(r[0] for r in review) == ["p02", "p04", "p20"]
    then_and_now = next(a for q, a in zip(queries, answers, strict=True) if "products_then" in q)
    assert then_and_now == [("Tshirts", 20, 14), ("Shirts", 0, 6)]


def test_after_a_quiet_night_the_docs_say_nothing_changed_tonight(tmp_path):
    from labels_factory import add_night, make_rows

    labels = str(tmp_path / "labels")
    _two_nights(labels)
    active = {f"p{i:02d}" for i in range(2, 22)}
    add_night(labels, "2026-05-03", make_rows([], "2026-05-03", "Tshirts"), active)  # nothing new tonight
    con = connect(labels)
    assert con.execute("SELECT max(run_date) FROM nights").fetchall() == [(dt.date(2026, 5, 3),)]
    queries = _doc_queries()
    # not night 2's six products as if they changed tonight
    assert con.execute(next(q for q in queries if "AS why" in q)).fetchall() == []
    assert con.execute(next(q for q in queries if "articleType_flips" in q)).fetchall() == [(0, 0, 0)]


def test_history_has_the_columns_of_every_night_a_head_added_later_included(labels, tmp_path):
    import shutil

    import pyarrow as pa
    from labels_factory import make_rows

    root = str(tmp_path / "labels")
    shutil.copytree(labels, root)
    # night 3 labelled with a taxonomy that added a head `fit` (the newest files are not the first listed)
    t = make_rows(["p06", "p07"], "2026-05-03", "Jeans")
    t = t.append_column("fit", pa.array(["slim", "loose"])).append_column("fit_score", pa.array([0.9, 0.8]))
    run = storage.join(root, "history", "run_date=2026-05-03")
    storage.write_parquet(t, storage.join(run, "part-shard-000000.parquet"))
    storage.write_json(storage.join(run, "_SUCCESS"), {"run_date": "2026-05-03", "rows": 2})
    q = "SELECT run_date, product_id, fit, fit_score FROM history WHERE fit IS NOT NULL ORDER BY 2"
    assert connect(root).execute(q).fetchall() == [
        (dt.date(2026, 5, 3), "p06", "slim", 0.9),
        (dt.date(2026, 5, 3), "p07", "loose", 0.8),
    ]
    older = connect(root).execute("SELECT count(*), count(fit) FROM history WHERE run_date < '2026-05-03'")
    n, with_fit = older.fetchall()[0]
    assert n > 0 and with_fit == 0  # older nights: the column is there, null


def test_tonight_is_the_night_latest_shows_until_its_snapshot_is_published(labels, tmp_path):
    import shutil

    from labels_factory import make_rows

    root = str(tmp_path / "labels")
    shutil.copytree(labels, root)
    # night 3 as nightly leaves it between the run folder's _SUCCESS and the publication of its snapshot
    run = storage.join(root, "history", "run_date=2026-05-03")
    storage.write_parquet(
        make_rows(["p06"], "2026-05-03", "Jeans"), storage.join(run, "part-shard-000000.parquet")
    )
    storage.write_json(storage.join(run, "_SUCCESS"), {"run_date": "2026-05-03", "rows": 1})
    con = connect(root)
    assert con.execute("SELECT max(run_date) FROM nights").fetchall() == [(dt.date(2026, 5, 2),)]
    assert con.execute("SELECT max(run_date) FROM latest").fetchall() == [(dt.date(2026, 5, 2),)]
    changed = con.execute(next(q for q in _doc_queries() if "AS why" in q)).fetchall()
    assert len(changed) == 6  # night 2's changes, as latest and the night report show them
    latest.publish(root, "2026-05-03", latest.read_snapshot(root, "2026-05-02"))
    assert connect(root).execute("SELECT max(run_date) FROM nights").fetchall() == [(dt.date(2026, 5, 3),)]


def test_the_docs_analyst_sql_is_also_athena_sql():
    # docs/analysts.md says its queries run on Athena (Trino) too: none of DuckDB's own syntax
    duckdb_only = {
        "GROUP BY ALL": r"GROUP\s+BY\s+ALL\b",
        "QUALIFY": r"\bQUALIFY\b",
        ":: cast": r"::",
        "unnest() in a select list": r"SELECT\s+unnest\(",
    }
    for q in _doc_queries():
        used = [name for name, rx in duckdb_only.items() if re.search(rx, q, re.I)]
        assert not used, (used, q)


def test_a_product_back_in_the_catalog_flips_in_the_docs_query_not_in_the_report(tmp_path):
    from labels_factory import add_night, make_rows

    from fashionlabel.report import write_night_report

    labels = str(tmp_path / "labels")
    _two_nights(labels)  # p00 left the catalog on night 2
    active = {f"p{i:02d}" for i in range(22)}
    add_night(labels, "2026-05-03", make_rows(["p00"], "2026-05-03", "Shirts", sha="c"), active)
    flips = connect(labels).execute(next(q for q in _doc_queries() if "articleType_flips" in q)).fetchall()
    assert flips == [(1, 0, 1)]  # p00: Tshirts (night 1) → Shirts
    r = write_night_report(labels, "2026-05-03", str(tmp_path / "r.html"))
    assert r["drift"]["articleType"] == 0  # p00 was not active on night 2: not compared


def test_the_readme_duckdb_snippet_runs_as_written(labels):
    import subprocess
    import sys

    readme = (DOCS.parents[1] / "README.md").read_text()
    script = re.search(r"\.venv/bin/python - <<'EOF'\n(.*?)\nEOF\n", readme, re.S).group(1)
    r = subprocess.run(
        [sys.executable, "-"], input=script.replace("demo-out/labels", labels), capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    assert "to_review" in r.stdout and "Shirts" in r.stdout


def test_the_readme_query_command_answers_what_the_snippet_before_it_does(labels):
    readme = (DOCS.parents[1] / "README.md").read_text()
    sql = re.search(r'fashionlabel query --labels\s+demo-out/labels "(.*?)"', readme, re.S).group(1)
    assert connect(labels).execute(sql).fetchall() == [("Shirts", 6)]  # the newest run, as the snippet
    # the query that `fashionlabel demo` suggests at its end is this one
    from fashionlabel.commands import DEMO_QUERY

    assert " ".join(sql.split()) == DEMO_QUERY


def test_query_over_s3(s3, tmp_path):
    bucket = s3.make_bucket("query")
    _two_nights(f"s3://{bucket}/labels")
    con = connect(f"s3://{bucket}/labels")
    assert con.execute("SELECT count(*) FROM latest WHERE NOT active").fetchall() == [(2,)]
    assert con.execute("SELECT count(DISTINCT run_date) FROM history").fetchall() == [(2,)]
    # read-only, as `fashionlabel query` runs it: pyarrow still reads S3 with DuckDB's file access off
    from fashionlabel.query import query

    assert query(f"s3://{bucket}/labels", "SELECT count(*) AS n FROM history")["n"][0] == 26


def test_a_reader_never_sees_a_half_published_night(labels, tmp_path):
    import shutil

    root = str(tmp_path / "labels")
    shutil.copytree(labels, root)
    # a night 3 whose snapshot files are written but whose pointer is not swapped yet (killed in between)
    snap = latest.read_snapshot(root, "2026-05-02").slice(0, 5)
    storage.write_parquet(snap, storage.join(latest.snapshot_dir(root, "2026-05-03"), "part-00000.parquet"))
    assert connect(root).execute("SELECT count(*) FROM latest").fetchall() == [(22,)]


def test_cli_query(labels, capsys):
    assert (
        run(
            [
                "query",
                "--labels",
                labels,
                "--csv",
                "SELECT product_id FROM latest WHERE NOT active ORDER BY 1",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.split() == ["product_id", "p00", "p01"]
    assert run(["query", "--labels", labels, "SELECT nope FROM latest"]) == 1
    assert "error" in capsys.readouterr().err
    # --max-rows: that many rows printed (a longer result cut in the middle), 0 for all of them
    sql = "SELECT i FROM range(100) t(i) ORDER BY i"
    for argv, shown in (
        ([], 60),
        (["--max-rows", "20"], 20),
        (["--max-rows", "0"], 100),
        (["--max-rows", "200"], 100),
    ):
        assert run(["query", "--labels", labels, *argv, sql]) == 0
        lines = capsys.readouterr().out.splitlines()
        printed = [ln for ln in lines[1:] if re.fullmatch(r"\d+\s+\d+", ln.strip())]
        assert len(printed) == shown, (argv, lines[:3], len(printed))
        assert any(ln.strip().startswith("..") for ln in lines) == (shown < 100)  # where rows were cut


def test_cli_query_csv_writes_list_columns_as_json_one_row_a_line(labels, capsys):
    import csv
    import io
    import json

    sql = "SELECT product_id, articleType_topk, attributes, error FROM latest ORDER BY 1 LIMIT 2"
    assert run(["query", "--labels", labels, "--csv", sql]) == 0
    out = capsys.readouterr().out
    assert len(out.splitlines()) == 3  # the header and one line per row
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [r["product_id"] for r in rows] == ["p00", "p01"]
    assert json.loads(rows[0]["articleType_topk"]) == [{"label": "Tshirts", "score": 0.5}]
    assert json.loads(rows[0]["attributes"]) == [TAX.heads[-1].values[0]] and rows[0]["error"] == ""


def test_a_nightly_root_given_for_its_labels_is_named(labels, tmp_path, capsys):
    import shutil

    shutil.copytree(labels, tmp_path / "labels")
    assert run(["query", "--labels", str(tmp_path), "SELECT count(*) FROM latest"]) == 1
    assert f"{tmp_path} is a nightly root: its labels are under {tmp_path}/labels" in capsys.readouterr().err


def test_a_view_the_folder_does_not_have_is_named_with_where_it_comes_from(labels, tmp_path, capsys):
    import shutil

    shutil.copytree(f"{labels}/history", tmp_path / "history")  # what `fashionlabel label` writes
    assert run(["query", "--labels", str(tmp_path), "SELECT count(*) FROM history"]) == 0
    capsys.readouterr()
    assert run(["query", "--labels", str(tmp_path), "SELECT count(*) FROM latest"]) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path} has no latest table (labels/latest is published by `fashionlabel nightly`" in err
    assert err.rstrip().endswith("it has: history, nights")


def test_a_folder_holding_a_labels_root_is_answered_with_it(labels, tmp_path, capsys):
    """A demo's folder (demo-out, whose labels are demo-out/labels) was called "a nightly root"."""
    import shutil

    shutil.copytree(f"{labels}/history", tmp_path / "labels" / "history")  # as `demo` and `label` write
    assert run(["query", "--labels", str(tmp_path), "SELECT 1"]) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path} keeps its labels under {tmp_path}/labels: give --labels {tmp_path}/labels" in err
    assert "nightly" not in err


def test_a_folder_inside_a_labels_root_is_answered_with_the_root(labels, capsys):
    """The history folder, or a run folder in it (what `label` names as its output), given for the labels
    root: "no labels under …" named no way on."""
    for inside in (f"{labels}/history", f"{labels}/history/run_date=2026-05-02"):
        assert run(["query", "--labels", inside, "SELECT count(*) FROM history"]) == 1
        err = capsys.readouterr().err
        assert f"{inside} is inside a labels root: give --labels {labels}" in err, err


def test_a_mistyped_table_is_answered_with_the_tables_there_are(labels, capsys):
    """DuckDB's own suggestion for a name near none of the views is one of its system tables (`Did you
    mean "pg_sequences"?`); the command's last line names the tables the labels root has."""
    assert run(["query", "--labels", labels, "SELECT count(*) FROM products"]) == 1
    err = capsys.readouterr().err.rstrip()
    assert "products does not exist" in err
    assert err.splitlines()[-1] == (
        f"fashionlabel query: the tables of {labels}: history, latest, nights, snapshots"
    ), err


def test_a_damaged_latest_pointer_is_named_with_its_repair(labels, tmp_path, capsys):
    """A `latest/_CURRENT.json` cut short or overwritten failed `query` and `report` with JSON's own
    message (`Invalid control character at: line 1 column 7`), naming no file. Both name it and the
    snapshot pointer to copy over it; after the copy the same query answers."""
    import shutil

    root = tmp_path / "labels"
    shutil.copytree(labels, root)
    pointer = root / "latest" / "_CURRENT.json"
    good = pointer.read_text()
    newest = root / "latest" / "snapshots" / latest.snapshots(str(root))[-1] / "_SUCCESS"
    for damage in ('{"snap', "[]"):
        pointer.write_text(damage)
        assert run(["query", "--labels", str(root), "SELECT count(*) FROM latest"]) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"fashionlabel query: error: {pointer} is damaged (") and str(newest) in err
        assert "\n" not in err
        assert run(["report", "--labels", str(root), "--out", str(tmp_path / "r.html")]) == 1
        assert f"{pointer} is damaged" in capsys.readouterr().err
    shutil.copy(newest, pointer)
    assert pointer.read_text() == good
    assert run(["query", "--labels", str(root), "SELECT count(*) FROM latest"]) == 0


def test_query_is_read_only_writes_nothing_and_reads_no_other_file(labels, tmp_path, capsys):
    """`query` ran any SQL: `COPY … TO` wrote (or overwrote) a file, `read_csv` and `ATTACH` opened any
    local file. DuckDB now refuses them once the views are registered, and the command says why."""
    from fashionlabel.query import query

    secret = tmp_path / "secret.csv"
    secret.write_text("a\nhidden\n")
    out = tmp_path / "out.csv"
    for sql in (
        f"COPY (SELECT product_id FROM latest) TO '{out}'",
        f"SELECT * FROM read_csv('{secret}')",
        f"ATTACH '{tmp_path / 'x.db'}' AS x",
        "SET enable_external_access = true",
        "INSTALL httpfs",
    ):
        with pytest.raises(PermissionError, match="query is read-only"):
            query(labels, sql)
        assert run(["query", "--labels", labels, sql]) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("fashionlabel query: error: query is read-only") and "\n" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["secret.csv"]
    # reading the views, and SQL that keeps its tables in memory, still answer
    assert query(labels, "CREATE TABLE t AS SELECT * FROM latest; SELECT count(*) AS n FROM t")["n"][0] == 22
    assert run(["query", "--labels", labels, "--csv", "SELECT count(*) AS n FROM history"]) == 0
    assert capsys.readouterr().out.split() == ["n", "26"]


def test_run_date_is_a_date_in_every_view_so_they_join_and_compare(labels):
    """`history` and `nights` gave `run_date` as a string and `latest` as a DATE: joining or comparing them
    (`IN`, a week before tonight, days between nights) failed with DuckDB's "Cannot compare values of
    type VARCHAR and type DATE"."""
    con = connect(labels)
    types = {v: con.execute(f"SELECT DISTINCT typeof(run_date) FROM {v}").fetchall() for v in VIEWS}
    assert types == dict.fromkeys(VIEWS, [("DATE",)])
    # each latest row is history's row of the same product and night
    joined = con.execute(
        "SELECT count(*) FROM latest l JOIN history h ON h.product_id = l.product_id AND h.run_date = l.run_date"
    )
    assert joined.fetchall() == [(22,)]
    assert con.execute(
        "SELECT count(*) FROM latest WHERE run_date IN (SELECT run_date FROM history)"
    ).fetchall() == [(22,)]
    week = "SELECT count(*) FROM history WHERE run_date > (SELECT max(run_date) FROM nights) - INTERVAL 7 DAY"
    assert con.execute(week).fetchall() == [(26,)]
    assert con.execute("SELECT max(run_date) - min(run_date) FROM nights").fetchall() == [(1,)]
    # a night written as a string still selects it (and only its folder is read)
    assert con.execute("SELECT count(*) FROM history WHERE run_date = '2026-05-02'").fetchall() == [(6,)]


def test_a_whole_history_scan_keeps_no_file_footers(tmp_path):
    """A scan of `history` kept every Parquet part's footer in memory until the connection closed
    (~140 KB a part: 1,500 parts of 15 nights held ~210 MB, a year of 100 parts a night ~5 GB). In a
    fresh process, the same scan now stays far below that."""
    import subprocess
    import sys

    from labels_factory import make_rows

    labels = tmp_path / "labels"
    part = make_rows([f"p{i:03d}" for i in range(20)], "2026-05-01", "Tshirts")
    for night in range(15):
        run_dir = labels / "history" / f"run_date=2026-05-{night + 1:02d}"
        for i in range(100):
            storage.write_parquet(part, str(run_dir / f"part-shard-{i:06d}.parquet"))
        storage.write_json(str(run_dir / "_SUCCESS"), {"rows": 2000})
    child = (
        "import resource, sys\n"
        "from fashionlabel.query import connect\n"
        "con = connect(sys.argv[1])\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "rows = con.execute('SELECT articleType, count(*) FROM history GROUP BY 1').fetchall()\n"
        "print(rows, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)\n"
    )
    r = subprocess.run([sys.executable, "-c", child, str(labels)], capture_output=True, text=True, check=True)
    rows, above_mb = r.stdout.rsplit(" ", 1)
    assert rows == "[('Tshirts', 30000)]"
    assert int(above_mb) < 80, r.stdout  # it was ~210 MB


def test_sql_with_no_statement_is_named_not_a_python_attribute_error(labels, capsys):
    """Blank SQL or a comment alone failed with "'NoneType' object has no attribute 'df'"."""
    for sql in ("", "  \n", "-- tonight's count"):
        assert run(["query", "--labels", labels, sql]) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("fashionlabel query: error: no SQL statement to run in "), err


def test_snapshots_hold_the_catalog_as_it_stood_on_each_kept_night(tmp_path):
    from labels_factory import add_night, make_rows

    labels = str(tmp_path / "labels")
    _two_nights(labels)
    con = connect(labels)
    per_night = "SELECT snapshot, count(*), sum(active::INT) FROM snapshots GROUP BY 1 ORDER BY 1"
    assert con.execute(per_night).fetchall() == [(dt.date(2026, 5, 1), 20, 20), (dt.date(2026, 5, 2), 22, 20)]
    # the newest snapshot is latest, row for row; an older one is that night's latest, as it was then
    assert con.execute(
        "SELECT * EXCLUDE (snapshot) FROM snapshots WHERE snapshot = '2026-05-02'"
    ).fetchall() == (con.execute("SELECT * FROM latest").fetchall())
    assert con.execute(
        "SELECT product_id, articleType, run_date FROM snapshots WHERE snapshot = '2026-05-01' AND product_id = 'p02'"
    ).fetchall() == [("p02", "Tshirts", dt.date(2026, 5, 1))]

    # a third night whose snapshot is written but not yet published (its pointer not swapped), and a part
    # a killed publish left in a kept snapshot's folder: neither is read
    published = storage.read_json(storage.join(labels, "latest", "_CURRENT.json"))
    ids = [f"p{i:02d}" for i in range(2, 22)]
    add_night(labels, "2026-05-03", make_rows(["p06"], "2026-05-03", "Shirts", sha="c"), set(ids))
    storage.write_json(storage.join(labels, "latest", "_CURRENT.json"), published)
    stray = storage.join(latest.snapshot_dir(labels, "2026-05-01"), "part-00001.parquet")
    storage.write_parquet(latest.read_snapshot(labels, "2026-05-01"), stray)
    assert connect(labels).execute(per_night).fetchall() == [
        (dt.date(2026, 5, 1), 20, 20),
        (dt.date(2026, 5, 2), 22, 20),
    ]

    # pruned snapshots are gone from the view; the published one stays
    storage.write_json(
        storage.join(labels, "latest", "_CURRENT.json"),
        storage.read_json(storage.join(latest.snapshot_dir(labels, "2026-05-03"), "_SUCCESS")),
    )
    latest.prune(labels, 1)
    assert connect(labels).execute(per_night).fetchall() == [(dt.date(2026, 5, 3), 22, 20)]


def test_nights_are_the_run_folders_with_their_success_manifest(tmp_path):
    """A run still labelling, or killed, has parts but no ``_SUCCESS``: it is no finished night."""
    from labels_factory import make_rows

    labels = str(tmp_path / "labels")
    for night, done in (("2026-05-01", True), ("2026-05-02", False)):
        run = storage.join(labels, "history", f"run_date={night}")
        storage.write_parquet(
            make_rows(["p00"], night, "Tshirts"), storage.join(run, "part-shard-000000.parquet")
        )
        if done:
            storage.write_json(storage.join(run, "_SUCCESS"), {"run_date": night, "rows": 1})
    assert connect(labels).execute("SELECT run_date FROM nights").fetchall() == [(dt.date(2026, 5, 1),)]


def test_a_label_output_without_latest_has_no_snapshots_and_says_where_they_come_from(tmp_path):
    from labels_factory import make_rows

    labels = str(tmp_path / "labels")
    storage.write_parquet(
        make_rows(["p00"], "2026-05-01", "Tshirts"),
        storage.join(labels, "history", "run_date=2026-05-01", "part-shard-000000.parquet"),
    )
    with pytest.raises(
        FileNotFoundError, match=r"no snapshots table \(labels/latest/snapshots/D/ are published"
    ):
        query(labels, "SELECT count(*) FROM snapshots")


def test_files_left_in_a_run_folder_are_not_read_as_labels_and_an_odd_folder_is_named(
    labels, tmp_path, capsys
):
    """A zero-byte `notes.parquet` in a run folder failed every query (`fashionlabel query: error: Parquet
    file size is 0 bytes`, naming no file), and a Parquet file of another schema added rows of nulls to `history`; a copied
    folder `run_date=2026-05-01.bak` failed every query with "error parsing '2026-05-01.bak' as scalar of
    type date32[day]". The history view reads the parts alone, and an odd folder is named."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    shutil.copytree(labels, tmp_path / "labels")
    night = tmp_path / "labels" / "history" / "run_date=2026-05-01"
    (night / "notes.parquet").write_bytes(b"")
    pq.write_table(pa.table({"x": [1, 2]}), night / "extra.parquet")
    (night / "README.txt").write_text("labels of the first night")
    con = connect(str(tmp_path / "labels"))
    assert con.execute(
        "SELECT run_date, count(*), count(product_id) FROM history GROUP BY 1 ORDER BY 1"
    ).fetchall() == [
        (dt.date(2026, 5, 1), 20, 20),
        (dt.date(2026, 5, 2), 6, 6),
    ]
    shutil.copytree(night, night.with_name("run_date=2026-05-01.bak"))
    assert run(["query", "--labels", str(tmp_path / "labels"), "SELECT count(*) FROM history"]) == 1
    err = capsys.readouterr().err
    assert f"{night}.bak is not a run folder (history/run_date=YYYY-MM-DD): move it out of history" in err


def test_query_rows_on_a_pipe_carry_no_progress_bar(labels):
    """DuckDB drew its progress bar on stdout, piped or not, once a query ran past 2 s (a loaded machine
    was enough): a script printing its rows printed the bar before them. Off unless stdout is a terminal."""
    import subprocess
    import sys

    child = (
        "import sys\n"
        "from fashionlabel.query import connect\n"
        "con = connect(sys.argv[1])\n"
        "print(con.execute(\"SELECT current_setting('enable_progress_bar')\").fetchall())\n"
        "print(con.execute('SELECT count(*) FROM latest').fetchall())\n"
    )
    r = subprocess.run([sys.executable, "-c", child, labels], capture_output=True, text=True, check=True)
    assert r.stdout == "[(False,)]\n[(22,)]\n", r.stdout[:300]
