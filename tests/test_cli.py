import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from conftest import sample_rows, write_catalog

from jobs import shard as shard_job


@pytest.mark.parametrize("cmd", ["shard", "train", "evaluate", "label", "report", "demo"])
def test_help(cmd):
    r = subprocess.run(
        [sys.executable, "-m", "fashionlabel.cli", cmd, "--help"], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0 and "usage: fashionlabel" in r.stdout


# every entry point under jobs/, so that a job added there is covered without a list to update
JOBS = sorted(p.stem for p in (Path(__file__).parents[1] / "jobs").glob("*.py") if p.stem != "__init__")


@pytest.mark.parametrize("job", JOBS)
def test_each_job_shows_an_exact_ray_job_submit_command_that_parses(job, monkeypatch):
    """Each job's docstring is the command an operator copies: ``ray job submit … -- python -m jobs.<name>``
    with options its command takes (some said ``ARGS...``, which no command takes), and outputs such a job
    keeps: ``calibrate`` and ``prune`` showed ``--out M2``, which a job submitted with ``--working-dir .``
    refuses as a relative path."""
    import importlib
    import json

    from fashionlabel.cli import parse
    from fashionlabel.commands import check_outputs_outlive_the_job

    doc = " ".join(importlib.import_module(f"jobs.{job}").__doc__.replace("\\\n", " ").split())
    assert (
        "ray job submit --address $RAY_ADDRESS --working-dir . " in doc and f"-- python -m jobs.{job} " in doc
    )
    args = shlex.split(doc.partition(f"python -m jobs.{job} ")[2])
    assert args, f"jobs/{job}.py shows no arguments"
    # argparse exits on an option the command does not take or lacks a required one
    parsed = parse([job, *args])
    # as Ray sets it for a job submitted with --working-dir (test_a_relative_output_in_a_job_...)
    job_config = {"runtime_env": {"working_dir": "gcs://_ray_pkg_0123456789abcdef.zip"}, "metadata": {}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(job_config))
    check_outputs_outlive_the_job(parsed)


def test_verbose_before_or_after_the_subcommand_and_defaults_in_every_help():
    from fashionlabel.cli import build_parser, parse

    base = ["shard", "--catalog", "c.csv", "--out", "o"]
    assert parse(base).verbose is False
    assert parse(["-v", *base]).verbose is True and parse([*base, "-v"]).verbose is True
    helps = {
        c: build_parser()._subparsers._group_actions[0].choices[c].format_help()
        for c in ("shard", "nightly", "train")
    }
    assert "products per tar (default: 1000)" in helps["shard"]
    assert "(default: 0.5)" in helps["nightly"] and "(default: 7)" in helps["nightly"]
    # a default of 0 is a default too (0 == False must not hide it); a flag's False is not shown
    train = " ".join(helps["train"].split())
    assert "seed of weights and data order (default: 0)" in train
    assert "(0: off) (default: 0.0)" in train and "(default: False)" not in train


def test_no_command_shows_the_commands_and_a_mistyped_choice_names_the_nearest():
    """`fashionlabel` alone printed argparse's "the following arguments are required: command"; now the
    commands and where to start. A mistyped subcommand or choice names the one meant. Run as
    `python -m fashionlabel`, which works as the command does."""
    import os

    env = os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}

    def cli(*argv: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "fashionlabel", *argv]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)

    r = cli()
    text = " ".join(r.stderr.split())  # argparse wraps the help to the terminal's width
    assert r.returncode == 2 and "required" not in text, r.stderr
    assert "shard" in text and "nightly" in text and "`fashionlabel demo` runs" in text
    r = cli("--help")
    assert r.returncode == 0 and "`fashionlabel COMMAND --help` describes" in " ".join(r.stdout.split())
    r = cli("shrad", "--catalog", "c.csv", "--out", "o")
    assert r.returncode == 2 and r.stderr.rstrip().endswith("did you mean 'shard'?"), r.stderr
    r = cli("evaluate", "--model", "m", "--shards", "s", "--split", "tset")
    assert r.returncode == 2 and r.stderr.rstrip().endswith("did you mean 'test'?"), r.stderr
    r = cli("label", "--shards", "s", "--model", "m", "--out", "o", "--decode", "xyz")
    assert r.returncode == 2 and "(choose from 'cpu', 'gpu', 'split', 'auto')" in r.stderr
    assert "did you mean" not in r.stderr  # nothing near: no guess


