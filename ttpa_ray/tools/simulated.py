"""Simulated tools: catalogues with schemas but no implementation (ToolBench / StableToolBench style).

A simulated tool's response is WRITTEN, from the tool's schema, the call's arguments and a few example
responses, by a :class:`ResponseWriter`, then cached by (tool, canonical arguments) so that a repeated
call answers the same (in this run and, with a cache file, in later runs). The LLM writer uses the same
vLLM replica interface as the reverse stage and lands with it; this module holds the catalogue loader,
the cache and the call path, which any writer plugs into. The tests drive the cache with a small
deterministic writer function (its response restates its inputs), not with a mock posing as an LLM.

Catalogue files (JSON):
- a ToolBench tool (``{"tool_name", "tool_description", "api_list": [{"name", "description",
  "required_parameters", "optional_parameters", "test_endpoint"...}]}``), a list of them, or
  ``{"tools": [...]}`` of them. Each API becomes the tool ``<api>_for_<tool>`` (ToolBench's naming,
  standardised and cut to the last 64 characters); ToolBench's parameter types map to JSON types
  (STRING/ENUM/DATE/TIME... -> string, NUMBER/FLOAT -> number, INTEGER -> integer, BOOLEAN -> boolean,
  ARRAY/LIST -> array, OBJECT -> object); an unknown type is a load error for that API. A non-empty
  ``test_endpoint`` is kept as the API's example response.
- a list of OpenAI tools (``{"type": "function", "function": {...}}`` or the bare function form),
  optionally with an ``examples`` list of response strings beside each.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ttpa_ray.codec import ToolCall, canonical
from ttpa_ray.records import ToolSpec
from ttpa_ray.tools.spec import (
    DEFAULT_MAX_RESPONSE_CHARS,
    LoadError,
    ToolResult,
    check_parameters_schema,
    truncate_content,
)

logger = logging.getLogger(__name__)

_NAME_MAX_CHARS = 64
_DESCRIPTION_MAX_CHARS = 512
_EXAMPLE_MAX_CHARS = 2048
_TOOLBENCH_TYPES = {
    "STRING": "string",
    "ENUM": "string",
    "DATE": "string",
    "TIME": "string",
    "DATETIME": "string",
    "GEOPOINT": "string",
    "CREDENTIALS": "string",
    "URL": "string",
    "NUMBER": "number",
    "FLOAT": "number",
    "DOUBLE": "number",
    "INTEGER": "integer",
    "INT": "integer",
    "BOOLEAN": "boolean",
    "BOOL": "boolean",
    "ARRAY": "array",
    "LIST": "array",
    "OBJECT": "object",
    "JSON": "object",
}


class ResponseWriter(Protocol):
    """Writes the response text of a simulated tool call (an LLM in production)."""

    def write(self, tool_spec: ToolSpec, arguments: Mapping[str, Any], examples: Sequence[str]) -> str: ...


@dataclass(frozen=True)
class SimulatedTool:
    """A tool with a schema and example responses but no implementation."""

    spec: ToolSpec
    examples: tuple[str, ...] = ()


def standardize(text: str) -> str:
    """ToolBench's name standardisation: lower case, non-alphanumerics to ``_``, no leading digit."""
    result = re.sub(r"[^0-9a-zA-Z_]", "_", str(text))
    result = re.sub(r"_+", "_", result).strip("_").lower()
    if result and result[0].isdigit():
        result = "get_" + result
    return result


def _toolbench_type(raw: Any) -> str | None:
    word = re.split(r"[\s(]", str(raw).strip().upper(), maxsplit=1)[0]
    return _TOOLBENCH_TYPES.get(word)


def _example_text(value: Any) -> str | None:
    if value in (None, "", {}, []):
        return None
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return text[:_EXAMPLE_MAX_CHARS]


