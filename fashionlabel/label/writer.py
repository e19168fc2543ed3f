"""The write stage of labelling: label rows streamed back from the actor pool → one Parquet file per shard.

Rows of one shard may arrive in several batches from several actors. The writer on the driver holds a
shard's rows until all of them are in (the read stage tells it how many to expect), then publishes
``part-<shard>.parquet`` atomically (rename locally, one upload on S3). Names are a pure function of the
input shard, so a re-run lists the parts of its date and labels only the missing shards: a product is
never written twice. Each file carries its counts in the Parquet key-value metadata, so the run manifest
(``_SUCCESS``) is summed from file footers alone, also across partial re-runs.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from fashionlabel import storage

log = logging.getLogger(__name__)

META_KEY = b"fashionlabel"


def part_name(shard_uri: str) -> str:
    """The labels file name of a shard: ``.../shard-000042.tar`` → ``part-shard-000042.parquet``."""
    return "part-" + shard_uri.rstrip("/").rsplit("/", 1)[-1].removesuffix(".tar") + ".parquet"


def is_part(name: str) -> bool:
    """Whether the file ``name`` of a run folder is a labels part, as `label` and `nightly` write them."""
    return name.startswith("part-") and name.endswith(".parquet")


def part_uris(out_dir: str) -> list[str]:
    """The labels parts of the run folder ``out_dir``, as readers take them: a Parquet file dropped into the
    folder by hand is no labels (``query`` reads the same files)."""
    return [storage.join(out_dir, n) for n in storage.listdir(out_dir, ".parquet") if is_part(n)]


def strangers(out_dir: str) -> list[str]:
    """Files of the run folder ``out_dir`` that no labelling run wrote and that a reader of the folder would
    take for labels: neither a part nor hidden (``_`` or ``.``, which Athena, Spark and pandas skip)."""
    names = storage.listdir(out_dir)
    return [n for n in names if not is_part(n) and not n.startswith(("_", "."))]


class ModelChangedError(RuntimeError):
    """Label rows of another model version than the run's: its model folder was replaced while it ran."""


class PartWriter:
    """Collects label rows per shard and publishes each shard's file as soon as it is complete."""

    def __init__(self, out_dir: str, schema: pa.Schema, model_version: str, run_id: str = ""):
        self.out_dir, self.schema = out_dir, schema
        # recorded in every part's footer, empty parts included: another model's run must not take a part
        # of this one as done
        self.model_version = model_version
        self.run_id = run_id  # in the footer too: an attempt that resumes the run goes on under its id
        self.pending: dict[str, list[pa.Table]] = {}
        self.seen: dict[str, set[str]] = {}  # product ids received per pending shard
        self.published: set[str] = set()
        self.damage: dict[str, str | None] = {}
        self.counts = {"labelled": 0, "errored": 0, "skipped": 0, "damaged": 0, "files": 0}

    def add(self, batch: pa.Table) -> None:
        if batch.num_rows == 0:
            return
        self._check_version(batch)
        for shard in pc.unique(batch["shard"]).to_pylist():
            part = batch.filter(pc.equal(batch["shard"], shard))
            if shard in self.published:  # a copy of a batch of a shard already written: nothing new in it
                log.warning(
                    "%s: %d label rows received after the shard was written, dropped", shard, part.num_rows
                )
                continue
            expected = part["shard_rows"][0].as_py()
            skipped = part["shard_skipped"][0].as_py()
            self.damage.setdefault(shard, part["shard_damage"][0].as_py())
            rows = self._new_rows(shard, part.filter(pc.invert(part["marker"])))
            self.pending.setdefault(shard, []).append(rows.select(self.schema.names))
            got = len(self.seen[shard])
            if got > expected:
                raise RuntimeError(f"{shard}: {got} label rows for {expected} products")
            if got == expected:
                self._publish(shard, skipped)

    def _check_version(self, batch: pa.Table) -> None:
        """Each actor loads the model when it starts (or restarts, after a crash): one that starts after
        the model folder was replaced (``train --overwrite``, ``calibrate`` or ``prune`` re-run into it, a
        copy over it) labels with the new model. Its rows went into the run's parts beside the old model's,
        under a footer and ``_SUCCESS`` naming the old version: one run of two models, said nowhere."""
        other = sorted(set(pc.unique(batch["model_version"]).to_pylist()) - {self.model_version})
        if other:
            raise ModelChangedError(
                f"the model was replaced while {self.out_dir} was labelled with it: the run started with "
                f"version {self.model_version}, and an actor loaded version {other[0]}. No row of "
                f"{other[0]} was written; the parts written are {self.model_version}'s, whole. Keep the "
                "model in place while a run labels with it (write a new model to a new folder)"
            )

    def _new_rows(self, shard: str, rows: pa.Table) -> pa.Table:
        """``rows`` less products this shard already has: a batch delivered twice (a retried task whose
        first attempt had delivered) must neither duplicate a product nor complete the shard early."""
        seen = self.seen.setdefault(shard, set())
        fresh = []
        for pid in rows["product_id"].to_pylist():
            fresh.append(pid not in seen)
            seen.add(pid)
        if not all(fresh):
            log.warning("%s: %d label rows received twice, kept once", shard, fresh.count(False))
            rows = rows.filter(pa.array(fresh))
        return rows

    def _publish(self, shard: str, skipped: int) -> None:
        self.seen.pop(shard, None)
        self.published.add(shard)
        table = pa.concat_tables(self.pending.pop(shard)).cast(self.schema)
        errored = table.num_rows - table["error"].null_count
        meta = {
            "shard": shard,
            "model_version": self.model_version,
            "run_id": self.run_id,
            "rows": table.num_rows,
            "labelled": table.num_rows - errored,
            "errored": errored,
            "skipped": skipped,
            # a damaged tar: its readable products are labelled, those the index lists get error rows
            "damaged": int(self.damage.get(shard) is not None),
            "damage": self.damage.pop(shard, None),
        }
        table = table.replace_schema_metadata({META_KEY: json.dumps(meta).encode()})
        storage.write_parquet(table, storage.join(self.out_dir, part_name(shard)))
        for k in ("labelled", "errored", "skipped", "damaged"):
            self.counts[k] += meta[k]
        self.counts["files"] += 1

    @property
    def incomplete(self) -> list[str]:
        return sorted(self.pending)


