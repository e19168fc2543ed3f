"""cluster.yaml against the schema shipped inside the installed ``ray`` package, plus the choices it must keep."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_cluster_yaml_matches_rays_schema(cluster):
    jsonschema.validate(cluster, json.loads(SCHEMA.read_text()))
    # Ray's own check (the one `ray up` runs) after filling in the provider defaults
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(cluster)))


def test_the_schema_rejects_a_broken_file(cluster):
    broken = copy.deepcopy(cluster)
    broken["available_node_types"]["gpu_worker"]["min_workers"] = "zero"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, json.loads(SCHEMA.read_text()))


def test_cluster_choices(cluster):
    assert cluster["provider"]["type"] == "aws"
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    assert not head["node_config"]["InstanceType"].startswith(("g", "p"))  # a CPU head
    gpu = types["gpu_worker"]
    assert gpu["node_config"]["InstanceType"].startswith(("g", "p"))
    assert 0 <= gpu["min_workers"] < gpu["max_workers"] <= cluster["max_workers"]
    for t in types.values():  # S3 through the instance profile, never keys
        assert t["node_config"]["IamInstanceProfile"]["Name"] == "fashionlabel-nightly"
    start = " ".join(cluster["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start and "0.0.0.0" not in start
    perms = cluster["provider"]["security_group"]["IpPermissions"]
    assert perms  # SSH only, declared explicitly
    for perm in perms:
        assert perm["FromPort"] == perm["ToPort"] == 22
        assert all(r["CidrIp"] != "0.0.0.0/0" for r in perm["IpRanges"])
    # the project comes from the image that infra/Dockerfile builds, nothing is pip-installed at boot
    assert cluster["setup_commands"] == [] and cluster["docker"]["image"].startswith("ghcr.io/fashionlabel/")
    assert "RAY_AUTH_MODE=token" in " ".join(cluster["docker"]["run_options"])
