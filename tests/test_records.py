"""Records: Parquet round-trips, validation errors, Ray batch helpers and TRL readability of pairs."""

from __future__ import annotations

import io
import json
import math
import types
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ttpa_ray.codec import ToolCall
from ttpa_ray.records import (
    Candidate,
    Dialogue,
    Message,
    PreferencePair,
    RecordError,
    RejectedRow,
    SchemaMismatchError,
    ScoredCandidate,
    ToolSpec,
    Turn,
    batch_from_rows,
    from_table,
    read_parquet,
    reject,
    rows_from_batch,
    to_table,
    write_parquet,
)

TRICKY = 'Tōkyō 東京 🌸🚀 "quoted" \\back\\slash\nnew line\ttab \u00e9 \u200b end'

WEATHER = ToolSpec(
    name="get_weather",
    description=f"Forecast for a city. {TRICKY}",
    parameters={
        "type": "object",
        "properties": {
            "city": {"type": "string", "description": "城市"},
            "days": {"type": "integer"},
            "options": {
                "type": "object",
                "properties": {"slots": {"type": "array", "items": {"type": "object"}}},
            },
        },
        "required": ["city"],
    },
    source="builtin",
)
NO_ARGS = ToolSpec(
    name="now", description="", parameters={"type": "object", "properties": {}}, source="module:x.y"
)

NESTED_CALL = ToolCall(
    "get_weather",
    {
        "city": TRICKY,
        "days": 3,
        "options": {"slots": [{"from": "09:00", "tags": ["a", {"deep": [1, 2.5, None, True]}]}, {}]},
        "ratio": -0.125,
    },
)
SIMPLE_CALL = ToolCall("now", {})


def dialogue_messages() -> tuple[Message, ...]:
    return (
        Message("system", "You are a helpful assistant with tools."),
        Message("user", f"What is the weather? {TRICKY}"),
        Message("assistant", None, (NESTED_CALL, SIMPLE_CALL), tool_call_ids=("call_a", "call_b")),
        Message(
            "tool",
            json.dumps({"temp": 21, "城市": "東京"}, ensure_ascii=False),
            tool_call_id="call_a",
            name="get_weather",
        ),
        Message("tool", "2025-01-01T09:00", tool_call_id="call_b", name="now"),
        Message("assistant", "It is 21°C in 東京 🌸."),
    )


def make_candidate(**overrides: Any) -> Candidate:
    base: dict[str, Any] = {
        "candidate_id": "c-1",
        "turn_id": "t-1",
        "calls": (NESTED_CALL,),
        "raw_text": f"<tool_call>{TRICKY}</tool_call>",
        "parse_error": None,
        "sampler": "tps",
        "branch_position": 12,
        "branch_token": "東",
        "branch_token_id": 4242,
        "reference_token": "Ky",
        "logprob": -1.25,
        "completion_token_ids": (1, 2, 3, 151645),
    }
    base.update(overrides)
    return Candidate(**base)


def make_pair(**overrides: Any) -> PreferencePair:
    base: dict[str, Any] = {
        "pair_id": "p-1",
        "turn_id": "t-1",
        "prompt": dialogue_messages()[:2],
        "chosen": (Message("assistant", None, (NESTED_CALL,)),),
        "rejected": (Message("assistant", None, (ToolCall("get_weather", {"city": "Kyoto"}),)),),
        "tools": (WEATHER, NO_ARGS),
        "chosen_score": 1.0,
        "rejected_score": 0.6363636363636364,
        "rejected_errors": ("value_mismatch",),
        "branch_position": 7,
        "branch_token": "Ky",
        "chosen_source": "candidate",
        "chosen_logprob": -0.5,
        "rejected_logprob": -2.75,
    }
    base.update(overrides)
    return PreferencePair(**base)


