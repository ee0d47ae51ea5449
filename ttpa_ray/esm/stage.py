"""ESM as a stateless Ray stage over Ray Data: candidate rows in, scored rows and rejected rows out.

Every row is scored by :func:`score_table` (the pure scorer over an Arrow batch), which appends
``esm_score`` (double), ``esm_components`` (map<string, double>), ``esm_errors`` (list<string>) and
status columns; :func:`score_dataset` then splits the scored rows from the rejected ones
(``RejectedRow`` records: input_id, stage, reason, detail, payload). Rows in = scored + rejected,
always: a row is rejected only when it cannot be scored at all (a missing column or null field,
tools that are not valid specs, a reference that is not a call); a candidate that does not parse is
a score of 0, not a rejection.

:func:`score_dataset` runs it on Ray Data: one ``map_batches`` over a pool of stateless
:class:`ScoreBatch` actors (one CPU each, ``esm.scorers`` min..max), materialised once, then two
Arrow-native filters split the scored rows from the rejected ones.

No state crosses batches except the process-wide, read-only cache of prepared tool indexes keyed by
the tools JSON text (``scorer.prepare_tools``); each distinct tools and reference text of a batch
is read once (Arrow dictionary encoding), which is what keeps per-row cost near the pure loop's.
"""

from __future__ import annotations

import gc
import hashlib
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ttpa_ray.esm.scorer import (
    COMPONENTS,
    DEFAULT_WEIGHTS,
    ESMWeights,
    InvalidRecord,
    ReferenceCall,
    ToolIndex,
    error_names,
    record_reference,
    record_tools,
    score_components,
    score_fields,
)
from ttpa_ray.records import RejectedRow, batch_from_rows, reject

if TYPE_CHECKING:
    import ray.data

STAGE: Final = "esm"
STATUS_COLUMN: Final = "_ttpa_status"
REASON_COLUMN: Final = "_ttpa_reason"
DETAIL_COLUMN: Final = "_ttpa_detail"
ESM_COLUMNS: Final[tuple[str, ...]] = ("esm_score", "esm_components", "esm_errors")
ID_COLUMNS: Final[tuple[str, ...]] = ("candidate_id", "id", "input_id")
_STATUS_OK: Final = "ok"
_STATUS_REJECTED: Final = "rejected"
_COMPONENT_KEYS: Final = pa.array(list(COMPONENTS), pa.string())
_ZEROS: Final = (0.0,) * len(COMPONENTS)


def _distinct(column: pa.ChunkedArray) -> tuple[list[int], list[Any]]:
    """Row -> position in a list of distinct values, so each distinct tools/reference text is read once.

    String and dictionary columns are dictionary-encoded by Arrow (nulls point at a trailing None);
    nested columns are not deduplicated (one position per row).
    """
    column = _storage(column)
    kind = column.type
    if pa.types.is_dictionary(kind) or pa.types.is_string(kind) or pa.types.is_large_string(kind):
        if not pa.types.is_dictionary(kind):
            column = pc.dictionary_encode(column)
        encoded = column.unify_dictionaries().combine_chunks() if column.num_chunks else None
        if isinstance(encoded, pa.DictionaryArray):
            values: list[Any] = encoded.dictionary.to_pylist()
            positions = encoded.indices.fill_null(len(values)).to_pylist()
            return positions, [*values, None]
    return list(range(len(column))), column.to_pylist()


def _storage(column: pa.ChunkedArray) -> pa.ChunkedArray:
    if isinstance(column.type, pa.BaseExtensionType):
        return pa.chunked_array([chunk.storage for chunk in column.chunks], column.type.storage_type)
    return column


