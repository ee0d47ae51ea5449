"""DPO's reference log-probs on the vLLM replicas (``train.dpo.reference: replicas``, the default).

Before DPO trains, the checked pairs table goes through a Ray Data stage on replicas of the reference
model (the policy DPO starts from). Each pair is tokenised as TRL's DPOTrainer tokenises it (TRL's
own ``_tokenize`` with the chat template and tools, the prompt split where prompt and prompt +
completion diverge, ``max_length`` cut from the start), and vLLM's prompt log-probs over prompt +
completion give the sum of the completion tokens' log-probs, which the pairs then carry as
``ref_chosen_logps``/``ref_rejected_logps``. No trainer computes or holds a reference, and each row
keeps its own numbers (they travel in the row, never matched up by position afterwards).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from ttpa_ray.config import VLLMConfig
from ttpa_ray.replica import VLLMReplica, replica_map
from ttpa_ray.train.data import REF_COLUMNS

if TYPE_CHECKING:
    import ray.data


def _decoded(value: Any) -> Any:
    if isinstance(value, str):
        return json.loads(value)
    if isinstance(value, list):
        return [_decoded(v) for v in value]
    return value


def trl_token_ids(tokenizer: Any, row: dict[str, Any], max_length: int) -> tuple[list[int], list[int], int]:
    """(prompt + chosen ids, prompt + rejected ids, prompt length), cut to ``max_length`` as TRL's
    collator cuts them (``truncation_mode="keep_start"``)."""
    from trl.data_utils import _tokenize, common_prefix_length

    tools = _decoded(row.get("tools"))
    prompt, chosen, rejected = (_decoded(row[k]) for k in ("prompt", "chosen", "rejected"))
    kwargs = {"tools": tools or None}
    prompt_ids = _tokenize(tokenizer, prompt, add_generation_prompt=True, **kwargs)["input_ids"]
    with_chosen = _tokenize(tokenizer, prompt + chosen, **kwargs)["input_ids"]
    with_rejected = _tokenize(tokenizer, prompt + rejected, **kwargs)["input_ids"]
    start = min(
        common_prefix_length(prompt_ids, with_chosen), common_prefix_length(prompt_ids, with_rejected)
    )
    return list(with_chosen[:max_length]), list(with_rejected[:max_length]), start


class ReferenceReplica(VLLMReplica):
    """A replica that adds each pair's reference log-probs (a ``max_length`` column says where TRL cuts)."""

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        sequences, starts = [], []
        for row in rows:
            chosen, rejected, start = trl_token_ids(self.engine.tokenizer, row, int(row["max_length"]))
            sequences += [chosen, rejected]
            starts += [start, start]
        sums = self.engine.completion_logprobs(sequences, starts)
        return batch.append_column(REF_COLUMNS[0], pa.array(sums[0::2], pa.float64())).append_column(
            REF_COLUMNS[1], pa.array(sums[1::2], pa.float64())
        )


def reference_dataset(
    vllm: VLLMConfig, model: str, ds: ray.data.Dataset, *, max_length: int, dtype: str = "auto", seed: int = 0
) -> ray.data.Dataset:
    """A dataset of checked pairs with the reference log-probs of ``model``, computed on replicas; each
    row carries its own numbers."""
    if max_length >= vllm.max_model_len:
        raise ValueError(
            f"train.dpo.max_length ({max_length}) must be below vllm.max_model_len ({vllm.max_model_len}) "
            "for the replicas to score whole pairs"
        )

    def cut_at(batch: pa.Table) -> pa.Table:
        batch = batch.drop_columns([c for c in REF_COLUMNS if c in batch.column_names])
        return batch.append_column("max_length", pa.array([max_length] * batch.num_rows, pa.int64()))

    ds = ds.map_batches(cut_at, batch_format="pyarrow")
    return replica_map(ds, ReferenceReplica, model, vllm, dtype=dtype, seed=seed).drop_columns(["max_length"])


def replica_reference_logps(
    vllm: VLLMConfig, model: str, table: pa.Table, *, max_length: int, dtype: str = "auto", seed: int = 0
) -> pa.Table:
    """:func:`reference_dataset` of a table, back in the table's order (a small table: the driver
    holds it). Ray must be running."""
    import ray

    ds = reference_dataset(
        vllm, model, ray.data.from_arrow(table), max_length=max_length, dtype=dtype, seed=seed
    )
    out = pa.concat_tables(ray.get(ds.to_arrow_refs()))
    order = {index: row for row, index in enumerate(out.column("sample_index").to_pylist())}
    if sorted(order) != sorted(table.column("sample_index").to_pylist()):
        raise RuntimeError(f"reference pass returned {out.num_rows} rows for {table.num_rows} pairs")
    return out.take([order[i] for i in table.column("sample_index").to_pylist()])
