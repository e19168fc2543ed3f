"""The labelling actor: loads the model once (``Predictor``); each call turns a batch of products (or of
shard URIs, when actors read their own shards) into label rows, with null labels and ``error`` set for a
product whose image could not be read or decoded.
"""

from __future__ import annotations

import datetime as dt
import os
from typing import Any

import numpy as np
import pyarrow as pa

from fashionlabel.label.plan import Plan
from fashionlabel.label.reader import read_shards
from fashionlabel.label.schema import labels_schema

# Fault injection for tests: when set to a path, the first labelling call of the run that finds no file
# there creates it and kills its actor process (to prove restart + retry). Never set in production.
CRASH_ONCE_ENV = "FASHIONLABEL_CRASH_ONCE_MARKER"


# How the actors of a run had their compiled model (``Predictor.compiled_from``), as the summary says it.
COMPILED = {"built": "AOT package built", "loaded": "AOT package loaded", "jit": "torch.compile"}


class Labeler:
    """Ray actor: loads the model once; each call labels one batch of products into label columns.

    With ``read`` (the reader's keyword arguments) a call gets shard URIs instead, and reads them first.
    """

    def __init__(self, model_dir: str, run_id: str, plan: Plan, read: dict[str, Any] | None = None):
        import torch

        from fashionlabel.label.predictor import Predictor

        if plan.device == "cpu":
            torch.set_num_threads(plan.threads)
        self.pred = Predictor(
            model_dir,
            device=plan.device,
            batch_size=plan.batch_size,
            compile=plan.compile,
            compile_cache=plan.compile_cache,
        )
        self.decode, self.run_id, self.read = plan.decode, run_id, read
        self.compiled_from = self.pred.compiled_from  # told to the driver with every batch
        self.ident = {
            "model_version": self.pred.version,
            "taxonomy_version": self.pred.taxonomy.version,
            "run_id": run_id,
        }
        self.label_fields = [
            f
            for f in labels_schema(self.pred.taxonomy)
            if f.name
            not in (
                "product_id",
                "image_sha256",
                "model_version",
                "taxonomy_version",
                "run_id",
                "labeled_at",
                "error",
            )
        ]

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        from fashionlabel.label.postprocess import to_columns

        _crash_once()
        if self.read is not None:
            batch = read_shards(batch, **self.read)
        n = len(batch["shard"])
        errors = _strings(batch["error"])
        ok = [i for i in range(n) if errors[i] is None and not batch["marker"][i]]
        if self.decode in ("gpu", "split"):
            pixels = [batch["pixels"][i] for i in ok] if "pixels" in batch else None
            images, bad = self.pred.decode_on_device([batch["jpg"][i] for i in ok], pixels)
            for j, reason in bad.items():
                errors[ok[j]] = reason
            ok = [i for j, i in enumerate(ok) if j not in bad]
        else:
            images = batch["image"][ok]
        cols = to_columns(self.pred.taxonomy, self.pred.probs_on_device(images), self.pred.calibration)
        # Rows in batch order: labelled rows take their labels, the others (errors, markers) nulls.
        order = np.full(n, len(ok), dtype=np.int64)
        order[ok] = np.arange(len(ok))
        others = np.flatnonzero(order == len(ok))
        order[others] = len(ok) + np.arange(len(others))
        take = pa.array(order)
        out = {
            "product_id": pa.array(_strings(batch["product_id"]), pa.string()),
            "image_sha256": pa.array(_strings(batch["image_sha256"]), pa.string()),
            **{k: pa.array([v] * n, pa.string()) for k, v in self.ident.items()},
            "labeled_at": pa.array([dt.datetime.now(dt.UTC)] * n, pa.timestamp("us", tz="UTC")),
        }
        for f in self.label_fields:
            arr = cols[f.name]
            out[f.name] = pa.concat_arrays([arr.cast(f.type), pa.nulls(len(others), f.type)]).take(take)
        out["needs_review"] = out["needs_review"].fill_null(True)  # an unlabelled product needs a look
        out["error"] = pa.array(errors, pa.string())
        for k in ("shard", "shard_rows", "shard_skipped", "marker"):
            out[k] = pa.array(batch[k])
        out["shard_damage"] = pa.array(_strings(batch["shard_damage"]), pa.string())
        out["compiled_from"] = pa.array([self.compiled_from] * n, pa.string())
        return pa.table(out)


def _strings(col: np.ndarray) -> list[str | None]:
    """A string column as Python values; an all-null column comes back from Arrow as NaN floats."""
    return [v if isinstance(v, str) else None for v in col]


def _crash_once() -> None:
    marker = os.environ.get(CRASH_ONCE_ENV)
    if not marker:
        return
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.close(fd)
    os._exit(1)
