"""Training benchmark: ZeRO-2 vs ZeRO-3 memory, Ray Train vs single-process TRL throughput, the step
time of DPO with precomputed reference log-probs against a live reference model, and the step time of
shared-prefix DPO against TRL's standard forward.

    .venv/bin/python bench/train.py [--quick] [--model smollm2-135m-instruct]

``--model`` trains a named model instead (the embedded real default, smollm2-135m-instruct, in its
``model.dtype: auto`` precision: bf16 on a CPU with AMX/AVX-512 BF16); the default is the tiny model
below, in fp32, on which the targets were set.

One model and one set of pairs for every run: a Qwen2 made by ``make_tiny_model`` (hidden 1024, 8 layers,
~72 M parameters; --quick: hidden 768, 6 layers), deeper than wide so that ZeRO-3 gathers a small share
of the model at a time as it does for a 7B model, and BFCL pairs (ground-truth call vs a mutated call).
The reference log-probs are computed once, before the runs, and given to the precomputed runs as pair
columns; the live runs get the same pairs without them.
Every run trains as the project recommends for large models (configs/qwen2.5-7b-gpu.yaml) in one respect:
gradient accumulation (2 micro-batches of 2 pairs per worker per optimizer step; the 7B config uses 4).
That matters for the memory comparison: ZeRO-3 keeps a gradient partition buffer for the whole run,
while ZeRO-2 allocates its gradient partition in the backward and frees it after the optimizer step, so
at 2 workers and without accumulation ZeRO-3's saving on parameters (half of them) is offset by that
buffer exactly where the peak is, at the end of the forward; with accumulation ZeRO-2 carries its
gradient partition through the later micro-batches' forwards too. The 7B config's gradient checkpointing
is not used: it would make each policy step ~4 forwards' worth of compute instead of ~3, so the live
reference's one forward would weigh less (the step-time ratio would move towards 0.8 by construction).
Before the runs, the reference log-probs of the same pairs are also computed on one vLLM replica
(``train.dpo.reference: replicas``, the default), timed against TRL's precompute and compared to it.
Runs, each DPO for the same steps and batches:
  1. Ray Train, 2 workers, ZeRO-2, precomputed reference   (memory, tokens/s, step time)
  2. Ray Train, 2 workers, ZeRO-3, precomputed reference   (memory, step time)
  3. Ray Train, 2 workers, ZeRO-3, live reference          (step time: the headline's denominator)
  4. Ray Train, 2 workers, ZeRO-2, live reference          (step time; not with --quick)
  5. Ray Train, 2 workers, ZeRO-2, precomputed reference, LoRA (train.lora's defaults): step time and
     memory beside run 1's full fine-tuning
  6. Ray Train, 2 workers, ZeRO-3, precomputed reference, train.dpo.shared_prefix off (step time: the
     last line's denominator; runs 1-5 and 7 use the default, on)
  7. TRL in this process, 1 process, no DeepSpeed, precomputed reference (tokens/s)
ZeRO-3 runs use configs/deepspeed/zero3.json as shipped: its "auto" stage3_max_live_parameters and
stage3_max_reuse_distance become one decoder layer's parameters (ttpa_ray.train.run.load_deepspeed);
DeepSpeed's default, 1e9 parameters, exceeds this whole model, and ZeRO-3 would then keep every
gathered parameter through the step.
Memory, per worker: the peak model-state memory (parameters, gradients, optimizer buffers and states
held by the rank, measured inside DeepSpeed's step), and the process's peak RSS, split into set-up
(model loading and DeepSpeed engine construction, up to the first step) and training steps (which add
activations, gathered parameters, communication buffers). Step time is the median of per-step times
(the first, warm-up step left out); tokens/s is measured between the first and the last logged step.
The reference headline is measured in the configuration the project recommends for large models,
ZeRO-3 at 2 workers: ``precomputed_over_live_step_time = <ratio>``, the median over steps of the
precomputed run's step time over the live run's step time for the same step (same seed, same batches).
Its target, at most 0.75, is the ideal ratio itself: a policy step is a forward and a backward of about
two forwards, the live reference adds one no-grad forward, so 3/4 with nothing else in the step. py-spy
on these runs (full size, ZeRO-3, two runs) put the reference forward at 0.92-1.02 of the policy forward,
the backward at 1.96-2.15 forwards (the gradient reduce-scatter over gloo ~1% of it) and the rest of the
step (optimizer step, metrics, logging, collation) under 1% of it, i.e. an expected ratio of 0.75-0.78;
single steps vary by ~5% from run to run on this shared 2-core machine, which moves the headline by a
few hundredths either way.
The last line compares the forwards: ``shared_prefix_over_standard_step_time = <ratio>``, run 2 over run 6
step by step (same pairs, seed, batches, reference mode and workers), the median over steps. Its goal is
at most 0.6. The pairs are BFCL calls against the same call with one field changed, i.e. token-level
pairs that branch where the field starts; the line before it gives the share of tokens the packed rows
hold (the workers' ``shared_prefix/token_share``: what the shared prefix alone would give if time
followed tokens). Shared-prefix DPO also projects only the scored positions through the LM head (TRL's
fused head does that on Triton devices only): on a CPU, TRL's head over every position of a ~300-token
BFCL row is a large part of the step.
The runs are one after the other, so both ratios compare runs that met whatever else the machine ran at
their time: each run's line ends with the machine's load (a quiet machine shows about 2, the workers).

Measured 2026-12-07 (``--quick --model smollm2-135m-instruct``, bf16, 18 min 40 s): shared prefix 21.99 s
a step against 52.06 s standard, ``shared_prefix_over_standard_step_time = 0.423`` (goal 0.6: met) with
the packed rows holding 0.538 of the tokens, and peak RSS per worker 2,743 against 4,611 MiB; LoRA (rank
16, every linear layer) 15.51 s a step against full fine-tuning's 19.79 s (paired 0.786), model states
298 against 1,155 MiB and peak RSS 1,833 against 2,804 MiB per worker;
``precomputed_over_live_step_time = 0.661``.
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


def _single_process(
    model_dir: Path,
    table: Any,
    steps: int,
    batch: int,
    accumulation: int,
    max_length: int,
    out: Path,
    dtype: str = "float32",
) -> Any:
    """TRL's DPOTrainer in this process, without Ray or DeepSpeed: the baseline for tokens/s."""
    import pyarrow.parquet as pq
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ttpa_ray.config import DPOStageConfig
    from ttpa_ray.train.arguments import RunSettings
    from ttpa_ray.train.dpo import build_dpo_trainer, dpo_args
    from ttpa_ray.train.metrics import ConsoleMetrics

    stage = DPOStageConfig(
        max_steps=steps,
        per_device_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        max_length=max_length,
    )
    from ttpa_ray.models import resolve_dtype

    bf16 = resolve_dtype(dtype) == "bfloat16"  # as the Ray workers run it
    settings = RunSettings(seed=0, deepspeed=None, use_cpu=True, save_steps=10**6, bf16=bf16)
    args = dpo_args(stage, out, settings, precomputed_reference=True)
    console = ConsoleMetrics(prefix="[single] ")
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    trainer = build_dpo_trainer(model, tokenizer, pq.read_table(table), args, [console])
    trainer.train()
    return console.history


