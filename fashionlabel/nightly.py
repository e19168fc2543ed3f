"""``fashionlabel nightly``: one night of incremental labelling, safe to re-run and to kill at any moment.

For a date D and a catalog (img2dataset's incremental mode, applied to a whole night):

1. **shard** only the products that are new or whose image bytes changed (sha256) since the previous
   nights, into ``ROOT/shards/night=D/``. Every night's ``index.parquet`` together is the *product map*:
   product → (night, shard, key, sha256), newest night wins.
2. **label** the night's shards into ``ROOT/labels/history/run_date=D/``; when the model version changed
   (or a label is older than ``relabel_older_than_days``) also relabel every other active product from
   the shard its current image already sits in (nothing is fetched again).
3. **latest**: fold the night into ``ROOT/labels/latest`` (one row per product, newest label wins, products
   gone from the catalog get ``active = false``; :mod:`fashionlabel.latest` publishes it by pointer swap).
4. **report** ``ROOT/reports/D.html`` and **manifest** ``ROOT/manifests/D.json``, written last: a night is
   complete exactly when its manifest says so.

Every step has deterministic output names and skips what is already published, so a night killed half-way
completes on re-run without duplicates, and re-running a complete night changes nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from fashionlabel import latest, settings, storage
from fashionlabel.catalog import CatalogError, Rejected, read_catalog
from fashionlabel.label.pipeline import LabelConfig, label_shards
from fashionlabel.label.writer import part_uris
from fashionlabel.layout import Layout
from fashionlabel.lease import Lease, LeaseHeld
from fashionlabel.relabel import product_map, relabel_products, save_map
from fashionlabel.shards import ShardConfig
from fashionlabel.taxonomy import SUFFIXES, Taxonomy
from fashionlabel.train.export import artifact_spec

log = logging.getLogger(__name__)

# The manifest of a night's own labelling, until its relabelled parts are in too and it becomes _SUCCESS.
# A leading underscore keeps it out of Athena/Hive tables, as _SUCCESS is.
NIGHT_LABELLED = "_NIGHT_LABELLED"


class NightlyError(RuntimeError):
    """A night that cannot run (an earlier night incomplete, unusable root or model)."""


@dataclass(frozen=True)
class NightlyConfig:
    """Settings of one night (:func:`run_nightly`): how it shards, how it labels, what ``latest`` keeps."""

    shard: ShardConfig = field(default_factory=ShardConfig)
    label: LabelConfig = field(default_factory=LabelConfig)
    relabel_older_than_days: int | None = None  # also relabel labels older than this many days
    latest_rows_per_file: int = 1_000_000  # rows per Parquet file of a latest snapshot
    keep_snapshots: int = 7  # latest snapshots kept: a reader holding an older pointer finds its files
    # share of the previous night's active products that may leave the catalog in one night: a truncated
    # export would otherwise mark most of the catalog inactive
    max_catalog_drop: float = 0.5

    def __post_init__(self) -> None:
        settings.check(
            "nightly",
            self,
            {
                "relabel_older_than_days": self.relabel_older_than_days is None
                or self.relabel_older_than_days >= 0,
                "latest_rows_per_file": self.latest_rows_per_file >= 1,
                "keep_snapshots": self.keep_snapshots >= 1,
                "max_catalog_drop": 0 <= self.max_catalog_drop <= 1,
            },
            "relabel older than ≥ 0 days; latest rows per file, snapshots kept ≥ 1; catalog drop 0 to 1",
        )


def _check_label_plan(cfg: LabelConfig) -> None:
    """Refuse labelling settings that this cluster cannot run (``--device cuda`` without a GPU) before the
    night's shards are written, as ``label`` does before it labels."""
    from fashionlabel.label.plan import plan_resources
    from fashionlabel.runtime import cluster_cpus, cluster_gpus

    plan_resources(cfg, cluster_cpus(), cluster_gpus())