def test_a_mistyped_option_is_named_by_its_subcommand_with_the_nearest_one(capsys):
    """`shard --sample-per-shard 5` failed as "fashionlabel: error: unrecognized arguments", under the
    top-level usage, with no hint of the option meant."""
    import os

    env = os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    argv = ["shard", "--catalog", "c.csv", "--out", "o", "--sample-per-shard", "5"]
    r = subprocess.run(
        [sys.executable, "-m", "fashionlabel", *argv], capture_output=True, text=True, timeout=60, env=env
    )
    assert r.returncode == 2 and "usage: fashionlabel shard" in r.stderr, r.stderr
    assert r.stderr.rstrip().splitlines()[-1] == (
        "fashionlabel shard: error: unrecognized arguments: --sample-per-shard "
        "('--sample-per-shard': did you mean '--samples-per-shard'?)"
    )
    # a mistyped required option: named as the typo, not as "the following arguments are required"
    from fashionlabel.cli import run

    for argv, typo, meant in [
        (["shard", "--catlog", "c.csv", "--out", "o"], "--catlog", "--catalog"),
        (["label", "--shards", "s", "--model=m", "--ot=o"], "--ot", "--out"),
    ]:
        with pytest.raises(SystemExit) as e:
            run(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err.rstrip().splitlines()[-1]
        assert f"unrecognized arguments: {typo}" in err and f"did you mean {meant!r}" in err, err
    # an abbreviation argparse takes, and a value with a space that starts like an option, are not refused
    from fashionlabel.cli import _unknown_options, build_parser

    assert _unknown_options(build_parser(), ["shard", "--cat", "c.csv", "--out", "o"]) == []
    assert _unknown_options(build_parser(), ["query", "--labels", "l", "-- tonight\nSELECT 1"]) == []


def test_address_help_says_which_commands_use_a_cluster():
    """`query --help` offered "Ray cluster address (default: RAY_ADDRESS or local)", an option that changes
    nothing for a command that runs in its own process."""
    from fashionlabel.cli import NEEDS_RAY, build_parser

    choices = build_parser()._subparsers._group_actions[0].choices
    for name, sp in choices.items():
        text = " ".join(sp.format_help().split())
        uses = "--address ADDRESS Ray cluster address (default: RAY_ADDRESS or local)" in text
        unused = "--address ADDRESS accepted and not used: this command runs in this process" in text
        assert (uses, unused) == ((True, False) if name in NEEDS_RAY else (False, True)), name


def test_shard_job_main_and_clear_failure(ray_session, small_catalog, tmp_path, capsys):
    assert (
        shard_job.main(
            ["--catalog", str(small_catalog), "--out", str(tmp_path / "s"), "--samples-per-shard", "400"]
        )
        == 0
    )
    assert pq.read_table(tmp_path / "s" / "index.parquet").num_rows == 600
    out = capsys.readouterr().out
    assert "packed" in out and "image_not_found 6" in out
    # where the quarantined rows are, each with its reason
    assert f"quarantine {tmp_path}/s/quarantine.parquet (product_id, reason, detail)" in " ".join(out.split())
    assert shard_job.main(["--catalog", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "t")]) == 1
    assert "catalog not found" in capsys.readouterr().err


