"""Simulated tools: catalogues with schemas but no implementation (ToolBench / StableToolBench style).

A simulated tool's response is WRITTEN by the teacher, on the same vLLM replica that builds the
dialogue (:class:`~ttpa_ray.reverse.ReverseBuilder`'s ``respond`` step), from the tool's schema and
description, the call's arguments, a few earlier responses of the same tool and the dialogue's
scenario (:func:`response_request`), under the tool's declared response schema where it has one (BFCL's
function docs do), else as a JSON object; an ``{"error": ...}`` object is the tool reporting a failure,
as BFCL's tools do. A response that fails the schema is a tool error and is never cached
(:func:`check_response`).

Responses are cached by (tool, canonical arguments): argument order, JSON spelling and ``1`` vs
``1.0`` do not matter, and the first response stored for a key is the one every later call gets. In
a reverse run the cache is one Ray actor shared by every replica (:func:`shared_cache`), kept in the
run dir as append-only part files (a part per flush, one writer, so no file is ever rewritten), and
loaded again by a resumed run. Other writers plug in through :class:`ResponseWriter` (the tests use a
deterministic one whose response restates its inputs).

Catalogues:
- a ToolBench tool JSON (``{"tool_name", "tool_description", "api_list": [{"name", "description",
  "required_parameters", "optional_parameters", "test_endpoint"...}]}``), a list of them, or
  ``{"tools": [...]}`` of them. Each API becomes the tool ``<api>_for_<tool>`` (ToolBench's naming,
  standardised and cut to the last 64 characters); ToolBench's parameter types map to JSON types
  (STRING/ENUM/DATE/TIME... -> string, NUMBER/FLOAT -> number, INTEGER -> integer, BOOLEAN -> boolean,
  ARRAY/LIST -> array, OBJECT -> object); an unknown type is a load error for that API. A non-empty
  ``test_endpoint`` is kept as the API's example response.
- a list of OpenAI tools (``{"type": "function", "function": {...}}`` or the bare function form),
  optionally with an ``examples`` list of response strings and a ``response`` schema beside each.
- ``bfcl-simulated`` (or ``bfcl-simulated:Class,...``): BFCL's eight multi-turn environments from
  their function docs only, with the docs' response schemas (:func:`load_bfcl_simulated`); the same
  tools as the executable ``bfcl`` catalogue, answered by the simulator.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import jsonschema

from ttpa_ray import store
from ttpa_ray.codec import ToolCall, canonical
from ttpa_ray.quality import restates_schema
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
    """Writes the response text of a simulated call synchronously (the reverse stage writes its
    responses on the replica's engine instead, batched with the dialogues' other steps)."""

    def write(self, tool_spec: ToolSpec, arguments: Mapping[str, Any], examples: Sequence[str]) -> str: ...


@dataclass(frozen=True)
class SimulatedTool:
    """A tool with a schema, example responses and maybe a response schema, but no implementation."""

    spec: ToolSpec
    examples: tuple[str, ...] = ()
    response_schema: dict[str, Any] | None = None
    class_name: str | None = None  # the BFCL environment a bfcl-simulated tool stands for


ERROR_RESPONSE = {
    "type": "object",
    "properties": {"error": {"type": "string", "maxLength": 200}},
    "required": ["error"],
    "additionalProperties": False,
}


def response_request(
    tool: SimulatedTool,
    arguments: Mapping[str, Any],
    examples: Sequence[str],
    scenario: str = "",
    *,
    errors: bool = True,
) -> tuple[list[dict[str, str]], dict[str, Any]]:
    """The chat messages and the JSON schema that make the teacher write one response of ``tool``.

    The schema admits the declared response (every declared property present), and with ``errors``
    an error object too.
    """
    from ttpa_ray.constraints import bounded_schema

    spec = tool.spec
    declared = tool.response_schema
    lines = [f"Tool: {spec.name}", f"Description: {spec.description}"]
    lines.append("Parameters: " + json.dumps(spec.parameters.get("properties", {}), ensure_ascii=False))
    if declared is not None:
        lines.append("Response schema: " + json.dumps(declared, ensure_ascii=False))
    lines += [f"Earlier response: {example}" for example in examples]
    if scenario:
        lines.append(f"Situation of the user: {scenario}")
    lines.append(f"Call: {spec.name}({json.dumps(dict(arguments), ensure_ascii=False)})")
    system = (
        "You are a tool server. Reply with the JSON response the tool returns for the call: realistic "
        "values, consistent with earlier responses and with the call's arguments."
    )
    if errors:
        system += ' If the call cannot succeed (something it names does not exist), reply {"error": "<why>"}.'
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "\n".join(lines)}]
    if declared is None:
        return messages, {"type": "object"}
    answer = {**declared, "type": "object", "additionalProperties": False}
    answer["required"] = list(answer.get("properties", {}))
    return messages, {"anyOf": [bounded_schema(answer), ERROR_RESPONSE]} if errors else bounded_schema(answer)


def is_error(content: Any) -> bool:
    """Whether a response is a tool reporting a failure (``{"error": ...}``, as BFCL's tools do)."""
    return isinstance(content, dict) and set(content) == {"error"}


def check_response(tool: SimulatedTool, text: str) -> tuple[Any, str | None]:
    """The response's content and what is wrong with it (None: a valid response or a tool error)."""
    try:
        content = json.loads(text, strict=False)
    except json.JSONDecodeError as exc:
        return None, f"the simulated response of {tool.spec.name!r} is not JSON ({exc.msg}): {text[:120]!r}"
    if not isinstance(content, dict):
        return None, f"the simulated response of {tool.spec.name!r} is not a JSON object"
    if is_error(content):
        return content, None
    restated = restates_schema(content, tool.response_schema)
    if restated is not None:  # the writer copied the tool's schema instead of answering the call
        return None, f"the simulated response of {tool.spec.name!r} restates a schema at {restated}"
    if tool.response_schema is None:
        return content, None
    try:
        jsonschema.validate(content, tool.response_schema)
    except jsonschema.ValidationError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "the top"
        return (
            None,
            f"the simulated response of {tool.spec.name!r} fails its schema at {where}: {exc.message}"[:300],
        )
    return content, None


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
    response = entry.get("response")
    if response is not None:
        if not isinstance(response, dict):
            raise ValueError("response must be a JSON schema object")
        try:
            jsonschema.Draft202012Validator.check_schema(response)
        except jsonschema.SchemaError as exc:
            raise ValueError(f"bad response schema: {exc.message}") from None
    return SimulatedTool(spec=spec, examples=examples, response_schema=response)


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


def load_bfcl_simulated(classes: Sequence[str] | None = None) -> tuple[list[SimulatedTool], list[LoadError]]:
    """BFCL's multi-turn environments as schema-only tools: specs and response schemas of their docs."""
    from ttpa_ray.tools.bfcl_envs import load_bfcl_tools

    tools, errors = load_bfcl_tools(classes)
    simulated = [
        SimulatedTool(
            spec=ToolSpec(
                t.spec.name, t.spec.description, t.spec.parameters, f"simulated:bfcl:{t.class_name}"
            ),
            response_schema=t.response,
            class_name=t.class_name,
        )
        for t in tools
    ]
    return simulated, errors


class SimulatedCache:
    """Responses of simulated calls by (tool, canonical arguments); the first stored for a key wins.

    With a ``folder`` (a local path or an object-store URI), the responses of its part files are
    loaded, and :meth:`flush` writes the responses stored since the last flush as one new part file.
    One writer per folder: in a run that is the Ray actor of :func:`shared_cache`.
    """

    def __init__(self, folder: str | Path | None = None) -> None:
        self.folder = str(folder) if folder is not None else None
        self._lock = threading.Lock()
        self._responses: dict[str, str] = {}
        self._by_tool: dict[str, list[str]] = {}
        self._unsaved: list[dict[str, Any]] = []
        for part in store.files(self.folder) if self.folder else []:
            for line in store.read_text(part).splitlines():
                if line.strip():
                    record = json.loads(line)
                    self._remember(record["key"], record["tool"], record["response"])

    @staticmethod
    def key(tool: str, arguments: Mapping[str, Any]) -> str:
        """The cache key: the canonical text of the call (sorted keys, 1 == 1.0)."""
        return canonical(ToolCall(tool, dict(arguments)))

    def _remember(self, key: str, tool: str, response: str) -> bool:
        if key in self._responses:
            return False
        self._responses[key] = response
        self._by_tool.setdefault(tool, []).append(response)
        return True

    def get(self, tool: str, arguments: Mapping[str, Any]) -> str | None:
        """The stored response of this call, if any."""
        with self._lock:
            return self._responses.get(self.key(tool, arguments))

    def put(self, tool: str, arguments: Mapping[str, Any], response: str) -> str:
        """Store a response unless one is already stored; return the stored one."""
        key = self.key(tool, arguments)
        with self._lock:
            if self._remember(key, tool, response):
                record = {"key": key, "tool": tool, "arguments": dict(arguments), "response": response}
                self._unsaved.append(record)
            return self._responses[key]

    def responses(self, tool: str, limit: int | None = None) -> list[str]:
        """Responses stored for a tool, oldest first (examples that keep later answers consistent)."""
        with self._lock:
            return list(self._by_tool.get(tool, ()))[:limit]

    def flush(self) -> int:
        """Write the responses stored since the last flush as one part file; how many."""
        with self._lock:
            records, self._unsaved = self._unsaved, []
        if records and self.folder:
            name = f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.jsonl"
            lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
            store.write_text(store.join(self.folder, name), lines)
        return len(records)

    def size(self) -> int:
        """How many calls have a stored response."""
        with self._lock:
            return len(self._responses)

    def __len__(self) -> int:
        return self.size()


class _ActorCache:
    """The :class:`SimulatedCache` interface over a Ray actor holding one (each call a round trip)."""

    def __init__(self, actor: Any) -> None:
        self.actor = actor

    def __getattr__(self, name: str) -> Any:
        import ray

        method = getattr(self.actor, name)
        return lambda *args: ray.get(method.remote(*args))


def shared_cache(folder: str) -> Any:
    """A :class:`SimulatedCache` actor on this (the driver's) node, for every replica of a run; Ray
    restarts it from its folder if it dies. Pass it to :func:`cache_of` where it is used."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node = ray.get_runtime_context().get_node_id()
    return (
        ray.remote(SimulatedCache)
        .options(
            num_cpus=0,
            max_restarts=-1,
            max_task_retries=-1,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=True),
        )
        .remote(folder)
    )


def cache_of(actor: Any) -> Any:
    """The cache interface of a :func:`shared_cache` actor (None: a cache of this process only)."""
    return SimulatedCache() if actor is None else _ActorCache(actor)


class SimulatedExecutor:
    """Answers simulated calls: from the cache, else from the writer (then cached)."""

    def __init__(
        self,
        writer: ResponseWriter | None = None,
        cache: Any = None,
        max_examples: int = 3,
        max_response_chars: int = DEFAULT_MAX_RESPONSE_CHARS,
    ) -> None:
        self.writer = writer
        self.cache = cache if cache is not None else SimulatedCache()
        self.max_examples = max_examples
        self.max_response_chars = max_response_chars

    def examples(self, tool: SimulatedTool) -> list[str]:
        """The catalogue's examples of a tool, then its earlier responses, at most ``max_examples``."""
        return [*tool.examples, *self.cache.responses(tool.spec.name, self.max_examples)][: self.max_examples]

    def answer(self, tool: SimulatedTool, arguments: Mapping[str, Any], text: str) -> ToolResult | None:
        """Cache a written response; a failure result if it is not a valid one (it is not cached then,
        unless another writer's valid response for the same call arrived meanwhile)."""
        content, problem = check_response(tool, text)
        if problem is None:
            self.cache.put(tool.spec.name, dict(arguments), json.dumps(content, ensure_ascii=False))
            return None
        if self.cache.get(tool.spec.name, dict(arguments)) is not None:
            return None
        return ToolResult.failure(problem)

    def call(self, tool: SimulatedTool, arguments: Mapping[str, Any]) -> ToolResult:
        """The response of one call (arguments are assumed valid: the registry checked them)."""
        start = time.perf_counter()
        response = self.cache.get(tool.spec.name, dict(arguments))
        if response is None:
            if self.writer is None:
                return ToolResult.failure(
                    f"simulated tool {tool.spec.name!r} has no cached response for these arguments and no "
                    "response writer is configured",
                    time.perf_counter() - start,
                )
            try:
                written = self.writer.write(tool.spec, dict(arguments), self.examples(tool))
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
            failure = self.answer(tool, arguments, written)
            if failure is not None:
                return failure
            response = self.cache.get(tool.spec.name, dict(arguments))
        content = json.loads(str(response))
        if is_error(content):
            return ToolResult.failure(str(content["error"]), time.perf_counter() - start)
        content, truncated = truncate_content(content, self.max_response_chars)
        return ToolResult(ok=True, content=content, elapsed=time.perf_counter() - start, truncated=truncated)
