"""Scale benchmark (issue 32): does the driver's memory stay flat as the records grow tenfold?

    .venv/bin/python bench/scale.py [--quick] [--sizes 10000,100000,1000000]

Synthesises N reversed dialogues of realistic size in Ray Data (48 templates whose two or three calls
really ran on the built-in tools, with their results and a final answer, copied with new ids: the
driver never holds them), then runs the pipeline's non-generative stages through the project's own
stage code, each size in a fresh driver process on a local Ray cluster of its own:

- split: ``rundir.write_split``, train / validation / held out by a stable hash of the dialogue id;
- turns: ``tps.write_turns``, the TPS stage's turn extraction;
- pairs: ``pairs.run_pairs_stage``, ESM labels from the scorer actors and the pair rule, on three
  candidates a turn (the reference call and two mutations of it, taken in turn from wrong name,
  dropped required key, wrong type and wrong value), which the bench makes in Ray Data beforehand;
- table: the DPO stage's input checks, held-back pairs and training tables
  (``train.run.prepare_tables`` on the pairs, with the tiny model's tokenizer; no reference pass).

Per size and stage it prints the driver's peak RSS, the peak RSS of the driver and its Ray processes
together, and records a second. Last line: ``driver_rss_growth_1e6_over_1e4 = <ratio>``, the
driver's peak RSS over all stages at 10^6 dialogues over the same at 10^4 (``--quick``: 10^4 and
10^5, ``driver_rss_growth_1e5_over_1e4``). Goal (issue 32): at most 1.3.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

STAGES = ("split", "turns", "pairs", "table")
TEMPLATE_COUNT = 48
MUTATIONS = ("wrong_name", "missing_required", "wrong_type", "wrong_value")


# --------------------------------------------------------------------------------- the synthetic data
def template_dialogues(count: int, seed: int = 0) -> list[Any]:
    """Dialogues in the reverse stage's shape: a question asking for two or three things, each call
    run for real on the built-in tools (bench/tps.py's call templates), their results, an answer."""
    from tps import TEMPLATES, template_values

    from ttpa_ray.codec import ToolCall
    from ttpa_ray.records import Dialogue, Message
    from ttpa_ray.tools.registry import ToolRegistry, load_catalogue

    catalogue = load_catalogue("builtin")
    rng = random.Random(seed)
    out = []
    with ToolRegistry(catalogue) as registry:
        while len(out) < count:
            picks = rng.sample(TEMPLATES, rng.choice((2, 3)))
            values = template_values(rng)
            question = " Also, ".join(template.format(**values) for _, template, _ in picks)
            messages = [
                Message("system", "You are a helpful assistant that can use tools."),
                Message("user", question),
            ]
            session = registry.session(f"template-{len(out)}", None)
            results = []
            for i, (name, _, build) in enumerate(picks):
                call = ToolCall(name, build(values))
                result = session.call(call.name, call.arguments)
                results.append(result.ok)
                messages.append(Message("assistant", None, tool_calls=(call,), tool_call_ids=(f"call_{i}",)))
                messages.append(
                    Message("tool", result.to_message_content(), tool_call_id=f"call_{i}", name=name)
                )
            session.close()
            if not all(results):
                continue
            messages.append(
                Message(
                    "assistant",
                    "Here is what I found: "
                    + "; ".join(m.content or "" for m in messages if m.role == "tool")[:400],
                )
            )
            tools = tuple(catalogue.specs[name] for name, _, _ in picks)
            out.append(Dialogue(f"template-{len(out)}", f"template-{len(out)}", tuple(messages), tools))
    return out


def synthesise(n: int, folder: Path) -> None:
    """N dialogues copied from the templates with new ids, made and written by the cluster."""
    import pyarrow as pa
    import ray

    from ttpa_ray.records import Dialogue, to_table

    templates = to_table(template_dialogues(TEMPLATE_COUNT), Dialogue)

    def expand(batch: dict[str, Any]) -> pa.Table:
        ids = batch["id"]
        table = templates.take(pa.array(ids % templates.num_rows))
        for column, prefix in (("dialogue_id", "syn-"), ("seed_id", "seed-0-")):
            table = table.set_column(
                table.schema.get_field_index(column), column, pa.array([f"{prefix}{i:07d}" for i in ids])
            )
        return table

    blocks = max(2, n // 20_000)
    ray.data.range(n, override_num_blocks=blocks).map_batches(expand, batch_format="numpy").write_parquet(
        str(folder)
    )


def write_candidates(tps_dir: Path) -> int:
    """Three candidates a turn (the reference and two mutations), made from the turns in Ray Data."""
    import pyarrow as pa
    import ray

    from ttpa_ray import store
    from ttpa_ray.codec import ToolCall
    from ttpa_ray.records import Candidate, Turn, rows_from_batch, to_table
    from ttpa_ray.train.data import mutate_call

    def wrong_type(call: ToolCall) -> ToolCall:
        key = sorted(call.arguments)[0]
        value = call.arguments[key]
        return ToolCall(call.name, {**call.arguments, key: 12345 if isinstance(value, str) else str(value)})

    def candidates_of(batch: pa.Table) -> pa.Table:
        out = []
        for row in rows_from_batch(batch):
            turn = Turn.from_row(row)
            reference = turn.reference_calls[0]
            spec = next(t for t in turn.tools if t.name == reference.name)
            rng = random.Random(turn.turn_id)
            calls = [reference]
            for mutation in rng.sample(MUTATIONS, 2):
                if mutation == "wrong_type":
                    calls.append(wrong_type(reference))
                else:
                    made = mutate_call(reference, {"parameters": spec.parameters}, mutation, rng)
                    calls.append(made[0] if made is not None else wrong_type(reference))
            for k, call in enumerate(calls):
                text = json.dumps({"name": call.name, "arguments": call.arguments})
                out.append(Candidate(f"{turn.turn_id}/c{k}", turn.turn_id, (call,), raw_text=text))
        return to_table(out, Candidate)

    turns = ray.data.read_parquet(str(tps_dir / "turns.parquet"))
    return store.write_folder(
        turns.map_batches(candidates_of, batch_format="pyarrow"),
        tps_dir / "candidates.parquet",
        to_table([], Candidate),
    )


# --------------------------------------------------------------------------------------- measurement
class Rss:
    """Samples the driver's RSS and that of the driver with every process under it, from a thread."""

    def __init__(self, interval: float = 0.2) -> None:
        import psutil

        self.me = psutil.Process()
        self.interval = interval
        self.peak_driver = self.peak_total = 0
        self.stop = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def sample(self) -> None:
        import psutil

        driver = self.me.memory_info().rss
        total = driver
        for child in self.me.children(recursive=True):
            try:
                total += child.memory_info().rss
            except psutil.Error:
                continue
        self.peak_driver = max(self.peak_driver, driver)
        self.peak_total = max(self.peak_total, total)

    def _run(self) -> None:
        while not self.stop.is_set():
            self.sample()
            time.sleep(self.interval)

    @contextmanager
    def window(self) -> Iterator[dict[str, float]]:
        """Peaks within the block (reset at its start), MB; the start RSS too."""
        self.sample()
        figures: dict[str, float] = {"start_mb": self.me.memory_info().rss / 2**20}
        self.peak_driver = self.peak_total = 0
        start = time.perf_counter()
        yield figures
        self.sample()
        figures.update(
            seconds=time.perf_counter() - start,
            driver_peak_mb=self.peak_driver / 2**20,
            total_peak_mb=self.peak_total / 2**20,
        )


def child(n: int, work: Path) -> dict[str, Any]:
    """One size in this (fresh) process: synthesise, then the stages, each measured."""
    import pyarrow.dataset as pads
    import ray

    from ttpa_ray.config import load_config
    from ttpa_ray.pairs import run_pairs_stage
    from ttpa_ray.rundir import split_path, write_split
    from ttpa_ray.tiny_model import ensure_tiny_model
    from ttpa_ray.tps import write_turns
    from ttpa_ray.train.run import prepare_tables

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    config = load_config(ROOT / "configs" / "local.yaml", [f"run.run_dir={work / 'run'}"])
    tokenizer = str(ensure_tiny_model(ROOT / "runs" / "tiny-model"))
    rss = Rss()
    result: dict[str, Any] = {"n": n}
    with rss.window() as figures:
        synthesise(n, work / "reverse")
    result["synthesise"] = figures
    run_dir, tps_dir, pairs_dir = work / "run", work / "run" / "tps", work / "run" / "pairs"

    with rss.window() as figures:
        split = write_split(run_dir, ray.data.read_parquet(str(work / "reverse")), 0.1, 0, 0.05)
    result["split"] = {**figures, "records": n, "counts": split.counts}

    with rss.window() as figures:
        turns, without = write_turns(ray.data.read_parquet(str(split_path(run_dir, "train"))), tps_dir)
    result["turns"] = {**figures, "records": split.counts["train"], "turns": turns, "without_turns": without}

    candidates = write_candidates(tps_dir)
    with rss.window() as figures:
        report = run_pairs_stage(config, tps_dir, pairs_dir)
    result["pairs"] = {
        **figures,
        "records": candidates,
        "pairs": report.pairs,
        "turns_paired": report.turns_paired,
    }

    # the reference log-probs are the replicas' (a model's work, not the driver's): not run here
    train = config.train.model_copy(update={"dpo": config.train.dpo.model_copy(update={"reference": "live"})})
    with rss.window() as figures:
        tables = prepare_tables("dpo", train, pairs_dir / "pairs.parquet", tokenizer, work / "train", seed=0)
    result["table"] = {**figures, "records": report.pairs, "rows": tables.kept}
    result["pairs_rows_on_disk"] = pads.dataset(pairs_dir / "pairs.parquet").count_rows()
    ray.shutdown()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="10^4 and 10^5 dialogues only")
    parser.add_argument("--sizes", help="comma-separated dialogue counts (default 10^4, 10^5, 10^6)")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print("RESULT " + json.dumps(child(args.child, args.work)), flush=True)
        return
    sizes = (
        [int(s) for s in args.sizes.split(",")]
        if args.sizes
        else [10_000, 100_000]
        if args.quick
        else [10_000, 100_000, 1_000_000]
    )
    results = []
    for n in sizes:
        with tempfile.TemporaryDirectory(prefix=f"scale-{n}-", dir=ROOT / "runs") as work:
            done = subprocess.run(
                [sys.executable, __file__, "--child", str(n), "--work", work],
                capture_output=True,
                text=True,
                check=False,
            )
            line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
            if done.returncode or line is None:
                sys.exit(f"size {n} failed ({done.returncode}):\n{done.stderr[-3000:]}")
            results.append(json.loads(line.removeprefix("RESULT ")))
        r = results[-1]
        print(f"n = {n:,}: synthesised in {r['synthesise']['seconds']:.0f} s")
        for stage in STAGES:
            f = r[stage]
            print(
                f"  {stage:6s} driver peak {f['driver_peak_mb']:7.0f} MB (from {f['start_mb']:5.0f}), "
                f"driver + Ray {f['total_peak_mb']:7.0f} MB, "
                f"{f['records'] / max(f['seconds'], 1e-9):9,.0f} records/s "
                f"({f['records']:,} in {f['seconds']:.1f} s)",
                flush=True,
            )
    peak = {r["n"]: max(r[s]["driver_peak_mb"] for s in STAGES) for r in results}
    small, large = min(peak), max(peak)
    for stage in STAGES:
        growth = max(r[stage]["driver_peak_mb"] for r in results if r["n"] == large) / max(
            r[stage]["driver_peak_mb"] for r in results if r["n"] == small
        )
        print(f"{stage}: driver peak at {large:,} over at {small:,} = {growth:.2f}")
    name = f"driver_rss_growth_1e{round(math.log10(large))}_over_1e{round(math.log10(small))}"
    print(f"{name} = {peak[large] / peak[small]:.3f}")


if __name__ == "__main__":
    main()