def _candidates(column: pa.ChunkedArray) -> tuple[list[Any], bool]:
    """Python values of the candidate column, and whether they are (name, arguments) pairs.

    ``list<struct<name, arguments>>`` (the Candidate record's calls) is read from its child arrays as
    lists of (name, arguments) pairs: Arrow's generic struct conversion costs several microseconds a
    row, more than scoring a call. Other layouts (text, other structs) convert as they are.
    """
    kind = column.type
    if not (pa.types.is_list(kind) and pa.types.is_struct(kind.value_type)):
        return _storage(column).to_pylist(), False
    struct_type = kind.value_type
    if {struct_type.field(i).name for i in range(struct_type.num_fields)} != {"name", "arguments"}:
        return column.to_pylist(), False
    out: list[Any] = []
    for chunk in column.chunks:
        values = chunk.values
        names = values.field("name").to_pylist()
        arguments = values.field("arguments")
        args = (arguments.storage if isinstance(arguments, pa.ExtensionArray) else arguments).to_pylist()
        offsets = chunk.offsets.to_pylist()
        valid = chunk.is_valid().to_pylist()
        for i in range(len(chunk)):
            out.append([(names[j], args[j]) for j in range(offsets[i], offsets[i + 1])] if valid[i] else None)
    return out, True


def _prepare(
    reference: Any, tools: Any, alternatives: Any
) -> tuple[tuple[ReferenceCall, ...], ToolIndex] | InvalidRecord:
    try:
        index = record_tools(tools)
        return record_reference(reference, alternatives, index), index
    except InvalidRecord as exc:
        return exc


def _score_table(
    table: pa.Table,
    *,
    candidate_column: str = "candidate",
    reference_column: str = "reference",
    tools_column: str = "tools",
    alternatives_column: str = "reference_alternatives",
    weights: ESMWeights = DEFAULT_WEIGHTS,
) -> pa.Table:
    """score_table without the GC switch."""
    stale = [
        c for c in (*ESM_COLUMNS, STATUS_COLUMN, REASON_COLUMN, DETAIL_COLUMN) if c in table.column_names
    ]
    if stale:
        table = table.drop_columns(stale)
    n = table.num_rows
    scores: list[float] = []  # per scored row, in order
    flat_components: list[float] = []
    masks: list[int] = []
    rejected = np.zeros(n, dtype=bool)
    reasons: list[str | None] = [None] * n
    details: list[str | None] = [None] * n

    def reject_row(i: int, reason: str, detail: str) -> None:
        rejected[i] = True
        reasons[i], details[i] = reason, detail
        scores.append(0.0)
        flat_components.extend(_ZEROS)
        masks.append(0)

    missing = [c for c in (candidate_column, reference_column, tools_column) if c not in table.column_names]
    if missing:
        detail = f"column(s) {', '.join(map(repr, missing))} missing from the batch"
        for i in range(n):
            reject_row(i, "missing_column", detail)
    else:
        candidates, as_fields = _candidates(table.column(candidate_column))
        score_one = score_fields if as_fields else score_components
        tool_pos, tool_values = _distinct(table.column(tools_column))
        ref_pos, ref_values = _distinct(table.column(reference_column))
        alternatives: list[Any] = (
            table.column(alternatives_column).to_pylist()
            if alternatives_column in table.column_names
            else [False] * n
        )
        # Each distinct (reference, tools, alternatives) of the batch is checked and prepared once.
        prepared: dict[tuple[int, int, Any], tuple[tuple[ReferenceCall, ...], ToolIndex] | InvalidRecord] = {}
        for i in range(n):
            # Same checks, same order as scorer.score_record.
            candidate = candidates[i]
            if candidate is None:
                reject_row(i, "missing_value", "column 'candidate' is null")
                continue
            key = (ref_pos[i], tool_pos[i], alternatives[i])
            ready = prepared.get(key)
            if ready is None:
                ready = prepared[key] = _prepare(ref_values[key[0]], tool_values[key[1]], key[2])
            if isinstance(ready, InvalidRecord):
                reject_row(i, ready.reason, ready.detail)
                continue
            result = score_one(candidate, ready[0], ready[1], weights)
            scores.append(result[0])
            flat_components.extend(result[1:6])
            masks.append(result[6])

    any_rejected = bool(rejected.any())
    mask = pa.array(rejected) if any_rejected else None
    k = len(COMPONENTS)
    component_array = pa.MapArray.from_arrays(
        pa.array(np.arange(0, k * n + 1, k, dtype=np.int32)),
        pa.DictionaryArray.from_arrays(
            pa.array(np.tile(np.arange(k, dtype=np.int32), n)), _COMPONENT_KEYS
        ).dictionary_decode(),
        pa.array(np.array(flat_components, dtype=np.float64)),
        mask=mask,
    )
    names = [error_names(m) for m in masks]
    error_offsets = np.zeros(n + 1, dtype=np.int32)
    np.cumsum([len(e) for e in names], out=error_offsets[1:])
    error_array = pa.ListArray.from_arrays(
        pa.array(error_offsets),
        pa.array([name for row in names if row for name in row], pa.string()),
        mask=mask,
    )
    if any_rejected:
        status = pa.array(np.where(rejected, _STATUS_REJECTED, _STATUS_OK), pa.string())
        reason_array = pa.array(reasons, pa.string())
        detail_array = pa.array(details, pa.string())
    else:
        status = pa.repeat(pa.scalar(_STATUS_OK, pa.string()), n)
        reason_array = detail_array = pa.nulls(n, pa.string())
    return (
        table.append_column("esm_score", pa.array(np.array(scores, dtype=np.float64), mask=rejected))
        .append_column("esm_components", component_array)
        .append_column("esm_errors", error_array)
        .append_column(STATUS_COLUMN, status)
        .append_column(REASON_COLUMN, reason_array)
        .append_column(DETAIL_COLUMN, detail_array)
    )


