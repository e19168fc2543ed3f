"""``fashionlabel train`` and ``fashionlabel evaluate``: the library functions behind the commands.

train: shards → Ray Train fit → calibration on validation → metrics on validation and test (products held
out by the split, never trained on) → model artifact (+ curves.json / curves.png).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fashionlabel import storage
from fashionlabel.data import IMAGENET_MEAN, IMAGENET_STD, load_samples, split_of
from fashionlabel.label.postprocess import consistent_choice, needs_review, scores, threshold
from fashionlabel.label.predictor import Predictor
from fashionlabel.models import create_model, reparameterize_model
from fashionlabel.shards import list_shards
from fashionlabel.taxonomy import Taxonomy
from fashionlabel.train import checkpoint as ckpt
from fashionlabel.train.calibrate import calibrate
from fashionlabel.train.config import (
    TrainConfig,
    config_adjusted,
    config_differences,
    same_config,
    saved_config,
)
from fashionlabel.train.export import cache_root, check_replaceable, save_artifact
from fashionlabel.train.loop import fit
from fashionlabel.train.metrics import confusion, evaluate_probs, metrics_json, thresholded_prf

log = logging.getLogger(__name__)


def shards_taxonomy(shards: str) -> Taxonomy:
    """The taxonomy a shard set was written with (its ``stats.json``)."""
    from fashionlabel.shards import NotAShardSet

    path = storage.join(shards, "stats.json")
    if not storage.exists(path):
        raise NotAShardSet(
            f"{shards} is not a shard set: no stats.json there (write one with `fashionlabel shard`)"
        )
    return Taxonomy.from_dict(storage.read_json(path)["taxonomy"])


def train(
    shards: str,
    out: str,
    cfg: TrainConfig,
    num_cpus: float,
    checkpoints: str | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Train on ``shards`` and write the artifact to ``out``; return a summary dict.

    Args:
        checkpoints: folder or ``s3://`` prefix for the per-epoch checkpoints (default ``OUT.train/checkpoints``).
        overwrite: replace a model in ``out`` and checkpoints that were trained with other settings
            (without it they are refused by name: a re-run with the same settings resumes or re-exports).
    """
    t0 = time.time()
    taxonomy = training_taxonomy(shards)
    # the index, read once for the checks below and the fingerprint; each product's split computed once
    index = storage.read_parquet(storage.join(shards, "index.parquet"))
    splits = np.array([split_of(pid) for pid in index.column("product_id").to_pylist()])
    _check_splits(shards, splits)
    _check_head_labels(shards, taxonomy, index, splits == "train")
    if storage.is_s3(out):  # Ray Train's own state stays local; the checkpoints go beside the model
        run_dir = str(cache_root() / "runs" / out.removeprefix("s3://").replace("/", "_")) + ".train"
        checkpoints = checkpoints or out.rstrip("/") + ".train/checkpoints"
    else:
        run_dir = str(Path(out).absolute()) + ".train"
    if cfg.init_weights:
        cfg = dataclasses.replace(cfg, init_weights=check_init_weights(cfg.init_weights, cfg.model, taxonomy))
    _check_resources(cfg)
    _check_checkpoint_reach(out, checkpoints)
    data = shards_fingerprint(shards, taxonomy, index)
    _check_out(shards, out, cfg, checkpoints or storage.join(run_dir, "checkpoints"), overwrite, data)
    done = None if overwrite else _already_trained(out, cfg, data)
    if done is not None:
        return done | {"seconds": time.time() - t0}
    _check_writable(out, checkpoints, run_dir)
    best = fit(shards, run_dir, taxonomy, cfg, IMAGENET_MEAN, IMAGENET_STD, num_cpus, checkpoints, data)
    return export_state(shards, out, best, taxonomy, data) | {"seconds": time.time() - t0}


