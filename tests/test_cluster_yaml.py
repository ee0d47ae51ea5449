"""cluster.yaml validates against Ray's own autoscaler schema, offline, and carries no credential."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).parent.parent


def test_cluster_yaml_matches_ray_schema() -> None:
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    jsonschema.validate(config, schema)
    gpu_groups = [n for n, t in config["available_node_types"].items() if t["resources"].get("GPU")]
    assert gpu_groups and all(config["available_node_types"][n]["min_workers"] == 0 for n in gpu_groups)
    assert "GPU" not in config["available_node_types"][config["head_node_type"]]["resources"]
    assert any("setup.sh gpu" in c for c in config["setup_commands"])


def test_dashboard_private_and_no_credentials() -> None:
    text = (ROOT / "cluster.yaml").read_text()
    config = yaml.safe_load(text)
    ports = [p["FromPort"] for p in config["provider"]["security_group"]["IpPermissions"]]
    assert ports == [22]  # no public dashboard (8265) or client (10001) port
    assert "--dashboard-host=127.0.0.1" in " ".join(config["head_start_ray_commands"])
    for path in [ROOT / "cluster.yaml", *sorted((ROOT / "configs").rglob("*.yaml"))]:
        content = path.read_text()
        assert not re.search(r"AKIA[0-9A-Z]{16}", content), path
        assert not re.search(r"(?i)(secret|api)_?key\s*:\s*\S+", content), path