def _pairs(model_dir: Path, count: int, max_length: int, work: Path, dtype: str) -> tuple[Path, Path, Path]:
    """The first ``count`` BFCL pairs that pass the training checks, written twice: without and with
        reference log-probs (computed once here, by the same pass run_stage would make); and the checked
    training table with those log-probs, for the single-process run."""
    import dataclasses

    from transformers import AutoTokenizer

    from ttpa_ray.records import write_parquet
    from ttpa_ray.train.data import bfcl_preference_pairs
    from ttpa_ray.train.dpo import precompute_reference_logps
    from ttpa_ray.train.run import check_inputs

    pairs = bfcl_preference_pairs("simple_python")[: count * 2]
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    checked = check_inputs("dpo", [p.to_row() for p in pairs], tokenizer, max_length)
    keep = checked.table.column("pair_id").to_pylist()[:count]
    if len(keep) < count:
        raise RuntimeError(f"only {len(keep)} BFCL pairs fit max_length {max_length}; {count} needed")
    pairs = [p for p in pairs if p.pair_id in set(keep)]
    plain = write_parquet(pairs, work / "pairs.parquet")
    table = checked.table.slice(0, count)
    started = time.perf_counter()
    ref = precompute_reference_logps(model_dir, table, max_length=max_length, dtype=dtype)
    print(f"reference_trl_precompute_s = {time.perf_counter() - started:.1f}", flush=True)
    chosen = ref.column("ref_chosen_logps").to_pylist()
    rejected = ref.column("ref_rejected_logps").to_pylist()
    logps = dict(zip(ref.column("pair_id").to_pylist(), zip(chosen, rejected, strict=True), strict=True))
    with_ref = [
        dataclasses.replace(p, ref_chosen_logps=logps[p.pair_id][0], ref_rejected_logps=logps[p.pair_id][1])
        for p in pairs
    ]
    import pyarrow.parquet as pq

    pq.write_table(ref, work / "table.parquet")
    return plain, write_parquet(with_ref, work / "pairs_with_reference.parquet"), work / "table.parquet"


