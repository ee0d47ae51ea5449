"""ESM Ray Data stage: rows in = scored + rejected, scores equal the pure function's (real local Ray)."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pyarrow as pa
import pytest

from ttpa_ray.bfcl import load_entries
from ttpa_ray.esm.stage import STATUS_COLUMN, score_dataset, score_row, score_table
from ttpa_ray.records import RejectedRow

BAD_TOOLS = json.dumps(
    [{"name": "w", "parameters": {"type": "object", "properties": {"a": {"type": "str"}}}}]
)


def _good_rows() -> list[dict[str, Any]]:
    """BFCL-derived rows: the ground truth, a truncated copy and a value-mutated copy of each entry."""
    rows: list[dict[str, Any]] = []
    for entry in load_entries("simple_python")[:60] + load_entries("parallel")[:30]:
        tools = json.dumps(entry.tools)
        reference = json.dumps(entry.ground_truth)
        truth = [c.to_dict() for c in entry.ground_truth_calls()]
        first = truth[0]
        mutated = {**first, "arguments": {**first["arguments"], "ttpa_extra": 1}}
        for suffix, candidate in (
            ("truth", json.dumps(truth)),
            ("cut", json.dumps(truth)[:-7]),
            ("mut", f"<tool_call>{json.dumps(mutated)}</tool_call>"),
        ):
            rows.append(
                {
                    "id": f"{entry.id}/{suffix}",
                    "candidate": candidate,
                    "reference": reference,
                    "tools": tools,
                    "reference_alternatives": True,
                }
            )
    return rows


def _bad_rows(template: dict[str, Any]) -> list[tuple[dict[str, Any], str]]:
    return [
        ({**template, "id": "bad/null-candidate", "candidate": None}, "missing_value"),
        ({**template, "id": "bad/null-tools", "tools": None}, "missing_value"),
        ({**template, "id": "bad/tools-json", "tools": "[{"}, "invalid_tools"),
        ({**template, "id": "bad/tools-type", "tools": BAD_TOOLS}, "invalid_tools"),
        ({**template, "id": "bad/ref-not-call", "reference": '{"arguments": {}}'}, "invalid_reference"),
        ({**template, "id": "bad/ref-json", "reference": "{oops"}, "invalid_reference"),
        ({**template, "id": "bad/ref-alts", "reference": '[{"f": {"a": 1}}]'}, "invalid_reference"),
    ]


@pytest.mark.parametrize("batch_size", [64, None])  # calls of 64 rows across the 50-row blocks; a block
def test_stage_rows_in_equal_scored_plus_rejected(ray_cluster: Any, batch_size: int | None) -> None:
    import ray

    good = _good_rows()
    bad = _bad_rows(good[0])
    rows = list(good)
    for offset, (row, _) in enumerate(bad):
        rows.insert(37 * offset + 5, row)  # spread over several batches
    table = pa.Table.from_pylist(rows)
    ds = ray.data.from_arrow([table.slice(i, 50) for i in range(0, table.num_rows, 50)])

    scored, rejected = score_dataset(ds, batch_size=batch_size, scorers=(1, 2))
    scored_rows = scored.take_all()
    rejected_rows = rejected.take_all()

    assert len(scored_rows) + len(rejected_rows) == len(rows) == len(good) + 7
    assert len(scored_rows) == len(good)
    assert STATUS_COLUMN not in scored.schema().names
    assert set(rejected.schema().names) == set(RejectedRow.SCHEMA.names)
    # every injected bad row is rejected with its reason and its original row as payload
    expected_reasons = {row["id"]: reason for row, reason in bad}
    assert {r["input_id"]: r["reason"] for r in rejected_rows} == expected_reasons
    for r in rejected_rows:
        record = RejectedRow.from_row(r)
        assert record.stage == "esm"
        assert record.payload_object()["id"] == record.input_id
    # scores are the pure function's, row by row
    by_id = {row["id"]: row for row in good}
    for out in scored_rows:
        row = by_id[out["id"]]
        expected = score_row(
            row["candidate"],
            row["reference"],
            row["tools"],
            reference_alternatives=row["reference_alternatives"],
        )
        assert out["esm_score"] == expected.score
        assert list(out["esm_errors"]) == list(expected.errors)
        assert dict(out["esm_components"]) == expected.components
    # the data exercises all three outcomes: 1.0 truths, parse failures, unknown keys
    kinds = Counter((row["id"].rsplit("/", 1)[1], row["esm_score"] == 1.0) for row in scored_rows)
    assert kinds == {("truth", True): 90, ("cut", False): 90, ("mut", False): 90}
    assert all(list(r["esm_errors"]) == ["parse"] for r in scored_rows if r["id"].endswith("/cut"))


def test_stage_rejects_every_row_when_a_column_is_missing(ray_cluster: Any) -> None:
    import ray

    rows = [{"id": f"r{i}", "candidate": "{}", "tools": "[]"} for i in range(10)]
    scored, rejected = score_dataset(ray.data.from_items(rows), id_column="id")
    assert scored.count() == 0
    out = rejected.take_all()
    assert sorted(r["input_id"] for r in out) == sorted(r["id"] for r in rows)
    assert {r["reason"] for r in out} == {"missing_column"}
    assert "'reference'" in out[0]["detail"]
    # the empty scored output still has the input and ESM columns
    assert {"id", "candidate", "tools", "esm_score", "esm_errors"} <= set(scored.schema().names)
    assert STATUS_COLUMN not in scored.schema().names


def test_stage_pandas_blocks_and_empty_input(ray_cluster: Any) -> None:
    import pandas as pd
    import ray

    good = _good_rows()[:9]
    frame = pd.DataFrame(good)
    scored, rejected = score_dataset(ray.data.from_pandas([frame[:4], frame[4:]]), scorers=(1, 2))
    out = sorted(scored.take_all(), key=lambda r: r["id"])
    assert [r["id"] for r in out] == sorted(r["id"] for r in good)
    assert rejected.count() == 0
    assert set(rejected.schema().names) == set(RejectedRow.SCHEMA.names)
    by_id = {row["id"]: row for row in good}
    for r in out:
        row = by_id[r["id"]]
        expected = score_row(row["candidate"], row["reference"], row["tools"], reference_alternatives=True)
        assert r["esm_score"] == expected.score
    # no rows in: both outputs empty, with their columns
    empty = pa.Table.from_pylist(good).slice(0, 0)
    scored, rejected = score_dataset(ray.data.from_arrow(empty))
    assert scored.count() == 0 and rejected.count() == 0
    assert "esm_score" in scored.schema().names
    assert set(rejected.schema().names) == set(RejectedRow.SCHEMA.names)


def test_score_table_dictionary_columns_with_nulls() -> None:
    # tools/reference as dictionary<string> with nulls and the calls column with a null list:
    # each distinct value is prepared once; nulls are rejected rows, the rest scored
    tools = json.dumps(
        [{"name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}}}]
    )
    ref = '{"name": "f", "arguments": {"a": 1}}'
    call_type = pa.list_(pa.struct([pa.field("name", pa.string()), pa.field("arguments", pa.string())]))
    table = pa.table(
        {
            "candidate": pa.array(
                [[{"name": "f", "arguments": '{"a": 1}'}], None, [{"name": "f", "arguments": "{"}], []],
                call_type,
            ),
            "reference": pa.array([ref, ref, ref, None]).dictionary_encode(),
            "tools": pa.array([tools, None, tools, tools]).dictionary_encode(),
        }
    )
    out = score_table(table).to_pylist()
    # row 0 exact -> 1.0; row 1 null candidate; row 2 truncated arguments -> 0 parse; row 3 null reference
    assert [r["esm_score"] for r in out] == [1.0, None, 0.0, None]
    assert [r["_ttpa_reason"] for r in out] == [None, "missing_value", None, "missing_value"]
    assert out[2]["esm_errors"] == ["parse"]


def test_score_table_reads_candidate_record_calls_column() -> None:
    # Candidate records store calls as list<struct<name, arguments: json>>: the stage reads them as is
    tools = json.dumps(
        [{"name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}}}]
    )
    calls_type = pa.list_(pa.struct([pa.field("name", pa.string()), pa.field("arguments", pa.json_())]))
    table = pa.table(
        {
            "candidate_id": ["c1", "c2"],
            "calls": pa.array(
                [[{"name": "f", "arguments": '{"a": 1}'}], [{"name": "f", "arguments": '{"a": 2}'}]],
                type=pa.list_(pa.struct([pa.field("name", pa.string()), pa.field("arguments", pa.string())])),
            ).cast(calls_type),
            "reference": ['{"name": "f", "arguments": {"a": 1}}'] * 2,
            "tools": pa.array([tools, tools], pa.json_()),
        }
    )
    out = score_table(table, candidate_column="calls").to_pylist()
    # c2: value 0 -> (3+3+1+2+0)/11 = 9/11
    assert [r["esm_score"] for r in out] == [1.0, pytest.approx(9 / 11)]
    assert [r["esm_errors"] for r in out] == [[], ["value_mismatch"]]


# ------------------------------------------------------------------------------------------- CLI
def _cli() -> Any:
    from ttpa_ray.cli import app

    return app


def _cli_rows() -> list[Any]:
    tools = [
        {
            "type": "function",
            "function": {"name": "f", "parameters": {"properties": {"a": {"type": "integer"}}}},
        }
    ]
    return [
        # exact call object -> 1.0
        {
            "id": 1,
            "candidate": {"name": "f", "arguments": {"a": 1}},
            "reference": {"name": "f", "arguments": {"a": 1}},
            "tools": tools,
        },
        # raw hermes text with a = 2 vs 1 -> (3+3+1+2+0)/11 = 9/11
        {
            "id": 2,
            "candidate": '<tool_call>{"name": "f", "arguments": {"a": 2}}</tool_call>',
            "reference": {"name": "f", "arguments": {"a": 1}},
            "tools": tools,
        },
        # BFCL-form reference with alternatives: a may be 1 or 2 -> 1.0
        {
            "id": 3,
            "candidate": [{"name": "f", "arguments": '{"a": 2}'}],
            "reference": [{"f": {"a": [1, 2]}}],
            "reference_alternatives": True,
            "tools": tools,
        },
        # prose -> 0 with parse
        {"id": 4, "candidate": "no idea", "reference": {"name": "f", "arguments": {"a": 1}}, "tools": tools},
        # malformed: no reference, and tools with an unknown type
        {"id": 5, "candidate": "x", "tools": tools},
        {
            "id": 6,
            "candidate": "x",
            "reference": {"name": "f"},
            "tools": [{"name": "g", "parameters": {"properties": {"b": {"type": "str"}}}}],
        },
    ]


def test_score_command_jsonl_keeps_every_row(tmp_path: Any) -> None:
    from typer.testing import CliRunner

    source = tmp_path / "in.jsonl"
    lines = [json.dumps(row) for row in _cli_rows()] + ["{not json"]
    source.write_text("\n".join(lines) + "\n", encoding="utf-8")
    target = tmp_path / "out" / "scored.jsonl"
    result = CliRunner().invoke(_cli(), ["score", str(source), "--out", str(target)])
    assert result.exit_code == 0, result.output
    out = [json.loads(line) for line in target.read_text(encoding="utf-8").splitlines()]
    assert len(out) == 7
    assert [r["esm_score"] for r in out] == [1.0, pytest.approx(9 / 11), 1.0, 0.0, None, None, None]
    assert [r["esm_errors"] for r in out] == [
        [],
        ["value_mismatch"],
        [],
        ["parse"],
        ["invalid_row: missing_column"],
        ["invalid_row: invalid_tools"],
        ["invalid_row: invalid_json"],
    ]
    assert out[1]["esm_components"] == {
        "name": 1.0,
        "required": 1.0,
        "key": 1.0,
        "value_type": 1.0,
        "value": 0.0,
    }
    assert out[0]["id"] == 1 and out[6]["_raw_line"] == "{not json"
    # mean over the 4 scored rows: (1 + 9/11 + 1 + 0)/4 = 0.7045; parse rate 1/4
    assert "0.7045" in result.output and "25.00%" in result.output
    assert "3 invalid rows" in result.output


def test_score_command_parquet_and_weights(tmp_path: Any) -> None:
    from typer.testing import CliRunner

    rows = [r for r in _cli_rows() if r["id"] in (1, 2, 4)]
    table = pa.table(
        {
            "id": [r["id"] for r in rows],
            "candidate": [
                r["candidate"] if isinstance(r["candidate"], str) else json.dumps(r["candidate"])
                for r in rows
            ],
            "reference": [json.dumps(r["reference"]) for r in rows],
            "tools": [json.dumps(r["tools"]) for r in rows],
        }
    )
    import pyarrow.parquet as pq

    source, target = tmp_path / "in.parquet", tmp_path / "out.parquet"
    pq.write_table(table, source)
    # equal weights: row 2 -> (1+1+1+1+0)/5 = 0.8
    result = CliRunner().invoke(_cli(), ["score", str(source), "-o", str(target), "--weights", "1,1,1,1,1"])
    assert result.exit_code == 0, result.output
    out = pq.read_table(target)
    assert out.column_names == [
        "id",
        "candidate",
        "reference",
        "tools",
        "esm_score",
        "esm_components",
        "esm_errors",
    ]
    assert out.column("esm_score").to_pylist() == [1.0, pytest.approx(0.8), 0.0]
    assert out.column("esm_errors").to_pylist() == [[], ["value_mismatch"], ["parse"]]
    # a wrong output format is refused with a clear message
    bad = CliRunner().invoke(_cli(), ["score", str(source), "-o", str(tmp_path / "x.jsonl")])
    assert bad.exit_code == 2 and "same format" in bad.output