def score_table(table: pa.Table, **columns_and_weights: Any) -> pa.Table:
    """The table with the ESM columns and the status columns appended (pure; no Ray needed).

    Keywords: ``candidate_column``, ``reference_column``, ``tools_column``, ``alternatives_column``
    and ``weights`` (see :func:`score_dataset`). Fields hold JSON text (string, dictionary or Arrow
    JSON columns) or nested Arrow values; ``candidate`` text may be raw model output; the optional
    alternatives column (bool) says the reference's argument values are lists of acceptable values
    (BFCL form). Each distinct tools and reference text is prepared once per batch. Existing ESM or
    status columns are replaced.
    """
    was_enabled = gc.isenabled()
    # A batch's Python objects all live until its end: generational GC passes over them find no
    # cycles and cost about a fifth of the batch time.
    gc.disable()
    try:
        return _score_table(table, **columns_and_weights)
    finally:
        if was_enabled:
            gc.enable()


class ScoreBatch:
    """Ray Data callable class: one pyarrow batch -> the same rows with ESM and status columns."""

    def __init__(
        self,
        candidate_column: str = "candidate",
        reference_column: str = "reference",
        tools_column: str = "tools",
        alternatives_column: str = "reference_alternatives",
        weights: Sequence[float] | None = None,
    ) -> None:
        self._kwargs: dict[str, Any] = {
            "candidate_column": candidate_column,
            "reference_column": reference_column,
            "tools_column": tools_column,
            "alternatives_column": alternatives_column,
            "weights": ESMWeights(*weights) if weights is not None else DEFAULT_WEIGHTS,
        }

    def __call__(self, batch: pa.Table) -> pa.Table:
        return score_table(batch, **self._kwargs)


def _input_id(row: dict[str, Any], id_column: str | None) -> str:
    for column in (id_column,) if id_column else ID_COLUMNS:
        value = row.get(column)
        if value is not None:
            return str(value)
    text = json.dumps(row, sort_keys=True, ensure_ascii=False, default=str)
    return "sha1:" + hashlib.sha1(text.encode()).hexdigest()[:16]


