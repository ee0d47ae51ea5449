"""Where tool code runs: a warm pool of worker processes, or (trusted code, tests, bench) this process.

Every executor runs the same :class:`ToolHost`, so a call answers the same in or out of the pool; the
pool only adds the guards:

- wall-clock timeout per call (default 10 s): a worker that does not answer in time is killed
  (SIGKILL) and replaced by a fresh one; the caller gets a ``timed out`` error;
- a crash of the worker (segfault, ``os._exit``, OOM kill) becomes an error naming the exit code or
  signal, and the worker is replaced; the caller's process is never at risk;
- memory cap: ``RLIMIT_AS`` set in the worker to its start-up address space plus ``memory_mb``, so a
  tool that allocates more than that gets ``MemoryError`` there (relative, because what a worker maps
  at start-up depends on the caller: a worker re-imports the caller's main script, which inside a Ray
  actor means Ray itself);
- isolation (``tools/isolation.py``): each worker lives in its own network namespace (no interface
  up: no connection leaves it, from ``socket``, a subprocess or ctypes) and mount namespace (every
  mount read-only but the worker's scratch folder, its working directory), in its own process
  group, with a cap on its processes (``max_processes``: RLIMIT_NPROC, or a pids cgroup for root);
  whatever a call started is killed when it returns. Where the machine refuses namespaces, the pool
  says once what is not enforced and keeps the guard below;
- the network guard, kept under the namespace: ``socket.socket``, ``socket.create_connection`` and
  ``socket.getaddrinfo`` raise ``PermissionError("network disabled for tools")``;
- stdout and stderr of a tool are captured per call into a bounded buffer (and the worker's fd 1 goes
  to /dev/null), so a tool printing megabytes neither floods the caller's terminal nor touches the
  pipe that carries requests and replies.

Stateful environments (BFCL) and the pool: a session is PINNED to one worker, which holds that
dialogue's live objects between calls (one set of objects per session, so state never leaks between
dialogues). The caller keeps the session's recipe (environment, initial config) and the log of the
calls that completed. When the worker dies (timeout, crash), the next call of the session replays
that log on the replacement worker before running: BFCL environments are deterministic (seeded), so
the state comes back as it was, minus the call that was killed (a worker found dead while idle is
replaced the same way, and the call that finds it is not charged with an error). Trade-off: a
session's calls run on one worker, one at a time (fine: a dialogue is sequential), sessions pinned
to the same worker wait for each other (sessions are spread over the workers, fewest first), and a
replay after a crash costs the session's earlier calls again; in exchange stateful tools get the
same timeout, memory and network guards as every other tool, which keeping them in the caller's
process could not give (a hung thread cannot be killed).

Start method: ``forkserver`` (default; a fork of a small server process preloaded with this module, so
replacing a worker is cheap and the caller's threads, Ray or vLLM state are never forked) or
``spawn``. A script that builds a pool needs the ``if __name__ == "__main__":`` guard.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import importlib.util
import io
import itertools
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from types import ModuleType
from typing import Any, Literal, Protocol

from ttpa_ray.reaper import watch_this_process
from ttpa_ray.tools.spec import (
    DEFAULT_MAX_RESPONSE_CHARS,
    TRUNCATION_MARKER,
    ToolResult,
    to_json_compatible,
    truncate_content,
    truncate_text,
)

logger = logging.getLogger(__name__)

NETWORK_DISABLED = "network disabled for tools"
_ERROR_MAX_CHARS = 2000


@dataclass(frozen=True)
class SandboxConfig:
    """How tools run: worker count, per-call timeout, memory cap, network, response size."""

    workers: int = 2
    timeout_s: float = 10.0
    memory_mb: int | None = 2048  # address space a call may add to the idle worker's; None: no cap
    allow_network: bool = False
    isolate: bool = True  # own network and mount namespaces, read-only filesystem (tools/isolation.py)
    max_processes: int | None = 128  # tasks a worker and everything it starts may have at once
    max_response_chars: int = DEFAULT_MAX_RESPONSE_CHARS
    start_method: Literal["forkserver", "spawn"] = "forkserver"
    startup_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"SandboxConfig.workers must be >= 1, got {self.workers}")
        if self.timeout_s <= 0:
            raise ValueError(f"SandboxConfig.timeout_s must be > 0, got {self.timeout_s}")
        if self.max_response_chars < 1:
            raise ValueError(f"SandboxConfig.max_response_chars must be >= 1, got {self.max_response_chars}")


# ---------------------------------------------------------------------------------------------------
# Messages between the caller and a host (picklable, small).


@dataclass(frozen=True)
class FunctionTarget:
    """A Python function by location: an importable module name, or a module file loaded by path."""

    module: str
    function: str
    path: str | None = None  # set for modules of a tool folder, loaded under the name ``module``


@dataclass(frozen=True)
class EnvironmentSpec:
    """How a stateful environment's objects are built: one object per component (class) and session.

    ``classes`` maps a component name to ``"module:Class"``; an object is made on the session's first
    call to one of its methods, then, unless the component is stateless, given its state with
    ``getattr(obj, state_loader)(deepcopy(initial_config.get(component, {})))``.
    """

    classes: Mapping[str, str]
    state_loader: str | None = "_load_scenario"
    stateless: frozenset[str] = frozenset()


@dataclass(frozen=True)
class CallRequest:
    """Run ``target(**arguments)``; ``tool`` names it in messages."""

    tool: str
    target: FunctionTarget
    arguments: Mapping[str, Any]
    error_key: str | None = None  # a dict result holding this key is the tool saying it failed


@dataclass(frozen=True)
class SessionCallRequest:
    """Run ``method(**arguments)`` on the session's object of ``component``."""

    session_key: str
    tool: str
    component: str
    method: str
    arguments: Mapping[str, Any]
    error_key: str | None = "error"