def _already_trained(out: str, cfg: TrainConfig, data: str) -> dict[str, Any] | None:
    """The summary of the model at ``out`` when it was trained with these settings on these shards (``data``:
    their fingerprint), else None. Such a re-run would resume finished checkpoints and export the same
    version again: it starts no worker and writes nothing (a minute of Ray Train's start-up and an
    evaluation on a small machine, more on a large test split)."""
    from fashionlabel.train.export import ArtifactError, artifact_spec

    if not storage.exists(storage.join(out, "model.json")):
        return None
    try:
        spec = artifact_spec(out)  # whole and unaltered: files present, content hash matches
        metrics = storage.read_json(storage.join(out, "metrics.json"))
        curves = storage.read_json(storage.join(out, "curves.json"))
    except (ArtifactError, OSError, storage.StorageError, ValueError):
        return None  # a damaged or partial artifact: trained and exported again
    training = spec.get("training", {})
    if not same_config(training.get("config") or {}, cfg) or training.get("shards_fingerprint") != data:
        return None
    rates = [h["train_img_per_s"] for h in curves if isinstance(h, dict) and "train_img_per_s" in h]
    log.info("%s already holds this model, trained with these settings on these shards: nothing to do", out)
    return {
        "version": spec["version"],
        "metrics": metrics,
        "training": training | {"train_img_per_s_median": float(np.median(rates)) if rates else 0.0},
        "out": out,
        "already_trained": True,
    }


def shards_fingerprint(shards: str, taxonomy: Taxonomy, index: Any = None) -> str:
    """What a run learns from, as a hash: the taxonomy version, the shard set's image settings and every
    packed product's id, source image (sha256), size and labels (``index.parquet``). Where the shards lie
    is left out, so a moved copy of the same shard set resumes its run; a shard set of another catalog,
    other labels or another taxonomy does not (resuming on it would mix two data sets in one model).
    ``index``: the shard set's index table when the caller has read it already."""
    import hashlib

    import pyarrow as pa

    stats = storage.read_json(storage.join(shards, "stats.json"))
    settings = {k: stats.get("config", {}).get(k) for k in ("max_side", "jpeg_quality")}
    idx = index if index is not None else storage.read_parquet(storage.join(shards, "index.parquet"))
    idx = idx.drop_columns([c for c in ("key", "shard", "image_uri") if c in idx.column_names])
    idx = idx.select(sorted(idx.column_names)).sort_by("product_id").combine_chunks()
    idx = idx.replace_schema_metadata(None)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, idx.schema) as w:
        w.write_table(idx)
    h = hashlib.sha256(json.dumps([taxonomy.version, settings], sort_keys=True).encode())
    h.update(sink.getvalue().to_pybytes())
    return h.hexdigest()[:16]


