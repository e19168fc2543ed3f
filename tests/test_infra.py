"""infra/: each file parses and names the same image, buckets, columns and commands as the code."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import tomllib
from pathlib import Path

import pyarrow as pa
import pytest
import yaml

from fashionlabel.cli import build_parser
from fashionlabel.label.schema import labels_schema
from fashionlabel.latest import latest_schema, publish
from fashionlabel.layout import Layout
from fashionlabel.taxonomy import Taxonomy

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
NIGHTLY_ROOT = "s3://fashionlabel-nightly/nightly"
DOCKER_INSTRUCTIONS = {
    "FROM",
    "ARG",
    "ENV",
    "RUN",
    "COPY",
    "WORKDIR",
    "USER",
    "CMD",
    "ENTRYPOINT",
    "LABEL",
    "EXPOSE",
    "SHELL",
}


def _docker_lines() -> list[tuple[str, str]]:
    text = (INFRA / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    return [(ln.split(None, 1)[0], ln.split(None, 1)[1]) for ln in lines]


def _k8s() -> list[dict]:
    return list(yaml.safe_load_all((INFRA / "k8s" / "nightly.yaml").read_text()))


def _rayjob() -> dict:
    cm = next(d for d in _k8s() if d["kind"] == "ConfigMap")
    return yaml.safe_load(cm["data"]["rayjob.yaml"])


def test_dockerfile_parses_pins_what_pyproject_pins_and_installs_the_project():
    lines = _docker_lines()
    assert {i for i, _ in lines} <= DOCKER_INSTRUCTIONS
    assert lines[0][0] == "FROM" and re.match(r"nvidia/cuda:[\d.]+-cudnn-runtime-", lines[0][1])
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = dict(re.match(r"([\w\[\],.-]+)==(\S+)", d).groups() for d in deps)
    run = " ".join(a for i, a in lines if i == "RUN")
    got = dict(re.findall(r'"?([\w\[\],.-]+)==([\w.]+)"?', run))
    assert {k.split("[")[0]: v for k, v in pins.items()} == {k.split("[")[0]: v for k, v in got.items()}
    copies = [a for i, a in lines if i == "COPY"]
    assert "fashionlabel/ fashionlabel/" in copies and "jobs/ jobs/" in copies
    assert any(a.endswith("/opt/fashionlabel/model") for a in copies)


def test_k8s_manifest_runs_the_nightly_job_with_real_flags():
    kinds = [d["kind"] for d in _k8s()]
    assert kinds == ["ServiceAccount", "Role", "RoleBinding", "ConfigMap", "CronJob"]
    cron = next(d for d in _k8s() if d["kind"] == "CronJob")
    assert cron["spec"]["concurrencyPolicy"] == "Forbid" and len(cron["spec"]["schedule"].split()) == 5
    job = _rayjob()
    assert job["kind"] == "RayJob" and job["spec"]["shutdownAfterJobFinishes"] is True
    argv = shlex.split(job["spec"]["entrypoint"].replace("NIGHT_DATE", "2026-03-01"))
    assert argv[:3] == ["python", "-m", "jobs.nightly"]
    args = build_parser().parse_args(["nightly", *argv[3:]])  # every flag exists in the CLI
    assert args.root == NIGHTLY_ROOT and args.catalog.startswith("s3://fashionlabel-catalog/catalog/")
    assert args.model == "/opt/fashionlabel/model" and args.date == "2026-03-01"
    spec = job["spec"]["rayClusterSpec"]
    # the operator reaches the job API through the head service: not loopback, but never without a token
    assert spec["rayVersion"] == "2.60.0" and spec["authOptions"] == {"mode": "token"}
    assert spec["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    gpu = spec["workerGroupSpecs"][0]
    assert gpu["minReplicas"] == 0 < gpu["maxReplicas"]
    assert gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    image = yaml.safe_load((ROOT / "cluster.yaml").read_text())["docker"]["image"]
    assert image in (INFRA / "Dockerfile").read_text()
    assert {
        c["image"] for g in [spec["headGroupSpec"], gpu] for c in g["template"]["spec"]["containers"]
    } == {image}


# kubectl for the CronJob's script (no Kubernetes here): records what it is given, answers from the env.
FAKE_KUBECTL = r"""#!/bin/sh
echo "$*" >> "$KLOG"
case "$*" in
  "create -f -") [ -n "${EXISTS:-}" ] && { echo "AlreadyExists" >&2; exit 1; }; cat > "$CREATED" ;;
  *jobDeploymentStatus*) n=$(cat "$POLLS" 2>/dev/null || echo 0); echo $((n + 1)) > "$POLLS"
                         [ "$n" -ge 2 ] && printf Complete || printf Running ;;
  *jobStatus*) printf "%s" "$FINAL" ;;
  "get rayjob "*) ;;
  *) exit 2 ;;