@dataclass(frozen=True)
class OpenSession:
    """Create a session's state on a host, replaying the calls that completed before (if any)."""

    session_key: str
    environment: EnvironmentSpec
    initial_config: Mapping[str, Any]
    replay: tuple[SessionCallRequest, ...] = ()


@dataclass(frozen=True)
class CloseSession:
    """Drop a session's objects."""

    session_key: str


@dataclass(frozen=True)
class HostReply:
    """A host's answer; the caller adds the elapsed time to make a :class:`ToolResult`."""

    ok: bool
    content: Any = None
    error: str | None = None
    truncated: bool = False
    stdout: str = ""

    def to_result(self, elapsed: float) -> ToolResult:
        return ToolResult(
            ok=self.ok,
            content=self.content,
            error=self.error,
            elapsed=elapsed,
            truncated=self.truncated,
            stdout=self.stdout,
        )


Message = CallRequest | SessionCallRequest | OpenSession | CloseSession
ModuleRef = tuple[str, str | None]  # (module name, file path or None for an importable module)


@dataclass
class SessionState:
    """The caller's side of a session: its recipe and the calls that completed (for replay)."""

    key: str
    environment: EnvironmentSpec
    initial_config: Mapping[str, Any]
    history: list[SessionCallRequest] = field(default_factory=list)
    slot: int | None = None  # the pool slot the session is pinned to
    generation: int = -1  # the worker incarnation holding the live objects; -1: none yet


# ---------------------------------------------------------------------------------------------------
# The host: runs calls, in a worker process or in the caller's.


