"""The ``fashionlabel`` command: thin argument parsing over the library, one subcommand per stage.

Every subcommand shows progress while it runs, ends with a one-screen summary, exits 0 on success and
non-zero with a one-line message on failure. ``--address`` / ``RAY_ADDRESS`` picks a Ray cluster; by
default a local Ray is started and stopped by the command.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger("fashionlabel")
SAMPLE_CATALOG = Path(__file__).resolve().parents[1] / "examples" / "sample" / "catalog.csv"


def _print_summary(title: str, items: dict[str, Any]) -> None:
    width = max(len(k) for k in items) if items else 0
    print(f"\n== {title} " + "=" * max(0, 60 - len(title)))
    for k, v in items.items():
        if isinstance(v, float):
            v = f"{v:,.3f}" if abs(v) < 100 else f"{v:,.0f}"
        print(f"  {k:<{width}}  {v}")


class _ShowDefaults(argparse.HelpFormatter):
    """Help that names each option's default where it has one (not "None" or "False")."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "default" not in text:
            text += " (default: %(default)s)"
        return text


def _non_negative(text: str) -> int:
    n = int(text)
    if n < 0:
        raise argparse.ArgumentTypeError(f"{n} is negative")
    return n


def _fmt_reasons(reasons: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in reasons.items()) or "none"


# ---- subcommands ---------------------------------------------------------------------------------
def cmd_shard(a: argparse.Namespace) -> dict[str, Any]:
    from fashionlabel.report import rate_text
    from fashionlabel.shards import ShardConfig, shard_catalog
    from fashionlabel.taxonomy import Taxonomy

    cfg = ShardConfig(
        samples_per_shard=a.samples_per_shard,
        max_side=a.max_side,
        jpeg_quality=a.jpeg_quality,
        max_pixels=a.max_pixels,
        max_failure_rate=a.max_failure_rate,
        min_side=a.min_side,
    )
    s = shard_catalog(a.catalog, a.out, Taxonomy.load(a.taxonomy), cfg, incremental_from=a.incremental)
    out = {
        "catalog rows": s.catalog_rows,
        "packed": s.packed,
        "quarantined": s.quarantined,
        "reasons": _fmt_reasons(s.reasons),
        "shards": f"{s.shards} ({s.shards_skipped} already done)",
        "time": f"{s.seconds:.1f} s",
        "throughput": rate_text(s.packed_this_run, s.packed, s.images_per_s),
        "output": s.out,
    }
    if s.incremental_from:
        out["incremental"] = (
            f"{s.new} new, {s.changed} changed, {s.unchanged} unchanged vs {s.incremental_from}"
        )
    _print_summary("shard", out)
    return out


def cmd_train(a: argparse.Namespace) -> dict[str, Any]:
    from fashionlabel.runtime import cluster_cpus
    from fashionlabel.train.loop import TrainConfig
    from fashionlabel.train.run import train

    cfg = TrainConfig(
        model=a.model,
        epochs=a.epochs,
        batch_size=a.batch_size,
        lr=a.lr,
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
    )
    r = train(a.shards, a.out, cfg, cluster_cpus(), checkpoints=a.storage, overwrite=a.overwrite)
    out = {
        "model": f"{a.model} → {a.out}",
        "version": r["version"],
        "epochs run": r["training"]["epochs_run"],
        "best epoch": r["training"]["best_epoch"],
        "train throughput": f"{r['training']['train_img_per_s_median']:,.0f} img/s (median epoch)",
        "time": f"{r['seconds']:.0f} s",
    }
    if cfg.ema_epochs > 0:
        out["exported weights"] = r["training"]["weights"]
    out |= _accuracy_lines(r["metrics"]["test"], "test")
    _print_summary("train", out)
    return out | {"metrics": r["metrics"]}


def _accuracy_lines(m: dict[str, Any], split: str) -> dict[str, str]:
    lines = {}
    for h, hm in m["heads"].items():
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
    return lines


def cmd_evaluate(a: argparse.Namespace) -> dict[str, Any]:
    from fashionlabel.train.run import evaluate

    split = None if a.split == "all" else a.split
    r = evaluate(a.model, a.shards, split, write_to=a.out)
    out = {"model version": r["version"], "products": r["n"]} | _accuracy_lines(r["metrics"], a.split)
    out["hierarchy (raw argmax) consistency"] = json.dumps(
        {k: round(v, 3) for k, v in r["metrics"]["hierarchy_consistency_raw"].items()}
    )
    out["time"] = (
        f"{r['seconds']:.1f} s ({r['n'] / max(r['seconds'], 1e-9):,.0f} products/s, decode included)"
    )
    out["output"] = f"{r['out']}/evaluation-{a.split}.json and the confusion matrix PNG beside it"
    _print_summary("evaluate", out)
    return out | {"metrics": r["metrics"]}


