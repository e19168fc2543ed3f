"""What each ``fashionlabel`` subcommand does: call the library, then print a one-screen summary.

One ``cmd_<subcommand>`` function each, taking the parsed arguments (``cli.py`` declares them) and
returning the summary it printed (tests and the demo read it).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("fashionlabel")


def _print_summary(title: str, items: dict[str, Any]) -> None:
    width = max(len(k) for k in items) if items else 0
    print(f"\n== {title} " + "=" * max(0, 60 - len(title)))
    for k, v in items.items():
        if isinstance(v, float):
            v = f"{v:,.3f}" if abs(v) < 100 else f"{v:,.0f}"
        print(f"  {k:<{width}}  {v}")


def _next_step(a: argparse.Namespace, out: dict[str, Any], command: str) -> None:
    """Add the summary's ``next`` line: the command that takes this one's output further, with its paths
    filled in and the command named as this one was started (``invoked_as``), so that it runs as printed.
    Left out for the demo's steps, where the demo runs the next step itself."""
    if getattr(a, "show_next", True):
        out["next"] = command


def invoked_as() -> str:
    """The ``fashionlabel`` command as this process was started, for a line to copy: the script's path as
    typed (``.venv/bin/fashionlabel`` from ``make demo``), ``python -m fashionlabel``, or else the name."""
    prog = sys.argv[0] if sys.argv else ""
    if Path(prog).name == "__main__.py" and Path(prog).parent.name == "fashionlabel":
        return f"{_q(sys.executable)} -m fashionlabel"
    return _q(prog) if Path(prog).name == "fashionlabel" else "fashionlabel"


def _q(path: Any) -> str:
    return shlex.quote(str(path))


def check_settings(a: argparse.Namespace) -> None:
    """Build the subcommand's settings object, which checks every value: run before a Ray cluster is
    started or joined, so that a bad option fails at once, with its name."""
    build = {
        "shard": _shard_config,
        "train": _train_config,
        "label": _label_config,
        "nightly": _nightly_config,
        "demo": _demo_check,
    }
    if a.command in build:
        build[a.command](a)
    # a typo in a local path or a taxonomy name: named now, not after a local Ray has taken seconds to start
    catalog = getattr(a, "catalog", None)
    if catalog:
        _check_catalog_there(str(catalog))
    if a.command == "shard":
        from fashionlabel.taxonomy import Taxonomy

        Taxonomy.load(a.taxonomy)
    date = {"label": "run_date", "nightly": "date"}.get(a.command)
    if date:  # a date that is not one names the output folder: refused before a cluster is joined too
        from fashionlabel import settings

        settings.run_date(getattr(a, date))
    _check_inputs_there(a)


# The options of each command that name an input the driver reads before any work starts (a shard set, a
# model artifact, weights to start from, a previous index): a local one that is not there is a typo.
INPUTS = {
    "shard": ("incremental",),
    "train": ("shards", "init_weights"),
    "label": ("shards", "model"),
    "nightly": ("model",),
}


def _check_inputs_there(a: argparse.Namespace) -> None:
    """A local input path that is not there: one line naming its option before a Ray cluster is started or
    joined. It was named only once a local Ray was up, 20 to 45 s into the command. A path that is there is
    read as the job reads it, which names what is wrong with its contents (not a shard set, not a model)."""
    for field in INPUTS.get(a.command, ()):
        path = getattr(a, field, None)
        if not path or "://" in path:
            continue
        if field == "incremental":
            from fashionlabel import storage
            from fashionlabel.shards.plan import check_previous_index

            check_previous_index(storage.absolute(path))  # the shard job's own check, before Ray
        elif not Path(path).exists():
            raise FileNotFoundError(f"--{field.replace('_', '-')} {path}: no such file or folder")


