"""``fashionlabel label``: shards → Ray Data actor pool → Parquet, one file per input shard.

Plan (Ray's batch-inference shape): a dataset of shard URIs → ``ShardLabeler`` actors (model loaded once
per actor; each call reads one shard, decodes it, predicts, post-processes and publishes
``part-<shard>.parquet`` atomically) → a small summary row per shard. File names are deterministic per input
shard, so a re-run of the same date lists what exists and only does the missing shards: a product is
never written twice. ``_SUCCESS`` (counts, model and taxonomy versions) is written last.

Actor CPUs are sized from the cluster's resources so that the pool never takes every CPU (on a 2-core
laptop an actor pool that reserves all CPUs starves the read tasks and hangs).
"""

from __future__ import annotations

import datetime as dt
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from fashionlabel import storage
from fashionlabel.data import decode
from fashionlabel.label.schema import labels_schema
from fashionlabel.shards import iter_shard, list_shards

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LabelConfig:
    batch_size: int = 256
    actors: int | None = None  # default: from the cluster's GPUs, else CPUs
    device: str | None = None
    compile: bool = False
    incremental: bool = False


def part_name(shard_uri: str) -> str:
    return "part-" + shard_uri.rstrip("/").rsplit("/", 1)[-1].removesuffix(".tar") + ".parquet"


class ShardLabeler:
    """Ray actor: one model per actor; one call labels one whole shard and publishes its Parquet part."""

    def __init__(self, model_dir: str, out_dir: str, run_id: str, cfg: LabelConfig,
                 skip: dict[str, str] | None = None):
        import torch

        from fashionlabel.label.predictor import Predictor

        if cfg.device in (None, "cpu") and not torch.cuda.is_available():
            torch.set_num_threads(1)
        self.pred = Predictor(model_dir, device=cfg.device, batch_size=cfg.batch_size, compile=cfg.compile)
        self.schema = labels_schema(self.pred.taxonomy)
        self.out_dir, self.run_id = out_dir, run_id
        self.skip = skip or {}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        shards, counts = [], {"labelled": [], "errored": [], "skipped": []}
        for uri in batch["shard"]:
            n = self.label_shard(str(uri))
            shards.append(str(uri))
            for k in counts:
                counts[k].append(n[k])
        return {"shard": np.array(shards, dtype=object), **{k: np.array(v) for k, v in counts.items()}}

    def label_shard(self, uri: str) -> dict[str, int]:
        now = dt.datetime.now(dt.UTC)
        ids, shas, images, errors = [], [], [], {}
        skipped = 0
        for s in iter_shard(uri):
            meta = s.get("json", {})
            pid, sha = meta.get("product_id", s["__key__"]), meta.get("sha256")
            if self.skip.get(pid) == sha:
                skipped += 1
                continue
            ids.append(pid)
            shas.append(sha)
            try:
                images.append(decode(s["jpg"], self.pred.size))
            except Exception as e:  # noqa: BLE001 - a corrupt image gets an error row, not a crash
                errors[len(ids) - 1] = f"undecodable image: {str(e)[:160]}"
                images.append(None)
        ok = [i for i, im in enumerate(images) if im is not None]
        rows_ok = self.pred.label_rows(np.stack([images[i] for i in ok])) if ok else []
        by_idx = dict(zip(ok, rows_ok, strict=True))
        base = {"model_version": self.pred.version, "taxonomy_version": self.pred.taxonomy.version,
                "run_id": self.run_id, "labeled_at": now}
        rows = []
        for i, pid in enumerate(ids):
            row = {"product_id": pid, "image_sha256": shas[i], **base, **by_idx.get(i, {})}
            row["error"] = errors.get(i)
            if i in errors:
                row["needs_review"] = True
            rows.append(row)
        table = pa.Table.from_pylist(rows, schema=self.schema)
        storage.write_parquet(table, storage.join(self.out_dir, part_name(uri)))
        return {"labelled": len(ok), "errored": len(errors), "skipped": skipped}


def label_shards(shards: str, model_dir: str, out: str, run_date: str | None = None,
                 cfg: LabelConfig = LabelConfig(), skip: dict[str, str] | None = None) -> dict[str, Any]:
    """Label every shard of ``shards`` into ``out/history/run_date=D/``; return the run summary.

    Args:
        skip: product_id → image_sha256 already labelled by this model (``--incremental``): not relabelled.
    """
    import ray

    from fashionlabel.runtime import cluster_cpus, cluster_gpus
    from fashionlabel.train.export import load_artifact

    t0 = time.time()
    model_dir = storage.absolute(model_dir)
    run_date = run_date or dt.date.today().isoformat()
    out_dir = storage.join(out, "history", f"run_date={run_date}")
    storage.makedirs(out_dir)
    done = set(storage.listdir(out_dir, ".parquet"))
    uris = list_shards(shards)
    todo = [u for u in uris if part_name(u) not in done]
    _, spec = load_artifact(model_dir)
    run_id = f"{run_date}-{uuid.uuid4().hex[:8]}"
    log.info("label: %d shards, %d already done for %s, %d to label", len(uris), len(uris) - len(todo),
             run_date, len(todo))
    counts = {"labelled": 0, "errored": 0, "skipped": 0}
    if todo:
        gpus, cpus = cluster_gpus(), cluster_cpus()
        use_gpu = gpus >= 1 and cfg.device != "cpu"
        actors = cfg.actors or (int(gpus) if use_gpu else max(1, int(cpus)))
        actors = max(1, min(actors, len(todo)))
        # Leave CPU for the driver and Ray Data's own tasks: fractional CPUs per actor.
        actor_cpus = 1.0 if use_gpu else max(0.25, (cpus * 0.9) / actors)
        ds = ray.data.from_items([{"shard": u} for u in todo], override_num_blocks=len(todo))
        ds = ds.map_batches(
            ShardLabeler,
            fn_constructor_kwargs={"model_dir": str(model_dir), "out_dir": out_dir, "run_id": run_id,
                                   "cfg": cfg, "skip": skip},
            batch_size=1,
            concurrency=actors,
            num_cpus=actor_cpus,
            num_gpus=1 if use_gpu else 0,
            max_restarts=3,
            max_task_retries=3,
        )
        for row in ds.iter_rows():
            for k in counts:
                counts[k] += int(row[k])
    seconds = time.time() - t0
    parts = storage.listdir(out_dir, ".parquet")
    summary = {
        "run_date": run_date, "run_id": run_id, "model_version": spec["version"],
        "taxonomy_version": spec["taxonomy_version"], "shards": len(uris), "shards_done_before": len(uris) - len(todo),
        "files": len(parts), **counts, "seconds": seconds,
        "images_per_s": counts["labelled"] / seconds if seconds else 0.0, "out": out_dir,
    }
    if len(parts) >= len(uris):
        storage.write_json(storage.join(out_dir, "_SUCCESS"), summary)
    return summary
