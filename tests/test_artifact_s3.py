"""Model artifacts in an object store (real SeaweedFS): exported to ``s3://``, downloaded once per version
into a node's cache, used by a labelling job started as ``python -m jobs.label``; every load checks the
content hash, so a half-replaced artifact is refused wherever it lives."""

from __future__ import annotations

import json
import shutil

import duckdb
import pytest
import torch
from conftest import resave_artifact
from procs import run_job

from fashionlabel import storage
from fashionlabel.train.export import ArtifactError, load_artifact


def _resave(src, dest, note: str) -> str:
    return resave_artifact(
        src, dest, note, lambda staged: (staged / "metrics.json").write_text('{"test": {"n": 3}}')
    )


def test_artifact_on_s3_is_cached_checked_and_labels_like_the_local_one(
    s3, tiny_model, small_shards, tmp_path, monkeypatch
):
    monkeypatch.setenv("FASHIONLABEL_CACHE", str(tmp_path / "cache"))
    bucket = s3.make_bucket("models")
    uri = f"s3://{bucket}/fashion/v2"
    version = _resave(tiny_model, uri, "v2")
    keys = sorted(o["Key"] for o in s3.client().list_objects_v2(Bucket=bucket)["Contents"])
    assert keys == [f"fashion/v2/{f}" for f in ("metrics.json", "model.json", "version", "weights.pt")]

    model, spec = load_artifact(uri)
    local, _ = load_artifact(tiny_model)
    assert spec["version"] == version and spec["local_path"].startswith(str(tmp_path / "cache"))
    x = torch.randn(3, 3, 80, 60)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(model(x).values(), local(x).values(), strict=True))
    # downloaded once per version: with the weights gone from the bucket, the cached copy still loads
    s3.client().delete_object(Bucket=bucket, Key="fashion/v2/weights.pt")
    assert load_artifact(uri)[1]["local_path"] == spec["local_path"]
    version = _resave(tiny_model, uri, "v2")

    # a labelling job on a fresh process (its own local Ray) takes the model from the bucket
    out = tmp_path / "labels"
    job = run_job(
        "jobs.label",
        ["--shards", str(small_shards), "--model", uri, "--out", str(out), "--run-date", "2026-01-01"],
        {"FASHIONLABEL_CACHE": str(tmp_path / "job-cache")},
    )
    assert job.returncode == 0, job.stderr[-3000:]
    con = duckdb.connect()
    rows = con.execute(
        f"SELECT count(*), count(DISTINCT product_id), min(model_version), max(model_version), "
        f"count(error) FROM '{out}/history/*/*.parquet'"
    ).fetchall()
    assert rows == [(600, 600, version, version, 0)]
    assert (tmp_path / "job-cache" / "models").is_dir()  # the job's workers fetched their own copy