def rejected_rows(table: pa.Table, *, id_column: str | None = None) -> pa.Table:
    """``RejectedRow`` table of the rejected rows of a :func:`score_table` output (payload: input columns)."""
    status_columns = (*ESM_COLUMNS, STATUS_COLUMN, REASON_COLUMN, DETAIL_COLUMN)
    reasons = table.column(REASON_COLUMN).to_pylist()
    details = table.column(DETAIL_COLUMN).to_pylist()
    inputs = table.drop_columns([c for c in status_columns if c in table.column_names]).to_pylist()
    rows = [
        reject(_input_id(row, id_column), STAGE, reason or "unknown", detail or "", row).to_row()
        for row, reason, detail in zip(inputs, reasons, details, strict=True)
    ]
    return batch_from_rows(rows, RejectedRow.SCHEMA)


_STATUS_COLUMNS: Final = (STATUS_COLUMN, REASON_COLUMN, DETAIL_COLUMN)


def score_dataset(
    ds: ray.data.Dataset,
    *,
    candidate_column: str = "candidate",
    reference_column: str = "reference",
    tools_column: str = "tools",
    alternatives_column: str = "reference_alternatives",
    id_column: str | None = None,
    weights: ESMWeights = DEFAULT_WEIGHTS,
    batch_size: int | None = None,
    scorers: tuple[int, int] = (1, 1),
) -> tuple[ray.data.Dataset, ray.data.Dataset]:
    """(scored, rejected) datasets from one scoring pass over ``ds`` (see the module docstring).

    ``scored`` has the input columns plus esm_score, esm_components, esm_errors; ``rejected`` has
    ``RejectedRow`` columns (input_id from ``id_column``, else candidate_id/id/input_id, else a hash).
    ``scorers``: (min, max) of the autoscaling pool of scorer actors, one CPU each; ``batch_size``:
    rows per scorer call (None: one call per block).
    """
    import ray.data
    from ray.data.expressions import col

    low, high = scorers
    if not 1 <= low <= high:
        raise ValueError(f"scorers must be (min, max) with 1 <= min <= max, got {scorers!r}")
    marked = ds.map_batches(
        ScoreBatch,
        fn_constructor_kwargs={
            "candidate_column": candidate_column,
            "reference_column": reference_column,
            "tools_column": tools_column,
            "alternatives_column": alternatives_column,
            "weights": (weights.name, weights.required, weights.key, weights.value_type, weights.value),
        },
        compute=ray.data.ActorPoolStrategy(min_size=low, max_size=high),
        batch_format="pyarrow",
        batch_size=batch_size,
        num_cpus=1,
        zero_copy_batch=True,
    ).materialize()  # scored once; both outputs read it
    # Empty outputs keep their columns (a Ray dataset with no block has no schema).
    if marked.count():
        empty = _arrow_schema(marked).empty_table()
    else:
        empty = score_table(_arrow_schema(ds).empty_table())
    ok = marked.filter(expr=col(STATUS_COLUMN) == _STATUS_OK).materialize()
    bad = marked.filter(expr=col(STATUS_COLUMN) == _STATUS_REJECTED).materialize()
    scored = (
        ok.drop_columns(list(_STATUS_COLUMNS))
        if ok.count()
        else ray.data.from_arrow(empty.drop_columns(list(_STATUS_COLUMNS)))
    )
    rejected = (
        bad.map_batches(
            rejected_rows, fn_kwargs={"id_column": id_column}, batch_format="pyarrow", zero_copy_batch=True
        )
        if bad.count()
        else ray.data.from_arrow(RejectedRow.SCHEMA.empty_table())
    )
    return scored, rejected


def _arrow_schema(ds: ray.data.Dataset) -> pa.Schema:
    schema = ds.schema()
    base = getattr(schema, "base_schema", schema)
    return base if isinstance(base, pa.Schema) else pa.schema([])