def _check_catalog_there(catalog: str) -> None:
    """A local catalog that is not there, or an ``s3://`` one that is not there or cannot be reached
    (credentials it refuses, an endpoint that is down): one line before a Ray cluster is started or joined.
    An S3 catalog was first read after a local Ray had started, 5 to 25 s into the command."""
    from fashionlabel import storage
    from fashionlabel.catalog import CatalogError, bucket_exists

    if "://" not in catalog:
        if Path(catalog).is_dir():  # as for an s3:// folder: named now, not as pyarrow's "is a directory"
            raise CatalogError(
                f"catalog {catalog} is a folder, not a file: give the catalog file in it (CSV, Parquet or JSON Lines)"
            )
        there = Path(catalog).exists()
    elif storage.is_s3(catalog):
        bucket, _, key = catalog.removeprefix("s3://").partition("/")
        if not bucket or not key or key.endswith("/"):  # a bucket or a folder: exists, and is no catalog
            raise CatalogError(f"catalog {catalog} names no file: give s3://bucket/path/catalog.csv")
        try:
            there = storage.exists(catalog)
            if not there and not bucket_exists(catalog):  # a mistyped bucket, or another endpoint
                raise CatalogError(f"catalog not found: {catalog} (no bucket {bucket!r} at this S3 endpoint)")
        except OSError as e:  # pyarrow's own: access denied, network
            raise CatalogError(f"cannot read catalog {catalog}: {storage.redact(e)[:300]}") from None
    else:
        return  # read as the job reads it, which names what is wrong
    if not there:
        raise CatalogError(f"catalog not found: {catalog}")


# The options of each command that name where it writes (a later run resumes from what is there).
OUTPUTS = {
    "shard": ("out",),
    "train": ("out", "storage"),
    "label": ("out",),
    "nightly": ("root",),
    "evaluate": ("out",),
    "prune": ("out",),
    "calibrate": ("out",),
    "report": ("out",),
}


def check_outputs_outlive_the_job(a: argparse.Namespace) -> None:
    """Refuse a relative output path in a job submitted with a working_dir (``ray job submit
    --working-dir .``): there the current folder is Ray's copy of the uploaded checkout, which Ray
    deletes once no job uses it and which is another folder for each upload that differs. The outputs
    would be lost, and a re-run (tomorrow's night, a resumed shard job) would start again elsewhere."""
    try:
        job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    except ValueError:
        return
    if not (job.get("runtime_env") or {}).get("working_dir"):
        return
    for field in OUTPUTS.get(a.command, ()):
        value = getattr(a, field, None)
        if value and "://" not in value and not Path(value).is_absolute():
            raise ValueError(
                f"--{field} {value} is a relative path: in a job submitted with a working_dir it would be "
                f"written into Ray's copy of the uploaded folder ({os.getcwd()}), which Ray deletes and a "
                "later upload replaces; give an absolute path (a folder every node mounts) or an s3:// URI"
            )


def _demo_train_argv(a: argparse.Namespace) -> list[str]:
    """The demo's train step, as typed."""
    root = Path(a.out)
    return [
        *("train", "--shards", str(root / "shards"), "--out", str(root / "model")),
        *("--epochs", str(a.epochs), "--workers", "2"),
        # a review queue a team can work through, not every product a weak head hesitates on
        *("--review-share", str(DEMO_REVIEW_SHARE)),
    ]


# The folder `make demo` writes and `make clean` removes (the Makefile's OUT, in the repository root).
MAKE_DEMO_OUT = Path(__file__).resolve().parents[1] / "demo-out"


def _demo_check(a: argparse.Namespace) -> None:
    """The demo's own settings (its epochs, its run date), checked as its train and label steps would
    check them, but before its shard step writes anything. A model of an earlier demo with other settings
    is named here too: train's own refusal would point at an --overwrite that the demo does not have."""
    from fashionlabel import settings
    from fashionlabel.cli import parse
    from fashionlabel.train.config import config_differences, same_config

    cfg = _train_config(parse(_demo_train_argv(a)))
    settings.run_date(a.run_date)
    spec = Path(a.out) / "model" / "model.json"
    saved = json.loads(spec.read_text()).get("training", {}).get("config") if spec.is_file() else None
    if saved is not None and not same_config(saved, cfg):
        # `make clean` removes the Makefile's demo-out only: another --out it would leave as it is
        clean = " (`make clean`)" if Path(a.out).resolve() == MAKE_DEMO_OUT else ""
        raise ValueError(
            f"{a.out} holds an earlier demo's model, trained with other settings "
            f"({config_differences(saved, cfg)}): give another --out, or remove {a.out}{clean} to start afresh"
        )


