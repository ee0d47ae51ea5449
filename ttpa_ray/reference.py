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
from typing import Any

import pyarrow as pa

from ttpa_ray.config import VLLMConfig
from ttpa_ray.replica import VLLMReplica, replica_map
from ttpa_ray.train.data import REF_COLUMNS


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


def replica_reference_logps(
    vllm: VLLMConfig, model: str, table: pa.Table, *, max_length: int, dtype: str = "auto", seed: int = 0
) -> pa.Table:
    """The pairs table with the reference log-probs of ``model``, computed on replicas (Ray running).

    The rows come back in the table's own order (``sample_index``), each with its own numbers."""
    import ray

    if max_length >= vllm.max_model_len:
        raise ValueError(
            f"train.dpo.max_length ({max_length}) must be below vllm.max_model_len ({vllm.max_model_len}) "
            "for the replicas to score whole pairs"
        )
    table = table.drop_columns([c for c in REF_COLUMNS if c in table.column_names])
    plain = table.append_column("max_length", pa.array([max_length] * table.num_rows, pa.int64()))
    # JSON columns travel as text: a replica decodes them itself
    plain = pa.table({name: _as_text(plain.column(name)) for name in plain.column_names})
    out = replica_map(ray.data.from_arrow(plain), ReferenceReplica, model, vllm, dtype=dtype, seed=seed)
    scored = {
        int(r["sample_index"]): (r[REF_COLUMNS[0]], r[REF_COLUMNS[1]])
        for r in out.select_columns(["sample_index", *REF_COLUMNS]).take_all()
    }
    order = table.column("sample_index").to_pylist()
    if sorted(scored) != sorted(order):
        raise RuntimeError(f"reference pass returned {len(scored)} rows for {table.num_rows} pairs")
    return table.append_column(
        REF_COLUMNS[0], pa.array([scored[i][0] for i in order], pa.float64())
    ).append_column(REF_COLUMNS[1], pa.array([scored[i][1] for i in order], pa.float64()))


def _as_text(column: pa.ChunkedArray) -> pa.ChunkedArray | pa.Array:
    """A JSON-typed column (or a list of them) as plain strings: Ray Data moves any Arrow type, but
    the replica only needs the text."""
    values = column.to_pylist()
    if pa.types.is_list(column.type):
        return pa.array([[v if isinstance(v, str) else json.dumps(v) for v in item] for item in values])
    if isinstance(column.type, pa.ExtensionType) or pa.types.is_string(column.type):
        return pa.array(
            [v if v is None or isinstance(v, str) else json.dumps(v) for v in values], pa.string()
        )
    return column