# ---- the night ----------------------------------------------------------------------------------
def run_nightly(
    catalog: str, model: str, root: str, date: str | None = None, cfg: NightlyConfig = NightlyConfig()
) -> dict[str, Any]:
    """Run (or finish, or confirm) the night ``date`` for ``catalog`` under ``root``; return its manifest.

    Args:
        catalog: the full catalog as of tonight (CSV / Parquet / JSON Lines, local or s3://).
        model: a model artifact folder; its taxonomy decides the label columns.
        root: the nightly root (local folder or s3:// prefix), see :class:`Layout`.
        date: YYYY-MM-DD (default: today, UTC).
    """
    date = settings.run_date(date)  # a clear error for a malformed date, before anything is written
    layout = Layout(storage.absolute(root))
    # one job per root: a second one (a manual re-run while the scheduled one runs) is refused by name
    try:
        with Lease(layout.lease, f"the nightly root {layout.root}"):
            return _run_night(catalog, model, layout, date, cfg)
    except LeaseHeld as e:
        raise NightlyError(str(e)) from None


def _run_night(catalog: str, model: str, layout: Layout, date: str, cfg: NightlyConfig) -> dict[str, Any]:
    t0 = time.time()
    done = _manifest(layout, date)
    if done.get("status") == "complete":
        asked = artifact_spec(model)["version"]  # a re-run is a no-op for the same model only
        if asked != done["model_version"]:
            raise NightlyError(
                f"night {date} is already complete, labelled by model version {done['model_version']}; "
                f"{model} is version {asked}. One night has one model: run it on the next night, which "
                "relabels every active product"
            )
        log.info("night %s is already complete: nothing to do", date)
        # an attempt killed right after the manifest may have left its scratch
        _drop_scratch(layout, date, cfg.keep_snapshots)
        return done | {"already_complete": True}
    _check_night_order(layout, date)
    spec = artifact_spec(model)  # checked on the driver; the actors build the model
    _check_label_plan(cfg.label)
    taxonomy: Taxonomy = spec["taxonomy_obj"]
    version = spec["version"]

    # read once: the night's membership and its shards come from one read of the catalog (a catalog of
    # millions of rows on S3 was fetched and parsed twice, and an export replaced in between made them differ)
    read = read_catalog(catalog)
    members = _catalog_members(catalog, read[0])
    prev_dates = [s for s in latest.snapshots(layout.labels) if s < date]
    previous = latest.read_snapshot(layout.labels, prev_dates[-1]) if prev_dates else None
    _check_catalog_drop(catalog, members, previous, cfg.max_catalog_drop)
    _check_head_types(previous, taxonomy, model)
    with _stage(date, "sharding the catalog"):
        before = product_map(layout, date)
        shard = _shard_night(layout, date, catalog, taxonomy, cfg.shard, before, read)
    del read  # the rest of the night needs only the ids (``members``), not a million row dicts
    t_shard = time.time()

    # Until the relabelled parts are in too, the night's labelling has a manifest of its own; a re-run after
    # _SUCCESS was written (killed before the night's manifest) keeps that _SUCCESS as it is.
    with _stage(date, "labelling the night's shards"):
        swapped = storage.exists(storage.join(layout.history(date), "_SUCCESS"))
        night = label_shards(
            layout.night_shards(date),
            model,
            layout.labels,
            date,
            cfg.label,
            manifest="_SUCCESS" if swapped else NIGHT_LABELLED,
        )
    with _stage(date, "relabelling"):
        relabel = relabel_products(
            layout,
            date,
            model,
            version,
            previous,
            before,
            shard["night_ids"],
            members,
            cfg.relabel_older_than_days,
            cfg.label,
        )
    t_label = time.time()

    with _stage(date, "publishing latest"):
        history = _read_history(layout, date, taxonomy)
        _assert_unique(history, f"history run_date={date}")
        _complete_run_manifest(layout, date, history, night_ids=shard["night_ids"])
        snap = latest.merge(previous, history, date, members, latest.latest_schema(taxonomy))
        _assert_unique(snap, "latest")
        pointer = latest.publish(layout.labels, date, snap, cfg.latest_rows_per_file)
    # Counts come from the night's history, not from this attempt: a resumed night reports the whole night.
    pids = history["product_id"].to_pylist()
    of_night = sum(p in shard["night_ids"] for p in pids)
    errors = history.num_rows - history["error"].null_count
    done_now = night["labelled"] + night["errored"] + relabel["labelled"] + relabel["errored"]
    seconds = time.time() - t0
    manifest = {
        "run_date": date,
        "status": "complete",
        "catalog": str(catalog),
        "model": str(model),
        "model_version": version,
        "taxonomy_version": taxonomy.version,
        "previous_night": prev_dates[-1] if prev_dates else None,
        "catalog_products": len(members),
        # rows, as ``quarantined`` counts them: with ids repeated, rows - quarantined != products labelled
        "catalog_rows": shard["catalog_rows"],
        "new": shard["new"],
        "changed": shard["changed"],
        "unchanged": shard["unchanged"],
        "quarantined": shard["quarantined"],
        "reasons": shard["reasons"],
        # head -> products packed tonight (every attempt's) whose catalog value the model's taxonomy lacks
        "labels_outside_taxonomy": shard["labels_outside"],
        "sharded": shard["packed"],
        "sharded_this_attempt": shard["packed_this_run"],
        "shards": shard["shards"],
        "labelled": len(pids),
        "labelled_new_or_changed": of_night,
        "relabelled": len(pids) - of_night,
        "errors": errors,
        "relabel_reason": relabel["reason"],
        "labelled_this_attempt": done_now,
        "history_rows": history.num_rows,
        "latest_rows": snap.num_rows,
        "latest_active": int(pc.sum(snap["active"]).as_py() or 0),
        "latest_inactive": snap.num_rows - int(pc.sum(snap["active"]).as_py() or 0),
        "latest_snapshot": pointer["snapshot"],
        "seconds": {
            "shard": t_shard - t0,
            "label": t_label - t_shard,
            "label_first_batch": night["first_batch_seconds"],  # start-up of tonight's labelling run
            "total": seconds,
        },
        "shard_images_per_s": shard["packed_this_run"] / (t_shard - t0),
        "label_images_per_s": done_now / (t_label - t_shard) if done_now else 0.0,
        "config": asdict(cfg),
        "report": layout.report(date),
    }
    with _stage(date, "writing the report and the manifest"):
        _write_report(layout, date, manifest, prev_dates[-1] if prev_dates else None)
        save_map(layout, date, before)  # tomorrow's map starts from it; written before the night is complete
        storage.write_json(layout.manifest(date), manifest)
    _drop_scratch(layout, date, cfg.keep_snapshots)
    return manifest | {"already_complete": False}