def _shard_config(a: argparse.Namespace) -> Any:
    from fashionlabel.shards import ShardConfig

    return ShardConfig(
        samples_per_shard=a.samples_per_shard,
        max_side=a.max_side,
        jpeg_quality=a.jpeg_quality,
        max_pixels=a.max_pixels,
        max_failure_rate=a.max_failure_rate,
        min_side=a.min_side,
        fetches_in_flight=a.fetches_in_flight,
    )


def cmd_shard(a: argparse.Namespace) -> dict[str, Any]:
    """``shard``: pack a catalog into shards; return the printed summary."""
    from fashionlabel.report import rate_text
    from fashionlabel.shards import shard_catalog
    from fashionlabel.shards.job import fmt_reasons
    from fashionlabel.taxonomy import Taxonomy

    cfg = _shard_config(a)
    s = shard_catalog(a.catalog, a.out, Taxonomy.load(a.taxonomy), cfg, incremental_from=a.incremental)
    out = {
        "catalog rows": s.catalog_rows,
        "packed": s.packed,
        "quarantined": s.quarantined,
        "reasons": fmt_reasons(s.reasons),
        "shards": f"{s.shards} ({s.shards_skipped} already done)",
        "time": f"{s.seconds:.1f} s",
        "throughput": rate_text(s.packed_this_run, s.packed, s.images_per_s),
        "output": s.out,
    }
    if s.incremental_from:
        out["incremental"] = (
            f"{s.new} new, {s.changed} changed, {s.unchanged} unchanged vs {s.incremental_from}"
        )
    if s.quarantined:  # which rows, and why each: what to fix in the export or the taxonomy
        out["quarantine"] = f"{s.out.rstrip('/')}/quarantine.parquet (product_id, reason, detail)"
    for head, why in s.missing_columns.items():
        out[f"no labels for {head}"] = why
    _next_step(
        a,
        out,
        f"{invoked_as()} train --shards {_q(s.out)} --out MODEL, or label them with a model: "
        f"{invoked_as()} label --shards {_q(s.out)} --model MODEL --out LABELS",
    )
    _print_summary("shard", out)
    return out


def _train_config(a: argparse.Namespace) -> Any:
    from fashionlabel.train.config import TrainConfig

    return TrainConfig(
        model=a.model,
        epochs=a.epochs,
        batch_size=a.batch_size,
        lr=a.lr,
        weight_decay=a.weight_decay,
        workers=a.workers,
        gpu=a.gpu,
        height=a.height,
        width=a.width,
        patience=a.patience,
        uncertainty=a.uncertainty,
        init_weights=a.init_weights,
        seed=a.seed,
        label_smoothing=a.label_smoothing,
        warmup_epochs=a.warmup_epochs,
        ema_epochs=a.ema_epochs,
        cutmix=a.cutmix,
        review_share=a.review_share,
    )


def cmd_train(a: argparse.Namespace) -> dict[str, Any]:
    """``train``: train a model into an artifact; return the printed summary plus ``metrics``."""
    from fashionlabel.runtime import cluster_cpus
    from fashionlabel.train.run import train

    cfg = _train_config(a)
    r = train(a.shards, a.out, cfg, cluster_cpus(), checkpoints=a.storage, overwrite=a.overwrite)
    out = {
        "model": f"{a.model} → {a.out}"
        + (
            " (already trained with these settings on these shards: nothing done)"
            if r.get("already_trained")
            else ""
        ),
        "version": r["version"],
        "epochs run": r["training"]["epochs_run"],
        "best epoch": r["training"]["best_epoch"],
        "train throughput": f"{r['training']['train_img_per_s_median']:,.0f} img/s (median epoch)",
        "time": f"{r['seconds']:.0f} s",
    }
    if cfg.ema_epochs > 0:
        out["exported weights"] = r["training"]["weights"]
    out |= _accuracy_lines(r["metrics"]["test"], "test")
    _next_step(a, out, f"{invoked_as()} label --shards {_q(a.shards)} --model {_q(a.out)} --out LABELS")
    _print_summary("train", out)
    return out | {"metrics": r["metrics"]}