def _toolbench_api(tool: Mapping[str, Any], api: Mapping[str, Any]) -> SimulatedTool:
    """One ``api_list`` entry as a simulated tool (raises ValueError naming the problem)."""
    tool_name = standardize(tool.get("standardized_name") or tool.get("tool_name") or "")
    api_name = standardize(api.get("name") or api.get("api_name") or "")
    if not tool_name or not api_name:
        raise ValueError("needs a tool_name and an API name")
    name = f"{api_name}_for_{tool_name}"[-_NAME_MAX_CHARS:]
    description = str(api.get("description") or api.get("api_description") or "").strip()
    tool_description = str(tool.get("tool_description") or "").strip()
    text = (
        f'{description} (API of the tool "{tool_name}": {tool_description})'
        if tool_description
        else description
    )
    properties: dict[str, Any] = {}
    required: list[str] = []
    for group, is_required in (("required_parameters", True), ("optional_parameters", False)):
        for parameter in api.get(group) or []:
            pname = str(parameter.get("name", "")).strip()
            if not pname:
                raise ValueError(f"a parameter in {group} has no name")
            json_type = _toolbench_type(parameter.get("type", "STRING"))
            if json_type is None:
                raise ValueError(f"parameter {pname!r} has unknown type {parameter.get('type')!r}")
            schema: dict[str, Any] = {
                "type": json_type,
                "description": str(parameter.get("description") or ""),
            }
            default = parameter.get("default")
            if is_required:
                required.append(pname)
                if default not in (None, ""):
                    # A required parameter has no default: ToolBench's "default" there is an example.
                    schema["examples"] = [default]
            elif default not in (None, ""):
                schema["default"] = default
            properties[pname] = schema
    parameters: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        parameters["required"] = required
    problems = check_parameters_schema(parameters)
    if problems:
        raise ValueError("; ".join(problems))
    spec = ToolSpec(
        name=name,
        description=text[:_DESCRIPTION_MAX_CHARS],
        parameters=parameters,
        source=f"simulated:{tool_name}",
    )
    example = _example_text(api.get("test_endpoint"))
    return SimulatedTool(spec=spec, examples=(example,) if example else ())


def _openai_tool(entry: Mapping[str, Any], source: str) -> SimulatedTool:
    spec = ToolSpec.from_openai(entry, source=source)
    problems = check_parameters_schema(spec.parameters)
    if problems:
        raise ValueError("; ".join(problems))
    examples = tuple(text for text in (_example_text(e) for e in entry.get("examples") or []) if text)
    return SimulatedTool(spec=spec, examples=examples)


