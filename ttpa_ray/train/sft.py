"""SFT on the reversed dialogues: TRL's SFTTrainer, loss on assistant turns only.

The dialogues go through the policy's chat template with their tools; tool calls are rendered by the
template, and ``assistant_only_loss`` masks everything outside its ``{% generation %}`` blocks (the
tiny model's template has them; a real model's template must too, else TRL refuses to start).
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
from ttpa_ray.train.data import to_hf_dataset
from ttpa_ray.train.metrics import SampleTracingMixin


class TracedSFTTrainer(SampleTracingMixin, SFTTrainer):
    """TRL's SFTTrainer that records which samples each step trained on."""


def sft_args(stage: StageConfig, output_dir: Path, run: RunSettings) -> SFTConfig:
    """TRL's SFTConfig for one run."""
    return SFTConfig(
        **common_arguments(stage, output_dir, run),
        assistant_only_loss=True,
        # the order of samples is the Trainer's seeded sampler's: resumable and recorded
        shuffle_dataset=False,
    )


def build_sft_trainer(
    model: Any, tokenizer: Any, train_table: pa.Table, args: SFTConfig, callbacks: Sequence[Any] = ()
) -> TracedSFTTrainer:
    """An SFT trainer over a checked dialogues table (``messages`` + ``tools`` + ``sample_index``)."""
    trainer = TracedSFTTrainer(
        model=model,
        args=args,
        train_dataset=to_hf_dataset(train_table),
        processing_class=tokenizer,
        callbacks=list(callbacks),
    )
    trainer.enable_sample_tracing()
    # ConsoleMetrics prints a compact line per step; HF's printer would repeat the raw dict
    trainer.remove_callback(PrinterCallback)
    return trainer