def _accuracy_lines(m: dict[str, Any], split: str) -> dict[str, str]:
    lines = {}
    for h, hm in m["heads"].items():
        if not hm.get("n"):  # its figures are NaN (null in metrics.json): there is nothing to print
            lines[f"{split} {h}"] = f"not measured: no {split} product has a known label"
            continue
        if "top1" in hm:
            # what labelling writes for a head with a parent: the hierarchy-consistent choice
            consistent = (
                f" ({100 * hm['top1_consistent']:.1f}% as labelled)" if "top1_consistent" in hm else ""
            )
            # top-k of a head with k classes or fewer is 100% by definition: not worth a column
            topk = "".join(
                f"  top-{k} {100 * hm[f'top{k}']:.1f}%" for k in (3, 5) if hm.get("classes", 0) > k
            )
            lines[f"{split} {h}"] = (
                f"top-1 {100 * hm['top1']:.1f}%{consistent}{topk}  "
                f"macro-F1 {hm['macro_f1']:.2f}  (n={hm['n']})"
            )
        else:
            lines[f"{split} {h}"] = (
                f"recall@3 {100 * hm['recall@3']:.1f}%  recall@5 {100 * hm['recall@5']:.1f}%  (n={hm['n']})"
            )
            if hm.get("at_threshold", {}).get("n"):  # the lists labelling writes
                t = hm["at_threshold"]
                lines[f"{split} {h} as labelled"] = (
                    f"at score ≥ {t['threshold']:.2f}: precision {100 * t['micro_precision']:.1f}%  "
                    f"recall {100 * t['micro_recall']:.1f}%  F1 {t['micro_f1']:.2f} (micro), "
                    f"{t['macro_f1']:.2f} (macro); {100 * t['empty']:.1f}% get no value  (n={t['n']})"
                )
            # per group: the same ranking of all values, counting the group's true values (the DeepFashion protocol)
            for g in sorted(k[: -len("_n")] for k in hm if k.endswith("_n")):
                lines[f"{split} {h} {g}"] = (
                    f"recall@3 {100 * hm[f'{g}_recall@3']:.1f}%  recall@5 {100 * hm[f'{g}_recall@5']:.1f}%  "
                    f"(n={hm[f'{g}_n']})"
                    if hm[f"{g}_n"]
                    else "no product with one of these values"
                )
    if "needs_review" in m:  # labelling flags a product when any head is below its threshold
        accepted = ", ".join(
            f"{h} {100 * hm['top1_accepted']:.1f}%" for h, hm in m["heads"].items() if hm.get("n_accepted")
        )
        lines[f"{split} needs review"] = f"{100 * m['needs_review']:.1f}% of products" + (
            f"; top-1 of the rest, as labelled: {accepted}" if accepted else ""
        )
    return lines


def cmd_evaluate(a: argparse.Namespace) -> dict[str, Any]:
    """``evaluate``: score an artifact on one split of shards; return the printed summary plus ``metrics``."""
    from fashionlabel import storage
    from fashionlabel.train.run import evaluate

    if a.out and not storage.is_s3(a.out) and Path(a.out).exists() and not Path(a.out).is_dir():
        raise ValueError(f"--out {a.out} is a file: give a folder for the evaluation JSON and confusion PNG")
    split = None if a.split == "all" else a.split
    r = evaluate(a.model, a.shards, split, write_to=a.out)
    out = {"model version": r["version"], "products": r["n"]} | _accuracy_lines(r["metrics"], a.split)
    out["hierarchy (raw argmax) consistency"] = json.dumps(
        {k: round(v, 3) for k, v in r["metrics"]["hierarchy_consistency_raw"].items()}
    )
    for head, values in r["metrics"]["labels_outside_model"].items():
        out[f"{head}: not scored"] = (
            f"{sum(values.values())} product(s) of the shard set labelled with values the model lacks "
            f"({', '.join(list(values)[:5])}{', …' if len(values) > 5 else ''})"
        )
    out["time"] = (
        f"{r['seconds']:.1f} s ({r['n'] / max(r['seconds'], 1e-9):,.0f} products/s, decode included)"
    )
    out["output"] = f"{r['out']}/evaluation-{a.split}.json and the confusion matrix PNG beside it"
    _print_summary("evaluate", out)
    return out | {"metrics": r["metrics"]}


