"""The shard job on the driver: read and check the catalog, plan, run one Ray task per shard to pack,
merge the index and quarantine parts, write ``stats.json`` (with the taxonomy, so training needs nothing
but the shard folder).
"""

from __future__ import annotations

import difflib
import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from fashionlabel import storage
from fashionlabel.catalog import CatalogRow, Rejected, check_ids, check_labels, read_catalog
from fashionlabel.lease import Lease
from fashionlabel.shards.pack import pack_shard
from fashionlabel.shards.plan import check_previous_index, make_plan, previous_failures
from fashionlabel.shards.spec import (
    QUARANTINE_SCHEMA,
    ShardConfig,
    ShardJobError,
    ShardWriteError,
    index_schema,
    ray_get,
    shard_name,
)
from fashionlabel.taxonomy import Taxonomy

log = logging.getLogger(__name__)

# held in _parts/ by the job packing the output
LEASE = "_shard.lease"


@dataclass
class ShardSummary:
    """What a shard job did, as :func:`shard_catalog` returns it and ``stats.json`` records it."""

    catalog_rows: int  # malformed lines included
    packed: int  # products in the index, this run's and earlier attempts'
    quarantined: int
    reasons: dict[str, int]  # quarantine reason -> rows, most frequent first
    shards: int  # tars written (a planned shard whose every row was quarantined has none)
    shards_skipped: int  # tars an earlier attempt had already finished
    seconds: float  # wall time of this run
    out: str
    new: int = 0  # the plan's counts; without ``incremental_from`` every planned row is new
    changed: int = 0
    unchanged: int = 0
    incremental_from: str | None = None
    packed_this_run: int = 0  # products packed by this attempt (a re-run skips finished shards)
    # head -> why it has no labels: its column is in no catalog row (a typo, a renamed export column)
    missing_columns: dict[str, str] = field(default_factory=dict)
    # head -> products in the index (this run's and earlier attempts', as ``packed``) packed without their
    # catalog label, a value the taxonomy lacks (kept, not quarantined, with ``ShardConfig.keep_outside_labels``)
    labels_outside: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def images_per_s(self) -> float:
        """Products packed by this run per wall-clock second."""
        return self.packed_this_run / self.seconds if self.seconds else 0.0


def fmt_reasons(reasons: dict[str, int]) -> str:
    """``reason count, …`` in the order given (the summaries keep the most frequent first)."""
    return ", ".join(f"{k} {v}" for k, v in reasons.items()) or "none"


def missing_columns(rows: list[dict], taxonomy: Taxonomy) -> dict[str, str]:
    """Heads whose catalog column no row has (a typo, a renamed export column), each with what to say:
    the column and the catalog's nearest one. Not an error: a catalog to label needs no label columns.
    The first row answers for CSV and Parquet; only a sparse JSON Lines catalog makes it look further."""
    first = rows[0] if rows else {}
    gone = [h for h in taxonomy.heads if h.column not in first]
    gone = [h for h in gone if not any(h.column in r for r in rows)]
    out = {}
    for h in gone:
        near = difflib.get_close_matches(h.column, [str(c) for c in first], n=1, cutoff=0.6)
        hint = f" (nearest: {near[0]!r})" if near else ""
        out[h.name] = f"column {h.column!r} is not in the catalog{hint}"
    return out


def _check_output(out: str) -> None:
    """Create ``out`` (a local folder; nothing to create on S3) and check that it is writable before any
    fetch, by name."""
    try:
        storage.makedirs(out)
        # the probe goes under _parts/: on S3 the folder marker its deletion may leave stays out of sight
        storage.check_writable(storage.join(out, "_parts", "output"))
    except (OSError, storage.StorageError) as e:
        raise ShardJobError(f"cannot use output {out}: {storage.redact(e)}") from e


def _done_markers(out: str) -> set[str]:
    """The completion markers already in ``out`` whose shard is still there."""
    try:
        parts = storage.join(out, "_parts")
        done = set(storage.listdir(parts, ".parquet"))
        tars = set(storage.listdir(out, ".tar"))
        # A marker says its tar was published; a tar deleted since (or never copied with the folder) must be
        # packed again, not skipped as done. A marker of no rows is a shard whose every row was quarantined:
        # it has no tar to lose.
        lost = {
            m
            for m in done
            if m.startswith("shard-")
            and m.count(".") == 1
            and f"{m.removesuffix('.parquet')}.tar" not in tars
            and storage.read_parquet(storage.join(parts, m), columns=["product_id"]).num_rows
        }
        if lost:
            log.warning("%d shard(s) marked done have no tar, packed again: %s", len(lost), sorted(lost)[:5])
        return done - lost
    except (OSError, storage.StorageError) as e:
        raise ShardJobError(f"cannot use output {out}: {storage.redact(e)}") from e