def _check_out(shards: str, out: str, cfg: TrainConfig, checkpoints: str, overwrite: bool, data: str) -> None:
    """Refuse, before any worker starts, an ``--out`` that training would destroy: anything but a new or
    empty folder or a model artifact (the artifact is replaced atomically, and the folder with it), the
    shard set itself, or a model or checkpoints trained with other settings or on other shards (``data``:
    their :func:`shards_fingerprint`), unless ``overwrite``."""
    if not storage.is_s3(out):
        o, sh = Path(out).absolute(), Path(shards.removeprefix("file://")).absolute()
        if o == sh or o in sh.parents or sh in o.parents:
            raise ValueError(
                f"--out {out} is the shard set, inside it, or holds it: give the model a folder of its own"
            )
        # The export replaces the model's folder whole: checkpoints in it would make the finished run's
        # export refuse a folder that is not a model, and a killed run could never resume.
        c = Path(storage.absolute(checkpoints))
        if not storage.is_s3(checkpoints) and (c == o or o in c.parents):
            raise ValueError(
                f"--storage {checkpoints} is inside --out {out}, whose folder the model replaces whole: give "
                "the checkpoints a folder outside it (the default is OUT.train/checkpoints)"
            )
    check_replaceable(out)
    spec = storage.join(out, "model.json")
    held = storage.read_json(spec).get("training", {}) if storage.exists(spec) else {}
    saved = held.get("config")
    if saved is not None and not same_config(saved, cfg) and not overwrite:
        raise ValueError(
            f"--out {out} holds a model trained with other settings ({config_differences(saved, cfg)}): give "
            "another --out, or add --overwrite to replace it"
        )
    # A model of the same settings trained on other shards: a re-run would resume its finished
    # checkpoints and export them calibrated and measured on these shards, as if trained on them.
    if held.get("shards_fingerprint") not in (None, data) and not overwrite:
        raise ValueError(
            f"--out {out} holds a model trained on other shards than {shards} (another catalog, other "
            "labels, images or taxonomy): give another --out, or add --overwrite to replace it"
        )
    state = ckpt.load(checkpoints)
    if state is not None and not same_config(state["config"], cfg) and not overwrite:
        raise ValueError(
            f"{checkpoints} holds the checkpoints of a run with other settings ({config_differences(state['config'], cfg)}),"
            " which this run would replace: run the same command as before to resume it, give another --out "
            "(or --storage), or add --overwrite to start again"
        )
    if state is not None and not overwrite and (changed := config_adjusted(state["config"])):
        # the resumed epochs follow this run's schedule, not the one the checkpoint's epochs followed
        log.warning(
            "%s holds the checkpoints of a run written with %s: its epochs after epoch %d follow that "
            "warm-up (the learning rate steps up to where it is on it)",
            checkpoints,
            changed,
            state["epoch"],
        )
    # (a checkpoint written before fingerprints were kept is taken as the same run, as it always was)
    if state is not None and state.get("shards_fingerprint", data) != data and not overwrite:
        raise ValueError(
            f"{checkpoints} holds the checkpoints of a run on other shards than {shards} (another catalog, "
            "other labels, images or taxonomy), which this run would replace: resume it on the shards it "
            "started with, give another --out (or --storage), or add --overwrite to start again"
        )


def _check_writable(out: str, checkpoints: str | None, run_dir: str) -> None:
    """Probe the model, checkpoint and run folders (local or ``s3://``) before any worker starts: a missing
    bucket or credentials without write access would otherwise fail rank 0 at its first checkpoint, an
    epoch in, and a local folder that cannot be created failed Ray Train's controller with a traceback."""
    for uri in dict.fromkeys(u for u in (checkpoints, out, run_dir) if u):
        storage.check_writable(uri)


def _check_resources(cfg: TrainConfig) -> None:
    """A worker group the cluster cannot place waits for ever (Ray Train retries its start): refuse it."""
    if cfg.gpu:
        from fashionlabel.runtime import cluster_gpus

        gpus = cluster_gpus()
        if gpus < cfg.workers:
            raise ValueError(
                f"--gpu with --workers {cfg.workers} needs {cfg.workers} GPU(s); the Ray cluster has {gpus:g}"
            )


def _check_checkpoint_reach(out: str, checkpoints: str | None, spans: bool | None = None) -> None:
    """Rank 0 writes the checkpoints where it runs and the driver exports from them, and a resumed run's
    ranks each read them: across nodes a default local folder would be a different one on each."""
    if storage.is_s3(out) or checkpoints is not None:
        return  # S3, or a folder named on purpose (a filesystem every node mounts)
    if spans is None:
        from fashionlabel.runtime import may_span_nodes

        spans = may_span_nodes()
    if spans:
        raise ValueError(
            f"training on a Ray cluster may place workers on other nodes, where --out {out}'s checkpoint "
            "folder would be another one: give --storage s3://… (or a folder every node mounts), or an "
            "s3:// --out"
        )


