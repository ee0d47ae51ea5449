"""The TrainingArguments that SFT and DPO share: optimisation from the stage config, seeding, DeepSpeed,
device, checkpoints and logging."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ttpa_ray.config import StageConfig


def common_arguments(
    stage: StageConfig,
    output_dir: Path,
    *,
    seed: int,
    deepspeed: dict[str, Any] | None,
    use_cpu: bool,
    save_steps: int,
    logging_steps: int,
    report_to: Sequence[str],
    gradient_checkpointing: bool,
    bf16: bool | None,
) -> dict[str, Any]:
    """Keyword arguments for TRL's SFTConfig and DPOConfig (bf16 None: on GPUs only; DeepSpeed "auto"
    values resolve from these)."""
    return {
        "output_dir": str(output_dir),
        "learning_rate": stage.learning_rate,
        "num_train_epochs": stage.num_epochs,
        "max_steps": stage.max_steps,
        "per_device_train_batch_size": stage.per_device_batch_size,
        "gradient_accumulation_steps": stage.gradient_accumulation_steps,
        "warmup_steps": stage.warmup_steps,
        "weight_decay": stage.weight_decay,
        "max_length": stage.max_length,
        "seed": seed,
        "data_seed": seed,
        "deepspeed": deepspeed,
        "use_cpu": use_cpu,
        "bf16": (not use_cpu) if bf16 is None else bf16,
        "save_strategy": "steps",
        "save_steps": save_steps,
        "logging_steps": logging_steps,
        "report_to": list(report_to) or "none",
        "gradient_checkpointing": gradient_checkpointing,
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
    }
