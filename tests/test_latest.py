"""``latest`` merging and the nightly relabel choice, on small tables of the real schemas (no Ray)."""

from __future__ import annotations

import datetime as dt

import pyarrow as pa
from labels_factory import TAX, add_night, make_rows

from fashionlabel import latest
from fashionlabel.relabel import selection


def _errors(t: pa.Table, why: str = "shard unreadable") -> pa.Table:
    """The same products as error rows: ``error`` set, labels null, as the labelling writes them."""
    cols = []
    for f in t.schema:
        if f.name == "error":
            cols.append(pa.array([why] * t.num_rows, f.type))
        elif f.name in (
            "product_id",
            "image_sha256",
            "model_version",
            "taxonomy_version",
            "run_id",
            "labeled_at",
        ):
            cols.append(t[f.name])
        elif f.name == "needs_review":
            cols.append(pa.array([True] * t.num_rows))
        else:
            cols.append(pa.nulls(t.num_rows, f.type))
    return pa.Table.from_arrays(cols, schema=t.schema)


def _snapshot(night: pa.Table, date: str, members: set[str], previous: pa.Table | None = None) -> pa.Table:
    return latest.merge(previous, night, date, members, latest.latest_schema(TAX))


def test_an_error_keeps_the_last_good_label_of_the_same_image_and_no_other():
    members = {"a", "b", "c"}
    first = _snapshot(make_rows(["a", "b"], "2026-05-01", "Shirts"), "2026-05-01", members)
    # 05-02: a's image unchanged but unreadable; b has a new image that fails; c is new and fails
    night = pa.concat_tables(
        [
            _errors(make_rows(["a"], "2026-05-02", "Shirts")),
            _errors(make_rows(["b", "c"], "2026-05-02", "Shirts", sha="new")),
        ]
    )
    rows = {r["product_id"]: r for r in _snapshot(night, "2026-05-02", members, first).to_pylist()}
    assert rows["a"]["error"] is None and str(rows["a"]["run_date"]) == "2026-05-01"  # the good label stays
    assert rows["a"]["articleType"] == "Shirts"
    for p in ("b", "c"):  # a label of another image, or none: the error is what there is
        assert rows[p]["error"] == "shard unreadable" and rows[p]["articleType"] is None
        assert str(rows[p]["run_date"]) == "2026-05-02"
    # a later good label of the same image replaces an error as usual
    again = _snapshot(make_rows(["b"], "2026-05-03", "Jeans", sha="new"), "2026-05-03", members, first)
    assert {r["product_id"]: r["articleType"] for r in again.to_pylist()}["b"] == "Jeans"


def test_relabel_takes_products_whose_latest_row_is_an_error():
    members = {"a", "b", "c", "gone"}
    snap = _snapshot(
        pa.concat_tables(
            [
                make_rows(["a"], "2026-05-01", "Shirts"),
                _errors(make_rows(["b", "gone"], "2026-05-01", "Shirts")),
            ]
        ),
        "2026-05-01",
        members - {"gone"},
    )
    want, why = selection(snap, {"a", "b", "gone"}, set(), members - {"gone"}, "m1", "2026-05-02", None)
    assert (want, why) == ({"b"}, "an error last time")  # not a good label, not a product that left
    # labelled tonight already (a new image): nothing to do again
    assert selection(snap, {"a", "b"}, {"b"}, members - {"gone"}, "m1", "2026-05-02", None) == (set(), "")
    # with another model every active product, errors included, for the one reason that covers them all
    want, why = selection(snap, {"a", "b"}, set(), {"a", "b"}, "m2", "2026-05-02", None)
    assert want == {"a", "b"} and why == "model version changed; an error last time"