def check_init_weights(path: str, model_name: str, taxonomy: Taxonomy) -> str:
    """``--init-weights`` made absolute (workers run elsewhere; an ``s3://`` one, which ranks on any node
    read, names the object) and checked on the driver: a file that
    torch loads safely as a state_dict (or a training checkpoint's ``model``) and that fits most of the
    model; a file of another architecture would otherwise load silently as almost nothing. Logs what is
    carried over: heads row by row, by value name (``train/init_weights.py``)."""
    from fashionlabel.train.export import ArtifactError
    from fashionlabel.train.init_weights import apply_init, describe

    if storage.is_s3(path):  # read by every rank from the bucket, on whichever node it runs
        p: Path | str = path.rstrip("/")
        if storage.exists(storage.join(str(p), "weights.pt")):  # a model artifact's prefix: its weights
            p = storage.join(str(p), "weights.pt")
        elif not storage.exists(str(p)):
            raise ValueError(
                f"--init-weights {path}: no such object, nor a model (weights.pt) under that prefix"
            )
    else:
        p = Path(path).expanduser().absolute()
        if p.is_dir() and (p / "weights.pt").is_file():  # a model artifact folder: its weights
            p = p / "weights.pt"
        if p.is_dir() and (p / "model.json").is_file():  # a model whose weights are gone: say that
            raise ValueError(
                f"--init-weights {path} is a model folder without its weights.pt (a copy cut short, or the "
                "file removed): name a complete model, its weights.pt or a run's checkpoints/best.pt"
            )
        if p.is_dir():
            raise ValueError(
                f"--init-weights {path} is a folder, not a model's: name a model (its folder or weights.pt) "
                "or a run's checkpoints/best.pt"
            )
        if not p.is_file():
            raise ValueError(f"--init-weights {path}: no such file")
    model = create_model(model_name, taxonomy)
    try:
        done = apply_init(model, taxonomy, str(p))
    except ArtifactError as e:  # its model.json, which names the heads' values, does not match it
        raise ValueError(f"--init-weights {path}: {e}") from None
    except Exception as e:  # noqa: BLE001 - one clear line, not torch's advice to unpickle it unsafely
        raise ValueError(
            f"--init-weights {path} is not a weights file torch loads safely ({type(e).__name__})"
        ) from None
    own = model.state_dict()
    share = done["carried"] / max(1, sum(v.numel() for v in own.values()))
    if share < 0.5:
        raise ValueError(
            f"--init-weights {path} fits {share:.0%} of {model_name}'s parameters (only {done['tensors']} of "
            f"its {len(own)} tensors, by name and shape): weights of another architecture, or an exported "
            "artifact in deployment form (fused; start from its run's checkpoints/best.pt instead)?"
        )
    log.info(
        "init weights: %d of %d tensors (%.0f%% of the weights) from %s; %s",
        done["tensors"],
        len(own),
        100 * share,
        p,
        describe(done["heads"], done["source"], taxonomy),
    )
    return str(p)


def _check_splits(shards: str, split: np.ndarray) -> None:
    """Refuse, before any worker starts, a shard set too small to hold both training and validation
    products (the split is by product id, about 80/10/10): the workers would fail on an empty split.
    ``split``: each indexed product's split."""
    splits = Counter(split.tolist())
    if not splits["train"] or not splits["val"]:
        raise ValueError(
            f"{shards} holds {splits['train']} training and {splits['val']} validation products (of "
            f"{len(split)}; split by product id, about 80/10/10): training needs both, so shard a larger "
            "catalog"
        )