EXAMPLES: dict[str, list[Any]] = {
    "tool_spec": [WEATHER, NO_ARGS],
    "message": [*dialogue_messages(), Message("assistant", "", ()), Message("user", TRICKY, name="名前")],
    "dialogue": [
        Dialogue(
            dialogue_id="d-1",
            seed_id="seed-🌸",
            messages=dialogue_messages(),
            tools=(WEATHER, NO_ARGS),
            scenario=TRICKY,
            provenance={"teacher": "qwen", "seed": 7, "config_hash": "abc", "window": [1, 2, {"x": None}]},
            status="ok",
        ),
        Dialogue(dialogue_id="d-2", seed_id="s", messages=(), tools=(), scenario="", provenance={}),
    ],
    "turn": [
        Turn("t-1", "d-1", 0, dialogue_messages()[:2], (WEATHER, NO_ARGS), (NESTED_CALL, SIMPLE_CALL)),
        Turn("t-2", "d-1", 1, (), (), ()),
    ],
    "candidate": [
        make_candidate(),
        make_candidate(
            candidate_id="c-2",
            calls=(),
            raw_text="not a call \\ 🚀",
            parse_error="Expecting value: line 1 column 1",
            sampler="sequence",
            branch_position=None,
            branch_token=None,
            branch_token_id=None,
            reference_token=None,
            logprob=None,
            completion_token_ids=(),
        ),
    ],
    "scored_candidate": [
        ScoredCandidate(
            make_candidate(),
            esm_score=0.8181818181818182,
            esm_components={"name": 1.0, "required": 1.0, "key": 0.75, "value_type": 1.0, "value": 0.5},
            esm_errors=("value_mismatch", "unknown_key"),
        ),
        ScoredCandidate(make_candidate(candidate_id="c-3", calls=(), logprob=None), 0.0, {}, ("parse",)),
    ],
    "preference_pair": [
        make_pair(),
        make_pair(
            pair_id="p-2",
            chosen_source="reference",
            rejected=(Message("assistant", "garbage ✗ \\n"),),
            rejected_errors=(),
            branch_position=None,
            branch_token=None,
            chosen_logprob=None,
            rejected_logprob=None,
            tools=(),
        ),
    ],
    "rejected_row": [
        reject(
            "d-9",
            "reverse",
            "no_successful_call",
            f"every call failed: {TRICKY}",
            {"seed": 1, "x": [1, "東"]},
        ),
        reject("c-9", "esm", "parse_error", "", make_candidate()),
    ],
}
CLASSES: dict[str, Any] = {
    "tool_spec": ToolSpec,
    "message": Message,
    "dialogue": Dialogue,
    "turn": Turn,
    "candidate": Candidate,
    "scored_candidate": ScoredCandidate,
    "preference_pair": PreferencePair,
    "rejected_row": RejectedRow,
}


# ----------------------------------------------------------------------------------- round-trips


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_parquet_round_trip(name: str, tmp_path: Path) -> None:
    cls, records = CLASSES[name], EXAMPLES[name]
    path = write_parquet(records, tmp_path / "sub" / f"{name}.parquet")
    back = read_parquet(cls, path)
    assert back == records
    assert [type(r) for r in back] == [cls] * len(records)
    meta = pq.read_schema(path).metadata
    assert meta[b"ttpa.record"] == name.encode()
    assert meta[b"ttpa.schema_version"] == b"1"


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_empty_table_keeps_schema(name: str, tmp_path: Path) -> None:
    cls = CLASSES[name]
    path = write_parquet([], tmp_path / "empty.parquet", cls=cls)
    assert read_parquet(cls, path) == []
    with pytest.raises(ValueError, match="cls="):
        to_table([])


def test_read_directory_of_parquet_files(tmp_path: Path) -> None:
    turns = EXAMPLES["turn"]
    write_parquet(turns[:1], tmp_path / "out" / "part-0.parquet")
    write_parquet(turns[1:], tmp_path / "out" / "part-1.parquet")
    assert sorted(read_parquet(Turn, tmp_path / "out"), key=lambda t: t.turn_id) == turns


