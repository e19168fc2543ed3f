"""Which training products each DDP rank reads: whole shards while that keeps the ranks balanced (each
rank then opens only its own tars), else every N-th product of all shards (an exact balance).
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow.compute as pc

from fashionlabel import storage
from fashionlabel.data import split_of

# Whole shards per rank only while the ranks' training-sample counts stay this close: every rank runs the
# steps of the largest share, so a smaller one is cycled and its products are seen more often per epoch.
SHARE_BALANCE = 0.95


def shares_of(index_shards: dict[str, int], world: int) -> list[list[str]] | None:
    """Greedy balance of shards over ranks by train-sample count. None (every rank then takes every
    world-th product of all shards, an exact balance) when there are fewer shards than ranks or the
    smallest share would fall below ``SHARE_BALANCE`` of the largest."""
    if len(index_shards) < world:
        return None
    shares: list[list[str]] = [[] for _ in range(world)]
    load = [0] * world
    for shard, n in sorted(index_shards.items(), key=lambda kv: -kv[1]):
        r = int(np.argmin(load))
        shares[r].append(shard)
        load[r] += n
    if min(load) < SHARE_BALANCE * max(load):
        return None
    return [sorted(s) for s in shares]


def split_work(shards: str, workers: int) -> tuple[list[list[str]] | None, int]:
    """Each worker's shards (balanced by training-sample count, from the index) and the largest share's
    sample count, which sets the steps per epoch of every worker."""
    index = storage.read_parquet(storage.join(shards, "index.parquet"), columns=["product_id", "shard"])
    split = np.array([split_of(p) for p in index.column("product_id").to_pylist()])
    train_idx = index.filter(pc.equal(np.asarray(split == "train"), True)) if len(split) else index
    counts = dict(
        zip(
            *np.unique(train_idx.column("shard").to_numpy(zero_copy_only=False), return_counts=True),
            strict=True,
        )
    )
    per_shard = {storage.join(shards, f"{s}.tar"): int(n) for s, n in counts.items()}
    shares = shares_of(per_shard, workers)
    if shares is not None:
        max_share = max(sum(per_shard[u] for u in sh) for sh in shares)
    else:
        max_share = math.ceil(train_idx.num_rows / workers)
    if max_share == 0:
        raise ValueError(f"no training samples in {shards}")
    return shares, max_share
