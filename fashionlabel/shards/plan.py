"""Which rows go into which shard: a deterministic plan, saved so that a re-run rebuilds the same shards,
and refused when the catalog or the settings changed. In incremental mode only new products and those whose
source bytes or labels changed are planned; known products are fingerprinted in Ray tasks.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter
from contextlib import closing
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow as pa

from fashionlabel import storage
from fashionlabel.catalog import (
    ID_COLUMNS,
    CatalogRow,
    FetchError,
    HostGate,
    OutageBreaker,
    Rejected,
    check_labels,
)
from fashionlabel.shards.pack import fetched, fetches_for
from fashionlabel.shards.spec import PlanMismatchError, ShardConfig, ShardJobError, ray_get
from fashionlabel.taxonomy import Taxonomy

log = logging.getLogger(__name__)

PLAN_SCHEMA = pa.schema([("product_id", pa.string()), ("status", pa.string())])
PROGRESS_EVERY = 5.0  # seconds between progress lines of the hash pass, as between the packing's


def _labels_key(labels: dict[str, Any]) -> str:
    """One comparable string for a product's labels (as the index stores them)."""
    return json.dumps({k: v for k, v in labels.items() if v not in (None, [])}, sort_keys=True)


def _state(sha: str | None, labels_key: str | None) -> bytes | None:
    """What makes a known product "changed", in 16 bytes: the sha256 of its source and its labels. None
    when either is unknown (a failed fetch, rejected labels): such a product is always packed again.
    Sixteen bytes rather than the two strings: the driver holds one per known product (a million of
    them: about 0.8 GB as strings)."""
    if sha is None or labels_key is None:
        return None
    return hashlib.blake2b(f"{sha}\x1f{labels_key}".encode(), digest_size=16).digest()


def fingerprint_rows(
    rows: list[CatalogRow],
    taxonomy: Taxonomy,
    heads: list[str],
    keep_outside: bool = False,
    in_flight: int = 1,
) -> list[tuple[str, bytes | None]]:
    """(product_id, ``_state`` of its source bytes and the labels of ``heads``) per row; the state is None
    when the source cannot be fetched or the labels are rejected (the row is then packed again, so the
    pack task quarantines it). ``keep_outside``: labels the taxonomy lacks are left out, as packing does.

    Each distinct source is fetched once, with up to ``in_flight`` remote fetches under way at a time (as
    a shard task fetches): one GET after another, each waiting its round trip, the hash pass of every known
    product was the night's longest stage on S3, and products sharing an image (a placeholder photo, colour
    variants of one shot) fetched it once each."""
    firsts: dict[str, CatalogRow] = {}  # the first row of each distinct source
    for r in rows:
        firsts.setdefault(r.image_uri, r)
    outages = OutageBreaker(len(firsts), "the known products' hash pass")
    shas: dict[str, str | None] = {}
    with closing(fetched(firsts.values(), fetches_for(firsts, in_flight), HostGate())) as sources:
        for r, src in sources:
            if isinstance(src, FetchError):
                # a source that is down does not make every product "changed": past a few, the task fails
                outages.record(src, r.image_uri)
                shas[r.image_uri] = None
            elif isinstance(src, Exception):
                raise src
            else:
                shas[r.image_uri] = hashlib.sha256(src).hexdigest()
    out = []
    for r in rows:
        v = check_labels(r, taxonomy, keep_outside)
        key = None if isinstance(v, Rejected) else _labels_key({h: v.labels.get(h) for h in heads})
        out.append((r.product_id, _state(shas[r.image_uri], key)))
    return out


@dataclass
class Plan:
    """The rows of each shard, in shard order, and how many catalog rows are new, changed or unchanged."""

    shards: list[list[CatalogRow]]
    counts: dict[str, int]  # new / changed / unchanged


def _packing(cfg: ShardConfig) -> dict[str, Any]:
    # what the shards hold depends on these; not on how failures are judged or how many fetches overlap
    return {k: v for k, v in asdict(cfg).items() if k not in ("max_failure_rate", "fetches_in_flight")}


def _fingerprint(valid: list[CatalogRow], cfg: ShardConfig, taxonomy: Taxonomy, prev: str | None) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([_packing(cfg), taxonomy.version, prev], sort_keys=True).encode())
    for r in valid:
        extra = (str(v) for k, v in r.raw.items() if k not in ID_COLUMNS)
        h.update("\x1f".join([r.product_id, r.image_uri, *extra, "\x1e"]).encode())
    return h.hexdigest()


def previous_index_uri(prev: str) -> str:
    """The ``index.parquet`` that ``--incremental PREV`` names: PREV itself, or the one in folder PREV."""
    return prev if str(prev).endswith(".parquet") else storage.join(prev, "index.parquet")


def check_previous_index(prev: str) -> str:
    """The ``index.parquet`` of ``--incremental PREV``, refused by name when it is not there (a typo)."""
    index = previous_index_uri(prev)
    if not storage.exists(index):
        raise ShardJobError(f"--incremental {prev}: no previous index at {index}")
    return index


def previous_failures(quarantine: str | None) -> frozenset[tuple[str, str]]:
    """(product_id, image_uri) of every row a previous run quarantined, from its ``quarantine.parquet``
    (nothing when ``quarantine`` is None or not there). Such rows are packed again (an image may have been
    mended), but their failing again is no sign that the source is down (:func:`~.pack.pack_shard`)."""
    if quarantine is None or not storage.exists(quarantine):
        return frozenset()
    try:
        t = storage.read_parquet(quarantine, columns=["product_id", "image_uri"])
    except (OSError, pa.ArrowException) as e:
        raise ShardJobError(f"cannot read the previous quarantine {quarantine}: {storage.redact(e)}") from e
    return frozenset(
        (p, u)
        for p, u in zip(t.column("product_id").to_pylist(), t.column("image_uri").to_pylist(), strict=True)
        if p is not None and u is not None
    )