@contextlib.contextmanager
def _stage(date: str, what: str) -> Iterator[None]:
    """Note on an error or a stop (Ctrl-C, SIGTERM, ``ray job stop``) from inside the block which stage of
    night ``date`` it came from and how to go on: what is finished is kept, so the same command resumes.
    The command line prints the note after the error (an operator reading a failed job's last line learns
    where it stopped and what to do, not only a storage or Ray error)."""
    try:
        yield
    except BaseException as e:
        if not any(n.startswith("night ") for n in getattr(e, "__notes__", ())):
            how = "stopped" if isinstance(e, KeyboardInterrupt | SystemExit) else "failed"
            e.add_note(
                f"night {date} {how} while {what}; what it finished is kept: the same command (same --date) "
                "resumes the night from there"
                + ("" if how == "stopped" else ", once the error above is dealt with")
            )
        raise


def _drop_scratch(layout: Layout, date: str, keep_snapshots: int) -> None:
    """A complete night's scratch goes: only a re-run of it would need it, and it would grow every night.
    So do ``latest`` snapshots beyond ``keep_snapshots``, only now: until the night is complete its report
    reads the snapshot before it, and a re-run after a kill merges into that one (pruned, with
    ``--keep-snapshots 1``, the re-run would rebuild ``latest`` from tonight's labels alone)."""
    storage.delete_tree(layout.relabel_dir(date))
    storage.delete(layout.map_before(date))
    latest.prune(layout.labels, keep_snapshots)


def _manifest(layout: Layout, date: str) -> dict[str, Any]:
    uri = layout.manifest(date)
    return storage.read_json(uri) if storage.exists(uri) else {}


