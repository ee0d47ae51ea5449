"""DPO on the TPS pairs: TRL's DPOTrainer, configured from the project config.

Reference model, two ways (``train.dpo.reference``):

- ``precomputed``: the reference log-probs of every pair are computed once, before training, by
  :func:`precompute_reference_logps` (a no-grad pass of the initial policy on one process, with TRL's own
  tokenisation and log-prob sum), or taken from the pairs' ``ref_chosen_logps``/``ref_rejected_logps``
  columns (e.g. written by the vLLM replicas during sampling). The trainer gets those columns with
  ``precompute_ref_log_probs=True`` and holds no reference model: no second DeepSpeed engine, which is
  what failed under ZeRO-3 in the probe, and no second forward per step.
- ``live``: TRL's reference model runs beside the policy (under ZeRO-3 it is sharded like the policy).

With ``train.dpo.shared_prefix`` (the default) the policy's and the live reference's forward compute each
pair's shared part (prompt and common completion prefix) once instead of once per completion
(:mod:`ttpa_ray.train.shared_prefix`); loss and gradients are TRL's standard forward's.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
from transformers import PrinterCallback
from trl import DPOConfig, DPOTrainer

from ttpa_ray.config import DPOStageConfig
from ttpa_ray.train.arguments import RunSettings, common_arguments
from ttpa_ray.train.data import REF_COLUMNS, to_hf_dataset
from ttpa_ray.train.metrics import SampleTracingMixin
from ttpa_ray.train.shared_prefix import PackCache, SharedPrefixForward


@dataclass
class TracedDPOConfig(DPOConfig):
    """TRL's DPOConfig and the settings TracedDPOTrainer adds to it."""

    shared_prefix: bool = field(
        default=False,
        metadata={"help": "Compute each pair's shared prompt and completion prefix once per forward."},
    )


class TracedDPOTrainer(SampleTracingMixin, DPOTrainer):
    """TRL's DPOTrainer that records which samples each step trained on, takes reference log-probs from the
    dataset when it already has them and, with ``args.shared_prefix``, runs each pair's shared part once."""

    def _compute_loss(self, model: Any, inputs: Any, return_outputs: bool) -> Any:
        if not getattr(self.args, "shared_prefix", False):
            return super()._compute_loss(model, inputs, return_outputs)
        # TRL's loss, unchanged, over a forward that packs each pair; the live reference (which TRL reads
        # from self.ref_model) packs the same way, with the packing made once for both
        cache = PackCache()
        policy = SharedPrefixForward(model, cache)
        ref_model = self.ref_model
        stand_in: Any = None if ref_model is None else SharedPrefixForward(ref_model, cache)
        self.ref_model = stand_in  # TRL only calls it
        try:
            out = super()._compute_loss(policy, inputs, return_outputs)
        finally:
            self.ref_model = ref_model
        self._log_token_share(inputs, policy)
        return out

    def _log_token_share(self, inputs: Any, policy: SharedPrefixForward) -> None:
        """Log ``shared_prefix/token_share``: the tokens the forward ran over those of TRL's standard rows
        (1.0 for a batch it could not pack), summed over ranks; every rank joins the gather."""
        import torch

        standard = int(inputs["attention_mask"].sum())
        ran = policy.last.packed_tokens if policy.last is not None else standard
        counts = torch.tensor([ran, standard], dtype=torch.float64, device=self.accelerator.device)
        # gather, not gather_for_metrics: at an epoch's last, uneven batch the latter cuts the gathered
        # tensor to the dataset's remainder (one element for an odd number of pairs on two ranks)
        ran_all, standard_all = self.accelerator.gather(counts).view(-1, 2).sum(dim=0).tolist()
        mode = "train" if self.model is not None and self.model.training else "eval"
        self._metrics[mode]["shared_prefix/token_share"].append(ran_all / max(standard_all, 1.0))

    def compute_ref_log_probs(self, model: Any, inputs: Any) -> Any:
        if getattr(self.args, "shared_prefix", False):
            model = SharedPrefixForward(model)
        return super().compute_ref_log_probs(model, inputs)

    def _precompute_ref_logps(self, dataset: Any, name: str, batch_size: int) -> Any:
        # TRL recomputes (and duplicates) the columns even when present; ours come from a pass made once
        # before training, so no rank needs a DeepSpeed engine for the reference and a resume reuses them.
        if all(column in dataset.column_names for column in REF_COLUMNS):
            return dataset
        return super()._precompute_ref_logps(dataset, name, batch_size)