esac
"""


def test_the_cronjob_pod_lasts_as_long_as_its_night_and_fails_with_it(tmp_path):
    import datetime as dt
    import os
    import subprocess

    cron = next(d for d in _k8s() if d["kind"] == "CronJob")
    job = cron["spec"]["jobTemplate"]["spec"]
    assert job["backoffLimit"] == 0 and job["template"]["spec"]["restartPolicy"] == "Never"
    script = job["template"]["spec"]["containers"][0]["args"][0]
    cm = next(d for d in _k8s() if d["kind"] == "ConfigMap")
    (tmp_path / "rayjob.yaml").write_text(cm["data"]["rayjob.yaml"])
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "kubectl").write_text(FAKE_KUBECTL)
    (bin_dir / "kubectl").chmod(0o755)

    def today() -> str:
        return dt.datetime.now(dt.UTC).date().isoformat()

    def night(final: str, exists: bool = False) -> tuple[int, str, set[str]]:
        """Exit code, kubectl calls, and the UTC dates the run spanned (two where it crossed midnight)."""
        for f in ("klog", "created", "polls"):
            (tmp_path / f).unlink(missing_ok=True)
        env = os.environ | {
            "PATH": f"{bin_dir}:{os.environ['PATH']}",
            "TEMPLATE": str(tmp_path / "rayjob.yaml"),
            "POLL_SECONDS": "0",
            "KLOG": str(tmp_path / "klog"),
            "CREATED": str(tmp_path / "created"),
            "POLLS": str(tmp_path / "polls"),
            "FINAL": final,
            "EXISTS": "1" if exists else "",
        }
        before = today()
        r = subprocess.run(["/bin/sh", "-c", script], env=env, capture_output=True, text=True, timeout=60)
        return r.returncode, (tmp_path / "klog").read_text(), {before, today()}

    rc, calls, dates = night("SUCCEEDED")
    created = yaml.safe_load((tmp_path / "created").read_text())
    night_date = created["metadata"]["name"].removeprefix("fashionlabel-nightly-")
    assert rc == 0 and night_date in dates  # the night is named for today's UTC date
    assert f"--date {night_date}" in created["spec"]["entrypoint"]
    assert calls.count("jobDeploymentStatus") == 3  # waited while the night ran
    rc, _, _ = night("FAILED")
    assert rc != 0  # a failed night is a failed Job in the CronJob's history
    rc, calls, dates = night("SUCCEEDED", exists=True)  # started before: waits for that RayJob, creates none
    assert rc == 0 and not (tmp_path / "created").exists()
    assert any(f"get rayjob fashionlabel-nightly-{d}\n" in calls for d in dates)


def test_the_image_has_the_tools_kuberay_probes_its_pods_with():
    """KubeRay (1.1 and newer; the manifest asks for 1.5.1) checks each Ray container's health with
    ``bash -c "wget ... | grep success"`` run inside it: an image without wget never gets a ready pod, and
    the night's RayJob waits until its deadline. The CUDA runtime base image has no wget."""
    spec = _rayjob()["spec"]["rayClusterSpec"]
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    images = {c["image"] for g in groups for c in g["template"]["spec"]["containers"]}
    assert images <= {yaml.safe_load((ROOT / "cluster.yaml").read_text())["docker"]["image"]}
    assert all("readinessProbe" not in c for g in groups for c in g["template"]["spec"]["containers"])
    installs = [
        shlex.split(cmd)
        for i, a in _docker_lines()
        if i == "RUN"
        for cmd in a.split("&&")
        if "apt-get install" in cmd
    ]
    assert any("wget" in argv for argv in installs)
    assert not _docker_lines()[0][1].startswith(("alpine", "busybox"))  # bash for the probe's `bash -c`