def _check_night_order(layout: Layout, date: str) -> None:
    """Nights build on each other, in date order: an earlier night that started but never completed must
    finish first, and a night older than one that has run is refused (publishing it would roll ``latest``
    back to older labels)."""
    nights = layout.nights()
    later = [n for n in nights if n > date]
    if later:
        raise NightlyError(
            f"night {date} is older than night {later[-1]}, which has run already: nights run in date "
            f"order, and publishing {date} now would roll latest back to older labels. Run a date after "
            f"{later[-1]}, or use a new --root to start again from {date}"
        )
    for night in nights:
        if night < date and _manifest(layout, night).get("status") != "complete":
            raise NightlyError(
                f"night {night} started but is not complete: re-run it (same command, "
                f"--date {night}) before {date}"
            )


def _catalog_members(catalog: str, rows: list[dict[str, Any]]) -> set[str]:
    """Every product id tonight's catalog (its rows as read) lists; an empty catalog is refused (it would
    retire every product)."""
    members = {str(r["product_id"]) for r in rows if r.get("product_id") not in (None, "")}
    if not members:
        raise CatalogError(f"catalog {catalog} lists no products")
    return members


def _check_catalog_drop(catalog: str, members: set[str], previous: pa.Table | None, max_drop: float) -> None:
    """Refuse a catalog that lacks more than ``max_drop`` of the previous night's active products: far
    more often a truncated export than a retailer retiring most of its catalog overnight."""
    if previous is None or previous.num_rows == 0:
        return
    active = set(previous.filter(previous["active"])["product_id"].to_pylist())
    gone = len(active - members)
    if active and gone / len(active) > max_drop:
        raise NightlyError(
            f"catalog {catalog} lacks {gone:,} of the {len(active):,} products active last night "
            f"({gone / len(active):.0%}, above --max-catalog-drop {max_drop:g}): a truncated export? If "
            "they really left the catalog, re-run with --max-catalog-drop 1"
        )


def _check_head_types(previous: pa.Table | None, taxonomy: Taxonomy, model: str) -> None:
    """Refuse a model with a head of another kind under a name ``latest`` already holds (``season`` once
    single, a string column, now multi, a list): one column cannot hold both, so the night would fail
    once labelled, at the merge into ``latest``, and ``history`` would no longer read as one table."""
    if previous is None:
        return
    want = latest.latest_schema(taxonomy)
    for h in taxonomy.heads:
        for col in (h.name, *(h.name + suffix for suffix in SUFFIXES)):
            if col not in want.names or col not in previous.schema.names:
                continue
            had, has = previous.schema.field(col).type, want.field(col).type
            if not had.equals(has):
                raise NightlyError(
                    f"head {h.name!r} of model {model} is a {h.kind} head, whose column {col!r} is {has}; "
                    f"labels/latest holds {col!r} as {had}, from a head of another kind under that name. "
                    "The labels tables keep a column's type: give the head a new name in the taxonomy, "
                    "shard and train again, and run the night with that model"
                )


