"""MCP servers as a tool catalogue: ``mcp:<file>``, listed at load, called for real through the SDK.

The file follows the ``mcpServers`` convention other clients read, with a few keys of ours::

    {"mcpServers": {
        "time": {"command": "{here}/../.mcp/time/bin/mcp-server-time", "state": "shared"},
        "git":  {"command": "{here}/../.mcp/git/bin/mcp-server-git",
                 "args": ["--repository", "{scratch}/repo"],
                 "setup": [["git", "init", "-q", "repo"], ...],
                 "state": "per-dialogue"},
        "docs": {"url": "http://127.0.0.1:8931/mcp", "allow": ["search"]}}}

Per server: ``command``/``args``/``env`` (stdio) or ``url`` (streamable HTTP) with ``headers``;
``allow``/``deny`` (tool names); ``fixed`` (arguments the client fills in, e.g. the repository path,
hidden from the model: a model cannot know a scratch folder's path); ``error_pattern`` (a regular
expression: a text result it matches is a tool error, for servers that report failures as plain
text, as mcp-server-sqlite does); ``state``; ``network`` (default false); ``template`` (a file or
folder copied into the server's scratch folder) and ``setup`` (commands run there once, e.g. to make
a fixture repository or database); ``memory_mb``, ``max_processes``, ``start_timeout_s``,
``call_timeout_s``, ``spares``; ``max_sessions`` (a replica keeps no more dialogues in flight than
the smallest ``max_sessions`` of its per-dialogue servers: each such dialogue holds a process of
50-70 MB). In strings, ``{here}`` is the file's folder, ``{python}`` this Python, ``{scratch}`` the
server process's scratch folder, and ``${VAR}`` an environment variable.

Tools: each server is started at load and its tools listed; ``inputSchema`` is the tool's parameters
(checked like every catalogue's: a broken schema is a load error naming server and tool; pydantic's
``anyOf: [T, null]`` becomes ``type: [T, "null"]``; a required string or array may not be empty),
``outputSchema`` is checked on every result (by
the SDK), ``annotations`` stay on the binding. A name two servers share gets the server's name as a
prefix on both. A server that does not start is one load error naming it and its command.

State (see docs/design.md, "Real tools from MCP servers"): a server whose tools can change state (not
all ``readOnlyHint``, or ``state: per-dialogue``) gets one process per dialogue session, started on
the session's first call to it, with a scratch folder of its own copied from the server's prepared
template, so no dialogue sees another's writes; a dialogue's calls go one at a time. Started
processes wait as ``spares`` so a dialogue does not pay a start. A ``state: shared`` server serves
every call of the registry from one process, concurrently.

Every stdio server runs under :mod:`ttpa_ray.tools.mcp_launch` (own namespaces: no network unless
``network: true``, read-only filesystem but its scratch; memory and process caps) and dies with its
owner (:mod:`ttpa_ray.reaper`). Start-up and each call are bounded; a call that times out or whose
server dies is a tool error, and the server is started again for the next call.

Results as the model sees them: ``structuredContent`` when present, else the text blocks joined
(parsed when they are a JSON or Python literal object or array); ``isError`` is a tool error;
image, audio and resource blocks become a short note, never base64.
"""

from __future__ import annotations

import ast
import asyncio
import concurrent.futures
import contextlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ttpa_ray.records import ToolSpec
from ttpa_ray.tools.spec import (
    DEFAULT_MAX_RESPONSE_CHARS,
    LoadError,
    ToolResult,
    check_parameters_schema,
    to_json_compatible,
    truncate_content,
)

logger = logging.getLogger(__name__)

PREFIX = "mcp:"
PER_DIALOGUE = "per-dialogue"
SHARED = "shared"
MARKER_ENV = "TTPA_MCP_CONNECTION"  # finds a server's pid among our children
_DESCRIPTION_MAX_CHARS = 1024
_KEYS = {
    "command", "args", "env", "cwd", "url", "headers", "allow", "deny", "state", "network", "template",
    "setup", "memory_mb", "max_processes", "start_timeout_s", "call_timeout_s", "spares", "type", "fixed",
    "error_pattern", "max_sessions",
}  # fmt: skip


class McpConfigError(ValueError):
    """A servers file that cannot be used: one line naming the file and the server."""


