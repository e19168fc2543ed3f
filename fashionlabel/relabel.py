"""Relabelling: which products a night labels again besides its new and changed ones, and from where.

The product map says where each product's current image was sharded (its newest night). A product is
relabelled when its label in ``latest`` comes from another model version, is older than a set age, is an
error (a shard that could not be read when the image was new), or is missing (a night lost before its
labels); its image is read again from the shards of that night.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from fashionlabel import storage
from fashionlabel.label.pipeline import LabelConfig, label_shards
from fashionlabel.layout import Layout

log = logging.getLogger(__name__)

_NONE = object()  # no current image in this night: equal to no sha256, not even a missing one

MAP_SCHEMA = pa.schema(
    [
        ("product_id", pa.string()),
        ("key", pa.string()),
        ("sha256", pa.string()),
        ("shard", pa.string()),
        ("night", pa.string()),
    ]
)


def product_map(layout: Layout, before: str) -> pa.Table:
    """product → (key, sha256, shard URI, night) over every night < ``before``; newest night wins.

    Starts from the newest map saved by :func:`save_map` for a night before ``before`` and folds in the
    indexes of the nights after it only: read from every night's index, the map grew with the nights kept
    (a year of 100,000-product nights: 37.5M rows read, ~16 GB at the peak, for 1M products); the saved map
    grows with the catalog only. Without a saved map (a root from before they were kept, or one that cannot
    be read) every night is folded in, with the same result.
    """
    nights = [n for n in layout.nights() if n < before]
    base, since = None, None
    for through in reversed(layout.saved_maps()):
        if through in nights:
            try:
                base, since = storage.read_parquet(layout.map_through(through)).cast(MAP_SCHEMA), through
            except (OSError, ValueError, pa.ArrowInvalid) as e:  # a cache: fall back to the indexes
                log.warning("product map through %s cannot be read (%s): folding every night", through, e)
            break
    raw = _fold(layout, base, [n for n in nights if since is None or n > since])
    # shard URIs are spelled out here, not saved: a root copied or moved elsewhere reads its own shards
    uris = pc.binary_join_element_wise(layout.night_shards(""), raw["night"], "/", raw["shard"], ".tar", "")
    return raw.set_column(MAP_SCHEMA.get_field_index("shard"), "shard", uris)


def save_map(layout: Layout, date: str, before: pa.Table) -> None:
    """Save the map of the nights up to ``date`` (``before``, the map of the nights before it, with night
    ``date`` folded in) for the next night to start from; older saved maps go. Called once night ``date``
    is complete: a saved map covers complete nights only, which are never changed again."""
    names = pc.replace_substring_regex(before["shard"], r"^.*/([^/]*)\.tar$", r"\1")  # URI → shard name
    raw = before.set_column(MAP_SCHEMA.get_field_index("shard"), "shard", names)
    storage.write_parquet(_fold(layout, raw, [date]), layout.map_through(date))
    for old in layout.saved_maps():
        if old < date:
            storage.delete(layout.map_through(old))


def _fold(layout: Layout, base: pa.Table | None, nights: list[str]) -> pa.Table:
    """``base`` (a map with shard names, or None) with the indexes of ``nights`` (oldest first) over it;
    shards by name."""
    parts = [] if base is None else [base.select(MAP_SCHEMA.names)]
    for night in nights:
        idx = storage.join(layout.night_shards(night), "index.parquet")
        if storage.exists(idx):
            t = storage.read_parquet(idx, columns=["product_id", "key", "sha256", "shard"])
            parts.append(t.append_column("night", pa.array([night] * t.num_rows, pa.string())))
    if not parts:
        return MAP_SCHEMA.empty_table()
    import duckdb

    # The newest row of each product is found over its id and part number alone (a grouping, not a sort of
    # whole rows), then the winners are taken whole. Sorting the whole rows, with URIs built for every row
    # of every night, peaked at 2.4 GB for 3M products and four later nights of 300,000 (1.7 GB now).
    n = pa.chunked_array([pa.array([i] * len(t), pa.int32()) for i, t in enumerate(parts)], type=pa.int32())
    every = pa.concat_tables(parts)
    con = duckdb.connect()
    con.register(
        "m", pa.table({"product_id": every["product_id"], "n": n, "pos": pa.array(range(every.num_rows))})
    )
    pos = con.sql(
        "SELECT arg_max(pos, n) AS pos FROM m GROUP BY product_id ORDER BY product_id"
    ).to_arrow_table()["pos"]
    return every.take(pos).cast(MAP_SCHEMA)


def selection(
    snap: pa.Table,
    sharded: set[str],
    night_ids: set[str],
    members: set[str],
    version: str,
    date: str,
    older_than_days: int | None,
) -> tuple[set[str], str]:
    """The active products to relabel tonight (not labelled tonight already) and why, as one phrase.

    Args:
        snap: the previous ``latest`` snapshot.
        sharded: every product whose current image is in some night's shards.
    """
    ids = snap["product_id"].to_pylist()
    old_model = {p for p, v in zip(ids, snap["model_version"].to_pylist(), strict=True) if v != version}
    too_old = set()
    if older_than_days is not None:
        try:
            cutoff = dt.date.fromisoformat(date) - dt.timedelta(days=older_than_days)
        except OverflowError:  # more days than the calendar has before the night: no label is that old
            cutoff = dt.date.min
        too_old = {p for p, d in zip(ids, snap["run_date"].to_pylist(), strict=True) if d < cutoff}
    # An error row in latest is the only label its image has (merge keeps a good one over it): try again.
    errored = {p for p, e in zip(ids, snap["error"].to_pylist(), strict=True) if e is not None}
    # Products whose current image was sharded but never got a label (a night lost before its labels).
    missing = sharded - set(ids)
    want = ((old_model | too_old | errored | missing) & members) - night_ids
    reasons = [
        r
        for r, s in (
            ("model version changed", old_model & want),
            (f"labels older than {older_than_days} day{'' if older_than_days == 1 else 's'}", too_old & want),
            ("an error last time", errored & want),
            ("never labelled", missing & want),
        )
        if s
    ]
    return want, "; ".join(reasons)


def relabel_products(
    layout: Layout,
    date: str,
    model: str,
    version: str,
    snap: pa.Table | None,
    before: pa.Table,
    night_ids: set[str],
    members: set[str],
    older_than_days: int | None,
    label_cfg: LabelConfig,
) -> dict[str, Any]:
    """Relabel active products whose current label is from another model, too old, an error or missing
    (:func:`selection`), from their shards.

    Args:
        snap: the previous night's ``latest`` snapshot (None on the first night: nothing to relabel).
        before: where each product's current image was sharded (``product_map``).
    """
    if snap is None:
        return {"labelled": 0, "errored": 0, "reason": None, "products": 0}
    # The map stays Arrow columns: as one dict per product it was 0.8 GB on the head for 1M products, every
    # night, though most nights relabel nothing.
    sharded = set(before["product_id"].to_pylist())
    want, reasons = selection(snap, sharded, night_ids, members, version, date, older_than_days)
    del sharded
    totals = {"labelled": 0, "errored": 0, "reason": reasons or None, "products": len(want)}
    if not want:
        return totals
    log.info("relabel: %d products (%s)", len(want), totals["reason"])
    wanted = before.filter(pc.is_in(before["product_id"], value_set=pa.array(list(want), pa.string())))
    for night in sorted(set(wanted["night"].to_pylist())):
        idx = storage.read_parquet(
            storage.join(layout.night_shards(night), "index.parquet"),
            columns=["product_id", "sha256", "shard"],
        )
        here = wanted.filter(pc.equal(wanted["night"], night))
        current = dict(zip(here["product_id"].to_pylist(), here["sha256"].to_pylist(), strict=True))
        # skip= every row of this night's shards except the current image of a product to relabel.
        skip = {
            p: s
            for p, s in zip(idx["product_id"].to_pylist(), idx["sha256"].to_pylist(), strict=True)
            if current.get(p, _NONE) != s
        }
        work = layout.relabel_work(date, night)
        s = label_shards(layout.night_shards(night), model, work, date, label_cfg, skip=skip)
        totals["labelled"] += s["labelled"]
        totals["errored"] += s["errored"]
        # Publish the parts into the night's history under names that cannot collide with its own shards.
        for name in storage.listdir(s["out"], ".parquet"):
            t = storage.read_parquet(storage.join(s["out"], name))
            if t.num_rows:
                storage.write_parquet(
                    t, storage.join(layout.history(date), f"part-relabel-{night}-{name[5:]}")
                )
    return totals