def dpo_args(
    stage: DPOStageConfig, output_dir: Path, run: RunSettings, *, precomputed_reference: bool
) -> TracedDPOConfig:
    """TRL's DPOConfig for one run."""
    return TracedDPOConfig(
        **common_arguments(stage, output_dir, run),
        beta=stage.beta,
        loss_type=[stage.loss_type],
        precompute_ref_log_probs=precomputed_reference,
        shared_prefix=stage.shared_prefix,
        # the held-back pairs' evaluation: the loss and rewards only (no logits kept), batches as in training
        prediction_loss_only=True,
        per_device_eval_batch_size=stage.per_device_batch_size,
    )


def build_dpo_trainer(
    model: Any,
    tokenizer: Any,
    train_table: pa.Table,
    args: DPOConfig,
    callbacks: Sequence[Any] = (),
    eval_table: pa.Table | None = None,
    peft_config: Any = None,
) -> TracedDPOTrainer:
    """A DPO trainer over a checked pairs table (with reference columns when ``args`` says precomputed);
    ``eval_table``: held-back pairs for ``trainer.evaluate()`` (the loss only: no logits are kept);
    ``peft_config``: train LoRA adapters only (a live reference is then the adapter-disabled model)."""
    for table in (train_table, eval_table):
        if table is None or not args.precompute_ref_log_probs:
            continue
        if not all(c in table.column_names for c in REF_COLUMNS):
            raise ValueError(
                "precomputed reference: the pairs table has no ref_chosen_logps/ref_rejected_logps; "
                "run precompute_reference_logps first"
            )
    trainer = TracedDPOTrainer(
        model=model,
        ref_model=None,
        args=args,
        train_dataset=to_hf_dataset(train_table),
        eval_dataset=None if eval_table is None else to_hf_dataset(eval_table),
        processing_class=tokenizer,
        callbacks=list(callbacks),
        peft_config=peft_config,
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
    shared_prefix: bool = True,
) -> pa.Table:
    """The pairs table with ``ref_chosen_logps``/``ref_rejected_logps`` of the model at ``model_path``.

    Runs TRL's tokenisation, collator and ``compute_ref_log_probs`` on one process, without DeepSpeed, so
    the numbers are exactly the ones DPOTrainer would compute for a live reference model (same prompt
    split, same truncation, sum of completion-token log-probs), in the precision training uses (``dtype``
    auto: bf16 autocast over fp32 weights where the device computes bf16 natively), each pair's shared
    part computed once with ``shared_prefix`` (as training computes it).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ttpa_ray.models import resolve_dtype

    table = train_table.drop_columns([c for c in REF_COLUMNS if c in train_table.column_names])
    tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32)
    args = TracedDPOConfig(
        output_dir=str(Path(tempfile.gettempdir()) / "ttpa-ref-precompute"),
        max_length=max_length,
        use_cpu=not torch.cuda.is_available(),
        report_to="none",
        precompute_ref_log_probs=True,
        precompute_ref_batch_size=batch_size,
        bf16=resolve_dtype(dtype) == "bfloat16",
        disable_tqdm=True,
        shared_prefix=shared_prefix,
    )
    # TRL's own precompute on one process without DeepSpeed; the trainer is built for it and never trains.
    # The pass runs inside __init__, outside the Trainer's own autocast: bf16 is asked for here.
    autocast = (
        torch.autocast("cpu", dtype=torch.bfloat16) if args.bf16 and not torch.cuda.is_available() else None
    )
    with autocast or contextlib.nullcontext():
        trainer = TracedDPOTrainer(
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