def _label_options(p: argparse.ArgumentParser) -> None:
    """The labelling plan's options, shared by ``label`` and ``nightly``."""
    p.add_argument("--batch-size", type=int, default=None, help="default: 512 on a GPU, 256 on CPU")
    p.add_argument("--actors", type=int, default=None, help="predictor actors (default: from resources)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--compile", action="store_true", help="compile the model in each actor")
    p.add_argument(
        "--compile-cache",
        default=None,
        help="with --compile: a folder on each node (best on a persistent disk) where the first actor saves "
        "the compiled model and every later actor, tonight's or the next night's, loads it in milliseconds "
        "(default: none, each actor runs torch.compile)",
    )
    p.add_argument(
        "--decode",
        default="auto",
        choices=["cpu", "gpu", "split", "auto"],
        help="where JPEGs are decoded: CPU read tasks (PIL), inside the actor on its device (nvJPEG on a "
        "GPU) or split between them (--cpu-decode-share); auto: gpu when the actors have a GPU",
    )
    p.add_argument(
        "--cpu-decode-share",
        type=float,
        default=0.5,
        help="with --decode split: the share of images the read tasks decode (default 0.5)",
    )
    p.add_argument("--actors-per-gpu", type=int, default=2, help="actors sharing one GPU (overlap)")
    p.add_argument(
        "--read",
        default="auto",
        choices=["tasks", "actor", "auto"],
        help="who reads the shards: Ray tasks ahead of the actors, or each actor its own shard; "
        "auto: tasks with a GPU, actor on CPU (nothing to overlap there)",
    )


def _label_config(a: argparse.Namespace) -> Any:
    from fashionlabel.label.pipeline import LabelConfig

    return LabelConfig(
        batch_size=a.batch_size,
        actors=a.actors,
        device=a.device,
        compile=a.compile,
        compile_cache=a.compile_cache,
        decode=a.decode,
        cpu_decode_share=a.cpu_decode_share,
        actors_per_gpu=a.actors_per_gpu,
        read=a.read,
    )


def cmd_label(a: argparse.Namespace) -> dict[str, Any]:
    from fashionlabel.label.pipeline import label_shards
    from fashionlabel.report import rate_text

    s = label_shards(a.shards, a.model, a.out, a.run_date, _label_config(a), incremental=a.incremental)
    out = {
        "run": s["run_id"],
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
        "plan": f"{s['actors']} actor(s) on {s['device']}, reads in {s['read']}, decode on {s['decode']}, "
        f"batch {s['batch_size']}" + (f", compiled: {s['compiled']}" if s["compiled"] else ""),
        "model version": s["model_version"],
        "output": s["out"],
    }
    _print_summary("label", out)
    return out | {"raw": s}


def cmd_report(a: argparse.Namespace) -> dict[str, Any]:
    from fashionlabel import latest, storage
    from fashionlabel.report import write_night_report, write_report

    if not storage.is_s3(a.out) and Path(a.out).is_dir():
        raise ValueError(f"--out {a.out} is a folder: give the report's file name, e.g. {a.out}/report.html")
    snaps = latest.snapshots(a.labels)
    if snaps or a.date:  # a nightly labels root: the night's report with drift against the night before
        date = a.date or snaps[-1]
        # the nightly root holds labels/ and manifests/
        root = storage.absolute(a.labels).rstrip("/").rpartition("/")[0]
        m = storage.join(root, "manifests", f"{date}.json")
        manifest = storage.read_json(m) if storage.exists(m) else None
        r = write_night_report(a.labels, date, a.out, manifest)
        r.pop("drift")
    else:
        r = write_report(a.labels, a.out)
    _print_summary("report", {k: v for k, v in r.items() if k != "charts"} | {"charts": len(r["charts"])})
    return r