@dataclass(frozen=True)
class McpServer:
    """One server of a servers file (placeholders but ``{scratch}`` resolved)."""

    name: str
    source: str  # the servers file
    command: str | None = None
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    url: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    allow: tuple[str, ...] | None = None
    deny: tuple[str, ...] = ()
    state: str | None = None  # None: per dialogue unless every tool says readOnlyHint
    network: bool = False
    template: str | None = None
    setup: tuple[tuple[str, ...], ...] = ()
    memory_mb: int = 1024
    max_processes: int = 256  # threads count: a Node server runs about a dozen
    start_timeout_s: float = 30.0
    call_timeout_s: float = 30.0
    spares: int = 2
    max_sessions: int = 32  # per replica: the reverse stage keeps no more of its dialogues in flight
    fixed: Mapping[str, Any] = field(default_factory=dict)  # argument -> value ({scratch} resolved per call)
    error_pattern: str | None = None  # a text result that matches (re.match) is a tool error

    def describe(self) -> str:
        """The command line (or URL) a user recognises in an error."""
        return self.url or " ".join([self.command or "", *self.args]).strip()


@dataclass(frozen=True)
class McpBinding:
    """A tool run by an MCP server (``tool``: the server's own name for it)."""

    server: McpServer
    tool: str
    stateful: bool
    annotations: Mapping[str, Any] = field(default_factory=dict)

    @property
    def group(self) -> str:
        """Seeds take a dialogue's tools from one writing server (as BFCL's from one environment), or
        from the read-only servers together (a one-tool calculator alone makes no multi-tool dialogue)."""
        return self.server.name if self.stateful else "shared servers"


# ------------------------------------------------------------------------------------- the file
def read_servers(path: str | Path) -> list[McpServer]:
    """The servers of an ``mcpServers`` file; :class:`McpConfigError` (one line) for a bad one."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise McpConfigError(f"MCP servers file {str(path)!r} does not exist") from None
    except (OSError, json.JSONDecodeError) as err:
        raise McpConfigError(f"MCP servers file {str(path)!r} is not readable JSON: {err}") from None
    entries = data.get("mcpServers") if isinstance(data, dict) else None
    if not isinstance(entries, dict) or not entries:
        raise McpConfigError(f"MCP servers file {str(path)!r} has no 'mcpServers' object of servers")
    here = str(path.resolve().parent)
    return [_server(name, entry, str(path), here) for name, entry in entries.items()]


def _expand(text: Any, here: str, where: str) -> str:
    if not isinstance(text, str | int | float):
        raise McpConfigError(f"{where}: expected a string, got {type(text).__name__}")
    return os.path.expandvars(str(text).replace("{here}", here).replace("{python}", sys.executable))


def _server(name: str, entry: Any, source: str, here: str) -> McpServer:
    where = f"MCP servers file {source!r}, server {name!r}"
    if not isinstance(entry, dict):
        raise McpConfigError(f"{where}: expected an object, got {type(entry).__name__}")
    unknown = sorted(set(entry) - _KEYS)
    if unknown:
        raise McpConfigError(f"{where}: unknown key(s) {unknown} (known: {sorted(_KEYS)})")
    if ("command" in entry) == ("url" in entry):
        raise McpConfigError(f"{where}: give exactly one of 'command' (stdio) or 'url' (streamable HTTP)")
    state = entry.get("state")
    if state not in (None, PER_DIALOGUE, SHARED):
        raise McpConfigError(f"{where}: state must be {PER_DIALOGUE!r} or {SHARED!r}, got {state!r}")
    if "url" in entry and state == PER_DIALOGUE:
        raise McpConfigError(f"{where}: a server behind a url cannot be started per dialogue; use 'shared'")

    def strings(key: str) -> tuple[str, ...]:
        value = entry.get(key, [])
        if not isinstance(value, list):
            raise McpConfigError(f"{where}: {key!r} must be a list")
        return tuple(_expand(v, here, f"{where}, {key}") for v in value)

    def mapping(key: str) -> dict[str, str]:
        value = entry.get(key, {})
        if not isinstance(value, dict):
            raise McpConfigError(f"{where}: {key!r} must be an object")
        return {str(k): _expand(v, here, f"{where}, {key}.{k}") for k, v in value.items()}

    setup = entry.get("setup", [])
    if not isinstance(setup, list) or not all(isinstance(c, list) and c for c in setup):
        raise McpConfigError(f"{where}: 'setup' must be a list of commands, each a non-empty list")
    template = entry.get("template")
    if template is not None:
        template = str(Path(here, _expand(template, here, f"{where}, template")))
        if not os.path.exists(template):
            raise McpConfigError(f"{where}: template {template!r} does not exist")
    try:
        numbers: dict[str, Any] = {
            key: type(default)(entry[key])
            for key, default in (
                ("memory_mb", 1024),
                ("max_processes", 256),
                ("start_timeout_s", 30.0),
                ("call_timeout_s", 30.0),
                ("spares", 2),
                ("max_sessions", 32),
            )
            if key in entry
        }
    except (TypeError, ValueError) as err:
        raise McpConfigError(f"{where}: {err}") from None
    return McpServer(
        name=name,
        source=source,
        command=_expand(entry["command"], here, f"{where}, command") if "command" in entry else None,
        args=strings("args"),
        env=mapping("env"),
        url=_expand(entry["url"], here, f"{where}, url") if "url" in entry else None,
        headers=mapping("headers"),
        allow=strings("allow") if "allow" in entry else None,
        deny=strings("deny"),
        state=state,
        network=bool(entry.get("network", False)),
        template=template,
        setup=tuple(tuple(_expand(a, here, f"{where}, setup") for a in command) for command in setup),
        fixed=_fixed(entry.get("fixed", {}), here, where),
        error_pattern=_pattern(entry.get("error_pattern"), where),
        **numbers,
    )


def _pattern(value: Any, where: str) -> str | None:
    if value is None:
        return None
    try:
        re.compile(str(value))
    except re.error as err:
        raise McpConfigError(f"{where}: error_pattern {value!r} is not a regular expression: {err}") from None
    return str(value)


def _fixed(value: Any, here: str, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise McpConfigError(f"{where}: 'fixed' must be an object of argument values")
    return {
        str(k): _expand(v, here, f"{where}, fixed.{k}") if isinstance(v, str) else v for k, v in value.items()
    }


def _without_fixed(parameters: Any, fixed: Mapping[str, Any]) -> Any:
    """The parameters the model sees: the fixed ones are the client's business."""
    if not fixed or not isinstance(parameters, dict) or not isinstance(parameters.get("properties"), dict):
        return parameters
    out = dict(parameters)
    out["properties"] = {k: v for k, v in parameters["properties"].items() if k not in fixed}
    if isinstance(parameters.get("required"), list):
        out["required"] = [k for k in parameters["required"] if k not in fixed]
    return out