def check_shard_labels(taxonomy: Taxonomy, shards: str) -> dict[str, dict[str, int]]:
    """Refuse a shard set whose labels a model of ``taxonomy`` cannot be measured or calibrated on: none of
    its heads labelled there, or a head of another kind (metrics would come out NaN; a calibration fitted
    there would be fitted on nothing).

    Returns the labels outside a head's values, per head (value → products): products of unseen data
    may carry a value no training product had. They cannot be scored against the model's values, so they
    are left out of that head's figures, and the evaluation says how many, rather than refusing to
    measure the rest."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if training_taxonomy(shards).version == taxonomy.version:
        return {}
    idx = storage.read_parquet(storage.join(shards, "index.parquet"))
    labelled = [h for h in taxonomy.heads if h.name in idx.column_names]
    if not labelled:
        raise ValueError(
            f"none of the model's heads ({', '.join(h.name for h in taxonomy.heads)}) is labelled in "
            f"{shards} (its taxonomy {shards_taxonomy(shards).name!r} has "
            f"{', '.join(h.name for h in shards_taxonomy(shards).heads)}): give shards written with the "
            "model's taxonomy (`fashionlabel shard --taxonomy …`)"
        )
    outside: dict[str, dict[str, int]] = {}
    for h in labelled:
        col = idx.column(h.name)
        is_list = pa.types.is_list(col.type) or pa.types.is_large_list(col.type)
        if is_list != (h.kind == "multi"):
            raise ValueError(
                f"head {h.name!r} is a {h.kind} head in the model and a "
                f"{'multi' if is_list else 'single'} one in {shards}: give shards of the model's taxonomy"
            )
        counts = pc.value_counts(pc.list_flatten(col) if is_list else col).to_pylist()
        extra = {c["values"]: c["counts"] for c in counts if c["values"] is not None}
        extra = {v: n for v, n in sorted(extra.items()) if v not in h.index}
        if extra:
            outside[h.name] = extra
            log.warning(
                "head %s: %d product(s) of %s hold labels the model cannot predict (%s): they are left out "
                "of its figures",
                h.name,
                sum(extra.values()),
                shards,
                ", ".join(list(extra)[:5]) + (", …" if len(extra) > 5 else ""),
            )
    return outside


def _check_head_labels(shards: str, taxonomy: Taxonomy, idx: Any, train_rows: np.ndarray) -> None:
    """Refuse, before any worker starts, a head that no training product is labelled for (its catalog
    column missing or blank): it would train on nothing, and the model would label every product with
    its untrained guesses. ``idx``: the shard set's index; ``train_rows``: which of its rows train."""
    empty = [
        h
        for h in taxonomy.heads
        if h.name not in idx.column_names
        or not np.asarray(idx.column(h.name).is_valid().to_numpy(zero_copy_only=False))[train_rows].any()
    ]
    if empty:
        raise ValueError(
            f"{', '.join(f'head {h.name!r} (column {h.column!r})' for h in empty)} of taxonomy "
            f"{taxonomy.name!r}: no training product in {shards} has a label, so the head would train on "
            "nothing: is the column missing from the catalog, or blank? Add its labels, or drop the head "
            "from the taxonomy"
        )


def training_taxonomy(shards: str) -> Taxonomy:
    """The shards' taxonomy, with values learned from the index where a head declares none."""
    taxonomy = shards_taxonomy(shards)
    if any(h.values is None for h in taxonomy.heads):
        idx = storage.read_parquet(storage.join(shards, "index.parquet")).to_pylist()
        taxonomy = taxonomy.learn(idx)
    return taxonomy