def _part_meta(fs, folder: str, name: str) -> dict:
    """The counts a part file carries in its footer (no data pages read)."""
    meta = pq.read_metadata(f"{folder}/{name}", filesystem=fs).metadata or {}
    return json.loads(meta.get(META_KEY, b"{}"))


def _same_shard(a: str, b: str) -> bool:
    return a == b or (
        not storage.is_s3(a) and not storage.is_s3(b) and os.path.normpath(a) == os.path.normpath(b)
    )


def foreign_parts(
    out_dir: str, uris: list[str], done: set[str], model_version: str
) -> tuple[list[tuple[str, str]], list[str], Counter[str]]:
    """(part, what it holds instead) for the published parts of ``out_dir`` that carry the name of one of
    ``uris`` but were written from another shard (e.g. a second shards folder labelled into the same run
    date) or by another model version. Skipping those as done would silently leave the new shards
    unlabelled, or this model's labels unwritten. Second: the parts of ``uris`` whose footer cannot be read
    (damaged on disk after they were published, cut short by a copy): not done, so labelled again. Third:
    the run ids the readable parts carry, with their counts."""
    fs, path = storage.filesystem(out_dir)
    clashes, unreadable, run_ids = [], [], Counter()
    for uri in uris:
        name = part_name(uri)
        if name not in done:
            continue
        try:
            meta = _part_meta(fs, path, name)
        except (OSError, pa.ArrowInvalid, ValueError) as e:
            log.warning("%s/%s cannot be read (%s): its shard is labelled again", out_dir, name, e)
            unreadable.append(name)
            continue
        holds, version = meta.get("shard"), meta.get("model_version")
        if holds and not _same_shard(holds, uri):
            clashes.append((name, holds))
        elif version and version != model_version:
            clashes.append((name, f"model version {version}"))
        elif meta.get("run_id"):
            run_ids[meta["run_id"]] += 1
    return clashes, unreadable, run_ids


def run_totals(out_dir: str) -> dict[str, int]:
    """Counts of a run folder summed from its part files' footers (no data pages read)."""
    fs, path = storage.filesystem(out_dir)
    tot = {"rows": 0, "labelled": 0, "errored": 0, "skipped": 0, "damaged": 0, "files": 0}
    for uri in part_uris(out_dir):
        m = _part_meta(fs, path, uri.rsplit("/", 1)[-1])
        tot["files"] += 1
        for k in ("rows", "labelled", "errored", "skipped", "damaged"):
            tot[k] += int(m.get(k, 0))
    return tot


def labelled_keys(out: str, model_version: str) -> pa.Array:
    """``product_id \\x1f image_sha256`` of every product that ``model_version`` already labelled
    without error, over every run date of ``out/history`` (for ``--incremental``)."""
    import pyarrow.dataset as pds
    import pyarrow.fs as pafs

    from fashionlabel.label.reader import skip_keys

    history = storage.join(out, "history")
    fs, path = storage.filesystem(history)
    if not storage.exists(history):
        return pa.array([], pa.string())
    # the parts alone, as `query` reads them: a file dropped into a run folder by hand is no labels
    found = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    parts = [f.path for f in found if f.type == pafs.FileType.File and is_part(f.base_name)]
    if not parts:  # run folders with no part yet (a first run killed before its first file)
        return pa.array([], pa.string())
    data = pds.dataset(parts, filesystem=fs, format="parquet")
    t = data.to_table(
        columns=["product_id", "image_sha256"],
        filter=(pds.field("model_version") == model_version) & pds.field("error").is_null(),
    )
    log.info("incremental: %d products already labelled by model %s", t.num_rows, model_version)
    if t.num_rows == 0:
        return pa.array([], pa.string())
    return pc.unique(skip_keys(t["product_id"].to_pylist(), t["image_sha256"].to_pylist()))