def _replica_reference(model_dir: Path, table_path: Path, max_length: int, dtype: str) -> None:
    """The same pairs' reference log-probs on one vLLM replica (train.dpo.reference: replicas), timed
    with the engine's start-up, and how far they are from TRL's."""
    import pyarrow.parquet as pq

    from ttpa_ray.config import VLLMConfig
    from ttpa_ray.reference import replica_reference_logps
    from ttpa_ray.train.data import REF_COLUMNS

    trl = pq.read_table(table_path)
    started = time.perf_counter()
    ours = replica_reference_logps(
        VLLMConfig(gpu_memory_utilization=0.1), str(model_dir), trl, max_length=max_length, dtype=dtype
    )
    seconds = time.perf_counter() - started
    gaps = [
        abs(a - b)
        for c in REF_COLUMNS
        for a, b in zip(ours.column(c).to_pylist(), trl.column(c).to_pylist(), strict=True)
    ]
    scale = statistics.mean(abs(v) for v in trl.column(REF_COLUMNS[0]).to_pylist())
    print(f"reference_replicas_s = {seconds:.1f} (one replica, vLLM start-up included)", flush=True)
    print(f"reference_replicas_max_abs_gap_to_trl = {max(gaps):.4f} (mean |logp| {scale:.1f})", flush=True)


