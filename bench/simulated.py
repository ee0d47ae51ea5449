"""Fidelity of simulated tools: BFCL's executable environments against their schema-only versions.

The calls are the ground truth of BFCL's multi-turn entries (``possible_answer/BFCL_v4_multi_turn_base``),
each entry's calls in order, all turns:
- executable: a session of the ``bfcl`` catalogue started from the entry's ``initial_config``, so each
  call sees the state the calls before it left;
- simulated: the ``bfcl-simulated`` catalogue, each response written by the real default model
  (SmolLM2-135M-Instruct on vLLM's CPU build) with the prompt and response schema the reverse stage
  uses (``tools.simulated.response_request``), the entry's first question as the scenario, earlier
  responses of the same tool as examples, and the cache by (tool, canonical arguments) in front.
A call agrees when both succeed with the same top-level keys, or both fail. Calls the registry
refuses before running (arguments that do not fit the schema) are refused the same way by both and
left out. The simulated side runs the entries in lockstep (every entry's k-th call in one batch).

The writer's settings (``reverse.simulated_errors``: may it answer ``{"error": ...}``) were chosen on
entries 100.. (``--offset 100``), never on the reported ones (0..; ``--quick`` 12, default 40).

Printed: agreement overall, by environment and by how they disagree (the simulator fails where the
tool succeeded, or the reverse, or the keys differ), the cache hit rate (calls answered from the
cache / calls), and a few disagreements.

    .venv/bin/python bench/simulated.py [--quick] [--entries N] [--offset K] [--errors] [--model M]
Last line: ``simulated_outcome_agreement = <share of calls>``
"""

from __future__ import annotations

import argparse
import ast
import json
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def ground_truth(limit: int, offset: int = 0) -> list[dict[str, Any]]:
    """``limit`` multi-turn entries from ``offset``: id, scenario, initial config, calls (Python text)."""
    from ttpa_ray.bfcl import data_dir, read_jsonl
    from ttpa_ray.tools.bfcl_envs import load_scenarios

    answers = {
        a["id"]: a["ground_truth"]
        for a in read_jsonl(data_dir() / "possible_answer" / "BFCL_v4_multi_turn_base.json")
    }
    return [
        {
            "id": entry.id,
            "scenario": entry.question[0][0]["content"],
            "initial_config": entry.initial_config,
            "calls": [call for turn in answers[entry.id] for call in turn],
        }
        for entry in load_scenarios("multi_turn_base")[offset : offset + limit]
    ]