class _BoundedText(io.TextIOBase):
    """A text sink keeping the first ``limit`` characters and counting the rest."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._parts: list[str] = []
        self._kept = 0
        self._dropped = 0

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        room = self._limit - self._kept
        if room > 0:
            piece = text[:room]
            self._parts.append(piece)
            self._kept += len(piece)
        self._dropped += max(0, len(text) - max(room, 0))
        return len(text)

    def text(self) -> str:
        kept = "".join(self._parts)
        return kept + TRUNCATION_MARKER.format(dropped=self._dropped) if self._dropped else kept


def _describe_exception(exc: BaseException, memory_mb: int | None) -> str:
    if isinstance(exc, MemoryError):
        cap = f" (limit {memory_mb} MiB)" if memory_mb else ""
        return f"MemoryError: the tool ran out of memory{cap}"
    if isinstance(exc, SystemExit):
        return f"SystemExit: the tool tried to exit the process (code {exc.code!r})"
    message = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return message if len(message) <= _ERROR_MAX_CHARS else message[:_ERROR_MAX_CHARS] + "..."


class _LiveSession:
    def __init__(self, environment: EnvironmentSpec, initial_config: Mapping[str, Any]) -> None:
        self.environment = environment
        self.initial_config = initial_config
        self.objects: dict[str, Any] = {}


class ToolHost:
    """Runs requests: functions by target, and methods of per-session environment objects."""

    def __init__(self, max_response_chars: int = DEFAULT_MAX_RESPONSE_CHARS, memory_mb: int | None = None):
        self.max_response_chars = max_response_chars
        self.memory_mb = memory_mb
        self._modules: dict[tuple[str, str | None], ModuleType] = {}
        self._sessions: dict[str, _LiveSession] = {}

    def handle(self, message: Message) -> HostReply:
        """Answer one message; never raises (short of the interpreter dying)."""
        try:
            if isinstance(message, CallRequest):
                return self._run_function(message)
            if isinstance(message, SessionCallRequest):
                return self._run_session_call(message)
            if isinstance(message, OpenSession):
                return self._open_session(message)
            if isinstance(message, CloseSession):
                self._sessions.pop(message.session_key, None)
                return HostReply(ok=True)
            return HostReply(ok=False, error=f"unknown message {type(message).__name__}")
        except Exception as exc:  # a failure of the host itself, reported rather than fatal
            return HostReply(ok=False, error=_describe_exception(exc, self.memory_mb))

    def preload(self, modules: Sequence[ModuleRef]) -> None:
        """Import ``modules`` now (a warm worker answers its first call fast); failures wait for a call."""
        for name, path in modules:
            with contextlib.suppress(Exception):
                self._module(name, path)

    def _module(self, name: str, path: str | None) -> ModuleType:
        key = (name, path)
        module = self._modules.get(key)
        if module is not None:
            return module
        if path is None:
            module = importlib.import_module(name)
        else:
            loaded = sys.modules.get(name)
            if loaded is not None and getattr(loaded, "__file__", None) == path:
                module = loaded  # in-process: the catalogue loader imported it already
            else:
                spec = importlib.util.spec_from_file_location(name, path)
                if spec is None or spec.loader is None:
                    raise ImportError(f"cannot load a module from {path}")
                module = importlib.util.module_from_spec(spec)
                # Registered before running so that the module's own dataclasses and pickling find it.
                sys.modules[name] = module
                spec.loader.exec_module(module)
        self._modules[key] = module
        return module

    def _resolve(self, target: FunctionTarget) -> Callable[..., Any]:
        try:
            module = self._module(target.module, target.path)
        except BaseException as exc:
            where = target.path or target.module
            raise RuntimeError(
                f"could not load tool module {where}: {_describe_exception(exc, None)}"
            ) from exc
        function = getattr(module, target.function, None)
        if not callable(function):
            raise RuntimeError(f"{target.module} has no function {target.function!r}")
        return function

    def _invoke(
        self, function: Callable[..., Any], arguments: Mapping[str, Any], error_key: str | None
    ) -> HostReply:
        captured = _BoundedText(self.max_response_chars)
        try:
            with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
                value = function(**arguments)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # SystemExit too: a tool must not end the worker
            return HostReply(ok=False, error=_describe_exception(exc, self.memory_mb), stdout=captured.text())
        value = to_json_compatible(value)
        if error_key is not None and isinstance(value, dict) and error_key in value:
            error = str(value[error_key])
            return HostReply(
                ok=False, error=truncate_text(error, _ERROR_MAX_CHARS)[0], stdout=captured.text()
            )
        content, truncated = truncate_content(value, self.max_response_chars)
        return HostReply(ok=True, content=content, truncated=truncated, stdout=captured.text())

    def _run_function(self, request: CallRequest) -> HostReply:
        try:
            function = self._resolve(request.target)
        except RuntimeError as exc:
            return HostReply(ok=False, error=str(exc))
        return self._invoke(function, request.arguments, request.error_key)

    def _session_object(self, session: _LiveSession, component: str) -> Any:
        obj = session.objects.get(component)
        if obj is not None:
            return obj
        environment = session.environment
        location = environment.classes.get(component)
        if location is None:
            raise RuntimeError(f"the environment has no component {component!r}")
        module_name, _, class_name = location.partition(":")
        cls = getattr(importlib.import_module(module_name), class_name)
        obj = cls()
        if environment.state_loader and component not in environment.stateless:
            state = copy.deepcopy(dict(session.initial_config.get(component, {}) or {}))
            getattr(obj, environment.state_loader)(state)
        session.objects[component] = obj
        return obj

    def _run_session_call(self, request: SessionCallRequest) -> HostReply:
        session = self._sessions.get(request.session_key)
        if session is None:
            return HostReply(ok=False, error=f"session {request.session_key!r} is not open on this host")
        try:
            obj = self._session_object(session, request.component)
        except Exception as exc:
            return HostReply(
                ok=False, error=f"could not create {request.component}: {_describe_exception(exc, None)}"
            )
        method = getattr(obj, request.method, None)
        if request.method.startswith("_") or not callable(method):
            return HostReply(ok=False, error=f"{request.component} has no tool {request.method!r}")
        return self._invoke(method, request.arguments, request.error_key)

    def _open_session(self, message: OpenSession) -> HostReply:
        session = _LiveSession(message.environment, message.initial_config)
        self._sessions[message.session_key] = session
        for earlier in message.replay:
            # Outcomes were already reported when the calls first ran; only their effect on state matters.
            self._run_session_call(earlier)
        return HostReply(ok=True)


# ---------------------------------------------------------------------------------------------------
# Executors: where a host runs.


class Executor(Protocol):
    """What the registry needs from a place to run tools."""

    def run(self, request: CallRequest) -> ToolResult: ...

    def run_in_session(self, session: SessionState, request: SessionCallRequest) -> ToolResult: ...

    def close_session(self, session: SessionState) -> None: ...

    def close(self) -> None: ...


class InProcessExecutor:
    """Runs tools in the caller's process: no timeout, memory cap or network guard.

    For trusted code, tests and the bench baseline. Calls are serialised: capturing stdout swaps the
    process-wide ``sys.stdout``.
    """

    def __init__(self, config: SandboxConfig | None = None) -> None:
        self.config = config or SandboxConfig()
        self._host = ToolHost(self.config.max_response_chars)
        self._lock = threading.Lock()

    def run(self, request: CallRequest) -> ToolResult:
        """Run one stateless call."""
        start = time.perf_counter()
        with self._lock:
            reply = self._host.handle(request)
        return reply.to_result(time.perf_counter() - start)

    def run_in_session(self, session: SessionState, request: SessionCallRequest) -> ToolResult:
        """Run one call of a session, creating the session's state on first use."""
        start = time.perf_counter()
        with self._lock:
            if session.generation != 0:
                self._host.handle(OpenSession(session.key, session.environment, session.initial_config))
                session.generation = 0
            reply = self._host.handle(request)
        session.history.append(request)
        return reply.to_result(time.perf_counter() - start)

    def close_session(self, session: SessionState) -> None:
        """Drop the session's objects."""
        with self._lock:
            self._host.handle(CloseSession(session.key))
        session.generation = -1

    def close(self) -> None:
        """Nothing to release."""