def _label_config(a: argparse.Namespace) -> Any:
    from fashionlabel.label.pipeline import LabelConfig

    # a share given with another decode would be ignored: the run would not do what was typed
    if a.cpu_decode_share is not None and a.decode != "split":
        raise ValueError(
            f"--cpu-decode-share {a.cpu_decode_share:g} is the share of images the read tasks decode with "
            f"--decode split, and this run decodes with --decode {a.decode}: add --decode split, or leave the "
            "share out"
        )
    share = {} if a.cpu_decode_share is None else {"cpu_decode_share": a.cpu_decode_share}
    return LabelConfig(
        batch_size=a.batch_size,
        actors=a.actors,
        device=a.device,
        compile=a.compile,
        compile_cache=a.compile_cache,
        decode=a.decode,
        actors_per_gpu=a.actors_per_gpu,
        read=a.read,
        **share,
    )


def cmd_label(a: argparse.Namespace) -> dict[str, Any]:
    """``label``: label shards into Parquet; return the printed summary plus the run's ``raw`` summary."""
    from fashionlabel.label.pipeline import label_shards
    from fashionlabel.report import rate_text

    s = label_shards(a.shards, a.model, a.out, a.run_date, _label_config(a), incremental=a.incremental)
    out = {
        "run": s["run_id"]
        + ("" if s["wrote"] else " (an earlier run's: every shard already had its labels)"),
        "labelled": s["labelled"],
        "errors": s["errored"],
        "skipped": s["skipped"],
        "shards": f"{s['shards']} ({s['shards_done_before']} already done)",
        **(
            {"damaged shards": f"{s['damaged_shards']} (readable products labelled, lost ones as error rows)"}
            if s["damaged_shards"]
            else {}
        ),
        "throughput": rate_text(s["labelled"] + s["errored"], s["shards_done_before"], s["images_per_s"]),
        "time": f"{s['seconds']:.1f} s"
        + (
            f" (first labels back after {s['first_batch_seconds']:.1f} s)"
            if s["first_batch_seconds"] is not None
            else ""
        ),
        "plan": f"{s['actors']} actor(s) on {s['device']}, reads in {s['read']}, {_decode_text(s)}, "
        f"batch {s['batch_size']}" + (f", compiled: {s['compiled']}" if s["compiled"] else ""),
        "model version": s["model_version"],
        "output": s["out"],
    }
    _next_step(
        a,
        out,
        f"{invoked_as()} report --labels {_q(a.out)} --out report.html, or query them: "
        f'{invoked_as()} query --labels {_q(a.out)} "SELECT count(*) FROM history"',
    )
    _print_summary("label", out)
    return out | {"raw": s}


def _decode_text(s: dict[str, Any]) -> str:
    """Where a labelling run decoded its images. Decode "gpu" means inside each actor, on the actors'
    device: on a CPU-only run "decode on gpu" named a GPU there was not."""
    if s["decode"] == "gpu":
        return f"decode in the actors on {s['device']}"
    if s["decode"].startswith("split"):
        return f"decode {s['decode'][:-1]}, the rest in the actors on {s['device']})"
    return f"decode on {s['decode']}"


def cmd_report(a: argparse.Namespace) -> dict[str, Any]:
    """``report``: write the HTML report of a labels root; return the report's summary.

    A labels root with nightly snapshots (or a ``--date``) gets the night's report, drift included;
    any other gets the report of its newest run. Raises ValueError when ``--out`` is a folder.
    """
    from fashionlabel import latest, settings, storage
    from fashionlabel.layout import Layout
    from fashionlabel.query import labels_root_above
    from fashionlabel.report import write_night_report, write_report

    if not storage.is_s3(a.out) and Path(a.out).is_dir():
        raise ValueError(f"--out {a.out} is a folder: give the report's file name, e.g. {a.out}/report.html")
    if storage.is_s3(a.out):
        # a missing bucket or credentials without write access, said before the labels are read and every
        # chart is drawn (minutes on a large root), not by the upload at the end
        storage.check_writable(a.out)
    snaps = latest.snapshots(a.labels)
    if a.date and not snaps:
        raise ValueError(
            f"--date needs the labels of a nightly root (ROOT/labels, with latest/ snapshots); {a.labels} "
            "has none: leave --date out for the report of its newest run"
        )
    inner = storage.join(a.labels, "labels")
    if not snaps and storage.exists(storage.join(inner, "latest")):
        raise ValueError(f"{a.labels} is a nightly root: give --labels {inner}")
    if not snaps and storage.listdirs(storage.join(inner, "history"), "run_date="):  # a demo's folder, say
        raise ValueError(f"{a.labels} keeps its labels under {inner}: give --labels {inner}")
    # (one run folder, history/run_date=D, is reported as it is: it holds that run's parts)
    history = not snaps and storage.absolute(a.labels).rstrip("/").endswith("/history")
    if history and (root := labels_root_above(a.labels)):
        raise ValueError(f"{a.labels} is the history folder of a labels root: give --labels {root}")
    if snaps:  # a nightly labels root: the night's report with drift against the night before
        # by default the night that latest shows: a newer snapshot whose pointer swap has not happened (a
        # night still publishing, or killed before it) is not a published night yet
        published = (latest.current(a.labels) or {}).get("snapshot")
        date = settings.run_date(a.date) if a.date else published or snaps[-1]
        # --labels is ROOT/labels of a nightly root, whose manifests are beside it
        m = Layout(storage.absolute(a.labels).rstrip("/").rpartition("/")[0]).manifest(date)
        manifest = storage.read_json(m) if storage.exists(m) else None
        r = write_night_report(a.labels, date, a.out, manifest)
        r.pop("drift")
    else:
        r = write_report(a.labels, a.out)
    _print_summary("report", {k: v for k, v in r.items() if k != "charts"} | {"charts": len(r["charts"])})
    return r


