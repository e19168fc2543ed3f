"""Small labels tables that follow the real schemas (two nights of history and latest), built without Ray."""

from __future__ import annotations

import datetime as dt

import pyarrow as pa

from fashionlabel import latest, storage
from fashionlabel.label.schema import labels_schema
from fashionlabel.taxonomy import Taxonomy

TAX = Taxonomy.load("fashion-product-images")


def make_rows(ids: list[str], night: str, article: str, sha: str = "a", review: bool = False) -> pa.Table:
    rows = []
    for i, pid in enumerate(ids):
        r = {
            "product_id": pid,
            "image_sha256": f"{sha}{pid}",
            "model_version": "m1",
            "taxonomy_version": TAX.version,
            "run_id": f"{night}-x",
            "labeled_at": dt.datetime.fromisoformat(f"{night}T02:00:00+00:00"),
            "needs_review": review and i % 2 == 0,
            "error": None,
        }
        for h in TAX.heads:
            if h.kind == "single":
                v = article if h.name == "articleType" else h.values[0]
                r |= {
                    h.name: v,
                    f"{h.name}_score": 0.5 + i / 100,
                    f"{h.name}_topk": [{"label": v, "score": 0.5}],
                }
            else:
                r |= {h.name: [h.values[0]], f"{h.name}_scores": [{"label": h.values[0], "score": 0.9}]}
        rows.append(r)
    return pa.Table.from_pylist(rows, schema=labels_schema(TAX))


def add_night(labels: str, night: str, table: pa.Table, members: set[str]) -> None:
    """A finished night as a run leaves it: its history part (none on a quiet night), its ``_SUCCESS``, and
    ``latest`` published."""
    run = storage.join(labels, "history", f"run_date={night}")
    if table.num_rows:
        storage.write_parquet(table, storage.join(run, "part-shard-000000.parquet"))
    storage.write_json(storage.join(run, "_SUCCESS"), {"run_date": night, "rows": table.num_rows})
    prev = latest.snapshots(labels)
    snap = latest.merge(
        latest.read_snapshot(labels, prev[-1]) if prev else None,
        table,
        night,
        members,
        latest.latest_schema(TAX),
    )
    latest.publish(labels, night, snap)


def two_nights(labels: str) -> None:
    ids = [f"p{i:02d}" for i in range(20)]
    add_night(labels, "2026-05-01", make_rows(ids, "2026-05-01", "Tshirts"), set(ids))
    # night 2: p00-p01 gone, p20-p21 new, p02-p05 new images now labelled Shirts (half need review)
    tonight = make_rows(
        ["p02", "p03", "p04", "p05", "p20", "p21"], "2026-05-02", "Shirts", sha="b", review=True
    )
    add_night(labels, "2026-05-02", tonight, set(ids[2:]) | {"p20", "p21"})
