"""Reading a shard set: its tars in order, and the samples of one tar."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fashionlabel import storage


class NotAShardSet(FileNotFoundError):
    """A folder given as shards that ``fashionlabel shard`` did not write."""


class ShardSetIncomplete(FileNotFoundError):
    """A shard set whose index names tars that are missing."""


def list_shards(shards: str) -> list[str]:
    """Full URIs of the published tars under ``shards``, in order.

    A shard set with no tars is valid (a night with nothing new publishes one, with its index); a folder
    with neither tars nor ``index.parquet`` is a wrong path, and says so rather than giving nothing.
    """
    names = storage.listdir(shards, ".tar")
    index = storage.join(shards, "index.parquet")
    has_index = storage.exists(index)
    if not names and not has_index:
        raise NotAShardSet(
            f"{shards} is not a shard set: no *.tar and no index.parquet there (write one with `fashionlabel shard`)"
        )
    if has_index:
        _check_complete(shards, index, set(names))
    return [storage.join(shards, n) for n in names]


def _check_complete(shards: str, index: str, tars: set[str]) -> None:
    """Refuse a shard set whose index places products in a tar that is not there (deleted, never copied,
    a folder in its place): labelling what is left would drop those products without a row or a word."""
    import pyarrow.compute as pc

    table = storage.read_parquet(index, columns=["shard"])
    counts = pc.value_counts(table["shard"]).to_pylist()
    gone = sorted((c["values"], c["counts"]) for c in counts if f"{c['values']}.tar" not in tars)
    if gone:
        named = ", ".join(f"{n}.tar" for n, _ in gone[:5]) + (
            f" and {len(gone) - 5} more" if len(gone) > 5 else ""
        )
        raise ShardSetIncomplete(
            f"{shards} is incomplete: its index.parquet places {sum(c for _, c in gone)} products in "
            f"{len(gone)} shard(s) that are not there ({named}); re-run `fashionlabel shard` with the same "
            f"catalog and --out to pack them again, or copy the whole folder again"
        )


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
