"""The tool sandbox as a boundary (issue 17): a corpus of bad tools, each a clear tool error, and
nothing outside a worker's scratch folder changed. Real namespaces, a real server on 127.0.0.1."""

from __future__ import annotations

import socket
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from ttpa_ray.tools.registry import ToolRegistry, load_catalogue
from ttpa_ray.tools.sandbox import SandboxConfig, SandboxPool

FIXTURES = Path(__file__).parent / "fixtures" / "tool_modules"


@pytest.fixture(scope="module")
def registry() -> Iterator[ToolRegistry]:
    config = SandboxConfig(workers=2, timeout_s=5.0, memory_mb=512, max_response_chars=1000, max_processes=64)
    with ToolRegistry(load_catalogue(FIXTURES), config) as reg:
        reg.warm()
        yield reg


@pytest.fixture(scope="module")
def server() -> Iterator[int]:
    """A TCP server on 127.0.0.1 that accepts every connection: reachable from this process."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    socket.create_connection(("127.0.0.1", port), timeout=2).close()  # it answers here
    yield port
    listener.close()


def _isolated(registry: ToolRegistry) -> SandboxPool:
    pool = registry.executor
    assert isinstance(pool, SandboxPool)
    if any("namespaces" in item for item in pool.not_enforced):
        pytest.skip(f"this machine cannot make namespaces: {pool.not_enforced}")
    return pool


@pytest.mark.parametrize("tool", ["connecting_from_subprocess", "connecting_through_ctypes"])
def test_no_connection_leaves_the_worker_whatever_makes_it(
    registry: ToolRegistry, server: int, tool: str
) -> None:
    _isolated(registry)
    result = registry.call(tool, {"host": "127.0.0.1", "port": server})
    assert not result.ok
    assert result.error is not None and "Network is unreachable" in result.error


def test_writes_outside_the_scratch_folder_are_refused_and_change_nothing(registry: ToolRegistry) -> None:
    _isolated(registry)
    outside = Path("/tmp") / f"ttpa-outside-{uuid.uuid4().hex}"
    result = registry.call("writing_file", {"path": str(outside)})
    assert not result.ok and result.error is not None and "Read-only file system" in result.error
    assert not outside.exists()
    inside = registry.call("writing_file", {"path": "note.txt"})  # the worker's own scratch folder
    assert inside.ok and isinstance(inside.content, str) and inside.content.endswith("/note.txt")
    assert "ttpa-tool-" in inside.content


def test_reading_a_file_and_returning_it_is_allowed(registry: ToolRegistry) -> None:
    result = registry.call("reading_file", {"path": str(FIXTURES / "hazards.py")})
    assert result.ok and isinstance(result.content, str) and "Badly behaved tools" in result.content


def test_forking_in_a_loop_hits_the_process_cap_and_leaves_no_process(registry: ToolRegistry) -> None:
    import psutil

    pool = _isolated(registry)
    if any("process cap" in item for item in pool.not_enforced):
        pytest.skip(f"no process cap on this machine: {pool.not_enforced}")
    result = registry.call("forking", {"count": 10_000})
    assert not result.ok
    assert result.error is not None and "Resource temporarily unavailable" in result.error
    for pid in pool.worker_pids():
        assert pid is not None and psutil.Process(pid).children(recursive=True) == []
    assert registry.call("whoami", {"tag": "after"}).ok


@pytest.mark.parametrize(
    ("tool", "arguments", "expected"),
    [
        ("raising", {"message": "bad city"}, "ValueError: bad city"),
        ("sleepy", {"seconds": 60}, "timed out after 5 s"),
        ("allocating", {"megabytes": 20 * 1024}, "MemoryError: the tool ran out of memory (limit 512 MiB)"),
        ("crashing", {"how": "exit"}, "crashed its worker process (exit code 3)"),
        ("crashing", {"how": "segfault"}, "crashed its worker process (killed by SIGSEGV)"),
    ],
)
def test_bad_tools_are_one_clear_error_each(
    registry: ToolRegistry, tool: str, arguments: dict[str, object], expected: str
) -> None:
    result = registry.call(tool, arguments)
    assert not result.ok and result.error is not None and expected in result.error
    assert registry.call("whoami", {"tag": "after"}).ok


def test_huge_returns_and_prints_are_cut_to_the_limit(registry: ToolRegistry) -> None:
    returned = registry.call("huge_result", {"chars": 50 * 1024 * 1024})
    assert returned.ok and returned.truncated and len(str(returned.content)) < 1100
    printed = registry.call("printing", {"megabytes": 10})
    assert printed.ok and "... [truncated " in printed.stdout and len(printed.stdout) < 1100


def test_scratch_folders_go_with_the_pool() -> None:
    with ToolRegistry(load_catalogue(FIXTURES), SandboxConfig(workers=1)) as reg:
        made = reg.call("writing_file", {"path": "x.txt"})
        assert made.ok and isinstance(made.content, str)
        folder = Path(made.content).parent
        assert (folder / "x.txt").read_text() == "written by a tool\n"  # the one writable folder
    assert not folder.exists()
