"""Catalog → WebDataset shards + index.parquet + quarantine.parquet + stats.json, on Ray tasks.

Like img2dataset: the valid rows of the catalog are cut, in catalog order, into fixed-size groups; group i
becomes ``shard-{i:06d}.tar``, packed by one Ray task (shard-sized tasks amortise Ray's per-task cost; no
per-image remote calls). The plan is deterministic and is saved (``_parts/_plan.*``) with a fingerprint of
the catalog and the settings, so a re-run rebuilds exactly the same shards and skips every shard whose
completion marker (``_parts/shard-i.parquet``, its index rows, published *after* the tar) exists. A tar is
written to a staging file and published by rename/upload, so readers never see a partial shard.

Incremental mode (img2dataset's ``incremental_mode``, keyed by content instead of by file name): given the
index of a previous run, products whose id is new are packed, products already indexed are fingerprinted
first (sha256 of the source bytes and their labels, in Ray tasks) and packed only when either changed.

Every rejected row lands in quarantine with a stable reason (``catalog.REASONS``); the job fails only when
it cannot proceed (no catalog, no access to the output) or when the rejected share exceeds
``max_failure_rate``.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import tarfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from fashionlabel import storage
from fashionlabel.catalog import (
    CatalogRow,
    FetchError,
    OutageBreaker,
    Rejected,
    SourceUnavailable,
    check_ids,
    check_labels,
    fetch,
    read_catalog,
)
from fashionlabel.images import ImageReject, normalise
from fashionlabel.settings import check
from fashionlabel.tarwriter import TarWriter
from fashionlabel.taxonomy import Taxonomy

log = logging.getLogger(__name__)

QUARANTINE_SCHEMA = pa.schema(
    [
        ("product_id", pa.string()),
        ("image_uri", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
    ]
)
PLAN_SCHEMA = pa.schema([("product_id", pa.string()), ("status", pa.string())])


@dataclass(frozen=True)
class ShardConfig:
    samples_per_shard: int = 1000
    max_side: int = 256
    jpeg_quality: int = 90
    max_pixels: int = 40_000_000
    min_side: int = 8
    max_failure_rate: float = 0.5

    def __post_init__(self) -> None:
        check(
            "shard",
            self,
            {
                "samples_per_shard": self.samples_per_shard >= 1,
                "max_side": self.max_side >= self.min_side,
                "jpeg_quality": 1 <= self.jpeg_quality <= 100,
                "max_pixels": self.max_pixels >= 1,
                "min_side": self.min_side >= 1,
                "max_failure_rate": 0 <= self.max_failure_rate <= 1,
            },
            "samples per shard, min side ≥ 1; max side ≥ min side; JPEG quality 1–100; "
            "0 ≤ max failure rate ≤ 1",
        )


class ShardJobError(RuntimeError):
    """The shard job cannot proceed or failed past its allowed failure rate."""


def shard_name(i: int) -> str:
    return f"shard-{i:06d}"


def index_schema(taxonomy: Taxonomy) -> pa.Schema:
    fields = [
        ("key", pa.string()),
        ("product_id", pa.string()),
        ("shard", pa.string()),
        ("image_uri", pa.string()),
        ("sha256", pa.string()),
        ("bytes", pa.int64()),
        ("orig_width", pa.int32()),
        ("orig_height", pa.int32()),
        ("width", pa.int32()),
        ("height", pa.int32()),
    ]
    for h in taxonomy.heads:
        fields.append((h.name, pa.string() if h.kind == "single" else pa.list_(pa.string())))
    return pa.schema(fields)


# ---- one shard (runs inside a Ray task) ----------------------------------------------------------
def pack_row(r: CatalogRow, shard: str, cfg: ShardConfig) -> tuple[bytes, bytes, dict[str, Any]]:
    """Fetch and normalise one checked row: (JPEG, JSON sidecar, index row). Raises ``FetchError`` or
    ``ImageReject`` with the quarantine reason."""
    src = fetch(r.image_uri)
    jpg, (ow, oh), (w, h) = normalise(
        src, max_side=cfg.max_side, quality=cfg.jpeg_quality, max_pixels=cfg.max_pixels, min_side=cfg.min_side
    )
    sha = hashlib.sha256(src).hexdigest()
    meta = {
        "product_id": r.product_id,
        "labels": r.labels,
        "source_uri": r.image_uri,
        "sha256": sha,
        "orig_size": [ow, oh],
        "meta": r.meta,
    }
    index = {
        "key": r.key,
        "product_id": r.product_id,
        "shard": shard,
        "image_uri": r.image_uri,
        "sha256": sha,
        "bytes": len(src),
        "orig_width": ow,
        "orig_height": oh,
        "width": w,
        "height": h,
        **r.labels,
    }
    return jpg, json.dumps(meta, ensure_ascii=False).encode(), index


def pack_shard(
    shard_id: int, rows: list[CatalogRow], out: str, cfg: ShardConfig, schema: pa.Schema, taxonomy: Taxonomy
) -> dict[str, Any]:
    """Check labels, fetch, normalise and pack ``rows`` into one tar; publish it and its index part."""
    name = shard_name(shard_id)
    t0, cpu0 = time.time(), time.thread_time()
    index, rejected = [], []
    outages = OutageBreaker(len(rows), name)
    tmp = storage.staging_dir(out) / f"{name}.{time.time_ns()}.tar.tmp"
    try:
        with TarWriter(open(tmp, "wb")) as tar:  # noqa: SIM115 - the writer closes it
            for row in rows:
                r = check_labels(row, taxonomy)
                if isinstance(r, Rejected):
                    rejected.append(r.as_row())
                    continue
                try:
                    jpg, sidecar, entry = pack_row(r, name, cfg)
                except (FetchError, ImageReject) as e:
                    if isinstance(e, FetchError):
                        outages.record(e, r.image_uri)  # raises past a few: the source is down
                    rejected.append(Rejected(r.product_id, r.image_uri, e.reason, e.detail).as_row())
                    continue
                except Exception as e:  # noqa: BLE001 - one odd row never fails a shard; the detail says why
                    log.warning("unexpected error on %s", r.product_id, exc_info=True)
                    rejected.append(
                        Rejected(
                            r.product_id,
                            r.image_uri,
                            "processing_error",
                            f"{type(e).__name__}: {str(e)[:200]}",
                        ).as_row()
                    )
                    continue
                tar.add(f"{r.key}.jpg", jpg)
                tar.add(f"{r.key}.json", sidecar)
                index.append(entry)
        if index:
            storage.publish_file(tmp, storage.join(out, f"{name}.tar"))
        else:  # a killed earlier attempt may have published this tar before its marker
            storage.delete(storage.join(out, f"{name}.tar"))
    finally:
        tmp.unlink(missing_ok=True)
    # The index part is the completion marker: written last, so its presence means the tar is complete.
    storage.write_parquet(
        pa.Table.from_pylist(rejected, schema=QUARANTINE_SCHEMA),
        storage.join(out, "_parts", f"{name}.quarantine.parquet"),
    )
    storage.write_parquet(
        pa.Table.from_pylist(index, schema=schema), storage.join(out, "_parts", f"{name}.parquet")
    )
    return {
        "shard": name,
        "packed": len(index),
        "rejected": len(rejected),
        "start": t0,
        "end": time.time(),
        "cpu_s": time.thread_time() - cpu0,
    }


def _labels_key(labels: dict[str, Any]) -> str:
    """One comparable string for a product's labels (as the index stores them)."""
    return json.dumps({k: v for k, v in labels.items() if v not in (None, [])}, sort_keys=True)


