import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from jobs import shard as shard_job


@pytest.mark.parametrize("cmd", ["shard", "train", "evaluate", "label", "report", "demo"])
def test_help(cmd):
    r = subprocess.run(
        [sys.executable, "-m", "fashionlabel.cli", cmd, "--help"], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0 and "usage: fashionlabel" in r.stdout


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
    assert shard_job.main(["--catalog", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "t")]) == 1
    assert "catalog not found" in capsys.readouterr().err


def test_train_rejects_bad_settings_by_name(ray_session, tmp_path, capsys):
    from jobs import train

    argv = ["--shards", str(tmp_path), "--out", str(tmp_path / "m"), "--epochs", "0", "--ema-epochs", "-1"]
    assert train.main(argv) == 1
    err = capsys.readouterr().err
    assert "invalid training setting(s): epochs=0, ema_epochs=-1.0" in err
    assert not (tmp_path / "m").exists()


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