def test_bad_settings_are_refused_by_name_before_anything_is_written(
    ray_session, small_catalog, tiny_model, small_shards, tmp_path, capsys
):
    from fashionlabel.cli import run

    out = tmp_path / "out"
    half = tmp_path / "half-model"  # an artifact whose weights are gone
    shutil.copytree(tiny_model, half)
    (half / "weights.pt").unlink()
    cases = {
        "invalid training setting(s): --epochs 0, --ema-epochs -1.0": [
            "train", "--shards", str(small_shards), "--out", str(out), "--epochs", "0", "--ema-epochs", "-1"
        ],
        "invalid training setting(s): --model resnet5O": [
            "train", "--shards", str(small_shards), "--out", str(out), "--model", "resnet5O"
        ],
        "invalid shard setting(s): --samples-per-shard 0": [
            "shard", "--catalog", str(small_catalog), "--out", str(out), "--samples-per-shard", "0"
        ],
        "invalid label setting(s): --batch-size 0": [
            "label", "--shards", str(small_shards), "--model", str(tiny_model), "--out", str(out),
            "--batch-size", "0",
        ],
        "invalid label setting(s): --cpu-decode-share 1.5": [
            "label", "--shards", str(small_shards), "--model", str(tiny_model), "--out", str(out),
            "--decode", "split", "--cpu-decode-share", "1.5",
        ],
        f"model artifact {half} is incomplete: missing weights.pt": [
            "label", "--shards", str(small_shards), "--model", str(half), "--out", str(out),
        ],
        "invalid prune setting(s): --keep 1.5": [
            "prune", "--model", str(tiny_model), "--shards", str(small_shards), "--out", str(out), "--keep", "1.5"
        ],
        "run date '2026-13-45' is not a date (YYYY-MM-DD)": [
            "label", "--shards", str(small_shards), "--model", str(tiny_model), "--out", str(out),
            "--run-date", "2026-13-45",
        ],
        "invalid label setting(s): --compile-cache s3://bucket/kernels": [
            "label", "--shards", str(small_shards), "--model", str(tiny_model), "--out", str(out),
            "--compile", "--compile-cache", "s3://bucket/kernels",
        ],
        "--compile-cache /var/cache/fl (a compile cache is a local folder on each node, without spaces, and "
        "needs --compile)": [  # given, but nothing is compiled
            "nightly", "--catalog", str(small_catalog), "--model", str(tiny_model), "--root", str(out),
            "--compile-cache", "/var/cache/fl",
        ],
        # a share the run would ignore (it decodes all on the CPU or all in the actors)
        "--cpu-decode-share 0.3 is the share of images the read tasks decode with --decode split, and this "
        "run decodes with --decode auto": [
            "label", "--shards", str(small_shards), "--model", str(tiny_model), "--out", str(out),
            "--cpu-decode-share", "0.3",
        ],
        "--cpu-decode-share 0.3 is the share of images the read tasks decode with --decode split, and this "
        "run decodes with --decode cpu": [
            "nightly", "--catalog", str(small_catalog), "--model", str(tiny_model), "--root", str(out),
            "--decode", "cpu", "--cpu-decode-share", "0.3",
        ],
        "invalid nightly setting(s): --relabel-older-than -5": [
            "nightly", "--catalog", str(small_catalog), "--model", str(tiny_model), "--root", str(out),
            "--relabel-older-than", "-5",
        ],
        f"--out {tmp_path} is a folder: give the report's file name, e.g. {tmp_path}/report.html": [
            "report", "--labels", str(out / "labels"), "--out", str(tmp_path),
        ],
        "run date 'yesterday' is not a date": [
            "nightly", "--catalog", str(small_catalog), "--model", str(tiny_model), "--root", str(out),
            "--date", "yesterday",
        ],
    }  # fmt: skip
    for message, argv in cases.items():
        assert run(argv) == 1, argv
        assert message in capsys.readouterr().err, argv
        assert not out.exists(), argv


def test_bad_settings_are_refused_before_a_cluster_is_joined(small_catalog, tmp_path):
    """In a fresh process (this one already has Ray), pointed at an address where no cluster answers: the
    bad value is named, not the address, so no cluster was started or joined before the check."""
    import os
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{s.getsockname()[1]}"
    out = str(tmp_path / "out")
    cases = {
        "invalid training setting(s): --cutmix 2.0": ["train", "--shards", out, "--out", out, "--cutmix", "2"],
        "invalid training setting(s): --review-share 0.0": [
            "train", "--shards", out, "--out", out, "--review-share", "0"
        ],
        "invalid training setting(s): --seed -1": ["train", "--shards", out, "--out", out, "--seed", "-1"],
        "invalid training setting(s): --warmup-epochs 5.0": [
            "train", "--shards", out, "--out", out, "--epochs", "2", "--warmup-epochs", "5"
        ],
        # 2 workers cannot split 65 evenly: one would be dropped every step, while the model records 65
        "invalid training setting(s): --batch-size 65": [
            "train", "--shards", out, "--out", out, "--workers", "2", "--batch-size", "65"
        ],
        "invalid training setting(s): --init-weights ''": [
            "train", "--shards", out, "--out", out, "--init-weights", ""
        ],
        "invalid shard setting(s): --samples-per-shard 0": [
            "shard", "--catalog", str(small_catalog), "--out", out, "--samples-per-shard", "0"
        ],
        "invalid nightly setting(s): --relabel-older-than -5": [
            "nightly", "--catalog", str(small_catalog), "--model", out, "--root", out, "--relabel-older-than", "-5"
        ],
        "run date '2026-02-30' is not a date": [
            "label", "--shards", out, "--model", out, "--out", out, "--run-date", "2026-02-30"
        ],
        "run date 'tonight' is not a date": [
            "nightly", "--catalog", str(small_catalog), "--model", out, "--root", out, "--date", "tonight"
        ],
        # a mistyped path or taxonomy name, named before a local Ray takes seconds to start
        f"catalog not found: {tmp_path}/catalgo.csv": [
            "shard", "--catalog", f"{tmp_path}/catalgo.csv", "--out", out
        ],
        f"catalog not found: {tmp_path}/tonight.csv": [
            "nightly", "--catalog", f"{tmp_path}/tonight.csv", "--model", out, "--root", out
        ],
        "no taxonomy 'shop.yml': not a built-in": [
            "shard", "--catalog", str(small_catalog), "--out", out, "--taxonomy", "shop.yml"
        ],
        f"catalog {tmp_path} is a folder, not a file": ["shard", "--catalog", str(tmp_path), "--out", out],
        # an input the driver reads first (a shard set, a model, a previous index) that is not there
        f"--incremental {tmp_path}: no previous index at {tmp_path}/index.parquet": [
            "shard", "--catalog", str(small_catalog), "--out", out, "--incremental", str(tmp_path)
        ],
        f"--shards {tmp_path}/shrads: no such file or folder": [
            "train", "--shards", f"{tmp_path}/shrads", "--out", out
        ],
        f"--init-weights {tmp_path}/old/weights.pt: no such file or folder": [
            "train", "--shards", str(tmp_path), "--out", out, "--init-weights", f"{tmp_path}/old/weights.pt"
        ],
        f"--model {tmp_path}/modle: no such file or folder": [
            "label", "--shards", str(tmp_path), "--model", f"{tmp_path}/modle", "--out", out
        ],
        f"--model {tmp_path}/model: no such file or folder": [
            "nightly", "--catalog", str(small_catalog), "--model", f"{tmp_path}/model", "--root", out
        ],
    }  # fmt: skip
    for message, argv in cases.items():
        r = subprocess.run(
            [sys.executable, "-m", "fashionlabel.cli", *argv, "--address", closed],
            capture_output=True,
            text=True,
            timeout=120,
            env=os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[1])},
        )
        assert r.returncode == 1 and message in r.stderr, (argv, r.stderr[-1000:])


