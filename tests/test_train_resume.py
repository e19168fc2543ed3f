"""A killed training run, restarted with the same command, resumes from its last checkpoint, the weights'
moving average included. The model goes to S3 and its checkpoints beside it (``MODEL.train/checkpoints``)."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from fashionlabel.settings import SettingsError
from fashionlabel.train import checkpoint as ckpt
from fashionlabel.train.export import fetch_artifact
from tests.reliability.faults import kill_session

ROOT = Path(__file__).resolve().parents[1]


def _train_cmd(shards: Path, out: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "fashionlabel.cli",
        "train",
        "--shards",
        str(shards),
        "--out",
        str(out),
        "--model",
        "fl_tiny",
        "--epochs",
        "4",
        "--workers",
        "1",
        "--ema-epochs",
        "0.5",
    ]


def _checkpoint_while_training(storage: str) -> dict | None:
    """The last checkpoint, or None while there is none. Read while the run may be replacing it: the test
    S3 server once answered a GET during that PUT with an incomplete object (no zip directory), which is
    not a checkpoint yet. A resumed run reads it only once the killed one is gone."""
    try:
        return ckpt.load(storage)
    except RuntimeError:
        return None


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_killed_run_resumes_at_the_next_epoch(small_shards, s3, tmp_path, monkeypatch):
    bucket = s3.make_bucket("resume")
    out = f"s3://{bucket}/run/model"
    storage = f"{out}.train/checkpoints"
    ray_tmp = tempfile.mkdtemp(prefix="flr", dir="/tmp")  # Ray's socket paths must stay under 107 bytes
    env = os.environ | s3.env() | {"PYTHONPATH": str(ROOT), "RAY_TMPDIR": ray_tmp}
    env["FASHIONLABEL_CACHE"] = str(tmp_path / "cache")
    cmd = _train_cmd(small_shards, out)
    log = tmp_path / "first.log"
    first = subprocess.Popen(
        cmd, cwd=tmp_path, env=env, start_new_session=True, stdout=log.open("w"), stderr=subprocess.STDOUT
    )
    try:
        deadline = time.time() + 300
        while _checkpoint_while_training(storage) is None:
            assert first.poll() is None, "exited before a checkpoint: " + log.read_text()[-2000:]
            assert time.time() < deadline, "no checkpoint within 5 minutes"
            time.sleep(0.5)
    finally:
        # Every process of the command's session: the driver and the local Ray it started. Killing only
        # the driver's group would leave Ray workers (own process groups) to finish another epoch.
        kill_session(first.pid)
        first.wait()
    killed = ckpt.load(storage)
    killed_at = killed["epoch"]
    assert killed_at < 3, "the run finished before it could be killed"
    assert "Contents" not in s3.client().list_objects_v2(Bucket=bucket, Prefix="run/model/")

    def run_again(name: str) -> None:
        log = tmp_path / f"{name}.log"
        proc = subprocess.Popen(
            cmd, cwd=tmp_path, env=env, start_new_session=True, stdout=log.open("w"), stderr=subprocess.STDOUT
        )
        try:
            rc = proc.wait(timeout=420)
        finally:  # on a timeout too: the driver and the local Ray it started
            kill_session(proc.pid)
            proc.wait()
        assert rc == 0, log.read_text()[-2000:]

    def version() -> str:
        return s3.client().get_object(Bucket=bucket, Key="run/model/version")["Body"].read().decode()

    try:
        run_again("second")
        finished = version()
        # The same command once more: nothing left to train, and the same model is the same version (a
        # new one would make the next night relabel the whole catalog).
        written = s3.client().head_object(Bucket=bucket, Key="run/model/version")["LastModified"]
        run_again("third")
        assert version() == finished
        # nothing exported again (the version object is the second run's), and the summary says so
        assert s3.client().head_object(Bucket=bucket, Key="run/model/version")["LastModified"] == written
        assert "nothing done" in (tmp_path / "third.log").read_text()
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    monkeypatch.setenv("FASHIONLABEL_CACHE", env["FASHIONLABEL_CACHE"])
    local = fetch_artifact(out)  # checked against its version on the way
    spec = json.loads((local / "model.json").read_text())
    assert spec["training"]["starts"] == [0, killed_at + 1]
    curves = json.loads(s3.client().get_object(Bucket=bucket, Key="run/model/curves.json")["Body"].read())
    assert [c["epoch"] for c in curves] == [0, 1, 2, 3]
    final = ckpt.load(storage)
    assert final["epoch"] == 3 and final["optimizer"]["state"] and final["scheduler"]["last_epoch"] > 0
    assert final["config"]["model"] == "fl_tiny" and final["taxonomy_version"] == spec["taxonomy_version"]
    # The average went on from its saved state: one update per step of all 4 epochs, not only of the rerun.
    steps_per_epoch = killed["ema"]["updates"] // (killed_at + 1)
    assert steps_per_epoch > 0 and final["ema"]["updates"] == 4 * steps_per_epoch
    assert all({"val_score_raw", "val_score_ema"} <= c.keys() for c in curves)
    # The artifact holds the weight set that validated better at the best epoch.
    best = ckpt.load(storage, ckpt.BEST)
    assert spec["training"]["weights"] == best["weights"] == curves[best["epoch"]]["weights"]
    chosen = best["ema"]["model"] if best["weights"] == "ema" else best["model"]
    exported = torch.load(local / "weights.pt", weights_only=True)
    assert exported.keys() == chosen.keys() and all(torch.equal(exported[k], chosen[k]) for k in chosen)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_killed_and_resumed_run_trains_the_weights_of_an_uninterrupted_one(small_shards, tmp_path):
    """The seed decides the data order and augmentation of every epoch, whether or not the run was killed
    in between: after a resume the next epochs draw what they would have drawn."""
    ray_tmp = tempfile.mkdtemp(prefix="fld", dir="/tmp")  # Ray's socket paths must stay under 107 bytes
    env = os.environ | {"PYTHONPATH": str(ROOT), "RAY_TMPDIR": ray_tmp}

    def cmd(out: Path) -> list[str]:  # 3 epochs, random crops, flips and CutMix: every kind of draw
        base = _train_cmd(small_shards, str(out))
        base[base.index("--epochs") + 1] = "3"
        return [*base[: base.index("--ema-epochs")], "--cutmix", "0.5"]

    def run(out: Path, kill_after_checkpoint: bool = False) -> None:
        log = tmp_path / f"{out.name}-{int(time.time() * 1000)}.log"
        proc = subprocess.Popen(
            cmd(out),
            cwd=tmp_path,
            env=env,
            start_new_session=True,
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
        )
        try:
            if kill_after_checkpoint:
                deadline = time.time() + 300
                while ckpt.load(str(out) + ".train/checkpoints") is None:
                    assert proc.poll() is None, "exited before a checkpoint: " + log.read_text()[-2000:]
                    assert time.time() < deadline, "no checkpoint within 5 minutes"
                    time.sleep(0.2)
            else:
                assert proc.wait(timeout=420) == 0, log.read_text()[-2000:]
        finally:
            kill_session(proc.pid)
            proc.wait()

    try:
        run(tmp_path / "whole")
        resumed = tmp_path / "resumed"
        run(resumed, kill_after_checkpoint=True)
        killed_at = ckpt.load(str(resumed) + ".train/checkpoints")["epoch"]
        assert killed_at < 2, "the run finished before it could be killed"
        run(resumed)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    spec = json.loads((resumed / "model.json").read_text())
    assert spec["training"]["starts"] == [0, killed_at + 1]
    a = torch.load(tmp_path / "whole" / "weights.pt", weights_only=True)
    b = torch.load(resumed / "weights.pt", weights_only=True)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]


@pytest.mark.timeout(600)
def test_a_run_checkpointed_with_a_warm_up_longer_than_it_resumes_and_exports(
    ray_session, small_shards, tmp_path, caplog
):
    """Checkpoints written before ``--warmup-epochs`` longer than ``--epochs`` was refused hold such a
    config. The same command is refused now, and the warm-up that the refusal asks for was refused as
    "other settings" than the checkpoints': a killed run could neither resume nor be exported. Its
    warm-up is read as one as long as the run, with a warning naming it, and the run exports."""
    from fashionlabel.train.config import TrainConfig
    from fashionlabel.train.run import train

    out = tmp_path / "model"
    cfg = TrainConfig(model="fl_tiny", epochs=1, workers=1, warmup_epochs=1.0)
    first = train(str(small_shards), str(out), cfg, num_cpus=2)
    checkpoints = str(tmp_path / "model.train" / "checkpoints")
    for name in (ckpt.LAST, ckpt.BEST):  # as the version before the check wrote them: --warmup-epochs 4
        state = ckpt.load(checkpoints, name)
        state["config"]["warmup_epochs"] = 4.0
        ckpt.save(checkpoints, name, state)
    shutil.rmtree(out)  # killed before its export
    caplog.set_level("WARNING")
    r = train(str(small_shards), str(out), cfg, num_cpus=2)
    assert r["version"] == first["version"] and r["training"]["epochs_run"] == 1
    assert (
        "written with --warmup-epochs 4 longer than its --epochs 1, read as --warmup-epochs 1" in caplog.text
    )
    assert (out / "model.json").is_file()
    # and the refusal of the command as such a run was started names the warm-up that resumes it
    with pytest.raises(SettingsError, match="resumes with --warmup-epochs equal to its --epochs"):
        TrainConfig(model="fl_tiny", epochs=1, workers=1, warmup_epochs=4.0)
