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
