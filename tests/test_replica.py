"""vLLM replicas hosted by a Ray Data actor pool: every prompt row comes back exactly once, completed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ttpa_ray.codec import parse_any
from ttpa_ray.config import load_config
from ttpa_ray.constraints import tool_call_schema
from ttpa_ray.replica import VLLMReplica, generate_dataset

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
    too_long = " ".join(f"word{i}" for i in range(3000))  # over max_model_len 4096: vLLM would refuse it
    long_messages = json.dumps([{"role": "user", "content": too_long}])
    rows.append({**rows[1], "row_id": "long", "messages": long_messages})
    out = generate_dataset(ray.data.from_items(rows), str(tiny_model_dir), config).take_all()
    assert sorted(r["row_id"] for r in out) == sorted(r["row_id"] for r in rows)
    (long,) = [r for r in out if r["row_id"] == "long"]
    assert long["finish_reason"].startswith("prompt_too_long: ") and long["prompt_tokens"] >= 4096
    assert long["completion"] == "" and long["completion_token_ids"] == []
    out.remove(long)
    for row in out:
        assert row["prompt_tokens"] > 50 and len(row["completion_token_ids"]) > 0
        if row["json_schema"]:
            parsed = parse_any(row["completion"])
            assert parsed.ok, row["completion"]
            assert parsed.calls[0].name == "convert_units"
            assert parsed.calls[0].arguments["unit"] in ("km", "mi")
        else:
            assert len(row["completion_token_ids"]) <= 48


class DyingOnceReplica(VLLMReplica):
    """Kills its own process on its second batch, once per marker file: a replica crash mid-run."""

    marker: str = ""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.batches = 0

    def __call__(self, batch):
        import os

        self.batches += 1
        if self.batches == 2 and not os.path.exists(self.marker):
            Path(self.marker).write_text("died")
            os._exit(1)
        return super().__call__(batch)


def _question_rows(n: int, *, max_tokens: int) -> list[dict[str, object]]:
    """``n`` prompt rows without tools, greedy."""
    return [
        {
            "row_id": f"r{i}",
            "messages": json.dumps([{"role": "user", "content": f"question {i}"}]),
            "tools": "[]",
            "json_schema": "",
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "seed": i,
        }
        for i in range(n)
    ]


@pytest.mark.slow
def test_replica_crash_loses_and_duplicates_nothing(
    ray_cluster, tiny_model_dir: Path, tmp_path: Path
) -> None:
    import sys

    import ray

    # Ship this test module's classes to the workers by value (they cannot import tests/).
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    marker = tmp_path / "died"
    DyingOnceReplica.marker = str(marker)
    config = load_config(
        None,
        [
            f"model.policy={tiny_model_dir}",
            "vllm.batch_size=3",
            "vllm.gpu_memory_utilization=0.1",
            "model.dtype=float32",
        ],
    )
    rows = _question_rows(12, max_tokens=4)
    ds = ray.data.from_items(rows, override_num_blocks=4)
    out = generate_dataset(ds, str(tiny_model_dir), config, replica_cls=DyingOnceReplica).take_all()
    assert marker.exists()  # the replica really died once
    ids = [r["row_id"] for r in out]
    assert sorted(ids) == sorted(r["row_id"] for r in rows)  # every row, each exactly once


@pytest.mark.slow
def test_killed_engine_core_mid_stage_loses_and_duplicates_nothing(ray_cluster, tiny_model_dir: Path) -> None:
    """SIGKILL to a replica's engine core while the evaluation's generation runs (issue 17): the replica
    ends, Ray restarts it and retries its batch; every row comes back once, none as an error."""
    import ray
    from conftest import ServingEngineCoreKiller, engine_cores

    config = load_config(
        None,
        [
            f"model.policy={tiny_model_dir}",
            "vllm.batch_size=2",
            "vllm.gpu_memory_utilization=0.1",
            "model.dtype=float32",
        ],
    )
    rows = _question_rows(64, max_tokens=48)
    killer = ServingEngineCoreKiller(engine_cores())
    ds = generate_dataset(ray.data.from_items(rows, override_num_blocks=32), str(tiny_model_dir), config)
    out = []
    for row in ds.iter_rows():
        out.append(row)
        killer.output_seen()
    killer.pid()
    ids = [r["row_id"] for r in out]
    assert sorted(ids) == sorted(r["row_id"] for r in rows)  # every row, each exactly once
    assert not [r for r in out if r["finish_reason"].startswith("error")]
    assert all(r["completion_token_ids"] for r in out)