def fingerprint_rows(
    rows: list[CatalogRow], taxonomy: Taxonomy, heads: list[str]
) -> list[tuple[str, str | None, str | None]]:
    """(product_id, sha256 of the source bytes, key of the labels of ``heads``) per row; None when the
    source cannot be fetched or the labels are rejected (the row is then packed again, so the pack task
    quarantines it)."""
    out = []
    outages = OutageBreaker(len(rows), "the known products' hash pass")
    for r in rows:
        try:
            sha = hashlib.sha256(fetch(r.image_uri)).hexdigest()
        except FetchError as e:
            outages.record(e, r.image_uri)  # a source that is down does not make every product "changed"
            sha = None
        v = check_labels(r, taxonomy)
        key = None if isinstance(v, Rejected) else _labels_key({h: v.labels.get(h) for h in heads})
        out.append((r.product_id, sha, key))
    return out


# ---- the plan -----------------------------------------------------------------------------------
@dataclass
class Plan:
    shards: list[list[CatalogRow]]
    counts: dict[str, int]  # new / changed / unchanged


def _fingerprint(valid: list[CatalogRow], cfg: ShardConfig, taxonomy: Taxonomy, prev: str | None) -> str:
    h = hashlib.sha256()
    packing = {k: v for k, v in asdict(cfg).items() if k != "max_failure_rate"}
    h.update(json.dumps([packing, taxonomy.version, prev], sort_keys=True).encode())
    for r in valid:
        h.update("\x1f".join([r.product_id, r.image_uri, *map(str, r.raw.values()), "\x1e"]).encode())
    return h.hexdigest()