def test_merging_a_large_latest_does_not_sort_its_whole_rows():
    """Which row wins is decided on the few columns that decide it, then the winners are taken whole: the
    merge once sorted every row, top-k lists and all, in DuckDB (3.6 GB above its inputs for 1M products;
    ~3,000 bytes a product here against ~600-900 now, the output itself ~350)."""
    import gc

    def mem(key: str) -> int:
        with open("/proc/self/status") as f:
            return int(f.read().split(key + ":")[1].split()[0]) * 1024

    n = 40_000
    ids = [f"p{i:06d}" for i in range(n)]
    prev = _snapshot(make_rows(ids, "2026-05-01", "Tshirts"), "2026-05-01", set(ids))
    night = make_rows(ids[: n // 10], "2026-05-02", "Shirts", sha="b")
    _snapshot(night.slice(0, 10), "2026-05-02", set(ids), prev.slice(0, 100))  # imports, DuckDB start-up
    gc.collect()
    before = mem("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # "5" resets the peak resident size (Linux ≥ 4.0)
        f.write("5")
    out = _snapshot(night, "2026-05-02", set(ids[1:]), prev)
    peak = (mem("VmHWM") - before) / n
    assert out.num_rows == n and out["product_id"].to_pylist() == ids
    assert out["articleType"].to_pylist().count("Shirts") == n // 10
    assert out["active"].to_pylist() == [False] + [True] * (n - 1)
    assert peak < 1_800, f"{peak:.0f} bytes per product above the inputs at the peak"


def test_of_two_rows_alike_in_night_time_and_run_tonights_wins():
    members = {"a"}
    first = _snapshot(make_rows(["a"], "2026-05-02", "Shirts"), "2026-05-02", members)
    again = _snapshot(make_rows(["a"], "2026-05-02", "Jeans"), "2026-05-02", members, first)
    assert again["articleType"].to_pylist() == ["Jeans"]


def test_a_night_with_nothing_to_relabel_holds_no_row_objects_of_the_product_map(tmp_path):
    """Every night asks which products to relabel; as one dict per product the map was ~800 bytes each
    on the head (1M products: 0.8 GB), on nights that relabel nothing as on others."""
    import tracemalloc

    from fashionlabel.layout import Layout
    from fashionlabel.relabel import MAP_SCHEMA, relabel_products

    n = 20_000
    ids = [f"p{i:06d}" for i in range(n)]
    snap = _snapshot(make_rows(ids, "2026-05-01", "Tshirts"), "2026-05-01", set(ids))
    before = pa.table(
        [
            ids,
            ids,
            [f"a{p}" for p in ids],
            [f"/s/night=2026-05-01/shard-{i // 1000:06d}.tar" for i in range(n)],
        ]
        + [["2026-05-01"] * n],
        schema=MAP_SCHEMA,
    )
    members = set(ids)
    tracemalloc.start()
    try:
        r = relabel_products(
            Layout(str(tmp_path)), "2026-05-02", "unused", "m1", snap, before, set(), members, None, None
        )
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert r == {"labelled": 0, "errored": 0, "reason": None, "products": 0}
    assert peak / n < 500, f"{peak / n:.0f} bytes per product at the peak"


def test_the_product_map_takes_each_products_newest_night_without_sorting_every_nights_rows(tmp_path):
    """Every night reads the index of every earlier night; the newest row of each product is found over
    its id and night, URIs spelled out for the winners only (~650 bytes a product above the inputs here,
    ~1,600 when every night's rows were sorted whole with their URIs)."""
    import gc

    from fashionlabel import storage
    from fashionlabel.layout import Layout
    from fashionlabel.relabel import product_map

    def mem(key: str) -> int:
        with open("/proc/self/status") as f:
            return int(f.read().split(key + ":")[1].split()[0]) * 1024

    layout, n = Layout(str(tmp_path)), 60_000
    for k, (lo, hi) in enumerate([(0, n), (0, n // 4), (n // 2, n), (0, n)]):
        ids = [f"p{i:06d}" for i in range(lo, hi)]
        index = {"product_id": ids, "key": ids, "sha256": [f"{k}{'x' * 63}"] * len(ids)}
        index["shard"] = [f"shard-{i // 1000:06d}" for i in range(len(ids))]
        storage.write_parquet(
            pa.table(index), storage.join(layout.night_shards(f"2026-05-0{k + 1}"), "index.parquet")
        )
    product_map(layout, "2026-05-02")  # imports, DuckDB start-up
    gc.collect()
    before = mem("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # "5" resets the peak resident size (Linux ≥ 4.0)
        f.write("5")
    m = product_map(layout, "2026-05-04")  # nights 1-3; night 4 is not before it
    peak = (mem("VmHWM") - before) / n
    rows = m.to_pylist()
    assert [r["product_id"] for r in rows] == [f"p{i:06d}" for i in range(n)]
    night = {0: "2026-05-02", n // 4: "2026-05-01", n // 2: "2026-05-03", n - 1: "2026-05-03"}
    for i, d in night.items():
        assert rows[i]["night"] == d and rows[i]["sha256"][0] == str(int(d[-1]) - 1)
    assert rows[n - 1]["shard"] == layout.night_shards("2026-05-03") + "/shard-000029.tar"
    assert peak < 1_100, f"{peak:.0f} bytes per product above the inputs at the peak"


def test_a_night_starts_from_the_saved_map_and_reads_only_the_indexes_after_it(tmp_path):
    """A complete night saves the product map up to itself; the next night's map is that map with only the
    nights after it folded in (the earlier indexes are not read again: here they are gone), and equals the
    map folded from every index. A saved map that cannot be read is passed over."""
    from fashionlabel import storage
    from fashionlabel.layout import Layout
    from fashionlabel.relabel import product_map, save_map

    layout, n = Layout(str(tmp_path)), 3_000
    for k, (lo, hi) in enumerate([(0, n), (0, n // 4), (n // 2, n), (0, 10), (5, n // 3)]):
        ids = [f"p{i:06d}" for i in range(lo, hi)]
        index = {"product_id": ids, "key": ids, "sha256": [f"{k}{'x' * 63}"] * len(ids)}
        index["shard"] = [f"shard-{i // 1000:06d}" for i in range(len(ids))]
        storage.write_parquet(
            pa.table(index), storage.join(layout.night_shards(f"2026-05-0{k + 1}"), "index.parquet")
        )
    every = {d: product_map(layout, d) for d in ("2026-05-04", "2026-05-05", "2026-05-06")}
    for d in ("2026-05-01", "2026-05-02", "2026-05-03"):  # as the nights complete, in order
        save_map(layout, d, product_map(layout, d))
    assert layout.saved_maps() == ["2026-05-03"]  # only the newest is kept
    saved, want = storage.read_parquet(layout.map_through("2026-05-03")), every["2026-05-04"]
    assert saved.drop_columns("shard").equals(want.drop_columns("shard"))
    # shards are saved by name: the URIs are spelled out from the root that reads it
    assert saved["shard"].to_pylist() == [
        u.rsplit("/", 1)[1].removesuffix(".tar") for u in want["shard"].to_pylist()
    ]
    for k in (1, 2, 3):  # nights up to the saved map are no longer read
        storage.delete(storage.join(layout.night_shards(f"2026-05-0{k}"), "index.parquet"))
    assert product_map(layout, "2026-05-05").equals(every["2026-05-05"])
    save_map(layout, "2026-05-04", product_map(layout, "2026-05-04"))
    assert product_map(layout, "2026-05-06").equals(every["2026-05-06"])
    # a root copied elsewhere reads its own shards, not the first root's
    import shutil

    moved = Layout(str(shutil.copytree(tmp_path, tmp_path.parent / (tmp_path.name + "-moved"))))
    uris = product_map(moved, "2026-05-06")["shard"].to_pylist()
    assert uris == [u.replace(str(tmp_path), moved.root, 1) for u in every["2026-05-06"]["shard"].to_pylist()]
    assert all(u.startswith(moved.root + "/shards/night=2026-05-0") for u in uris)

    # damaged: passed over, every remaining index folded (nights 4 and 5 only, the others deleted above)
    (tmp_path / "work" / "map-through-2026-05-04.parquet").write_bytes(b"PAR1 cut")
    assert product_map(layout, "2026-05-06")["product_id"].to_pylist() == [f"p{i:06d}" for i in range(n // 3)]


def test_relabel_older_than_more_days_than_the_calendar_relabels_nothing_for_age():
    """`--relabel-older-than 1000000` (meaning "never") failed the night after sharding it with
    `date value out of range`; no label is older than the calendar, so none is relabelled for its age."""
    snap = _snapshot(make_rows(["a", "b"], "2026-05-01", "Shirts"), "2026-05-01", {"a", "b"})
    for date, days in (("2026-05-02", 1_000_000), ("2026-05-02", 999_999_999), ("0001-01-02", 30)):
        assert selection(snap, {"a", "b"}, set(), {"a", "b"}, "m1", date, days) == (set(), "")
    want, why = selection(snap, {"a", "b"}, set(), {"a", "b"}, "m1", "2026-05-09", 7)  # still works
    assert want == {"a", "b"} and why == "labels older than 7 days"
    # a label exactly 7 days old is not older than 7 days
    assert selection(snap, {"a", "b"}, set(), {"a", "b"}, "m1", "2026-05-08", 7) == (set(), "")


def test_relabel_takes_a_sharded_product_that_never_got_a_label():
    """A night lost after its shards but before its labels leaves products in the shards and not in
    latest: the next night labels them."""
    snap = _snapshot(make_rows(["a", "b"], "2026-05-01", "Shirts"), "2026-05-01", {"a", "b"})
    members = {"a", "b", "c", "d"}
    want, why = selection(snap, {"a", "b", "c", "gone"}, set(), members, "m1", "2026-05-02", None)
    assert (want, why) == ({"c"}, "never labelled")  # not d (never sharded), not gone (left the catalog)


def test_a_copied_night_folder_is_named_not_taken_for_a_night(tmp_path):
    """``shards/night=2026-05-01.bak`` (a copy an operator made) was taken for a night that sorts after its
    own: the next night stopped with "night 2026-05-01.bak started but is not complete: re-run it (same
    command, --date 2026-05-01.bak)", a date the command refuses. It is named, as ``query`` names a copied
    run folder, and moving it out lets the night run."""
    import re
    import shutil

    import pytest

    from fashionlabel import storage
    from fashionlabel.layout import Layout
    from fashionlabel.nightly import run_nightly

    root = tmp_path / "root"
    (root / "shards" / "night=2026-05-01").mkdir(parents=True)
    storage.write_json(str(root / "manifests" / "2026-05-01.json"), {"status": "complete"})
    assert Layout(str(root)).nights() == ["2026-05-01"]
    copy = root / "shards" / "night=2026-05-01.bak"
    shutil.copytree(root / "shards" / "night=2026-05-01", copy)
    named = f"{copy} is not a night folder (shards/night=YYYY-MM-DD): move it out of shards"
    with pytest.raises(ValueError, match=re.escape(named)):
        Layout(str(root)).nights()
    # refused before the night reads its catalog or model (neither is there: it never gets that far)
    with pytest.raises(ValueError, match="is not a night folder"):
        run_nightly(str(tmp_path / "catalog.csv"), str(tmp_path / "model"), str(root), "2026-05-02")
    assert not (root / "manifests" / "2026-05-02.json").exists()


def test_of_two_labels_of_one_night_the_later_one_wins_whichever_source_holds_it():
    """Same night, two runs (a night re-run after its publish): the label made later wins, whether the
    previous snapshot or tonight's rows hold it."""
    members = {"a"}

    def at(t: pa.Table, hour: int) -> pa.Table:
        i = t.schema.get_field_index("labeled_at")
        when = dt.datetime(2026, 5, 2, hour, tzinfo=dt.UTC)
        return t.set_column(i, t.schema.field(i), pa.array([when] * t.num_rows, t.schema.field(i).type))

    early, late = (
        at(make_rows(["a"], "2026-05-02", "Shirts"), 2),
        at(make_rows(["a"], "2026-05-02", "Jeans"), 3),
    )
    for before, tonight in ((early, late), (late, early)):
        first = _snapshot(before, "2026-05-02", members)
        assert _snapshot(tonight, "2026-05-02", members, first)["articleType"].to_pylist() == ["Jeans"]


def test_prune_keeps_the_newest_snapshots_and_the_published_one(tmp_path):
    labels = str(tmp_path / "labels")
    nights = ["2026-05-01", "2026-05-02", "2026-05-03"]
    for night in nights:
        add_night(labels, night, make_rows(["a"], night, "Shirts"), {"a"})
    latest.prune(labels, keep=2)
    assert latest.snapshots(labels) == nights[1:]
    # a night killed between its snapshot's _SUCCESS and the pointer swap: its snapshot is the newest
    # complete one, but readers still read the one before, which prune must not take from under them
    pointer = (tmp_path / "labels" / "latest" / "_CURRENT.json").read_bytes()
    latest.publish(labels, "2026-05-04", latest.read_snapshot(labels, "2026-05-03"))
    (tmp_path / "labels" / "latest" / "_CURRENT.json").write_bytes(pointer)
    latest.prune(labels, keep=1)
    assert latest.snapshots(labels) == ["2026-05-03", "2026-05-04"]
    assert latest.current(labels)["snapshot"] == "2026-05-03"
    assert latest.read_snapshot(labels, "2026-05-03").num_rows == 1


def test_a_copied_snapshot_folder_is_named_not_taken_for_a_snapshot(tmp_path):
    """``latest/snapshots/2026-05-02.bak`` (an operator's copy, its ``_SUCCESS`` in it) sorted after its
    night: the next night merged onto it as the snapshot before, and prune kept it in place of a real one.
    It is named, as copied night and run folders are, and nothing is pruned."""
    import re
    import shutil

    import pytest

    labels = tmp_path / "labels"
    for night in ("2026-05-01", "2026-05-02"):
        add_night(str(labels), night, make_rows(["a"], night, "Shirts"), {"a"})
    copy = labels / "latest" / "snapshots" / "2026-05-02.bak"
    shutil.copytree(labels / "latest" / "snapshots" / "2026-05-02", copy)
    named = f"{copy} is not a snapshot folder (latest/snapshots/YYYY-MM-DD): move it out of snapshots"
    with pytest.raises(ValueError, match=re.escape(named)):
        latest.snapshots(str(labels))
    with pytest.raises(ValueError, match=re.escape(named)):
        latest.prune(str(labels), keep=1)
    assert sorted(p.name for p in copy.parent.iterdir()) == ["2026-05-01", "2026-05-02", "2026-05-02.bak"]
    shutil.rmtree(copy)
    assert latest.snapshots(str(labels)) == ["2026-05-01", "2026-05-02"]


def test_an_empty_snapshot_is_one_file_with_every_column(tmp_path):
    """A snapshot of no product is still a table readers can query: one file with the schema, not none."""
    labels = str(tmp_path / "labels")
    schema = latest.latest_schema(TAX)
    pointer = latest.publish(labels, "2026-05-01", schema.empty_table())
    assert pointer["rows"] == 0 and len(latest.current_files(labels)) == 1
    assert latest.snapshot_schema(labels, "2026-05-01").names == schema.names