def cmd_prune(a: argparse.Namespace) -> dict[str, Any]:
    """``prune``: channel-prune an artifact into a new one; return the printed summary plus ``raw``."""
    from fashionlabel.train.prune import prune_artifact

    blocks = a.blocks
    r = prune_artifact(a.model, a.shards, a.out, blocks, a.keep, a.calib_images)
    b, f = r["before"], r["after"]
    out = {
        "pruned": f"{a.model} → {a.out} (middle modules {blocks}, keep {a.keep:.0%}, at least 8 channels a layer)",
        "version": r["version"],
        "inner widths": json.dumps(r["mid_channels"]),
        "params": f"{b['params'] / 1e6:.2f} M → {f['params'] / 1e6:.2f} M",
        "FLOPs / image": f"{b['flops'] / 1e6:.1f} M → {f['flops'] / 1e6:.1f} M",
        "labelling speed": f"{b['label_img_per_cpu_s']:,.0f} → {f['label_img_per_cpu_s']:,.0f} img per CPU-second",
    }
    for k in b:
        if " top1" in k or " recall@3" in k:
            out[f"val {k}"] = f"{100 * b[k]:.1f}% → {100 * f[k]:.1f}%"
    out |= _accuracy_lines(r["metrics"]["test"], "test (pruned)")
    out["time"] = f"{r['seconds']:.1f} s"
    _print_summary("prune", out)
    return out | {"raw": r}


def cmd_calibrate(a: argparse.Namespace) -> dict[str, Any]:
    """``calibrate``: refit a model's temperatures and thresholds into a new artifact; return the printed
    summary plus ``raw``."""
    from fashionlabel.train.calibrate import recalibrate_artifact

    r = recalibrate_artifact(a.model, a.shards, a.out, review_share=a.review_share, error_cut=a.error_cut)
    cal = r["calibration"]
    out = {
        "calibrated": f"{a.model} → {a.out} ({r['val_products']} validation products)",
        "version": f"{r['calibrated_from']} → {r['version']}",
        "error cut": f"{cal['error_cut']:.2f} (share of each head's errors left in the labels it accepts)",
        "thresholds": json.dumps({h: round(t, 3) for h, t in cal["thresholds"].items()}),
    }
    if "review_share" in cal:
        out["val needs review"] = (
            f"{100 * cal['val_needs_review']:.1f}% (asked: at most {cal['review_share']:.0%})"
        )
    out |= _accuracy_lines(r["metrics"]["test"], "test")
    _next_step(
        a,
        out,
        f"label or run nightly with --model {_q(a.out)} (a new version: the next night relabels every "
        "active product)",
    )
    _print_summary("calibrate", out)
    return out | {"raw": r}


