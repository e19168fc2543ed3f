"""The ``fashionlabel`` command: thin argument parsing over the library, one subcommand per stage.

Every subcommand shows progress while it runs, ends with a one-screen summary, exits 0 on success and
non-zero with a one-line message on failure. ``--address`` / ``RAY_ADDRESS`` picks a Ray cluster; by
default a local Ray is started and stopped by the command.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from fashionlabel import commands

log = logging.getLogger("fashionlabel")
SAMPLE_CATALOG = Path(__file__).resolve().parents[1] / "examples" / "sample" / "catalog.csv"


class _Parser(argparse.ArgumentParser):
    """An argument parser whose refusal of a mistyped choice (a subcommand, ``--decode``, ``--split``) names
    the nearest valid one, as the taxonomy's key check does."""

    def error(self, message: str):
        m = re.search(r"invalid choice: '(.*?)' \(choose from (.*)\)", message)
        if m:
            near = difflib.get_close_matches(m[1], re.findall(r"'([^']*)'", m[2]), n=1)
            if near:
                message += f"; did you mean '{near[0]}'?"
        super().error(message)


class _ShowDefaults(argparse.HelpFormatter):
    """Help that names each option's default where it has one (not "None" or "False")."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        # by identity: `0 in (None, False)` is True, which would hide a default of 0 (`--seed`, `--cutmix`)
        unset = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if not unset and "default" not in text:
            text += " (default: %(default)s)"
        return text


def _non_negative(text: str) -> int:
    n = int(text)
    if n < 0:
        raise argparse.ArgumentTypeError(f"{n} is negative")
    return n


def _module_list(text: str) -> list[int]:
    """``--blocks``: module indices, comma separated (``3,5,7``)."""
    try:
        blocks = [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of module numbers"
        ) from None
    if not blocks:
        raise argparse.ArgumentTypeError("names no module")
    return blocks


def _plan_options(p: argparse.ArgumentParser) -> None:
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
        default=None,
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


# ---- parser ----------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The ``fashionlabel`` argument parser: one subparser per subcommand, bound to its ``cmd_*`` function."""
    p = _Parser(
        prog="fashionlabel",
        description="Label fashion product catalogs: shard a catalog, train a multi-task model, label "
        "the catalog (once, or nightly), report and query the labels.",
        epilog="New here? `fashionlabel demo` runs shard → train → label → report on the bundled sample "
        "(a few minutes on a laptop). `fashionlabel COMMAND --help` describes each command's options.",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    # not required=True: with no command, run() prints this help rather than argparse's bare
    # "the following arguments are required: command"
    sub = p.add_subparsers(dest="command", metavar="COMMAND", title="commands")

    def add(name: str, fn: Callable, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help, formatter_class=_ShowDefaults)
        sp.set_defaults(fn=fn)
        # after the subcommand too; SUPPRESS keeps a -v given before it from being reset to False
        sp.add_argument(
            "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging"
        )
        # Every command takes it (a job passes it to any); those outside NEEDS_RAY run in this process and
        # need no cluster, which their help says rather than offering a choice that changes nothing.
        sp.add_argument(
            "--address",
            default=None,
            help="Ray cluster address (default: RAY_ADDRESS or local)"
            if name in NEEDS_RAY
            else "accepted and not used: this command runs in this process and needs no Ray cluster",
        )
        return sp

    _shard_options(
        add("shard", commands.cmd_shard, "Pack a catalog into WebDataset shards with index and quarantine.")
    )
    _train_options(
        add("train", commands.cmd_train, "Train a multi-task model on shards with Ray Train (DDP).")
    )
    _evaluate_options(
        add("evaluate", commands.cmd_evaluate, "Evaluate a model artifact on one split of a shard set.")
    )
    _label_options(
        add("label", commands.cmd_label, "Label shards with a model into Parquet (one file per shard).")
    )
    _report_options(
        add(
            "report",
            commands.cmd_report,
            "Write the HTML report of a labels root: its newest run, or a night of a nightly root.",
        )
    )
    _nightly_options(
        add(
            "nightly",
            commands.cmd_nightly,
            "Label tonight's new and changed products and publish labels/latest.",
        )
    )
    _query_options(
        add(
            "query",
            commands.cmd_query,
            "Run read-only SQL (DuckDB) over the views latest, history, nights and snapshots of a labels root.",
        )
    )
    add("models", commands.cmd_models, "List the registered models.")
    _prune_options(
        add(
            "prune",
            commands.cmd_prune,
            "Channel-prune an SE-Xception artifact (LASSO selection + least squares).",
        )
    )
    _calibrate_options(
        add(
            "calibrate",
            commands.cmd_calibrate,
            "Refit a model's confidence thresholds (and temperatures) on validation into a new artifact.",
        )
    )
    _demo_options(
        add("demo", commands.cmd_demo, "Run shard → train → label → report on the bundled sample catalog.")
    )
    return p


def _shard_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--catalog", required=True, help="CSV, Parquet or JSON Lines catalog (local or s3://)")
    p.add_argument("--out", required=True, help="output folder or s3:// prefix")
    p.add_argument("--taxonomy", default="fashion-product-images", help="built-in name or YAML file")
    p.add_argument("--samples-per-shard", type=int, default=1000, help="products per tar")
    p.add_argument("--max-side", type=int, default=256, help="longest image side after normalisation")
    p.add_argument("--jpeg-quality", type=int, default=90, help="quality of the normalised JPEGs")
    p.add_argument("--max-pixels", type=int, default=40_000_000, help="decompression-bomb guard")
    p.add_argument(
        "--max-failure-rate",
        type=float,
        default=0.5,
        help="fail the job when more than this share of rows is quarantined",
    )
    p.add_argument("--min-side", type=int, default=8, help="smaller images are quarantined")
    p.add_argument(
        "--fetches-in-flight",
        type=int,
        default=8,
        help="image fetches each shard or hash-pass task keeps going at once (lower it for a rate-limited "
        "image host)",
    )
    p.add_argument(
        "--incremental",
        default=None,
        metavar="PREV",
        help="previous shards folder (or its index.parquet): pack only new or changed products",
    )


def _train_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shards", required=True, help="a shard set written by `fashionlabel shard`")
    p.add_argument(
        "--out",
        required=True,
        help="model artifact folder or s3:// prefix: new, empty, or a model trained with the same settings",
    )
    p.add_argument("--model", default="fl_small", help="a registered model (`fashionlabel models`)")
    p.add_argument("--epochs", type=int, default=15, help="epochs at most (early stopping may end sooner)")
    p.add_argument("--workers", type=int, default=2, help="DDP workers (gloo on CPU, NCCL with --gpu)")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker, bf16 autocast, channels_last")
    p.add_argument("--batch-size", type=int, default=64, help="global batch size")
    p.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate")
    p.add_argument(
        "--weight-decay",
        type=float,
        default=5e-4,
        help="AdamW's decoupled weight decay, on conv and linear weights only (not norms, biases)",
    )
    p.add_argument("--height", type=int, default=80, help="model input height (images are resized to it)")
    p.add_argument("--width", type=int, default=60, help="model input width")
    p.add_argument("--patience", type=int, default=5, help="early stopping: epochs without improvement")
    p.add_argument("--uncertainty", action="store_true", help="learn head weights (Kendall et al.)")
    p.add_argument(
        "--init-weights",
        default=None,
        help="start from these weights: a model (its folder or weights.pt; not a fused deployment form) "
        "or a run's checkpoints/best.pt, local or s3://; refused when it fits less than half of the model. Head rows "
        "are matched by value name (new values start fresh); a bare state_dict's heads start fresh",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of weights and data order")
    p.add_argument("--label-smoothing", type=float, default=0.0, help="for single heads' cross-entropy")
    p.add_argument(
        "--warmup-epochs",
        type=float,
        default=1.0,
        help="linear learning-rate warm-up to --lr, then a cosine to 0 at the last epoch",
    )
    p.add_argument(
        "--ema-epochs",
        type=float,
        default=0.0,
        help="also validate a moving average of the weights over this many epochs and keep the "
        "better weights (0: off)",
    )
    p.add_argument(
        "--cutmix",
        type=float,
        default=0.0,
        help="share of batches in which each image gets a box cut from another and the loss mixes both "
        "products' labels by area (0: off)",
    )
    p.add_argument(
        "--review-share",
        type=float,
        default=None,
        help="fit the confidence thresholds to flag at most this share of validation products as "
        "needs_review (default: each head flags enough to catch half its errors)",
    )
    p.add_argument(
        "--storage", default=None, help="checkpoint folder or s3:// prefix (default: OUT.train/checkpoints)"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a model in --out and checkpoints that were trained with other settings (without it, "
        "a model trained with these settings on these shards is kept as it is: nothing is done)",
    )


def _evaluate_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model artifact folder or s3:// prefix")
    p.add_argument("--shards", required=True, help="a shard set written by `fashionlabel shard`")
    p.add_argument(
        "--split",
        default="test",
        choices=["train", "val", "test", "all"],
        help="products split by product id",
    )
    p.add_argument(
        "--out",
        default=None,
        help="folder for metrics JSON and confusion PNG (default: MODEL; for an s3:// model, its local copy "
        "in $FASHIONLABEL_CACHE)",
    )


def _label_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shards", required=True, help="a shard set written by `fashionlabel shard`")
    p.add_argument("--model", required=True, help="model artifact folder or s3:// prefix")
    p.add_argument("--out", required=True, help="labels root (history/run_date=… is created under it)")
    p.add_argument("--run-date", default=None, help="YYYY-MM-DD (default: today, UTC)")
    _plan_options(p)
    p.add_argument(
        "--incremental",
        action="store_true",
        help="skip products this model already labelled with the same image_sha256 (any date)",
    )


def _report_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--labels", required=True, help="labels root of `label`, or ROOT/labels of a nightly root")
    p.add_argument(
        "--out", required=True, help="the report's HTML file (self-contained: its charts are embedded in it)"
    )
    p.add_argument("--date", default=None, help="night (nightly roots; default: the night latest shows)")


def _nightly_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--catalog", required=True, help="tonight's full catalog (local or s3://)")
    p.add_argument("--model", required=True, help="model artifact folder or s3:// prefix")
    p.add_argument("--root", required=True, help="nightly root: shards/, labels/, reports/, manifests/")
    p.add_argument("--date", default=None, help="YYYY-MM-DD (default: today, UTC)")
    p.add_argument(
        "--relabel-older-than",
        type=int,
        default=None,
        metavar="DAYS",
        help="also relabel active products whose label is older than DAYS",
    )
    p.add_argument("--samples-per-shard", type=int, default=1000, help="products per tar")
    p.add_argument("--max-side", type=int, default=256, help="longest image side after normalisation")
    p.add_argument(
        "--max-failure-rate",
        type=float,
        default=0.5,
        help="fail the night when more than this share of the catalog's rows is quarantined",
    )
    p.add_argument(
        "--fetches-in-flight",
        type=int,
        default=8,
        help="image fetches each shard or hash-pass task keeps going at once (lower it for a rate-limited "
        "image host)",
    )
    p.add_argument(
        "--max-catalog-drop",
        type=float,
        default=0.5,
        help="refuse a catalog that lacks more than this share of last night's active products "
        "(a truncated export); 1 allows any",
    )
    _plan_options(p)
    p.add_argument("--keep-snapshots", type=int, default=7, help="latest snapshots kept for readers")


def _query_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("sql", help="a DuckDB query over the views latest, history, nights and snapshots")
    p.add_argument("--labels", required=True, help="labels root (local or s3://), e.g. ROOT/labels")
    p.add_argument(
        "--csv", action="store_true", help="print CSV (list and struct columns as JSON) instead of a table"
    )
    p.add_argument(
        "--max-rows",
        type=_non_negative,
        default=60,
        help="rows printed before the middle of a longer result is cut (default 60; 0: print every row)",
    )


def _prune_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="an xception_se / xception_se_s artifact")
    p.add_argument("--shards", required=True, help="shards: train split calibrates, val split measures")
    p.add_argument("--out", required=True, help="a new folder for the pruned artifact")
    p.add_argument(
        "--blocks",
        type=_module_list,
        default="3,5,7",
        help="middle modules to prune, comma separated, counted from 0 (default 3,5,7: xception_se's 8 "
        "modules; xception_se_s has 4, 0..3)",
    )
    p.add_argument(
        "--keep", type=float, default=0.5, help="fraction of channels kept in each pruned layer (at least 8)"
    )
    p.add_argument("--calib-images", type=int, default=256, help="training images used for the regressions")


def _calibrate_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model artifact folder or s3:// prefix")
    p.add_argument("--shards", required=True, help="shards whose validation split the thresholds are fit on")
    p.add_argument("--out", required=True, help="a new folder or s3:// prefix for the recalibrated artifact")
    how = p.add_mutually_exclusive_group()
    how.add_argument(
        "--review-share",
        type=float,
        default=None,
        help="thresholds that catch the most errors while flagging at most this share of validation "
        "products as needs_review",
    )
    how.add_argument(
        "--error-cut",
        type=float,
        default=0.5,
        help="share of each head's validation errors left in the labels it accepts (lower: more review)",
    )


def _demo_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--catalog", default=str(SAMPLE_CATALOG), help="the catalog to run on")
    p.add_argument("--out", default="demo-out", help="folder for shards, model, labels and report")
    p.add_argument("--epochs", type=int, default=15, help="training epochs")
    p.add_argument(
        "--run-date",
        default=time.strftime("%Y-%m-%d", time.gmtime()),
        help="YYYY-MM-DD (default: today, UTC)",
    )


def parse(argv: Sequence[str]) -> argparse.Namespace:
    """The parsed command line; ``fn`` is the subcommand's function."""
    return build_parser().parse_args(list(argv))


NEEDS_RAY = {"shard", "train", "label", "demo", "nightly"}


# settings fields whose option has another name
_FIELD_DEST = {"relabel_older_than_days": "relabel_older_than"}


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


def _refuse_unknown(parser: argparse.ArgumentParser, command: str | None, extra: list[str]) -> None:
    """Exit as argparse does for arguments no option takes, but as the subcommand (``fashionlabel shard:
    error``), naming the option a mistyped one was meant to be (``--sample-per-shard`` →
    ``--samples-per-shard``)."""
    p = _subparser(parser, command) if command else parser
    known = [o for a in p._actions for o in a.option_strings if o.startswith("--")]
    near = [
        f"{x.split('=')[0]!r}: did you mean {m[0]!r}?"
        for x in extra
        if x.startswith("--") and (m := difflib.get_close_matches(x.split("=")[0], known, n=1))
    ]
    p.error(f"unrecognized arguments: {' '.join(extra)}" + (f" ({'; '.join(near)})" if near else ""))


def _flag_of(parser: argparse.ArgumentParser, command: str, field: str) -> str | None:
    """The option of ``command`` that sets a settings field (``batch_size`` → ``--batch-size``), if any."""
    dest = _FIELD_DEST.get(field, field)
    for action in _subparser(parser, command)._actions:
        if action.dest == dest and action.option_strings:
            return max(action.option_strings, key=len)
    return None


def _unknown_options(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """The ``--options`` of ``argv`` its subcommand has no option for (argparse's abbreviations count as
    known), looked for before parsing: argparse reports a required option missing (``--catalog``, when
    ``--catlog`` was typed) before arguments it does not know, which hides the typo behind the symptom."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    if not argv or argv[0] not in sub.choices:
        return []
    known = [o for a in sub.choices[argv[0]]._actions for o in a.option_strings]
    unknown = []
    for token in argv[1:]:
        if token == "--":  # what follows is positional
            break
        name = token.split("=")[0]
        # as argparse reads them: a token with a space (an SQL comment, say) is a value, not an option
        if name.startswith("--") and " " not in token and not any(k.startswith(name) for k in known):
            unknown.append(token)
    return unknown


def run(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, run the subcommand, return the exit code."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if unknown := _unknown_options(parser, argv):
        _refuse_unknown(parser, argv[0], unknown)
    args, extra = parser.parse_known_args(argv)
    if extra:
        _refuse_unknown(parser, args.command, extra)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # Ray Train gives a worker group 60 s to start; a busy machine needs longer (read by the local Ray).
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600")
    try:
        from fashionlabel.commands import check_outputs_outlive_the_job

        check_outputs_outlive_the_job(args)
        if args.command in NEEDS_RAY:
            from fashionlabel.commands import check_settings
            from fashionlabel.runtime import ray_session

            check_settings(args)  # a bad value fails now, not after Ray has started

            with ray_session(args.address, name=f"fashionlabel {args.command}"):
                args.fn(args)
        else:
            from fashionlabel.runtime import sigterm_as_interrupt

            # as in the commands that start Ray: a SIGTERM killed report, calibrate, prune or evaluate
            # without a line (exit 143), and a model being exported left its staged copy beside --out
            with sigterm_as_interrupt():
                args.fn(args)
    except (KeyboardInterrupt, SystemExit):
        # SystemExit too: while Ray Train runs, its own SIGINT handler aborts the run and calls sys.exit
        print("fashionlabel: interrupted", file=sys.stderr)
        _print_notes(args.command)
        return 130
    except Exception as e:  # noqa: BLE001 - the command line shows one clear line, logs keep the trace
        log.debug("failure", exc_info=True)
        from fashionlabel.settings import SettingsError
        from fashionlabel.storage import redact

        if isinstance(e, SettingsError):  # named as the flags typed, not as the library's fields
            e = e.render(lambda field: _flag_of(parser, args.command, field))
        print(f"fashionlabel {args.command}: error: {redact(e)}", file=sys.stderr)
        _print_notes(args.command)
        return 1
    return 0


def _print_notes(command: str) -> None:
    """Print the notes of the exception being handled (which stage of a night it stopped in, how to resume):
    the last lines a failed job's log shows."""
    from fashionlabel.storage import redact

    for note in getattr(sys.exc_info()[1], "__notes__", ()):
        print(f"fashionlabel {command}: {redact(note)}", file=sys.stderr)


def main() -> None:
    """Entry point of the ``fashionlabel`` command: run ``sys.argv`` and exit with its code."""
    sys.exit(run())


if __name__ == "__main__":
    main()