def _hive(t: pa.DataType) -> str:
    if pa.types.is_list(t):
        return f"array<{_hive(t.value_type)}>"
    if pa.types.is_struct(t):
        return "struct<" + ",".join(f"{f.name}:{_hive(f.type)}" for f in t) + ">"
    return {"string": "string", "float": "float", "bool": "boolean", "date32[day]": "date"}.get(
        str(t), "timestamp" if pa.types.is_timestamp(t) else str(t)
    )


def _ddl_columns(table: str) -> list[tuple[str, str]]:
    sql = (INFRA / "athena" / "tables.sql").read_text()
    body = re.search(
        rf"CREATE EXTERNAL TABLE IF NOT EXISTS fashionlabel\.{table} \((.*?)\n\)", sql, re.S
    ).group(1)
    return re.findall(r"`(\w+)` ([^\n]+?),?$", body, re.M)


@pytest.mark.parametrize("table", ["history", "latest"])
def test_athena_ddl_columns_match_the_parquet_schemas(table):
    tax = Taxonomy.load("fashion-product-images")
    schema = labels_schema(tax) if table == "history" else latest_schema(tax)
    assert _ddl_columns(table) == [(f.name, _hive(f.type)) for f in schema]


def test_athena_locations_are_where_the_code_writes(tmp_path):
    sql = (INFRA / "athena" / "tables.sql").read_text()
    layout = Layout(NIGHTLY_ROOT)
    assert f"LOCATION '{layout.labels}/history/'" in sql
    assert "PARTITIONED BY (`run_date` string)" in sql and layout.history("2026-03-01").endswith(
        "run_date=2026-03-01"
    )
    # latest's table reads the symlink manifest that publish() writes: check on a real publish
    tax = Taxonomy.load("fashion-product-images")
    publish(str(tmp_path), "2026-03-01", latest_schema(tax).empty_table())
    manifest = tmp_path / "latest" / "_symlink_format_manifest" / "manifest"
    assert manifest.read_text().strip() == f"file://{tmp_path}/latest/snapshots/2026-03-01/part-00000.parquet"
    assert f"LOCATION '{layout.labels}/latest/_symlink_format_manifest/'" in sql


def test_s3_policy_is_least_privilege_and_covers_every_output():
    policy = json.loads((INFRA / "iam" / "s3-policy.json").read_text())
    st = policy["Statement"]
    actions = {a for s in st for a in s["Action"]}
    assert "s3:*" not in actions and "*" not in actions
    resources = [r for s in st for r in s["Resource"]]
    assert {r.split(":::")[1].split("/")[0] for r in resources} == {
        "fashionlabel-catalog",
        "fashionlabel-models",
        "fashionlabel-nightly",
    }
    writes = [r for s in st if {"s3:PutObject", "s3:DeleteObject"} & set(s["Action"]) for r in s["Resource"]]
    assert writes and not any("fashionlabel-catalog" in r or "fashionlabel-models" in r for r in writes)
    put = [r.split(":::")[1] for s in st if "s3:PutObject" in s["Action"] for r in s["Resource"]]
    layout = Layout(NIGHTLY_ROOT)
    outputs = [
        layout.night_shards("2026-03-01") + "/shard-000000.tar",
        layout.history("2026-03-01") + "/p.parquet",
        layout.labels + "/latest/_CURRENT.json",
        layout.report("2026-03-01"),
        layout.manifest("2026-03-01"),
        layout.relabel_work("2026-03-01", "2026-02-01") + "/x",
    ]
    for uri in outputs:
        assert any(fnmatch.fnmatch(uri.removeprefix("s3://"), p) for p in put), uri
    get = [r.split(":::")[1] for s in st if "s3:GetObject" in s["Action"] for r in s["Resource"]]
    assert any(fnmatch.fnmatch("fashionlabel-catalog/images/1623.jpg", p) for p in get)
    assert any(fnmatch.fnmatch("fashionlabel-models/models/fashion/v2/weights.pt", p) for p in get)
    assert not any(fnmatch.fnmatch("fashionlabel-catalog/other/x", p) for p in get)
    # a re-run deletes the tar that a killed attempt published for a shard it now finds with no product
    # (shards/pack.py): rare, so the two recorded nights below never make that request
    stale = "arn:aws:s3:::" + layout.night_shards("2026-03-01").removeprefix("s3://") + "/shard-000003.tar"
    assert _allowed(policy, "s3:DeleteObject", stale, None)