def shard_catalog(
    catalog: str,
    out: str,
    taxonomy: Taxonomy,
    cfg: ShardConfig = ShardConfig(),
    incremental_from: str | None = None,
    catalog_read: tuple[list[dict[str, Any]], list[Rejected]] | None = None,
    failed_before: str | None = None,
) -> ShardSummary:
    """Pack ``catalog`` into shards under ``out`` with Ray tasks. Re-runnable: finished shards are kept.

    Args:
        catalog: CSV / Parquet / JSON Lines catalog, local path or ``s3://`` URI.
        out: output folder or ``s3://`` prefix.
        taxonomy: label columns are validated against it; it is saved in ``stats.json``.
        cfg: packing settings.
        incremental_from: a previous shards folder (or its ``index.parquet``): pack only products that are
            new, whose source bytes changed (sha256) or whose labels changed.
        catalog_read: ``read_catalog(catalog)`` when the caller has read it already (a night reads it for
            its membership): a catalog of millions of rows on S3 is then fetched and parsed once, and the
            products packed are those of the catalog the caller saw. ``catalog`` still resolves relative
            image paths and names the catalog in messages.
        failed_before: the ``quarantine.parquet`` of the run before (default: the one in the
            ``incremental_from`` folder). Its products are packed again, and quarantined again if their
            images still fail, but those failures never count as the source being down.
    """
    import ray

    t0 = time.time()
    warm = _warm_workers()  # workers import this module while the driver reads the catalog
    out = storage.absolute(out)
    incremental_from = storage.absolute(incremental_from) if incremental_from else None
    if incremental_from:  # a typo is refused before anything is written
        check_previous_index(incremental_from)
        if failed_before is None and not str(incremental_from).endswith(".parquet"):
            failed_before = storage.join(incremental_from, "quarantine.parquet")
    known_failures = previous_failures(failed_before)
    rows, malformed = read_catalog(catalog) if catalog_read is None else catalog_read
    missing = missing_columns(rows, taxonomy)
    valid, rejected = check_ids(rows, catalog)  # label checks run in the tasks: the driver stays light
    catalog_rows = len(rows) + len(malformed)
    del rows  # the rejected rows' dicts go now; the valid ones live on in ``valid``
    rejected = malformed + rejected
    log.info(
        "catalog %s: %d rows read and checked in %.0f s (%d valid); planning",
        catalog,
        catalog_rows,
        time.time() - t0,
        len(valid),
    )
    _check_output(out)
    # one shard job per output: a second one (the same command run again while the first still runs) packed
    # every shard again, and the first to finish deleted the other's tars in progress from _tmp/
    with Lease(storage.join(out, "_parts", LEASE), f"sharding into {out}"):
        # under the lease, no other job writes here: a temporary file is what a killed attempt left
        for folder in (out, storage.join(out, "_parts")):
            storage.drop_temporaries(folder)
        done = _done_markers(out)
        t_read = time.time() - t0
        plan = make_plan(valid, out, cfg, taxonomy, incremental_from)
        t_plan = time.time() - t0 - t_read
        schema = index_schema(taxonomy)
        todo = [(i, rs) for i, rs in enumerate(plan.shards) if f"{shard_name(i)}.parquet" not in done]
        log.info(
            "catalog %s: %d rows, %d valid, %d rejected before fetch; %s; %d shards, %d to pack",
            catalog,
            catalog_rows,
            len(valid),
            len(rejected),
            plan.counts,
            len(plan.shards),
            len(todo),
        )
        t_tasks = time.time()
        packed_now, blanked, task_cpu, span = _run_tasks(todo, out, cfg, schema, taxonomy, known_failures)
        ray.get(warm)

        t_merge = time.time()
        index, quarantine = _merge(out, len(plan.shards), schema, rejected)
        if cfg.keep_outside_labels:
            blanked += _blanked_before(plan.shards, done, index, taxonomy)
        storage.write_parquet(index, storage.join(out, "index.parquet"))
        storage.write_parquet(quarantine, storage.join(out, "quarantine.parquet"))
        storage.clean_staging(out)
        t_merge = time.time() - t_merge
        reasons = dict(Counter(quarantine.column("reason").to_pylist()).most_common())
        # A planned shard whose every row was quarantined leaves no tar: count the tars there are.
        tars = set(index.column("shard").to_pylist())
        seconds = time.time() - t0
        summary = ShardSummary(
            catalog_rows=catalog_rows,
            packed=index.num_rows,
            quarantined=quarantine.num_rows,
            reasons=reasons,
            shards=len(tars),
            shards_skipped=len({t for t in tars if f"{t}.parquet" in done}),
            seconds=seconds,
            out=str(out),
            incremental_from=incremental_from,
            **plan.counts,
            packed_this_run=packed_now,
            missing_columns=missing,
            labels_outside=dict(blanked.most_common()),
            timings={
                "read_validate_s": t_read,
                "plan_s": t_plan,
                "tasks_cpu_s": task_cpu,
                "first_task_start_s": span[0] - t_tasks,
                "tasks_wall_s": span[1] - span[0],
                "merge_s": t_merge,
                "total_s": seconds,
            },
        )
        # The taxonomy travels with the shards, so training needs nothing but this folder.
        stats = asdict(summary) | {
            "images_per_s": summary.images_per_s,
            "taxonomy": taxonomy.to_dict(),
            "taxonomy_version": taxonomy.version,
            "config": asdict(cfg),
        }
        storage.write_json(storage.join(out, "stats.json"), stats)
        # of the whole catalog, as a night's: with --incremental, the unchanged products are good rows too,
        # and a few broken images packed again each run were "4/4 rows quarantined" and failed every run
        total = summary.packed + summary.quarantined + summary.unchanged
        if total and summary.quarantined / total > cfg.max_failure_rate:
            top = next(iter(summary.reasons))
            example = quarantine.filter(pc.equal(quarantine.column("reason"), top)).slice(0, 1).to_pylist()[0]
            raise ShardJobError(
                f"{summary.quarantined}/{total} rows quarantined ({fmt_reasons(summary.reasons)}), above "
                f"--max-failure-rate {cfg.max_failure_rate}, e.g. product {example['product_id']!r}: {top}, "
                f"{(example['detail'] or '')[:300]}; why each row is in "
                f"{storage.join(out, 'quarantine.parquet')}. This output keeps them quarantined (a re-run skips its "
                "finished shards): once the catalog, its images or the taxonomy are fixed, shard into a new --out, "
                "or accept them with a higher --max-failure-rate"
            )
        return summary


