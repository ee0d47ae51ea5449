"""Benchmark: token-level (TPS) vs sequence-level sampling on the same turns and candidate counts.

    .venv/bin/python bench/tps.py [--quick] [--turns N] [--sft-steps N] [--model smollm2-135m-instruct]

``--model smollm2-135m-instruct`` starts the policy from the embedded real model (40 SFT steps at a
small learning rate, bf16 where the CPU has it) instead of the tiny one the target was set on.

A randomly initialised tiny model never emits its end token, so every sample would run to max_tokens
and (a) would mean nothing. The policy here is the project's tiny model after a short single-process
TRL SFT (loss on the call only) on templated single-call dialogues over the built-in tools (question
-> one call, values copied from the question); it emits calls and stops. It is trained on the first
run (minutes on a busy 2-core machine) and reused from runs/bench-tps/ afterwards. Bench turns are
new draws of the same templates (values unseen in training).

Figures, one run, one replica (one vLLM engine), the same max_tokens for both samplers, and per turn
the sequence sampler draws as many samples as TPS decoded continuations:
(a) generated tokens per candidate, TPS over sequence-level (TPS decodes suffixes only; its one
    forced-pass token per turn is counted); greedy continuations (the config default) are the
    headline, sampled ones (same temperature as the baseline) are printed beside them;
(b) labelled pairs per second per replica (sampling + ESM labelling + pair rule), TPS over baseline;
(c) share of pairs whose chosen and rejected differ in exactly one field (name, one key, one value).
The last line is ``tps_over_sequence_tokens_per_candidate = <number>`` (greedy TPS).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ttpa_ray.codec import render_hermes  # noqa: E402
from ttpa_ray.config import ESMConfig, TPSConfig, VLLMConfig  # noqa: E402
from ttpa_ray.records import Turn  # noqa: E402

WORK = ROOT / "runs" / "bench-tps"
CITIES = ("Paris", "Tokyo", "Berlin", "Madrid", "Rome", "London", "New York", "Sydney", "Cairo", "Lima")
# (tool, question template, argument builder): one built-in tool per dialogue keeps prompts short.
TEMPLATES: tuple[tuple[str, str, Any], ...] = (
    (
        "get_weather",
        "What is the weather in {city} on {date}?",
        lambda v: {"city": v["city"], "date": v["date"]},
    ),
    ("get_city_info", "Tell me about {city}.", lambda v: {"city": v["city"]}),
    ("get_weekday", "Which weekday is {date}?", lambda v: {"date": v["date"]}),
    (
        "add_days",
        "What is the date {days} days after {date}?",
        lambda v: {"date": v["date"], "days": v["days"]},
    ),
    (
        "days_between",
        "How many days are there from {date} to {date2}?",
        lambda v: {"start_date": v["date"], "end_date": v["date2"]},
    ),
    (
        "convert_time",
        "It is {date} 09:30 in {city}. What time is it in {city2}?",
        lambda v: {"time": f"{v['date']} 09:30", "from_city": v["city"], "to_city": v["city2"]},
    ),
)


def template_values(rng: Any) -> dict[str, Any]:
    """Values for :data:`TEMPLATES`: two cities, two dates of 2026 and a number of days."""
    city, city2 = rng.sample(CITIES, 2)
    return {
        "city": city,
        "city2": city2,
        "date": f"2026-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
        "date2": f"2026-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
        "days": rng.randint(1, 90),
    }


def builtin_dialogues(count: int, seed: int) -> list[Any]:
    """Templated single-call dialogues over the built-in tools (values drawn with ``seed``)."""
    import random

    from ttpa_ray.codec import ToolCall
    from ttpa_ray.records import Dialogue, Message
    from ttpa_ray.tools.registry import load_catalogue

    specs = load_catalogue("builtin").specs
    rng = random.Random(seed)
    dialogues = []
    for i in range(count):
        name, question, build = TEMPLATES[i % len(TEMPLATES)]
        values = template_values(rng)
        dialogues.append(
            Dialogue(
                dialogue_id=f"builtin/{seed}/{i}",
                seed_id=f"{seed}/{i}",
                messages=(
                    Message(role="user", content=question.format(**values)),
                    Message(role="assistant", tool_calls=(ToolCall(name, build(values)),)),
                ),
                tools=(specs[name],),
            )
        )
    return dialogues


def sft_rows(turns: list[Turn], tokenizer: Any) -> list[dict[str, list[int]]]:
    """Pre-tokenised SFT rows: chat prompt + reference call ids, loss on the call only."""
    rows = []
    for turn in turns:
        prompt = tokenizer.apply_chat_template(
            [m.to_openai() for m in turn.context],
            tools=[t.to_openai() for t in turn.tools],
            add_generation_prompt=True,
            tokenize=False,
        )
        prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
        call_ids = tokenizer.encode(
            render_hermes(turn.reference_calls) + "<|im_end|>", add_special_tokens=False
        )
        rows.append(
            {
                "input_ids": prompt_ids + call_ids,
                "completion_mask": [0] * len(prompt_ids) + [1] * len(call_ids),
            }
        )
    return rows


def ensure_policy(steps: int, base_model: str = "tiny") -> tuple[Path, str]:
    """The SFT policy folder (trained now, or reused from an earlier run) and a one-line description."""
    from ttpa_ray.models import resolve_model
    from ttpa_ray.tiny_model import ensure_tiny_model
    from ttpa_ray.tps import turns_from_dialogues

    tiny = base_model == "tiny"
    base = ensure_tiny_model(WORK / "tiny", seed=0) if tiny else Path(resolve_model(base_model))
    out = WORK / f"policy-builtin-sft-{steps}" if tiny else WORK / f"policy-{base_model}-sft-{steps}"
    name = "tiny Qwen2 (seed 0)" if tiny else base_model
    what = f"{name} + TRL SFT {steps} steps x 8 templated built-in tool-call turns ({out})"
    if (out / "config.json").exists():
        return out, what + ", reused"
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(base)
    dialogues = builtin_dialogues(1200, seed=1)
    turns, _ = turns_from_dialogues(dialogues)
    data = Dataset.from_list(sft_rows(turns, tokenizer))
    model = AutoModelForCausalLM.from_pretrained(base)
    args = SFTConfig(
        output_dir=str(WORK / "sft-work"),
        max_steps=steps,
        per_device_train_batch_size=8,
        learning_rate=5e-3 if tiny else 1e-4,  # a random model needs a large step, a real one a small one
        bf16=not tiny,
        lr_scheduler_type="cosine",
        warmup_steps=10,
        completion_only_loss=True,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=max(1, steps // 5),
        seed=0,
    )
    start = time.perf_counter()
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    result = trainer.train()
    trainer.save_model(str(out))
    tokenizer.save_pretrained(out)
    print(f"SFT: {steps} steps in {time.perf_counter() - start:.0f} s, final loss {result.training_loss:.3f}")
    return out, what + f", trained now (mean loss {result.training_loss:.3f})"


@dataclass
class Measured:
    """One sampler's run over the bench turns, labelled into pairs."""

    samples: list[Any]
    pairs: Any
    seconds: float

    @property
    def candidates(self) -> int:
        """Continuations decoded (before deduplication)."""
        return sum(len(s.candidate_tokens) for s in self.samples)

    @property
    def kept(self) -> int:
        """Distinct candidates."""
        return sum(len(s.candidates) for s in self.samples)

    @property
    def parsed(self) -> int:
        """Distinct candidates that parse as calls."""
        return sum(1 for s in self.samples for c in s.candidates if c.calls)

    @property
    def tokens_per_candidate(self) -> float:
        """Generated tokens per decoded candidate (TPS includes one forced-pass token per turn)."""
        return sum(s.generated_tokens for s in self.samples) / max(1, self.candidates)

    @property
    def rate(self) -> float:
        """Labelled pairs per second (sampling + ESM + pair rule)."""
        return len(self.pairs.pairs) / self.seconds

    def stopped(self, eos: int) -> int:
        """Distinct candidates whose completion ends with the end token."""
        return sum(1 for s in self.samples for c in s.candidates if c.completion_token_ids[-1:] == (eos,))


