"""`ray job submit` for real: a local head started with `ray start --head`, the pipeline job submitted
with the Ray job CLI, its outputs checked, the head stopped."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from conftest import free_port, ray_head

ROOT = Path(__file__).parent.parent
BIN = ROOT / ".venv" / "bin"


@pytest.mark.slow
def test_pipeline_through_ray_job_submit(tiny_model_dir: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    dashboard = free_port()
    head_args = [
        f"--port={free_port()}",
        f"--dashboard-port={dashboard}",
        "--include-dashboard=true",
        "--num-cpus=2",
        f"--ray-client-server-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
    ]
    address = f"http://127.0.0.1:{dashboard}"
    run_dir = tmp_path / "run"
    with ray_head(head_args, env, tmp_path / "head.log"):
        submit = [
            str(BIN / "ray"),
            "job",
            "submit",
            "--address",
            address,
            "--working-dir",
            str(ROOT),
            "--runtime-env-json",
            json.dumps({"excludes": [".venv", "runs", "models", ".git", ".pytest_cache"]}),
            "--",
            "python",
            "-m",
            "jobs.pipeline",
            "--config",
            "configs/local.yaml",
            "ray.address=auto",
            f"run.run_dir={run_dir}",
            f"model.policy={tiny_model_dir}",
            "vllm.gpu_memory_utilization=0.1",  # a smaller KV cache: each engine starts ~4 s sooner
            "reverse.num_seeds=4",
            "reverse.shard_size=4",
            "reverse.max_tokens=256",
            "tps.bfcl_limit=4",
            "eval.categories=[simple_python]",
            "eval.limit_per_category=2",
            "eval.max_tokens=64",
            "eval.sequence_baseline=false",  # its DPO runs in test_pipeline
            "train.dpo.max_steps=2",
            "train.save_steps=2",
        ]
        deadline = time.time() + 120
        not_up_yet = ("No available agent", "Connection refused")
        while True:  # the dashboard and its job agent come up some seconds after the head
            result = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=900, check=False)
            output = result.stdout + result.stderr
            if not any(text in output for text in not_up_yet) or time.time() > deadline:
                break
            time.sleep(3)
        head_output = (tmp_path / "head.log").read_text()[-2000:]
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:] + head_output
        assert "succeeded" in result.stdout + result.stderr

    summary = json.loads((run_dir / "pipeline.json").read_text())
    for stage in summary["stages_run"]:
        assert stage["records_in"] == stage["records_out"] + stage["records_rejected"], stage
    by_name = {s["name"]: s for s in summary["stages_run"]}
    assert by_name["reverse"]["records_in"] == 4
    assert by_name["tps"]["records_in"] == 4  # the 4 BFCL turns (the random teacher's dialogues are rejected)
    report = json.loads((run_dir / "eval" / "report.json").read_text())
    assert report["base"]["all"]["n"] == 2