def main() -> None:
    """Run the trainings and print the figures."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer steps and a smaller model (< 5 min)")
    parser.add_argument("--model", default=None, help="a model to train instead of the made one")
    opts = parser.parse_args()
    hidden, layers, steps = (768, 6, 4) if opts.quick else (1024, 8, 7)
    batch, accumulation, max_length, workers = 2, 2, 384, 2

    import ray

    from ttpa_ray.config import TrainConfig
    from ttpa_ray.models import resolve_model
    from ttpa_ray.tiny_model import make_tiny_model
    from ttpa_ray.train.run import load_deepspeed, run_stage

    work = Path(tempfile.mkdtemp(prefix="ttpa-bench-train-"))
    heads = hidden // 64
    if opts.model:
        model_dir, dtype = Path(resolve_model(opts.model)), "auto"
        described = f"{opts.model} ({model_dir})"
    else:
        model_dir = make_tiny_model(
            work / "model", seed=0, hidden_size=hidden, num_layers=layers, num_heads=heads
        )
        dtype, described = "float32", f"Qwen2 hidden={hidden} layers={layers} heads={heads} (make_tiny_model)"
    pairs_n = steps * workers * batch * accumulation  # every run sees each pair once
    plain_pairs, ref_pairs, table = _pairs(model_dir, pairs_n, max_length, work, dtype)
    zero3 = load_deepspeed("zero3", model_dir)
    assert zero3 is not None
    live = zero3["zero_optimization"]["stage3_max_live_parameters"]
    print(f"model: {described}, dtype {dtype}, {pairs_n} BFCL pairs")
    print(
        f"each run: DPO, {steps} optimizer steps of {accumulation} accumulated micro-batches "
        f"of {batch} pairs per worker, max_length {max_length}, no gradient checkpointing; "
        f"ZeRO-3: zero3.json as shipped (stage3_max_live_parameters = stage3_max_reuse_distance "
        f"= one decoder layer = {live})"
    )

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    _replica_reference(model_dir, table, max_length, dtype)
    results: dict[str, Any] = {}
    runs = {  # ZeRO stage, reference, shared prefix, LoRA
        "zero2_precomputed": ("zero2", "precomputed", True, False),
        "zero3_precomputed": ("zero3", "precomputed", True, False),
        "zero3_live": ("zero3", "live", True, False),
    }
    if not opts.quick:
        runs["zero2_live"] = ("zero2", "live", True, False)
    runs["zero2_precomputed_lora"] = ("zero2", "precomputed", True, True)
    runs["zero3_precomputed_standard"] = ("zero3", "precomputed", False, False)
    for name, (zero, reference, shared_prefix, lora) in runs.items():
        started = time.perf_counter()
        train = TrainConfig(
            num_workers=workers,
            deepspeed=zero,
            save_steps=10**6,
            lora={} if lora else None,  # LoraSettings' defaults: rank 16 on every linear layer
            dpo={
                "reference": reference,
                "shared_prefix": shared_prefix,
                "max_steps": steps,
                "per_device_batch_size": batch,
                "gradient_accumulation_steps": accumulation,
                "max_length": max_length,
                "init_from_sft": False,
            },
        )
        outcome = run_stage(
            "dpo",
            train,
            policy=str(model_dir),
            run_dir=work / name,
            run_name=name,
            input_path=ref_pairs if reference == "precomputed" else plain_pairs,
            dtype=dtype,
        )
        step_s, tokens_s = _rates(outcome.result.history)
        res = outcome.result
        results[name] = {
            "peak_rss_mib": res.worker_peak_rss_mib,
            "setup_rss_mib": res.worker_setup_peak_rss_mib,
            "steps_rss_mib": res.worker_steps_peak_rss_mib,
            "model_state_mib": res.worker_model_state_mib,
            "step_s": step_s,
            "tok_s": tokens_s,
            "gaps": _gaps(res.history),
            "token_share": statistics.mean(h.get("shared_prefix/token_share", 1.0) for h in res.history),
        }
        print(
            f"{name}: per worker peak model states {[round(m) for m in res.worker_model_state_mib]} MiB, "
            f"peak RSS {[round(m) for m in res.worker_peak_rss_mib]} MiB (set-up "
            f"{[round(m) for m in res.worker_setup_peak_rss_mib]}, steps "
            f"{[round(m) for m in res.worker_steps_peak_rss_mib]}); step {step_s:.3f} s "
            f"(per step {[round(g, 2) for g in _gaps(res.history)]}), {tokens_s:.0f} tokens/s "
            f"({time.perf_counter() - started:.0f} s; machine load {os.getloadavg()[1]:.1f} over the last "
            "5 min, 2 of it the workers)",
            flush=True,
        )
        shutil.rmtree(work / name, ignore_errors=True)  # checkpoints: GBs per run
    ray.shutdown()

    history = _single_process(
        model_dir, table, steps, batch * workers, accumulation, max_length, work / "single", dtype
    )
    single_step, single_tokens = _rates(history)
    print(f"single_process_trl: step {single_step:.3f} s, {single_tokens:.0f} tokens/s (same global batch)")

    def paired(pre: str, live: str) -> float:
        # same seed, same data order: step i of both runs sees the same batch, so compare step by step
        ratios = [p / q for p, q in zip(results[pre]["gaps"], results[live]["gaps"], strict=True)]
        return statistics.median(ratios)

    z2, z3 = results["zero2_precomputed"], results["zero3_precomputed"]
    for key, label in (
        ("model_state_mib", "peak_model_state_mib"),
        ("setup_rss_mib", "setup_peak_rss_mib"),
        ("steps_rss_mib", "steps_peak_rss_mib"),
        ("peak_rss_mib", "peak_rss_mib"),
    ):
        print(f"{label}_per_worker_zero2 = {max(z2[key]):.0f}")
        print(f"{label}_per_worker_zero3 = {max(z3[key]):.0f}")
        print(f"zero3_{label}_below_zero2 = {max(z3[key]) < max(z2[key])}")
    print(f"ray_zero2_2workers_over_single_process_tokens_per_s = {z2['tok_s'] / single_tokens:.3f}")
    if "zero2_live" in results:
        print(f"zero2_precomputed_over_live_step_time = {paired('zero2_precomputed', 'zero2_live'):.3f}")
    ratio = paired("zero3_precomputed", "zero3_live")
    shutil.rmtree(work, ignore_errors=True)
    print("headline configuration: ZeRO-3, 2 workers (the configuration recommended for large models)")
    print(f"precomputed_over_live_step_time = {ratio:.3f}")
    lora = results["zero2_precomputed_lora"]
    print(
        f"lora (rank 16, all linear layers) against full fine-tuning, ZeRO-2, precomputed reference: step "
        f"{lora['step_s']:.3f} s vs {z2['step_s']:.3f} s (paired ratio "
        f"{paired('zero2_precomputed_lora', 'zero2_precomputed'):.3f}); peak model states per worker "
        f"{max(lora['model_state_mib']):.0f} vs {max(z2['model_state_mib']):.0f} MiB; peak RSS per worker "
        f"{max(lora['peak_rss_mib']):.0f} vs {max(z2['peak_rss_mib']):.0f} MiB"
    )
    shared, standard = results["zero3_precomputed"], results["zero3_precomputed_standard"]
    print(
        f"shared prefix: step {shared['step_s']:.3f} s, standard step {standard['step_s']:.3f} s (ZeRO-3, "
        f"2 workers, precomputed reference); the packed rows hold {shared['token_share']:.3f} of the "
        "standard rows' tokens"
    )
    shared_over_standard = paired("zero3_precomputed", "zero3_precomputed_standard")
    print(f"shared_prefix_over_standard_step_time = {shared_over_standard:.3f}")


if __name__ == "__main__":
    main()