def test_a_folder_that_is_not_a_shard_set_is_refused_by_name(ray_session, tiny_model, tmp_path, capsys):
    from fashionlabel.cli import run

    empty = tmp_path / "typo"
    empty.mkdir()
    before = (tiny_model / "evaluation-test.json").read_bytes()
    for argv in (
        ["label", "--shards", str(empty), "--model", str(tiny_model), "--out", str(tmp_path / "labels")],
        ["evaluate", "--model", str(tiny_model), "--shards", str(empty)],
        ["train", "--shards", str(empty), "--out", str(tmp_path / "m"), "--epochs", "1"],
    ):
        assert run(argv) == 1, argv
        assert f"{empty} is not a shard set" in capsys.readouterr().err, argv
    assert not (tmp_path / "labels").exists() and not (tmp_path / "m").exists()
    # the model's own evaluation is not replaced by one of nothing
    assert (tiny_model / "evaluation-test.json").read_bytes() == before


def test_a_shard_set_too_small_to_validate_on_is_refused_before_training(ray_session, tmp_path, capsys):
    from fashionlabel.cli import run
    from fashionlabel.data import split_of

    rows = [
        r for r in sample_rows() if Path(r["image_uri"]).exists() and split_of(r["product_id"]) == "train"
    ]
    catalog = write_catalog(tmp_path / "catalog.csv", rows[:4])
    assert run(["shard", "--catalog", str(catalog), "--out", str(tmp_path / "shards")]) == 0
    model = tmp_path / "m"
    argv = ["train", "--shards", str(tmp_path / "shards"), "--out", str(model), "--epochs", "1"]
    assert run(argv) == 1
    err = capsys.readouterr().err
    assert "holds 4 training and 0 validation products (of 4;" in err and "Traceback" not in err
    assert not model.exists() and not Path(f"{model}.train").exists()


def test_shard_names_a_head_whose_column_the_catalog_lacks(ray_session, tmp_path, capsys):
    """A taxonomy column misspelt (or renamed in the export) leaves its head without labels: the shard
    summary says so with the catalog's nearest column, instead of packing in silence until train refuses."""
    import json

    from fashionlabel.cli import run

    rows = [r for r in sample_rows() if Path(r["image_uri"]).exists()][:4]
    catalog = write_catalog(tmp_path / "catalog.csv", rows)
    tax = tmp_path / "shop.yaml"
    tax.write_text(
        "name: shop\nheads:\n- {name: kind, column: ArticleType, values: learn}\n"
        "- {name: gender, values: [Men, Women, Boys, Girls, Unisex]}\n"
    )
    argv = ["shard", "--catalog", str(catalog), "--out", str(tmp_path / "s"), "--taxonomy", str(tax)]
    assert run(argv) == 0
    out = capsys.readouterr().out
    assert "no labels for kind  column 'ArticleType' is not in the catalog (nearest: 'articleType')" in out
    assert "no labels for gender" not in out
    stats = json.loads((tmp_path / "s" / "stats.json").read_text())
    assert stats["missing_columns"] == {
        "kind": "column 'ArticleType' is not in the catalog (nearest: 'articleType')"
    }


