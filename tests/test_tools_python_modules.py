"""Loading tools from a folder of Python modules: schemas, defaults, and bad modules reported, not fatal."""

from __future__ import annotations

import logging
import textwrap
from pathlib import Path

import pytest

from ttpa_ray.tools.python_modules import load_module_folder
from ttpa_ray.tools.registry import ToolRegistry, load_catalogue

GOOD = '''
from __future__ import annotations

from typing import Literal


def plan_trip(city: str, nights: int = 2, style: Literal["budget", "luxury"] = "budget") -> dict:
    """
    Plan a trip.

    Args:
        city: Destination city.
        nights: Number of nights.
        style: Travel style.
    """
    return {"city": city, "nights": nights, "style": style}


def no_docstring(city: str) -> str:
    return city


def no_type_hint(city):
    """
    Echo.

    Args:
        city: A city.
    """
    return city


def _helper() -> None:
    """Private: not a tool."""
'''


def _write(folder: Path, relative: str, text: str) -> Path:
    path = folder / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def test_schemas_come_from_signatures_and_docstrings_with_defaults(tmp_path: Path) -> None:
    _write(tmp_path, "trips.py", GOOD)
    tools, _errors = load_module_folder(tmp_path)
    (plan,) = [tool for tool in tools if tool.spec.name == "plan_trip"]
    assert plan.spec.description == "Plan a trip."
    assert plan.spec.parameters == {
        "type": "object",
        "properties": {
            "city": {"type": "string", "description": "Destination city."},
            "nights": {"type": "integer", "description": "Number of nights.", "default": 2},
            "style": {
                "type": "string",
                "enum": ["budget", "luxury"],
                "description": "Travel style.",
                "default": "budget",
            },
        },
        "required": ["city"],
    }
    assert plan.spec.source == f"module:{tmp_path / 'trips.py'}"
    assert plan.target.function == "plan_trip" and plan.target.path == str((tmp_path / "trips.py").resolve())


def test_bad_modules_and_functions_are_reported_by_file_and_function_and_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    trips = _write(tmp_path, "trips.py", GOOD)
    broken = _write(tmp_path, "broken.py", "def oops(:\n    pass\n")
    exits = _write(tmp_path, "exits.py", "import sys\nsys.exit(2)\n")
    failing_import = _write(tmp_path, "needs_pkg.py", "import package_that_is_not_installed\n")
    duplicate = _write(
        tmp_path,
        "zz_duplicate.py",
        GOOD.replace("def no_docstring", "def _x").replace("def no_type_hint", "def _y"),
    )
    _write(tmp_path, "_private_helpers.py", "raise RuntimeError('never imported')\n")
    _write(
        tmp_path,
        "travel/hotels/api.py",
        GOOD.replace("plan_trip", "book_room")
        .replace("def no_docstring", "def _a")
        .replace("def no_type_hint", "def _b"),
    )
    with caplog.at_level(logging.WARNING, logger="ttpa_ray.tools.python_modules"):
        tools, errors = load_module_folder(tmp_path)

    assert sorted(tool.spec.name for tool in tools) == ["book_room", "plan_trip"]
    found = {(Path(error.source).name, error.function): error.message for error in errors}
    assert found[(trips.name, "no_docstring")].startswith("no usable schema (DocstringParsingException")
    assert found[(trips.name, "no_type_hint")].startswith("no usable schema (TypeHintParsingException")
    assert found[(broken.name, None)].startswith("module failed to import (SyntaxError")
    assert found[(exits.name, None)] == "module failed to import (SystemExit: 2)"
    assert found[(failing_import.name, None)].startswith("module failed to import (ModuleNotFoundError")
    assert found[(duplicate.name, "plan_trip")].startswith("duplicate tool name (already defined in ")
    assert len(errors) == 6
    # One log line per error, naming file and function.
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 6
    assert any(f"{trips}:no_docstring" in line for line in lines)


def test_a_tool_from_a_folder_runs_in_the_sandbox(tmp_path: Path) -> None:
    _write(tmp_path, "trips.py", GOOD)
    with ToolRegistry(load_catalogue(tmp_path)) as registry:
        result = registry.call("plan_trip", {"city": "Rome", "style": "luxury"})
    assert result.ok
    assert result.content == {"city": "Rome", "nights": 2, "style": "luxury"}


def test_a_missing_folder_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist or is not a directory"):
        load_module_folder(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="no tool catalogue at"):
        load_catalogue(tmp_path / "nowhere")


def test_same_file_names_in_two_folders_do_not_clash(tmp_path: Path) -> None:
    for folder, answer in (("a", "from a"), ("b", "from b")):
        _write(
            tmp_path / folder,
            "tools.py",
            f"""
            def answer_{folder}() -> str:
                \"\"\"Say where it comes from.\"\"\"
                return "{answer}"
            """,
        )
    catalogue = load_catalogue(tmp_path / "a").merged(load_catalogue(tmp_path / "b"))
    with ToolRegistry(catalogue, isolated=False) as registry:
        assert registry.call("answer_a", {}).content == "from a"
        assert registry.call("answer_b", {}).content == "from b"


def test_merging_catalogues_reports_clashing_names() -> None:
    merged = load_catalogue("builtin+builtin")
    assert len(merged) == len(load_catalogue("builtin"))
    assert len(merged.errors) == len(merged)
    assert merged.errors[0].message == "duplicate tool name (already from builtin)"
