"""Bundled data of the built-in catalogue, loaded once per process, and the argument parsers tools share.

Private (underscore) module: the module loader does not turn it into tools. Errors are raised as
``ValueError`` with a message that names the argument and what would be accepted, because that message
is what the model reads.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from functools import cache
from importlib import resources
from typing import Any, Literal

DATE_FORMAT_HINT = "YYYY-MM-DD"
# The cities of cities.json, the type of every city parameter: their schemas' enum, so that a model
# calling the tools (a teacher writing dialogues, under the schema's grammar) names a city the data
# covers; the 135M teacher, told the cities in the description, still invented others in most of its
# failed calls (bench/quality.py). The functions still take airport codes and aliases when called
# directly. tests/test_tools_builtin.py checks the two lists agree.
City = Literal[
    "Paris",
    "London",
    "Berlin",
    "Madrid",
    "Rome",
    "New York",
    "San Francisco",
    "Toronto",
    "Tokyo",
    "Singapore",
    "Dubai",
    "Mumbai",
    "Sydney",
]


def _read_text(name: str) -> str:
    return (resources.files("ttpa_ray.tools.builtin") / "data" / name).read_text(encoding="utf-8")


@cache
def load_json(name: str) -> Any:
    """A bundled JSON file, parsed."""
    return json.loads(_read_text(name))


@cache
def load_csv(name: str) -> tuple[dict[str, str], ...]:
    """A bundled CSV file as rows of strings."""
    return tuple(csv.DictReader(io.StringIO(_read_text(name))))


@cache
def _cities_by_key() -> dict[str, dict[str, Any]]:
    table: dict[str, dict[str, Any]] = {}
    for record in load_json("cities.json"):
        for key in [record["city"], record["airport"], *record["aliases"]]:
            table[key.strip().lower()] = record
    return table


def city_names() -> list[str]:
    """Names of the cities the bundled data covers."""
    return [record["city"] for record in load_json("cities.json")]


def find_city(name: str, argument: str = "city") -> dict[str, Any]:
    """The city record for a name, airport code or alias (case-insensitive)."""
    record = _cities_by_key().get(str(name).strip().lower())
    if record is None:
        raise ValueError(f"unknown {argument} {name!r}; known cities: {', '.join(city_names())}")
    return record


def parse_date(text: str, argument: str = "date") -> dt.date:
    """A ``YYYY-MM-DD`` date."""
    try:
        return dt.date.fromisoformat(str(text).strip())
    except ValueError:
        raise ValueError(f"{argument} must be a date as {DATE_FORMAT_HINT}, got {text!r}") from None