def _nightly_config(a: argparse.Namespace) -> Any:
    from fashionlabel.nightly import NightlyConfig
    from fashionlabel.shards import ShardConfig

    return NightlyConfig(
        shard=ShardConfig(
            samples_per_shard=a.samples_per_shard,
            max_side=a.max_side,
            max_failure_rate=a.max_failure_rate,
            fetches_in_flight=a.fetches_in_flight,
        ),
        label=_label_config(a),
        relabel_older_than_days=a.relabel_older_than,
        keep_snapshots=a.keep_snapshots,
        max_catalog_drop=a.max_catalog_drop,
    )


def _products_and_rows(m: dict[str, Any]) -> str:
    """The night's catalog as products, and as rows where they differ: ``quarantined`` counts rows (a
    repeated id is one), so products alone did not add up with it."""
    products, rows = m["catalog_products"], m.get("catalog_rows")  # older manifests have no rows
    if rows is None or rows == products:
        return str(products)
    return f"{products} ({rows} rows; quarantined counts rows)"


def cmd_nightly(a: argparse.Namespace) -> dict[str, Any]:
    """``nightly``: run one night end to end; return the night's manifest (not only the printed lines)."""
    from fashionlabel import storage
    from fashionlabel.layout import Layout
    from fashionlabel.nightly import run_nightly
    from fashionlabel.report import night_rate
    from fashionlabel.shards.job import fmt_reasons

    cfg = _nightly_config(a)
    m = run_nightly(a.catalog, a.model, a.root, a.date, cfg)
    out = {
        "night": m["run_date"] + (" (already complete: nothing done)" if m["already_complete"] else ""),
        "catalog products": _products_and_rows(m),
        "new / changed / unchanged": f"{m['new']} / {m['changed']} / {m['unchanged']}",
        "quarantined": f"{m['quarantined']} ({fmt_reasons(m['reasons'])})",
    }
    quarantine = storage.join(Layout(a.root).night_shards(m["run_date"]), "quarantine.parquet")
    if m["quarantined"] and storage.exists(quarantine):  # which rows, and why each
        out["quarantine"] = f"{quarantine} (product_id, reason, detail)"
    if outside := m.get("labels_outside_taxonomy"):  # a manifest of an older version has none
        out["labels outside taxonomy"] = (
            f"{fmt_reasons(outside)} products labelled all the same: their catalog value is not one the "
            "model's taxonomy declares (to learn it: docs/own-catalog.md, 'When the catalog changes')"
        )
    out |= {
        "sharded": f"{m['sharded']} in {m['shards']} shards" if m["shards"] else "0 (no shard tonight)",
        "labelled": f"{m['labelled']} ({m['relabelled']} relabelled: {m['relabel_reason'] or 'no'})",
        "errors": m["errors"],
        "latest": f"{m['latest_rows']} products ({m['latest_inactive']} inactive)",
        "throughput": f"shard {night_rate(m, 'shard')}, label {night_rate(m, 'label')}",
        "time": f"{m['seconds']['total']:.1f} s",
        "model version": m["model_version"],
        "report": m["report"],
        "labels": storage.join(a.root, "labels"),
    }
    _next_step(
        a,
        out,
        f"{invoked_as()} query --labels {_q(storage.join(a.root, 'labels'))} "
        '"SELECT count(*) FROM latest WHERE active" (docs/analysts.md has more)',
    )
    _print_summary("nightly", out)
    return m


def cmd_query(a: argparse.Namespace) -> dict[str, Any]:
    """``query``: print the result of SQL over a labels root (a table or CSV); return its row count."""
    from fashionlabel.query import query

    df = query(a.labels, a.sql)
    if a.csv:
        print(_nested_as_json(df).to_csv(index=False), end="")
    else:
        import pandas as pd

        # pandas cuts a longer result down to display.min_rows (10), not to max_rows; 0 means no limit
        limit = a.max_rows or None
        with pd.option_context(
            "display.max_rows",
            limit,
            "display.min_rows",
            limit,
            "display.max_columns",
            50,
            "display.width",
            200,
        ):
            print(df)
    return {"rows": len(df)}


