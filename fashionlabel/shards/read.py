"""Reading a shard set: its tars in order, and the samples of one tar."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from fashionlabel import storage


class NotAShardSet(FileNotFoundError):
    """A folder given as shards that ``fashionlabel shard`` did not write."""


class ShardSetIncomplete(FileNotFoundError):
    """A shard set whose index names tars that are missing, or whose shard job has not finished."""


class ShardDamaged(ValueError):
    """A shard tar that is cut short or has a damaged header."""


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
    elif storage.exists(plan := storage.join(shards, "_parts", "_plan.json")):
        # a shard job's output before its last step (the index): killed, failed or still running. Its tars
        # were labelled as if they were the whole set, and _SUCCESS written over the products it had
        # not packed yet
        saved = storage.read_json(plan)
        planned = -(-int(saved.get("rows", 0)) // max(int(saved.get("samples_per_shard", 1)), 1))
        raise ShardSetIncomplete(
            f"{shards} is not finished: the shard job writing it has packed {len(names)} of {planned} "
            "shard(s) and not yet written index.parquet (killed, failed or still running); re-run "
            "`fashionlabel shard` with the same catalog and --out to finish it"
        )
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
    """Samples of one shard as dicts ``{"__key__", "jpg": bytes, "json": dict}``, grouped by key.

    A damaged tar raises :class:`ShardDamaged` naming it, before any sample is given: the standard
    library's reader stops without a word at a cut between two members (training and evaluation went on
    with part of the shard) and names neither the shard nor the damage at any other cut."""
    from fashionlabel.label.reader import TarFormatError, read_shard_bytes, read_tar

    def damaged(why: str) -> ShardDamaged:
        return ShardDamaged(
            f"shard {uri} is damaged ({why}): restore it, or delete it and re-run `fashionlabel shard` with "
            "the same catalog and --out to pack it again"
        )

    try:
        members = list(read_tar(read_shard_bytes(uri)))
    except TarFormatError as e:
        raise damaged(str(e)) from None
    samples: list[dict[str, Any]] = []
    for name, payload in members:
        key, _, ext = name.partition(".")
        if not samples or samples[-1]["__key__"] != key:
            samples.append({"__key__": key})
        if ext == "json":
            # the tar's headers are checksummed, its payloads are not: a sidecar damaged in place failed
            # training inside a worker with json's own words, naming neither shard nor member
            try:
                payload = json.loads(payload)
            except ValueError as e:
                raise damaged(f"member {name} is not JSON: {e}") from None
        samples[-1][ext] = payload
    yield from samples
