"""Reverse-construction throughput against raw vLLM, measured in one run on one engine.

The stage is measured as Ray Data runs it, without Ray's start-up: one ``ReverseReplica`` (the class
Ray Data hosts) in this process is called with the shard batches ``run_reverse`` would send it
(``shards_per_call``), so the figure includes prompt rendering, structured outputs, real tool
execution, the quality filters and the Parquet shard writes. Its generated tokens/s is compared with
raw ``LLM.generate`` on the same engine (same settings, one replica):

* raw: flat batches of ``max_concurrent_dialogues`` prompts (the stage's own scene prompts, a new
  set of seeds per batch, so the prefix cache helps raw as much as it helps the stage), each request
  producing the stage's mean tokens per request (``ignore_eos``), until the same total of generated
  tokens; plain sampling, no grammar. Timed before and after the stage, the mean is used, so drift
  in the machine's load weighs on both sides.
* the stage twice, same seeds: ``scheduling=lockstep`` (one step of every dialogue per generate
  call) and ``scheduling=continuous`` (a dialogue's next step joins the running batch as soon as its
  previous step finished): the configured default is the headline.

Also printed: the same flat batch under the scene step's JSON-schema grammar (the grammar's own
cost on the CPU, which no scheduling can remove), and the engine's busy fraction (time the stage
waited on the engine / wall time).

    .venv/bin/python bench/reverse.py [--quick]
Last line: ``reverse_over_raw_tokens_per_second = <ratio>`` (target >= 0.8 with one replica).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def _stage(replica: Any, config: Any, shards: list[tuple[str, list[Any]]], out: Path) -> dict[str, float]:
    """Run the replica over every shard, batches as run_reverse sends them; totals and wall time."""
    from ttpa_ray.reverse import shards_per_call

    replica.out_dir = out
    replica.config = config
    per_call = shards_per_call(config, len(shards))
    totals = {"tokens": 0.0, "requests": 0.0, "busy": 0.0, "dialogues": 0.0, "rejected": 0.0}
    start = time.perf_counter()
    for i in range(0, len(shards), per_call):
        batch = shards[i : i + per_call]
        replica(
            {
                "shard_id": [sid for sid, _ in batch],
                "seeds": [json.dumps([s.to_json() for s in seeds]) for _, seeds in batch],
            }
        )
    seconds = time.perf_counter() - start
    for marker in (out / "shards").glob("*.done.json"):
        done = json.loads(marker.read_text())
        for key in totals:
            totals[key] += done[key]
    return {**totals, "seconds": seconds, "rate": totals["tokens"] / seconds}


def _raw(
    engine: Any, batches: list[list[list[int]]], per_prompt: int, total: int, temperature: float
) -> float:
    """Tokens/s of plain flat batches (cycling over ``batches``) producing ``total`` tokens."""
    params = engine.sampling_params(max_tokens=per_prompt, temperature=temperature, seed=None)
    params.ignore_eos = True  # every request really produces per_prompt tokens
    made, seconds = 0, 0.0
    for prompts in itertools.cycle(batches):
        if made >= total:
            break
        start = time.perf_counter()
        completions = engine.generate(prompts, params)
        seconds += time.perf_counter() - start
        made += sum(len(c.token_ids) for c in completions)
    return made / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer seeds (under 5 minutes)")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

    from ttpa_ray.config import load_config
    from ttpa_ray.reverse import DialogueState, ReverseBuilder, ReverseReplica, _shards, make_seeds
    from ttpa_ray.tiny_model import make_tiny_model
    from ttpa_ray.tools.registry import load_catalogue

    seeds_n = 96 if args.quick else 256
    work = Path(tempfile.mkdtemp(prefix="bench-reverse-"))
    model = make_tiny_model(work / "tiny", seed=0)
    config = load_config(
        ROOT / "configs" / "local.yaml",
        [
            f"model.policy={model}",
            f"reverse.num_seeds={seeds_n}",
            "reverse.max_concurrent_dialogues=32",
            "reverse.max_tokens=256",
        ],
    )
    seeds = make_seeds(load_catalogue(config.reverse.catalogue), config.reverse, config.run.seed)
    shards = _shards(seeds, config.reverse.shard_size)
    replica = ReverseReplica(str(model), config.model_dump(mode="json"), str(work / "warm"))
    engine = replica.engine
    replica.registry.warm()
    _stage(replica, config, _shards(seeds[:8], 4), work / "warm")  # grammar caches, sandbox workers

    builder = ReverseBuilder(engine, replica.registry, config.reverse)
    width = config.reverse.max_concurrent_dialogues
    scene_prompts = [
        builder._scene_request(DialogueState(seed=s, tools=[builder.specs[n] for n in s.tool_names]))[0]
        for s in seeds
    ]
    batches = [scene_prompts[i : i + width] for i in range(0, len(seeds) - width + 1, width)]
    first, prompts = seeds[:width], batches[0]

    def lockstep_config() -> Any:
        return config.model_copy(
            update={"reverse": config.reverse.model_copy(update={"scheduling": "lockstep"})}
        )

    lockstep = _stage(replica, lockstep_config(), shards, work / "lockstep")
    # Raw is timed around the headline stage run: before it and after it.
    total = int(lockstep["tokens"])
    per_prompt = max(1, round(lockstep["tokens"] / lockstep["requests"]))
    engine.generate(prompts[:2], engine.sampling_params(max_tokens=8))  # warm-up
    raw_before = _raw(engine, batches, per_prompt, total, config.reverse.temperature)
    stage = _stage(replica, config, shards, work / "continuous")
    raw_after = _raw(engine, batches, per_prompt, total, config.reverse.temperature)
    raw_rate = (raw_before + raw_after) / 2

    # The same flat batch under the scene step's grammar: the grammar's share of the cost.
    requests = [
        builder._request(DialogueState(seed=s, tools=[builder.specs[n] for n in s.tool_names])) for s in first
    ]
    start = time.perf_counter()
    constrained = engine.generate([p for p, _ in requests], [q for _, q in requests])
    constrained_rate = sum(len(c.token_ids) for c in constrained) / (time.perf_counter() - start)
    grammar_ref = _raw(
        engine,
        [prompts],
        max(1, round(sum(len(c.token_ids) for c in constrained) / len(first))),
        1,
        config.reverse.temperature,
    )
    engine.close()

    n = len(seeds)
    print(f"load average at the end (2 cores): {os.getloadavg()[0]:.2f}")
    print(
        f"seeds {n} in {len(shards)} shards: {stage['dialogues']:.0f} dialogues,"
        f" {stage['rejected']:.0f} rejected"
    )
    print(f"teacher requests {stage['requests']:.0f}, mean {per_prompt} generated tokens each")
    for name, run in (("lockstep", lockstep), ("continuous", stage)):
        print(
            f"stage, {name:<10}: {run['tokens']:.0f} tokens in {run['seconds']:.2f} s"
            f" = {run['rate']:,.0f} tok/s,"
            f" engine busy {run['busy'] / run['seconds']:.3f}, {run['rate'] / raw_rate:.3f} of raw"
        )
    print(
        f"raw LLM.generate, {len(prompts)} x {per_prompt} tokens per batch: {raw_before:,.0f} tok/s before,"
        f" {raw_after:,.0f} after"
    )
    print(
        f"flat batch under the scene grammar: {constrained_rate / grammar_ref:.3f} of the same batch without"
    )
    if stage["tokens"] != lockstep["tokens"] or stage["dialogues"] != lockstep["dialogues"]:
        print("MISMATCH: the two schedulings built different dialogues")
    headline = stage if config.reverse.scheduling == "continuous" else lockstep
    print(f"reverse_over_raw_tokens_per_second = {headline['rate'] / raw_rate:.3f}")


if __name__ == "__main__":
    main()