def _with_fixed(arguments: dict[str, Any], fixed: Mapping[str, Any], scratch: Path) -> dict[str, Any]:
    def resolve(value: Any) -> Any:
        return value.replace("{scratch}", str(scratch)) if isinstance(value, str) else value

    return {**arguments, **{k: resolve(v) for k, v in fixed.items()}}


# ------------------------------------------------------------------------------------ the catalogue
def load_mcp_catalogue(path: str | Path) -> tuple[list[tuple[ToolSpec, McpBinding]], list[LoadError]]:
    """Start every server of the file (at once), list its tools, stop it: the tools and load errors."""
    servers = read_servers(path)
    with tempfile.TemporaryDirectory(prefix="ttpa-mcp-list-") as base:
        listed = _run_sync(_list_all(servers, Path(base)), timeout=None)
    errors: list[LoadError] = []
    found: list[tuple[McpServer, Any]] = []
    for server, outcome in zip(servers, listed, strict=True):
        if isinstance(outcome, BaseException):
            why = str(outcome) if isinstance(outcome, McpStartError | McpConfigError) else _why(outcome)
            error = LoadError(server.source, server.name, why)
            logger.warning("tool not loaded: %s", error)
            errors.append(error)
            continue
        for tool in outcome:
            if server.allow is not None and tool.name not in server.allow:
                continue
            if tool.name not in server.deny:
                found.append((server, tool))
    counts: dict[str, int] = {}
    read_only: dict[str, bool] = {}  # a server is per dialogue unless told, or all its tools only read
    for server, tool in found:
        counts[tool.name] = counts.get(tool.name, 0) + 1
        hint = bool(tool.annotations and tool.annotations.read_only_hint)
        read_only[server.name] = read_only.get(server.name, True) and hint
    tools: list[tuple[ToolSpec, McpBinding]] = []
    for server, tool in found:
        name = f"{server.name}_{tool.name}" if counts[tool.name] > 1 else tool.name
        parameters = non_empty(_without_fixed(normalise_schema(tool.input_schema), server.fixed))
        problems = check_parameters_schema(parameters)
        if problems:
            error = LoadError(server.source, f"{server.name}/{tool.name}", "; ".join(problems[:3]))
            logger.warning("tool not loaded: %s", error)
            errors.append(error)
            continue
        hints = tool.annotations
        annotations = hints.model_dump(by_alias=True, exclude_none=True) if hints else {}
        description = (tool.description or tool.title or "").strip()
        if len(description) > _DESCRIPTION_MAX_CHARS:
            description = description[: _DESCRIPTION_MAX_CHARS - 3].rstrip() + "..."
        spec = ToolSpec(name, description, parameters, source=PREFIX + server.name)
        stateful = server.state == PER_DIALOGUE or (server.state is None and not read_only[server.name])
        tools.append((spec, McpBinding(server, tool.name, stateful, annotations)))
    return tools, errors