def previous_index(prev: str, taxonomy: Taxonomy) -> tuple[dict[str, tuple[str, str]], list[str]]:
    """product_id → (sha256, labels key) from a previous run's ``index.parquet`` (``prev``: its folder or
    the file), and the taxonomy heads it holds. Only those heads are compared: an index without label
    columns (a product map) compares image bytes alone."""
    uri = prev if str(prev).endswith(".parquet") else storage.join(prev, "index.parquet")
    try:
        names = set(storage.read_parquet_schema(uri).names)
        heads = [h.name for h in taxonomy.heads if h.name in names]
        t = storage.read_parquet(uri, columns=["product_id", "sha256", *heads])
    except (OSError, pa.ArrowException) as e:
        raise ShardJobError(f"cannot read the previous index {uri}: {storage._clean(e)}") from e
    cols = {h: t.column(h).to_pylist() for h in heads}
    before = {
        pid: (sha, _labels_key({h: cols[h][i] for h in heads}))
        for i, (pid, sha) in enumerate(
            zip(t.column("product_id").to_pylist(), t.column("sha256").to_pylist(), strict=True)
        )
    }
    return before, heads


def _select_incremental(
    valid: list[CatalogRow], prev: str, chunk: int, taxonomy: Taxonomy
) -> tuple[list[CatalogRow], list[str]]:
    """The rows to pack (new, or changed: other source bytes or other labels; in catalog order) and their
    status. Known products are fingerprinted in Ray tasks (one fetch each), the driver only compares."""
    import ray

    before, heads = previous_index(prev, taxonomy)
    known = [r for r in valid if r.product_id in before]
    task = ray.remote(num_cpus=1, max_retries=3)(fingerprint_rows)
    tax_ref = ray.put(taxonomy)
    refs = [task.remote(known[s : s + chunk], tax_ref, heads) for s in range(0, len(known), chunk)]
    now = {pid: (sha, labels) for part in _get(refs) for pid, sha, labels in part}
    log.info("incremental: fingerprinted %d known products against %s", len(known), prev)
    rows, status = [], []
    for r in valid:
        old = before.get(r.product_id)
        if old is None:
            rows.append(r)
            status.append("new")
        elif now[r.product_id] != old:
            rows.append(r)
            status.append("changed")
    return rows, status


def make_plan(
    valid: list[CatalogRow],
    out: str,
    cfg: ShardConfig,
    taxonomy: Taxonomy,
    incremental_from: str | None = None,
) -> Plan:
    """The deterministic shard plan: reused from ``out/_parts/_plan.*`` when a previous attempt saved one.

    A saved plan from a different catalog or different settings is refused rather than mixed into the
    same output folder.
    """
    fp = _fingerprint(valid, cfg, taxonomy, incremental_from)
    meta_uri = storage.join(out, "_parts", "_plan.json")
    rows_uri = storage.join(out, "_parts", "_plan.parquet")
    if storage.exists(meta_uri):
        saved = storage.read_json(meta_uri)
        if saved.get("fingerprint") != fp:
            raise ShardJobError(f"{out} holds shards of a different catalog or settings; use a new --out")
        t = storage.read_parquet(rows_uri, schema=PLAN_SCHEMA)
        by_id = {r.product_id: r for r in valid}
        rows = [by_id[p] for p in t.column("product_id").to_pylist()]
        counts = saved["counts"]
    else:
        if incremental_from:
            rows, status = _select_incremental(
                valid, incremental_from, max(cfg.samples_per_shard, 1000), taxonomy
            )
        else:
            rows, status = valid, ["new"] * len(valid)
        c = Counter(status)
        counts = {"new": c["new"], "changed": c["changed"], "unchanged": len(valid) - len(rows)}
        storage.write_parquet(
            pa.table({"product_id": [r.product_id for r in rows], "status": status}, schema=PLAN_SCHEMA),
            rows_uri,
        )
        storage.write_json(
            meta_uri,
            {
                "fingerprint": fp,
                "counts": counts,
                "rows": len(rows),
                "samples_per_shard": cfg.samples_per_shard,
            },
        )  # written last
    n = cfg.samples_per_shard
    return Plan([rows[s : s + n] for s in range(0, len(rows), n)], counts)