def load_simulated_catalogue(path: str | Path) -> tuple[list[SimulatedTool], list[LoadError]]:
    """The simulated tools of a catalogue file (formats in the module doc) and per-tool load errors.

    Raises ``FileNotFoundError`` / ``ValueError`` only when the file as a whole is missing or unreadable.
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"simulated tool catalogue {file} does not exist")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{file} is not valid JSON: {exc}") from None
    entries = data.get("tools", [data]) if isinstance(data, dict) else data
    if not isinstance(entries, list):
        raise ValueError(f"{file}: expected a ToolBench tool, a list of tools or of OpenAI functions")
    label = str(file)
    tools: list[SimulatedTool] = []
    errors: list[LoadError] = []
    seen: set[str] = set()
    for index, entry in enumerate(entries):
        if not isinstance(entry, Mapping):
            errors.append(LoadError(label, f"#{index}", "entry is not a JSON object"))
            continue
        if "api_list" in entry:
            candidates = []
            for api in entry.get("api_list") or []:
                try:
                    candidates.append(_toolbench_api(entry, api))
                except (ValueError, AttributeError) as exc:
                    api_label = (
                        f"{entry.get('tool_name')}/{api.get('name') if isinstance(api, Mapping) else api}"
                    )
                    errors.append(LoadError(label, api_label, str(exc)))
        else:
            try:
                candidates = [_openai_tool(entry, source=f"simulated:{file.stem}")]
            except ValueError as exc:
                inner = entry.get("function", entry)
                name = inner.get("name") if isinstance(inner, Mapping) else None
                errors.append(LoadError(label, str(name or f"#{index}"), str(exc)))
                continue
        for tool in candidates:
            if tool.spec.name in seen:
                errors.append(LoadError(label, tool.spec.name, "duplicate tool name"))
                continue
            seen.add(tool.spec.name)
            tools.append(tool)
    for error in errors:
        logger.warning("tool not loaded: %s", error)
    return tools, errors


class SimulatedCache:
    """Responses of simulated calls keyed by (tool, canonical arguments); optionally kept in a JSONL file.

    The first response stored for a key wins, so concurrent or repeated calls answer the same. With a
    ``path``, existing lines are loaded and each new response is appended (one JSON object per line).
    """

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self._lock = threading.Lock()
        self._responses: dict[str, str] = {}
        self._by_tool: dict[str, list[str]] = {}
        if self.path is not None and self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    record = json.loads(line)
                    self._remember(record["key"], record["tool"], record["response"])

    @staticmethod
    def key(tool: str, arguments: Mapping[str, Any]) -> str:
        """The cache key: the canonical text of the call (sorted keys, 1 == 1.0)."""
        return canonical(ToolCall(tool, dict(arguments)))

    def _remember(self, key: str, tool: str, response: str) -> None:
        if key not in self._responses:
            self._responses[key] = response
            self._by_tool.setdefault(tool, []).append(response)

    def get(self, tool: str, arguments: Mapping[str, Any]) -> str | None:
        """The stored response of this call, if any."""
        with self._lock:
            return self._responses.get(self.key(tool, arguments))

    def put(self, tool: str, arguments: Mapping[str, Any], response: str) -> str:
        """Store a response unless one is already stored; return the stored one."""
        key = self.key(tool, arguments)
        with self._lock:
            if key in self._responses:
                return self._responses[key]
            self._remember(key, tool, response)
            if self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with self.path.open("a", encoding="utf-8") as handle:
                    record = {"key": key, "tool": tool, "arguments": dict(arguments), "response": response}
                    handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            return response

    def responses(self, tool: str) -> list[str]:
        """Responses stored for a tool, oldest first (examples that keep later answers consistent)."""
        with self._lock:
            return list(self._by_tool.get(tool, ()))

    def __len__(self) -> int:
        with self._lock:
            return len(self._responses)


class SimulatedExecutor:
    """Answers simulated calls: from the cache, else from the writer (then cached)."""

    def __init__(
        self,
        writer: ResponseWriter | None = None,
        cache: SimulatedCache | None = None,
        max_examples: int = 3,
        max_response_chars: int = DEFAULT_MAX_RESPONSE_CHARS,
    ) -> None:
        self.writer = writer
        self.cache = cache if cache is not None else SimulatedCache()
        self.max_examples = max_examples
        self.max_response_chars = max_response_chars

    def call(self, tool: SimulatedTool, arguments: Mapping[str, Any]) -> ToolResult:
        """The response of one call (arguments are assumed valid: the registry checked them)."""
        start = time.perf_counter()
        response = self.cache.get(tool.spec.name, arguments)
        if response is None:
            if self.writer is None:
                return ToolResult.failure(
                    f"simulated tool {tool.spec.name!r} has no cached response for these arguments and no "
                    "response writer is configured",
                    time.perf_counter() - start,
                )
            examples = [*tool.examples, *self.cache.responses(tool.spec.name)][: self.max_examples]
            try:
                written = self.writer.write(tool.spec, dict(arguments), examples)
            except Exception as exc:
                return ToolResult.failure(
                    f"the response writer failed for {tool.spec.name!r}: {type(exc).__name__}: {exc}",
                    time.perf_counter() - start,
                )
            if not isinstance(written, str):
                return ToolResult.failure(
                    f"the response writer returned {type(written).__name__}, not text",
                    time.perf_counter() - start,
                )
            response = self.cache.put(tool.spec.name, arguments, written)
        try:
            content: Any = json.loads(response)
        except json.JSONDecodeError:
            content = response
        content, truncated = truncate_content(content, self.max_response_chars)
        return ToolResult(ok=True, content=content, elapsed=time.perf_counter() - start, truncated=truncated)
