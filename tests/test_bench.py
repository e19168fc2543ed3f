"""The benchmarks stay runnable: every script's imports and options, and one real labelling run at toy size
that prints our path, the plain loop and their ratio as the README shows."""

from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from procs import stop_processes

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(
    p.name for p in (ROOT / "bench").glob("*.py") if not p.name.startswith("_")
)  # _x.py: shared code


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_bench_script_imports_and_parses(script):
    r = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), "--help"],
        env=os.environ | {"PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0 and "usage:" in r.stdout, r.stderr[-2000:]


def test_shard_bench_without_the_data_set_says_where_to_find_it(tmp_path):
    r = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "shard_throughput.py"), "--products", "10"],
        env=os.environ | {"PYTHONPATH": str(ROOT), "FPI_DATA": str(tmp_path / "nowhere")},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert f"no {tmp_path / 'nowhere' / 'styles.csv'}: set FPI_DATA" in r.stderr and "--styles" in r.stderr


@pytest.mark.slow
def test_label_bench_prints_ours_plain_and_their_ratio():
    tmp = tempfile.mkdtemp(prefix="flbench-", dir="/tmp")  # Ray's socket paths must stay short
    try:
        r = subprocess.run(
            [
                sys.executable,
                str(ROOT / "bench" / "label_throughput.py"),
                *("--synthetic", "--products", "400", "--models", "small", "--repeats", "1"),
                *("--size", "80", "60", "--samples-per-shard", "100"),
            ],
            cwd=tmp,
            env=os.environ | {"PYTHONPATH": str(ROOT), "RAY_TMPDIR": tmp, "TMPDIR": tmp},
            capture_output=True,
            text=True,
            timeout=500,
        )
    finally:
        stop_processes(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
    assert r.returncode == 0, r.stderr[-3000:]
    row = next(ln for ln in r.stdout.splitlines() if ln.startswith("small (fl_small)"))
    ours, plain, ratio = re.search(r"400\s+([\d,]+)\s+([\d,]+)\s+([\d.]+)×", row).groups()
    ours, plain, ratio = (float(x.replace(",", "")) for x in (ours, plain, ratio))
    assert ours > 0 and plain > 0
    # The rates are printed to whole images a second and the ratio, of the unrounded rates, to hundredths:
    # it must lie within what the printed rates allow. (Their quotient is off by up to 0.5/ours + 0.5/plain
    # of itself: 0.05 at 20 img/s, what a loaded 2-core machine labels here, more than any fixed tolerance.)
    low, high = (ours - 0.5) / (plain + 0.5), (ours + 0.5) / (plain - 0.5)
    assert low - 0.005 <= ratio <= high + 0.005, (ours, plain, ratio)
    assert row.rstrip().endswith("100.0%")  # the same labels from both paths
    # each run line says where each path ran and how compiled: a silent fallback would show here
    run_line = next(ln for ln in r.stdout.splitlines() if "[small (fl_small) run 1/1]" in ln)
    assert "actor(s) on cpu, eager," in run_line and "(steady" in run_line and "; cpu, eager)" in run_line


@pytest.mark.slow
def test_label_bench_calls_sharing_a_keep_folder_share_shards_not_outputs():
    """Two calls with one ``--keep`` folder (the GPU suite's label and split phases): the second labels the
    first's shards into folders of its own, instead of finding its labels done and failing."""
    tmp = tempfile.mkdtemp(prefix="flbench-", dir="/tmp")
    keep = Path(tmp) / "keep"
    try:
        runs = [
            subprocess.run(
                [
                    sys.executable,
                    str(ROOT / "bench" / "label_throughput.py"),
                    *("--synthetic", "--products", "200", "--models", "small", "--repeats", "1"),
                    *("--size", "80", "60", "--samples-per-shard", "100", "--keep", str(keep)),
                ],
                cwd=tmp,
                env=os.environ | {"PYTHONPATH": str(ROOT), "RAY_TMPDIR": tmp, "TMPDIR": tmp},
                capture_output=True,
                text=True,
                timeout=500,
            )
            for _ in range(2)
        ]
        shards = sorted(p.name for p in keep.glob("shards-*"))
        calls = sorted(keep.glob("run-*"))
    finally:
        stop_processes(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
    for r in runs:
        assert r.returncode == 0, r.stderr[-3000:]
        row = next(ln for ln in r.stdout.splitlines() if ln.startswith("small (fl_small)"))
        assert re.search(r"\b200\s+[\d,]+\s+[\d,]+", row) and row.rstrip().endswith("100.0%"), row
    assert len(shards) == 1 and len(calls) == 2, (shards, calls)


def _suite_commands() -> list[list[str]]:
    """The `fl SUBCOMMAND --flag ...` and `python bench/X.py --flag ...` calls of bench/gpu_suite.sh, one
    list of words per call (continuation lines joined)."""
    text = (ROOT / "bench" / "gpu_suite.sh").read_text().replace("\\\n", " ")
    calls = re.findall(r"^\s*(?:\w+\)\s*)?(?:fl (\w+)|python (bench/\w+\.py))([^\n|;]*)", text, flags=re.M)
    return [[sub or script, *re.findall(r"--[\w-]+", rest)] for sub, script, rest in calls]


def test_gpu_suite_calls_only_options_that_exist(tmp_path):
    """The suite runs on a machine where a wrong flag costs a lease: every option it passes must parse."""
    from fashionlabel.cli import build_parser

    subparsers = next(a for a in build_parser()._actions if a.choices and "train" in a.choices).choices
    calls = _suite_commands()
    assert {c[0] for c in calls} >= {"shard", "train", "evaluate", "bench/train_baseline.py"}
    for name, *flags in calls:
        if name.startswith("bench/"):
            known = subprocess.run(
                [sys.executable, str(ROOT / name), "--help"],
                env=os.environ | {"PYTHONPATH": str(ROOT)},
                capture_output=True,
                text=True,
                timeout=120,
            ).stdout
        else:
            known = subparsers[name].format_help()
        for f in flags:
            assert re.search(rf"{re.escape(f)}\b", known), f"{name} has no option {f}"


def _suite(tmp_path: Path, *phases: str, **env: str) -> subprocess.CompletedProcess:
    """bench/gpu_suite.sh with an empty data folder, its work and results in ``tmp_path``."""
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    return subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_suite.sh"), str(data), str(tmp_path / "res"), *phases],
        # this interpreter: the python3 on PATH (a bare system one, say) may lack torch and ray
        env=os.environ | {"WORK": str(tmp_path / "work"), "LIMIT": "60", "PYTHON": sys.executable, **env},
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_gpu_suite_logs_each_phase_and_goes_on_after_a_failed_one(tmp_path):
    r = _suite(tmp_path, "nosuch", "nosuch2", GPU="")  # GPU= : the CPU smoke run, which needs no GPU
    assert r.returncode == 0, r.stderr
    for phase in ("nosuch", "nosuch2"):
        log = (tmp_path / "res" / f"{phase}.log").read_text()
        assert f"unknown phase: {phase}" in log and f"== {phase}: exit 2" in log


def test_gpu_suite_stops_before_any_phase_when_torch_sees_no_gpu(tmp_path):
    """A GPU run (the default) where torch sees no GPU runs no phase: each would fail or measure the CPU."""
    r = _suite(tmp_path, "nosuch", CUDA_VISIBLE_DEVICES="")
    assert r.returncode == 3, r.stdout + r.stderr
    assert "preflight: torch sees no GPU" in r.stderr and "stopped before the first phase" in r.stderr
    assert not (tmp_path / "res" / "nosuch.log").exists()


def test_gpu_suite_smoke_run_trains_with_settings_that_train_accepts(tmp_path):
    """`GPU= EPOCHS=1`, the documented check of the script, gives `train` a warm-up it accepts (the recipe's
    2 epochs exceed 1). With no shards prepared, train then stops at the missing shards instead."""
    r = _suite(tmp_path, "accuracy", GPU="", EPOCHS="1")
    log = (tmp_path / "res" / "accuracy.log").read_text()
    assert "invalid training setting" not in log, log
    assert f"--shards {tmp_path / 'work' / 's80'}: no such file or folder" in log, log
    assert r.returncode == 0, r.stderr


def test_gpu_data_parts_unpack_to_the_same_files_in_any_order(tmp_path):
    """bench/gpu_data.sh cuts the data set into parts that one device call each can carry; staging them in
    any order gives back the same three files, checked."""
    data = tmp_path / "data"
    data.mkdir()
    rng = random.Random(0)
    files = {"styles.csv": 50_000, "images-60x80.tar": 120_000, "images-224.tar": 90_000}
    for name, n in files.items():
        (data / name).write_bytes(rng.randbytes(n))
    stage = tmp_path / "stage"
    r = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_data.sh"), str(data)],
        env=os.environ | {"STAGE_DIR": str(stage), "PART_BYTES": "100000"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    parts = sorted(stage.glob("D*"))
    assert len(parts) == 3 and all((p / "stage.sh").is_file() for p in parts)
    assert max(f.stat().st_size for p in parts for f in p.glob("data.part.*")) <= 100_000
    dest, outs = tmp_path / "fldata", []
    for p in reversed(parts):  # as the calls happen to come
        out = subprocess.run(
            ["bash", str(p / "stage.sh")],
            env=os.environ | {"STAGE": str(tmp_path / "parts"), "DEST": str(dest)},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        outs.append(out.stdout)
    assert "staged: 1 of 3" in outs[0] and "staged: 2 of 3" in outs[1] and "data ready in" in outs[2]
    for name in files:
        assert (dest / name).read_bytes() == (data / name).read_bytes()


def test_baseline_refuses_a_missing_model_to_compare_before_training(tmp_path):
    """`--against` names a model that is not there (its training stopped before export): the script says so
    at once instead of after its 30 epochs."""
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "train_baseline.py"),
            *("--styles", str(ROOT / "examples" / "sample" / "catalog.csv"), "--images", str(tmp_path)),
            *("--against", str(tmp_path / "m_a"), "--shards", str(tmp_path / "s80"), "--epochs", "1"),
        ],
        env=os.environ | {"PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2, r.stderr[-2000:]
    assert f"error: --against {tmp_path / 'm_a'}" in r.stderr and "not a folder" in r.stderr
    assert "epoch 0 done" not in r.stderr


def test_models_table_names_the_unit_it_measured(tmp_path):
    """With --cpu-time the figures are images per CPU-second, and the printed table's header says so (the
    table of docs/models.md); without it, wall-clock images per second."""
    headers = {}
    for flag in ("--cpu-time", None):
        r = subprocess.run(
            [
                sys.executable,
                str(ROOT / "bench" / "models_table.py"),
                *("--models", "fl_tiny", "--threads", "1", "--batch", "4", "--out", str(tmp_path / "t.json")),
                *([flag] if flag else []),
            ],
            env=os.environ | {"PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert r.returncode == 0, r.stderr[-2000:]
        headers[flag] = next(ln for ln in r.stdout.splitlines() if ln.startswith("| model |"))
    assert "train img/CPU-s 60×80 | label img/CPU-s 60×80" in headers["--cpu-time"]
    assert "img/CPU-s" not in headers[None] and "train img/s 60×80" in headers[None]


def test_catalog_memory_bench_prints_both_peaks_and_their_ratio():
    r = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "catalog_memory.py"), "--rows", "20000", "--rounds", "1"],
        env=os.environ | {"PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    peaks = {
        m[1]: float(m[2].replace(",", ""))
        for m in re.finditer(r"^(ours|plain)\s*: peak ([\d,.]+) MB", r.stdout, flags=re.M)
    }
    ratio = float(re.search(r"plain / ours, peak memory: ([\d.]+)x", r.stdout)[1])
    assert set(peaks) == {"ours", "plain"} and abs(ratio - peaks["plain"] / peaks["ours"]) < 0.02


def test_query_memory_bench_prints_both_peaks_and_their_ratio():
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "query_memory.py"),
            "--nights",
            "4",
            "--parts",
            "3",
            "--rounds",
            "1",
        ],
        env=os.environ | {"PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "4 nights x 3 parts = 12 files" in r.stdout
    peaks = {
        m[1]: float(m[2].replace(",", ""))
        for m in re.finditer(r"^(ours|plain)\s*: peak \+([\d,.]+) MB", r.stdout, flags=re.M)
    }
    ratio = float(re.search(r"plain / ours, peak memory: ([\d.]+)x", r.stdout)[1])
    assert set(peaks) == {"ours", "plain"}
    # printed to one decimal, of medians printed whole: the ratio is checked against what they allow
    assert (peaks["plain"] - 0.5) / max(peaks["ours"] + 0.5, 1) - 0.05 <= ratio
    assert ratio <= (peaks["plain"] + 0.5) / max(peaks["ours"] - 0.5, 1) + 0.05