# ---- the job ------------------------------------------------------------------------------------
@dataclass
class ShardSummary:
    catalog_rows: int
    packed: int
    quarantined: int
    reasons: dict[str, int]
    shards: int  # tars written (a planned shard whose every row was quarantined has none)
    shards_skipped: int
    seconds: float
    out: str
    new: int = 0
    changed: int = 0
    unchanged: int = 0
    incremental_from: str | None = None
    packed_this_run: int = 0  # products packed by this attempt (a re-run skips finished shards)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def images_per_s(self) -> float:
        return self.packed_this_run / self.seconds if self.seconds else 0.0


def _open_output(out: str) -> set[str]:
    """Check that ``out`` is writable before any fetch; return the completion markers already there."""
    try:
        storage.makedirs(out)
        probe = storage.join(out, "_parts", ".write-probe")
        storage.write_bytes(probe, b"")
        storage.delete(probe)
        return set(storage.listdir(storage.join(out, "_parts"), ".parquet"))
    except (OSError, storage.StorageError) as e:
        raise ShardJobError(f"cannot use output {out}: {storage._clean(e)}") from e


def shard_catalog(
    catalog: str,
    out: str,
    taxonomy: Taxonomy,
    cfg: ShardConfig = ShardConfig(),
    incremental_from: str | None = None,
) -> ShardSummary:
    """Pack ``catalog`` into shards under ``out`` with Ray tasks. Re-runnable: finished shards are kept.

    Args:
        catalog: CSV / Parquet / JSON Lines catalog, local path or ``s3://`` URI.
        out: output folder or ``s3://`` prefix.
        taxonomy: label columns are validated against it; it is saved in ``stats.json``.
        cfg: packing settings.
        incremental_from: a previous shards folder (or its ``index.parquet``): pack only products that are
            new, whose source bytes changed (sha256) or whose labels changed.
    """
    import ray

    t0 = time.time()
    warm = _warm_workers()  # workers import this module while the driver reads the catalog
    out = storage.absolute(out)
    incremental_from = storage.absolute(incremental_from) if incremental_from else None
    rows, malformed = read_catalog(catalog)
    valid, rejected = check_ids(rows, catalog)  # label checks run in the tasks: the driver stays light
    rejected = malformed + rejected
    done = _open_output(out)
    t_read = time.time() - t0
    plan = make_plan(valid, out, cfg, taxonomy, incremental_from)
    t_plan = time.time() - t0 - t_read
    schema = index_schema(taxonomy)
    todo = [(i, rs) for i, rs in enumerate(plan.shards) if f"{shard_name(i)}.parquet" not in done]
    log.info(
        "catalog %s: %d rows, %d valid, %d rejected before fetch; %s; %d shards, %d to pack",
        catalog,
        len(rows) + len(malformed),
        len(valid),
        len(rejected),
        plan.counts,
        len(plan.shards),
        len(todo),
    )
    t_tasks = time.time()
    packed_now, task_cpu, span = _run_tasks(todo, out, cfg, schema, taxonomy)
    ray.get(warm)

    t_merge = time.time()
    index, quarantine = _merge(out, len(plan.shards), schema, rejected)
    storage.write_parquet(index, storage.join(out, "index.parquet"))
    storage.write_parquet(quarantine, storage.join(out, "quarantine.parquet"))
    storage.clean_staging(out)
    t_merge = time.time() - t_merge
    reasons = dict(Counter(quarantine.column("reason").to_pylist()).most_common())
    # A planned shard whose every row was quarantined leaves no tar: count the tars there are.
    tars = set(index.column("shard").to_pylist())
    seconds = time.time() - t0
    summary = ShardSummary(
        catalog_rows=len(rows) + len(malformed),
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
    total = summary.packed + summary.quarantined
    if total and summary.quarantined / total > cfg.max_failure_rate:
        raise ShardJobError(
            f"{summary.quarantined}/{total} rows quarantined, above --max-failure-rate {cfg.max_failure_rate}"
        )
    return summary


def _get(refs: list) -> list:
    """``ray.get``; a task that found the image source down fails the job with its own message."""
    import ray

    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, SourceUnavailable):
            raise ShardJobError(str(e.cause)) from None
        raise