def _nested_as_json(df):
    """``df`` with its list and struct cells (``<head>_topk``, ``attributes``, ...) as JSON, one line each: as
    they come from DuckDB they print as NumPy reprs spread over several lines, which no CSV reader parses
    back."""
    import numpy as np

    def plain(v: Any) -> Any:
        if isinstance(v, np.ndarray | list | tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v.item() if isinstance(v, np.generic) else v

    def nested(v: Any) -> bool:
        return isinstance(v, np.ndarray | list | tuple | dict)

    out = df.copy()
    for c in out.columns:
        if out[c].dtype == object and out[c].map(nested).any():
            out[c] = out[c].map(lambda v: json.dumps(plain(v)) if nested(v) else v)
    return out


def cmd_models(a: argparse.Namespace) -> dict[str, Any]:
    """``models``: print the registered model names, one a line."""
    from fashionlabel.models import list_models

    print("\n".join(list_models()))
    return {}


# The README's query of the demo's labels: the newest finished run only, since a demo run again on another
# day adds a second run folder to `history` and every count over all of it would double.
DEMO_QUERY = (
    "SELECT articleType, count(*) FROM history WHERE error IS NULL AND run_date = (SELECT max(run_date) "
    "FROM nights) GROUP BY 1 ORDER BY 2 DESC LIMIT 10"
)


DEMO_REVIEW_SHARE = 0.3


def cmd_demo(a: argparse.Namespace) -> dict[str, Any]:
    """Shard → train (with its held-out test metrics) → label → report on the bundled sample, then check the
    table in DuckDB."""
    import duckdb

    from fashionlabel.cli import parse  # each step parsed as typed, so the demo runs the commands' defaults
    from fashionlabel.runtime import may_span_nodes

    if may_span_nodes():  # refused now, not by train after the shards are written
        raise ValueError(
            f"demo writes its shards, model and labels to the local folder {a.out}, which the other nodes "
            "of a Ray cluster do not see: run it on a local Ray (leave --address and RAY_ADDRESS unset), or "
            "run the commands as jobs with s3:// outputs (README, Running on a cluster)"
        )

    def step(argv: list[str]) -> argparse.Namespace:
        ns = parse(argv)
        ns.show_next = False  # the demo runs the next step itself
        return ns

    t0 = time.time()
    root = Path(a.out)
    shards, model, labels = root / "shards", root / "model", root / "labels"
    sh = cmd_shard(
        step(["shard", "--catalog", str(a.catalog), "--out", str(shards), "--samples-per-shard", "500"])
    )
    tr = cmd_train(step(_demo_train_argv(a)))
    lb = cmd_label(
        step(
            [
                "label",
                "--shards",
                str(shards),
                "--model",
                str(model),
                "--out",
                str(labels),
                "--run-date",
                a.run_date,
            ]
        )
    )
    rp = cmd_report(step(["report", "--labels", str(labels), "--out", str(root / "report.html")]))
    from fashionlabel.label.writer import part_uris

    # this run's parts: a demo run again on another day adds a second run folder beside it. Given as a
    # parameter, not spelled into the SQL: an --out with a quote in it (/home/o'neil) failed here, last
    parts = part_uris(str(labels / "history" / f"run_date={a.run_date}"))
    q = "SELECT count(*), count(DISTINCT product_id), count_if(needs_review) FROM read_parquet(?)"
    rows, distinct, review = duckdb.connect().execute(q, [parts]).fetchall()[0]
    test = tr["metrics"]["test"]["heads"]
    out = {
        "catalog": str(a.catalog),
        "products packed": sh["packed"],
        "quarantined": f"{sh['quarantined']} ({sh['reasons']})",
        "labels rows / distinct": f"{rows} / {distinct} (DuckDB)",
        "label throughput": lb["throughput"],
        "train throughput": tr["train throughput"],
        "needs review": f"{100 * review / max(rows, 1):.1f}% of the labels (thresholds fit to flag at most "
        f"{DEMO_REVIEW_SHARE:.0%} of the validation products)",
    }
    out |= {
        f"held-out {h}": (
            f"top-1 {100 * m['top1']:.1f}%" if "top1" in m else f"recall@3 {100 * m['recall@3']:.1f}%"
        )
        for h, m in test.items()
    }
    out |= {
        # the labels root, as `query --labels` and `report --labels` take it (not its history/ folder)
        "labels": str(labels),
        "report": rp["out"],
        "model": str(model),
        "total time": f"{time.time() - t0:.0f} s",
    }
    _print_summary("demo summary", out)
    print(f'\nquery it:  {invoked_as()} query --labels {_q(labels)} "{DEMO_QUERY}"')
    return out