def normalise_schema(schema: Any) -> Any:
    """An MCP input schema as the catalogue checks want it: pydantic's ``anyOf: [{type: T}, {type:
    null}]`` (an optional argument) becomes ``type: [T, "null"]``; ``$schema`` and titles go."""
    if isinstance(schema, list):
        return [normalise_schema(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: normalise_schema(v) for k, v in schema.items() if k not in ("$schema", "title")}
    if "properties" in schema and isinstance(schema["properties"], dict):  # property names, not keywords
        out["properties"] = {k: normalise_schema(v) for k, v in schema["properties"].items()}
    branches = out.get("anyOf")
    if "type" not in out and isinstance(branches, list) and all(isinstance(b, dict) for b in branches):
        null = [b for b in branches if b.get("type") == "null"]
        rest = [b for b in branches if b.get("type") != "null"]
        if all(set(b) == {"type"} and isinstance(b["type"], str) for b in branches):
            out.pop("anyOf")
            out["type"] = [b["type"] for b in branches]
        elif len(rest) == 1 and null and isinstance(rest[0].get("type"), str):
            out.pop("anyOf")
            out.update({k: v for k, v in rest[0].items() if k not in out})
            out["type"] = [rest[0]["type"], "null"]
    return out


def non_empty(schema: Any) -> Any:
    """Required strings and arrays, and the strings in arrays, that declare no lower bound get
    ``minLength`` / ``minItems`` 1, at every depth: servers accept ``create_entities([])`` or
    ``create_directory("")`` as successful calls, and a teacher with nothing to say writes exactly
    those (make run on MCP tools, 2026-12-07: most of the memory server's admitted calls). The
    decoding grammar and the argument check follow."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    if isinstance(out.get("items"), dict):  # an array's strings too: read_multiple_files(["", ""])
        items = non_empty(out["items"])
        out["items"] = {**items, "minLength": 1} if _unbounded_string(items) else items
    properties = out.get("properties")
    if isinstance(properties, dict):
        required = set(out.get("required") or [])
        fixed = {}
        for name, sub in properties.items():
            sub = non_empty(sub)
            if name in required and isinstance(sub, dict):
                if _unbounded_string(sub):
                    sub = {**sub, "minLength": 1}
                elif sub.get("type") == "array" and "minItems" not in sub:
                    sub = {**sub, "minItems": 1}
            fixed[name] = sub
        out["properties"] = fixed
    return out


def _unbounded_string(schema: dict[str, Any]) -> bool:
    bounded = {"minLength", "enum", "const", "pattern", "format"} & schema.keys()
    return schema.get("type") == "string" and not bounded


async def _list_all(servers: Sequence[McpServer], base: Path) -> list[Any]:
    async def one(index: int, server: McpServer) -> Any:
        folder = base / f"{index}-{server.name}"
        template = await asyncio.to_thread(prepare_template, server, folder / "template")
        connection = _Connection(server, _copy(template, folder / "scratch"), folder / "server.log")
        await connection.start()
        try:
            return connection.tools
        finally:
            await connection.close()

    return await asyncio.gather(*(one(i, s) for i, s in enumerate(servers)), return_exceptions=True)


def prepare_template(server: McpServer, folder: Path) -> Path:
    """The server's starting scratch folder: its ``template`` copied, its ``setup`` commands run."""
    folder.mkdir(parents=True, exist_ok=True)
    if server.template:
        source = Path(server.template)
        if source.is_dir():
            shutil.copytree(source, folder, symlinks=True, dirs_exist_ok=True)
        else:
            shutil.copy2(source, folder / source.name)
    for command in server.setup:
        argv = [a.replace("{scratch}", str(folder)) for a in command]
        try:
            done = subprocess.run(argv, cwd=folder, capture_output=True, text=True, timeout=120, check=False)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise McpConfigError(f"setup command {' '.join(argv)!r} failed: {err}") from None
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise McpConfigError(f"setup command {' '.join(argv)!r} exited {done.returncode}: {tail[0]}")
    return folder


def _copy(template: Path, scratch: Path) -> Path:
    shutil.copytree(template, scratch, symlinks=True)
    return scratch


def _why(exc: BaseException) -> str:
    """One line for an exception, looking inside anyio's exception groups."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


# ----------------------------------------------------------------------------- one server process
class McpStartError(RuntimeError):
    """A server that did not start: one line naming it and its command."""


class _Connection:
    """One running server (a process, or a session with a url) and its client session.

    The transport and the session are entered and left in one task (:meth:`_run`), as anyio wants;
    calls come from other tasks of the same loop.
    """

    def __init__(self, server: McpServer, scratch: Path, log: Path) -> None:
        self.server = server
        self.scratch = scratch
        self.log = log
        self.marker = uuid.uuid4().hex
        self.session: Any = None
        self.tools: list[Any] = []
        self.pid: int | None = None
        self.error: BaseException | None = None
        self.lock = asyncio.Lock()  # a dialogue's calls go one at a time
        self._ready = asyncio.Event()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def _stdio(self) -> Any:
        from mcp import StdioServerParameters
        from mcp.client.stdio import stdio_client

        server = self.server
        argv = [str(server.command), *server.args]
        argv = [a.replace("{scratch}", str(self.scratch)) for a in argv]
        launch = [
            "-m",
            "ttpa_ray.tools.mcp_launch",
            "--scratch",
            str(self.scratch),
            "--memory-mb",
            str(server.memory_mb),
            "--max-processes",
            str(server.max_processes),
            *(["--network"] if server.network else []),
            "--",
            *argv,
        ]
        env = {k: v.replace("{scratch}", str(self.scratch)) for k, v in server.env.items()}
        env[MARKER_ENV] = self.marker
        params = StdioServerParameters(command=sys.executable, args=launch, env=env, cwd=str(self.scratch))
        self._errlog = open(self.log, "a", encoding="utf-8")  # noqa: SIM115  (closed in _run)
        return stdio_client(params, errlog=self._errlog)

    @contextlib.asynccontextmanager
    async def _http(self) -> Any:
        import httpx2
        from mcp.client.streamable_http import streamable_http_client

        headers, timeout = dict(self.server.headers), self.server.call_timeout_s
        async with (
            httpx2.AsyncClient(headers=headers, timeout=timeout) as client,
            streamable_http_client(str(self.server.url), http_client=client) as streams,
        ):
            yield streams

    async def start(self) -> None:
        """Start the server and its session; :class:`McpStartError` if it is not ready in time."""
        self._task = asyncio.create_task(self._run())
        try:
            await asyncio.wait_for(self._ready.wait(), self.server.start_timeout_s)
        except TimeoutError:
            self.error = TimeoutError(f"not ready within {self.server.start_timeout_s:g} s")
        if self.session is None:
            await self.close(kill=True)
            why = self._last_words() or (_why(self.error) if self.error else "it exited")
            raise McpStartError(
                f"MCP server {self.server.name!r} ({self.server.describe()}) did not start: {why}"
            )

    def _last_words(self) -> str:
        """The last line the server wrote on stderr (why it died, usually)."""
        with contextlib.suppress(OSError):
            lines = [line for line in self.log.read_text(errors="replace").splitlines() if line.strip()]
            if lines:
                return lines[-1].strip()[:240]
        return ""

    async def _run(self) -> None:
        from mcp import ClientSession
        from mcp.types import PaginatedRequestParams

        try:
            async with (
                self._http() if self.server.url else self._stdio() as streams,
                ClientSession(streams[0], streams[1]) as session,
            ):
                await session.initialize()
                tools, cursor = [], None
                while True:  # listing also primes the SDK's output-schema checks
                    page = await session.list_tools(params=PaginatedRequestParams(cursor=cursor))
                    tools += page.tools
                    cursor = page.next_cursor
                    if not cursor:
                        break
                self.tools, self.session = tools, session
                self.pid = _child_with_marker(self.marker) if not self.server.url else None
                self._ready.set()
                await self._stop.wait()
        except BaseException as exc:
            self.error = exc
            if isinstance(exc, asyncio.CancelledError):
                raise
        finally:
            self.session = None
            self._ready.set()
            errlog = getattr(self, "_errlog", None)
            if errlog is not None:
                errlog.close()

    @property
    def alive(self) -> bool:
        """The session is up and (for a process) the process still runs."""
        if self.session is None or self._task is None or self._task.done():
            return False
        if self.pid is None:
            return True
        try:
            with open(f"/proc/{self.pid}/stat", encoding="ascii") as handle:
                return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    async def close(self, kill: bool = False) -> None:
        """End the session and the process (at once with ``kill``: a hung or crashed server)."""
        if kill and self.pid is not None:
            with contextlib.suppress(OSError):
                os.kill(self.pid, signal.SIGKILL)
        self._stop.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), 10)
            except (TimeoutError, asyncio.CancelledError, Exception):
                self._task.cancel()
        if self.pid is not None:
            _remove_cgroup(self.pid)


def _child_with_marker(marker: str) -> int | None:
    import psutil

    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if child.environ().get(MARKER_ENV) == marker:
                return int(child.pid)
    return None


def _remove_cgroup(pid: int) -> None:
    from ttpa_ray.tools.isolation import CGROUP_BASES, remove_cgroup

    for base in CGROUP_BASES:
        path = os.path.join(base, f"ttpa-tool-{pid}")
        if os.path.isdir(path):
            remove_cgroup(path)


# ----------------------------------------------------------------------------------- the results
def to_tool_result(
    result: Any, max_chars: int, elapsed: float, error_pattern: str | None = None
) -> ToolResult:
    """An MCP ``CallToolResult`` as the model sees it (see the module doc)."""
    parts = [_block_text(block) for block in result.content or []]
    text = "\n".join(p for p in parts if p)
    said_error = error_pattern is not None and result.structured_content is None
    said_error = said_error and re.match(str(error_pattern), text) is not None
    if result.is_error or said_error:
        return ToolResult.failure(text or "the tool reported an error", elapsed)
    content: Any = result.structured_content
    if content is None:
        content = _parsed(text)
    content, truncated = truncate_content(content, max_chars)
    return ToolResult(ok=True, content=content, elapsed=elapsed, truncated=truncated)


def _parsed(text: str) -> Any:
    """Text that is a JSON object or array, or a Python literal of one (mcp-server-sqlite prints its
    rows as ``str(list_of_dicts)``), as that data: the answer checks and the model then see values,
    not one blob. Anything else stays text."""
    stripped = text.strip()
    if not stripped.startswith(("{", "[")):
        return text
    with contextlib.suppress(ValueError):
        parsed = json.loads(stripped)
        if isinstance(parsed, dict | list):
            return parsed
    with contextlib.suppress(ValueError, SyntaxError, MemoryError, RecursionError):
        parsed = ast.literal_eval(stripped)
        if isinstance(parsed, dict | list):
            return to_json_compatible(parsed)
    return text


def _block_text(block: Any) -> str:
    kind = getattr(block, "type", "")
    if kind == "text":
        return str(block.text)
    if kind in ("image", "audio"):
        size = len(getattr(block, "data", "") or "") * 3 // 4
        return f"[{kind}: {getattr(block, 'mime_type', None) or 'unknown type'}, {size} bytes, not shown]"
    if kind == "resource":
        inner = block.resource
        return f"[resource: {inner.uri} ({getattr(inner, 'mime_type', None) or 'unknown type'}), not shown]"
    if kind == "resource_link":
        return f"[resource link: {block.uri}]"
    return f"[{kind or 'unknown'} block, not shown]"


# ------------------------------------------------------------------------------------- the hub
def _run_sync(coro: Any, timeout: float | None) -> Any:
    """Run a coroutine to completion on a private loop (catalogue listing, outside any hub)."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # safe inside a running loop (Ray, Jupyter)
        return pool.submit(asyncio.run, coro).result(timeout)


class McpHub:
    """The MCP server processes of one tool registry, on an event loop of their own (a thread).

    Thread-safe; :meth:`call` blocks until the call's result. Create it where it is used (a Ray
    actor): it owns processes, which die with it (the reaper).
    """

    def __init__(self, max_response_chars: int = DEFAULT_MAX_RESPONSE_CHARS) -> None:
        from ttpa_ray.reaper import watch_this_process

        watch_this_process()
        self.max_response_chars = max_response_chars
        self.base = Path(tempfile.mkdtemp(prefix="ttpa-mcp-"))
        self.starts: dict[str, int] = {}  # server -> processes started (spares included)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="ttpa-mcp", daemon=True)
        self._thread.start()
        self._templates: dict[str, Path] = {}
        self._shared: dict[str, _Connection] = {}
        self._sessions: dict[str, dict[str, _Connection]] = {}
        self._spares: dict[str, list[_Connection]] = {}
        self._refilling: set[str] = set()
        self._starting: dict[str, asyncio.Lock] = {}  # per (server, session): one start at a time
        self._preparing: dict[str, asyncio.Lock] = {}  # per server: its template is made once
        self._background: set[asyncio.Task[Any]] = set()
        self._closed = False

    def _submit(self, coro: Any, timeout: float) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def call(
        self, binding: McpBinding, arguments: Mapping[str, Any], session_key: str | None = None
    ) -> ToolResult:
        """Run one call: in the dialogue's own process for a stateful server (``session_key``), else on
        the shared process. Never raises for what the server does: a start failure, a timeout, a crash
        or a reported error is a failed :class:`ToolResult`."""
        server = binding.server
        budget = server.start_timeout_s + server.call_timeout_s + 30
        call = self._call(binding, dict(arguments), session_key)
        future = asyncio.run_coroutine_threadsafe(call, self._loop)
        try:
            return future.result(budget)
        except concurrent.futures.TimeoutError:  # a start and a call that both hung past their bounds
            future.cancel()
            why = f"MCP server {server.name!r} gave no answer to {binding.tool} in {budget:g} s"
            return ToolResult.failure(why)

    async def _call(self, binding: McpBinding, arguments: dict[str, Any], key: str | None) -> ToolResult:
        from mcp.shared.exceptions import MCPError
        from mcp.types import CONNECTION_CLOSED

        server, start = binding.server, time.perf_counter()
        try:
            connection = await self._connection(server, key)
        except (McpStartError, McpConfigError, OSError) as err:
            return ToolResult.failure(str(err), time.perf_counter() - start)
        async with connection.lock if key is not None else contextlib.nullcontext():
            try:
                arguments = _with_fixed(arguments, server.fixed, connection.scratch)
                result = await asyncio.wait_for(
                    connection.session.call_tool(binding.tool, arguments), server.call_timeout_s
                )
            except TimeoutError:
                await self._drop(connection, key)
                return ToolResult.failure(
                    f"{binding.tool} timed out after {server.call_timeout_s:g} s (MCP server "
                    f"{server.name!r} was stopped; the next call starts it again)",
                    time.perf_counter() - start,
                )
            except Exception as err:
                elapsed = time.perf_counter() - start
                closed = isinstance(err, MCPError) and err.code == CONNECTION_CLOSED  # before /proc says so
                if connection.alive and not closed and isinstance(err, MCPError | RuntimeError):
                    # An error the server answered (unknown tool) or a result the SDK refused
                    # (structured content that does not fit the tool's output schema).
                    return ToolResult.failure(f"{binding.tool}: {_why(err)}", elapsed)
                await self._drop(connection, key)
                return ToolResult.failure(
                    f"MCP server {server.name!r} died during the call to {binding.tool} ({_why(err)}); "
                    "the next call starts it again",
                    elapsed,
                )
        elapsed = time.perf_counter() - start
        return to_tool_result(result, self.max_response_chars, elapsed, server.error_pattern)

    async def _connection(self, server: McpServer, key: str | None) -> _Connection:
        lock = self._starting.setdefault(f"{server.name}/{key}", asyncio.Lock())
        async with lock:
            if key is None:
                connection = self._shared.get(server.name)
                if connection is None or not connection.alive:  # a restart keeps the scratch folder
                    scratch = self.base / "shared" / server.name
                    connection = await self._start(server, scratch, fresh=not scratch.exists())
                    self._shared[server.name] = connection
                return connection
            mine = self._sessions.setdefault(key, {})
            connection = mine.get(server.name)
            if connection is not None and connection.alive:
                return connection
            if connection is not None:  # crashed or stopped: the same scratch, so the state goes on
                connection = await self._start(server, connection.scratch, fresh=False)
            else:
                connection = await self._take_spare(server)
            mine[server.name] = connection
            return connection

    async def _template(self, server: McpServer) -> Path:
        async with self._preparing.setdefault(server.name, asyncio.Lock()):
            if server.name not in self._templates:
                folder = self.base / "templates" / server.name
                self._templates[server.name] = await asyncio.to_thread(prepare_template, server, folder)
        return self._templates[server.name]

    async def _start(self, server: McpServer, scratch: Path, fresh: bool = True) -> _Connection:
        template = await self._template(server)
        if fresh:
            scratch.parent.mkdir(parents=True, exist_ok=True)
            await asyncio.to_thread(_copy, template, scratch)
        logs = self.base / "logs"
        logs.mkdir(exist_ok=True)
        self.starts[server.name] = self.starts.get(server.name, 0) + 1
        connection = _Connection(server, scratch, logs / f"{server.name}-{self.starts[server.name]}.log")
        await connection.start()
        return connection

    async def _take_spare(self, server: McpServer) -> _Connection:
        spares = self._spares.setdefault(server.name, [])
        while spares:
            connection = spares.pop()
            if connection.alive:
                break
            await connection.close(kill=True)
        else:
            connection = await self._start(server, self._session_scratch(server))
        self._refill(server)
        return connection

    def _session_scratch(self, server: McpServer) -> Path:
        return self.base / "sessions" / server.name / uuid.uuid4().hex[:12]

    def _refill(self, server: McpServer) -> None:
        """Start spares in the background up to ``server.spares`` (one refill at a time per server)."""
        if server.spares <= 0 or server.name in self._refilling or self._closed:
            return
        self._refilling.add(server.name)

        async def refill() -> None:
            try:
                while len(self._spares.get(server.name, [])) < server.spares and not self._closed:
                    connection = await self._start(server, self._session_scratch(server))
                    if self._closed:
                        await connection.close()
                        return
                    self._spares.setdefault(server.name, []).append(connection)
            except (McpStartError, McpConfigError, OSError) as err:
                logger.warning("MCP spare not started: %s", err)
            finally:
                self._refilling.discard(server.name)

        self._track(refill())

    def _track(self, coro: Any) -> None:
        task = self._loop.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _drop(self, connection: _Connection, key: str | None) -> None:
        """Stop a hung or dead server; the next call of its owner starts it again."""
        await connection.close(kill=True)
        # A session's connection stays in its map, dead, so the restart keeps its scratch folder.
        if key is None and self._shared.get(connection.server.name) is connection:
            del self._shared[connection.server.name]

    def close_session(self, key: str) -> None:
        """End a dialogue's server processes and remove their scratch (in the background)."""
        if self._closed:
            return

        async def close() -> None:
            for connection in self._sessions.pop(key, {}).values():
                await connection.close()
                await asyncio.to_thread(shutil.rmtree, connection.scratch, True)
            for lock_key in [k for k in self._starting if k.endswith(f"/{key}")]:
                self._starting.pop(lock_key, None)

        self._loop.call_soon_threadsafe(self._track, close())

    def session_pids(self, key: str) -> dict[str, int | None]:
        """The pids of a dialogue's server processes, by server (tests kill them)."""
        return {name: c.pid for name, c in self._sessions.get(key, {}).items()}

    def shared_pid(self, server: str) -> int | None:
        """The pid of a shared server's process, if it runs."""
        connection = self._shared.get(server)
        return connection.pid if connection is not None else None

    def close(self) -> None:
        """Stop every server process and remove the scratch folders (idempotent)."""
        if self._closed:
            return
        self._closed = True

        async def close_all() -> None:
            for task in list(self._background):
                with contextlib.suppress(BaseException):
                    await asyncio.wait_for(task, 15)
            connections = [*self._shared.values(), *(c for s in self._spares.values() for c in s)]
            connections += [c for session in self._sessions.values() for c in session.values()]
            await asyncio.gather(*(c.close() for c in connections), return_exceptions=True)

        with contextlib.suppress(Exception):
            self._submit(close_all(), 60)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        shutil.rmtree(self.base, ignore_errors=True)
