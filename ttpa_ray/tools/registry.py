"""The tool registry: one catalogue, one calling interface, whatever the tools' source.

    catalogue = load_catalogue("builtin")            # or "bfcl", a folder of modules, a ToolBench JSON
    with ToolRegistry(catalogue) as tools:
        tools.call("get_weather", {"city": "Paris", "date": "2026-07-14"})       # -> ToolResult
        with tools.session("dialogue-17", scenario.initial_config) as dialogue:  # stateful (BFCL) tools
            dialogue.call("mkdir", {"dir_name": "reports"})
            dialogue.call("cd", {"folder": "reports"})

Every call is checked before it runs: an unknown tool or arguments that do not fit the schema come
back as ``ToolResult(ok=False)`` with a message the model can act on, without running anything.
Python-module and BFCL tools run in the sandbox pool (:mod:`ttpa_ray.tools.sandbox`); simulated tools
are answered by their cache or response writer (:mod:`ttpa_ray.tools.simulated`).

A session is one dialogue's view of the tools. Stateful BFCL tools (and stateful MCP servers, each a
process of the session's own) keep their state across the calls of a session and never share it
with another session. Outside a session they run on fresh objects (a fresh process), so
``registry.call`` never carries state from one call to the next.
Stateless tools answer the same in or out of a session.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ttpa_ray.records import ToolSpec
from ttpa_ray.tools import bfcl_envs
from ttpa_ray.tools.mcp import PREFIX as MCP_PREFIX
from ttpa_ray.tools.mcp import McpBinding, McpHub, load_mcp_catalogue
from ttpa_ray.tools.python_modules import load_module_folder, load_module_package
from ttpa_ray.tools.sandbox import (
    CallRequest,
    Executor,
    FunctionTarget,
    InProcessExecutor,
    ModuleRef,
    SandboxConfig,
    SandboxPool,
    SessionCallRequest,
    SessionState,
)
from ttpa_ray.tools.simulated import (
    ResponseWriter,
    SimulatedCache,
    SimulatedExecutor,
    SimulatedTool,
    load_bfcl_simulated,
    load_simulated_catalogue,
)
from ttpa_ray.tools.spec import LoadError, ToolResult, validate_arguments

logger = logging.getLogger(__name__)

BUILTIN_PACKAGE = "ttpa_ray.tools.builtin"
_NAMES_IN_MESSAGE = 30


@dataclass(frozen=True)
class ModuleBinding:
    """A tool run by calling a Python function in the sandbox."""

    target: FunctionTarget


@dataclass(frozen=True)
class BfclBinding:
    """A tool run as a method of a session's BFCL environment object."""

    class_name: str


@dataclass(frozen=True)
class SimulatedBinding:
    """A tool answered by the simulated-response cache and writer."""

    tool: SimulatedTool

    @property
    def class_name(self) -> str | None:
        """The BFCL environment a bfcl-simulated tool stands for (seeds group tools by it)."""
        return self.tool.class_name


Binding = ModuleBinding | BfclBinding | SimulatedBinding | McpBinding


@dataclass
class Catalogue:
    """Tool specs by name, how each tool runs, and what could not be loaded."""

    name: str
    specs: dict[str, ToolSpec] = field(default_factory=dict)
    bindings: dict[str, Binding] = field(default_factory=dict)
    errors: list[LoadError] = field(default_factory=list)

    def add(self, spec: ToolSpec, binding: Binding, source: str) -> None:
        """Add a tool; a name already taken becomes a load error instead."""
        if spec.name in self.specs:
            already = self.specs[spec.name].source
            error = LoadError(source, spec.name, f"duplicate tool name (already from {already})")
            logger.warning("tool not loaded: %s", error)
            self.errors.append(error)
            return
        self.specs[spec.name] = spec
        self.bindings[spec.name] = binding

    def __len__(self) -> int:
        return len(self.specs)

    def __contains__(self, name: object) -> bool:
        return name in self.specs

    @property
    def names(self) -> list[str]:
        """Tool names in load order."""
        return list(self.specs)

    def tools(self) -> list[ToolSpec]:
        """The specs, in load order."""
        return list(self.specs.values())

    def module_refs(self) -> list[ModuleRef]:
        """The modules the sandbox should preload to answer this catalogue's first calls fast."""
        refs: dict[ModuleRef, None] = {}
        classes: list[str] = []
        for binding in self.bindings.values():
            if isinstance(binding, ModuleBinding):
                refs[(binding.target.module, binding.target.path)] = None
            elif isinstance(binding, BfclBinding) and binding.class_name not in classes:
                classes.append(binding.class_name)
        for ref in bfcl_envs.module_refs(classes):
            refs[ref] = None
        return list(refs)

    def merged(self, *others: Catalogue, name: str | None = None) -> Catalogue:
        """One catalogue with the tools of this and ``others`` (later duplicates become load errors)."""
        result = Catalogue(name or "+".join([self.name, *(other.name for other in others)]))
        for catalogue in (self, *others):
            result.errors.extend(catalogue.errors)
            for tool_name, spec in catalogue.specs.items():
                result.add(spec, catalogue.bindings[tool_name], catalogue.name)
        return result


