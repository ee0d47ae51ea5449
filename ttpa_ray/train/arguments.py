"""The TrainingArguments that SFT and DPO share: optimisation from the stage config, seeding, DeepSpeed,
device, checkpoints and logging."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ttpa_ray.config import LoraSettings, StageConfig


@dataclass(frozen=True)
class RunSettings:
    """What a training run sets beside its stage config; the same for SFT and DPO."""

    seed: int
    deepspeed: dict[str, Any] | None
    use_cpu: bool
    save_steps: int
    logging_steps: int = 1
    report_to: Sequence[str] = ()
    gradient_checkpointing: bool = False
    bf16: bool | None = None  # None: on GPUs only


def common_arguments(stage: StageConfig, output_dir: Path, run: RunSettings) -> dict[str, Any]:
    """Keyword arguments for TRL's SFTConfig and DPOConfig (DeepSpeed "auto" values resolve from these)."""
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
        "seed": run.seed,
        "data_seed": run.seed,
        "deepspeed": run.deepspeed,
        "use_cpu": run.use_cpu,
        "bf16": (not run.use_cpu) if run.bf16 is None else run.bf16,
        "save_strategy": "steps",
        "save_steps": run.save_steps,
        "logging_steps": run.logging_steps,
        "report_to": list(run.report_to) or "none",
        "gradient_checkpointing": run.gradient_checkpointing,
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
    }


def lora_config(settings: dict[str, Any] | LoraSettings | None) -> Any:
    """PEFT's LoraConfig for ``train.lora`` (None: full fine-tuning)."""
    if settings is None:
        return None
    from peft import LoraConfig

    lora = settings if isinstance(settings, LoraSettings) else LoraSettings(**settings)
    return LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
    )