def _warm_up() -> None:
    """Runs in a worker: unpickling this function imports the packing code (PIL, pyarrow, taxonomy)."""


def _warm_workers() -> list:
    import ray

    cpus = int(ray.available_resources().get("CPU", 1))
    task = ray.remote(num_cpus=1)(_warm_up)
    return [task.remote() for _ in range(max(1, min(cpus, 64)))]


def _pack_task(
    shard_id: int,
    rows: list,
    out: str,
    cfg: ShardConfig,
    schema: pa.Schema,
    taxonomy: Taxonomy,
    failed_before: frozenset[tuple[str, str]],
) -> dict:
    """The Ray task: :func:`pack_shard`, once this node sees the plan the driver saved in ``out``."""
    storage.require_on_this_node(out, "_parts/_plan.json", "output folder")
    try:
        return pack_shard(shard_id, rows, out, cfg, schema, taxonomy, failed_before)
    except OSError as e:  # images that cannot be read are quarantined inside: this is the output's fault
        raise ShardWriteError(e.errno, f"cannot write {shard_name(shard_id)} into {out}: {e}") from e


def _run_tasks(
    todo: list[tuple[int, list[CatalogRow]]],
    out: str,
    cfg: ShardConfig,
    schema: pa.Schema,
    taxonomy: Taxonomy,
    failed_before: frozenset[tuple[str, str]] = frozenset(),
) -> tuple[int, Counter[str], float, tuple[float, float]]:
    """One Ray task per shard; progress logged every few seconds; a task that fails for good fails the job.
    Each task is given the rows of ``failed_before`` (:func:`previous_failures`) that it packs.

    Returns the number of products packed, those packed without a label per head (a value the taxonomy
    lacks, with ``keep_outside_labels``), the CPU seconds the tasks used and (first start, last end).
    """
    import ray

    now = time.time()
    blanked: Counter[str] = Counter()
    if not todo:
        return 0, blanked, 0.0, (now, now)
    # named for what it does, in Ray's dashboard and its workers' process titles (ray::pack_shard)
    task = ray.remote(num_cpus=1, max_retries=3, retry_exceptions=[OSError])(_pack_task).options(
        name="pack_shard"
    )
    cfg_ref, schema_ref, tax_ref = ray.put(cfg), ray.put(schema), ray.put(taxonomy)
    pending = [
        task.remote(
            i,
            rs,
            out,
            cfg_ref,
            schema_ref,
            tax_ref,
            frozenset(k for k in ((r.product_id, r.image_uri) for r in rs) if k in failed_before),
        )
        for i, rs in todo
    ]
    total_rows = sum(len(rs) for _, rs in todo)
    finished = rows_done = packed = 0
    cpu = 0.0
    span = [float("inf"), 0.0]
    t_start, last = time.time(), time.time()
    while pending:
        ready, pending = ray.wait(pending, num_returns=len(pending), timeout=2.0)
        for r in ray_get(ready):  # raises if a task failed for good (e.g. output became unwritable)
            finished += 1
            packed += r["packed"]
            blanked.update(r["blanked"])
            rows_done += r["packed"] + r["rejected"]
            cpu += r["cpu_s"]
            span = [min(span[0], r["start"]), max(span[1], r["end"])]
        if time.time() - last > 5 or not pending:
            log.info(
                "shard: %s",
                progress_line(finished, len(todo), rows_done, total_rows, packed, time.time() - t_start),
            )
            last = time.time()
    return packed, blanked, cpu, (span[0], span[1])