def cmd_prune(a: argparse.Namespace) -> dict[str, Any]:
    from fashionlabel.train.prune import prune_artifact

    blocks = [int(b) for b in a.blocks.split(",") if b.strip()]
    r = prune_artifact(a.model, a.shards, a.out, blocks, a.keep, a.calib_images)
    b, f = r["before"], r["after"]
    out = {
        "pruned": f"{a.model} → {a.out} (middle modules {blocks}, keep {a.keep:.0%})",
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


def cmd_nightly(a: argparse.Namespace) -> dict[str, Any]:
    from fashionlabel.nightly import NightlyConfig, run_nightly
    from fashionlabel.report import night_rate
    from fashionlabel.shards import ShardConfig

    cfg = NightlyConfig(
        shard=ShardConfig(
            samples_per_shard=a.samples_per_shard, max_side=a.max_side, max_failure_rate=a.max_failure_rate
        ),
        label=_label_config(a),
        relabel_older_than_days=a.relabel_older_than,
        keep_snapshots=a.keep_snapshots,
        max_catalog_drop=a.max_catalog_drop,
    )
    m = run_nightly(a.catalog, a.model, a.root, a.date, cfg)
    out = {
        "night": m["run_date"] + (" (already complete: nothing done)" if m["already_complete"] else ""),
        "catalog products": m["catalog_products"],
        "new / changed / unchanged": f"{m['new']} / {m['changed']} / {m['unchanged']}",
        "quarantined": f"{m['quarantined']} ({_fmt_reasons(m['reasons'])})",
        "sharded": f"{m['sharded']} in {m['shards']} shards" if m["shards"] else "0 (no shard tonight)",
        "labelled": f"{m['labelled']} ({m['relabelled']} relabelled: {m['relabel_reason'] or 'no'})",
        "errors": m["errors"],
        "latest": f"{m['latest_rows']} products ({m['latest_inactive']} inactive)",
        "throughput": f"shard {night_rate(m, 'shard')}, label {night_rate(m, 'label')}",
        "time": f"{m['seconds']['total']:.1f} s",
        "model version": m["model_version"],
        "report": m["report"],
    }
    _print_summary("nightly", out)
    return m


def cmd_query(a: argparse.Namespace) -> dict[str, Any]:
    from fashionlabel.query import query

    df = query(a.labels, a.sql)
    if a.csv:
        print(df.to_csv(index=False), end="")
    else:
        import pandas as pd

        with pd.option_context(
            "display.max_rows", a.max_rows, "display.max_columns", 50, "display.width", 200
        ):
            print(df)
    return {"rows": len(df)}


def cmd_models(a: argparse.Namespace) -> dict[str, Any]:
    from fashionlabel.models import list_models

    print("\n".join(list_models()))
    return {}


def cmd_demo(a: argparse.Namespace) -> dict[str, Any]:
    """Shard → train (with its held-out test metrics) → label → report on the bundled sample, then check the
    table in DuckDB."""
    import duckdb

    t0 = time.time()
    root = Path(a.out)
    shards, model, labels = root / "shards", root / "model", root / "labels"
    sh = cmd_shard(
        _parse(["shard", "--catalog", str(a.catalog), "--out", str(shards), "--samples-per-shard", "500"])
    )
    tr = cmd_train(
        _parse(
            [
                "train",
                "--shards",
                str(shards),
                "--out",
                str(model),
                "--epochs",
                str(a.epochs),
                "--workers",
                "2",
            ]
        )
    )
    lb = cmd_label(
        _parse(
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
    rp = cmd_report(_parse(["report", "--labels", str(labels), "--out", str(root / "report.html")]))
    q = f"SELECT count(*), count(DISTINCT product_id) FROM read_parquet('{labels}/history/*/*.parquet')"
    rows, distinct = duckdb.connect().execute(q).fetchall()[0]
    test = tr["metrics"]["test"]["heads"]
    out = {
        "catalog": str(a.catalog),
        "products packed": sh["packed"],
        "quarantined": f"{sh['quarantined']} ({sh['reasons']})",
        "labels rows / distinct": f"{rows} / {distinct} (DuckDB)",
        "label throughput": lb["throughput"],
        "train throughput": tr["train throughput"],
    }
    out |= {
        f"held-out {h}": (
            f"top-1 {100 * m['top1']:.1f}%" if "top1" in m else f"recall@3 {100 * m['recall@3']:.1f}%"
        )
        for h, m in test.items()
    }
    out |= {
        "labels": str(labels / "history"),
        "report": rp["out"],
        "model": str(model),
        "total time": f"{time.time() - t0:.0f} s",
    }
    _print_summary("demo summary", out)
    print(
        "\nquery it:  .venv/bin/fashionlabel query --labels "
        f'{labels} "SELECT articleType, count(*) FROM history GROUP BY 1 ORDER BY 2 DESC LIMIT 10"'
    )
    return out


# ---- parser ----------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fashionlabel", description=__doc__.split("\n\n")[0])
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    def add(name: str, fn: Callable, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        sp.set_defaults(fn=fn)
        # Every command takes it (design.md); those outside NEEDS_RAY run in this process and need no cluster.
        sp.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or local)")
        return sp

    s = add("shard", cmd_shard, "Pack a catalog into WebDataset shards with index and quarantine.")
    s.add_argument("--catalog", required=True, help="CSV, Parquet or JSON Lines catalog (local or s3://)")
    s.add_argument("--out", required=True, help="output folder or s3:// prefix")
    s.add_argument("--taxonomy", default="fashion-product-images", help="built-in name or YAML file")
    s.add_argument("--samples-per-shard", type=int, default=1000)
    s.add_argument("--max-side", type=int, default=256, help="longest image side after normalisation")
    s.add_argument("--jpeg-quality", type=int, default=90)
    s.add_argument("--max-pixels", type=int, default=40_000_000, help="decompression-bomb guard")
    s.add_argument(
        "--max-failure-rate",
        type=float,
        default=0.5,
        help="fail the job when more than this share of rows is quarantined",
    )
    s.add_argument("--min-side", type=int, default=8, help="smaller images are quarantined")
    s.add_argument(
        "--incremental",
        default=None,
        metavar="PREV",
        help="previous shards folder (or its index.parquet): pack only new or changed products",
    )

    t = add("train", cmd_train, "Train a multi-task model on shards with Ray Train (DDP).")
    t.formatter_class = _ShowDefaults
    t.add_argument("--shards", required=True, help="a shard set written by `fashionlabel shard`")
    t.add_argument(
        "--out",
        required=True,
        help="model artifact folder or s3:// prefix: new, empty, or a model trained with the same settings",
    )
    t.add_argument("--model", default="fl_small", help="a registered model (`fashionlabel models`)")
    t.add_argument("--epochs", type=int, default=15, help="epochs at most (early stopping may end sooner)")
    t.add_argument("--workers", type=int, default=2, help="DDP workers (gloo on CPU, NCCL with --gpu)")
    t.add_argument("--gpu", action="store_true", help="one GPU per worker, bf16 autocast, channels_last")
    t.add_argument("--batch-size", type=int, default=64, help="global batch size")
    t.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate")
    t.add_argument("--height", type=int, default=80, help="model input height (images are resized to it)")
    t.add_argument("--width", type=int, default=60, help="model input width")
    t.add_argument("--patience", type=int, default=5, help="early stopping: epochs without improvement")
    t.add_argument("--uncertainty", action="store_true", help="learn head weights (Kendall et al.)")
    t.add_argument(
        "--init-weights",
        default=None,
        help="start from these weights: a model's weights.pt (not a fused deployment form) or a run's "
        "checkpoints/best.pt; refused when it fits less than half of the model",
    )
    t.add_argument("--seed", type=int, default=0, help="seed of weights and data order")
    t.add_argument("--label-smoothing", type=float, default=0.0, help="for single heads' cross-entropy")
    t.add_argument(
        "--warmup-epochs",
        type=float,
        default=1.0,
        help="linear learning-rate warm-up to --lr, then a cosine to 0 at the last epoch",
    )
    t.add_argument(
        "--ema-epochs",
        type=float,
        default=0.0,
        help="also validate a moving average of the weights over this many epochs and keep the "
        "better weights (0: off)",
    )
    t.add_argument(
        "--storage", default=None, help="checkpoint folder or s3:// prefix (default: OUT.train/checkpoints)"
    )
    t.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a model in --out and checkpoints that were trained with other settings",
    )

    e = add("evaluate", cmd_evaluate, "Evaluate a model artifact on one split of a shard set.")
    e.add_argument("--model", required=True, help="model artifact folder or s3:// prefix")
    e.add_argument("--shards", required=True)
    e.add_argument("--split", default="test", choices=["train", "val", "test", "all"])
    e.add_argument("--out", default=None, help="folder for metrics JSON and confusion PNG (default: MODEL)")

    lb = add("label", cmd_label, "Label shards with a model into Parquet (one file per shard).")
    lb.add_argument("--shards", required=True)
    lb.add_argument("--model", required=True, help="model artifact folder or s3:// prefix")
    lb.add_argument("--out", required=True, help="labels root (history/run_date=… is created under it)")
    lb.add_argument("--run-date", default=None, help="YYYY-MM-DD (default: today, UTC)")
    _label_options(lb)
    lb.add_argument(
        "--incremental",
        action="store_true",
        help="skip products this model already labelled with the same image_sha256 (any date)",
    )

    r = add("report", cmd_report, "Write the HTML report of the newest labels run.")
    r.add_argument("--labels", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--date", default=None, help="night (nightly roots; default: the newest night)")

    n = add("nightly", cmd_nightly, "Label tonight's new and changed products and publish labels/latest.")
    n.add_argument("--catalog", required=True, help="tonight's full catalog (local or s3://)")
    n.add_argument("--model", required=True, help="model artifact folder or s3:// prefix")
    n.add_argument("--root", required=True, help="nightly root: shards/, labels/, reports/, manifests/")
    n.add_argument("--date", default=None, help="YYYY-MM-DD (default: today, UTC)")
    n.add_argument(
        "--relabel-older-than",
        type=int,
        default=None,
        metavar="DAYS",
        help="also relabel active products whose label is older than DAYS",
    )
    n.add_argument("--samples-per-shard", type=int, default=1000)
    n.add_argument("--max-side", type=int, default=256)
    n.add_argument(
        "--max-failure-rate",
        type=float,
        default=0.5,
        help="fail the night when more than this share of the catalog's rows is quarantined",
    )
    n.add_argument(
        "--max-catalog-drop",
        type=float,
        default=0.5,
        help="refuse a catalog that lacks more than this share of last night's active products "
        "(a truncated export); 1 allows any",
    )
    _label_options(n)
    n.add_argument("--keep-snapshots", type=int, default=7, help="latest snapshots kept for readers")

    qy = add(
        "query", cmd_query, "Run SQL (DuckDB) over the views latest, history and nights of a labels root."
    )
    qy.add_argument("sql")
    qy.add_argument("--labels", required=True, help="labels root (local or s3://), e.g. ROOT/labels")
    qy.add_argument("--csv", action="store_true", help="print CSV instead of a table")
    qy.add_argument(
        "--max-rows",
        type=_non_negative,
        default=60,
        help="rows printed before the middle of a longer result is cut (default 60; 0: print every row)",
    )

    add("models", cmd_models, "List the registered models.")

    pr = add("prune", cmd_prune, "Channel-prune an SE-Xception artifact (LASSO selection + least squares).")
    pr.add_argument("--model", required=True, help="an xception_se / xception_se_s artifact")
    pr.add_argument("--shards", required=True, help="shards: train split calibrates, val split measures")
    pr.add_argument("--out", required=True, help="a new folder for the pruned artifact")
    pr.add_argument(
        "--blocks",
        default="3,5,7",
        help="middle modules to prune, comma separated, counted from 0 (default 3,5,7: xception_se's 8 "
        "modules; xception_se_s has 4, 0..3)",
    )
    pr.add_argument("--keep", type=float, default=0.5, help="fraction of channels kept in each pruned layer")
    pr.add_argument("--calib-images", type=int, default=256, help="training images used for the regressions")

    d = add("demo", cmd_demo, "Run shard → train → label → report on the bundled sample catalog.")
    d.add_argument("--catalog", default=str(SAMPLE_CATALOG))
    d.add_argument("--out", default="demo-out")
    d.add_argument("--epochs", type=int, default=15)
    d.add_argument(
        "--run-date",
        default=time.strftime("%Y-%m-%d", time.gmtime()),
        help="YYYY-MM-DD (default: today, UTC)",
    )
    return p


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    return build_parser().parse_args(list(argv))


NEEDS_RAY = {"shard", "train", "label", "demo", "nightly"}


def run(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, run the subcommand, return the exit code."""
    args = _parse(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # Ray Train gives a worker group 60 s to start; a busy machine needs longer (read by the local Ray).
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600")
    try:
        if args.command in NEEDS_RAY:
            from fashionlabel.runtime import ray_session

            with ray_session(args.address):
                args.fn(args)
        else:
            args.fn(args)
    except (KeyboardInterrupt, SystemExit):
        # SystemExit too: while Ray Train runs, its own SIGINT handler aborts the run and calls sys.exit
        print("fashionlabel: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the command line shows one clear line, logs keep the trace
        log.debug("failure", exc_info=True)
        from fashionlabel.storage import _clean

        print(f"fashionlabel {args.command}: error: {_clean(e)}", file=sys.stderr)
        return 1
    return 0


def main() -> None:
    sys.exit(run())


if __name__ == "__main__":
    main()
