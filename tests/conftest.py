"""Session fixtures: one local Ray cluster and one tiny model for the whole test session."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[object]:
    """A real local Ray cluster (2 CPUs), started once per session."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's seeded tiny Qwen2 model, built once per session."""
    from ttpa_ray.tiny_model import make_tiny_model

    out = tmp_path_factory.mktemp("tiny-model")
    make_tiny_model(out, seed=0)
    return out


@pytest.fixture(scope="session")
def vllm_engine(tiny_model_dir: Path) -> Iterator[object]:
    """One real vLLM CPU engine on the tiny model, shared by the whole session (start-up ~20 s)."""
    from ttpa_ray.config import VLLMConfig
    from ttpa_ray.engine import Engine

    engine = Engine(
        str(tiny_model_dir),
        VLLMConfig(gpu_memory_utilization=0.1, max_model_len=4096, max_num_seqs=32),
        dtype="float32",
        seed=0,
    )
    yield engine
    engine.close()


def executed_dialogues() -> list[Any]:
    """Two dialogues in the reverse stage's shape, every result from a real built-in tool."""
    from ttpa_ray.codec import ToolCall
    from ttpa_ray.records import Dialogue, Message
    from ttpa_ray.tools.registry import ToolRegistry, load_catalogue

    calls_per_dialogue = [
        [
            ToolCall("get_weekday", {"date": "2026-03-14"}),
            ToolCall("add_days", {"date": "2026-03-14", "days": 10}),
        ],
        [ToolCall("get_city_info", {"city": "Paris"}), ToolCall("get_weekday", {"date": "2026-05-01"})],
    ]
    catalogue = load_catalogue("builtin")
    dialogues = []
    with ToolRegistry(catalogue) as registry:
        for n, calls in enumerate(calls_per_dialogue):
            session = registry.session(f"d{n}", None)
            messages = [Message("system", "You can call tools."), Message("user", f"question {n}")]
            for i, call in enumerate(calls):
                result = session.call(call.name, call.arguments)
                assert result.ok, result
                messages.append(Message("assistant", None, tool_calls=(call,), tool_call_ids=(f"call_{i}",)))
                messages.append(
                    Message("tool", result.to_message_content(), tool_call_id=f"call_{i}", name=call.name)
                )
            messages.append(Message("assistant", "done"))
            session.close()
            tools = tuple(catalogue.specs[name] for name in dict.fromkeys(c.name for c in calls))
            dialogues.append(Dialogue(f"dlg-{n}", f"seed-{n}", tuple(messages), tools))
    return dialogues


@pytest.fixture
def heldout_dialogues_file(tmp_path: Path) -> Path:
    """Two held-out dialogues (Parquet, Dialogue records) whose calls really ran: turns dlg-{0,1}/{0,1}."""
    from ttpa_ray.records import Dialogue, write_parquet

    return write_parquet(executed_dialogues(), tmp_path / "heldout.parquet", Dialogue)