def _allowed(policy: dict, action: str, resource: str, prefix: str | None) -> bool:
    for s in policy["Statement"]:
        if s["Effect"] != "Allow" or action not in s["Action"]:
            continue
        if not any(fnmatch.fnmatchcase(resource, r) for r in s["Resource"]):
            continue
        like = s.get("Condition", {}).get("StringLike", {}).get("s3:prefix")
        if like is None or (prefix is not None and any(fnmatch.fnmatchcase(prefix, p) for p in like)):
            return True
    return False


@pytest.mark.slow
@pytest.mark.timeout(1200)  # two nights, each a job with its own local Ray
def test_s3_policy_allows_every_request_of_two_nights_and_nothing_they_do_not_make(s3, tiny_model):
    """Two nights run as jobs against buckets named as in the policy, through a proxy that records each
    request: every one is allowed by the policy, and every action the policy grants is one they make."""
    from conftest import resave_artifact, sample_rows
    from procs import run_job
    from s3proxy import RecordingProxy, iam_requests

    from fashionlabel import storage

    for b in ("fashionlabel-catalog", "fashionlabel-models", "fashionlabel-nightly"):
        s3.make_bucket(b)
    rows = [r for r in sample_rows() if Path(r["image_uri"]).exists()][1500:1524]
    for r in rows:
        uri = f"s3://fashionlabel-catalog/images/{r['product_id']}.jpg"
        storage.write_bytes(uri, Path(r["image_uri"]).read_bytes())
        r["image_uri"] = uri
    cols = ["product_id", "image_uri", "gender", "masterCategory", "subCategory", "articleType"]

    def catalog(name: str, night: list[dict[str, str]]) -> str:
        lines = [",".join(cols), *(",".join(r[c] for c in cols) for r in night)]
        storage.write_bytes(f"s3://fashionlabel-catalog/catalog/{name}", ("\n".join(lines) + "\n").encode())
        return f"s3://fashionlabel-catalog/catalog/{name}"

    models = [f"s3://fashionlabel-models/models/fashion/v{i}" for i in (1, 2)]
    for i, m in enumerate(models):
        resave_artifact(tiny_model, m, f"release {i + 1}")
    nights = [  # night 2: a product gone, two new, a new model (relabel), the older snapshot pruned
        ("2026-03-01", catalog("c1.csv", rows[:20]), models[0]),
        ("2026-03-02", catalog("c2.csv", rows[1:22]), models[1]),
    ]
    with RecordingProxy(s3.port) as proxy:
        for date, cat, model in nights:
            args = ["--catalog", cat, "--model", model, "--root", NIGHTLY_ROOT, "--date", date]
            args += ["--samples-per-shard", "10", "--actors", "1", "--keep-snapshots", "1"]
            r = run_job("jobs.nightly", args, s3.env() | {"AWS_ENDPOINT_URL": proxy.endpoint}, timeout=500)
            assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
        made = iam_requests(proxy.requests)
    assert storage.exists(Layout(NIGHTLY_ROOT).manifest("2026-03-02"))
    policy = json.loads((INFRA / "iam" / "s3-policy.json").read_text())
    denied = sorted(m for m in made if not _allowed(policy, *m))
    assert not denied, "\n".join(map(str, denied))
    granted = {a for s in policy["Statement"] for a in s["Action"]}
    # an upload aborted (a job killed while it writes a large object) is the one request a sound run
    # does not make
    assert granted - {a for a, _, _ in made} <= {"s3:AbortMultipartUpload"}