def reasons(rejected: list[Any]) -> dict[str, int]:
    """Rejected rows counted by reason."""
    counts: dict[str, int] = {}
    for row in rejected:
        counts[row.reason] = counts.get(row.reason, 0) + 1
    return counts


def measure(run: Callable[[], list[Any]], esm: ESMConfig) -> Measured:
    """Time one sampler run plus labelling (ESM + pair rule)."""
    from ttpa_ray.pairs import pairs_from_samples

    started = time.perf_counter()
    samples = run()
    pairs = pairs_from_samples(samples, esm)
    return Measured(samples, pairs, time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="fewer turns (under 5 minutes once the policy exists)"
    )
    parser.add_argument(
        "--turns", type=int, default=None, help="evaluation turns (default 16 quick, 64 full)"
    )
    parser.add_argument("--sft-steps", type=int, default=None, help="SFT steps of the policy (default 200)")
    parser.add_argument(
        "--model", default="tiny", help="the policy's base: tiny (default) or smollm2-135m-instruct"
    )
    opts = parser.parse_args()
    steps = opts.sft_steps or (200 if opts.model == "tiny" else 40)
    n_turns = opts.turns or (16 if opts.quick else 64)

    from ttpa_ray.engine import Engine
    from ttpa_ray.pairs import single_field_share
    from ttpa_ray.tps import SequenceSampler, TokenLevelSampler, turns_from_dialogues

    policy, description = ensure_policy(steps, opts.model)
    turns, _ = turns_from_dialogues(builtin_dialogues(n_turns, seed=2))  # unseen values
    config = TPSConfig(
        top_k=3, max_branches=4, tau=0.05, continuation="greedy", temperature=1.0, max_tokens=96
    )
    esm = ESMConfig()
    engine = Engine(
        str(policy),
        VLLMConfig(
            gpu_memory_utilization=0.1 if opts.model == "tiny" else 0.3, max_model_len=4096, max_num_seqs=64
        ),
        dtype="float32" if opts.model == "tiny" else "auto",
    )
    tps = TokenLevelSampler(engine, config)
    tps_sampled = TokenLevelSampler(engine, config.model_copy(update={"continuation": "sampled"}))
    sequence = SequenceSampler(engine, config)
    # Warm-up (untimed): the first requests of an engine pay one-off costs.
    warm = tps.sample(turns[:2])
    sequence.sample(turns[:2], [len(s.candidate_tokens) for s in warm])

    greedy = measure(lambda: tps.sample(turns), esm)
    counts = [len(s.candidate_tokens) for s in greedy.samples]
    sampled = measure(lambda: tps_sampled.sample(turns), esm)
    baseline = measure(lambda: sequence.sample(turns, counts), esm)
    eos = engine.tokenizer.eos_token_id
    engine.close()

    print(f"policy: {description}")
    print(
        f"turns: {len(turns)} held-out templated built-in turns; max_tokens {config.max_tokens} for both; "
        f"TPS top_k {config.top_k}, m {config.max_branches}, tau {config.tau}; "
        f"sequence T={config.temperature}"
    )
    print(
        f"policy check (distinct sequence samples): {baseline.stopped(eos)}/{baseline.kept} end with the "
        f"end token, {baseline.parsed}/{baseline.kept} parse as calls"
    )
    print(
        f"candidates: TPS {greedy.candidates}, sequence {baseline.candidates} (same count per turn, before "
        f"dedupe); distinct TPS greedy candidates ending with the end token: "
        f"{greedy.stopped(eos)}/{greedy.kept}"
    )
    print(
        f"(a) generated tokens per candidate: TPS greedy {greedy.tokens_per_candidate:.2f}, TPS sampled "
        f"{sampled.tokens_per_candidate:.2f}, sequence {baseline.tokens_per_candidate:.2f}; ratios "
        f"{greedy.tokens_per_candidate / baseline.tokens_per_candidate:.3f} (greedy), "
        f"{sampled.tokens_per_candidate / baseline.tokens_per_candidate:.3f} (sampled)"
    )
    print(
        f"(b) labelled pairs per second per replica: TPS greedy {greedy.rate:.2f} ({len(greedy.pairs.pairs)} "
        f"pairs, {greedy.seconds:.1f} s), TPS sampled {sampled.rate:.2f} ({len(sampled.pairs.pairs)} pairs), "
        f"sequence {baseline.rate:.2f} ({len(baseline.pairs.pairs)} pairs, {baseline.seconds:.1f} s); ratio "
        f"{greedy.rate / baseline.rate if baseline.rate else float('inf'):.2f} (greedy)"
    )
    print(
        f"(c) pairs differing in exactly one field: TPS greedy {single_field_share(greedy.pairs.pairs):.3f}, "
        f"TPS sampled {single_field_share(sampled.pairs.pairs):.3f}, sequence "
        f"{single_field_share(baseline.pairs.pairs):.3f}"
    )
    print(
        f"turns paired/rejected: TPS greedy {greedy.pairs.turns_paired}/{len(greedy.pairs.rejected)} "
        f"{reasons(greedy.pairs.rejected)}, sequence {baseline.pairs.turns_paired}/"
        f"{len(baseline.pairs.rejected)} {reasons(baseline.pairs.rejected)}"
    )
    print(
        "tps_over_sequence_tokens_per_candidate = "
        f"{greedy.tokens_per_candidate / baseline.tokens_per_candidate:.4f}"
    )


if __name__ == "__main__":
    main()
