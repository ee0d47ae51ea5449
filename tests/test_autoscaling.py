"""Autoscaling shown, not claimed (issue 19): Ray's autoscaler with its fake multi-node provider
(nodes are Ray processes on this machine, with the resources their type declares) launches replica
nodes for a reverse stage whose replicas only fit there, and takes them away when they are idle."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import free_port, ray_head, reverse_seed_ids

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
ENV = {
    **os.environ,
    "RAY_AUTH_MODE": "disabled",
    "RAY_FAKE_CLUSTER": "1",
    "AUTOSCALER_UPDATE_INTERVAL_S": "1",
}


def _fake_cluster_config(gcs_address: str) -> dict[str, object]:
    """A head that cannot host a replica, and a replica node type (min 0, max 2), idle after 6 s."""
    empty: list[object] = []
    return {
        "cluster_name": "ttpa-fake",
        "max_workers": 2,
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "gcs_address": gcs_address,
        },
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0},
            "replica": {
                "resources": {"CPU": 1, "replica_slot": 1},
                "node_config": {},
                "min_workers": 0,
                "max_workers": 2,
            },
        },
        "head_node_type": "ray.head.default",
        "auth": {},
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 0.1,
        "docker": {},
        "file_mounts": {},
        "cluster_synced_files": empty,
        "file_mounts_sync_continuously": False,
        "rsync_exclude": empty,
        "rsync_filter": empty,
        **{key: empty for key in ("initialization_commands", "setup_commands", "head_setup_commands")},
        **{key: empty for key in ("worker_setup_commands", "head_start_ray_commands")},
        "worker_start_ray_commands": empty,
    }


@pytest.fixture
def fake_cluster(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """(GCS address, autoscaler log) of a fake multi-node cluster, stopped (with its nodes) afterwards."""
    import ray

    ip = ray._private.services.get_node_ip_address()
    address = f"{ip}:{free_port()}"
    config = tmp_path / "fake-cluster.json"
    config.write_text(json.dumps(_fake_cluster_config(address)))
    args = [
        f"--port={address.rpartition(':')[2]}",
        f"--node-ip-address={ip}",
        "--num-cpus=1",
        "--include-dashboard=false",
        f"--autoscaling-config={config}",
    ]
    with ray_head(args, ENV, tmp_path / "head.log") as temp:
        yield address, temp / "session_latest" / "logs" / "monitor.log"


def _replica_nodes_alive(address: str) -> int:
    """Alive nodes of the fake cluster that declare the replica resource (asked from a subprocess:
    this test process may already be a driver of the session's own cluster)."""
    probe = (
        f"import ray; ray.init(address={address!r}, log_to_driver=False, logging_level='ERROR');"
        "print('alive:', sum(1 for n in ray.nodes() if n['Alive'] and 'replica_slot' in n['Resources']))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], env=ENV, capture_output=True, text=True, timeout=120, check=True
    )
    return int(next(line for line in out.stdout.splitlines() if line.startswith("alive:")).split()[1])


@pytest.mark.slow
def test_reverse_on_an_autoscaling_cluster_launches_replica_nodes_and_lets_them_go(
    fake_cluster: tuple[str, Path], tiny_model_dir: Path, tmp_path: Path
) -> None:
    address, monitor_log = fake_cluster
    run_dir = tmp_path / "run"
    job = subprocess.run(
        [
            sys.executable,
            "-m",
            "jobs.reverse",
            "--config",
            str(ROOT / "configs" / "local.yaml"),
            f"run.run_dir={run_dir}",
            f"model.policy={tiny_model_dir}",
            "reverse.num_seeds=8",
            "reverse.shard_size=2",
            "reverse.max_tokens=128",
            "vllm.replicas_min=1",
            "vllm.replicas_max=2",
            "vllm.resources={replica_slot: 1}",  # only the replica node type has it
            "vllm.gpu_memory_utilization=0.1",
            f"ray.address={address}",
        ],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]

    ids = reverse_seed_ids(run_dir / "reverse")
    assert len(ids) == len(set(ids)) == 8  # every seed once

    launched = re.findall(r"Adding (\d) node\(s\) of type replica", monitor_log.read_text())
    assert launched and sum(map(int, launched)) <= 2  # the replicas' demand started replica nodes
    deadline = time.time() + 120
    while (alive := _replica_nodes_alive(address)) and time.time() < deadline:
        time.sleep(3)
    assert alive == 0, "the idle replica nodes were not taken away"
    assert re.search(r"Removing \d nodes of type replica \(idle\)", monitor_log.read_text())
