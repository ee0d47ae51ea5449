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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from jsonschema import Draft202012Validator, validators
from jsonschema.exceptions import UnknownType, ValidationError

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


def _declared_types(schema: Mapping[str, Any]) -> list[str]:
    declared = schema.get("type")
    if declared is None:
        return []
    return [declared] if isinstance(declared, str) else [str(t) for t in declared]


def _short(value: Any, limit: int = 40) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _nullable(schema: Mapping[str, Any]) -> bool:
    return schema.get("nullable") is True or ("default" in schema and schema["default"] is None)


def _unless_null(keyword: str) -> Any:
    """A JSON-schema keyword that lets null through where the schema says nullable / default null."""
    check = Draft202012Validator.VALIDATORS[keyword]

    def keyword_check(validator: Any, value: Any, instance: Any, schema: Mapping[str, Any]) -> Any:
        if not (instance is None and _nullable(schema)):
            yield from check(validator, value, instance, schema)

    return keyword_check


# JSON Schema as tools write it: BFCL's "any" type; an integer is an int (5.0 is a number), a bool
# is neither; nullable / default null admit null.
_Validator = validators.extend(
    Draft202012Validator,
    validators={"type": _unless_null("type"), "enum": _unless_null("enum")},
    type_checker=Draft202012Validator.TYPE_CHECKER.redefine_many(
        {
            ANY_TYPE: lambda _, value: True,
            "integer": lambda _, value: json_type_of(value) == "integer",
        }
    ),
)


def _where(path: Sequence[Any]) -> str:
    """``argument 'dates[1]'`` / ``argument 'point.x'`` for a path into the arguments."""
    text = str(path[0]) + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path[1:])
    return f"argument '{text}'"


def _problems(error: ValidationError) -> list[str]:
    """The one-line problems of one jsonschema error (a required or additionalProperties error
    names every key it is about)."""
    path, value, kind = list(error.absolute_path), error.instance, error.validator
    if kind == "required":
        missing = [key for key in error.validator_value if key not in value]
        if not path:
            return [f"missing required argument '{key}'" for key in missing]
        return [f"{_where(path)} is missing required key '{key}'" for key in missing]
    if kind == "additionalProperties":
        known = error.schema.get("properties") or {}
        extra = [key for key in value if key not in known]
        if not path:
            return [f"unknown argument '{key}'" for key in extra]
        return [f"{_where(path)} has unknown key '{key}'" for key in extra]
    if kind == "type":
        expected = " or ".join(_declared_types(error.schema))
        return [f"{_where(path)} must be {expected}, got {json_type_of(value)} ({_short(value)})"]
    if kind == "enum":
        options = ", ".join(_short(option) for option in error.validator_value)
        return [f"{_where(path)} must be one of {options}, got {_short(value)}"]
    return [f"{_where(path) if path else 'arguments'}: {error.message}"]


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


def _under(path: tuple[Any, ...], prefixes: set[tuple[Any, ...]]) -> bool:
    return any(path[: len(prefix)] == prefix for prefix in prefixes)


def validate_arguments(spec: ToolSpec, arguments: Any) -> str | None:
    """Check ``arguments`` against ``spec.parameters``; None when valid, else an actionable message.

    Checked by jsonschema (every JSON Schema keyword: types, enums, items, nested properties, bounds,
    patterns...), with the tools' conventions: BFCL's ``any`` type, a bool is not an integer nor a
    number, ``nullable`` / ``default: null`` admit null, and an argument the schema does not name is
    refused unless the schema sets ``additionalProperties``. The message names the problems,
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
    closed = {**parameters, "additionalProperties": parameters.get("additionalProperties") or False}
    try:
        errors = list(_Validator(closed).iter_errors(arguments))
    except UnknownType as exc:  # catalogues are checked at load; a spec made by hand may not be
        return f"{spec.name}'s parameters schema has the unknown type {exc.type!r}; expected: {expected}"
    # A value of the wrong type says only that: its enum or items would add nothing.
    mistyped = {tuple(e.absolute_path) for e in errors if e.validator == "type"}
    errors = [e for e in errors if e.validator == "type" or not _under(tuple(e.absolute_path), mistyped)]
    # Missing arguments first, then the others in the order of the arguments.
    order = {key: i for i, key in enumerate(arguments)}
    errors.sort(
        key=lambda e: (bool(e.absolute_path), order.get(e.absolute_path[0], -1) if e.absolute_path else 0)
    )
    problems = list(dict.fromkeys(problem for error in errors for problem in _problems(error)))
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
