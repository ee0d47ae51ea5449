"""What a tool call returns, and the schema checks every source shares.

- :class:`ToolResult`: the one answer type of every tool source (Python modules, BFCL environments,
  simulated tools), whether the call ran, failed, timed out or was refused before running.
- :func:`validate_arguments`: arguments checked against the tool's JSON schema BEFORE the call, with an
  error message a model can act on (what is wrong, and what the tool expects).
- :func:`check_parameters_schema`: a tool's parameter schema checked when the catalogue loads, so a bad
  schema is a load error naming the tool, never a crash in the middle of a dialogue.
- :func:`to_json_compatible` and :func:`truncate_content`: what a tool returned, made JSON-compatible
  and cut to the configured size with a visible marker.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ttpa_ray.codec import json_type_of

if TYPE_CHECKING:
    from ttpa_ray.records import ToolSpec

JSON_TYPES = frozenset({"string", "integer", "number", "boolean", "array", "object", "null"})
ANY_TYPE = "any"  # BFCL's 'any' (kept by ttpa_ray.bfcl's type mapping): every value matches
DEFAULT_MAX_RESPONSE_CHARS = 8192
TRUNCATION_MARKER = "... [truncated {dropped} characters]"
_HINT_MAX_CHARS = 48
# A date/time layout named in a description is the most useful hint there is.
_FORMAT_PATTERN = re.compile(r"\bYYYY-MM-DD(?:[ T]HH:MM(?::SS)?)?|\bHH:MM(?::SS)?\b")
_MAX_PROBLEMS = 4


@dataclass(frozen=True)
class LoadError:
    """A tool (or a whole module / catalogue entry) that could not be loaded, and why."""

    source: str  # the file
    function: str | None  # the function or tool; None when the whole file failed
    message: str

    def __str__(self) -> str:
        where = f"{self.source}:{self.function}" if self.function else self.source
        return f"{where}: {self.message}"


@dataclass(frozen=True)
class ToolResult:
    """The outcome of one tool call.

    ``ok`` is False when the call was refused (unknown tool, invalid arguments), raised, returned an
    error (BFCL's ``{"error": ...}``), timed out, ran out of memory or crashed its worker; ``error`` then
    says why in words a model can act on and ``content`` is None. ``content`` is JSON-compatible; when
    its JSON text was longer than the configured limit it is that text, cut, ending with a marker, and
    ``truncated`` is True. ``stdout`` is what the tool printed (cut the same way); it is kept apart from
    the content so that printing never corrupts a response. ``elapsed`` is the caller's wall-clock
    time in seconds, sandbox transport included.
    """

    ok: bool
    content: Any = None
    error: str | None = None
    elapsed: float = 0.0
    truncated: bool = False
    stdout: str = ""

    @classmethod
    def failure(cls, error: str, elapsed: float = 0.0) -> ToolResult:
        """A failed call with its message."""
        return cls(ok=False, content=None, error=error, elapsed=elapsed)

    def to_message_content(self) -> str:
        """The text of the ``tool`` message a dialogue stores for this result."""
        if not self.ok:
            return json.dumps({"error": self.error}, ensure_ascii=False)
        if isinstance(self.content, str):
            return self.content
        return json.dumps(self.content, ensure_ascii=False)

    def to_dict(self) -> dict[str, Any]:
        """A plain dict (for JSON output and logs)."""
        return dataclasses.asdict(self)


def matches_json_type(value: Any, type_name: str) -> bool:
    """Whether ``value`` is of JSON type ``type_name``; an integer is a number, a bool is neither."""
    if type_name == ANY_TYPE:
        return True
    actual = json_type_of(value)
    if type_name == "number":
        return actual in ("integer", "number")
    return actual == type_name


def _same_json_value(a: Any, b: Any) -> bool:
    # Python says True == 1; JSON (and an enum of integers) does not.
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    return bool(a == b)


def _declared_types(schema: Mapping[str, Any]) -> list[str]:
    declared = schema.get("type")
    if declared is None:
        return []
    return [declared] if isinstance(declared, str) else [str(t) for t in declared]


def _short(value: Any, limit: int = 40) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _value_problems(value: Any, schema: Mapping[str, Any], where: str) -> list[str]:
    """Problems of one value against a (sub)schema; ``where`` names it, e.g. ``argument 'dates[1]'``."""
    if value is None and (schema.get("nullable") or ("default" in schema and schema["default"] is None)):
        return []
    types = _declared_types(schema)
    if types and not any(matches_json_type(value, t) for t in types):
        expected = " or ".join(types)
        return [f"{where} must be {expected}, got {json_type_of(value)} ({_short(value)})"]
    enum = schema.get("enum")
    if isinstance(enum, list) and enum and not any(_same_json_value(value, option) for option in enum):
        options = ", ".join(_short(option) for option in enum)
        return [f"{where} must be one of {options}, got {_short(value)}"]
    problems: list[str] = []
    if isinstance(value, list | tuple) and isinstance(schema.get("items"), Mapping):
        base = where.rstrip("'")
        for index, item in enumerate(value):
            problems += _value_problems(item, schema["items"], f"{base}[{index}]'")
    if isinstance(value, dict):
        base = where.rstrip("'")
        properties = schema.get("properties")
        if isinstance(properties, Mapping):
            for key in schema.get("required", []) or []:
                if key not in value:
                    problems.append(f"{base}' is missing required key '{key}'")
            for key, item in value.items():
                if key in properties and isinstance(properties[key], Mapping):
                    problems += _value_problems(item, properties[key], f"{base}.{key}'")
                elif schema.get("additionalProperties") is False:
                    problems.append(f"{base}' has unknown key '{key}'")
        extra = schema.get("additionalProperties")
        if isinstance(extra, Mapping):
            for key, item in value.items():
                if not (isinstance(properties, Mapping) and key in properties):
                    problems += _value_problems(item, extra, f"{base}.{key}'")
    return problems


def _parameter_hint(name: str, schema: Mapping[str, Any], required: bool) -> str:
    parts = ["|".join(_declared_types(schema)) or "any"]
    if not required:
        parts.append("optional")
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        parts.append("one of " + "|".join(str(option) for option in enum))
    description = str(schema.get("description") or "").strip().rstrip(".")
    pattern = _FORMAT_PATTERN.search(description)
    hint = schema.get("format") or (pattern.group(0) if pattern else description)
    if hint and len(hint) <= _HINT_MAX_CHARS:
        parts.append(str(hint))
    return f"{name} ({', '.join(parts)})"


def describe_parameters(parameters: Mapping[str, Any]) -> str:
    """One line listing what a tool expects, e.g. ``city (string), date (string, YYYY-MM-DD)``."""
    properties = parameters.get("properties") or {}
    if not properties:
        return "no arguments"
    required = set(parameters.get("required") or [])
    return ", ".join(
        _parameter_hint(name, schema if isinstance(schema, Mapping) else {}, name in required)
        for name, schema in properties.items()
    )


def validate_arguments(spec: ToolSpec, arguments: Any) -> str | None:
    """Check ``arguments`` against ``spec.parameters``; None when valid, else an actionable message.

    Checks: arguments form an object, every required argument is present, no unknown argument, every
    value has the declared JSON type (a bool is not an integer) and is within its enum; arrays and
    nested objects are checked by their ``items`` / ``properties``. The message names the problems,
    the tool, and what the tool expects, e.g. ``missing required argument 'city' for get_weather;
    expected: city (string), date (string, YYYY-MM-DD)``.
    """
    parameters: Mapping[str, Any] = spec.parameters or {}
    expected = describe_parameters(parameters)
    if not isinstance(arguments, dict):
        return (
            f"arguments for {spec.name} must be a JSON object, got {json_type_of(arguments)}; "
            f"expected: {expected}"
        )
    properties: Mapping[str, Any] = parameters.get("properties") or {}
    problems: list[str] = []
    for name in parameters.get("required") or []:
        if name not in arguments:
            problems.append(f"missing required argument '{name}'")
    open_object = parameters.get("additionalProperties") not in (None, False)
    for name, value in arguments.items():
        if name not in properties:
            if not open_object:
                problems.append(f"unknown argument '{name}'")
            continue
        schema = properties[name]
        if isinstance(schema, Mapping):
            problems += _value_problems(value, schema, f"argument '{name}'")
    if not problems:
        return None
    if len(problems) > _MAX_PROBLEMS:
        problems = [*problems[:_MAX_PROBLEMS], f"{len(problems) - _MAX_PROBLEMS} more problems"]
    return f"{', '.join(problems)} for {spec.name}; expected: {expected}"


def _schema_problems(schema: Any, where: str) -> list[str]:
    if not isinstance(schema, Mapping):
        return [f"{where} must be a JSON object, got {json_type_of(schema)}"]
    problems: list[str] = []
    declared = schema.get("type")
    if declared is None:
        if "enum" not in schema:
            problems.append(f"{where} has no type")
    else:
        types = [declared] if isinstance(declared, str) else declared
        if not isinstance(types, list) or not types:
            problems.append(f"{where} has an invalid type {_short(declared)}")
        else:
            for type_name in types:
                if type_name not in JSON_TYPES and type_name != ANY_TYPE:
                    allowed = ", ".join(sorted(JSON_TYPES))
                    problems.append(f"{where} has unknown type {_short(type_name)} (use one of {allowed})")
    if "enum" in schema and (not isinstance(schema["enum"], list) or not schema["enum"]):
        problems.append(f"{where} has an enum that is not a non-empty list")
    if "items" in schema:
        problems += _schema_problems(schema["items"], f"{where}[items]")
    if "properties" in schema:
        problems += _object_problems(schema, where)
    return problems


def _object_problems(schema: Mapping[str, Any], where: str) -> list[str]:
    properties = schema.get("properties", {})
    if not isinstance(properties, Mapping):
        return [f"{where}: 'properties' must be an object"]
    problems: list[str] = []
    for name, sub in properties.items():
        problems += _schema_problems(sub, f"{where}.{name}" if where else f"parameter '{name}'")
    required = schema.get("required", [])
    if not isinstance(required, list):
        problems.append(f"{where or 'parameters'}: 'required' must be a list")
    else:
        for name in required:
            if name not in properties:
                problems.append(f"{where or 'parameters'}: required '{name}' is not among the properties")
    return problems


def check_parameters_schema(parameters: Any) -> list[str]:
    """Problems of a tool's parameter schema (empty when it is usable): checked at catalogue load.

    The schema must be an object schema whose properties each declare JSON types (string, integer,
    number, boolean, array, object, null), whose ``required`` names existing properties, and whose
    nested ``items`` / ``properties`` obey the same rules.
    """
    if not isinstance(parameters, Mapping):
        return [f"parameters must be a JSON object schema, got {json_type_of(parameters)}"]
    if parameters.get("type") != "object":
        return [f"parameters must have type 'object', got {_short(parameters.get('type'))}"]
    return _object_problems(parameters, "")


def to_json_compatible(value: Any, _depth: int = 0) -> Any:
    """``value`` as plain JSON data: tuples and sets become lists, keys strings, unknown objects ``str``.

    Non-finite floats become strings ("inf", "nan"): strict JSON has no such numbers.
    """
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if _depth > 64:
        return str(value)
    if isinstance(value, Mapping):
        return {str(key): to_json_compatible(item, _depth + 1) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [to_json_compatible(item, _depth + 1) for item in value]
    if isinstance(value, set | frozenset):
        # Sorted so that a set answers the same in every process (string hashing is randomised).
        return [to_json_compatible(item, _depth + 1) for item in sorted(value, key=repr)]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_json_compatible(dataclasses.asdict(value), _depth + 1)
    tolist = getattr(value, "tolist", None)
    if callable(tolist):
        try:
            return to_json_compatible(tolist(), _depth + 1)
        except Exception:
            return str(value)
    return str(value)


def truncate_text(text: str, max_chars: int) -> tuple[str, bool]:
    """``text`` cut to ``max_chars`` characters plus a marker saying how many were dropped."""
    if len(text) <= max_chars:
        return text, False
    return text[:max_chars] + TRUNCATION_MARKER.format(dropped=len(text) - max_chars), True


def truncate_content(content: Any, max_chars: int) -> tuple[Any, bool]:
    """JSON-compatible ``content`` as is when its JSON text fits ``max_chars``, else that text, cut.

    A cut response is a string (a prefix of the JSON text and the marker): the model reads text, and a
    prefix of JSON is no longer an object.
    """
    text = content if isinstance(content, str) else json.dumps(content, ensure_ascii=False)
    if len(text) <= max_chars:
        return content, False
    return truncate_text(text, max_chars)
