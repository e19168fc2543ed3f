"""The cluster launcher config keeps Ray's control surfaces private: the dashboard / job API binds to
loopback on the head (reached through an SSH tunnel), token authentication is on for every node, no
security-group rule opens anything to the internet, and no credentials are written in the file."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

CLUSTER = Path(__file__).resolve().parents[2] / "cluster.yaml"


def test_cluster_yaml_dashboard_private_and_authenticated():
    text = CLUSTER.read_text()
    cfg = yaml.safe_load(text)
    head = " ".join(cfg["head_start_ray_commands"])
    assert "ray start --head" in head
    assert "--dashboard-host=127.0.0.1" in head  # job API and dashboard: loopback only
    assert "0.0.0.0" not in head  # no Ray server of the head is bound to every interface
    opts = " ".join(cfg.get("docker", {}).get("run_options", []))
    assert "RAY_AUTH_MODE=token" in opts or "RAY_AUTH_MODE=token" in head
    rules = cfg["provider"]["security_group"]["IpPermissions"]
    assert rules  # the group is declared, not left to the provider's default
    for rule in rules:
        for r in rule.get("IpRanges", []):
            assert r["CidrIp"] != "0.0.0.0/0", rule
        for r in rule.get("Ipv6Ranges", []):
            assert r["CidrIpv6"] != "::/0", rule
    # No credentials in the file: S3 access comes from the instance profile.
    assert not re.search(r"AKIA[0-9A-Z]{16}|aws_secret_access_key|AWS_SECRET_ACCESS_KEY", text)
    for node in cfg["available_node_types"].values():
        assert node["node_config"].get("IamInstanceProfile"), node