def test_a_cluster_address_where_nothing_listens_fails_at_once_by_name():
    import socket
    import time

    from fashionlabel.runtime import _check_reachable

    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        port = listening.getsockname()[1]
        _check_reachable(f"127.0.0.1:{port}")  # a cluster that answers: nothing to say
        _check_reachable(f"ray://127.0.0.1:{port}")
    t = time.monotonic()
    with pytest.raises(ConnectionError, match=f"no Ray cluster answers at 127.0.0.1:{port} .*RAY_ADDRESS"):
        _check_reachable(f"127.0.0.1:{port}")  # closed now: refused, not minutes of Ray's retries
    assert time.monotonic() - t < 5
    # the job API address that `ray job submit` takes (and the README exports) is named as such
    with pytest.raises(ConnectionError, match=r"http://127.0.0.1:8265 is a Ray job API .*ray job submit"):
        _check_reachable("http://127.0.0.1:8265")
    for left_to_ray in ("auto", "local", "10.0.0.1"):
        _check_reachable(left_to_ray)


@pytest.mark.parametrize("job", JOBS)  # a list written out here had left out calibrate
def test_every_job_entry_point_runs_its_own_command(job, capsys):
    import importlib

    with pytest.raises(SystemExit) as e:
        importlib.import_module(f"jobs.{job}").main(["--help"])
    assert e.value.code == 0 and f"usage: fashionlabel {job}" in capsys.readouterr().out


def test_evaluate_job_prints_and_writes_the_metrics(ray_session, small_shards, tiny_model, tmp_path, capsys):
    import json

    from fashionlabel.data import split_of
    from jobs import evaluate as evaluate_job

    assert (
        evaluate_job.main(["--model", str(tiny_model), "--shards", str(small_shards), "--out", str(tmp_path)])
        == 0
    )
    printed = capsys.readouterr().out
    m = json.loads((tmp_path / "evaluation-test.json").read_text())
    index = pq.read_table(small_shards / "index.parquet").column("product_id").to_pylist()
    assert m["n_products"] == sum(split_of(p) == "test" for p in index) > 0
    assert m["shards"] == str(small_shards) and m["split"] == "test"  # what was measured, named in the file
    art = m["heads"]["articleType"]
    assert f"top-1 {100 * art['top1']:.1f}%" in printed and f"(n={art['n']})" in printed
    attrs = m["heads"]["attributes"]  # each group's recall is printed, not only kept in the JSON
    for g in ("fabric", "part", "shape", "texture"):
        if attrs[f"{g}_n"]:
            line = next(x for x in printed.splitlines() if f"test attributes {g} " in x)
            assert (
                f"recall@3 {100 * attrs[f'{g}_recall@3']:.1f}%" in line and f"(n={attrs[f'{g}_n']})" in line
            )
    assert list(tmp_path.glob("confusion-articleType-test.png"))