def previous_index(prev: str, taxonomy: Taxonomy) -> tuple[dict[str, bytes], list[str]]:
    """product_id → ``_state`` (source sha256 and labels) from a previous run's ``index.parquet``
    (``prev``: its folder or the file), and the taxonomy heads it holds. Only those heads are compared: an
    index without label columns (a product map) compares image bytes alone."""
    uri = previous_index_uri(prev)
    try:
        names = set(storage.read_parquet_schema(uri).names)
        heads = [h.name for h in taxonomy.heads if h.name in names]
        t = storage.read_parquet(uri, columns=["product_id", "sha256", *heads])
    except (OSError, pa.ArrowException) as e:
        raise ShardJobError(f"cannot read the previous index {uri}: {storage.redact(e)}") from e
    before: dict[str, bytes] = {}
    for batch in t.to_batches(max_chunksize=65_536):  # Python objects for one batch at a time
        cols = {h: batch.column(h).to_pylist() for h in heads}
        pids, shas = batch.column("product_id").to_pylist(), batch.column("sha256").to_pylist()
        for i, (pid, sha) in enumerate(zip(pids, shas, strict=True)):
            before[pid] = _state(sha, _labels_key({h: cols[h][i] for h in heads})) or b""
    return before, heads


def _select_incremental(
    valid: list[CatalogRow], prev: str, chunk: int, taxonomy: Taxonomy, keep_outside: bool, in_flight: int
) -> tuple[list[CatalogRow], list[str]]:
    """The rows to pack (new, or changed: other source bytes or other labels; in catalog order) and their
    status. Known products are fingerprinted in Ray tasks (one fetch per distinct image of a task's chunk,
    ``in_flight`` of them at a time from a remote source), the driver only compares."""
    import ray

    before, heads = previous_index(prev, taxonomy)
    known = [r for r in valid if r.product_id in before]
    log.info(
        "incremental: %d of %d catalog products are known to %s; fingerprinting them",
        len(known),
        len(valid),
        prev,
    )
    task = ray.remote(num_cpus=1, max_retries=3)(fingerprint_rows)
    tax_ref = ray.put(taxonomy)
    refs = [
        task.remote(known[s : s + chunk], tax_ref, heads, keep_outside, in_flight)
        for s in range(0, len(known), chunk)
    ]
    now = _gather_fingerprints(refs, len(known))
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


def _gather_fingerprints(refs: list, known: int, every: float = PROGRESS_EVERY) -> dict[str, bytes | None]:
    """The hash pass's results as its tasks finish, with a progress line every ``every`` seconds: it
    fetches every known product's image again, so it is most of an incremental night's shard stage (on S3,
    hours at 100M products), and until it ends no shard is packed."""
    import ray

    now: dict[str, bytes | None] = {}
    t0 = last = time.time()
    pending = refs
    while pending:
        ready, pending = ray.wait(pending, num_returns=len(pending), timeout=min(every, 2.0))
        for part in ray_get(ready):
            now.update(part)
        if pending and time.time() - last >= every:
            last = time.time()
            log.info("incremental: %s", hash_progress_line(len(now), known, last - t0))
    return now


def hash_progress_line(done: int, known: int, elapsed: float) -> str:
    """One progress line of the hash pass: ``done`` of ``known`` products fingerprinted after ``elapsed`` s."""
    head = f"{done}/{known} known products fingerprinted (fetch + sha256)"
    if not done:
        return f"{head}, {elapsed:.0f} s in; rate and eta once the first task is done"
    rate = done / max(elapsed, 1e-9)
    return f"{head}, {rate:.0f}/s, eta {(known - done) / rate:.0f} s"


def _what_differs(saved: dict[str, Any], cfg: ShardConfig, taxonomy: Taxonomy) -> str:
    """What a saved plan was made from that this run's is not (a plan saved without these says less)."""
    tax, packing = saved.get("taxonomy"), saved.get("packing")
    if tax and tax["version"] != taxonomy.version:
        return (
            f"another taxonomy ({tax['name']!r} version {tax['version']}; this run's is {taxonomy.name!r} "
            f"version {taxonomy.version})"
        )
    if packing is not None and packing != _packing(cfg):
        now = _packing(cfg)
        diff = [f"{k} {packing.get(k)} → {now[k]}" for k in sorted(now) if packing.get(k) != now[k]]
        return f"other settings ({', '.join(diff)})"
    if packing is not None:
        return "another catalog content (or another --incremental source)"
    return "a different catalog or settings"


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
            raise PlanMismatchError(out, _what_differs(saved, cfg, taxonomy))
        t = storage.read_parquet(rows_uri, schema=PLAN_SCHEMA)
        by_id = {r.product_id: r for r in valid}
        rows = [by_id[p] for p in t.column("product_id").to_pylist()]
        counts = saved["counts"]
    else:
        if incremental_from:
            rows, status = _select_incremental(
                valid,
                incremental_from,
                max(cfg.samples_per_shard, 1000),
                taxonomy,
                cfg.keep_outside_labels,
                cfg.fetches_in_flight,
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
                "taxonomy": {"name": taxonomy.name, "version": taxonomy.version},
                "packing": _packing(cfg),
                "counts": counts,
                "rows": len(rows),
                "samples_per_shard": cfg.samples_per_shard,
            },
        )  # written last
    n = cfg.samples_per_shard
    return Plan([rows[s : s + n] for s in range(0, len(rows), n)], counts)