def progress_line(
    finished: int, shards: int, rows_done: int, total_rows: int, packed: int, elapsed: float
) -> str:
    """One progress line of a shard run.

    Products are counted when their shard finishes, so until the first one does there is no rate to
    project from: the line says so instead of "0 img/s, eta nan s", which read as a stalled job.

    Args:
        finished: shards done of ``shards`` to pack this run.
        rows_done: catalog rows of the finished shards (packed or rejected), of ``total_rows``.
        packed: products packed so far.
        elapsed: seconds since packing started.
    """
    head = f"{finished}/{shards} shards, {rows_done}/{total_rows} products ({packed} packed)"
    if not rows_done:
        return f"{head}, {elapsed:.0f} s in; rate and eta once the first shard is done"
    rate = rows_done / max(elapsed, 1e-9)
    return f"{head}, {rate:.0f} img/s, eta {(total_rows - rows_done) / rate:.0f} s"


def _blanked_before(
    shards: list[list[CatalogRow]], done: set[str], index: pa.Table, taxonomy: Taxonomy
) -> Counter[str]:
    """Head -> products of the shards an earlier attempt finished that were packed without their label (a
    value the taxonomy lacks), counted again from the catalog rows: only the tasks that ran now report
    theirs, and a night killed after sharding would otherwise report none of its new values. The rows are
    the plan's (the same catalog, or the plan is refused); only products in the index count, as in a task."""
    blanked: Counter[str] = Counter()
    earlier = [rs for i, rs in enumerate(shards) if f"{shard_name(i)}.parquet" in done]
    if not earlier:
        return blanked
    packed = set(index.column("product_id").to_pylist())
    for rows in earlier:
        for row in rows:
            if row.product_id in packed:
                r = check_labels(row, taxonomy, keep_outside=True)
                if not isinstance(r, Rejected):
                    blanked.update(r.blanked)
    return blanked


def _merge(
    out: str, n_shards: int, schema: pa.Schema, catalog_rejects: list[Rejected]
) -> tuple[pa.Table, pa.Table]:
    parts = storage.join(out, "_parts")
    index = [
        storage.read_parquet(storage.join(parts, f"{shard_name(i)}.parquet"), schema=schema)
        for i in range(n_shards)
    ]
    quarantine = [pa.Table.from_pylist([r.as_row() for r in catalog_rejects], schema=QUARANTINE_SCHEMA)]
    quarantine += [
        storage.read_parquet(
            storage.join(parts, f"{shard_name(i)}.quarantine.parquet"), schema=QUARANTINE_SCHEMA
        )
        for i in range(n_shards)
    ]
    return (pa.concat_tables(index) if index else schema.empty_table(), pa.concat_tables(quarantine))
