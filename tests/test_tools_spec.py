"""Argument validation, schema checks, JSON conversion and truncation shared by every tool source."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from ttpa_ray.records import ToolSpec
from ttpa_ray.tools.spec import (
    ToolResult,
    check_parameters_schema,
    describe_parameters,
    to_json_compatible,
    truncate_content,
    validate_arguments,
)

WEATHER = ToolSpec(
    name="get_weather",
    description="Weather of a city on a day.",
    parameters={
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "date": {"type": "string", "description": "Date as YYYY-MM-DD."},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        },
        "required": ["city", "date"],
    },
)

TYPED = ToolSpec(
    name="typed",
    parameters={
        "type": "object",
        "properties": {
            "count": {"type": "integer"},
            "ratio": {"type": "number"},
            "flag": {"type": "boolean"},
            "tags": {"type": "array", "items": {"type": "string"}},
            "limit": {"type": "integer", "nullable": True},
            "point": {"type": "object", "properties": {"x": {"type": "number"}}, "required": ["x"]},
            "anything": {"type": "any"},
        },
    },
)


def test_missing_required_names_the_argument_the_tool_and_what_it_expects() -> None:
    message = validate_arguments(WEATHER, {"date": "2026-01-02"})
    assert message == (
        "missing required argument 'city' for get_weather; expected: city (string), "
        "date (string, YYYY-MM-DD), unit (string, optional, one of celsius|fahrenheit)"
    )


def test_valid_arguments_pass() -> None:
    assert validate_arguments(WEATHER, {"city": "Paris", "date": "2026-01-02", "unit": "celsius"}) is None
    assert validate_arguments(TYPED, {"count": 3, "ratio": 2, "flag": False, "limit": None}) is None
    assert (
        validate_arguments(TYPED, {"tags": ["a"], "point": {"x": 1.5}, "anything": [1, {"b": None}]}) is None
    )


def test_a_bool_is_not_an_integer_nor_a_number() -> None:
    assert "argument 'count' must be integer, got boolean (true)" in str(
        validate_arguments(TYPED, {"count": True})
    )
    assert "argument 'ratio' must be number, got boolean (false)" in str(
        validate_arguments(TYPED, {"ratio": False})
    )
    assert "must be integer, got number (2.5)" in str(validate_arguments(TYPED, {"count": 2.5}))
    assert "must be boolean, got integer (1)" in str(validate_arguments(TYPED, {"flag": 1}))


def test_unknown_key_enum_nested_and_non_object_arguments() -> None:
    message = str(validate_arguments(WEATHER, {"city": "Paris", "date": "2026-01-02", "town": "x"}))
    assert message.startswith("unknown argument 'town' for get_weather; expected: city (string)")
    message = str(validate_arguments(WEATHER, {"city": "Paris", "date": "d", "unit": "kelvin"}))
    assert 'argument \'unit\' must be one of "celsius", "fahrenheit", got "kelvin"' in message
    assert "argument 'tags[1]' must be string, got integer (2)" in str(
        validate_arguments(TYPED, {"tags": ["a", 2]})
    )
    assert "argument 'point' is missing required key 'x'" in str(validate_arguments(TYPED, {"point": {}}))
    assert str(validate_arguments(WEATHER, ["Paris"])).startswith(
        "arguments for get_weather must be a JSON object"
    )


def test_several_problems_are_reported_together() -> None:
    message = str(validate_arguments(WEATHER, {"town": "Paris", "unit": 3}))
    assert "missing required argument 'city'" in message
    assert "missing required argument 'date'" in message
    assert "unknown argument 'town'" in message
    assert "argument 'unit' must be string" in message


def test_describe_parameters_of_a_tool_without_arguments() -> None:
    assert describe_parameters({"type": "object", "properties": {}}) == "no arguments"


def test_schema_check_finds_unknown_types_and_dangling_required() -> None:
    assert check_parameters_schema(WEATHER.parameters) == []
    assert check_parameters_schema(TYPED.parameters) == []
    problems = check_parameters_schema(
        {"type": "object", "properties": {"a": {"type": "dict"}, "b": {}}, "required": ["c"]}
    )
    assert any("parameter 'a' has unknown type \"dict\"" in p for p in problems)
    assert any("parameter 'b' has no type" in p for p in problems)
    assert any("required 'c' is not among the properties" in p for p in problems)
    assert check_parameters_schema({"type": "dict"}) == ["parameters must have type 'object', got \"dict\""]
    assert check_parameters_schema([]) == ["parameters must be a JSON object schema, got array"]


@dataclass
class _Point:
    x: int
    y: int


def test_to_json_compatible_makes_plain_json() -> None:
    converted = to_json_compatible(
        {"t": (1, 2), "s": {"b", "a"}, 3: _Point(1, 2), "inf": math.inf, "obj": object}
    )
    assert converted["t"] == [1, 2]
    assert converted["s"] == ["a", "b"]
    assert converted["3"] == {"x": 1, "y": 2}
    assert converted["inf"] == "inf"
    assert converted["obj"] == "<class 'object'>"
    json.dumps(converted, allow_nan=False)


def test_truncation_keeps_small_content_and_cuts_large_content_with_a_marker() -> None:
    assert truncate_content({"a": 1}, 100) == ({"a": 1}, False)
    content, truncated = truncate_content({"text": "z" * 500}, 100)
    assert truncated
    assert isinstance(content, str)
    assert content.startswith('{"text": "zzz')
    assert content.endswith(f"... [truncated {len(json.dumps({'text': 'z' * 500})) - 100} characters]")


def test_tool_result_message_content() -> None:
    assert ToolResult(ok=True, content={"a": 1}).to_message_content() == '{"a": 1}'
    assert ToolResult(ok=True, content="plain").to_message_content() == "plain"
    assert json.loads(ToolResult.failure("boom").to_message_content()) == {"error": "boom"}


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=200, deadline=None)
@given(arguments=_json)
def test_validation_never_raises_on_any_json(arguments: object) -> None:
    result = validate_arguments(TYPED, arguments)
    assert result is None or (isinstance(result, str) and "typed" in result and "; expected: count" in result)


@settings(max_examples=100, deadline=None)
@given(
    count=st.integers(),
    ratio=st.integers() | st.floats(allow_nan=False, allow_infinity=False),
    flag=st.booleans(),
    tags=st.lists(st.text(max_size=4), max_size=4),
)
def test_well_typed_arguments_always_pass(count: int, ratio: float, flag: bool, tags: list[str]) -> None:
    assert validate_arguments(TYPED, {"count": count, "ratio": ratio, "flag": flag, "tags": tags}) is None