@dataclass(frozen=True)
class _WorkerSettings:
    max_response_chars: int
    memory_mb: int | None
    allow_network: bool
    preload: tuple[ModuleRef, ...]
    isolate: bool = True
    max_processes: int | None = None


def _install_network_guard() -> None:
    """Make new sockets, connections and name lookups raise in this process (a guard, see module doc)."""

    def refuse(*_args: Any, **_kwargs: Any) -> Any:
        raise PermissionError(NETWORK_DISABLED)

    class _GuardedSocket(socket.socket):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            # Wrapping an existing descriptor (socketpair, fromfd) stays allowed: it opens nothing new.
            if kwargs.get("fileno") is None and len(args) < 4:
                raise PermissionError(NETWORK_DISABLED)
            super().__init__(*args, **kwargs)

    socket.socket = _GuardedSocket  # type: ignore[misc]
    socket.create_connection = refuse
    socket.getaddrinfo = refuse
    socket.gethostbyname = refuse


def _address_space_bytes() -> int:
    """This process's current virtual address space (0 where /proc is not available)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as handle:
            return int(handle.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _set_memory_cap(memory_mb: int) -> None:
    import resource

    cap = _address_space_bytes() + memory_mb * 1024 * 1024
    _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))


def _end_descendants() -> None:
    """Kill whatever a call left running (a tool's subprocesses, forks): a call leaves nothing behind."""
    me = os.getpid()
    try:
        with open(f"/proc/{me}/task/{me}/children", encoding="ascii") as handle:
            if not handle.read().strip():
                return
    except OSError:
        pass
    import psutil

    children = psutil.Process(me).children(recursive=True)
    for child in children:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    psutil.wait_procs(children, timeout=5)  # reaps the direct children: no zombie stays behind


def _worker_main(conn: Connection, settings: _WorkerSettings, scratch: str) -> None:
    """Entry point of a worker process: serve requests until the pipe closes."""
    from ttpa_ray.tools import isolation

    # Ctrl-C in the terminal reaches the whole process group; the caller decides what stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.setpgrp()  # a group of its own: killing the worker takes whatever its tools started with it
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # output below Python (C code, subprocesses) never reaches the caller's stdout
    host = ToolHost(settings.max_response_chars, settings.memory_mb)
    host.preload(settings.preload)
    missing: list[str] = []
    cgroup = None
    if settings.max_processes is not None:
        cgroup, not_capped = isolation.cap_processes(settings.max_processes)
        missing += [not_capped] if not_capped else []
    if settings.isolate:
        missing += isolation.isolate(scratch, network=settings.allow_network)
    if not settings.allow_network:
        _install_network_guard()  # kept under the namespace: the same message for a refused socket
    if settings.memory_mb is not None:
        _set_memory_cap(settings.memory_mb)
    me = os.getpid()
    conn.send(("ready", me, missing, cgroup))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            break
        if message is None:
            break
        reply = host.handle(message)
        if os.getpid() != me:  # a process the tool forked came back here: it must never answer
            os._exit(0)
        _end_descendants()
        try:
            conn.send(reply)
        except (BrokenPipeError, OSError):
            break


@dataclass
class _Worker:
    slot: int
    generation: int
    process: Any  # multiprocessing.process.BaseProcess (the context's Process class)
    conn: Connection
    scratch: str
    ready: bool = False
    cgroup: str | None = None


_reported_missing: set[str] = set()  # what isolation could not enforce, said once per process


class _Failure(Exception):
    """The worker did not answer; carries the message for the caller."""


def _exit_description(exitcode: int | None) -> str:
    if exitcode is None:
        return "still running"
    if exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"


class SandboxPool:
    """A warm pool of worker processes running a :class:`ToolHost` each (see the module doc).

    Thread-safe: each call holds one worker; a session's calls go to the worker it is pinned to.
    Create it where it is used (inside a Ray actor, not before shipping an object to one): it owns
    processes and pipes, which do not pickle.
    """

    def __init__(self, config: SandboxConfig | None = None, preload: Sequence[ModuleRef] = ()) -> None:
        self.config = config or SandboxConfig()
        self._settings = _WorkerSettings(
            max_response_chars=self.config.max_response_chars,
            memory_mb=self.config.memory_mb,
            allow_network=self.config.allow_network,
            preload=tuple(preload),
            isolate=self.config.isolate,
            max_processes=self.config.max_processes,
        )
        watch_this_process()  # the workers (and whatever a tool started) die with the pool's host
        self._ctx = multiprocessing.get_context(self.config.start_method)
        if self.config.start_method == "forkserver":
            # Only effective if this process has not started its forkserver yet; harmless otherwise.
            self._ctx.set_forkserver_preload(["ttpa_ray.tools.sandbox"])
        self._generations = itertools.count()
        self._cond = threading.Condition()
        self._closed = False
        self._busy = [False] * self.config.workers
        self._sessions_per_slot = [0] * self.config.workers
        self._workers = [self._start_worker(slot) for slot in range(self.config.workers)]
        self.replaced = 0  # workers killed or found dead and replaced (for tests and logs)
        self.not_enforced: list[str] = []  # what the last worker to start could not isolate

    # -- worker lifecycle -------------------------------------------------------------------------

    def _start_worker(self, slot: int) -> _Worker:
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        scratch = tempfile.mkdtemp(prefix=f"ttpa-tool-{slot}-")  # the one folder its tools may write
        process = self._ctx.Process(  # type: ignore[attr-defined]
            target=_worker_main,
            args=(child_conn, self._settings, scratch),
            name=f"ttpa-tool-worker-{slot}",
            daemon=True,
        )
        process.start()
        # The parent's copy of the child end must go, or a dead worker would never read as EOF.
        child_conn.close()
        return _Worker(
            slot=slot, generation=next(self._generations), process=process, conn=parent_conn, scratch=scratch
        )

    def _stop_worker(self, worker: _Worker, kill: bool) -> None:
        from ttpa_ray.tools.isolation import remove_cgroup

        if kill and worker.process.is_alive():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(worker.process.pid, signal.SIGKILL)  # the worker and what its tools started
            worker.process.kill()
        worker.process.join(timeout=5)
        with contextlib.suppress(OSError):
            worker.conn.close()
        remove_cgroup(worker.cgroup)
        shutil.rmtree(worker.scratch, ignore_errors=True)

    def _replace(self, slot: int, kill: bool) -> None:
        self._stop_worker(self._workers[slot], kill=kill)
        self._workers[slot] = self._start_worker(slot)
        self.replaced += 1

    def _ensure_ready(self, slot: int) -> None:
        worker = self._workers[slot]
        if worker.ready:
            return
        if not worker.conn.poll(self.config.startup_timeout_s):
            self._replace(slot, kill=True)
            raise _Failure(f"tool worker did not start within {self.config.startup_timeout_s} s")
        try:
            _ready, _pid, missing, worker.cgroup = worker.conn.recv()
        except (EOFError, OSError) as exc:
            worker.process.join(timeout=5)
            code = _exit_description(worker.process.exitcode)
            self._replace(slot, kill=True)
            raise _Failure(f"tool worker failed to start ({code})") from exc
        worker.ready = True
        self.not_enforced = list(missing)
        for item in missing:
            if item not in _reported_missing:
                _reported_missing.add(item)
                logger.warning("tool sandbox: %s", item)

    def _checkout(self, slot: int) -> None:
        """Make the slot's worker usable: replace it if it died while idle, wait until it is ready."""
        worker = self._workers[slot]
        if worker.ready and not worker.process.is_alive():
            # Died between calls (OOM killer, external kill): not the fault of the call about to run.
            logger.warning(
                "tool worker %s died while idle (%s); replacing it",
                worker.process.pid,
                _exit_description(worker.process.exitcode),
            )
            self._replace(slot, kill=False)
        self._ensure_ready(slot)

    def warm(self) -> None:
        """Wait until every worker has started and preloaded its modules."""
        for _ in range(self.config.workers):
            slot = self._acquire(None, only_cold=True)
            if slot is None:
                break
            try:
                with contextlib.suppress(_Failure):
                    self._ensure_ready(slot)
            finally:
                self._release(slot)

    def worker_pids(self) -> list[int | None]:
        """Process ids of the current workers, by slot."""
        return [worker.process.pid for worker in self._workers]

    # -- slots -------------------------------------------------------------------------------------

    def _acquire(self, preferred: int | None, only_cold: bool = False) -> int | None:
        with self._cond:
            while True:
                if self._closed:
                    raise RuntimeError("the tool sandbox pool is closed")
                if preferred is not None:
                    if not self._busy[preferred]:
                        self._busy[preferred] = True
                        return preferred
                else:
                    for slot, busy in enumerate(self._busy):
                        if not busy and (not only_cold or not self._workers[slot].ready):
                            self._busy[slot] = True
                            return slot
                    if only_cold and all(worker.ready for worker in self._workers):
                        return None
                self._cond.wait()

    def _release(self, slot: int) -> None:
        with self._cond:
            self._busy[slot] = False
            self._cond.notify_all()

    def _exchange(self, slot: int, message: Message, timeout: float, tool: str) -> HostReply:
        """Send one message to the worker of ``slot`` and wait for its reply (raises :class:`_Failure`)."""
        self._ensure_ready(slot)
        worker = self._workers[slot]
        try:
            worker.conn.send(message)
            answered = worker.conn.poll(timeout)
        except (BrokenPipeError, OSError):
            answered = True  # a dead worker: the recv below reports it
        if not answered:
            self._replace(slot, kill=True)
            raise _Failure(
                f"tool {tool!r} timed out after {timeout:g} s (its worker was killed and replaced); "
                "try simpler arguments or a smaller request"
            )
        try:
            reply: HostReply = worker.conn.recv()
        except (EOFError, OSError) as exc:
            worker.process.join(timeout=5)
            code = _exit_description(worker.process.exitcode)
            self._replace(slot, kill=True)
            raise _Failure(
                f"tool {tool!r} crashed its worker process ({code}); the worker was replaced"
            ) from exc
        return reply

    # -- calls -------------------------------------------------------------------------------------

    def run(self, request: CallRequest) -> ToolResult:
        """Run one stateless call on any idle worker."""
        start = time.perf_counter()
        slot = self._acquire(None)
        assert slot is not None
        try:
            self._checkout(slot)
            reply = self._exchange(slot, request, self.config.timeout_s, request.tool)
        except _Failure as failure:
            return ToolResult.failure(str(failure), time.perf_counter() - start)
        finally:
            self._release(slot)
        return reply.to_result(time.perf_counter() - start)

    def _pin(self, session: SessionState) -> int:
        with self._cond:
            if session.slot is None:
                counts = self._sessions_per_slot
                session.slot = min(range(len(counts)), key=lambda slot: (counts[slot], self._busy[slot]))
                counts[session.slot] += 1
            return session.slot

    def run_in_session(self, session: SessionState, request: SessionCallRequest) -> ToolResult:
        """Run one call of a session on its pinned worker, restoring the session there if needed."""
        start = time.perf_counter()
        slot = self._acquire(self._pin(session))
        assert slot is not None
        try:
            self._checkout(slot)
            if session.generation != self._workers[slot].generation:
                opening = OpenSession(
                    session.key, session.environment, session.initial_config, tuple(session.history)
                )
                replay_timeout = self.config.timeout_s * (1 + len(session.history))
                self._exchange(slot, opening, replay_timeout, request.tool)
                session.generation = self._workers[slot].generation
            reply = self._exchange(slot, request, self.config.timeout_s, request.tool)
        except _Failure as failure:
            return ToolResult.failure(str(failure), time.perf_counter() - start)
        finally:
            self._release(slot)
        session.history.append(request)
        return reply.to_result(time.perf_counter() - start)

    def close_session(self, session: SessionState) -> None:
        """Drop the session's objects from its worker and unpin it."""
        if session.slot is None:
            return
        slot = self._acquire(session.slot)
        assert slot is not None
        try:
            if session.generation == self._workers[slot].generation:
                with contextlib.suppress(_Failure):
                    self._exchange(slot, CloseSession(session.key), self.config.timeout_s, "close session")
        finally:
            self._release(slot)
            with self._cond:
                self._sessions_per_slot[slot] = max(0, self._sessions_per_slot[slot] - 1)
            session.slot = None
            session.generation = -1

    def close(self) -> None:
        """Stop every worker (idempotent). Calls waiting for a worker raise RuntimeError."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        for worker in self._workers:
            with contextlib.suppress(OSError, BrokenPipeError):
                worker.conn.send(None)
            worker.process.join(timeout=1)
            self._stop_worker(worker, kill=True)

    def __enter__(self) -> SandboxPool:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()