def load_catalogue(ref: str | Path, bfcl_classes: Sequence[str] | None = None) -> Catalogue:
    """Load a catalogue: ``"builtin"``, ``"bfcl"`` (or ``"bfcl:GorillaFileSystem,TravelAPI"``), the same
    environments schema-only (``"bfcl-simulated[:Class,...]"``), the tools of MCP servers
    (``"mcp:<servers.json>"``, :mod:`ttpa_ray.tools.mcp`), a folder of tool modules, or a
    simulated-tool JSON file (ToolBench style); ``"a+b"`` merges catalogues.

    Bad tools never stop the load: they are in ``Catalogue.errors`` (each also logged on one line).
    Raises ``ValueError`` / ``FileNotFoundError`` for a reference that names no catalogue at all.
    """
    text = str(ref)
    if "+" in text and not Path(text).exists():
        first, *rest = [load_catalogue(part, bfcl_classes) for part in text.split("+") if part]
        return first.merged(*rest, name=text)
    if text == "builtin":
        catalogue = Catalogue("builtin")
        tools, errors = load_module_package(BUILTIN_PACKAGE, source="builtin")
        catalogue.errors.extend(errors)
        for tool in tools:
            catalogue.add(tool.spec, ModuleBinding(tool.target), "builtin")
        return catalogue
    if text == "bfcl-simulated" or text.startswith("bfcl-simulated:"):
        catalogue = Catalogue(text)
        simulated, errors = load_bfcl_simulated(_class_names(text, "bfcl-simulated:", bfcl_classes))
        catalogue.errors.extend(errors)
        for sim in simulated:
            catalogue.add(sim.spec, SimulatedBinding(sim), "bfcl-simulated")
        return catalogue
    if text.startswith(MCP_PREFIX):
        catalogue = Catalogue(text)
        mcp_tools, errors = load_mcp_catalogue(text.removeprefix(MCP_PREFIX))
        catalogue.errors.extend(errors)
        for spec, binding in mcp_tools:
            catalogue.add(spec, binding, text)
        return catalogue
    if text == "bfcl" or text.startswith("bfcl:"):
        classes = _class_names(text, "bfcl:", bfcl_classes)
        catalogue = Catalogue(text)
        bfcl_tools, errors = bfcl_envs.load_bfcl_tools(classes)
        catalogue.errors.extend(errors)
        for bfcl_tool in bfcl_tools:
            catalogue.add(bfcl_tool.spec, BfclBinding(bfcl_tool.class_name), "bfcl")
        return catalogue
    path = Path(text)
    if path.is_dir():
        catalogue = Catalogue(text)
        tools, errors = load_module_folder(path)
        catalogue.errors.extend(errors)
        for tool in tools:
            catalogue.add(tool.spec, ModuleBinding(tool.target), str(path))
        return catalogue
    if path.is_file() and path.suffix.lower() == ".json":
        catalogue = Catalogue(text)
        simulated, errors = load_simulated_catalogue(path)
        catalogue.errors.extend(errors)
        for sim in simulated:
            catalogue.add(sim.spec, SimulatedBinding(sim), str(path))
        return catalogue
    raise ValueError(
        f"no tool catalogue at {text!r}: use 'builtin', 'bfcl' (or 'bfcl:Class,...'), 'bfcl-simulated' (or "
        "'bfcl-simulated:Class,...'), 'mcp:<servers.json>', a folder of tool modules, or a ToolBench-style "
        ".json file"
    )


def _class_names(text: str, prefix: str, default: Sequence[str] | None) -> Sequence[str] | None:
    """The BFCL classes a reference such as ``bfcl:GorillaFileSystem,TravelAPI`` names; ``default``
    for one without the ``prefix`` (None: all of them)."""
    if not text.startswith(prefix):
        return default
    return [name.strip() for name in text.removeprefix(prefix).split(",") if name.strip()]


@dataclass(frozen=True)
class ExecutedCall:
    """One call that really ran (refused calls are not logged): who asked, what, and what came back."""

    dialogue_id: str | None
    tool: str
    arguments: dict[str, Any]
    result: ToolResult


