"""Training benchmark: ZeRO-2 vs ZeRO-3 memory, Ray Train vs single-process TRL throughput, and the step
time of DPO with precomputed reference log-probs against a live reference model.

    .venv/bin/python bench/train.py [--quick]

One model and one set of pairs for every run: a Qwen2 made by ``make_tiny_model`` with a larger config
than the test model (overheads dominate the 0.34 M-parameter one), and BFCL pairs (ground-truth call vs
a mutated call). Runs, each DPO for the same number of steps:
  1. Ray Train, 2 workers, ZeRO-2, precomputed reference   (memory, tokens/s, step time)
  2. Ray Train, 2 workers, ZeRO-3, precomputed reference   (memory)
  3. Ray Train, 2 workers, ZeRO-2, live reference          (step time)
  4. TRL in this process, 1 process, no DeepSpeed, precomputed reference (tokens/s)
Memory, per worker: the peak model-state memory (parameters, gradients, optimizer buffers and states
held by the rank, measured inside DeepSpeed's step, where ZeRO-2 still holds its gradient partitions),
and the process's peak RSS (which adds activations, communication buffers, libraries). Step time and
tokens/s are measured between the first and the last logged step, so start-up and the first (warm-up)
step are left out.
The last line is the headline: ``precomputed_over_live_step_time = <ratio>``.
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")
# glibc keeps freed heap memory mapped, so RSS would show allocator history rather than live memory;
# with these, large tensors are mmap'd and returned on free (set before Ray starts: workers inherit it)
os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
os.environ.setdefault("MALLOC_TRIM_THRESHOLD_", "131072")


def _gaps(history: list[dict[str, float]]) -> list[float]:
    """Seconds of each step after the first (which carries warm-up)."""
    steps = history[1:]
    return [b["time_s"] - a["time_s"] for a, b in itertools.pairwise(steps)]


def _rates(history: list[dict[str, float]]) -> tuple[float, float]:
    """(median seconds per step, tokens/s) between the first and last logged steps."""
    if len(history) < 3:
        raise RuntimeError(f"need at least 3 logged steps to time, got {len(history)}")
    steps = history[1:]  # the first step carries warm-up
    gaps = _gaps(history)
    tokens = steps[-1]["num_tokens"] - steps[0]["num_tokens"]
    return statistics.median(gaps), tokens / (steps[-1]["time_s"] - steps[0]["time_s"])


def _single_process(model_dir: Path, table: Any, steps: int, batch: int, max_length: int, out: Path) -> Any:
    """TRL's DPOTrainer in this process, without Ray or DeepSpeed: the baseline for tokens/s."""
    import pyarrow.parquet as pq
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ttpa_ray.config import DPOStageConfig
    from ttpa_ray.train.dpo import build_dpo_trainer, dpo_args
    from ttpa_ray.train.metrics import ConsoleMetrics

    stage = DPOStageConfig(max_steps=steps, per_device_batch_size=batch, max_length=max_length)
    args = dpo_args(
        stage, out, seed=0, deepspeed=None, use_cpu=True, precomputed_reference=True, save_steps=10**6
    )
    console = ConsoleMetrics(prefix="[single] ")
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    trainer = build_dpo_trainer(model, tokenizer, pq.read_table(table), args, [console])
    trainer.train()
    return console.history


def main() -> None:
    """Run the four trainings and print the figures."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer steps and a smaller model (< 5 min)")
    opts = parser.parse_args()
    # Wide and shallow: model states (params, grads, Adam) weigh more than activations, as in large
    # models, while a step stays affordable on 2 CPU cores.
    hidden, layers, steps, pairs_n = (1536, 2, 5, 40) if opts.quick else (2048, 2, 12, 96)
    batch, max_length = 2, 384

    import ray

    from ttpa_ray.config import TrainConfig
    from ttpa_ray.records import write_parquet
    from ttpa_ray.tiny_model import make_tiny_model
    from ttpa_ray.train.data import bfcl_preference_pairs
    from ttpa_ray.train.run import run_stage

    work = Path(tempfile.mkdtemp(prefix="ttpa-bench-train-"))
    model_dir = make_tiny_model(
        work / "model", seed=0, hidden_size=hidden, num_layers=layers, num_heads=hidden // 64
    )
    pairs_file = write_parquet(bfcl_preference_pairs("simple_python")[:pairs_n], work / "pairs.parquet")
    heads = hidden // 64
    print(
        f"model: Qwen2 hidden={hidden} layers={layers} heads={heads} (make_tiny_model), {pairs_n} BFCL pairs"
    )
    print(f"each run: DPO, {steps} steps, {batch} pairs per worker per step, max_length {max_length}")

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    results: dict[str, Any] = {}
    runs = {
        "zero2_precomputed": ("zero2", "precomputed"),
        "zero3_precomputed": ("zero3", "precomputed"),
        "zero2_live": ("zero2", "live"),
    }
    for name, (zero, reference) in runs.items():
        started = time.perf_counter()
        train = TrainConfig(
            num_workers=2,
            deepspeed=zero,
            save_steps=10**6,
            dpo={
                "reference": reference,
                "max_steps": steps,
                "per_device_batch_size": batch,
                "max_length": max_length,
                "init_from_sft": False,
            },
        )
        outcome = run_stage(
            "dpo", train, policy=str(model_dir), run_dir=work / name, run_name=name, input_path=pairs_file
        )
        step_s, tokens_s = _rates(outcome.result.history)
        res = outcome.result
        results[name] = {
            "peak_rss_mib": res.worker_peak_rss_mib,
            "model_state_mib": res.worker_model_state_mib,
            "step_s": step_s,
            "tok_s": tokens_s,
            "gaps": _gaps(res.history),
        }
        print(
            f"{name}: per worker peak model states {[round(m) for m in res.worker_model_state_mib]} MiB, "
            f"peak RSS {[round(m) for m in res.worker_peak_rss_mib]} MiB; "
            f"step {step_s:.3f} s, {tokens_s:.0f} tokens/s ({time.perf_counter() - started:.0f} s)",
            flush=True,
        )
    ray.shutdown()

    table = work / "zero2_precomputed" / "train" / "dpo" / "train_table.parquet"
    history = _single_process(model_dir, table, steps, batch * 2, max_length, work / "single")
    single_step, single_tokens = _rates(history)
    print(f"single_process_trl: step {single_step:.3f} s, {single_tokens:.0f} tokens/s (same global batch)")

    z2, z3 = results["zero2_precomputed"], results["zero3_precomputed"]
    print(f"peak_model_state_mib_per_worker_zero2 = {max(z2['model_state_mib']):.0f}")
    print(f"peak_model_state_mib_per_worker_zero3 = {max(z3['model_state_mib']):.0f}")
    print(f"zero3_model_states_below_zero2 = {max(z3['model_state_mib']) < max(z2['model_state_mib'])}")
    print(f"peak_rss_mib_per_worker_zero2 = {max(z2['peak_rss_mib']):.0f}")
    print(f"peak_rss_mib_per_worker_zero3 = {max(z3['peak_rss_mib']):.0f}")
    print(f"ray_zero2_2workers_over_single_process_tokens_per_s = {z2['tok_s'] / single_tokens:.3f}")
    # same seed, same data order: step i of both runs sees the same batch, so compare step by step
    per_step = [p / q for p, q in zip(z2["gaps"], results["zero2_live"]["gaps"], strict=True)]
    ratio = statistics.median(per_step)
    shutil.rmtree(work, ignore_errors=True)
    print(f"precomputed_over_live_step_time = {ratio:.3f}")


if __name__ == "__main__":
    main()
