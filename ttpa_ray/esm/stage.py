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
Arrow-native filters split the scored rows from the rejected ones. No state crosses batches but the
read-only cache of prepared tool indexes keyed by the tools JSON text (``scorer.prepare_tools``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import pyarrow as pa
import pyarrow.parquet as pq

from ttpa_ray.esm.scorer import (
    DEFAULT_WEIGHTS,
    ESMResult,
    ESMWeights,
    SchemaError,
    prepare_reference,
    prepare_tools,
    score,
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


class InvalidRecord(ValueError):
    """A row that cannot be scored at all (not a low score): it goes to the rejected rows."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def score_row(
    candidate: Any,
    reference: Any,
    tools: Any,
    *,
    reference_alternatives: Any = False,
    weights: ESMWeights = DEFAULT_WEIGHTS,
) -> ESMResult:
    """Score one stored row; raises :class:`InvalidRecord` (reason, detail) for a malformed row.

    Each field may be JSON text or the parsed object; ``candidate`` text may also be raw model text.
    ``reference_alternatives`` true means the reference's argument values are lists of alternatives.
    Reasons: missing_value, invalid_tools, invalid_reference.
    """
    if candidate is None:
        raise InvalidRecord("missing_value", "column 'candidate' is null")
    if tools is None:
        raise InvalidRecord("missing_value", "column 'tools' is null")
    try:
        index = prepare_tools(tools if type(tools) is str else json.dumps(tools, ensure_ascii=False))
    except (SchemaError, TypeError) as exc:
        raise InvalidRecord("invalid_tools", str(exc)) from None
    alternatives = False if reference_alternatives is None else reference_alternatives
    if type(alternatives) is not bool:
        raise InvalidRecord(
            "invalid_reference", f"reference_alternatives must be true or false, got {alternatives!r}"
        )
    if reference is None:
        raise InvalidRecord("missing_value", "column 'reference' is null")
    try:
        if type(reference) is str:
            reference = json.loads(reference)
        calls = prepare_reference(reference, alternatives=alternatives, tools=index)
    except json.JSONDecodeError as exc:
        raise InvalidRecord("invalid_reference", f"column 'reference' is not valid JSON ({exc})") from None
    except ValueError as exc:
        raise InvalidRecord("invalid_reference", str(exc)) from None
    return score(candidate, calls, index, weights)


def score_table(
    table: pa.Table,
    *,
    candidate_column: str = "candidate",
    reference_column: str = "reference",
    tools_column: str = "tools",
    alternatives_column: str = "reference_alternatives",
    weights: ESMWeights = DEFAULT_WEIGHTS,
) -> pa.Table:
    """The table with the ESM columns and the status columns appended (pure; no Ray needed).

    Fields hold JSON text (string, dictionary or Arrow JSON columns) or nested Arrow values;
    ``candidate`` text may be raw model output; the optional alternatives column (bool) says the
    reference's argument values are lists of acceptable values (BFCL form). Existing ESM or status
    columns are replaced.
    """
    stale = [
        c for c in (*ESM_COLUMNS, STATUS_COLUMN, REASON_COLUMN, DETAIL_COLUMN) if c in table.column_names
    ]
    table = table.drop_columns(stale)
    n = table.num_rows
    missing = [c for c in (candidate_column, reference_column, tools_column) if c not in table.column_names]
    results: list[ESMResult | InvalidRecord] = []
    if missing:
        detail = f"column(s) {', '.join(map(repr, missing))} missing from the batch"
        results = [InvalidRecord("missing_column", detail)] * n
    else:
        columns = [table.column(c).to_pylist() for c in (candidate_column, reference_column, tools_column)]
        flags = (
            table.column(alternatives_column).to_pylist()
            if alternatives_column in table.column_names
            else [False] * n
        )
        for candidate, reference, tools, alternatives in zip(*columns, flags, strict=True):
            try:
                results.append(
                    score_row(
                        candidate, reference, tools, reference_alternatives=alternatives, weights=weights
                    )
                )
            except InvalidRecord as exc:
                results.append(exc)
    ok = [r if isinstance(r, ESMResult) else None for r in results]
    bad = [r if isinstance(r, InvalidRecord) else None for r in results]
    columns_out = {
        "esm_score": pa.array([None if r is None else r.score for r in ok], pa.float64()),
        "esm_components": pa.array(
            [None if r is None else list(r.components.items()) for r in ok],
            pa.map_(pa.string(), pa.float64()),
        ),
        "esm_errors": pa.array([None if r is None else list(r.errors) for r in ok], pa.list_(pa.string())),
        STATUS_COLUMN: pa.array([_STATUS_REJECTED if r is None else _STATUS_OK for r in ok], pa.string()),
        REASON_COLUMN: pa.array([None if r is None else r.reason for r in bad], pa.string()),
        DETAIL_COLUMN: pa.array([None if r is None else r.detail for r in bad], pa.string()),
    }
    for name, column in columns_out.items():
        table = table.append_column(name, column)
    return table


def score_record(row: Any, *, alternatives: bool, weights: ESMWeights) -> dict[str, Any]:
    """One row of `ttpa score` with ``esm_score``, ``esm_components`` and ``esm_errors`` added; a row
    that cannot be scored gets a null score and ``["invalid_row: <reason>"]``."""
    if not isinstance(row, dict):
        return {"_row": row, **_invalid("not_an_object")}
    if any(field not in row for field in ("candidate", "reference", "tools")):
        return {**row, **_invalid("missing_column")}
    flag = row.get("reference_alternatives")
    try:
        result = score_row(
            row["candidate"],
            row["reference"],
            row["tools"],
            reference_alternatives=alternatives if flag is None else flag,
            weights=weights,
        )
    except InvalidRecord as exc:
        return {**row, **_invalid(exc.reason)}
    return {
        **row,
        "esm_score": result.score,
        "esm_components": dict(result.components),
        "esm_errors": list(result.errors),
    }


def _invalid(reason: str) -> dict[str, Any]:
    return {"esm_score": None, "esm_components": None, "esm_errors": [f"invalid_row: {reason}"]}


def score_file(
    source: Path, target: Path, *, alternatives: bool, weights: ESMWeights
) -> list[tuple[float | None, dict[str, float] | None, list[str]]]:
    """`ttpa score`: every row of a JSONL or Parquet file scored by :func:`score_record` and written,
    in order, to ``target`` (same format; a JSONL line that is not JSON keeps its text as
    ``_raw_line``; Parquet keeps its columns and gets the three ESM columns). Returns each row's
    (score, components, errors)."""
    partial = target.with_name(target.name + ".partial")
    target.parent.mkdir(parents=True, exist_ok=True)
    out: list[dict[str, Any]] = []
    try:
        if source.suffix.lower() in (".parquet", ".pq"):
            table = pq.read_table(source)
            out = [score_record(row, alternatives=alternatives, weights=weights) for row in table.to_pylist()]
            columns = {
                "esm_score": pa.float64(),
                "esm_components": pa.map_(pa.string(), pa.float64()),
                "esm_errors": pa.list_(pa.string()),
            }
            for name, kind in columns.items():
                values = [row[name] for row in out]
                if name == "esm_components":
                    values = [None if v is None else list(v.items()) for v in values]
                table = table.drop_columns([name] if name in table.column_names else [])
                table = table.append_column(name, pa.array(values, kind))
            pq.write_table(table, partial)
        else:
            with source.open(encoding="utf-8") as reader, partial.open("w", encoding="utf-8") as writer:
                for line in filter(str.strip, reader):
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:
                        scored = {"_raw_line": line.rstrip("\n"), **_invalid("invalid_json")}
                    else:
                        scored = score_record(row, alternatives=alternatives, weights=weights)
                    out.append(scored)
                    writer.write(json.dumps(scored, ensure_ascii=False) + "\n")
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    partial.replace(target)
    return [(row["esm_score"], row["esm_components"], row["esm_errors"]) for row in out]


class ScoreBatch:
    """Ray Data callable class: one pyarrow batch -> the same rows with ESM and status columns."""

    def __init__(self, **columns_and_weights: Any) -> None:
        self._kwargs = columns_and_weights

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
            "weights": weights,
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
