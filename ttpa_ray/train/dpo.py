"""DPO on the TPS pairs: TRL's DPOTrainer, configured from the project config.

Reference model, two ways (``train.dpo.reference``):

- ``precomputed``: the reference log-probs of every pair are computed once, before training, by
  :func:`precompute_reference_logps` (a no-grad pass of the initial policy on one process, with TRL's own
  tokenisation and log-prob sum), or taken from the pairs' ``ref_chosen_logps``/``ref_rejected_logps``
  columns (e.g. written by the vLLM replicas during sampling). The trainer gets those columns with
  ``precompute_ref_log_probs=True`` and holds no reference model: no second DeepSpeed engine, which is
  what failed under ZeRO-3 in the probe, and no second forward per step.
- ``live``: TRL's reference model runs beside the policy (under ZeRO-3 it is sharded like the policy).
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
from transformers import PrinterCallback
from trl import DPOConfig, DPOTrainer

from ttpa_ray.config import DPOStageConfig
from ttpa_ray.train.arguments import RunSettings, common_arguments
from ttpa_ray.train.data import REF_COLUMNS, to_hf_dataset
from ttpa_ray.train.metrics import SampleTracingMixin


class TracedDPOTrainer(SampleTracingMixin, DPOTrainer):
    """TRL's DPOTrainer that records which samples each step trained on and takes reference log-probs
    from the dataset when it already has them."""

    def _precompute_ref_logps(self, dataset: Any, name: str, batch_size: int) -> Any:
        # TRL recomputes (and duplicates) the columns even when present; ours come from a pass made once
        # before training, so no rank needs a DeepSpeed engine for the reference and a resume reuses them.
        if all(column in dataset.column_names for column in REF_COLUMNS):
            return dataset
        return super()._precompute_ref_logps(dataset, name, batch_size)


def dpo_args(
    stage: DPOStageConfig, output_dir: Path, run: RunSettings, *, precomputed_reference: bool
) -> DPOConfig:
    """TRL's DPOConfig for one run."""
    return DPOConfig(
        **common_arguments(stage, output_dir, run),
        beta=stage.beta,
        loss_type=[stage.loss_type],
        precompute_ref_log_probs=precomputed_reference,
    )


def build_dpo_trainer(
    model: Any, tokenizer: Any, train_table: pa.Table, args: DPOConfig, callbacks: Sequence[Any] = ()
) -> TracedDPOTrainer:
    """A DPO trainer over a checked pairs table (with reference columns when ``args`` says precomputed)."""
    if args.precompute_ref_log_probs and not all(c in train_table.column_names for c in REF_COLUMNS):
        raise ValueError(
            "precomputed reference: the pairs table has no ref_chosen_logps/ref_rejected_logps; "
            "run precompute_reference_logps first"
        )
    trainer = TracedDPOTrainer(
        model=model,
        ref_model=None,
        args=args,
        train_dataset=to_hf_dataset(train_table),
        processing_class=tokenizer,
        callbacks=list(callbacks),
    )
    trainer.enable_sample_tracing()
    # ConsoleMetrics prints a compact line per step; HF's printer would repeat the raw dict
    trainer.remove_callback(PrinterCallback)
    return trainer


def precompute_reference_logps(
    model_path: str | Path,
    train_table: pa.Table,
    *,
    max_length: int,
    batch_size: int = 8,
    dtype: str = "float32",
) -> pa.Table:
    """The pairs table with ``ref_chosen_logps``/``ref_rejected_logps`` of the model at ``model_path``.

    Runs TRL's tokenisation, collator and ``compute_ref_log_probs`` on one process, without DeepSpeed, so
    the numbers are exactly the ones DPOTrainer would compute for a live reference model (same prompt
    split, same truncation, sum of completion-token log-probs), in the precision training uses (``dtype``
    auto: bf16 autocast over fp32 weights where the device computes bf16 natively).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ttpa_ray.models import resolve_dtype

    table = train_table.drop_columns([c for c in REF_COLUMNS if c in train_table.column_names])
    tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32)
    args = DPOConfig(
        output_dir=str(Path(tempfile.gettempdir()) / "ttpa-ref-precompute"),
        max_length=max_length,
        use_cpu=not torch.cuda.is_available(),
        report_to="none",
        precompute_ref_log_probs=True,
        precompute_ref_batch_size=batch_size,
        bf16=resolve_dtype(dtype) == "bfloat16",
        disable_tqdm=True,
    )
    # TRL's own precompute on one process without DeepSpeed; the trainer is built for it and never trains.
    # The pass runs inside __init__, outside the Trainer's own autocast: bf16 is asked for here.
    autocast = (
        torch.autocast("cpu", dtype=torch.bfloat16) if args.bf16 and not torch.cuda.is_available() else None
    )
    with autocast or contextlib.nullcontext():
        trainer = DPOTrainer(
            model=model, args=args, train_dataset=to_hf_dataset(table), processing_class=tokenizer
        )
    done: Any = trainer.train_dataset
    if done.num_rows != table.num_rows or done["sample_index"] != table.column("sample_index").to_pylist():
        raise RuntimeError(f"reference pass returned {done.num_rows} rows for {table.num_rows} pairs")
    chosen, rejected = done["ref_chosen_logps"], done["ref_rejected_logps"]
    return table.append_column("ref_chosen_logps", pa.array(chosen, pa.float64())).append_column(
        "ref_rejected_logps", pa.array(rejected, pa.float64())
    )


def reward_accuracy(policy_logps: pa.Table, reference_logps: pa.Table) -> dict[str, float]:
    """Implicit reward accuracy and mean margin from two log-prob tables over the same pairs."""
    wins = 0.0
    margins = []
    for pc, pr, rc, rr in zip(
        policy_logps.column("ref_chosen_logps").to_pylist(),
        policy_logps.column("ref_rejected_logps").to_pylist(),
        reference_logps.column("ref_chosen_logps").to_pylist(),
        reference_logps.column("ref_rejected_logps").to_pylist(),
        strict=True,
    ):
        margin = (pc - rc) - (pr - rr)
        margins.append(margin)
        wins += 1.0 if margin > 0 else 0.5 if margin == 0 else 0.0
    n = max(len(margins), 1)
    return {"accuracy": wins / n, "mean_margin": sum(margins) / n, "pairs": float(len(margins))}