def test_a_half_replaced_artifact_is_refused(s3, tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("FASHIONLABEL_CACHE", str(tmp_path / "cache"))
    bucket = s3.make_bucket("models-tampered")
    uri = f"s3://{bucket}/m"
    _resave(tiny_model, uri, "first")
    # an export in progress: the new model.json has landed, the new weights and version have not
    spec = json.loads(s3.client().get_object(Bucket=bucket, Key="m/model.json")["Body"].read())
    spec["training"]["note"] = "second"
    s3.client().put_object(Bucket=bucket, Key="m/model.json", Body=json.dumps(spec).encode())
    with pytest.raises(ArtifactError, match="do not match its version"):
        load_artifact(uri)
    assert not list((tmp_path / "cache" / "models").iterdir())  # nothing unchecked was cached

    # the same check guards a local folder whose file was replaced by hand
    local = tmp_path / "local"
    shutil.copytree(tiny_model, local)
    (local / "model.json").write_text(json.dumps(spec))
    with pytest.raises(ArtifactError, match="do not match its version"):
        load_artifact(local)
    with pytest.raises(ArtifactError, match="cannot read its version file"):
        load_artifact(f"s3://{bucket}/nothing-here")


def test_a_damaged_cached_copy_of_an_s3_artifact_is_downloaded_again(s3, tiny_model, tmp_path, monkeypatch):
    """The node's cached copy of a sound S3 artifact, cut short or missing a file (a disk that filled, a
    hand edit), was refused on every run (`do not match its version`, `incomplete: missing model.json`)
    with no way on but finding the cache folder; it is downloaded again and the model loads."""
    monkeypatch.setenv("FASHIONLABEL_CACHE", str(tmp_path / "cache"))
    bucket = s3.make_bucket("models-cached")
    uri = f"s3://{bucket}/m"
    version = _resave(tiny_model, uri, "cached")
    _, spec = load_artifact(uri)
    local = tmp_path / "cache" / "models" / spec["local_path"].rsplit("/", 1)[1]
    weights = (local / "weights.pt").read_bytes()
    for damage in (
        lambda: (local / "weights.pt").write_bytes(weights[:5000]),
        lambda: (local / "model.json").unlink(),
    ):
        damage()
        _, again = load_artifact(uri)
        assert again["version"] == version and again["local_path"] == str(local)
        assert (local / "weights.pt").read_bytes() == weights
    assert [p.name for p in (tmp_path / "cache" / "models").iterdir()] == [local.name]  # nothing left aside


def test_train_refuses_an_s3_model_or_checkpoint_prefix_it_cannot_write(
    s3, small_shards, tmp_path, monkeypatch
):
    """A missing bucket for ``--out`` or ``--storage`` is named before any worker starts, not by rank 0's
    first checkpoint write an epoch later (a traceback through Ray Train)."""
    from fashionlabel.train import run as train_run
    from fashionlabel.train.loop import TrainConfig

    def no_fit(*a, **kw):
        raise AssertionError("training started")

    monkeypatch.setattr(train_run, "fit", no_fit)
    cfg = TrainConfig(model="fl_tiny", epochs=1, workers=1)
    with pytest.raises(
        storage.StorageError, match=r"s3://no-such-models/m\.train/checkpoints is not writable"
    ):
        train_run.train(str(small_shards), "s3://no-such-models/m", cfg, 2)
    bucket = s3.make_bucket("models-writable")
    with pytest.raises(
        storage.StorageError, match=r"s3://no-such-checkpoints/c is not writable: .*NO_SUCH_BUCKET"
    ):
        train_run.train(
            str(small_shards), f"s3://{bucket}/m", cfg, 2, checkpoints="s3://no-such-checkpoints/c"
        )
    with pytest.raises(storage.StorageError, match=r"s3://no-such-checkpoints/c is not writable"):
        train_run.train(
            str(small_shards), str(tmp_path / "m"), cfg, 2, checkpoints="s3://no-such-checkpoints/c"
        )
    assert not s3.client().list_objects_v2(Bucket=bucket).get("Contents")  # the probe left nothing


def test_evaluate_writes_to_an_s3_out(s3, tiny_model, small_shards, tmp_path, monkeypatch):
    """``evaluate --out s3://…`` puts the metrics and the confusion PNG on S3, not in a local folder
    named ``s3:`` under the current directory."""
    from fashionlabel.train.run import evaluate

    monkeypatch.chdir(tmp_path)
    bucket = s3.make_bucket("evaluations")
    r = evaluate(str(tiny_model), str(small_shards), "test", write_to=f"s3://{bucket}/ev")
    assert r["out"] == f"s3://{bucket}/ev"
    keys = sorted(o["Key"] for o in s3.client().list_objects_v2(Bucket=bucket)["Contents"])
    assert "ev/evaluation-test.json" in keys and any(k.endswith("-test.png") for k in keys)
    assert json.loads(storage.read_bytes(f"s3://{bucket}/ev/evaluation-test.json"))["n_products"] == r["n"]
    assert not (tmp_path / "s3:").exists()


def test_label_refuses_an_s3_out_it_cannot_write_before_its_actors_start(
    s3, tiny_model, small_shards, monkeypatch
):
    from fashionlabel.label import pipeline

    def no_actors(*a, **kw):
        raise AssertionError("labelling started")

    monkeypatch.setattr(pipeline, "_plan", no_actors)
    with pytest.raises(
        storage.StorageError,
        match=r"s3://no-such-labels/l/history/run_date=2026-03-01 is not writable: .*NO_SUCH_BUCKET",
    ):
        pipeline.label_shards(str(small_shards), str(tiny_model), "s3://no-such-labels/l", "2026-03-01")
