import duckdb
import numpy as np
import pyarrow.parquet as pq

from fashionlabel.data import load_samples
from fashionlabel.label.pipeline import label_shards
from fashionlabel.label.predictor import Predictor
from fashionlabel.label.schema import labels_schema
from fashionlabel.shards import list_shards
from fashionlabel.taxonomy import Taxonomy


def test_label_schema_rows_and_rerun(ray_session, small_shards, tiny_model, tmp_path):
    out = tmp_path / "labels"
    s = label_shards(str(small_shards), str(tiny_model), str(out), "2026-01-01")
    assert s["labelled"] == 600 and s["errored"] == 0 and s["files"] == 4
    run = out / "history" / "run_date=2026-01-01"
    assert (run / "_SUCCESS").is_file()
    tax = Taxonomy.load("fashion-product-images")
    for f in run.glob("*.parquet"):
        assert pq.read_schema(f).equals(labels_schema(tax))
    q = f"SELECT count(*), count(DISTINCT product_id) FROM '{out}/history/*/*.parquet'"
    con = duckdb.connect()
    assert con.execute(q).fetchall() == [(600, 600)]
    # every single head's label comes from its own value list; hierarchy is consistent
    art = con.execute(f"SELECT articleType, subCategory, masterCategory FROM '{run}/*.parquet'").fetchall()
    sub, master = tax.head("articleType").parent_map, tax.head("subCategory").parent_map
    assert all(sub[a] == s_ and master[s_] == m for a, s_, m in art)
    again = label_shards(str(small_shards), str(tiny_model), str(out), "2026-01-01")
    assert again["shards_done_before"] == 4 and again["labelled"] == 0
    assert con.execute(q).fetchall() == [(600, 600)]


def test_labels_equal_predictor_on_same_images(ray_session, small_shards, tiny_model, tmp_path):
    out = tmp_path / "labels"
    label_shards(str(small_shards), str(tiny_model), str(out), "2026-01-02")
    got = duckdb.connect().execute(
        f"SELECT product_id, articleType, gender_score FROM '{out}/history/*/*.parquet' ORDER BY product_id"
    ).fetchall()
    pred = Predictor(tiny_model, device="cpu")
    samples = load_samples(list_shards(str(small_shards)), pred.taxonomy, pred.size)
    rows = pred.label_rows(samples.images)
    want = sorted((pid, r["articleType"], r["gender_score"]) for pid, r in zip(samples.product_ids, rows,
                                                                                strict=True))
    assert [g[:2] for g in got] == [w[:2] for w in want]
    assert np.allclose([g[2] for g in got], [w[2] for w in want], atol=1e-5)