def export_state(
    shards: str, out: str, best: dict[str, Any], taxonomy: Taxonomy, data: str | None = None
) -> dict[str, Any]:
    """Calibrate a checkpoint's model on validation, write the artifact, evaluate it on val and test.

    What goes into model.json is a function of the checkpoint and the shards only (no wall-clock time):
    the version is its content hash, so re-running a finished training exports the same version and a
    night does not relabel the catalog for a model that did not change."""
    if best["taxonomy_version"] != taxonomy.version:
        raise ValueError("checkpoint was trained on another taxonomy version than these shards carry")
    cfg = saved_config(best["config"], "the checkpoint exported")
    model = create_model(cfg.model, taxonomy)
    weights = best.get("weights", "raw")  # the moving average when it validated better than the last step
    model.load_state_dict(best["ema"]["model"] if weights == "ema" else best["model"])
    model.eval()
    size = (cfg.height, cfg.width)
    uris = list_shards(shards)
    val = load_samples(uris, taxonomy, size, split="val")
    val_logits = _logits(model, val.images)
    calibration = calibrate(taxonomy, val_logits, val.targets, review_share=cfg.review_share)
    pre = {"size": list(size), "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    history = best["history"]
    train_ips = float(np.median([h["train_img_per_s"] for h in history])) if history else 0.0
    training = {
        "config": cfg.__dict__,
        "best_epoch": best["best_epoch"],
        "epochs_run": len(history),
        "weights": weights,
        "starts": best.get("starts", [0]),
        # what it was calibrated and measured on (``data``: the fingerprint, when the caller has it)
        "shards_fingerprint": data or shards_fingerprint(shards, taxonomy),
    }  # no throughput: a measured rate would give the same weights another version
    # Deployment form: re-parameterisable blocks (RepVGG) fused into plain convs; same outputs, faster.
    deploy = reparameterize_model(model)
    metrics: dict[str, Any] = {}
    write_metrics = metrics_writer(shards, metrics)

    def finalize(staged: Path) -> None:
        (staged / "curves.json").write_text(metrics_json(history))
        _plot_curves(history, staged / "curves.png")
        write_metrics(staged)

    version = save_artifact(
        out,
        deploy,
        architecture=cfg.model,
        taxonomy=taxonomy,
        preprocessing=pre,
        calibration=calibration,
        training=training,
        model_kwargs=getattr(deploy, "model_kwargs", {}),
        finalize=finalize,
    )
    return {
        "version": version,
        "metrics": metrics,
        "training": training | {"train_img_per_s_median": train_ips},  # per epoch in curves.json
        "out": out,
    }


def metrics_writer(
    shards: str, metrics: dict[str, Any], extra: dict[str, Any] | None = None
) -> Callable[[Path], None]:
    """A ``save_artifact`` finalize step: evaluate the staged model on the val and test splits of ``shards``
    into ``metrics`` (plus ``extra``) and write ``metrics.json`` and the evaluation files beside it.

    Evaluated from the staged folder, so the published artifact arrives with its metrics and confusion
    images at once: a crash in between leaves the previous artifact (or none) visible."""

    def write(staged: Path) -> None:
        metrics.update({split: evaluate(str(staged), shards, split)["metrics"] for split in ("val", "test")})
        metrics.update(extra or {})
        (staged / "metrics.json").write_text(metrics_json(metrics))

    return write


@torch.inference_mode()
def _logits(model: torch.nn.Module, images: np.ndarray) -> dict[str, torch.Tensor]:
    from fashionlabel.data import to_input

    outs: list[dict[str, torch.Tensor]] = []
    for s in range(0, len(images), 256):
        outs.append(model(to_input(images[s : s + 256], IMAGENET_MEAN, IMAGENET_STD)))
    return {k: torch.cat([o[k] for o in outs]).float() for k in outs[0]}


def evaluate(
    model_dir: str, shards: str, split: str | None = "test", write_to: str | None = None
) -> dict[str, Any]:
    """Metrics of the artifact on one split of ``shards`` (None: every product). Writes JSON + confusion PNG."""
    t0 = time.time()
    pred = Predictor(model_dir)
    tax = pred.taxonomy
    outside = check_shard_labels(tax, shards)
    samples = load_samples(list_shards(shards), tax, pred.size, split=split)
    if len(samples) == 0:  # nothing to measure: the artifact's earlier evaluation stays as it is
        raise ValueError(f"no {split or 'readable'} products in {shards} to evaluate on")
    log.info("evaluate: %d products decoded in %.1f s; running the model", len(samples), time.time() - t0)
    logits = pred.logits(samples.images)
    probs = scores(tax, logits, pred.calibration)
    metrics = evaluate_probs(tax, probs, samples.targets)
    metrics["n_products"] = len(samples)
    # which products these are: an evaluation on other shards replaces the file beside the model
    metrics["shards"] = storage.absolute(shards)
    metrics["split"] = split or "all"
    metrics["decode_errors"] = len(samples.errors)
    # whole shard set, every split: labels no training product had, left out of their head's figures
    metrics["labels_outside_model"] = outside
    # What labelling writes, measured as written: the hierarchy-consistent choice of each single head,
    # the thresholded list of each multi head, and which products it sends to review.
    chosen = consistent_choice(tax, probs)
    review = needs_review(tax, probs, pred.calibration, chosen)
    metrics["needs_review"] = float(review.mean())
    for h in tax.heads:
        y, hm = samples.targets[h.name], metrics["heads"][h.name]
        if h.kind == "multi":
            hm["at_threshold"] = thresholded_prf(probs[h.name], y, threshold(h, pred.calibration))
            continue
        right = chosen[h.name] == y
        known, accepted = y >= 0, (y >= 0) & ~review
        hm["top1_consistent"] = float(right[known].mean()) if known.any() else float("nan")
        # the accuracy of the labels a user takes without review: calibration's promise, on unseen products
        hm["top1_accepted"] = float(right[accepted].mean()) if accepted.any() else float("nan")
        hm["n_accepted"] = int(accepted.sum())
    # a local folder or an s3:// prefix; an s3:// model's default is beside its local copy
    out_dir = storage.absolute(write_to or pred.spec["local_path"])
    storage.makedirs(out_dir)
    # Beside a published model: written atomically, so a killed evaluation leaves the previous one whole.
    storage.write_bytes(
        storage.join(out_dir, f"evaluation-{split or 'all'}.json"),
        metrics_json(metrics).encode(),
    )
    # the finest level of the hierarchy, else the first single head; a multi-label-only taxonomy has none.
    # Of the labels as labelling writes them (the hierarchy-consistent choice), as top1_consistent counts
    # them: the top score's class is not what a user of the labels sees.
    fine = tax.chains()[-1][-1] if tax.chains() else next(iter(tax.single_heads), None)
    if fine is not None:
        _plot_confusion(
            confusion(chosen[fine.name], samples.targets[fine.name], fine.num_classes),
            fine,
            storage.join(out_dir, f"confusion-{fine.name}-{split or 'all'}.png"),
        )
    return {
        "metrics": metrics,
        "version": pred.version,
        "n": len(samples),
        "out": str(out_dir),
        "seconds": time.time() - t0,
    }


def _plot_curves(history: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not history:
        return
    ep = [h["epoch"] for h in history]
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
    ax[0].plot(ep, [h["train_loss"] for h in history], marker="o")  # markers: one epoch is a point
    ax[0].set(title="training loss", xlabel="epoch")
    if any("val_score_ema" in h for h in history):  # both weight sets were validated
        for name in ("raw", "ema"):
            ax[1].plot(
                ep, [h.get(f"val_score_{name}", np.nan) for h in history], marker="o", label=f"{name} weights"
            )
        ax[1].legend()
    else:
        ax[1].plot(ep, [h.get("val_score", np.nan) for h in history], marker="o")
    ax[1].set(title="validation score (mean top-1 / recall@3)", xlabel="epoch")
    from matplotlib.ticker import MaxNLocator

    for a in ax:  # whole epochs on the axis, not −0.04 … 0.04 around a single one
        if len(ep) <= 12:
            a.set_xticks(ep)
        else:
            a.xaxis.set_major_locator(MaxNLocator(integer=True))
        a.set_xlim(min(ep) - 0.5, max(ep) + 0.5)
    _save_png(fig, path)


def _plot_confusion(m: np.ndarray, head, path: str | Path, top: int = 25) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keep = np.argsort(-m.sum(axis=1))[:top]  # the most frequent true classes
    sub = m[np.ix_(keep, keep)]
    norm = sub / np.maximum(1, sub.sum(axis=1, keepdims=True))
    names = [head.values[i] for i in keep]
    fig, ax = plt.subplots(figsize=(8, 7))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set(
        title=f"{head.name} as labelled: confusion (row-normalised, {len(names)} most frequent)",
        xlabel="label written (the hierarchy-consistent choice)",
        ylabel="true",
    )
    _save_png(fig, path)


def _save_png(fig: Any, path: str | Path) -> None:
    """Render ``fig`` and publish it at ``path`` atomically."""
    import io

    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    storage.write_bytes(path, buf.getvalue())
