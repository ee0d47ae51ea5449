"""ESM throughput: the pure scorer on one core, and the Ray Data stage on 2 CPUs, in one run.

Data: every entry of BFCL's simple_python, multiple, parallel, parallel_multiple and live_simple, as
its ground truth and up to seven mutations of it (drop an argument, another type, another value,
an unknown tool, an unknown key, another tool of the entry, arguments text cut off so it does not
parse), candidates' arguments as JSON text so parsing counts. Rows of one entry are adjacent, as
the candidates of one turn are in TPS output.

(a) single core: ``score`` over the rows, reference and tool index prepared once per entry.
(b) Ray: ``score_dataset`` on a local 2-CPU Ray (a pool of 2 stateless scorer actors, one
    ``map_batches`` pass, materialised, then split into scored/rejected) over >= 1,000,000 rows
    (200,000 with --quick) held as Arrow blocks of 50,000 rows (tools and reference
    dictionary-encoded), reported as a ratio of its rows/s to the single-core loop's rows/s. Timed:
    from the ``score_dataset`` call until both outputs are counted (Ray's worker start-up included;
    ``ray.init`` and putting the input blocks in the object store are not).

The machines are shared: wall-clock rates move with the neighbours' load (printed). The headline,
the last line ``esm_calls_per_second = N``, is calls per CPU-second of the single-core loop (what one
core does, load aside); the Ray ratio is wall-clock, against the mean of the single-core wall rates
timed just before and just after the Ray run; "rows per CPU-second, stage / loop" is the stage's
efficiency independent of load (CPU of every Ray worker process during the stage, start-up
included); the CPU breakdown shows where the stage's time went (scorers, driver, raylet/GCS).

Usage: .venv/bin/python bench/esm.py [--quick].
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pyarrow as pa

from ttpa_ray.bfcl import load_entries
from ttpa_ray.esm import ReferenceCall, ToolIndex, score

CATEGORIES = ("simple_python", "multiple", "parallel", "parallel_multiple", "live_simple")


def _mutations(calls: list[dict[str, Any]], tool_names: list[str]) -> list[list[dict[str, Any]] | str]:
    """The ground truth and up to seven variants of it; each variant changes the first call."""
    first = calls[0]
    args = first["arguments"]
    rest = calls[1:]
    variants: list[list[dict[str, Any]] | str] = [calls]
    if args:
        key = next(iter(args))
        value = args[key]
        variants.append([{**first, "arguments": {k: v for k, v in args.items() if k != key}}, *rest])
        other_type = 12345 if isinstance(value, str) else json.dumps(value)
        variants.append([{**first, "arguments": {**args, key: other_type}}, *rest])
        changed = (
            value + " x" if isinstance(value, str) else [value] if not isinstance(value, list) else value[:-1]
        )
        variants.append([{**first, "arguments": {**args, key: changed}}, *rest])
    variants.append([{**first, "name": first["name"] + "_v2"}, *rest])
    variants.append([{**first, "arguments": {**args, "unknown_param": True}}, *rest])
    others = [n for n in tool_names if n != first["name"]]
    if others:
        variants.append([{**first, "name": others[0]}, *rest])
    variants.append("truncated")  # arguments text cut off by max_tokens: a parse failure
    return variants


def build_rows() -> tuple[list[dict[str, Any]], list[tuple[ReferenceCall, ...]], list[ToolIndex], list[int]]:
    """Distinct candidate rows (one entry's rows adjacent) with their prepared reference and tools."""
    rows: list[dict[str, Any]] = []
    references: list[tuple[ReferenceCall, ...]] = []
    indexes: list[ToolIndex] = []
    owner: list[int] = []
    for category in CATEGORIES:
        for entry in load_entries(category):
            index = entry.tool_index()
            try:
                reference = entry.reference(index)
            except ValueError:
                continue  # BFCL ground truth with an empty list of acceptable values
            truth = [{"name": c.name, "arguments": c.arguments} for c in entry.ground_truth_calls(index)]
            tools_text = json.dumps(entry.tools)
            reference_text = json.dumps(entry.ground_truth)
            for variant in _mutations(truth, [f["name"] for f in entry.functions]):
                if isinstance(variant, str):
                    text = json.dumps(truth[0]["arguments"])
                    candidate = [{"name": truth[0]["name"], "arguments": text[: max(1, len(text) // 2)]}]
                else:
                    candidate = [
                        {"name": c["name"], "arguments": json.dumps(c["arguments"])} for c in variant
                    ]
                rows.append({"candidate": candidate, "reference": reference_text, "tools": tools_text})
                owner.append(len(references))
            references.append(reference)
            indexes.append(index)
    return rows, references, indexes, owner


def bench_single_core(
    rows: list[dict[str, Any]],
    references: list[tuple[ReferenceCall, ...]],
    indexes: list[ToolIndex],
    owner: list[int],
    seconds: float,
) -> tuple[float, float, list[float], float]:
    """(rows/s, calls/s, score per distinct row, CPU seconds per row) of the pure scorer.

    Wall-clock rates are over all the timed passes (mean pass time).
    """
    # The very values the stage gets from Arrow (list of {"name", "arguments": JSON text}).
    candidates = base_table(rows).column("candidate").to_pylist()
    work = [(c, references[o], indexes[o]) for c, o in zip(candidates, owner, strict=True)]
    calls = sum(len(c) for c in candidates)
    scores = [score(c, r, i).score for c, r, i in work]  # warm-up (and the reference scores)
    rates = []
    cpu_start = time.process_time()
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(rates) < 3:
        start = time.perf_counter()
        for candidate, reference, index in work:
            score(candidate, reference, index)
        rates.append(time.perf_counter() - start)
    cpu_per_row = (time.process_time() - cpu_start) / (len(rates) * len(work))
    mean = statistics.fmean(rates)
    return len(work) / mean, calls / mean, scores, cpu_per_row


CANDIDATE_TYPE = pa.list_(pa.struct([pa.field("name", pa.string()), pa.field("arguments", pa.string())]))


def base_table(rows: list[dict[str, Any]]) -> pa.Table:
    """The distinct rows as Arrow: calls as list<struct<name, arguments JSON text>> (the Candidate
    record's layout), tools and reference as dictionary-encoded JSON text."""
    return pa.table(
        {
            "candidate": pa.array([r["candidate"] for r in rows], CANDIDATE_TYPE),
            "reference": pa.array([r["reference"] for r in rows]).dictionary_encode(),
            "tools": pa.array([r["tools"] for r in rows]).dictionary_encode(),
            "reference_alternatives": pa.array([True] * len(rows)),
        }
    )


def arrow_table(base: pa.Table, total: int) -> pa.Table:
    """``total`` rows cycling over the distinct rows, with an id column."""
    repeats = -(-total // base.num_rows)
    table = pa.concat_tables([base] * repeats).slice(0, total)
    table = table.append_column("id", pa.array(range(total), pa.int64()))
    return table.combine_chunks()


def _cpu_by_process() -> dict[int, tuple[str, float]]:
    """CPU seconds so far of this process and its descendants (raylet, GCS, Ray workers), by pid."""
    import psutil

    me = psutil.Process()
    out: dict[int, tuple[str, float]] = {}
    for proc in [me, *me.children(recursive=True)]:
        try:
            times = proc.cpu_times()
            name = proc.name()
        except psutil.Error:
            continue
        if proc.pid == me.pid:
            kind = "driver"
        elif "raylet" in name or "gcs_server" in name:
            kind = "raylet + GCS"
        elif "python" in name or name.startswith("ray::"):
            kind = "Ray workers"
        else:
            kind = "other"
        out[proc.pid] = (kind, times.user + times.system)
    return out


def _cpu_delta(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict[str, float]:
    kinds: dict[str, float] = {}
    for pid, (kind, seconds) in after.items():
        kinds[kind] = kinds.get(kind, 0.0) + seconds - before.get(pid, (kind, 0.0))[1]
    return kinds


def bench_ray(table: pa.Table, block_rows: int) -> dict[str, Any]:
    """Rows/s of the stage on a local 2-CPU Ray (cold: worker start-up included), counts, mean score."""
    import ray

    from ttpa_ray.esm.stage import score_dataset

    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        blocks = [table.slice(i, block_rows) for i in range(0, table.num_rows, block_rows)]
        ds = ray.data.from_arrow(blocks)
        cpu_before = _cpu_by_process()
        start = time.perf_counter()
        scored, rejected = score_dataset(ds, scorers=(2, 2))
        scoring_pass = time.perf_counter() - start  # scoring, materialised
        n_scored = scored.count()
        n_rejected = rejected.count()
        elapsed = time.perf_counter() - start
        cpu = _cpu_delta(cpu_before, _cpu_by_process())
        mean = scored.mean("esm_score")
    finally:
        ray.shutdown()
    return {
        "rows_per_second": table.num_rows / elapsed,
        "seconds": elapsed,
        "scoring_pass_seconds": scoring_pass,
        "scored": n_scored,
        "rejected": n_rejected,
        "mean": float(mean),
        "cpu": cpu,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="200k rows for Ray, shorter single-core timing")
    args = parser.parse_args()
    total = 200_000 if args.quick else 1_000_000
    block_rows = 50_000

    rows, references, indexes, owner = build_rows()
    single_rows, single_calls, scores, cpu_per_row = bench_single_core(
        rows, references, indexes, owner, seconds=3.0 if args.quick else 10.0
    )
    expected_mean = statistics.fmean(scores[i % len(rows)] for i in range(total))
    table = arrow_table(base_table(rows), total)
    ray_result = bench_ray(table, block_rows)
    # Timed again right after: the ratio uses the mean of both single-core figures, so a change in
    # the machine's load during the run weighs on both sides alike.
    after_rows, after_calls, _, after_cpu = bench_single_core(rows, references, indexes, owner, seconds=3.0)
    single_rows, single_calls = (single_rows + after_rows) / 2, (single_calls + after_calls) / 2
    cpu_per_row = min(cpu_per_row, after_cpu)
    calls_per_row = sum(len(r["candidate"]) for r in rows) / len(rows)
    # Per CPU-second of the scoring process: what one core does, whatever else the machine runs.
    cpu_calls = calls_per_row / cpu_per_row
    ratio = ray_result["rows_per_second"] / single_rows
    n_scored, n_rejected = int(ray_result["scored"]), int(ray_result["rejected"])

    print(f"{'measure':<46}{'value':>22}")
    print(f"{'load average at the end (2 cores)':<46}{os.getloadavg()[0]:>22.2f}")
    print(f"{'distinct BFCL-derived candidate rows':<46}{len(rows):>22,}")
    print(f"{'calls per row (mean)':<46}{calls_per_row:>22.2f}")
    print(f"{'single core: rows/s (wall)':<46}{single_rows:>22,.0f}")
    print(f"{'single core: calls/s (wall)':<46}{single_calls:>22,.0f}")
    print(f"{'single core: calls per CPU-second':<46}{cpu_calls:>22,.0f}")
    print(f"{'Ray stage, 2 CPUs, 2 scorer actors: rows':<46}{total:>22,}")
    print(f"{'Ray stage: scored + rejected':<46}{f'{n_scored:,} + {n_rejected:,}':>22}")
    scoring = ray_result["scoring_pass_seconds"]
    counting = ray_result["seconds"] - scoring
    print(f"{'Ray stage: seconds (score_dataset + counts)':<46}{f'{scoring:.2f} + {counting:.2f}':>22}")
    print(f"{'Ray stage: rows/s (incl. start-up)':<46}{ray_result['rows_per_second']:>22,.0f}")
    print(f"{'Ray / single core (target >= 1.5)':<46}{ratio:>22.2f}")
    cpu = ray_result["cpu"]
    for kind in ("Ray workers", "driver", "raylet + GCS", "other"):
        if kind in cpu:
            print(f"{f'Ray stage: CPU seconds, {kind}':<46}{cpu[kind]:>22.2f}")
    print(f"{'Ray stage: CPU seconds available (2 x wall)':<46}{2 * ray_result['seconds']:>22.2f}")
    # Load-independent view: rows per CPU-second of the stage's workers vs the loop's.
    efficiency = (total / cpu["Ray workers"]) * cpu_per_row
    print(f"{'rows per CPU-second, stage / loop':<46}{efficiency:>22.2f}")
    mean_text = f"{ray_result['mean']:.6f} vs {expected_mean:.6f}"
    print(f"{'mean esm_score: stage vs pure function':<46}{mean_text:>22}")
    if n_scored + n_rejected != total or abs(ray_result["mean"] - expected_mean) > 1e-9:
        print("MISMATCH between the stage and the pure function")
        sys.exit(1)
    print(f"esm_calls_per_second = {cpu_calls:.0f}")


if __name__ == "__main__":
    main()
