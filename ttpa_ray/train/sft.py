"""SFT on the reversed dialogues: TRL's SFTTrainer, loss on assistant turns only.

The dialogues go through the policy's own chat template with their tools and are tokenised here, with
an assistant-token mask found by rendering the conversation turn by turn
(:func:`~ttpa_ray.train.data.assistant_token_mask`), so the template needs no ``{% generation %}``
markers; TRL turns the mask into labels.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
from transformers import PrinterCallback
from trl import SFTConfig, SFTTrainer

from ttpa_ray.config import StageConfig
from ttpa_ray.train.arguments import RunSettings, common_arguments
from ttpa_ray.train.data import assistant_token_mask, to_hf_dataset
from ttpa_ray.train.metrics import SampleTracingMixin


class TracedSFTTrainer(SampleTracingMixin, SFTTrainer):
    """TRL's SFTTrainer that records which samples each step trained on."""


def sft_args(stage: StageConfig, output_dir: Path, run: RunSettings) -> SFTConfig:
    """TRL's SFTConfig for one run."""
    return SFTConfig(
        **common_arguments(stage, output_dir, run),
        # the rows arrive tokenised with an assistant mask (assistant_token_mask), which TRL applies
        assistant_only_loss=False,
        # the order of samples is the Trainer's seeded sampler's: resumable and recorded
        shuffle_dataset=False,
    )


def build_sft_trainer(
    model: Any,
    tokenizer: Any,
    train_table: pa.Table,
    args: SFTConfig,
    callbacks: Sequence[Any] = (),
    peft_config: Any = None,
) -> TracedSFTTrainer:
    """An SFT trainer over a checked dialogues table (``messages`` + ``tools`` + ``sample_index``);
    ``peft_config`` (:func:`~ttpa_ray.train.arguments.lora_config`): train LoRA adapters only."""

    def tokenize(row: dict[str, Any]) -> dict[str, Any]:
        input_ids, mask = assistant_token_mask(tokenizer, row["messages"], row["tools"])
        return {"input_ids": input_ids, "assistant_masks": mask}

    dataset = to_hf_dataset(train_table)
    dataset = dataset.map(tokenize, remove_columns=[c for c in dataset.column_names if c != "sample_index"])
    trainer = TracedSFTTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=list(callbacks),
        peft_config=peft_config,
    )
    trainer.enable_sample_tracing()
    # ConsoleMetrics prints a compact line per step; HF's printer would repeat the raw dict
    trainer.remove_callback(PrinterCallback)
    return trainer
