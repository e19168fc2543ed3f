"""DuckDB over ``latest`` and ``history``: local and on S3, the analyst SQL of docs/analysts.md, the CLI,
and no torn reads while a night publishes."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

import pyarrow as pa
import pytest

from fashionlabel import latest, storage
from fashionlabel.cli import run
from fashionlabel.label.schema import labels_schema
from fashionlabel.query import connect
from fashionlabel.taxonomy import Taxonomy

TAX = Taxonomy.load("fashion-product-images")
DOCS = Path(__file__).resolve().parents[1] / "docs" / "analysts.md"


def _rows(ids: list[str], night: str, article: str, sha: str = "a", review: bool = False) -> pa.Table:
    rows = []
    for i, pid in enumerate(ids):
        r = {"product_id": pid, "image_sha256": f"{sha}{pid}", "model_version": "m1", "taxonomy_version": TAX.version,
             "run_id": f"{night}-x", "labeled_at": dt.datetime.fromisoformat(f"{night}T02:00:00+00:00"),
             "needs_review": review and i % 2 == 0, "error": None}
        for h in TAX.heads:
            if h.kind == "single":
                v = article if h.name == "articleType" else h.values[0]
                r |= {h.name: v, f"{h.name}_score": 0.5 + i / 100, f"{h.name}_topk": [{"label": v, "score": 0.5}]}
            else:
                r |= {h.name: [h.values[0]], f"{h.name}_scores": [{"label": h.values[0], "score": 0.9}]}
        rows.append(r)
    return pa.Table.from_pylist(rows, schema=labels_schema(TAX))


def _night(labels: str, night: str, table: pa.Table, members: set[str]) -> None:
    storage.write_parquet(table, storage.join(labels, "history", f"run_date={night}", "part-shard-000000.parquet"))
    prev = latest.snapshots(labels)
    snap = latest.merge(latest.read_snapshot(labels, prev[-1]) if prev else None, table, night, members,
                        latest.latest_schema(TAX))
    latest.publish(labels, night, snap)


def _two_nights(labels: str) -> None:
    ids = [f"p{i:02d}" for i in range(20)]
    _night(labels, "2026-05-01", _rows(ids, "2026-05-01", "Tshirts"), set(ids))
    # night 2: p00-p01 gone, p20-p21 new, p02-p05 new images now labelled Shirts (half need review)
    tonight = _rows(["p02", "p03", "p04", "p05", "p20", "p21"], "2026-05-02", "Shirts", sha="b", review=True)
    _night(labels, "2026-05-02", tonight, set(ids[2:]) | {"p20", "p21"})


@pytest.fixture(scope="module")
def labels(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("q") / "labels")
    _two_nights(out)
    return out


def test_views_latest_and_history(labels):
    con = connect(labels)
    assert con.execute("SELECT count(*), count(DISTINCT product_id), sum(active::INT) FROM latest").fetchall() \
        == [(22, 22, 20)]
    assert con.execute("SELECT run_date, count(*) FROM history GROUP BY 1 ORDER BY 1").fetchall() \
        == [("2026-05-01", 20), ("2026-05-02", 6)]
    assert con.execute("SELECT articleType, count(*) FROM latest WHERE active GROUP BY 1 ORDER BY 1").fetchall() \
        == [("Shirts", 6), ("Tshirts", 14)]


def _doc_queries() -> list[str]:
    return re.findall(r"```sql\n(.*?)```", DOCS.read_text(), re.S)


def test_every_analyst_query_in_the_docs_runs_and_answers(labels):
    queries = _doc_queries()
    assert len(queries) >= 6
    con = connect(labels)
    answers = [con.execute(q).fetchall() for q in queries]
    assert all(answers)  # every documented question has an answer on these two nights
    changed = {r[0]: r[1] for r in next(a for q, a in zip(queries, answers, strict=True) if "AS why" in q)}
    assert changed == {"p02": "new image", "p03": "new image", "p04": "new image", "p05": "new image",
                       "p20": "new", "p21": "new"}
    flips = next(a for q, a in zip(queries, answers, strict=True) if "articleType_flips" in q)
    assert flips == [(4, 0, 4)]
    gone = next(a for q, a in zip(queries, answers, strict=True) if "NOT active" in q)
    assert [r[0] for r in gone] == ["p00", "p01"]
    review = next(a for q, a in zip(queries, answers, strict=True) if "LIMIT 100" in q)
    assert sorted(r[0] for r in review) == ["p02", "p04", "p20"]


def test_query_over_s3(s3, tmp_path):
    bucket = s3.make_bucket("query")
    _two_nights(f"s3://{bucket}/labels")
    con = connect(f"s3://{bucket}/labels")
    assert con.execute("SELECT count(*) FROM latest WHERE NOT active").fetchall() == [(2,)]
    assert con.execute("SELECT count(DISTINCT run_date) FROM history").fetchall() == [(2,)]


def test_a_reader_never_sees_a_half_published_night(labels, tmp_path):
    import shutil

    root = str(tmp_path / "labels")
    shutil.copytree(labels, root)
    # a night 3 whose snapshot files are written but whose pointer is not swapped yet (killed in between)
    snap = latest.read_snapshot(root, "2026-05-02").slice(0, 5)
    storage.write_parquet(snap, storage.join(latest.snapshot_dir(root, "2026-05-03"), "part-00000.parquet"))
    assert connect(root).execute("SELECT count(*) FROM latest").fetchall() == [(22,)]


def test_cli_query(labels, capsys):
    assert run(["query", "--labels", labels, "--csv", "SELECT product_id FROM latest WHERE NOT active ORDER BY 1"]) == 0
    assert capsys.readouterr().out.split() == ["product_id", "p00", "p01"]
    assert run(["query", "--labels", labels, "SELECT nope FROM latest"]) == 1
    assert "error" in capsys.readouterr().err
