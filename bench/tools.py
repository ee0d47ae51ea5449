"""Latency a warm sandbox pool adds to a tool call, against the same call in this process.

    .venv/bin/python bench/tools.py [--quick]

Calls go through a registry session's ``call`` in both modes (schema validation included in both;
stateless tools answer the same in or out of a session), alternating
rounds of each mode so that drift of the machine hits both alike. Target: the sandbox adds at most
2 ms at p50. The last line is the headline: ``sandbox_added_p50_ms = <number>``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ttpa_ray.tools.registry import ToolRegistry, load_catalogue
from ttpa_ray.tools.sandbox import SandboxConfig

HEADLINE_TOOL = ("get_weather", {"city": "Paris", "date": "2026-07-14"})
OTHER_CALLS: list[tuple[str, str, dict[str, Any]]] = [
    ("builtin", "search_flights", {"origin": "Paris", "destination": "London", "date": "2026-06-10"}),
    ("bfcl", "ls", {}),  # stateful: called inside one dialogue session, on its pinned worker
]


def _percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


def _measure(call: Callable[[], object], count: int) -> list[float]:
    samples = []
    for _ in range(count):
        start = time.perf_counter()
        call()
        samples.append((time.perf_counter() - start) * 1000)
    return samples


def _compare(
    catalogue_ref: str, tool: str, arguments: dict[str, Any], calls: int, rounds: int
) -> dict[str, list[float]]:
    catalogue = load_catalogue(catalogue_ref)
    samples: dict[str, list[float]] = {"in-process": [], "sandbox": []}
    with (
        ToolRegistry(catalogue, isolated=False) as local,
        ToolRegistry(catalogue, SandboxConfig(workers=2)) as pooled,
        local.session("bench-local") as local_session,
        pooled.session("bench-pooled") as pooled_session,
    ):
        pooled.warm()
        callers = {"in-process": local_session.call, "sandbox": pooled_session.call}
        for caller in callers.values():
            result = caller(tool, arguments)
            if not result.ok:
                raise SystemExit(f"{tool} failed: {result.error}")
            _measure(lambda caller=caller: caller(tool, arguments), 100)  # warm caches
        for _ in range(rounds):
            for mode, caller in callers.items():
                samples[mode] += _measure(lambda caller=caller: caller(tool, arguments), calls // rounds)
    return samples


def main() -> None:
    """Run the comparison and print the table and the headline."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer calls (well under 5 minutes)")
    options = parser.parse_args()
    calls = 1000 if options.quick else 10000
    rounds = 5 if options.quick else 10

    rows = []
    headline: float | None = None
    for catalogue_ref, tool, arguments in [("builtin", *HEADLINE_TOOL), *OTHER_CALLS]:
        samples = _compare(catalogue_ref, tool, arguments, calls, rounds)
        p50 = {mode: statistics.median(values) for mode, values in samples.items()}
        p99 = {mode: _percentile(values, 0.99) for mode, values in samples.items()}
        added = p50["sandbox"] - p50["in-process"]
        if headline is None:
            headline = added
        rows.append((f"{catalogue_ref}:{tool}", p50, p99, added, len(samples["sandbox"])))

    print(f"{'call':<24} {'mode':<11} {'p50 ms':>8} {'p99 ms':>8}  calls")
    for name, p50, p99, _added, count in rows:
        for mode in ("in-process", "sandbox"):
            print(f"{name:<24} {mode:<11} {p50[mode]:>8.3f} {p99[mode]:>8.3f}  {count}")
    for name, _p50, _p99, added, _count in rows:
        print(f"{name:<24} sandbox adds {added:.3f} ms at p50 (target <= 2 ms)")
    print(f"sandbox_added_p50_ms = {headline:.3f}")


if __name__ == "__main__":
    main()
