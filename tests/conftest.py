"""Shared fixtures: a real local Ray, a real S3 server, the bundled sample sharded and a tiny trained model.

Ray is started once per session with its temp dir inside pytest's temp folder, the dashboard off, and
always shut down. The repo root is put on PYTHONPATH so Ray workers import this checkout's code.
"""

from __future__ import annotations

import csv
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "examples" / "sample"
os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
sys.path.insert(0, str(Path(__file__).parent))

from s3server import S3Server  # noqa: E402


@pytest.fixture(scope="session")
def ray_session(tmp_path_factory):
    import ray

    tmp = tmp_path_factory.mktemp("ray")
    os.environ["RAY_TMPDIR"] = str(tmp)
    ray.init(
        num_cpus=2, include_dashboard=False, _temp_dir=str(tmp), logging_level="WARNING", log_to_driver=False
    )
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    server = S3Server(tmp_path_factory.mktemp("s3"))
    server.start()
    old = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    try:
        yield server
    finally:
        server.stop()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def write_catalog(path: Path, rows: list[dict[str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def sample_rows(n: int | None = None) -> list[dict[str, str]]:
    """Rows of the bundled sample catalog with absolute image paths (first ``n``)."""
    with open(SAMPLE / "catalog.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["image_uri"] = str(SAMPLE / r["image_uri"])
    return rows[:n] if n else rows


@pytest.fixture(scope="session")
def small_catalog(tmp_path_factory) -> Path:
    """600 sample products (incl. the sample's real bad rows) as a catalog with absolute paths."""
    rows = sample_rows()
    bad = [r for r in rows if not Path(r["image_uri"]).exists()]
    good = [r for r in rows if Path(r["image_uri"]).exists()][:600]
    return write_catalog(tmp_path_factory.mktemp("cat") / "catalog.csv", good + bad)


@pytest.fixture(scope="session")
def small_shards(ray_session, small_catalog, tmp_path_factory) -> Path:
    from fashionlabel.shards import ShardConfig, shard_catalog
    from fashionlabel.taxonomy import Taxonomy

    out = tmp_path_factory.mktemp("shards")
    shard_catalog(
        str(small_catalog),
        str(out),
        Taxonomy.load("fashion-product-images"),
        ShardConfig(samples_per_shard=150),
    )
    return out


@pytest.fixture(scope="session")
def tiny_model(ray_session, small_shards, tmp_path_factory) -> Path:
    """fl_tiny trained for 2 epochs with 2 DDP workers: enough to exercise every stage quickly (CutMix on
    half the batches included)."""
    from fashionlabel.train.loop import TrainConfig
    from fashionlabel.train.run import train

    out = tmp_path_factory.mktemp("model") / "model"
    cfg = TrainConfig(model="fl_tiny", epochs=2, workers=2, cutmix=0.5)
    train(str(small_shards), str(out), cfg, num_cpus=2)
    return out


def resave_artifact(src, dest, note: str, finalize=None) -> str:
    """The artifact at ``src`` saved again to ``dest`` (a folder or s3:// prefix) with a training note:
    the same weights under a new version, as a retrained model would arrive. Returns the version."""
    from fashionlabel.train.export import load_artifact, save_artifact

    model, spec = load_artifact(src)
    return save_artifact(
        dest,
        model,
        architecture=spec["architecture"],
        taxonomy=spec["taxonomy_obj"],
        preprocessing=spec["preprocessing"],
        calibration=spec["calibration"],
        model_kwargs=spec.get("model_kwargs"),
        training=spec["training"] | {"note": note},
        finalize=finalize,
    )
