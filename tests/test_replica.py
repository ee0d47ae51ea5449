"""vLLM replicas hosted by a Ray Data actor pool: every prompt row comes back exactly once, completed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ttpa_ray.codec import parse_any
from ttpa_ray.config import load_config
from ttpa_ray.engine import tool_call_schema
from ttpa_ray.replica import generate_dataset, replica_resources

TOOL = {
    "type": "function",
    "function": {
        "name": "convert_units",
        "description": "Convert a value between units.",
        "parameters": {
            "type": "object",
            "properties": {
                "value": {"type": "integer", "minimum": 0, "maximum": 999},
                "unit": {"type": "string", "enum": ["km", "mi"]},
            },
            "required": ["value", "unit"],
        },
    },
}


def test_replica_resources_on_cpu() -> None:
    assert replica_resources(load_config(None, ["vllm.cpus_per_replica=2"]).vllm) == {"num_cpus": 2.0}


@pytest.mark.slow
def test_generate_dataset_returns_each_row_once(ray_cluster, tiny_model_dir: Path) -> None:
    import ray

    config = load_config(
        None,
        [
            f"model.policy={tiny_model_dir}",
            "vllm.batch_size=4",
            "vllm.gpu_memory_utilization=0.1",
            "model.dtype=float32",
        ],
    )
    schema = json.dumps(tool_call_schema([TOOL]))
    rows = [
        {
            "row_id": f"r{i}",
            "messages": json.dumps([{"role": "user", "content": f"Convert {i} km to miles, please."}]),
            "tools": json.dumps([TOOL]),
            "json_schema": schema if i % 2 == 0 else "",
            "max_tokens": 48,
            "temperature": 0.0,
            "seed": i,
        }
        for i in range(10)
    ]
    out = generate_dataset(ray.data.from_items(rows), str(tiny_model_dir), config).take_all()
    assert sorted(r["row_id"] for r in out) == sorted(r["row_id"] for r in rows)
    for row in out:
        assert row["prompt_tokens"] > 50 and len(row["completion_token_ids"]) > 0
        if row["json_schema"]:
            parsed = parse_any(row["completion"])
            assert parsed.ok, row["completion"]
            assert parsed.calls[0].name == "convert_units"
            assert parsed.calls[0].arguments["unit"] in ("km", "mi")
        else:
            assert len(row["completion_token_ids"]) <= 48
