"""Catalog → WebDataset shards + index.parquet + quarantine.parquet + stats.json, on Ray tasks.

Like img2dataset: the valid rows of the catalog are cut, in catalog order, into fixed-size groups; group i
becomes ``shard-{i:06d}.tar``, packed by one Ray task. That assignment is deterministic, so a re-run
recomputes the same plan and skips every shard whose completion marker (``_parts/shard-i.parquet``, its
index rows, published *after* the tar) exists. A tar is written to a staging file and published by
rename/upload, so readers never see a partial shard.

Every rejected row lands in quarantine with a stable reason; the job fails only when it cannot proceed
(no catalog, no access to the output) or when the rejected share exceeds ``max_failure_rate``.
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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from fashionlabel import storage
from fashionlabel.catalog import FetchError, Rejected, ValidRow, fetch, read_catalog, validate
from fashionlabel.images import ImageReject, normalise
from fashionlabel.taxonomy import Taxonomy

log = logging.getLogger(__name__)

QUARANTINE_SCHEMA = pa.schema(
    [("product_id", pa.string()), ("image_uri", pa.string()), ("reason", pa.string()), ("detail", pa.string())]
)


@dataclass(frozen=True)
class ShardConfig:
    samples_per_shard: int = 1000
    max_side: int = 256
    jpeg_quality: int = 90
    max_pixels: int = 40_000_000
    min_side: int = 8
    max_failure_rate: float = 0.5


class ShardJobError(RuntimeError):
    """The shard job cannot proceed or failed past its allowed failure rate."""


def shard_name(i: int) -> str:
    return f"shard-{i:06d}"


def index_schema(taxonomy: Taxonomy) -> pa.Schema:
    fields = [
        ("key", pa.string()), ("product_id", pa.string()), ("shard", pa.string()),
        ("image_uri", pa.string()), ("sha256", pa.string()), ("bytes", pa.int64()),
        ("orig_width", pa.int32()), ("orig_height", pa.int32()), ("width", pa.int32()), ("height", pa.int32()),
    ]
    for h in taxonomy.heads:
        fields.append((h.name, pa.string() if h.kind == "single" else pa.list_(pa.string())))
    return pa.schema(fields)


# ---- one shard (runs inside a Ray task) ----------------------------------------------------------
def pack_shard(shard_id: int, rows: list[ValidRow], out: str, cfg: ShardConfig, schema: pa.Schema
               ) -> dict[str, Any]:
    """Fetch, normalise and pack ``rows`` into one tar; publish it and its index part; return counts."""
    name = shard_name(shard_id)
    index, rejected = [], []
    staging = storage.staging_dir(out)
    tmp = staging / f"{name}.{time.time_ns()}.tar.tmp"
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for r in rows:
            try:
                src = fetch(r.image_uri)
                jpg, (ow, oh), (w, h) = normalise(
                    src, max_side=cfg.max_side, quality=cfg.jpeg_quality,
                    max_pixels=cfg.max_pixels, min_side=cfg.min_side,
                )
            except (FetchError, ImageReject) as e:
                rejected.append(Rejected(r.product_id, r.image_uri, e.reason, e.detail).as_row())
                continue
            sha = hashlib.sha256(src).hexdigest()
            meta = {"product_id": r.product_id, "labels": r.labels, "source_uri": r.image_uri,
                    "sha256": sha, "orig_size": [ow, oh], "meta": r.meta}
            _add(tar, f"{r.key}.jpg", jpg)
            _add(tar, f"{r.key}.json", json.dumps(meta, ensure_ascii=False).encode())
            index.append({"key": r.key, "product_id": r.product_id, "shard": name, "image_uri": r.image_uri,
                          "sha256": sha, "bytes": len(src), "orig_width": ow, "orig_height": oh,
                          "width": w, "height": h, **r.labels})
    if index:
        storage.publish_file(tmp, storage.join(out, f"{name}.tar"))
    else:
        tmp.unlink(missing_ok=True)
    part = {"index": pa.Table.from_pylist(index, schema=schema),
            "quarantine": pa.Table.from_pylist(rejected, schema=QUARANTINE_SCHEMA)}
    # The index part is the completion marker: written last, so its presence means the tar is complete.
    storage.write_parquet(part["quarantine"], storage.join(out, "_parts", f"{name}.quarantine.parquet"))
    storage.write_parquet(part["index"], storage.join(out, "_parts", f"{name}.parquet"))
    return {"shard": name, "packed": len(index), "rejected": Counter(r["reason"] for r in rejected)}


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o444, 0  # fixed metadata: same input, same bytes
    tar.addfile(info, io.BytesIO(data))


# ---- the job ------------------------------------------------------------------------------------
@dataclass
class ShardSummary:
    catalog_rows: int
    packed: int
    quarantined: int
    reasons: dict[str, int]
    shards: int
    shards_skipped: int
    seconds: float
    out: str

    @property
    def images_per_s(self) -> float:
        return self.packed / self.seconds if self.seconds else 0.0


def shard_catalog(catalog: str, out: str, taxonomy: Taxonomy, cfg: ShardConfig = ShardConfig()
                  ) -> ShardSummary:
    """Pack ``catalog`` into shards under ``out`` with Ray tasks. Re-runnable: finished shards are kept."""
    import ray

    t0 = time.time()
    rows, malformed = read_catalog(catalog)
    valid, rejected = validate(rows, catalog, taxonomy)
    rejected = malformed + rejected
    try:
        storage.makedirs(out)
        # Fail fast, before any fetch, when the output cannot be written (no bucket, no permission).
        storage.write_bytes(storage.join(out, "_parts", ".write-probe"), b"")
        done = set(storage.listdir(storage.join(out, "_parts"), ".parquet"))
    except (OSError, storage.StorageError) as e:
        raise ShardJobError(f"cannot use output {out}: {storage._clean(e)}") from e
    schema = index_schema(taxonomy)
    n = cfg.samples_per_shard
    plan = [(i, valid[s : s + n]) for i, s in enumerate(range(0, len(valid), n))]
    todo = [(i, rs) for i, rs in plan if f"{shard_name(i)}.parquet" not in done]
    log.info("catalog %s: %d rows, %d valid, %d rejected before fetch; %d shards, %d to pack",
             catalog, len(rows) + len(malformed), len(valid), len(rejected), len(plan), len(todo))

    task = ray.remote(num_cpus=1, max_retries=3, retry_exceptions=[OSError])(pack_shard)
    cfg_ref, schema_ref = ray.put(cfg), ray.put(schema)
    pending = [task.remote(i, rs, out, cfg_ref, schema_ref) for i, rs in todo]
    finished, last = 0, time.time()
    while pending:
        ready, pending = ray.wait(pending, num_returns=1, timeout=30)
        for ref in ready:
            ray.get(ref)  # raises if a task failed for good (e.g. output became unwritable)
            finished += 1
        if time.time() - last > 5 or not pending:
            log.info("shard: %d/%d shards packed (%.0f s)", finished, len(todo), time.time() - t0)
            last = time.time()

    index, quarantine = _merge(out, plan, schema, rejected)
    storage.write_parquet(index, storage.join(out, "index.parquet"))
    storage.write_parquet(quarantine, storage.join(out, "quarantine.parquet"))
    reasons = dict(Counter(quarantine.column("reason").to_pylist()).most_common())
    summary = ShardSummary(
        catalog_rows=len(rows) + len(malformed), packed=index.num_rows, quarantined=quarantine.num_rows,
        reasons=reasons, shards=len(plan), shards_skipped=len(plan) - len(todo),
        seconds=time.time() - t0, out=str(out),
    )
    # The taxonomy travels with the shards, so training needs nothing but this folder.
    stats = asdict(summary) | {"images_per_s": summary.images_per_s, "taxonomy": taxonomy.to_dict(),
                               "taxonomy_version": taxonomy.version, "config": asdict(cfg)}
    storage.write_json(storage.join(out, "stats.json"), stats)
    total = summary.packed + summary.quarantined
    if total and summary.quarantined / total > cfg.max_failure_rate:
        raise ShardJobError(
            f"{summary.quarantined}/{total} rows quarantined, above --max-failure-rate {cfg.max_failure_rate}"
        )
    return summary


def _merge(out: str, plan: list, schema: pa.Schema, catalog_rejects: list[Rejected]
           ) -> tuple[pa.Table, pa.Table]:
    parts = storage.join(out, "_parts")
    index = [storage.read_parquet(storage.join(parts, f"{shard_name(i)}.parquet"), schema=schema)
             for i, _ in plan]
    quarantine = [pa.Table.from_pylist([r.as_row() for r in catalog_rejects], schema=QUARANTINE_SCHEMA)]
    quarantine += [storage.read_parquet(storage.join(parts, f"{shard_name(i)}.quarantine.parquet"),
                                        schema=QUARANTINE_SCHEMA) for i, _ in plan]
    return (pa.concat_tables(index) if index else schema.empty_table(), pa.concat_tables(quarantine))


# ---- reading shards ----------------------------------------------------------------------------
def list_shards(shards: str) -> list[str]:
    """Full URIs of the published tars under ``shards``, in order."""
    return [storage.join(shards, n) for n in storage.listdir(shards, ".tar")]


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
