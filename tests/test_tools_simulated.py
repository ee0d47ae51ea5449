"""Simulated tools: the catalogue loaders, the response check and the (tool, canonical arguments) cache.

The writer here is a small deterministic function that builds its response from its inputs; it is
not a stand-in for an LLM's behaviour (the teacher writes responses in the reverse stage, tested in
test_reverse.py on a real engine), it makes the cache's behaviour observable: how often a response
is written, and from what.
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
    cache_path = tmp_path / "cache"
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


def test_the_cache_folder_on_a_bucket_keeps_the_first_response_of_each_call(s3_server: str) -> None:
    """Part files on a real S3 server: each flush adds one, a reload answers as before, the first
    response stored for a call is the one kept."""
    from conftest import make_bucket

    folder = make_bucket("sim-cache") + "/run/reverse/simulated"
    first = SimulatedCache(folder)
    assert first.put("lookup", {"q": "a", "n": 1}, '{"found": 1}') == '{"found": 1}'
    assert first.put("lookup", {"n": 1.0, "q": "a"}, '{"found": 2}') == '{"found": 1}'  # same call
    assert first.flush() == 1 and first.flush() == 0
    first.put("lookup", {"q": "b"}, '{"found": 3}')
    assert first.flush() == 1
    again = SimulatedCache(folder)
    assert again.size() == 2 and again.get("lookup", {"q": "a", "n": 1}) == '{"found": 1}'
    assert again.responses("lookup") == ['{"found": 1}', '{"found": 3}']


def test_bfcl_simulated_is_bfcl_without_the_code_and_real_responses_fit_its_schemas() -> None:
    """The same tools as the executable environments, with the docs' response schemas; a real
    environment's responses pass them (so the schema mapping is right), a wrong one does not."""
    from ttpa_ray.tools.simulated import check_response

    simulated = load_catalogue("bfcl-simulated")
    executable = load_catalogue("bfcl")
    assert simulated.names == executable.names and len(simulated) > 100
    assert {s.source for s in simulated.tools()} >= {
        "simulated:bfcl:GorillaFileSystem",
        "simulated:bfcl:MathAPI",
    }
    real_calls = [("ls", {}), ("pwd", {}), ("add", {"a": 2, "b": 3}), ("mean", {"numbers": [1, 2, 4]})]
    with ToolRegistry(executable, isolated=False) as run, ToolRegistry(simulated, isolated=False) as sim:
        for name, arguments in real_calls:
            result = run.call(name, arguments)
            assert result.ok, result
            tool = sim.simulated_tool(name)
            assert tool is not None and tool.response_schema is not None
            assert check_response(tool, json.dumps(result.content)) == (result.content, None)
    content, problem = check_response(sim.simulated_tool("add"), '{"result": "five"}')
    assert content is None and problem == (
        "the simulated response of 'add' fails its schema at result: 'five' is not of type 'number'"
    )


def test_written_responses_are_checked_and_only_valid_ones_cached(tmp_path: Path) -> None:
    """A response that fails the tool's response schema or is not JSON is a tool error and not
    cached; ``{"error": ...}`` is the tool reporting a failure: cached, and the same every time."""
    path = tmp_path / "tools.json"
    entry = {
        "name": "room_price",
        "parameters": {"type": "object", "properties": {"room": {"type": "string"}}, "required": ["room"]},
        "response": {"type": "object", "properties": {"price": {"type": "number"}}, "required": ["price"]},
    }
    path.write_text(json.dumps([entry]), encoding="utf-8")

    class Scripted:
        def __init__(self, texts: list[str]) -> None:
            self.texts = texts

        def write(self, tool_spec: ToolSpec, arguments: Mapping[str, Any], examples: Sequence[str]) -> str:
            return self.texts.pop(0)

    writer = Scripted(['{"price": "cheap"}', "not json", '{"price": 80}', '{"error": "no such room"}'])
    with ToolRegistry(load_catalogue(path), writer=writer) as registry:
        wrong = registry.call("room_price", {"room": "single"})
        broken = registry.call("room_price", {"room": "single"})
        good = registry.call("room_price", {"room": "single"})
        again = registry.call("room_price", {"room": "single"})
        missing = registry.call("room_price", {"room": "suite"})
        missing_again = registry.call("room_price", {"room": "suite"})
        assert registry.simulated.cache.size() == 2
    assert not wrong.ok and "fails its schema at price: 'cheap' is not of type 'number'" in str(wrong.error)
    assert not broken.ok and "is not JSON" in str(broken.error)
    assert good.ok and good.content == {"price": 80} and again.content == good.content
    assert not missing.ok and missing.error == missing_again.error == "no such room"
    assert writer.texts == []


def test_a_response_that_restates_the_schema_is_a_tool_error_and_not_cached(tmp_path: Path) -> None:
    """A schema-only tool with no response schema: the writer restating the parameters' schema (seen
    from the 135M teacher) is not an answer."""
    path = tmp_path / "tools.json"
    entry = {
        "name": "web_lookup",
        "parameters": {"type": "object", "properties": {"query": {"type": "string"}}},
    }
    path.write_text(json.dumps([entry]), encoding="utf-8")
    texts = ['{"query": {"type": ["string", "description"]}}', '{"title": "Lyon", "type": "city"}']

    class Scripted:
        def write(self, tool_spec: ToolSpec, arguments: Mapping[str, Any], examples: Sequence[str]) -> str:
            return texts.pop(0)

    with ToolRegistry(load_catalogue(path), writer=Scripted()) as registry:
        restated = registry.call("web_lookup", {"query": "lyon"})
        assert registry.simulated.cache.size() == 0
        answered = registry.call("web_lookup", {"query": "lyon"})
        assert registry.simulated.cache.size() == 1
    assert not restated.ok and "restates a schema at query.type" in str(restated.error)
    assert answered.ok and answered.content == {"title": "Lyon", "type": "city"}


def test_a_bad_response_schema_is_a_load_error_naming_the_tool(tmp_path: Path) -> None:
    path = tmp_path / "tools.json"
    good = {"name": "lookup", "parameters": {"type": "object", "properties": {}}}
    bad = {**good, "name": "broken", "response": {"type": "dict"}}
    path.write_text(json.dumps([good, bad]), encoding="utf-8")
    tools, errors = load_simulated_catalogue(path)
    assert [t.spec.name for t in tools] == ["lookup"]
    assert [(e.function, e.message.split(":")[0]) for e in errors] == [("broken", "bad response schema")]


def test_training_on_simulated_tools_the_evaluation_uses_is_refused() -> None:
    """BFCL's travel and trading environments share tool names with its AST categories."""
    from ttpa_ray.config import ConfigError, load_config

    with pytest.raises(ConfigError) as refused:
        load_config(None, ["reverse.catalogue=bfcl-simulated:TravelAPI,GorillaFileSystem"])
    (line,) = [line for line in str(refused.value).splitlines() if "book_flight" in line]  # one line
    assert "simulates 1 tool(s) that eval.categories" in line and "also evaluate (book_flight)" in line
    fine = load_config(None, ["reverse.catalogue=bfcl-simulated:GorillaFileSystem,TicketAPI"])
    assert fine.reverse.catalogue == "bfcl-simulated:GorillaFileSystem,TicketAPI"
    narrowed = load_config(
        None, ["reverse.catalogue=bfcl-simulated:TravelAPI", "eval.categories=[irrelevance]"]
    )
    assert narrowed.eval.categories == ["irrelevance"]
