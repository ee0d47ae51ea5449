"""The sandbox pool against badly behaved tools (tests/fixtures/tool_modules, loaded as a module folder)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from ttpa_ray.tools.registry import ToolRegistry, load_catalogue
from ttpa_ray.tools.sandbox import NETWORK_DISABLED, SandboxConfig, SandboxPool

FIXTURES = Path(__file__).parent / "fixtures" / "tool_modules"
TIMEOUT_S = 1.0
MAX_CHARS = 1000


@pytest.fixture(scope="module")
def registry() -> Iterator[ToolRegistry]:
    catalogue = load_catalogue(FIXTURES)
    config = SandboxConfig(workers=2, timeout_s=TIMEOUT_S, memory_mb=512, max_response_chars=MAX_CHARS)
    with ToolRegistry(catalogue, config) as reg:
        reg.warm()
        yield reg


def _pool(registry: ToolRegistry) -> SandboxPool:
    pool = registry.executor
    assert isinstance(pool, SandboxPool)
    return pool


def _healthy(registry: ToolRegistry) -> None:
    result = registry.call("whoami", {"tag": "after"})
    assert result.ok and result.content["tag"] == "after"


def test_fixture_tools_load_through_the_module_source() -> None:
    catalogue = load_catalogue(FIXTURES)
    assert catalogue.errors == []
    assert {"sleepy", "raising", "allocating", "printing", "crashing", "connecting", "whoami"} <= set(
        catalogue.names
    )
    assert all(spec.source.startswith("module:") for spec in catalogue.tools())


def test_a_tool_sleeping_past_its_timeout_is_killed_and_its_worker_replaced(registry: ToolRegistry) -> None:
    pool = _pool(registry)
    before, replaced = set(pool.worker_pids()), pool.replaced
    result = registry.call("sleepy", {"seconds": 30})
    assert not result.ok
    assert result.error is not None and "timed out after 1 s" in result.error
    assert TIMEOUT_S <= result.elapsed < TIMEOUT_S + 5
    assert pool.replaced == replaced + 1
    assert set(pool.worker_pids()) != before
    _healthy(registry)


def test_a_raising_tool_becomes_an_error_and_keeps_its_worker(registry: ToolRegistry) -> None:
    pool = _pool(registry)
    replaced = pool.replaced
    result = registry.call("raising", {"message": "no such city"})
    assert not result.ok
    assert result.error == "ValueError: no such city"
    assert result.content is None
    assert pool.replaced == replaced


def test_allocating_past_the_memory_cap_is_a_memory_error(registry: ToolRegistry) -> None:
    result = registry.call("allocating", {"megabytes": 600})
    assert not result.ok
    assert result.error == "MemoryError: the tool ran out of memory (limit 512 MiB)"
    # Below the limit, and in the same worker: the failed allocation left nothing behind.
    fits = registry.call("allocating", {"megabytes": 256})
    assert fits.ok and fits.content == 256 * 1024 * 1024


def test_printing_megabytes_is_captured_and_truncated_without_breaking_the_pool(
    registry: ToolRegistry,
) -> None:
    result = registry.call("printing", {"megabytes": 4})
    assert result.ok
    assert result.content == "done printing"
    assert result.stdout.startswith("xxxx")
    assert len(result.stdout) < MAX_CHARS + 60
    assert "... [truncated " in result.stdout
    _healthy(registry)


@pytest.mark.parametrize(("how", "expected"), [("exit", "exit code 3"), ("segfault", "killed by SIGSEGV")])
def test_a_crashing_tool_is_reported_and_its_worker_replaced(
    registry: ToolRegistry, how: str, expected: str
) -> None:
    pool = _pool(registry)
    replaced = pool.replaced
    result = registry.call("crashing", {"how": how})
    assert not result.ok
    assert (
        result.error is not None and "crashed its worker process" in result.error and expected in result.error
    )
    assert pool.replaced == replaced + 1
    _healthy(registry)


def test_sys_exit_in_a_tool_does_not_end_the_worker(registry: ToolRegistry) -> None:
    pool = _pool(registry)
    replaced = pool.replaced
    result = registry.call("exiting", {})
    assert not result.ok and result.error is not None and "SystemExit" in result.error
    assert pool.replaced == replaced


def test_network_is_disabled_by_default(registry: ToolRegistry) -> None:
    for name, arguments in [("connecting", {"host": "127.0.0.1", "port": 9}), ("making_socket", {})]:
        result = registry.call(name, arguments)
        assert not result.ok
        assert result.error == f"PermissionError: {NETWORK_DISABLED}"


def test_network_can_be_allowed() -> None:
    config = SandboxConfig(workers=1, allow_network=True)
    with ToolRegistry(load_catalogue(FIXTURES), config) as reg:
        result = reg.call("making_socket", {})
    assert result.ok and result.content == "socket family AF_INET"


def test_large_responses_are_truncated_with_a_marker(registry: ToolRegistry) -> None:
    result = registry.call("huge_result", {"chars": 50_000})
    assert result.ok and result.truncated
    assert isinstance(result.content, str)
    assert result.content.startswith('{"text": "yyy')
    assert result.content.endswith("characters]")
    assert len(result.content) < MAX_CHARS + 60


def test_invalid_arguments_are_refused_before_running(registry: ToolRegistry) -> None:
    result = registry.call("sleepy", {"seconds": "5"})
    assert not result.ok
    assert result.error == (
        "argument 'seconds' must be number, got string (\"5\") for sleepy; "
        "expected: seconds (number, How long to sleep)"
    )
    assert result.elapsed < 0.1
    unknown = registry.call("no_such_tool", {})
    assert (
        not unknown.ok
        and unknown.error is not None
        and unknown.error.startswith("unknown tool 'no_such_tool'")
    )


def test_workers_serve_concurrent_calls_in_parallel(registry: ToolRegistry) -> None:
    results = {}
    both_started = threading.Barrier(2)

    def run(tag: str) -> None:
        both_started.wait()
        results[tag] = registry.call("sleepy", {"seconds": 0.4})

    threads = [threading.Thread(target=run, args=(tag,)) for tag in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(result.ok for result in results.values())
    assert results["a"].content["pid"] != results["b"].content["pid"]


def test_in_process_execution_answers_the_same() -> None:
    catalogue = load_catalogue(FIXTURES)
    with ToolRegistry(catalogue, isolated=False) as reg:
        raised = reg.call("raising", {"message": "same"})
        big = reg.call("huge_result", {"chars": 10})
        unexplained = reg.call("raising", {"message": ""})
    assert raised.error == "ValueError: same"
    assert unexplained.error == "ValueError"
    assert big.ok and big.content == {"text": "y" * 10}