def _shard_night(
    layout: Layout,
    date: str,
    catalog: str,
    taxonomy: Taxonomy,
    cfg: ShardConfig,
    before: pa.Table,
    read: tuple[list[dict[str, Any]], list[Rejected]],
) -> dict[str, Any]:
    """Shard the new and changed products of ``catalog`` into the night's folder; counts and membership.

    The product map of the earlier nights is saved as one index (``work/map-before-D.parquet``) and given
    to :func:`shard_catalog` as ``incremental_from``: only products whose id is new or whose image bytes
    changed (sha256) are packed.
    """
    from fashionlabel.shards import PlanMismatchError, ShardJobError, shard_catalog
    from fashionlabel.shards.job import fmt_reasons

    out = layout.night_shards(date)
    prev = None
    if before.num_rows:
        prev = layout.map_before(date)
        if not storage.exists(prev):  # written once: a re-run must see the same previous index
            storage.write_parquet(before, prev)
    # The failure-rate guard applies to the whole catalog, not to tonight's (small) share of it. A label
    # value the model's taxonomy lacks does not keep a product from being labelled: labelling reads no label
    # column, so such a product is packed with that head unlabelled, and counted.
    night_cfg = dataclasses.replace(cfg, max_failure_rate=1.0, keep_outside_labels=True)
    # last night's quarantine: its products come back tonight (they are in no night's index), and those
    # whose images a host still answers with an error must not read as the host being down, night after night
    earlier = [n for n in layout.nights() if n < date]
    failed = storage.join(layout.night_shards(earlier[-1]), "quarantine.parquet") if earlier else None
    try:
        s = shard_catalog(
            catalog, out, taxonomy, night_cfg, incremental_from=prev, catalog_read=read, failed_before=failed
        )
    except PlanMismatchError as e:
        # the night has no --out to change: name what differs and the two ways on (the taxonomy is the
        # model's: a night started with one model and re-run with a retrained one)
        raise NightlyError(
            f"night {date} started with {e.what} and is not complete: re-run it with the catalog, shard "
            "settings (--samples-per-shard, --max-side) and model it started with, or start the night again "
            f"from this catalog and model by deleting {out}, {layout.history(date)} and "
            f"{layout.relabel_dir(date)} first"
        ) from None
    total = s.catalog_rows
    if total and s.quarantined / total > cfg.max_failure_rate:
        raise ShardJobError(
            f"{s.quarantined}/{total} catalog rows quarantined ({fmt_reasons(s.reasons)}), above "
            f"--max-failure-rate {cfg.max_failure_rate} (the quarantine is in {out}/quarantine.parquet; to "
            "publish the night anyway, re-run with a higher --max-failure-rate)"
        )
    night_ids = set(
        storage.read_parquet(storage.join(out, "index.parquet"), columns=["product_id"])[
            "product_id"
        ].to_pylist()
    )
    known = set(before["product_id"].to_pylist())
    # new / changed count packed products; rows selected but rejected (no image, ...) are in quarantined.
    return {
        "new": len(night_ids - known),
        "changed": len(night_ids & known),
        "unchanged": s.unchanged,
        "packed": s.packed,
        "packed_this_run": s.packed_this_run,
        "shards": s.shards,
        "quarantined": s.quarantined,
        "reasons": dict(s.reasons),
        "labels_outside": dict(s.labels_outside),
        "catalog_rows": s.catalog_rows,
        "night_ids": night_ids,
    }


def _complete_run_manifest(layout: Layout, date: str, history: pa.Table, night_ids: set[str]) -> None:
    """Write the run folder's ``_SUCCESS`` once the relabelled parts are in beside the night's own: the
    manifest of the night's labelling (``NIGHT_LABELLED``) with counts of every row of the folder. Only
    then does the folder count as a finished night for readers (the ``nights`` view, Athena)."""
    labelled, success = (storage.join(layout.history(date), n) for n in (NIGHT_LABELLED, "_SUCCESS"))
    source = labelled if storage.exists(labelled) else success  # a re-run after the swap below
    errored = history.num_rows - history["error"].null_count
    of_night = sum(p in night_ids for p in history["product_id"].to_pylist())
    storage.write_json(
        success,
        storage.read_json(source)
        | {
            "rows": history.num_rows,
            "labelled": history.num_rows - errored,
            "errored": errored,
            "relabelled": history.num_rows - of_night,
            "files": len(part_uris(layout.history(date))),
        },
    )
    if source == labelled:
        storage.delete(labelled)


def _read_history(layout: Layout, date: str, taxonomy: Taxonomy) -> pa.Table:
    from fashionlabel.label.schema import labels_schema

    schema = labels_schema(taxonomy)
    files = part_uris(layout.history(date))
    return (
        pa.concat_tables([storage.read_parquet(f, schema=schema) for f in files])
        if files
        else schema.empty_table()
    )


def _assert_unique(t: pa.Table, what: str) -> None:
    n = pc.count_distinct(t["product_id"]).as_py() if t.num_rows else 0
    if n != t.num_rows:
        raise NightlyError(f"{what}: {t.num_rows} rows but {n} distinct products")


def _write_report(layout: Layout, date: str, manifest: dict[str, Any], previous: str | None) -> None:
    from fashionlabel.report import write_night_report

    write_night_report(layout.labels, date, layout.report(date), manifest, previous)
