"""BFCL's executable environments as tools: specs, per-dialogue state, isolation, and both error forms."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest

from ttpa_ray.tools.bfcl_envs import BFCL_CLASSES, find_scenario, load_scenarios
from ttpa_ray.tools.registry import ToolRegistry, load_catalogue
from ttpa_ray.tools.sandbox import SandboxConfig, SandboxPool


@pytest.fixture(scope="module")
def registry() -> Iterator[ToolRegistry]:
    with ToolRegistry(load_catalogue("bfcl"), SandboxConfig(workers=2, timeout_s=5)) as reg:
        yield reg


def _types(schema: Any) -> list[str]:
    if isinstance(schema, dict):
        found = [schema["type"]] if isinstance(schema.get("type"), str) else []
        return found + [t for value in schema.values() for t in _types(value)]
    if isinstance(schema, list):
        return [t for value in schema for t in _types(value)]
    return []


def test_function_docs_become_specs_with_json_types_and_defaults() -> None:
    catalogue = load_catalogue("bfcl")
    assert catalogue.errors == []
    assert len(catalogue) == 128  # the eight environments' docs (162 minus memory and web search)
    assert {spec.source for spec in catalogue.tools()} == {f"bfcl:{name}" for name in BFCL_CLASSES}
    all_types = {t for spec in catalogue.tools() for t in _types(spec.parameters)}
    assert all_types <= {"object", "string", "number", "integer", "boolean", "array"}
    assert catalogue.specs["ls"].parameters["properties"]["a"] == {
        "type": "boolean",
        "description": "Show hidden files and directories. Defaults to False. ",
        "default": False,
    }
    assert "response" not in catalogue.specs["cd"].parameters
    assert catalogue.specs["mean"].parameters["properties"]["numbers"]["type"] == "array"
    subset = load_catalogue("bfcl:GorillaFileSystem,MathAPI")
    assert len(subset) == 18 + 17
    with pytest.raises(ValueError, match="unknown BFCL environment"):
        load_catalogue("bfcl:NoSuchAPI")


def test_a_dialogue_keeps_state_across_calls(registry: ToolRegistry) -> None:
    scenario = find_scenario("multi_turn_base_0")
    with registry.session("dialogue-0", scenario.initial_config) as dialogue:
        assert dialogue.call("ls", {}).content == {"current_directory_content": ["document", "archive"]}
        assert dialogue.call("cd", {"folder": "document"}).ok
        # Depends on the cd before it: the listing is of 'document'.
        assert dialogue.call("ls", {}).content == {
            "current_directory_content": ["final_report.pdf", "previous_report.pdf"]
        }
        assert dialogue.call("mkdir", {"dir_name": "temp"}).ok
        assert dialogue.call("mv", {"source": "final_report.pdf", "destination": "temp"}).ok
        assert dialogue.call("cd", {"folder": "temp"}).ok
        assert dialogue.call("ls", {}).content == {"current_directory_content": ["final_report.pdf"]}
        grep = dialogue.call("grep", {"file_name": "final_report.pdf", "pattern": "budget"})
        assert grep.ok and "budget analysis" in grep.content["matching_lines"][0]
        assert dialogue.calls_run == 8


def test_two_dialogues_never_share_state(registry: ToolRegistry) -> None:
    config = find_scenario("multi_turn_base_0").initial_config
    with registry.session("a", config) as first, registry.session("b", config) as second:
        assert first.call("mkdir", {"dir_name": "only_in_a"}).ok
        assert second.call("ls", {}).content == {"current_directory_content": ["document", "archive"]}
        assert "only_in_a" in first.call("ls", {}).content["current_directory_content"]
    # Outside a session every call starts from BFCL's default state.
    assert registry.call("mkdir", {"dir_name": "x"}).ok
    assert registry.call("ls", {}).content == {"current_directory_content": []}


def test_returned_errors_and_raised_exceptions_are_the_same_kind_of_error(registry: ToolRegistry) -> None:
    with registry.session("errors", {}) as dialogue:
        returned = dialogue.call("cd", {"folder": "nope"})
        raised = dialogue.call(
            "get_flight_cost",
            {
                "travel_from": "XXX",
                "travel_to": "YYY",
                "travel_date": "2024-11-15",
                "travel_class": "economy",
            },
        )
    assert (returned.ok, returned.content, returned.error) == (
        False,
        None,
        "cd: 'nope': No such file or directory",
    )
    assert (raised.ok, raised.content) == (False, None)
    assert raised.error == "ValueError: No available route for the given airports."
    refused = registry.call("cd", {"directory": "x"})
    assert (
        not refused.ok
        and refused.error is not None
        and refused.error.startswith(
            "missing required argument 'folder', unknown argument 'directory' for cd; "
            "expected: folder (string"
        )
    )


def test_stateless_and_stateful_apis_side_by_side(registry: ToolRegistry) -> None:
    scenario = find_scenario("multi_turn_base_0")
    with registry.session("mixed", scenario.initial_config) as dialogue:
        assert dialogue.call("mean", {"numbers": [1, 2, 3.5]}).content == {"result": 2.1666666666666665}
        tweets = dialogue.call("get_user_tweets", {"username": "analyst_pro"})
        assert tweets.ok and len(tweets.content) == 3
        assert dialogue.call("get_weather", {"city": "Paris"}).error is not None  # unknown tool here


def _wait_until_gone(pid: int) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.01)
    raise AssertionError(f"process {pid} still exists")


def test_a_session_survives_the_death_of_its_worker_by_replay() -> None:
    catalogue = load_catalogue("bfcl:GorillaFileSystem")
    with (
        ToolRegistry(catalogue, SandboxConfig(workers=1)) as registry,
        registry.session("replayed", {}) as dialogue,
    ):
        assert dialogue.call("mkdir", {"dir_name": "kept"}).ok
        assert dialogue.call("cd", {"folder": "kept"}).ok
        assert dialogue.call("touch", {"file_name": "notes.txt"}).ok
        pool = registry.executor
        assert isinstance(pool, SandboxPool)
        (pid,) = pool.worker_pids()
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        _wait_until_gone(pid)
        # The worker is found dead, replaced, and the session replayed on the new one.
        assert dialogue.call("ls", {}).content == {"current_directory_content": ["notes.txt"]}
        assert pool.replaced == 1
        assert pool.worker_pids() != [pid]
        assert dialogue.call("pwd", {}).content["current_working_directory"].endswith("kept")


def test_multi_turn_scenarios_load() -> None:
    scenarios = load_scenarios()
    assert len(scenarios) == 200
    first = scenarios[0]
    assert first.id == "multi_turn_base_0"
    assert set(first.involved_classes) == {"TwitterAPI", "GorillaFileSystem"}
    assert "GorillaFileSystem" in first.initial_config
    assert find_scenario("multi_turn_base_199").id == "multi_turn_base_199"
    with pytest.raises(KeyError, match="no BFCL multi-turn entry"):
        find_scenario("multi_turn_base_9999")