class ToolRegistry:
    """Calls the tools of a catalogue: validated, sandboxed, as :class:`ToolResult` (see module doc).

    ``isolated=False`` runs Python and BFCL tools in this process (no timeout, memory cap or network
    guard: trusted code, tests, benchmarks). The sandbox pool starts on the first call that needs it.
    Thread-safe. Create it where it is used (e.g. in a Ray actor's ``__init__``): it owns processes.
    """

    def __init__(
        self,
        catalogue: Catalogue,
        config: SandboxConfig | None = None,
        *,
        isolated: bool = True,
        writer: ResponseWriter | None = None,
        cache: Any = None,
    ) -> None:
        self.catalogue = catalogue
        self.config = config or SandboxConfig()
        self.isolated = isolated
        self.simulated = SimulatedExecutor(writer, cache, max_response_chars=self.config.max_response_chars)
        self._executor: Executor | None = None
        self._mcp: McpHub | None = None
        self._mcp_calls = {"calls": 0, "tool_errors": 0}
        self._lock = threading.Lock()
        self._closed = False
        # Every executed call, in order: proof that a dialogue's results came from real executions.
        self.call_log: list[ExecutedCall] = []

    # -- catalogue ---------------------------------------------------------------------------------

    @property
    def specs(self) -> list[ToolSpec]:
        """The tools' specs, in catalogue order."""
        return self.catalogue.tools()

    def simulated_tool(self, name: str) -> SimulatedTool | None:
        """The simulated tool of that name (None: no such tool, or one that really runs)."""
        binding = self.catalogue.bindings.get(name)
        return binding.tool if isinstance(binding, SimulatedBinding) else None

    def spec(self, name: str) -> ToolSpec:
        """The spec of one tool (KeyError naming the tool if unknown)."""
        try:
            return self.catalogue.specs[name]
        except KeyError:
            raise KeyError(self._unknown_tool(name)) from None

    # -- execution ---------------------------------------------------------------------------------

    @property
    def executor(self) -> Executor:
        """Where Python and BFCL tools run (the sandbox pool is started on first use)."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the tool registry is closed")
            if self._executor is None:
                if self.isolated:
                    pool = SandboxPool(self.config, preload=self.catalogue.module_refs())
                    pool.warm()
                    self._executor = pool
                else:
                    self._executor = InProcessExecutor(self.config)
            return self._executor

    @property
    def mcp(self) -> McpHub:
        """Where MCP tools run (server processes start on the calls that need them)."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the tool registry is closed")
            if self._mcp is None:
                self._mcp = McpHub(self.config.max_response_chars)
            return self._mcp

    def session_limit(self) -> int | None:
        """The most dialogue sessions that should run at once: the smallest ``max_sessions`` of the
        catalogue's per-dialogue MCP servers (None: no such server, no limit)."""
        bindings = self.catalogue.bindings.values()
        limits = [b.server.max_sessions for b in bindings if isinstance(b, McpBinding) and b.stateful]
        return min(limits) if limits else None

    def mcp_figures(self) -> dict[str, int]:
        """MCP calls so far, those that came back as tool errors, server processes started (empty
        when the catalogue has no MCP tool)."""
        if not any(isinstance(b, McpBinding) for b in self.catalogue.bindings.values()):
            return {}
        starts = sum(self._mcp.starts.values()) if self._mcp is not None else 0
        return {**self._mcp_calls, "starts": starts}

    def warm(self) -> None:
        """Start the sandbox pool now rather than on the first call."""
        _ = self.executor

    def _unknown_tool(self, name: str) -> str:
        names = self.catalogue.names
        shown = ", ".join(names[:_NAMES_IN_MESSAGE]) + (" ..." if len(names) > _NAMES_IN_MESSAGE else "")
        return f"unknown tool {name!r}; available tools: {shown or 'none'}"

    def refuse(self, name: Any, arguments: Any) -> ToolResult | None:
        """The error result for a call that must not run (unknown tool, invalid arguments), else None."""
        start = time.perf_counter()
        if not isinstance(name, str) or name not in self.catalogue.specs:
            return ToolResult.failure(self._unknown_tool(str(name)), time.perf_counter() - start)
        problem = validate_arguments(self.catalogue.specs[name], arguments)
        if problem is not None:
            return ToolResult.failure(problem, time.perf_counter() - start)
        return None

    def call(self, name: str, arguments: Mapping[str, Any] | None = None) -> ToolResult:
        """Run one tool call outside any session (BFCL tools on fresh default-state objects)."""
        arguments = {} if arguments is None else arguments
        refused = self.refuse(name, arguments)
        if refused is not None:
            return refused
        binding = self.catalogue.bindings[name]
        if isinstance(binding, BfclBinding) or (isinstance(binding, McpBinding) and binding.stateful):
            with self.session(f"call-{uuid.uuid4().hex[:8]}") as session:
                return session.call(name, arguments)
        return self._logged(None, name, arguments, self._run_stateless(name, binding, arguments))

    def _logged(
        self, dialogue_id: str | None, name: str, arguments: Mapping[str, Any], result: ToolResult
    ) -> ToolResult:
        self.call_log.append(ExecutedCall(dialogue_id, name, dict(arguments), result))
        if isinstance(self.catalogue.bindings.get(name), McpBinding):
            self._mcp_calls["calls"] += 1
            self._mcp_calls["tool_errors"] += 0 if result.ok else 1
        return result

    def _run_stateless(self, name: str, binding: Binding, arguments: Mapping[str, Any]) -> ToolResult:
        if isinstance(binding, SimulatedBinding):
            return self.simulated.call(binding.tool, arguments)
        if isinstance(binding, ModuleBinding):
            return self.executor.run(CallRequest(tool=name, target=binding.target, arguments=dict(arguments)))
        if isinstance(binding, McpBinding) and not binding.stateful:
            return self.mcp.call(binding, arguments)
        raise TypeError(f"tool {name!r} needs a session")  # BFCL, stateful MCP: routed through a session

    def session(self, dialogue_id: str, initial_config: Mapping[str, Any] | None = None) -> ToolSession:
        """A dialogue's view of the tools; BFCL state starts from ``initial_config`` (by class name)."""
        return ToolSession(self, dialogue_id, dict(initial_config or {}))

    def _close_session(self, state: SessionState) -> None:
        with self._lock:
            executor = None if self._closed else self._executor
            hub = None if self._closed else self._mcp
        if executor is not None:
            executor.close_session(state)
        if hub is not None:
            hub.close_session(state.key)

    def close(self) -> None:
        """Keep the simulated responses (a cache of this process with a folder) and stop the sandbox pool
        (idempotent)."""
        if isinstance(self.simulated.cache, SimulatedCache):
            self.simulated.cache.flush()
        with self._lock:
            self._closed = True
            executor, self._executor = self._executor, None
            hub, self._mcp = self._mcp, None
        if executor is not None:
            executor.close()
        if hub is not None:
            hub.close()

    def __enter__(self) -> ToolRegistry:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


