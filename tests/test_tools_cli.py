"""`ttpa tools list|show|call` through typer's CliRunner on the tools app."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from ttpa_ray.cli import tools_app as app

FIXTURES = Path(__file__).parent / "fixtures" / "tool_modules"
runner = CliRunner()


def test_list_builtin_and_a_module_folder() -> None:
    result = runner.invoke(app, ["list", "builtin"])
    assert result.exit_code == 0, result.output
    names = [line.split()[0] for line in result.stdout.splitlines() if line.strip()]
    assert "get_weather" in names and "search_flights" in names and len(names) == 13
    folder = runner.invoke(app, ["list", str(FIXTURES)])
    assert folder.exit_code == 0 and "sleepy" in folder.stdout
    merged = runner.invoke(app, ["list", "builtin+bfcl:MathAPI"])
    assert merged.exit_code == 0 and len(merged.stdout.splitlines()) == 13 + 17


def test_show_prints_the_openai_schema() -> None:
    result = runner.invoke(app, ["show", "bfcl", "cd"])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    assert shown["type"] == "function" and shown["source"] == "bfcl:GorillaFileSystem"
    assert shown["function"]["parameters"]["required"] == ["folder"]
    missing = runner.invoke(app, ["show", "builtin", "nope"])
    assert missing.exit_code == 2 and "no tool 'nope' in builtin" in missing.stderr


def test_call_through_the_sandbox_and_in_process() -> None:
    result = runner.invoke(
        app,
        ["call", "builtin", "convert_units", "--args", '{"value": 5, "from_unit": "km", "to_unit": "mi"}'],
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["content"]["result"] == 3.10686
    local = runner.invoke(
        app, ["call", "builtin", "get_weekday", "--args", '{"date": "2026-05-01"}', "--in-process"]
    )
    assert local.exit_code == 0 and json.loads(local.stdout)["content"]["weekday"] == "Friday"


def test_call_reports_failures_with_exit_codes() -> None:
    invalid = runner.invoke(app, ["call", "builtin", "get_weekday", "--args", '{"day": "x"}', "--in-process"])
    assert invalid.exit_code == 1
    assert json.loads(invalid.stdout)["error"].startswith("missing required argument 'date'")
    timed_out = runner.invoke(
        app, ["call", str(FIXTURES), "sleepy", "--args", '{"seconds": 5}', "--timeout", "0.5"]
    )
    assert timed_out.exit_code == 1 and "timed out after 0.5 s" in json.loads(timed_out.stdout)["error"]
    bad_json = runner.invoke(app, ["call", "builtin", "get_weekday", "--args", "{date:"])
    assert bad_json.exit_code == 2 and "--args is not valid JSON" in bad_json.stderr
    nowhere = runner.invoke(app, ["list", "/no/such/catalogue"])
    assert nowhere.exit_code == 2 and "no tool catalogue at '/no/such/catalogue'" in nowhere.stderr


def test_call_a_bfcl_tool_from_an_entry_state() -> None:
    result = runner.invoke(app, ["call", "bfcl", "ls", "--bfcl-entry", "multi_turn_base_0", "--in-process"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["content"] == {"current_directory_content": ["document", "archive"]}
