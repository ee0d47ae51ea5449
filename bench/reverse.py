"""Reverse-construction throughput against raw vLLM, measured in one run on one engine.

The stage is measured as Ray Data runs it, without Ray's start-up: one ``ReverseReplica`` (the class
Ray Data hosts) in this process is called with the shard batches ``run_reverse`` would send it
(``shards_per_call``), so the figure includes prompt rendering, structured outputs, real tool
execution, the quality filters and the Parquet shard writes.

Raw is the same work without the stage: every request the stage sent to the engine (its prompt
token ids, recorded as they were submitted) given to one ``LLM.generate`` call as a flat batch, each
producing exactly as many tokens as the stage's request did (``ignore_eos``), plain sampling, no
grammar. Same engine, same settings (``max_num_seqs`` slots, prefix caching), same total of generated
tokens. So the ratio prices exactly what the stage adds: steps that wait on the previous step and on
its tool, the grammars, rendering, filters and writes. (A batch of short, unrelated prompts would
measure a different load: the stage's prompts carry the tool list and the dialogue so far.)

Seeds: as many as one replica call streams on a long run (``shards_per_call``: four times the
dialogues in flight, 512 with configs/local.yaml), so the stream's tail, when its last dialogues run
in ever smaller batches, weighs as much as it does there; --quick takes half of that.

Order, on one engine after a warm-up with other seeds: the stage with ``scheduling=continuous`` (a
dialogue's next step joins the running batch as soon as its previous step ended), raw, the stage with
``scheduling=lockstep`` (one step of every dialogue in flight per generate call), raw again. The
headline is the configured scheduling (``auto``: lockstep on the CPU build, where it measured faster).
The prefix cache is emptied before each of the four, so every run starts cold, as a real run does;
raw is the mean of its two runs, so drift in the machine's load weighs on both sides.

Also printed: the engine's busy fraction (time the stage waited on the engine / wall time), and a
flat batch under the scene step's JSON-schema grammar against the same batch without (the grammar's
own cost on this CPU, which no scheduling can remove).

    .venv/bin/python bench/reverse.py [--quick]
Last line: ``reverse_over_raw_tokens_per_second = <ratio>`` (target >= 0.8 with one replica).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


class Recorder:
    """Wraps an engine's ``submit``/``poll`` to keep every request: prompt ids and tokens generated."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.requests: dict[str, tuple[list[int], int]] = {}
        self._submit, self._poll = engine.submit, engine.poll
        engine.submit, engine.poll = self.submit, self.poll

    def submit(self, request_id: str, prompt: list[int], params: Any) -> None:
        self.requests[request_id] = (list(prompt), 0)
        self._submit(request_id, prompt, params)

    def poll(self) -> list[Any]:
        finished = self._poll()
        for request_id, completion in finished:
            self.requests[request_id] = (self.requests[request_id][0], len(completion.token_ids))
        return finished

    def stop(self) -> list[tuple[list[int], int]]:
        """Restore the engine; the requests in submission order."""
        self.engine.submit, self.engine.poll = self._submit, self._poll
        return list(self.requests.values())


def _stage(replica: Any, config: Any, shards: list[tuple[str, list[Any]]], out: Path) -> dict[str, float]:
    """Run the replica over every shard, batches as run_reverse sends them; totals and wall time."""
    from ttpa_ray.reverse import shards_per_call

    replica.engine.llm.reset_prefix_cache()
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


def _raw(engine: Any, requests: list[tuple[list[int], int]], temperature: float) -> float:
    """Tokens/s of one flat ``generate`` over ``requests``, each making exactly its recorded tokens."""
    engine.llm.reset_prefix_cache()
    params = []
    for _, tokens in requests:
        p = engine.sampling_params(max_tokens=tokens, temperature=temperature, seed=None)
        p.ignore_eos = True  # every request really produces its tokens
        params.append(p)
    start = time.perf_counter()
    completions = engine.generate([prompt for prompt, _ in requests], params)
    seconds = time.perf_counter() - start
    made = sum(len(c.token_ids) for c in completions)
    if made != sum(tokens for _, tokens in requests):
        raise RuntimeError(f"raw made {made} tokens, the stage {sum(t for _, t in requests)}")
    return made / seconds


