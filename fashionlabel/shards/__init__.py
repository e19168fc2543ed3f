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

Modules: ``spec`` (settings, schemas, names), ``plan`` (which rows go where; resume, incremental),
``pack`` (one shard, in a Ray task), ``job`` (the driver), ``read`` (reading a shard set back).
"""

from fashionlabel.shards.job import ShardSummary, shard_catalog
from fashionlabel.shards.pack import pack_row, pack_shard
from fashionlabel.shards.plan import fingerprint_rows, make_plan, previous_index
from fashionlabel.shards.read import NotAShardSet, ShardDamaged, ShardSetIncomplete, iter_shard, list_shards
from fashionlabel.shards.spec import (
    QUARANTINE_SCHEMA,
    PlanMismatchError,
    ShardConfig,
    ShardJobError,
    index_schema,
    shard_name,
)

__all__ = [
    "QUARANTINE_SCHEMA",
    "NotAShardSet",
    "PlanMismatchError",
    "ShardConfig",
    "ShardDamaged",
    "ShardJobError",
    "ShardSetIncomplete",
    "ShardSummary",
    "fingerprint_rows",
    "index_schema",
    "iter_shard",
    "list_shards",
    "make_plan",
    "pack_row",
    "pack_shard",
    "previous_index",
    "shard_catalog",
    "shard_name",
]