def test_a_taxonomy_of_ones_own_runs_shard_train_and_label(ray_session, small_catalog, tmp_path, capsys):
    """A user's YAML taxonomy (other head names over the same columns, a mined multi-label head) travels
    with the shards into the model and decides the labels table's columns."""
    import json

    from fashionlabel.cli import run

    tax = tmp_path / "store.yaml"
    tax.write_text(
        """name: store-lite
heads:
- {name: department, kind: single, column: gender, values: [Men, Women, Boys, Girls, Unisex]}
- name: family
  kind: single
  column: masterCategory
  values: [Accessories, Apparel, Footwear, Free Items, Home, Personal Care, Sporting Goods]
- name: tones
  kind: multi
  column: productDisplayName
  patterns:
    tone: {black: black, white: white, blue: blue|navy}
"""
    )
    shards, model, labels = tmp_path / "shards", tmp_path / "model", tmp_path / "labels"
    assert run(["shard", "--catalog", str(small_catalog), "--out", str(shards), "--taxonomy", str(tax)]) == 0
    stats = json.loads((shards / "stats.json").read_text())
    assert stats["taxonomy"]["name"] == "store-lite"
    # each summary ends with the command that takes its output further
    last = " ".join(capsys.readouterr().out.splitlines()[-1].split())
    assert last.startswith(f"next fashionlabel train --shards {shards} --out MODEL, or label them"), last
    argv = ["train", "--shards", str(shards), "--out", str(model), "--model", "fl_tiny", "--epochs", "1"]
    assert run([*argv, "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "test department" in out
    last = " ".join(out.splitlines()[-1].split())
    assert last == f"next fashionlabel label --shards {shards} --model {model} --out LABELS", last
    argv = [
        "label",
        "--shards",
        str(shards),
        "--model",
        str(model),
        "--out",
        str(labels),
        "--run-date",
        "2026-02-01",
    ]
    assert run(argv) == 0
    last = " ".join(capsys.readouterr().out.splitlines()[-1].split())
    assert last.startswith(f"next fashionlabel report --labels {labels} --out report.html, or"), last
    # the query it names runs as printed
    query = shlex.split(last.split("query them: ")[1])
    assert query[:2] == ["fashionlabel", "query"] and run(query[1:]) == 0
    assert "600" in capsys.readouterr().out
    t = pq.read_table(labels / "history" / "run_date=2026-02-01")
    heads = [c for c in t.column_names if c.startswith(("department", "family", "tones"))]
    assert heads == [
        *("department", "department_score", "department_topk"),
        *("family", "family_score", "family_topk"),
        *("tones", "tones_scores"),
    ]
    assert "gender" not in t.column_names and t.num_rows == 600
    ok = t.filter(pc.is_null(t["error"]))
    assert set(ok["department"].to_pylist()) <= {"Men", "Women", "Boys", "Girls", "Unisex"}
    assert {v for vs in ok["tones"].to_pylist() for v in vs} <= {"black", "white", "blue"}


def test_demo_on_a_cluster_is_refused_before_anything_is_written(ray_session, tmp_path, capsys, monkeypatch):
    """The demo's folders are local: on a cluster its train step would refuse them after the shards were
    written, naming a --storage option the demo does not have."""
    from fashionlabel import runtime
    from fashionlabel.cli import run

    monkeypatch.setattr(runtime, "may_span_nodes", lambda: True)
    assert run(["demo", "--out", str(tmp_path / "demo"), "--epochs", "1"]) == 1
    err = capsys.readouterr().err
    assert "run it on a local Ray (leave --address and RAY_ADDRESS unset)" in err and "--storage" not in err
    assert not (tmp_path / "demo").exists()


def test_demo_end_to_end_names_the_labels_root_that_query_and_report_take(
    ray_session, small_catalog, tmp_path, capsys
):
    """The demo on 600 products, one epoch. Its summary named labels/history as its labels, a folder that
    `query --labels` and `report --labels` both refused; the query it prints last runs as printed. Into a
    folder with a quote and a space: its last step, a DuckDB count over its labels, failed there with a
    parser error once everything else had run, and the query line it printed did not parse in a shell."""
    from fashionlabel.cli import run

    out = tmp_path / "o'neil demo"
    argv = ["demo", "--catalog", str(small_catalog), "--out", str(out), "--epochs", "1"]
    assert run([*argv, "--run-date", "2026-03-01"]) == 0
    printed = capsys.readouterr().out
    lines = [" ".join(line.split()) for line in printed.splitlines()]
    assert "products packed 600" in lines and f"labels {out}/labels" in lines
    assert not any(line.startswith("next ") for line in lines)  # the demo runs each next step itself
    query = shlex.split(printed.rstrip().splitlines()[-1].split("query it:")[1])
    assert query[0].endswith("fashionlabel") and query[1:3] == ["query", "--labels"]
    assert run(query[1:]) == 0 and "count_star()" in capsys.readouterr().out
    assert run(["report", "--labels", query[3], "--out", str(tmp_path / "again.html")]) == 0


def test_the_demo_names_the_command_as_it_was_started(monkeypatch):
    """Its last line, `query it: …`, printed `.venv/bin/fashionlabel` however the demo was started: from an
    activated environment or another folder that path is not there."""
    import sys

    from fashionlabel.commands import invoked_as

    for argv0, shown in [
        (".venv/bin/fashionlabel", ".venv/bin/fashionlabel"),  # make demo
        ("/opt/my env/bin/fashionlabel", "'/opt/my env/bin/fashionlabel'"),
        ("/src/fashionlabel/__main__.py", f"{sys.executable} -m fashionlabel"),
        ("/usr/lib/python3/site-packages/pytest/__main__.py", "fashionlabel"),
        ("-c", "fashionlabel"),
    ]:
        monkeypatch.setattr(sys, "argv", [argv0])
        assert invoked_as() == shown, argv0


def test_a_summarys_next_command_runs_as_printed(ray_session, small_catalog, tmp_path, capsys, monkeypatch):
    """`.venv/bin/fashionlabel shard …` (the own-catalog walk-through, from the repository root without an
    activated environment) ended with `next fashionlabel train …`, a command that is not there as typed:
    the next step is named as this one was started, as the demo's last line is."""
    import sys

    from fashionlabel.cli import run

    monkeypatch.setattr(sys, "argv", [".venv/bin/fashionlabel"])
    shards = tmp_path / "shards"
    assert run(["shard", "--catalog", str(small_catalog), "--out", str(shards)]) == 0
    last = " ".join(capsys.readouterr().out.splitlines()[-1].split())
    assert last == (
        f"next .venv/bin/fashionlabel train --shards {shards} --out MODEL, or label them with a model: "
        f".venv/bin/fashionlabel label --shards {shards} --model MODEL --out LABELS"
    ), last


def test_demo_bad_settings_are_refused_before_its_shards_are_written(small_catalog, tmp_path):
    """The demo runs shard, train and label in turn: epochs that training refuses, or a run date that is not
    one, are named before the shard step writes anything (not after minutes of sharding and training), and
    before a cluster is joined (the address here answers nothing)."""
    import os
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{s.getsockname()[1]}"
    out = tmp_path / "demo"
    cases = {
        "invalid training setting(s): --epochs 0": ["--epochs", "0"],
        "run date '2026-02-30' is not a date (YYYY-MM-DD)": ["--run-date", "2026-02-30"],
    }
    for message, extra in cases.items():
        argv = ["demo", "--catalog", str(small_catalog), "--out", str(out), "--address", closed, *extra]
        r = subprocess.run(
            [sys.executable, "-m", "fashionlabel.cli", *argv],
            capture_output=True,
            text=True,
            timeout=120,
            env=os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[1])},
        )
        assert r.returncode == 1 and message in r.stderr, (extra, r.stderr[-1000:])
        assert "Traceback" not in r.stderr and not out.exists(), extra


