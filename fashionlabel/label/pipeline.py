"""``fashionlabel label``: shards → Ray Data (read → decode → actor pool → post-process) → Parquet per shard.

Plan (Ray's batch-inference shape, restructured so that the accelerator never waits):

1. read (one shard at a time; ``label/reader.py``): one sequential read of the whole tar (one GET on S3),
   headers parsed from the buffer, already-labelled products dropped (``--incremental``), and JPEGs
   decoded with PIL when decode runs on CPU (all of them, or a share with decode "split"). On a GPU
   cluster reads are Ray tasks of their own, so that they run ahead of the accelerator; on a CPU-only
   cluster each actor reads its own shard (``read``);
2. predict (a fixed-size actor pool, sized from the cluster's resources: no autoscaler ramp; the model is
   loaded once per actor, bf16 + channels_last on GPU, optionally ``torch.compile``d): raw JPEGs are
   decoded in one batched nvJPEG call on the device when decode runs on GPU, then forward, softmax /
   sigmoid on the device, and the vectorised post-processing (hierarchy, top-k, thresholds, review);
3. write (driver; ``label/writer.py``): rows are grouped by input shard and each complete shard is
   published as ``part-<shard>.parquet`` atomically. Re-running a date only labels the missing shards.

Ray Data streams the stages, so reading and decoding of later shards overlap with inference of earlier
ones. Without a GPU there is nothing to overlap: reads and forward passes share the same cores, and a
separate read stage only adds worker processes to start (Ray, Ray Data and the reader imported in each)
and decoded pixels to copy through the object store, so the actor reads its shard itself. Several actors
per GPU (``actors_per_gpu``) overlap one actor's decode and post-processing with another's forward pass.
On a CPU-only cluster the actors take part of the CPUs (fractional), never all of them, so read tasks
(``read="tasks"``) cannot starve.

The plan's arithmetic is ``label/plan.py``, the actor ``label/actor.py``. An actor that dies is restarted
and its in-flight batches are retried (``max_restarts`` / ``max_task_retries``); the writer keeps each
product of a shard once, so a retry cannot duplicate one.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, replace
from typing import Any

import pyarrow as pa

from fashionlabel import settings, storage
from fashionlabel.label.actor import COMPILED, CRASH_ONCE_ENV, Labeler
from fashionlabel.label.plan import LabelConfig, LabelError, Plan, plan_resources
from fashionlabel.label.reader import read_shards, skip_keys
from fashionlabel.label.schema import labels_schema
from fashionlabel.label.writer import (
    PartWriter,
    foreign_parts,
    labelled_keys,
    part_name,
    run_totals,
    strangers,
)
from fashionlabel.lease import Lease
from fashionlabel.shards import list_shards

log = logging.getLogger(__name__)

# the labelling API, wherever its parts live (plan.py, actor.py)
__all__ = ["CRASH_ONCE_ENV", "LabelConfig", "LabelError", "label_shards", "plan_resources"]

# held in the run folder by the job labelling it (``_``: Athena, pandas and Spark skip it as data)
LEASE = "_label.lease"
PROGRESS_EVERY = 10.0  # seconds between the run's progress lines


def label_shards(
    shards: str,
    model_dir: str,
    out: str,
    run_date: str | None = None,
    cfg: LabelConfig = LabelConfig(),
    skip: dict[str, str] | None = None,
    incremental: bool = False,
    progress: Callable[[int], None] | None = None,
    manifest: str = "_SUCCESS",
) -> dict[str, Any]:
    """Label every shard of ``shards`` into ``out/history/run_date=D/``; return the run summary.

    Args:
        skip: product_id → image_sha256 already labelled by this model: not relabelled, counted as skipped.
        incremental: also skip every product that this model version already labelled without error
            under ``out/history`` (any run date), with the same image_sha256.
        progress: called with the row count of every batch that comes back from the actors.
        manifest: the name of the run folder's manifest, written once every shard has its part. A caller
            that adds more parts afterwards (a nightly relabel) gives another name and writes ``_SUCCESS``
            itself, last, since readers take ``_SUCCESS`` to mean the folder is complete.
    """
    from fashionlabel.runtime import cluster_cpus, cluster_gpus, node_cpus_now
    from fashionlabel.train.export import artifact_spec  # torch: not in the read tasks that import this

    t0 = time.time()
    model_dir = storage.absolute(model_dir)
    run_date = settings.run_date(run_date)  # today in UTC by default, as nightly dates are
    plan = plan_resources(cfg, cluster_cpus(), cluster_gpus(), node_cpus_now())
    out_dir = storage.join(out, "history", f"run_date={run_date}")
    uris = list_shards(shards)
    # the artifact is checked on the driver (files, content hash) without building the model: a broken
    # one is refused before any folder is made, not in every actor's traceback
    spec = artifact_spec(model_dir)
    storage.makedirs(out_dir)
    if storage.is_s3(out_dir):  # a missing bucket or read-only credentials named as such, before the lease
        storage.check_writable(out_dir)
    # one labelling job per run folder: a second one (the same command run again while the first still
    # runs, or another model into the same date) would label every shard again and replace the first
    # one's parts under it, leaving a folder of two runs, or two models, behind one _SUCCESS
    with Lease(storage.join(out_dir, LEASE), f"labelling of {out_dir}"):
        # under the lease, no other job writes here: a temporary file is what a killed attempt left
        if dropped := storage.drop_temporaries(out_dir):
            log.info("%s: %d temporary file(s) of a killed attempt removed", out_dir, dropped)
        todo, resumed = _todo(out_dir, uris, shards, spec["version"])
        plan = _fit_pool(plan, len(todo))
        # an attempt that finishes a killed one's folder goes on under its run id: one run, one id, as the
        # rows of a date's folder are one run's (the first attempt's parts are kept, not labelled again)
        run_id = resumed or f"{run_date}-{uuid.uuid4().hex[:8]}"
        log.info(
            "label: %d shards, %d already done for %s, %d to label; %s",
            len(uris),
            len(uris) - len(todo),
            run_date,
            len(todo),
            plan,
        )
        writer = PartWriter(out_dir, labels_schema(spec["taxonomy_obj"]), spec["version"], run_id)
        first = None  # seconds from the call to the first labelled batch: the run's start-up
        compiled: set[str] = set()  # how the actors had their compiled model ("jit", "built", "loaded")
        if todo:
            keys = _skip_keys(out, spec["version"], skip, incremental)
            t_start = last = time.time()
            try:
                for batch in _plan(todo, model_dir, run_id, plan, spec, keys).iter_batches(
                    batch_size=None, batch_format="pyarrow"
                ):
                    first = first if first is not None else time.time() - t0
                    compiled.update(batch["compiled_from"].unique().to_pylist())
                    writer.add(batch)
                    if progress:
                        progress(batch.num_rows)
                    if time.time() - last >= PROGRESS_EVERY and writer.counts["files"] < len(todo):
                        last = time.time()
                        labelled = writer.counts["labelled"] + writer.counts["errored"]
                        log.info(
                            "label: %s",
                            progress_line(writer.counts["files"], len(todo), labelled, last - t_start),
                        )
            except Exception as e:  # a shard set not on an actor's node: named, not Ray Data's traceback
                if (named := storage.task_error(e)) is e:
                    raise
                raise named from None
            if writer.incomplete:
                raise RuntimeError(
                    f"label rows missing for {len(writer.incomplete)} shards: {writer.incomplete[:3]}"
                )
        seconds = time.time() - t0
        c = writer.counts
        success = storage.join(out_dir, manifest)
        if not todo and storage.exists(success):
            # nothing written: the rows in the folder carry the id of the run that completed it, not this one's
            run_id = storage.read_json(success).get("last_run_id", run_id)
        summary = {
            "run_date": run_date,
            "run_id": run_id,
            "wrote": bool(todo),
            "model_version": spec["version"],
            "taxonomy_version": spec["taxonomy_version"],
            "shards": len(uris),
            "shards_done_before": len(uris) - len(todo),
            "labelled": c["labelled"],
            "errored": c["errored"],
            "skipped": c["skipped"],
            "damaged_shards": c["damaged"],
            "seconds": seconds,
            "first_batch_seconds": first,
            "images_per_s": (c["labelled"] + c["errored"]) / seconds if seconds else 0.0,
            "decode": plan.decode
            + (f" ({plan.cpu_decode_share:.0%} decoded at read)" if plan.decode == "split" else ""),
            "read": "actors" if plan.read_in_actor else "tasks",
            "actors": plan.actors,
            "compiled": ", ".join(COMPILED[m] for m in sorted(compiled) if m in COMPILED),
            "device": plan.device,
            "batch_size": plan.batch_size,
            "out": out_dir,
        }
        totals = run_totals(out_dir)
        summary["files"] = totals["files"]
        _write_manifest(success, summary, totals, plan, did_work=bool(todo))
        return summary


def progress_line(written: int, shards: int, labelled: int, elapsed: float) -> str:
    """One progress line of a labelling run: its own, with the eta that Ray Data's lines lack (they count
    output rows against a guess, ``0/?`` for a relabel).

    Args:
        written: shards whose part is published, of ``shards`` to label this run.
        labelled: products in those parts (errors included).
        elapsed: seconds since labelling started (actor start-up included).
    """
    head = f"{written}/{shards} shards written, {labelled} products"
    if not written:
        return f"{head}, {elapsed:.0f} s in; rate and eta once the first shard is written"
    return f"{head}, {labelled / max(elapsed, 1e-9):.0f} img/s, eta {(shards - written) * elapsed / written:.0f} s"


def _todo(out_dir: str, uris: list[str], shards: str, model_version: str) -> tuple[list[str], str | None]:
    """The shards of ``uris`` that have no part in ``out_dir`` yet, and the run id of the parts that are
    there (the most frequent one), if any. Parts under the same names that hold other shards (a second
    shards folder labelled into the same run folder) or another model's labels are refused, not skipped as
    done."""
    if found := strangers(out_dir):
        # every file of the folder is read as labels by Athena, Spark and pandas (the run's totals failed on
        # a zero-byte one, naming no file): said now, before any shard is labelled
        raise LabelError(
            f"{out_dir} holds {len(found)} file(s) that no labelling run wrote ({', '.join(found[:3])}): "
            "readers of the folder would take them for labels; move them out of it and run again"
        )
    done = set(storage.listdir(out_dir, ".parquet"))
    clashes, unreadable, run_ids = foreign_parts(out_dir, uris, done, model_version)
    if clashes:
        part, holds = clashes[0]
        raise LabelError(
            f"{out_dir} already holds other labels under the same names ({len(clashes)} parts, e.g. {part} "
            f"from {holds}); label {shards} with model version {model_version} into another --out or "
            "--run-date"
        )
    done -= set(unreadable)  # a damaged part is rewritten (atomically) by labelling its shard again
    resumed = run_ids.most_common(1)[0][0] if run_ids else None
    return [u for u in uris if part_name(u) not in done], resumed


def _fit_pool(plan: Plan, shards: int) -> Plan:
    """``plan`` with no more actors than ``shards`` when each actor reads whole shards, one per call.

    An actor beyond the shards left would load the model and never get a call (a re-run with two shards
    left, a night of a few new products on a large pool), and Ray Data warned in the job's log that
    the pool's minimum could not be used. With read tasks, rows are batched across shards: every actor
    can get work, and the plan stays as it is.
    """
    if plan.read_in_actor and 0 < shards < plan.actors:
        return replace(plan, actors=shards)
    return plan


def _write_manifest(
    success: str, summary: dict[str, Any], totals: dict[str, int], plan: Plan, did_work: bool
) -> None:
    """The manifest (``_SUCCESS``) once every shard has its part: the folder's totals and the run that
    completed it. A re-run with nothing left to do leaves the manifest of the run that did the work."""
    if totals["files"] >= summary["shards"] and (did_work or not storage.exists(success)):
        storage.write_json(
            success,
            {
                "run_date": summary["run_date"],
                "last_run_id": summary["run_id"],
                "model_version": summary["model_version"],
                "taxonomy_version": summary["taxonomy_version"],
                "shards": summary["shards"],
                **totals,
                # the attempt that completed the folder (earlier attempts of a killed run are not in it)
                "last_run_seconds": summary["seconds"],
                "last_run_first_batch_seconds": summary["first_batch_seconds"],
                "last_run_images_per_s": summary["images_per_s"],
                "plan": asdict(plan),
                "finished_at": dt.datetime.now(dt.UTC).isoformat(),
            },
        )


def _skip_keys(
    out: str, model_version: str, skip: dict[str, str] | None, incremental: bool
) -> pa.Array | None:
    parts = []
    if skip:
        parts.append(skip_keys(list(skip), list(skip.values())))
    if incremental:
        parts.append(labelled_keys(out, model_version))
    return pa.concat_arrays(parts) if parts else None


def _read_task_args() -> dict[str, Any]:
    # A shard read is idempotent: a read task lost with its worker is simply run again.
    return {"max_retries": 3}


def _plan(
    todo: list[str],
    model_dir: str,
    run_id: str,
    plan: Plan,
    spec: dict[str, Any],
    skip: pa.Array | None,
) -> Any:
    import ray

    size = tuple(spec["preprocessing"]["size"])
    read = {"decode_on": plan.decode, "size": size, "skip": skip, "cpu_share": plan.cpu_decode_share}
    ds = ray.data.from_items([{"shard": u} for u in todo], override_num_blocks=len(todo))
    if plan.read_in_actor:
        return _labelers(ds, model_dir, run_id, plan, read=read, batch_size=1)
    # The read's remote args come from a function: Ray Data never fuses an operator that has one into its
    # neighbour. Fused into the actor stage, the read would hand an actor every shard URI in one bundle
    # (batch_size rows of URIs) to label serially, and nothing would stream back until the end. That is
    # Ray 2.60's fusion rule; test_labels_stream_back_shard_by_shard fails if a Ray upgrade changes it.
    ds = ds.map_batches(
        read_shards,
        batch_size=1,
        fn_kwargs=read,
        num_cpus=plan.read_cpus,
        ray_remote_args_fn=_read_task_args,
        compute=ray.data.TaskPoolStrategy(size=plan.read_tasks),
    )
    return _labelers(ds, model_dir, run_id, plan, read=None, batch_size=plan.batch_size)


def _labelers(
    ds: Any,
    model_dir: str,
    run_id: str,
    plan: Plan,
    read: dict[str, Any] | None,
    batch_size: int,
) -> Any:
    """The actor stage: rows of products (``read`` None), or shard URIs, one per call, read in the actor."""
    import ray

    env = {k: v for k, v in os.environ.items() if k.startswith("FASHIONLABEL_")}
    return ds.map_batches(
        Labeler,
        fn_constructor_kwargs={
            "model_dir": str(model_dir),
            "run_id": run_id,
            "plan": plan,
            "read": read,
        },
        batch_size=batch_size,
        # A fixed pool: every actor starts at once, no ramp-up while the first batches wait.
        compute=ray.data.ActorPoolStrategy(size=plan.actors, max_tasks_in_flight_per_actor=2),
        num_cpus=plan.actor_cpus,
        num_gpus=plan.actor_gpus or None,
        # Ray Data's actor pool restarts a dead actor and retries its in-flight batches by default
        # (max_restarts / max_task_retries = -1); per-call remote args are deprecated in Ray 2.60.
        runtime_env={"env_vars": env} if env else None,
    )