def _grammar_share(engine: Any, builder: Any, seeds: list[Any], temperature: float) -> float:
    """A flat batch of scene steps under their grammars, over the same batch without (tokens/s)."""
    from ttpa_ray.reverse import DialogueState

    requests = [
        builder._request(DialogueState(seed=s, tools=[builder.specs[n] for n in s.tool_names])) for s in seeds
    ]
    prompts = [prompt for prompt, _ in requests]
    engine.llm.reset_prefix_cache()  # cold, as _raw starts the unconstrained batch
    start = time.perf_counter()
    constrained = engine.generate(prompts, [params for _, params in requests])
    rate = sum(len(c.token_ids) for c in constrained) / (time.perf_counter() - start)
    same_lengths = [(p, max(1, len(c.token_ids))) for p, c in zip(prompts, constrained, strict=True)]
    return rate / _raw(engine, same_lengths, temperature)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer seeds (under 5 minutes)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override, e.g. vllm.max_num_seqs=32",
    )
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

    from ttpa_ray.config import load_config
    from ttpa_ray.reverse import (
        ReverseBuilder,
        ReverseReplica,
        _shards,
        dialogues_in_flight,
        make_seeds,
        scheduling_mode,
        shards_per_call,
    )
    from ttpa_ray.tiny_model import make_tiny_model
    from ttpa_ray.tools.registry import load_catalogue

    work = Path(tempfile.mkdtemp(prefix="bench-reverse-"))
    model = make_tiny_model(work / "tiny", seed=0)
    # The project's local settings (configs/local.yaml) for the engine and the dialogues in flight.
    overrides = [f"model.policy={model}", "reverse.max_tokens=256", *args.set]
    config = load_config(ROOT / "configs" / "local.yaml", overrides)
    # The seeds of one replica call as run_reverse sends it on a long run (shards_per_call: four times
    # the dialogues in flight), so the stream's tail weighs as it does there; --quick: half of that.
    call = shards_per_call(config, 1 << 20) * config.reverse.shard_size
    seeds_n = call // 2 if args.quick else call
    config = load_config(ROOT / "configs" / "local.yaml", [*overrides, f"reverse.num_seeds={seeds_n}"])
    catalogue = load_catalogue(config.reverse.catalogue)
    seeds = make_seeds(catalogue, config.reverse, config.run.seed)
    shards = _shards(seeds, config.reverse.shard_size)
    replica = ReverseReplica(str(model), config.model_dump(mode="json"), str(work / "warm"))
    engine = replica.engine
    replica.registry.warm()
    # Warm-up on other seeds: the sandbox workers start, common grammars compile, as in a long run.
    other = make_seeds(catalogue, config.reverse.model_copy(update={"num_seeds": 8}), config.run.seed + 1)
    _stage(replica, config, _shards(other, 4), work / "warm")

    def scheduled(mode: str) -> Any:
        return config.model_copy(update={"reverse": config.reverse.model_copy(update={"scheduling": mode})})

    recorder = Recorder(engine)
    stage = _stage(replica, scheduled("continuous"), shards, work / "continuous")
    requests = recorder.stop()
    raw_first = _raw(engine, requests, config.reverse.temperature)
    lockstep = _stage(replica, scheduled("lockstep"), shards, work / "lockstep")
    raw_second = _raw(engine, requests, config.reverse.temperature)
    raw_rate = (raw_first + raw_second) / 2
    builder = ReverseBuilder(engine, replica.registry, config.reverse)
    grammar = _grammar_share(engine, builder, seeds[: config.vllm.max_num_seqs], config.reverse.temperature)
    engine.close()

    in_flight = dialogues_in_flight(config.reverse, config.vllm.max_num_seqs)
    prompt_mean = sum(len(p) for p, _ in requests) / len(requests)
    print(f"load average at the end (2 cores): {os.getloadavg()[0]:.2f}")
    print(
        f"engine: max_num_seqs {config.vllm.max_num_seqs}; dialogues in flight {in_flight};"
        f" seeds {len(seeds)} in {len(shards)} shards:"
        f" {stage['dialogues']:.0f} dialogues, {stage['rejected']:.0f} rejected"
    )
    print(
        f"teacher requests {len(requests)}: mean prompt {prompt_mean:.0f} tokens,"
        f" mean {stage['tokens'] / len(requests):.0f} generated tokens"
    )
    for name, run in (("continuous", stage), ("lockstep", lockstep)):
        print(
            f"stage, {name:<10}: {run['tokens']:.0f} tokens in {run['seconds']:.2f} s"
            f" = {run['rate']:,.0f} tok/s, engine busy {run['busy'] / run['seconds']:.3f},"
            f" {run['rate'] / raw_rate:.3f} of raw"
        )
    print(f"raw LLM.generate of the stage's requests: {raw_first:,.0f} tok/s, then {raw_second:,.0f}")
    print(f"flat batch under the scene grammar: {grammar:.3f} of the same batch without")
    if stage["tokens"] != lockstep["tokens"] or stage["dialogues"] != lockstep["dialogues"]:
        print("MISMATCH: the two schedulings built different dialogues")
    headline = stage if scheduling_mode(config.reverse) == "continuous" else lockstep
    mode = scheduling_mode(config.reverse)
    print(f"headline: the configured scheduling ({config.reverse.scheduling}: {mode})")
    print(f"reverse_over_raw_tokens_per_second = {headline['rate'] / raw_rate:.3f}")


if __name__ == "__main__":
    main()
