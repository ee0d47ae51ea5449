"""`ttpa run --dry-run`: what each stage asks Ray for comes from the config alone, and is checked
against the node types of cluster.yaml (issue 19)."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from ttpa_ray.cli import app
from ttpa_ray.config import load_config
from ttpa_ray.plan import check_against_cluster, node_types, plan_run
from ttpa_ray.replica import replica_resources

ROOT = Path(__file__).resolve().parent.parent
GPU = ROOT / "configs" / "qwen2.5-7b-gpu.yaml"
CLUSTER = ROOT / "cluster.yaml"
runner = CliRunner()


def test_gpus_come_from_the_config_not_the_machine() -> None:
    assert replica_resources(load_config(None, ["vllm.cpus_per_replica=2"]).vllm) == {"num_cpus": 2.0}
    gpu = load_config(None, ["vllm.use_gpu=true", "vllm.tensor_parallel_size=2"]).vllm
    assert replica_resources(gpu) == {"num_cpus": 1.0, "num_gpus": 2}
    typed = load_config(None, ["vllm.use_gpu=true", "vllm.gpus_per_replica=0.5", "vllm.accelerator_type=L4"])
    assert replica_resources(typed.vllm) == {"num_cpus": 1.0, "num_gpus": 0.5, "accelerator_type": "L4"}


def test_the_gpu_config_fits_cluster_yaml_and_asks_for_its_gpus() -> None:
    plans = {p.stage: p for p in plan_run(load_config(GPU))}
    (replicas,) = plans["reverse"].asks
    assert replicas.count == (4, 16)
    assert replicas.resources == {"CPU": 4.0, "GPU": 1.0, "accelerator_type:L40S": 0.001}
    reference, workers = plans["dpo"].asks  # the replicas score the reference log-probs first
    assert reference == replicas
    assert workers.count == (16, 16) and workers.resources["GPU"] == 1.0
    assert check_against_cluster(list(plans.values()), node_types(CLUSTER)) == ([], [])

    result = runner.invoke(app, ["run", "--dry-run", "-c", str(GPU), "--cluster", str(CLUSTER)])
    assert result.exit_code == 0, result.output
    assert "[2/8] reverse: 4..16 x vLLM replica (CPU 4, GPU 1, on L40S)" in result.output
    assert (
        "x vLLM replica (CPU 4, GPU 1, on L40S); 16 x training worker (CPU 8, GPU 1, on A100)"
        in result.output
    )
    assert "reads s3://ttpa-runs/qwen2.5-7b/pairs" in result.output
    assert "every request fits a node type of" in result.output


def test_a_request_no_node_type_can_host_names_the_stage_and_the_resource() -> None:
    args = ["run", "--dry-run", "-c", str(GPU), "--cluster", str(CLUSTER), "vllm.tensor_parallel_size=8"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    line = next(x for x in result.output.splitlines() if x.startswith("reverse:"))
    assert line.startswith("reverse: no node type can host a vLLM replica (")
    assert "vllm_replica: GPU 4 < 8" in line and "train: accelerator_type:L40S 0 < 0.001" in line
    too_many = runner.invoke(app, ["eval", "--dry-run", "-c", str(GPU), "--cluster", str(CLUSTER)])
    assert too_many.exit_code == 0 and "[1/1] evaluate:" in too_many.output
    workers = runner.invoke(app, [*args[:-1], "train.num_workers=24"])
    assert workers.exit_code == 2
    assert "dpo: needs at least 24 x training worker but the train nodes hold at most 16" in workers.output


def test_the_local_config_asks_for_cpus_only(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = ["run", "--dry-run", "-c", str(ROOT / "configs" / "local.yaml"), f"run.run_dir={run_dir}"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "GPU" not in result.output
    assert "[2/8] reverse: 1 x vLLM replica (CPU 1)" in result.output
    assert "[3/8] sft: 2 x training worker (CPU 1)" in result.output
    assert not run_dir.exists()  # a dry run starts nothing and writes nothing


def test_a_simulated_catalogue_names_its_response_cache(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    builtin = {s.stage: s for s in plan_run(load_config(None, [f"run.run_dir={run_dir}"]))}
    simulated = load_config(
        None, [f"run.run_dir={run_dir}", "reverse.catalogue=bfcl-simulated:GorillaFileSystem"]
    )
    reverse = {s.stage: s for s in plan_run(simulated)}["reverse"]
    assert str(run_dir / "reverse" / "simulated") in reverse.writes
    assert str(run_dir / "reverse" / "simulated") not in builtin["reverse"].writes