def _warm_up() -> None:
    """Runs in a worker: unpickling this function imports the packing code (PIL, pyarrow, taxonomy)."""


def _warm_workers() -> list:
    import ray

    cpus = int(ray.available_resources().get("CPU", 1))
    task = ray.remote(num_cpus=1)(_warm_up)
    return [task.remote() for _ in range(max(1, min(cpus, 64)))]


def _run_tasks(
    todo: list[tuple[int, list[CatalogRow]]],
    out: str,
    cfg: ShardConfig,
    schema: pa.Schema,
    taxonomy: Taxonomy,
) -> tuple[int, float, tuple[float, float]]:
    """One Ray task per shard; progress logged every few seconds; a task that fails for good fails the job.

    Returns the number of products packed, the CPU seconds the tasks used and (first start, last end).
    """
    import ray

    now = time.time()
    if not todo:
        return 0, 0.0, (now, now)
    task = ray.remote(num_cpus=1, max_retries=3, retry_exceptions=[OSError])(pack_shard)
    cfg_ref, schema_ref, tax_ref = ray.put(cfg), ray.put(schema), ray.put(taxonomy)
    pending = [task.remote(i, rs, out, cfg_ref, schema_ref, tax_ref) for i, rs in todo]
    total_rows = sum(len(rs) for _, rs in todo)
    finished = rows_done = packed = 0
    cpu = 0.0
    span = [float("inf"), 0.0]
    t_start, last = time.time(), time.time()
    while pending:
        ready, pending = ray.wait(pending, num_returns=len(pending), timeout=2.0)
        for r in _get(ready):  # raises if a task failed for good (e.g. output became unwritable)
            finished += 1
            packed += r["packed"]
            rows_done += r["packed"] + r["rejected"]
            cpu += r["cpu_s"]
            span = [min(span[0], r["start"]), max(span[1], r["end"])]
        if time.time() - last > 5 or not pending:
            rate = rows_done / max(time.time() - t_start, 1e-9)
            eta = (total_rows - rows_done) / rate if rate else float("nan")
            log.info(
                "shard: %d/%d shards, %d/%d products (%d packed), %.0f img/s, eta %.0f s",
                finished,
                len(todo),
                rows_done,
                total_rows,
                packed,
                rate,
                eta,
            )
            last = time.time()
    return packed, cpu, (span[0], span[1])


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


# ---- reading shards ----------------------------------------------------------------------------
class NotAShardSet(FileNotFoundError):
    """A folder given as shards that ``fashionlabel shard`` did not write."""


def list_shards(shards: str) -> list[str]:
    """Full URIs of the published tars under ``shards``, in order.

    A shard set with no tars is valid (a night with nothing new publishes one, with its index); a folder
    with neither tars nor ``index.parquet`` is a wrong path, and says so rather than giving nothing.
    """
    uris = [storage.join(shards, n) for n in storage.listdir(shards, ".tar")]
    if not uris and not storage.exists(storage.join(shards, "index.parquet")):
        raise NotAShardSet(
            f"{shards} is not a shard set: no *.tar and no index.parquet there (write one with `fashionlabel shard`)"
        )
    return uris


def iter_shard(uri: str) -> Iterator[dict[str, Any]]:
    """Samples of one shard as dicts ``{"__key__", "jpg": bytes, "json": dict}``, grouped by key."""
    fileobj = io.BytesIO(storage.read_bytes(uri)) if storage.is_s3(uri) else None
    with tarfile.open(name=None if fileobj else Path(uri), fileobj=fileobj) as tar:
        cur: dict[str, Any] = {}
        for m in tar:
            if not m.isfile():
                continue
            key, _, ext = m.name.partition(".")
            if cur and cur["__key__"] != key:
                yield cur
                cur = {}
            cur["__key__"] = key
            payload = tar.extractfile(m).read()
            cur[ext] = json.loads(payload) if ext == "json" else payload
        if cur:
            yield cur