def test_demo_over_an_earlier_demo_of_other_settings_says_how_to_start_afresh(
    ray_session, small_catalog, tiny_model, tmp_path, capsys, monkeypatch
):
    """`demo --epochs 5` over a demo folder of other settings: its shard step ran, then training refused,
    telling the user to "add --overwrite", an option the demo does not have."""
    from fashionlabel.cli import parse, run
    from fashionlabel.commands import MAKE_DEMO_OUT, _demo_check

    out = tmp_path / "demo"
    shutil.copytree(tiny_model, out / "model")  # fl_tiny, 2 epochs: not the demo's settings
    assert run(["demo", "--catalog", str(small_catalog), "--out", str(out), "--epochs", "5"]) == 1
    err = capsys.readouterr().err
    assert (
        f"{out} holds an earlier demo's model, trained with other settings (model fl_tiny → fl_small" in err
    )
    assert f"remove {out} to start afresh" in err and "--overwrite" not in err
    # `make clean` removes the Makefile's demo-out, not this folder: it is offered for that one only
    assert "make clean" not in err
    assert sorted(p.name for p in out.iterdir()) == ["model"]  # nothing sharded

    make_demo = (tmp_path / "checkout" / "demo-out").resolve()
    shutil.copytree(tiny_model, make_demo / "model")
    monkeypatch.setattr("fashionlabel.commands.MAKE_DEMO_OUT", make_demo)
    monkeypatch.chdir(make_demo.parent)  # `make demo` runs `fashionlabel demo --out demo-out` there
    with pytest.raises(ValueError, match=r"remove demo-out \(`make clean`\) to start afresh"):
        _demo_check(parse(["demo", "--out", "demo-out", "--epochs", "5"]))
    assert MAKE_DEMO_OUT.name == "demo-out" and (MAKE_DEMO_OUT.parent / "Makefile").is_file()


def test_evaluate_out_that_is_a_file_and_prune_blocks_that_are_not_numbers_are_named(tmp_path, capsys):
    """Refused at once, naming the option: not after the whole evaluation with a bare "File exists", nor as
    Python's "invalid literal for int()"."""
    from fashionlabel.cli import parse, run

    report = tmp_path / "report.html"
    report.write_text("<html></html>")
    argv = ["evaluate", "--model", str(tmp_path / "model"), "--shards", str(tmp_path / "shards")]
    assert run([*argv, "--out", str(report)]) == 1
    assert f"--out {report} is a file: give a folder" in capsys.readouterr().err
    assert report.read_text() == "<html></html>"

    prune = ["prune", "--model", "m", "--shards", "s", "--out", "o"]
    assert parse(prune).blocks == [3, 5, 7] and parse([*prune, "--blocks", "1, 2"]).blocks == [1, 2]
    for bad in ("a,b", ","):
        with pytest.raises(SystemExit) as e:
            run([*prune, "--blocks", bad])
        assert e.value.code == 2 and "argument --blocks:" in capsys.readouterr().err


def test_nightly_refuses_a_gpu_the_cluster_lacks_before_its_shards_are_written(
    ray_session, small_catalog, tiny_model, tmp_path, capsys
):
    """As `label` does: --device cuda on a cluster without a GPU is named before the night shards anything
    (not after a whole night's shards are written and left as an incomplete night)."""
    import ray

    from fashionlabel.cli import run

    if ray.cluster_resources().get("GPU", 0) >= 1:
        pytest.skip("this cluster has a GPU")
    root = tmp_path / "root"
    argv = ["nightly", "--catalog", str(small_catalog), "--model", str(tiny_model), "--root", str(root)]
    assert run([*argv, "--date", "2026-03-01", "--device", "cuda"]) == 1
    assert "--device cuda asked for, but the Ray cluster has no GPU" in capsys.readouterr().err
    assert not [p for p in root.rglob("*") if p.is_file()]  # the lease, released, leaves its empty folder