def test_json_columns_are_json_text() -> None:
    table = to_table(EXAMPLES["turn"])
    assert isinstance(table.schema.field("tools").type, pa.JsonType)
    row = table.to_pylist()[0]
    assert json.loads(row["tools"])[0] == WEATHER.to_openai()
    assert json.loads(row["reference_calls"][0]["arguments"]) == NESTED_CALL.arguments
    assert "東京" in row["context"][1]  # ensure_ascii=False: text stays readable
    assert json.loads(row["context"][1]) == {"role": "user", "content": f"What is the weather? {TRICKY}"}


def test_lists_are_frozen_to_tuples() -> None:
    turn = Turn("t", "d", 0, [Message("user", "hi")], [WEATHER], [SIMPLE_CALL])  # type: ignore[arg-type]
    assert turn.context == (Message("user", "hi"),) and turn.reference_calls == (SIMPLE_CALL,)
    assert make_candidate(completion_token_ids=[5, 6]).completion_token_ids == (5, 6)


def test_to_table_refuses_mixed_record_types() -> None:
    with pytest.raises(TypeError, match="Turn"):
        to_table([EXAMPLES["turn"][0], EXAMPLES["candidate"][0]])


# ------------------------------------------------------------------------------ OpenAI conversion


def test_message_openai_round_trip_and_string_arguments() -> None:
    msg = dialogue_messages()[2]
    obj = msg.to_openai()
    assert obj == {
        "role": "assistant",
        "tool_calls": [
            {
                "id": "call_a",
                "type": "function",
                "function": {"name": "get_weather", "arguments": NESTED_CALL.arguments},
            },
            {"id": "call_b", "type": "function", "function": {"name": "now", "arguments": {}}},
        ],
    }
    assert Message.from_openai(obj) == msg
    as_text = json.loads(json.dumps(obj))
    for call in as_text["tool_calls"]:
        call["function"]["arguments"] = json.dumps(call["function"]["arguments"])
    assert Message.from_openai(as_text) == msg
    bare = {"role": "assistant", "content": None, "tool_calls": [{"name": "now", "arguments": ""}]}
    assert Message.from_openai(bare) == Message("assistant", None, (SIMPLE_CALL,))
    parts = {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
    assert Message.from_openai(parts) == Message("user", "ab")


def test_message_openai_errors() -> None:
    with pytest.raises(RecordError, match=r"'role'.*'robot'"):
        Message.from_openai({"role": "robot", "content": "x"})
    with pytest.raises(RecordError, match=r"tool_calls\[0\].function.arguments.*not valid JSON"):
        Message.from_openai(
            {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{bad"}}]}
        )
    with pytest.raises(RecordError, match="every tool call has an 'id'"):
        Message.from_openai({"role": "assistant", "tool_calls": [{"id": "a", "name": "f"}, {"name": "g"}]})
    with pytest.raises(RecordError, match="role"):
        Message("bot", "x")


def test_tool_spec_openai_forms() -> None:
    wrapped = WEATHER.to_openai()
    assert wrapped["type"] == "function" and wrapped["function"]["name"] == "get_weather"
    assert ToolSpec.from_openai(wrapped, source="builtin") == WEATHER
    assert ToolSpec.from_openai(wrapped["function"], source="builtin") == WEATHER
    assert ToolSpec.from_openai({"name": "now"}, source="module:x.y") == NO_ARGS


@pytest.mark.parametrize(
    ("obj", "pattern"),
    [
        ({"type": "function", "function": {"description": "no name"}}, "ToolSpec field 'function.name'"),
        (
            {"name": "f", "parameters": {"type": "array"}},
            "ToolSpec row 'f' field 'parameters': tool 'f'.*'object'",
        ),
        ({"name": "g", "parameters": "not json"}, "ToolSpec row 'g' field 'parameters'.*not valid JSON"),
        ({"name": "h", "parameters": {"type": "object", "properties": []}}, "tool 'h'.*properties"),
        ({"name": "k", "parameters": {"type": "object", "required": "city"}}, "tool 'k'.*required"),
        ({"name": "m", "description": 3}, "tool 'm'.*string"),
    ],
)
def test_tool_spec_bad_schema_names_the_tool(obj: dict[str, Any], pattern: str) -> None:
    with pytest.raises(RecordError, match=pattern):
        ToolSpec.from_openai(obj)


# ------------------------------------------------------------------------------------ validation


def test_record_error_names_record_field_and_row_id() -> None:
    row = EXAMPLES["turn"][0].to_row()
    with pytest.raises(
        RecordError, match="Turn row 't-1' field 'turn_index': expected an integer, got str"
    ) as info:
        Turn.from_row({**row, "turn_index": "3"})
    assert (info.value.record, info.value.field, info.value.row_id) == ("Turn", "turn_index", "t-1")

    missing = {k: v for k, v in row.items() if k != "dialogue_id"}
    with pytest.raises(RecordError, match="Turn row 't-1' field 'dialogue_id': is missing"):
        Turn.from_row(missing)

    bad_message = {**row, "context": [row["context"][0], json.dumps({"role": 5})]}
    with pytest.raises(RecordError, match=r"Turn row 't-1' field 'context\[1\].role': expected a string"):
        Turn.from_row(bad_message)

    bad_tool = {
        **row,
        "tools": json.dumps([{"type": "function", "function": {"name": "x", "parameters": {}}}]),
        "tool_sources": ["builtin"],
    }
    with pytest.raises(RecordError, match=r"field 'tools\[0\].function.parameters': tool 'x'"):
        Turn.from_row(bad_tool)

    with pytest.raises(RecordError, match="field 'tool_sources': has 0 entries for 2 tools"):
        Turn.from_row({**row, "tool_sources": []})

    with pytest.raises(RecordError, match=r"field 'reference_calls\[0\].name': is missing"):
        Turn.from_row({**row, "reference_calls": [{"arguments": "{}"}]})


def test_record_error_for_each_record_type() -> None:
    cases: list[tuple[type[Any], dict[str, Any], str, str]] = [
        (Candidate, EXAMPLES["candidate"][0].to_row(), "sampler", "Candidate row 'c-1' field 'sampler'"),
        (Candidate, EXAMPLES["candidate"][0].to_row(), "logprob", "Candidate row 'c-1' field 'logprob'"),
        (
            ScoredCandidate,
            EXAMPLES["scored_candidate"][0].to_row(),
            "esm_score",
            "ScoredCandidate row 'c-1' field 'esm_score'",
        ),
        (
            ScoredCandidate,
            EXAMPLES["scored_candidate"][0].to_row(),
            "branch_token_id",
            "ScoredCandidate row 'c-1' field 'branch_token_id'",
        ),
        (
            PreferencePair,
            make_pair().to_row(),
            "chosen_source",
            "PreferencePair row 'p-1' field 'chosen_source'",
        ),
        (Dialogue, EXAMPLES["dialogue"][0].to_row(), "provenance", "Dialogue row 'd-1' field 'provenance'"),
        (RejectedRow, EXAMPLES["rejected_row"][0].to_row(), "stage", "RejectedRow row 'd-9' field 'stage'"),
        (ToolSpec, WEATHER.to_row(), "source", "ToolSpec row 'get_weather' field 'source'"),
        (Message, Message("user", "x").to_row(), "role", "Message field 'role'"),
    ]
    for cls, row, field, pattern in cases:
        with pytest.raises(RecordError, match=pattern):
            cls.from_row({**row, field: [1]})


def test_optional_columns_may_be_null_but_not_missing() -> None:
    row = make_candidate().to_row()
    assert Candidate.from_row({**row, "logprob": None}).logprob is None
    with pytest.raises(RecordError, match="Candidate row 'c-1' field 'logprob': is missing"):
        Candidate.from_row({k: v for k, v in row.items() if k != "logprob"})
    with pytest.raises(RecordError, match="Message field 'tool_call_id': is missing"):
        Message.from_row({k: v for k, v in Message("user", "x").to_row().items() if k != "tool_call_id"})
    # the ref log-prob columns alone may be absent: they are written only when set
    pair_row = {k: v for k, v in make_pair().to_row().items() if not k.startswith("ref_")}
    assert PreferencePair.from_row(pair_row) == make_pair()


def test_from_table_locates_rows_without_an_id() -> None:
    table = to_table(EXAMPLES["candidate"])
    index = table.schema.get_field_index("candidate_id")
    broken = table.set_column(index, "candidate_id", pa.array(["c-1", None]))
    with pytest.raises(RecordError, match="Candidate row #1 field 'candidate_id': is null"):
        from_table(Candidate, broken)


def test_schema_mismatch_names_both(tmp_path: Path) -> None:
    path = write_parquet(EXAMPLES["turn"], tmp_path / "turns.parquet")
    with pytest.raises(
        SchemaMismatchError, match="expected a 'candidate' table of schema version 1, got a 'turn'"
    ):
        read_parquet(Candidate, path)
    table = to_table(EXAMPLES["turn"])
    future = table.replace_schema_metadata({**table.schema.metadata, b"ttpa.schema_version": b"2"})
    with pytest.raises(
        SchemaMismatchError, match="'turn' table of schema version 1, got a 'turn' table of schema version 2"
    ):
        from_table(Turn, future)
    # an untagged table (metadata dropped by some tool) is validated row by row instead
    assert from_table(Turn, table.replace_schema_metadata(None)) == EXAMPLES["turn"]


def test_reject_helper() -> None:
    row = reject(
        "x-1", "tps", "parse_error", "bad", {"ids": np.arange(3), "v": np.float32(0.5), "b": b"\xff"}
    )
    assert row.payload_object() == {"ids": [0, 1, 2], "v": 0.5, "b": "\ufffd"}
    assert EXAMPLES["rejected_row"][1].payload_object() == make_candidate().to_row()
    with pytest.raises(ValueError, match="snake_case"):
        reject("x", "tps", "Parse failed!", "", {})


# ------------------------------------------------------------------------------------ Ray batches


@pytest.mark.parametrize("name", ["candidate", "scored_candidate", "preference_pair", "turn", "dialogue"])
def test_batch_helpers_on_ray_batch_formats(name: str) -> None:
    from ray.data.block import BlockAccessor  # Ray's own conversion for map_batches; no cluster needed

    cls, records = CLASSES[name], EXAMPLES[name]
    table = to_table(records)
    for batch_format in ("pyarrow", "numpy", "pandas"):
        batch = BlockAccessor.for_block(table).to_batch_format(batch_format)
        rows = rows_from_batch(batch)
        assert [cls.from_row(r) for r in rows] == records, batch_format
        rebuilt = batch_from_rows(rows, cls.SCHEMA)
        assert rebuilt.schema.metadata == cls.SCHEMA.metadata
        assert from_table(cls, rebuilt) == records, batch_format


def test_rows_from_hand_built_numpy_batch() -> None:
    batch = {
        "candidate_id": np.array(["a", "b"], dtype=object),
        "turn_id": np.array(["t", "t"]),
        "calls": np.array(
            [np.array([{"name": "now", "arguments": "{}"}], dtype=object), np.array([], dtype=object)],
            dtype=object,
        ),
        "raw_text": np.array(["x", "y"], dtype=object),
        "parse_error": np.array([None, "bad"], dtype=object),
        "sampler": np.array(["tps", "sequence"], dtype=object),
        "branch_position": np.array([3.0, np.nan]),  # a nullable int column, as numpy gives it
        "branch_token": np.array(["a", None], dtype=object),
        "branch_token_id": np.array([17, 18], dtype=np.int64),
        "reference_token": np.array(["b", None], dtype=object),
        "logprob": np.array([-0.5, np.nan]),
        "completion_token_ids": np.array([[1, 2], [3, 4]], dtype=np.int64),
    }
    rows = rows_from_batch(batch)
    assert rows[1]["branch_position"] is None and rows[1]["logprob"] is None
    assert type(rows[0]["branch_token_id"]) is int and rows[0]["completion_token_ids"] == [1, 2]
    cands = [Candidate.from_row(r) for r in rows]
    assert cands[0] == Candidate("a", "t", (SIMPLE_CALL,), "x", None, "tps", 3, "a", 17, "b", -0.5, (1, 2))
    assert cands[1].branch_position is None and cands[1].logprob is None and cands[1].calls == ()
    table = batch_from_rows([c.to_row() for c in cands], Candidate.SCHEMA)
    assert from_table(Candidate, table) == cands


def test_batch_from_rows_reports_missing_keys() -> None:
    row = make_candidate().to_row()
    del row["sampler"]
    with pytest.raises(RecordError, match="candidate row #0 field 'sampler'"):
        batch_from_rows([row], Candidate.SCHEMA)
    with pytest.raises(TypeError, match="unsupported batch"):
        rows_from_batch([row])


# -------------------------------------------------------------------------------------- hypothesis

_text = st.text(st.characters(codec="utf-8"), max_size=12)
_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | _text
)
_json = st.recursive(
    _scalars,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(_text, children, max_size=3),
    max_leaves=12,
)
_calls = st.builds(ToolCall, name=_text.filter(bool), arguments=st.dictionaries(_text, _json, max_size=4))
_opt_text = st.none() | _text


@st.composite
def _messages(draw: st.DrawFn) -> Message:
    role = draw(st.sampled_from(["system", "user", "assistant", "tool"]))
    calls: tuple[ToolCall, ...] = ()
    ids: tuple[str, ...] = ()
    if role == "assistant":
        calls = tuple(draw(st.lists(_calls, max_size=3)))
        with_ids: bool = draw(st.booleans())
        if calls and with_ids:
            ids = tuple(draw(st.lists(_text, min_size=len(calls), max_size=len(calls))))
    return Message(role, draw(_opt_text), calls, draw(_opt_text), draw(_opt_text), ids)


_tools = st.builds(
    ToolSpec,
    name=_text.filter(bool),
    description=_text,
    parameters=st.fixed_dictionaries(
        {
            "type": st.just("object"),
            "properties": st.dictionaries(_text, st.dictionaries(_text, _json, max_size=2), max_size=3),
        }
    ),
    source=_text,
)
_message_tuples = st.lists(_messages(), max_size=4).map(tuple)
_opt_float = st.none() | st.floats(allow_nan=False)
_turns = st.builds(
    Turn,
    turn_id=_text,
    dialogue_id=_text,
    turn_index=st.integers(0, 2**40),
    context=_message_tuples,
    tools=st.lists(_tools, max_size=3).map(tuple),
    reference_calls=st.lists(_calls, max_size=3).map(tuple),
)
_pairs = st.builds(
    PreferencePair,
    pair_id=_text,
    turn_id=_text,
    prompt=_message_tuples,
    chosen=_message_tuples,
    rejected=_message_tuples,
    tools=st.lists(_tools, max_size=2).map(tuple),
    chosen_score=st.floats(allow_nan=False),
    rejected_score=st.floats(allow_nan=False),
    rejected_errors=st.lists(_text, max_size=3).map(tuple),
    branch_position=st.none() | st.integers(0, 10**6),
    branch_token=_opt_text,
    chosen_source=st.sampled_from(["candidate", "reference"]),
    chosen_logprob=_opt_float,
    rejected_logprob=_opt_float,
    ref_chosen_logps=_opt_float,
)
_candidates = st.builds(
    Candidate,
    candidate_id=_text,
    turn_id=_text,
    calls=st.lists(_calls, max_size=3).map(tuple),
    raw_text=_text,
    parse_error=_opt_text,
    sampler=st.sampled_from(["tps", "sequence"]),
    branch_position=st.none() | st.integers(0, 10**6),
    branch_token=_opt_text,
    branch_token_id=st.none() | st.integers(0, 2**31),
    reference_token=_opt_text,
    logprob=_opt_float,
    completion_token_ids=st.lists(st.integers(0, 2**31), max_size=8).map(tuple),
)


def _through_parquet(cls: type[Any], records: list[Any]) -> list[Any]:
    buf = io.BytesIO()
    pq.write_table(to_table(records), buf)
    buf.seek(0)
    return from_table(cls, pq.read_table(buf))


_fast = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_fast
@given(st.lists(_messages(), min_size=1, max_size=4))
def test_hypothesis_message_round_trip(messages: list[Message]) -> None:
    assert _through_parquet(Message, messages) == messages
    assert [Message.from_openai(json.loads(json.dumps(m.to_openai()))) for m in messages] == messages


@_fast
@given(st.lists(_turns, min_size=1, max_size=3))
def test_hypothesis_turn_round_trip(turns: list[Turn]) -> None:
    assert _through_parquet(Turn, turns) == turns


@_fast
@given(_pairs)
def test_hypothesis_pair_round_trip(pair: PreferencePair) -> None:
    # ref log-probs are all-or-none per table, so one pair per table
    assert _through_parquet(PreferencePair, [pair]) == [pair]


@_fast
@given(st.lists(_candidates, min_size=1, max_size=3))
def test_hypothesis_candidate_round_trip_through_numpy_batches(cands: list[Candidate]) -> None:
    from ray.data.block import BlockAccessor

    batch = BlockAccessor.for_block(to_table(cands)).to_batch_format("numpy")
    assert [Candidate.from_row(r) for r in rows_from_batch(batch)] == cands


# ------------------------------------------------------------------------------------------- TRL

# Qwen2.5-style template: tools as `tool | tojson`, call arguments as `arguments | tojson`.
QWEN_LIKE_TEMPLATE = """
{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}{{- messages[0].content }}
    {%- else %}{{- 'You are helpful.' }}{%- endif %}
    {{- '\n\n# Tools\n\n<tools>' }}
    {%- for tool in tools %}{{- '\n' }}{{- tool | tojson }}{%- endfor %}
    {{- '\n</tools><|im_end|>\n' }}
{%- elif messages[0].role == 'system' %}
    {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == 'user' or (message.role == 'system' and not loop.first)
        or (message.role == 'assistant' and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}
    {%- elif message.role == 'assistant' %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}{{- '\n' + message.content }}{%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}
            {{- '\n<tool_call>\n{"name": "' + tool_call.name + '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == 'tool' %}
        {{- '<|im_start|>user\n<tool_response>\n' + message.content + '\n</tool_response><|im_end|>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}
"""


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    """A byte-level tokenizer (any text encodes) with a Qwen-like tool-calling chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    core = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tok.chat_template = QWEN_LIKE_TEMPLATE
    return tok


def _pairs_dataset(tmp_path: Path, pairs: list[PreferencePair]) -> Any:
    import datasets

    path = write_parquet(pairs, tmp_path / "pairs.parquet")
    return datasets.Dataset.from_parquet(str(path), cache_dir=str(tmp_path / "hf-cache"))


def test_pairs_parquet_is_a_trl_conversational_preference_dataset(tmp_path: Path, tokenizer: Any) -> None:
    from trl.data_utils import is_conversational, maybe_apply_chat_template

    pairs = EXAMPLES["preference_pair"]
    ds = _pairs_dataset(tmp_path, pairs)
    row = ds[0]
    # datasets decodes the JSON columns: exact OpenAI message dicts, arguments as dicts, tools as a list
    assert row["prompt"] == [m.to_openai() for m in pairs[0].prompt]
    assert row["chosen"][0]["tool_calls"][0]["function"]["arguments"] == NESTED_CALL.arguments
    assert "tool_calls" not in row["prompt"][1]  # no null keys padded in
    assert row["tools"] == [WEATHER.to_openai(), NO_ARGS.to_openai()]
    assert "ref_chosen_logps" not in row  # all null: omitted so TRL's collator never sees None
    assert PreferencePair.from_row(row) == pairs[0]  # datasets rows read back too
    assert is_conversational(row)

    out = maybe_apply_chat_template(
        {k: row[k] for k in ("prompt", "chosen", "rejected")}, tokenizer, tools=row["tools"]
    )
    rendered_args = json.dumps(NESTED_CALL.arguments, ensure_ascii=False)
    assert out["chosen"] == (
        f'<tool_call>\n{{"name": "get_weather", "arguments": {rendered_args}}}\n</tool_call><|im_end|>\n'
    )
    assert '"arguments": "' not in out["chosen"]  # not double-encoded
    assert out["prompt"].endswith("<|im_start|>assistant\n")
    assert json.dumps(WEATHER.to_openai(), ensure_ascii=False) in out["prompt"]
    assert '"source"' not in out["prompt"]


def test_trl_dpo_trainer_tokenizes_pairs_as_is(tmp_path: Path, tokenizer: Any) -> None:
    """Run the installed DPOTrainer's own dataset preparation on the Parquet file, unchanged."""
    from trl.trainer.dpo_trainer import DPOTrainer

    pairs = [
        make_pair(ref_chosen_logps=-3.5, ref_rejected_logps=-4.25),
        make_pair(pair_id="p-2", tools=(), ref_chosen_logps=-1.0, ref_rejected_logps=-2.0),
    ]
    ds = _pairs_dataset(tmp_path, pairs)
    assert ds[0]["ref_chosen_logps"] == -3.5
    args = types.SimpleNamespace(dataset_num_proc=None, max_length=None, truncation_mode="keep_start")
    trainer_stub = types.SimpleNamespace(_tokenizer=tokenizer)
    prepared = DPOTrainer._prepare_dataset(trainer_stub, ds, tokenizer, args, "train")  # type: ignore[arg-type]
    first = prepared[0]
    prompt_text = tokenizer.apply_chat_template(
        [m.to_openai() for m in pairs[0].prompt],
        tools=[t.to_openai() for t in pairs[0].tools],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert tokenizer.decode(first["prompt_ids"]) == prompt_text
    chosen_text = tokenizer.decode(first["chosen_ids"])
    assert json.dumps(NESTED_CALL.arguments, ensure_ascii=False) in chosen_text
    assert '"city": "Kyoto"' in tokenizer.decode(first["rejected_ids"])
    assert "<tools>" not in tokenizer.decode(prepared[1]["prompt_ids"])  # tools=() renders no tool block


def test_ref_logps_all_or_none() -> None:
    assert "ref_chosen_logps" not in to_table([make_pair()]).column_names
    both = to_table([make_pair(ref_chosen_logps=-1.0, ref_rejected_logps=-2.0)])
    assert both.column("ref_chosen_logps").to_pylist() == [-1.0]
    assert both.column("ref_rejected_logps").to_pylist() == [-2.0]
    with pytest.raises(RecordError, match=r"ref_chosen_logps.*set on 1 rows and null on 1"):
        to_table([make_pair(ref_chosen_logps=-1.0), make_pair(pair_id="p-2")])
    nan_pair = PreferencePair.from_row({**make_pair().to_row(), "chosen_logprob": math.nan})
    assert nan_pair.chosen_logprob is None  # NaN is how numpy/pandas batches spell a null optional