def parse_call(text: str, specs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """``name(a=1, 'x')`` as (name, arguments); positional values take the parameters in order."""
    node = ast.parse(text, mode="eval").body
    assert isinstance(node, ast.Call) and isinstance(node.func, ast.Name), text
    name = node.func.id
    arguments = {k.arg: ast.literal_eval(k.value) for k in node.keywords if k.arg}
    order = list(specs[name].parameters.get("properties", {})) if name in specs else []
    for parameter, value in zip(order, node.args, strict=False):
        arguments[parameter] = ast.literal_eval(value)
    return name, arguments


def keys_of(content: Any) -> tuple[str, ...] | None:
    """Top-level keys of a response; nothing (``null``, a method returning None) has none."""
    if content is None:
        return ()
    return tuple(sorted(content)) if isinstance(content, dict) else None


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="12 entries (default 40)")
    parser.add_argument("--entries", type=int, default=None)
    parser.add_argument("--offset", type=int, default=0, help="first entry (100+: the validation slice)")
    parser.add_argument(
        "--errors",
        action="store_true",
        help='let the writer answer {"error": ...} (reverse.simulated_errors)',
    )
    parser.add_argument(
        "--model", default="smollm2-135m-instruct", help="the writer: smollm2-135m-instruct or tiny"
    )
    args = parser.parse_args()
    limit = args.entries or (12 if args.quick else 40)

    from ttpa_ray.config import load_config
    from ttpa_ray.engine import Engine
    from ttpa_ray.models import resolve_model
    from ttpa_ray.tools.registry import ToolRegistry, load_catalogue
    from ttpa_ray.tools.simulated import response_request

    config = load_config(ROOT / "configs" / "local.yaml")
    if args.model == "tiny":
        from ttpa_ray.tiny_model import ensure_tiny_model

        model = str(ensure_tiny_model(Path(tempfile.gettempdir()) / "ttpa-bench-tiny", seed=0))
    else:
        model = resolve_model(args.model)
    entries = ground_truth(limit, args.offset)
    executable = ToolRegistry(load_catalogue("bfcl"), isolated=False)
    simulated = ToolRegistry(load_catalogue("bfcl-simulated"), isolated=False)
    specs = {spec.name: spec for spec in executable.specs}
    for entry in entries:
        entry["parsed"] = [parse_call(text, specs) for text in entry["calls"]]

    start = time.perf_counter()
    real: dict[tuple[int, int], Any] = {}
    for i, entry in enumerate(entries):
        with executable.session(entry["id"], entry["initial_config"]) as session:
            for k, (name, arguments) in enumerate(entry["parsed"]):
                real[i, k] = session.call(name, arguments)
    print(f"executable: {len(real)} calls of {len(entries)} entries in {time.perf_counter() - start:.1f} s")

    engine = Engine(model, config.vllm, dtype=config.model.dtype, seed=0)
    sim: dict[tuple[int, int], Any] = {}
    hits = written = invalid = 0
    start = time.perf_counter()
    for k in range(max(len(e["parsed"]) for e in entries)):
        wave = [(i, e["parsed"][k]) for i, e in enumerate(entries) if k < len(e["parsed"])]
        todo: dict[str, tuple[int, str, dict[str, Any]]] = {}  # the wave's calls to write, one per key
        for i, (name, arguments) in wave:
            if simulated.refuse(name, arguments) is not None:
                continue
            if simulated.simulated.cache.get(name, arguments) is None:
                todo.setdefault(simulated.simulated.cache.key(name, arguments), (i, name, arguments))
        prompts, params = [], []
        for i, name, arguments in todo.values():
            tool = simulated.simulated_tool(name)
            messages, schema = response_request(
                tool,
                arguments,
                simulated.simulated.examples(tool),
                entries[i]["scenario"],
                errors=args.errors or config.reverse.simulated_errors,
            )
            prompts.append(engine.render(messages))
            params.append(
                engine.sampling_params(
                    max_tokens=config.reverse.max_tokens,
                    temperature=config.reverse.text_temperature or 0.0,
                    seed=k,
                    json_schema=schema,
                )
            )
        failures = {}
        for (_i, name, arguments), completion in zip(
            todo.values(), engine.generate(prompts, params) if prompts else [], strict=True
        ):
            failure = simulated.simulated.answer(simulated.simulated_tool(name), arguments, completion.text)
            written += failure is None
            invalid += failure is not None
            failures[simulated.simulated.cache.key(name, arguments)] = failure
        for i, (name, arguments) in wave:
            key = simulated.simulated.cache.key(name, arguments)
            first = todo.pop(key, None) is not None  # the wave's first call of this key was written
            cached = simulated.simulated.cache.get(name, arguments) is not None
            hits += cached and not first
            refused_or_cached = cached or simulated.refuse(name, arguments) is not None
            sim[i, k] = simulated.call(name, arguments) if refused_or_cached else failures[key]
    seconds = time.perf_counter() - start
    engine.close()

    agree: Counter[str] = Counter()
    total: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    refused = 0
    examples = []
    for (i, k), got in sorted(sim.items()):
        name, arguments = entries[i]["parsed"][k]
        truth = real[i, k]
        if executable.refuse(name, arguments) is not None:
            refused += 1
            continue
        environment = executable.catalogue.bindings[name].class_name  # type: ignore[union-attr]
        total[environment] += 1
        if truth.ok and got.ok:
            same = keys_of(truth.content) == keys_of(got.content)
            kind = "agree" if same else "keys differ"
        elif truth.ok == got.ok:
            kind = "agree"  # both failed
        else:
            kind = "simulated failed, tool succeeded" if truth.ok else "simulated succeeded, tool failed"
        kinds[kind] += 1
        agree[environment] += kind == "agree"
        if kind != "agree" and len(examples) < 6:
            real_text, sim_text = truth.to_message_content()[:90], got.to_message_content()[:90]
            call_text = f"{name}({json.dumps(arguments)[:80]})"
            examples.append(f"  {kind}: {call_text} real={real_text} simulated={sim_text}")
    calls = sum(total.values())
    share = sum(agree.values()) / calls if calls else 0.0
    print(
        f"simulated: {len(sim)} calls in {seconds:.0f} s on {args.model}; {written} responses written, "
        f"{invalid} invalid (tool errors, not cached); {refused} refused by the schema check on both sides"
    )
    for environment in sorted(total):
        print(f"  {environment:<18} {agree[environment]:>3}/{total[environment]:<3} agree")
    print("outcomes: " + ", ".join(f"{kind} {n}" for kind, n in kinds.most_common()))
    print(*examples, sep="\n")
    lookups = len(sim) - refused
    rate = hits / lookups if lookups else 0.0
    stored = simulated.simulated.cache.size()
    print(
        f"cache: {hits} of {lookups} calls answered from it (hit rate {rate:.3f}), {stored} responses stored"
    )
    executable.close()
    simulated.close()
    print(f"simulated_outcome_agreement = {share:.4f}")


if __name__ == "__main__":
    main()