def test_nightly_summary_names_its_labels_and_a_query_that_runs(
    ray_session, small_catalog, tiny_model, tmp_path, capsys
):
    """The summary said where the report went, not the labels, nor how to read them."""
    from fashionlabel.cli import run

    root = tmp_path / "root"
    argv = ["nightly", "--catalog", str(small_catalog), "--model", str(tiny_model), "--root", str(root)]
    assert run([*argv, "--date", "2026-03-01"]) == 0
    lines = [" ".join(line.split()) for line in capsys.readouterr().out.splitlines()]
    assert f"labels {root}/labels" in lines
    assert "catalog products 606" in lines  # as many rows: no id is repeated
    assert "quarantined 6 (image_not_found 6)" in lines  # rows without an image, and where they are listed
    assert (
        f"quarantine {root}/shards/night=2026-03-01/quarantine.parquet (product_id, reason, detail)" in lines
    )
    query = shlex.split(lines[-1].removeprefix("next ").split(" (")[0])
    assert query[:4] == ["fashionlabel", "query", "--labels", f"{root}/labels"], lines[-1]
    assert run(query[1:]) == 0 and "600" in capsys.readouterr().out


def test_label_summary_says_where_the_images_were_decoded(
    ray_session, small_shards, tiny_model, tmp_path, capsys
):
    """`--decode gpu` decodes inside each actor, on its device: on CPU actors the summary said "decode on
    gpu", naming a GPU there was not."""
    from fashionlabel.cli import run

    def plan() -> str:
        out = capsys.readouterr().out.splitlines()
        return next(" ".join(line.split()) for line in out if line.strip().startswith("plan "))

    base = ["label", "--shards", str(small_shards), "--model", str(tiny_model), "--device", "cpu"]
    assert run([*base, "--out", str(tmp_path / "a"), "--decode", "gpu"]) == 0
    text = plan()
    assert "decode in the actors on cpu" in text and "gpu" not in text, text
    assert run([*base, "--out", str(tmp_path / "b"), "--decode", "split", "--cpu-decode-share", "0.25"]) == 0
    assert "decode split (25% decoded at read, the rest in the actors on cpu)" in plan()


def test_a_relative_output_in_a_job_with_a_working_dir_is_refused_by_name(small_catalog, tmp_path):
    """In ``ray job submit --working-dir . -- python -m jobs.shard --out shards`` the current folder is
    Ray's copy of the upload (…/runtime_resources/working_dir_files/_ray_pkg_<hash>): the shards were
    written there and the summary said so, then Ray deleted them, and the next upload's re-run (a
    nightly root given as ``nightly``, tomorrow) started again in another folder. Ray gives the job its
    runtime env in ``RAY_JOB_CONFIG_JSON_ENV_VAR``; here it is set as Ray sets it for such a job."""
    import json
    import os

    job = {"runtime_env": {"working_dir": "gcs://_ray_pkg_0123456789abcdef.zip"}, "metadata": {}}
    env = os.environ | {
        "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
        "RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps(job),
    }
    cat = str(small_catalog)
    cases = {
        "--out shards is a relative path": ["jobs.shard", "--catalog", cat, "--out", "shards"],
        "--storage ck is a relative path": ["jobs.train", "--shards", cat, "--out", "/m", "--storage", "ck"],
        "--root nightly is a relative path": ["jobs.nightly", "--catalog", cat, "--model", "m", "--root", "nightly"],
        "--out r.html is a relative path": ["jobs.report", "--labels", "/l", "--out", "r.html"],
    }  # fmt: skip
    for message, argv in cases.items():
        r = subprocess.run(
            [sys.executable, "-m", *argv], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
        )
        assert r.returncode == 1 and message in r.stderr and "an s3:// URI" in r.stderr, (argv, r.stderr)
    assert sorted(os.listdir(tmp_path)) == []  # nothing written, no Ray started here
    # an absolute folder or an s3:// URI is what such a job writes to; outside a job, relative is fine
    r = subprocess.run(
        [sys.executable, "-m", "jobs.report", "--labels", str(tmp_path / "none"), "--out", "s3://b/r.html"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 1 and "is a relative path" not in r.stderr, r.stderr
    del env["RAY_JOB_CONFIG_JSON_ENV_VAR"]
    r = subprocess.run(
        [sys.executable, "-m", "jobs.report", "--labels", str(tmp_path / "none"), "--out", "r.html"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 1 and "is a relative path" not in r.stderr, r.stderr
