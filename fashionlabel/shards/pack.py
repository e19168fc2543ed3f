"""One shard, inside a Ray task: check each row's labels, fetch and normalise its image, write the tar;
publish the tar, then its index part (the completion marker). A bad row is quarantined with its reason and
never fails the shard; only an image source that looks down does (``OutageBreaker``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from typing import Any

import pyarrow as pa

from fashionlabel import storage
from fashionlabel.catalog import (
    CatalogRow,
    FetchError,
    HostGate,
    OutageBreaker,
    Rejected,
    check_labels,
    fetch,
)
from fashionlabel.images import ImageReject, normalise
from fashionlabel.shards.spec import QUARANTINE_SCHEMA, ShardConfig, shard_name
from fashionlabel.tarwriter import TarWriter
from fashionlabel.taxonomy import Taxonomy

log = logging.getLogger(__name__)


def fetches_for(uris: Iterable[str], in_flight: int) -> int:
    """Fetches to keep going for ``uris``: ``in_flight`` when some source is remote (S3, HTTP: network waits
    to overlap), else 1, since a local read takes microseconds and a thread costs more than that."""
    remote = any(u.startswith(("http://", "https://", "s3://")) for u in uris)
    return in_flight if remote else 1


def fetched(
    rows: Iterable[CatalogRow], in_flight: int, gate: HostGate | None = None
) -> Iterator[tuple[CatalogRow, bytes | Exception]]:
    """``(row, source bytes or the exception its fetch raised)`` for each row, in order, with up to
    ``in_flight`` fetches running ahead on threads. A fetch from S3 or HTTP mostly waits on the network (tens
    of ms a request, a minute for a host that never answers): one at a time would leave the task idle. At
    most ``in_flight`` sources are held in memory at once (each refused past MAX_SOURCE_BYTES). Closing
    the iterator early (an outage raised by the caller) cancels the fetches not yet started and does not
    wait for those under way. ``gate`` (one per task) stops asking a source that has stopped answering."""
    gate = gate or HostGate()

    def one(r: CatalogRow) -> bytes | Exception:
        try:
            return gate.fetch(r.image_uri)
        except Exception as e:  # noqa: BLE001 - handed to the caller, which quarantines the row
            return e

    if in_flight <= 1:  # no threads: a local read takes microseconds, and eight threads cost more than that
        yield from ((r, one(r)) for r in rows)
        return
    pool = ThreadPoolExecutor(in_flight, thread_name_prefix="fetch")
    ahead: deque[tuple[CatalogRow, Future]] = deque()
    it = iter(rows)
    try:
        for r in it:
            ahead.append((r, pool.submit(one, r)))
            if len(ahead) >= in_flight:
                break
        while ahead:
            r, fut = ahead.popleft()
            for nxt in it:  # keep the window full: the next row starts before this one is used
                ahead.append((nxt, pool.submit(one, nxt)))
                break
            yield r, fut.result()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def pack_row(
    r: CatalogRow, shard: str, cfg: ShardConfig, src: bytes | None = None
) -> tuple[bytes, bytes, dict[str, Any]]:
    """Fetch (unless ``src`` is given) and normalise one checked row: (JPEG, JSON sidecar, index row).
    Raises ``FetchError`` or ``ImageReject`` with the quarantine reason."""
    src = fetch(r.image_uri) if src is None else src
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
    shard_id: int,
    rows: list[CatalogRow],
    out: str,
    cfg: ShardConfig,
    schema: pa.Schema,
    taxonomy: Taxonomy,
    failed_before: frozenset[tuple[str, str]] = frozenset(),
) -> dict[str, Any]:
    """Check labels, fetch, normalise and pack ``rows`` into one tar; publish it and its index part.

    ``failed_before``: (product_id, image_uri) of rows the previous run quarantined. Their fetches failing
    again are quarantined as before but do not count as an outage: a few images a host persistently
    answers with an error (HTTP 500, 403) came back every night in that night's small shard, counted as
    "the source is down" there, and failed the night and every re-run of it.
    """
    name = shard_name(shard_id)
    t0, cpu0 = time.time(), time.thread_time()
    index, rejected = [], []
    blanked: Counter[str] = Counter()  # head -> products packed without its label (keep_outside_labels)
    outages = OutageBreaker(len(rows), name)
    tmp = storage.staging_dir(out) / f"{name}.{time.time_ns()}.tar.tmp"
    try:
        checked = []
        for row in rows:
            r = check_labels(row, taxonomy, cfg.keep_outside_labels)
            if isinstance(r, Rejected):
                rejected.append(r.as_row())
            else:
                checked.append(r)
        # the writer closes the file; closing the fetches cancels those not started when an outage raises
        sources = fetched(checked, fetches_for((r.image_uri for r in checked), cfg.fetches_in_flight))
        with TarWriter(open(tmp, "wb")) as tar, closing(sources):  # noqa: SIM115
            for r, src in sources:
                try:
                    if isinstance(src, Exception):
                        raise src
                    jpg, sidecar, entry = pack_row(r, name, cfg, src)
                except (FetchError, ImageReject) as e:
                    if isinstance(e, FetchError) and (r.product_id, r.image_uri) not in failed_before:
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
                blanked.update(r.blanked)
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
        "blanked": dict(blanked),
        "start": t0,
        "end": time.time(),
        "cpu_s": time.thread_time() - cpu0,
    }
