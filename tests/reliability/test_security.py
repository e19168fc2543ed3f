"""Security: ids and paths never lead a job outside its roots, decompression bombs are refused from the
header, model files are loaded without unpickling objects, and a local Ray listens on loopback only.

Path policy (docs/reliability.md): images are *read* where the catalog says (a path, a symlink, a URL — the
catalog is the job's input declaration), but everything a job *writes* is named by the job: tar members are
``<key>.jpg`` / ``<key>.json`` with keys made of ASCII letters, digits, ``_`` and ``-`` (``product_key``), output
files are ``shard-NNNNNN.tar`` / ``part-<shard>.parquet``. No catalog value ever becomes part of an output path.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import faults
import pyarrow.parquet as pq
import pytest
import torch
from corpus import bomb_png
from faults import Cli, is_loopback, listening, session_pids

from fashionlabel.catalog import product_key
from fashionlabel.images import ImageReject, normalise
from fashionlabel.label.pipeline import label_shards
from fashionlabel.shards import ShardConfig, shard_catalog
from fashionlabel.taxonomy import Taxonomy
from fashionlabel.train import checkpoint
from fashionlabel.train.export import ArtifactError, load_artifact
from tests.conftest import SAMPLE, sample_rows, write_catalog

SAFE_MEMBER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*\.(jpg|json)$")
SAFE_OUTPUT = re.compile(
    r"^(shard-\d{6}\.tar|shard-\d{6}(\.quarantine)?\.parquet|index\.parquet|"
    r"quarantine\.parquet|stats\.json|part-shard-\d{6}\.parquet|_SUCCESS|\.write-probe|_plan\.(json|parquet))$"
)


def _tree(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def test_hostile_ids_and_paths_never_escape_the_output_root(ray_session, tiny_model, tmp_path, ledger):
    sandbox = tmp_path / "sandbox"
    inside = sandbox / "catalog"
    outside = tmp_path / "elsewhere"
    outside.mkdir(parents=True)
    (outside / "secret.jpg").write_bytes((SAMPLE / "images" / "10020.jpg").read_bytes())
    (inside / "imgs").mkdir(parents=True)
    os.symlink(outside / "secret.jpg", inside / "imgs" / "link.jpg")  # a symlink out of the catalog root
    rows = sample_rows(20)
    t = rows[0]
    hostile = [
        "../../escape",
        "/tmp/abs",
        "..",
        ".",
        "a/../../b",
        "x\\..\\y",
        "shard-000000",
        "_SUCCESS",
        "-rf",
        "CON",
        "a%2F..%2Fb",
    ]
    rows += [{**t, "product_id": pid, "image_uri": t["image_uri"]} for pid in hostile]
    rows += [
        {**t, "product_id": "via-symlink", "image_uri": "imgs/link.jpg"},
        {**t, "product_id": "up-and-out", "image_uri": "../../elsewhere/secret.jpg"},
    ]
    cat = write_catalog(inside / "catalog.csv", rows)
    before = _tree(tmp_path)
    shards, labels = sandbox / "shards", sandbox / "labels"
    shard_catalog(
        str(cat), str(shards), Taxonomy.load("fashion-product-images"), ShardConfig(samples_per_shard=8)
    )
    label_shards(str(shards), str(tiny_model), str(labels), "2026-04-01")

    new = _tree(tmp_path) - before
    escaped = [p for p in new if not (p.is_relative_to(shards) or p.is_relative_to(labels))]
    assert not escaped, escaped
    names = {p.name for p in new}
    assert all(SAFE_OUTPUT.match(n) or n.startswith("run_date=") for n in names), names
    members = []
    for t_ in shards.glob("*.tar"):
        with tarfile.open(t_) as tar:
            members += [m.name for m in tar]
    assert members and all(SAFE_MEMBER.match(m) for m in members), [
        m for m in members if not SAFE_MEMBER.match(m)
    ]
    # Every hostile id is a product like any other: packed under a key derived from it, never under the id
    # itself, and labelled with the id exactly as the catalog spelled it.
    for pid in ("../../escape", "/tmp/abs", "..", ".", "a/../../b", "x\\..\\y", "a%2F..%2Fb"):
        assert f"{pid}.jpg" not in members and f"{product_key(pid)}.jpg" in members
    labelled = pq.read_table(labels / "history" / "run_date=2026-04-01").column("product_id").to_pylist()
    assert set(hostile) <= set(labelled) and len(labelled) == len(set(labelled))
    # Policy: reading follows the catalog (symlinks, relative paths that leave its folder).
    assert "via-symlink.jpg" in members and "up-and-out.jpg" in members
    ledger.bad_input(
        "hostile ids / paths (.., absolute, symlink out of root): outputs stay in their roots",
        "no file outside the output roots; tar members safe",
    )


def test_hostile_shard_members_are_never_extracted(ray_session, tiny_model, tmp_path):
    """A tampered shard with member names that climb out (``../``, absolute): labelling reads members from
    the archive in memory and never writes them anywhere, so nothing appears outside the labels root."""
    shards = tmp_path / "shards"
    shards.mkdir()
    jpg = (SAMPLE / "images" / "10020.jpg").read_bytes()
    with tarfile.open(shards / "shard-000000.tar", "w") as tar:
        for name, data in [
            ("../../evil.jpg", jpg),
            ("../../evil.json", b'{"product_id": "evil"}'),
            (str(tmp_path / "abs.jpg"), jpg),
            (str(tmp_path / "abs.json"), b'{"product_id": "abs"}'),
        ]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    before = _tree(tmp_path)
    labels = tmp_path / "out" / "labels"
    label_shards(str(shards), str(tiny_model), str(labels), "2026-04-02")
    new = _tree(tmp_path) - before
    assert new and all(p.is_relative_to(labels) for p in new), new
    assert not (tmp_path / "abs.jpg").exists() and not (tmp_path.parent / "evil.jpg").exists()


def test_a_bomb_inside_a_shard_gets_an_error_row_and_is_never_decoded(ray_session, tiny_model, tmp_path):
    """A tampered shard member that declares 3.6 gigapixels: the labelling read decodes nothing of it (the
    header is checked first) and the product gets an error row, the others their labels."""
    shards = tmp_path / "shards"
    shards.mkdir()
    jpg = (SAMPLE / "images" / "10020.jpg").read_bytes()
    members = [("ok1", jpg), ("bomb", bomb_png(60_000)), ("ok2", jpg)]
    with tarfile.open(shards / "shard-000000.tar", "w") as tar:
        for key, data in members:
            for name, payload in (
                (f"{key}.jpg", data),
                (f"{key}.json", f'{{"product_id": "{key}"}}'.encode()),
            ):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    labels = tmp_path / "labels"
    s = label_shards(str(shards), str(tiny_model), str(labels), "2026-04-03")
    rows = {r["product_id"]: r for r in pq.read_table(labels / "history").to_pylist()}
    assert (s["labelled"], s["errored"]) == (2, 1)
    assert "60000x60000 pixels" in rows["bomb"]["error"] and rows["bomb"]["articleType"] is None
    assert rows["ok1"]["error"] is None and rows["ok2"]["articleType"] is not None


def test_decompression_bomb_refused_from_header(ledger):
    data = bomb_png(60_000)  # 3.6 gigapixels declared, 87 bytes on disk
    with pytest.raises(ImageReject) as e:
        normalise(data, max_side=256, quality=90, max_pixels=40_000_000, min_side=8)
    assert e.value.reason == "image_too_large" and "60000x60000" in e.value.detail
    assert len(data) < 200
    # No pixel is ever decoded: measured in a fresh process, whose peak RSS is its own (this one's peak
    # is already that of every earlier test). Decoding would take 10 GiB.
    probe = (
        "import resource, sys\n"
        "from fashionlabel.images import ImageReject, normalise\n"
        "data = sys.stdin.buffer.read()\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "try:\n"
        "    normalise(data, max_side=256, quality=90, max_pixels=40_000_000, min_side=8)\n"
        "except ImageReject:\n"
        "    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n"
    )
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-c", probe],
        input=data,
        capture_output=True,
        env=os.environ | {"PYTHONPATH": str(root)},
        timeout=60,
        check=True,
    )
    assert int(out.stdout) < 50 * 1024, out  # KiB


class _Pwn:
    """Unpickling this runs a command: what a tampered model file would carry."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_model_files_are_loaded_without_unpickling_objects(tiny_model, tmp_path, ledger):
    marker = tmp_path / "pwned"
    bad = tmp_path / "model"
    bad.mkdir()
    (bad / "model.json").write_bytes((tiny_model / "model.json").read_bytes())
    torch.save({"weights": _Pwn(marker)}, bad / "weights.pt")
    (bad / "version").write_bytes((tiny_model / "version").read_bytes())
    with pytest.raises(ArtifactError, match="do not match its version"):  # refused before it is opened
        load_artifact(bad)
    # and with a version that matches it, as a forger would write: opened, never unpickled as objects
    from fashionlabel.train.export import content_version

    (bad / "version").write_text(
        content_version((bad / "weights.pt").read_bytes(), (bad / "model.json").read_bytes())
    )
    with pytest.raises(ArtifactError, match="cannot be loaded safely"):
        load_artifact(bad)
    ckpt_dir = tmp_path / "ckpt"
    ckpt_dir.mkdir()
    torch.save({"model": _Pwn(marker)}, ckpt_dir / checkpoint.LAST)
    with pytest.raises(Exception, match="(?i)weights.only|unpickl"):
        checkpoint.load(str(ckpt_dir))
    assert not marker.exists()
    # The genuine artifact still loads.
    model, spec = load_artifact(tiny_model)
    assert spec["version"] == (tiny_model / "version").read_text().strip()
    ledger.bad_input(
        "model file carrying a pickled command (weights.pt, last.pt)", "refused; command never ran"
    )


PROBE = """
import sys, time
from fashionlabel.runtime import ray_session
with ray_session():
    print("READY", flush=True)
    time.sleep(float(sys.argv[1]))
"""


def test_local_ray_listens_on_loopback_only(tmp_path):
    """The local Ray a command starts: no dashboard / job API, and every listening socket on loopback."""
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    c = Cli([], tmp_path, name="loopback", argv=[sys.executable, str(script), "60"])
    try:
        assert c.wait_for(lambda: "READY" in c.output, 120, poll=0.2), c.output[-3000:]
        # Ray's agents bind after READY: sample until the set of listening sockets has been stable for 3 s
        socks, stable_since, deadline = set(), time.time(), time.time() + 30
        while time.time() < deadline and time.time() - stable_since < 3:
            now = set(listening(session_pids(c.sid)))
            if now != socks:
                socks, stable_since = now, time.time()
            time.sleep(0.25)
        exposed = [(faults.cmdline(pid)[:60], a) for pid, a in socks if not is_loopback(a)]
    finally:
        c.kill()
    assert socks, "found no listening socket: the probe is broken"
    assert not exposed, exposed
    assert not any(a.endswith(":8265") for _, a in socks)  # dashboard / job API default port
