"""Simulated tools: the ToolBench-style catalogue loader and the (tool, canonical arguments) cache.

The writer here is a small deterministic function that builds its response from its inputs; it is
not a stand-in for an LLM's behaviour (the LLM writer lands with the reverse stage), it makes the
cache's behaviour observable: how often a response is written, and from what.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from ttpa_ray.records import ToolSpec
from ttpa_ray.tools.registry import ToolRegistry, load_catalogue
from ttpa_ray.tools.simulated import SimulatedCache, load_simulated_catalogue, standardize

TOOLBENCH = {
    "tool_name": "Open Weather Map",
    "tool_description": "Weather data for any place.",
    "api_list": [
        {
            "name": "Current Weather Data",
            "description": "Current weather of a city.",
            "method": "GET",
            "required_parameters": [
                {"name": "q", "type": "STRING", "description": "City name", "default": "London"}
            ],
            "optional_parameters": [
                {
                    "name": "units",
                    "type": "ENUM",
                    "description": "standard, metric or imperial",
                    "default": "metric",
                },
                {"name": "cnt", "type": "NUMBER", "description": "Result count", "default": ""},
                {"name": "lat_lon", "type": "GEOPOINT (latitude, longitude)", "description": "Position"},
            ],
            "test_endpoint": {"weather": [{"main": "Clouds"}], "name": "London"},
        },
        {
            "name": "Upload Map",
            "description": "Upload a map file.",
            "required_parameters": [{"name": "file", "type": "BINARY BLOB", "description": "The file"}],
            "optional_parameters": [],
        },
    ],
}


class RecordingWriter:
    """Deterministic writer: the response restates the tool, the arguments and how many examples it saw."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any], list[str]]] = []

    def write(self, tool_spec: ToolSpec, arguments: Mapping[str, Any], examples: Sequence[str]) -> str:
        self.calls.append((tool_spec.name, dict(arguments), list(examples)))
        return json.dumps({"tool": tool_spec.name, "arguments": dict(arguments), "call": len(self.calls)})


@pytest.fixture
def catalogue_file(tmp_path: Path) -> Path:
    path = tmp_path / "open_weather.json"
    path.write_text(json.dumps(TOOLBENCH), encoding="utf-8")
    return path


def test_toolbench_apis_become_tools_and_a_bad_type_is_a_load_error(catalogue_file: Path) -> None:
    tools, errors = load_simulated_catalogue(catalogue_file)
    (tool,) = tools
    assert tool.spec.name == "current_weather_data_for_open_weather_map"
    assert tool.spec.parameters == {
        "type": "object",
        "properties": {
            "q": {"type": "string", "description": "City name", "examples": ["London"]},
            "units": {"type": "string", "description": "standard, metric or imperial", "default": "metric"},
            "cnt": {"type": "number", "description": "Result count"},
            "lat_lon": {"type": "string", "description": "Position"},
        },
        "required": ["q"],
    }
    assert tool.spec.source == "simulated:open_weather_map"
    assert json.loads(tool.examples[0]) == TOOLBENCH["api_list"][0]["test_endpoint"]
    (error,) = errors
    assert error.function == "Open Weather Map/Upload Map"
    assert error.message == "parameter 'file' has unknown type 'BINARY BLOB'"
    assert standardize("3D Models!") == "get_3d_models"


def test_openai_function_lists_load_too(tmp_path: Path) -> None:
    path = tmp_path / "functions.json"
    good = {
        "type": "function",
        "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}},
    }
    bad = {"name": "broken", "parameters": {"type": "object", "properties": {"x": {"type": "dict"}}}}
    path.write_text(json.dumps([{**good, "examples": ['{"found": true}']}, bad]), encoding="utf-8")
    tools, errors = load_simulated_catalogue(path)
    assert [tool.spec.name for tool in tools] == ["lookup"] and tools[0].examples == ('{"found": true}',)
    assert [error.function for error in errors] == ["broken"]


def test_a_repeated_call_answers_the_same_from_the_cache(catalogue_file: Path) -> None:
    writer = RecordingWriter()
    name = "current_weather_data_for_open_weather_map"
    with ToolRegistry(load_catalogue(catalogue_file), writer=writer) as registry:
        first = registry.call(name, {"q": "Paris", "cnt": 1})
        again = registry.call(name, {"cnt": 1.0, "q": "Paris"})  # other key order, 1.0 == 1
        other = registry.call(name, {"q": "Rome"})
    assert first.ok and first.content == {"tool": name, "arguments": {"q": "Paris", "cnt": 1}, "call": 1}
    assert again.content == first.content
    assert other.content["call"] == 2
    assert len(writer.calls) == 2
    # The writer sees the catalogue's example, then earlier responses of the same tool.
    assert len(writer.calls[0][2]) == 1 and json.loads(writer.calls[0][2][0])["name"] == "London"
    assert writer.calls[1][2][1] == json.dumps(first.content)


def test_invalid_arguments_never_reach_the_writer(catalogue_file: Path) -> None:
    writer = RecordingWriter()
    with ToolRegistry(load_catalogue(catalogue_file), writer=writer) as registry:
        result = registry.call("current_weather_data_for_open_weather_map", {"city": "Paris"})
    assert not result.ok and result.error is not None
    assert result.error.startswith("missing required argument 'q', unknown argument 'city'")
    assert writer.calls == []


def test_the_cache_file_answers_in_a_later_run_without_a_writer(catalogue_file: Path, tmp_path: Path) -> None:
    cache_path = tmp_path / "cache" / "responses.jsonl"
    name = "current_weather_data_for_open_weather_map"
    with ToolRegistry(
        load_catalogue(catalogue_file), writer=RecordingWriter(), cache=SimulatedCache(cache_path)
    ) as r:
        written = r.call(name, {"q": "Oslo"})
    with ToolRegistry(load_catalogue(catalogue_file), cache=SimulatedCache(cache_path)) as later:
        cached = later.call(name, {"q": "Oslo"})
        missing = later.call(name, {"q": "Lima"})
    assert cached.ok and cached.content == written.content
    assert (
        not missing.ok and missing.error is not None and "no response writer is configured" in missing.error
    )
    assert len(SimulatedCache(cache_path)) == 1


def test_a_failing_writer_is_a_tool_error(catalogue_file: Path) -> None:
    class FailingWriter:
        def write(self, tool_spec: ToolSpec, arguments: Mapping[str, Any], examples: Sequence[str]) -> str:
            raise TimeoutError("replica busy")

    with ToolRegistry(load_catalogue(catalogue_file), writer=FailingWriter()) as registry:
        result = registry.call("current_weather_data_for_open_weather_map", {"q": "Paris"})
    assert not result.ok
    assert result.error == (
        "the response writer failed for 'current_weather_data_for_open_weather_map': "
        "TimeoutError: replica busy"
    )