class ToolSession:
    """One dialogue's tools: same ``call`` as the registry, with BFCL state kept across its calls."""

    def __init__(self, registry: ToolRegistry, dialogue_id: str, initial_config: dict[str, Any]) -> None:
        self.registry = registry
        self.dialogue_id = dialogue_id
        self.initial_config = initial_config
        # The key is unique even if a dialogue id is reused (a retried dialogue must start afresh).
        self._state = SessionState(
            key=f"{dialogue_id}/{uuid.uuid4().hex[:12]}",
            environment=bfcl_envs.BFCL_ENVIRONMENT,
            initial_config=initial_config,
        )
        self._lock = threading.Lock()
        self._closed = False

    @property
    def calls_run(self) -> int:
        """How many stateful calls ran to completion in this session (their effects are its state)."""
        return len(self._state.history)

    def call(self, name: str, arguments: Mapping[str, Any] | None = None) -> ToolResult:
        """Run one tool call in this dialogue."""
        arguments = {} if arguments is None else arguments
        refused = self.registry.refuse(name, arguments)
        if refused is not None:
            return refused
        binding = self.registry.catalogue.bindings[name]
        if isinstance(binding, McpBinding) and binding.stateful:  # this dialogue's own server process
            with self._lock:
                if self._closed:
                    return ToolResult.failure(f"the tool session of dialogue {self.dialogue_id!r} is closed")
                result = self.registry.mcp.call(binding, arguments, self._state.key)
            return self.registry._logged(self.dialogue_id, name, arguments, result)
        if not isinstance(binding, BfclBinding):
            result = self.registry._run_stateless(name, binding, arguments)
            return self.registry._logged(self.dialogue_id, name, arguments, result)
        request = SessionCallRequest(
            session_key=self._state.key,
            tool=name,
            component=binding.class_name,
            method=name,
            arguments=dict(arguments),
        )
        with self._lock:
            if self._closed:
                return ToolResult.failure(f"the tool session of dialogue {self.dialogue_id!r} is closed")
            result = self.registry.executor.run_in_session(self._state, request)
        return self.registry._logged(self.dialogue_id, name, arguments, result)

    def close(self) -> None:
        """Drop this dialogue's environment objects (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self.registry._close_session(self._state)

    def __enter__(self) -> ToolSession:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
