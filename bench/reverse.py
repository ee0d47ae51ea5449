"""Reverse-construction throughput against raw vLLM, measured in one run on one engine.

The stage's generated tokens/s (scene, calls with real tool execution, question: every step a
structured, schema-constrained batch, dialogues refilled as they finish) as a ratio to raw
``LLM.generate`` on a flat batch of prompts producing the same total of tokens, with the same engine
settings. Also prints the engine's busy fraction during the stage (generate time / wall time).

    .venv/bin/python bench/reverse.py [--quick]
Last line: ``reverse_over_raw_tokens_per_second = <ratio>`` (target >= 0.8 with one replica).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path


def _state(builder, seed):  # a fresh dialogue at its scene step
    from ttpa_ray.reverse import DialogueState

    return DialogueState(seed=seed, tools=[builder.specs[n] for n in seed.tool_names])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer seeds (under 5 minutes)")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from ttpa_ray.config import load_config
    from ttpa_ray.engine import Engine
    from ttpa_ray.reverse import ReverseBuilder, make_seeds
    from ttpa_ray.tiny_model import make_tiny_model
    from ttpa_ray.tools.registry import ToolRegistry, load_catalogue

    seeds_n = 48 if args.quick else 192
    config = load_config(
        Path(__file__).parent.parent / "configs" / "local.yaml",
        [f"reverse.num_seeds={seeds_n}", "reverse.max_concurrent_dialogues=32", "reverse.max_tokens=256"],
    )
    model = make_tiny_model(Path(tempfile.mkdtemp()) / "tiny", seed=0)
    engine = Engine(str(model), config.vllm, dtype="float32", seed=0)
    catalogue = load_catalogue(config.reverse.catalogue)
    seeds = make_seeds(catalogue, config.reverse, 0)

    with ToolRegistry(catalogue) as registry:
        registry.warm()
        builder = ReverseBuilder(engine, registry, config.reverse)
        builder.run(seeds[:4])  # warm-up: grammar compilation caches, sandbox workers
        builder = ReverseBuilder(engine, registry, config.reverse)
        start = time.perf_counter()
        dialogues, rejected = builder.run(seeds)
        stage_seconds = time.perf_counter() - start
    stage_tokens = builder.generated_tokens
    stage_rate = stage_tokens / stage_seconds

    # Raw: the same number of sequences in flight, plain sampling, same total of generated tokens.
    scene_builder = ReverseBuilder(engine, registry, config.reverse)
    prompts = [
        scene_builder._scene_request(_state(scene_builder, s))[0]
        for s in seeds[: config.reverse.max_concurrent_dialogues]
    ]
    per_prompt = max(1, stage_tokens // len(prompts))
    params = engine.sampling_params(max_tokens=per_prompt, temperature=config.reverse.temperature, seed=None)
    params.ignore_eos = True  # the raw batch must really produce the same token count
    engine.generate(prompts[:2], params)  # warm-up
    start = time.perf_counter()
    completions = engine.generate(prompts, params)
    raw_seconds = time.perf_counter() - start
    raw_tokens = sum(len(c.token_ids) for c in completions)
    raw_rate = raw_tokens / raw_seconds

    # The same flat batch under the scene step's structured-output grammar: how much of the gap is the
    # grammar (per-token masks on the CPU) rather than the stage's orchestration.
    requests = [
        scene_builder._request(_state(scene_builder, s))
        for s in seeds[: config.reverse.max_concurrent_dialogues]
    ]
    start = time.perf_counter()
    constrained = engine.generate([p for p, _ in requests], [q for _, q in requests])
    constrained_seconds = time.perf_counter() - start
    constrained_rate = sum(len(c.token_ids) for c in constrained) / constrained_seconds

    print(f"seeds {len(seeds)}: {len(dialogues)} dialogues, {len(rejected)} rejected")
    print(f"stage: {stage_tokens} tokens in {stage_seconds:.2f} s = {stage_rate:,.0f} tok/s")
    print(f"raw LLM.generate: {raw_tokens} tokens in {raw_seconds:.2f} s = {raw_rate:,.0f} tok/s")
    share = constrained_rate / raw_rate
    print(f"flat batch under the scene grammar: {constrained_rate:,.0f} tok/s = {share:.3f} of raw")
    print(f"engine busy fraction during the stage = {builder.busy_seconds / stage_seconds:.3f}")
    engine.close()
    print(f"reverse_over_raw_tokens_per_second = {stage_rate / raw_rate:.3f}")


if __name__ == "__main__":
    main()
