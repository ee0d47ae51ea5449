"""Session fixtures: one local Ray cluster and one tiny model for the whole test session."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

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
