"""Reversed construction: filters, the dialogue state machine with real tools, and the Ray stage."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import reverse_seed_ids

from ttpa_ray.codec import ToolCall
from ttpa_ray.config import load_config
from ttpa_ray.constraints import call_head
from ttpa_ray.engine import Completion
from ttpa_ray.records import Dialogue, RejectedRow, read_parquet
from ttpa_ray.reverse import (
    DialogueState,
    ReverseBuilder,
    Seed,
    answer_is_grounded,
    dialogues_in_flight,
    make_seeds,
    names_a_tool,
    read_dialogues,
    run_reverse,
)
from ttpa_ray.tools.registry import ToolRegistry, load_catalogue

ROOT = Path(__file__).parent.parent


def test_in_flight_defaults() -> None:
    config = load_config(ROOT / "configs" / "local.yaml")
    assert config.reverse.max_concurrent_dialogues is None
    # unset: more dialogues than engine slots, so a freed slot is refilled from vLLM's waiting queue
    assert dialogues_in_flight(config.reverse, config.vllm.max_num_seqs) == 4 * config.vllm.max_num_seqs
    pinned = config.reverse.model_copy(update={"max_concurrent_dialogues": 5})
    assert dialogues_in_flight(pinned, config.vllm.max_num_seqs) == 5
    with pytest.raises(ValueError, match="max_concurrent_dialogues"):
        load_config(ROOT / "configs" / "local.yaml", ["reverse.max_concurrent_dialogues=0"])


def test_answer_grounding_and_tool_names() -> None:
    results = [{"city": "Paris", "high": 18.0, "rain": 0}, [{"flight": "AF123", "price": 129}]]
    assert answer_is_grounded("It will be 18 degrees in Paris.", results)
    assert answer_is_grounded("Take af123.", results)  # case-insensitive
    assert not answer_is_grounded("It will be sunny.", results)
    assert not answer_is_grounded(
        "Flight 1290 is full.", [{"price": 1}]
    )  # a lone digit needs a token of its own
    assert answer_is_grounded("It costs 1 euro.", [{"price": 1}])
    assert names_a_tool("Can you get_weather for me?", ["get_weather"]) == "get_weather"
    assert names_a_tool("Can you get weather for me?", ["get_weather"]) == "get_weather"
    assert names_a_tool("What is the weather in Rome?", ["get_weather", "add_days"]) is None


def test_seeds_are_deterministic() -> None:
    catalogue = load_catalogue("builtin")
    config = load_config(None, ["reverse.num_seeds=5", "reverse.tool_window=4"]).reverse
    first, again = make_seeds(catalogue, config, 3), make_seeds(catalogue, config, 3)
    assert first == again and len(first) == 5
    assert all(len(s.tool_names) == 4 and 4 <= s.call_budget <= 7 for s in first)
    assert make_seeds(catalogue, config, 4) != first


def _completion(obj: object) -> Completion:
    text = json.dumps(obj)
    return Completion(text=text, token_ids=list(range(len(text) // 4)), finish_reason="stop")


def test_state_machine_builds_a_grounded_dialogue_with_real_tools() -> None:
    """Teacher outputs written by hand drive the real transitions and the real built-in tools."""
    config = load_config(None).reverse
    with ToolRegistry(load_catalogue("builtin"), isolated=False) as registry:
        builder = ReverseBuilder(engine=None, registry=registry, config=config, teacher="scripted")  # type: ignore[arg-type]
        seed = Seed("seed-x", ("get_weather", "convert_currency", "add_days"), 5, 1)
        state = DialogueState(seed=seed, tools=[builder.specs[n] for n in seed.tool_names])
        session = registry.session(seed.seed_id)
        steps: list[object] = [
            {
                "scenario": "A trip",
                "information": ["Paris", "2026-07-14", "250 USD", "two people"],
                "tools": ["get_weather", "convert_currency"],
            },
            {
                "name": "get_weather",
                "arguments": {"city": "Atlantis", "date": "2026-07-14"},
            },  # fails: unknown city
            {"name": "get_weather", "arguments": {"city": "Paris", "date": "2026-07-14"}},
            {
                "name": "convert_currency",
                "arguments": {"amount": 250, "from_currency": "USD", "to_currency": "EUR"},
            },
        ]
        for step in steps:
            builder.advance(state, _completion(step), session)
        assert state.phase == "call" and state.calls_made == 3 and state.failed_calls == 1
        weather = state.trajectory[0][1]
        builder.advance(
            state,
            _completion({"name": "answer", "arguments": {"answer": f"Expect {weather['condition']}."}}),
            session,
        )
        assert state.phase == "question"
        builder.advance(
            state,
            _completion({"question": "I fly to Paris on 2026-07-14 with 250 USD: weather and euros?"}),
            session,
        )
        session.close()

    assert isinstance(state.result, Dialogue)
    dialogue = state.result
    roles = [m.role for m in dialogue.messages]
    assert roles == ["system", "user", "assistant", "tool", "assistant", "tool", "assistant"]
    assert dialogue.messages[1].content.startswith("I fly to Paris")
    names = set(builder.specs)
    executed = [(e.tool, e.arguments) for e in registry.call_log if e.dialogue_id == "seed-x" and e.result.ok]
    for call_message, tool_message in zip(dialogue.messages[2:6:2], dialogue.messages[3:7:2], strict=True):
        (call,) = call_message.tool_calls
        assert call.name in names  # every tool named exists
        assert tool_message.tool_call_id == call_message.tool_call_ids[0]  # every call has its result
        assert (call.name, call.arguments) in executed  # and the result came from a real execution
    assert dialogue.provenance["failed_calls"] == 1  # the failed call is counted, not stored
    assert [t.name for t in dialogue.tools][:2] == ["get_weather", "convert_currency"]


TWO_CALLS = [
    {"name": "get_weather", "arguments": {"city": "Paris", "date": "2026-07-14"}},
    {"name": "add_days", "arguments": {"date": "2026-07-14", "days": 3}},
]


@pytest.mark.parametrize(
    ("steps", "reason"),
    [
        ([{"name": "restart", "arguments": {}}], "restart"),
        ([{"name": "answer", "arguments": {"answer": "no idea"}}], "no_successful_call"),
        (
            [
                {"name": "get_weather", "arguments": {"city": "Paris", "date": "2026-07-14"}},
                {"name": "answer", "arguments": {"answer": "Paris"}},
            ],
            "too_few_tools",
        ),
        (
            [
                {"name": "get_weather", "arguments": {"city": "Paris", "date": "2026-07-14"}},
                {"name": "get_weather", "arguments": {"city": "Rome", "date": "2026-07-14"}},
                {"name": "add_days", "arguments": {"date": "2026-07-14", "days": 3}},
                {"name": "answer", "arguments": {"answer": "Have a nice trip."}},
            ],
            "answer_ungrounded",
        ),
        (["not json at all"] * 3, "parse_failure"),
        # the text gates (ttpa_ray/quality.py), on what the 135M teacher wrote in make run
        (
            [
                *TWO_CALLS,
                {"name": "answer", "arguments": {"answer": "It is 2026-07-17. finish with answer soon."}},
            ],
            "prompt_leak",
        ),
        (
            [*TWO_CALLS, {"name": "answer", "arguments": {"answer": "It is 2026-07-17, at 99 euros."}}],
            "answer_ungrounded",
        ),
        (
            [
                *TWO_CALLS,
                {"name": "answer", "arguments": {"answer": "You are back on 2026-07-17."}},
                {"question": "The answer is: The answer is: The answer is: The answer is: The answer is:"},
            ],
            "repetitive_question",
        ),
    ],
)
def test_filters_reject_with_their_reason(steps: list[object], reason: str) -> None:
    config = load_config(None, ["reverse.max_parse_retries=2"]).reverse
    with ToolRegistry(load_catalogue("builtin"), isolated=False) as registry:
        builder = ReverseBuilder(engine=None, registry=registry, config=config)  # type: ignore[arg-type]
        seed = Seed("seed-f", ("get_weather", "add_days"), 6, 1)
        state = DialogueState(seed=seed, tools=[builder.specs[n] for n in seed.tool_names])
        session = registry.session(seed.seed_id)
        scene = {"scenario": "s", "information": ["a", "b", "c", "d"], "tools": ["get_weather", "add_days"]}
        builder.advance(state, _completion(scene), session)
        for step in steps:
            text = step if isinstance(step, str) else json.dumps(step)
            builder.advance(state, Completion(text=text, token_ids=[1], finish_reason="stop"), session)
        session.close()
    assert isinstance(state.result, RejectedRow), state
    assert state.result.reason == reason
    assert state.result.input_id == "seed-f" and state.result.stage == "reverse"


def test_rails_offer_answer_and_restart_only_when_earned() -> None:
    """A tool that succeeded is not offered again; ``answer`` after two distinct successes (or when no
    tool is left), ``restart`` after two failures, ``answer`` alone once the budget is spent."""
    config = load_config(None).reverse
    with ToolRegistry(load_catalogue("builtin"), isolated=False) as registry:
        builder = ReverseBuilder(engine=None, registry=registry, config=config)  # type: ignore[arg-type]
        seed = Seed("seed-r", ("get_weather", "add_days", "get_weekday"), 6, 1)
        state = DialogueState(seed=seed, tools=[builder.specs[n] for n in seed.tool_names], phase="call")
        state.chosen = list(state.tools)

        def offered() -> list[str]:
            return [t.name for t in builder._allowed_tools(state)]

        assert offered() == ["get_weather", "add_days", "get_weekday"]
        state.failed_calls = state.calls_made = 2
        assert offered() == ["get_weather", "add_days", "get_weekday", "restart"]
        state.trajectory = [(ToolCall("get_weather", {}), {}), (ToolCall("add_days", {}), {})]
        state.calls_made = 4
        assert offered() == ["get_weekday", "answer", "restart"]
        state.calls_made = 6
        assert offered() == ["answer"]
    repeat = load_config(None, ["reverse.repeat_tools=true", "reverse.answer_after_tools=0"]).reverse
    builder.config = repeat
    state.calls_made, state.failed_calls = 1, 0
    assert offered() == ["get_weather", "add_days", "get_weekday", "answer"]


def test_question_naming_a_tool_is_rejected() -> None:
    config = load_config(None).reverse
    with ToolRegistry(load_catalogue("builtin"), isolated=False) as registry:
        builder = ReverseBuilder(engine=None, registry=registry, config=config)  # type: ignore[arg-type]
        seed = Seed("seed-q", ("get_weather", "add_days"), 6, 1)
        state = DialogueState(seed=seed, tools=[builder.specs[n] for n in seed.tool_names])
        state.phase, state.answer = "question", "x"
        state.trajectory = [(ToolCall("get_weather", {}), {}), (ToolCall("add_days", {}), {})]
        builder.advance(state, _completion({"question": "Please use get_weather for Paris."}), None)
    assert isinstance(state.result, RejectedRow) and state.result.reason == "question_names_tool"


@pytest.mark.parametrize(("verdict", "admitted"), [((True, True), True), ((True, False), False)])
def test_judge_admits_only_what_it_finds_answerable_and_following(
    verdict: tuple[bool, bool], admitted: bool
) -> None:
    """reverse.judge: after the gates, the teacher's two booleans decide; a "no" is judge_rejected with
    the verdict in the row, a "yes" is kept in the dialogue's provenance."""
    config = load_config(None, ["reverse.judge=true"]).reverse
    with ToolRegistry(load_catalogue("builtin"), isolated=False) as registry:
        builder = ReverseBuilder(engine=None, registry=registry, config=config)  # type: ignore[arg-type]
        seed = Seed("seed-j", ("get_weather", "add_days"), 6, 1)
        state = DialogueState(seed=seed, tools=[builder.specs[n] for n in seed.tool_names])
        session = registry.session(seed.seed_id)
        scene = {"scenario": "s", "information": ["a", "b", "c", "d"], "tools": ["get_weather", "add_days"]}
        steps = [
            scene,
            *TWO_CALLS,
            {"name": "answer", "arguments": {"answer": "You are back on 2026-07-17."}},
            {"question": "I leave Paris on 2026-07-14 for three days: when am I back?"},
        ]
        for step in steps:
            builder.advance(state, _completion(step), session)
        assert state.phase == "judge"
        answerable, follows = verdict
        builder.advance(state, _completion({"answerable": answerable, "follows": follows}), session)
        session.close()
    if admitted:
        assert isinstance(state.result, Dialogue)
        assert state.result.provenance["judge"] == {"answerable": True, "follows": True}
    else:
        assert isinstance(state.result, RejectedRow) and state.result.reason == "judge_rejected"
        assert state.result.payload_object()["judge"] == {"answerable": True, "follows": False}


def test_answer_stem_writes_the_answer_in_a_step_of_its_own() -> None:
    """reverse.answer_stem: the teacher's `answer` call ends the calls; the answer is then one sentence
    begun by the stem, checked by the same gates."""
    config = load_config(None, ["reverse.answer_stem=I found that"]).reverse
    with ToolRegistry(load_catalogue("builtin"), isolated=False) as registry:
        builder = ReverseBuilder(engine=None, registry=registry, config=config)  # type: ignore[arg-type]
        seed = Seed("seed-a", ("get_weather", "add_days"), 6, 1)
        state = DialogueState(seed=seed, tools=[builder.specs[n] for n in seed.tool_names])
        session = registry.session(seed.seed_id)
        scene = {"scenario": "s", "information": ["a", "b", "c", "d"], "tools": ["get_weather", "add_days"]}
        for step in [scene, *TWO_CALLS, {"name": "answer", "arguments": {"answer": "ignored"}}]:
            builder.advance(state, _completion(step), session)
        assert state.phase == "answer"
        written = Completion(text=" you are back on 2026-07-17.", token_ids=[1], finish_reason="stop")
        builder.advance(state, written, session)
        assert state.phase == "question" and state.answer == "I found that you are back on 2026-07-17."
        builder.advance(
            state,
            _completion({"question": "I leave Paris on 2026-07-14 for three days: when am I back?"}),
            session,
        )
        session.close()
    assert isinstance(state.result, Dialogue)
    assert state.result.messages[-1].content == "I found that you are back on 2026-07-17."


def test_stems_cast_the_teacher_as_assistant_and_user(vllm_engine) -> None:
    """reverse.answer_stem and question_stem on a real engine: each step's prompt ends in its stem; the
    answer is one sentence quoting a returned value, the question one sentence ending in "?", under
    each step's regex, and the question is the stem and that sentence."""
    config = load_config(None, ["reverse.question_stem=Can you", "reverse.answer_stem=I found that"]).reverse
    with ToolRegistry(load_catalogue("builtin"), isolated=False) as registry:
        builder = ReverseBuilder(vllm_engine, registry, config)
        seed = Seed("seed-q", ("get_weather", "add_days"), 5, 7)
        state = DialogueState(seed=seed, tools=[builder.specs[n] for n in seed.tool_names])
        state.phase, state.scenario, state.answer = "question", "Anna flies to Paris.", "Sunny, 21 C."
        state.trajectory = [
            (ToolCall("get_weather", {"city": "Paris"}), {"condition": "sunny", "temp_c": 21})
        ]
        state.phase = "answer"  # the answer's own step: one sentence quoting a returned value
        prompt, params = builder._request(state)
        assert vllm_engine.tokenizer.decode(prompt).endswith("I found that")
        (completion,) = vllm_engine.generate([prompt], params)
        assert completion.text.endswith(".") and ("sunny" in completion.text or "21" in completion.text)
        state.phase = "question"
        prompt, params = builder._request(state)
        assert vllm_engine.tokenizer.decode(prompt).endswith("Can you")
        assert "by calling get_weather" in vllm_engine.tokenizer.decode(prompt)
        (completion,) = vllm_engine.generate([prompt], params)
        builder.advance(state, completion, None)
    assert state.question.startswith("Can you") and state.question.endswith("?")
    assert "\n" not in state.question and len(state.question) <= config.max_question_chars
    assert state.phase == "done"  # a dialogue or, for the random model's text, a gate's rejection


@pytest.mark.slow
@pytest.mark.parametrize("two_step", [True, False])
def test_builder_on_tiny_model_with_bfcl_environment(vllm_engine, two_step: bool) -> None:
    """A real (random) teacher against BFCL's file system: every seed accounted for, calls logged.

    Both ways of asking for a call: head then arguments (the default), and the whole call at once.
    """
    config = load_config(
        None,
        [
            "reverse.num_seeds=6",
            "reverse.max_tokens=256",
            "reverse.catalogue=bfcl:GorillaFileSystem",
            f"reverse.two_step_calls={two_step}",
        ],
    )
    catalogue = load_catalogue(config.reverse.catalogue)
    seeds = make_seeds(catalogue, config.reverse, 0)
    assert all(s.initial_config for s in seeds)  # state drawn from BFCL's multi-turn entries
    with ToolRegistry(catalogue) as registry:
        builder = ReverseBuilder(vllm_engine, registry, config.reverse)
        dialogues, rejected = builder.run(seeds)
        log = list(registry.call_log)
    assert len(dialogues) + len(rejected) == len(seeds)
    assert sorted([d.seed_id for d in dialogues] + [r.input_id for r in rejected]) == sorted(
        s.seed_id for s in seeds
    )
    assert builder.generated_tokens > 0
    assert log and {e.tool for e in log} <= set(catalogue.names)  # calls were made, to known tools
    for row in rejected:  # what a rejected dialogue did also ran for real
        for call, _result in json.loads(row.payload)["calls"]:
            assert any(e.dialogue_id == row.input_id and e.tool == call["name"] and e.result.ok for e in log)


def test_two_step_call_heads_then_arguments_with_real_tools() -> None:
    """A head names the tool; the arguments that continue its tokens make the call, executed for real."""
    config = load_config(None, ["reverse.max_parse_retries=1"]).reverse
    with ToolRegistry(load_catalogue("builtin"), isolated=False) as registry:
        builder = ReverseBuilder(engine=None, registry=registry, config=config)  # type: ignore[arg-type]
        seed = Seed("seed-h", ("get_weather", "add_days"), 6, 1)
        state = DialogueState(seed=seed, tools=[builder.specs[n] for n in seed.tool_names], phase="call")
        state.chosen = list(state.tools)
        session = registry.session(seed.seed_id)
        state.call_prompt = [11, 12, 13]  # what _call_request sets when it sends a head request
        head = Completion(call_head("get_weather"), [21, 22, 2], "stop")
        builder.advance(state, head, session)
        assert state.call_name == "get_weather" and state.call_head == [11, 12, 13, 21, 22]  # stop token off
        arguments = {"city": "Paris", "date": "2026-07-14"}
        builder.advance(state, Completion(json.dumps(arguments), [31], "stop"), session)
        assert state.calls_made == 1 and state.trajectory[0][0] == ToolCall("get_weather", arguments)
        assert not state.call_name and not state.call_head and not state.call_prompt
        executed = [(e.tool, e.arguments) for e in registry.call_log if e.dialogue_id == "seed-h"]
        assert executed == [("get_weather", arguments)]
        # A head cut short, or naming a tool outside the dialogue, is a parse failure, twice a rejection.
        state.call_prompt = [11]
        builder.advance(state, Completion('{"name": "get_wea', [21], "length"), session)
        assert state.parse_failures == 1 and state.phase == "call" and not state.call_name
        builder.advance(state, Completion(call_head("search_hotels"), [21, 2], "stop"), session)
        session.close()
    assert isinstance(state.result, RejectedRow) and state.result.reason == "parse_failure"
    assert "head" in state.result.detail


@pytest.mark.slow
@pytest.mark.parametrize("two_step", [True, False])
def test_grounded_answer_requests_pass_vllm_checks_when_the_budget_is_spent(
    vllm_engine, two_step: bool
) -> None:
    """Calls left 0: ``answer`` is the only tool and its text must quote a returned value.

    That schema once reached vLLM with a length bound beside the answer's pattern, which xgrammar
    refuses, and the refusal stopped the whole stage. Every request goes through the engine: with one
    call left, the call (or its head, in two steps); with none, the grounded answer (in two steps its
    arguments at once, the head written rather than generated).
    """
    rails_off = ["reverse.answer_after_tools=0", "reverse.restart_after_failures=0"]  # every tool offered
    config = load_config(
        None, ["reverse.max_tokens=64", f"reverse.two_step_calls={two_step}", *rails_off]
    ).reverse
    with ToolRegistry(load_catalogue("builtin"), isolated=False) as registry:
        builder = ReverseBuilder(vllm_engine, registry, config)
        seed = Seed("seed-spent", ("get_weather", "convert_currency"), 2, 3)
        state = DialogueState(seed=seed, tools=[builder.specs[n] for n in seed.tool_names], phase="call")
        state.chosen = list(state.tools)
        call = ToolCall("get_weather", {"city": "Paris", "date": "2026-07-14"})
        state.trajectory = [(call, {"city": "Paris", "sky": "sunny", "temp_c": 21})]
        for calls_made in (1, 2):  # one call left (answer among others), none left (answer alone)
            state.calls_made, state.call_name = calls_made, ""
            prompt, params = builder._request(state)
            so = params.structured_outputs
            if two_step and calls_made == 1:
                assert so.json is None and '"answer"' in so.regex and '"restart"' in so.regex
            else:
                if two_step:  # the written head: the request continues it with the answer's arguments
                    assert state.call_name == "answer" and prompt == state.call_head
                    arguments = so.json
                else:
                    branches = so.json.get("anyOf", [so.json])
                    assert (len(branches) == 1) == (calls_made == 2)
                    (answer,) = [b for b in branches if b["properties"]["name"]["const"] == "answer"]
                    arguments = answer["properties"]["arguments"]
                text = arguments["properties"]["answer"]
                assert "Paris" in text["pattern"] and "maxLength" not in text
            (completion,) = vllm_engine.generate([prompt], params)
            assert completion.token_ids


def test_each_seed_ends_once_and_results_come_in_seed_order(vllm_engine) -> None:
    """Continuous batching finishes dialogues in any order; each seed is reported once as it ends,
    and the results come back in seed order."""
    config = load_config(None, ["reverse.num_seeds=6", "reverse.max_tokens=128"])
    catalogue = load_catalogue(config.reverse.catalogue)
    seeds = make_seeds(catalogue, config.reverse, 0)
    done_order: list[str] = []
    with ToolRegistry(catalogue) as registry:
        dialogues, rejected = ReverseBuilder(vllm_engine, registry, config.reverse).run(
            seeds, on_done=lambda seed, _: done_order.append(seed.seed_id)
        )
    assert sorted(done_order) == sorted(s.seed_id for s in seeds)  # each seed once
    ended = [d.seed_id for d in dialogues] + [r.input_id for r in rejected]
    assert sorted(ended) == sorted(s.seed_id for s in seeds)
    order = {s.seed_id: i for i, s in enumerate(seeds)}
    assert [d.seed_id for d in dialogues] == sorted((d.seed_id for d in dialogues), key=order.__getitem__)


def _config(tmp_path: Path, tiny_model_dir: Path, run: str, seeds: int = 8):
    return load_config(
        ROOT / "configs" / "local.yaml",
        [
            f"run.run_dir={tmp_path / run}",
            f"model.policy={tiny_model_dir}",
            f"reverse.num_seeds={seeds}",
            "reverse.shard_size=4",
            "reverse.max_tokens=256",
            "vllm.gpu_memory_utilization=0.1",
        ],
    )


@pytest.mark.slow
def test_stage_counts_and_determinism(ray_cluster, tiny_model_dir: Path, tmp_path: Path) -> None:
    outputs = []
    for run in ("a", "b"):
        config = _config(tmp_path, tiny_model_dir, run)
        out_dir = tmp_path / run / "reverse"
        seen: list[tuple[str, int]] = []
        report = run_reverse(
            config,
            str(tiny_model_dir),
            out_dir,
            lambda done, _totals, n, seen=seen: seen.append((done["shard_id"], n)),
        )
        assert sorted(seen) == [("shard-00000", 2), ("shard-00001", 2)]  # each shard reported once
        assert report.seeds == 8 == report.dialogues + report.rejected
        assert sum(report.reasons.values()) == report.rejected
        ids = reverse_seed_ids(out_dir)
        assert len(ids) == len(set(ids)) == 8
        outputs.append(_records(out_dir))
    assert outputs[0] == outputs[1]  # same seed and config, same dialogues and rejections


@pytest.mark.slow
def test_killed_engine_core_mid_reverse_loses_and_duplicates_nothing(
    ray_cluster, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """SIGKILL to the replica's engine core once a first shard is done (issue 17): the replica ends,
    Ray restarts it and retries its shards; every seed ends once, as a dialogue or a rejected row."""
    from conftest import kill_engine_core_of

    config = load_config(
        ROOT / "configs" / "local.yaml",
        [
            f"run.run_dir={tmp_path / 'run'}",
            f"model.policy={tiny_model_dir}",
            # 16 shards, two dialogues at a time: the tiny model ends most seeds in a step or two, and
            # 8 shards were all done (the replica gone) before the watcher's kill (CI, 2026-12-07)
            "reverse.num_seeds=32",
            "reverse.shard_size=2",
            "reverse.max_concurrent_dialogues=2",
            "reverse.max_tokens=256",
            "vllm.gpu_memory_utilization=0.1",
        ],
    )
    out_dir = tmp_path / "run" / "reverse"
    killed: list[int | AssertionError] = []

    def kill_at_first_marker() -> None:
        # Watch the replica's own marker, not the driver's progress callback: by the time the driver
        # reads a shard's result the replica may have finished all eight and exited (CI, 2026-12-07).
        deadline = time.time() + 300
        while time.time() < deadline:
            for marker in (out_dir / "shards").glob("*.done.json"):
                done = json.loads(marker.read_text())  # written whole (store.write_text)
                try:  # the engine of the replica that wrote this shard ("host:pid")
                    killed.append(kill_engine_core_of(int(done["replica"].rsplit(":", 1)[1])))
                except AssertionError as error:
                    killed.append(error)
                return
            time.sleep(0.02)

    watcher = threading.Thread(target=kill_at_first_marker, daemon=True)
    watcher.start()
    report = run_reverse(config, str(tiny_model_dir), out_dir)
    watcher.join(timeout=5)
    assert killed and isinstance(killed[0], int), killed
    assert report.seeds == 32 == report.dialogues + report.rejected
    assert len(json.loads((out_dir / "manifest.json").read_text())["shards"]) == 16
    ids = reverse_seed_ids(out_dir)
    assert sorted(ids) == sorted(set(ids)) and len(ids) == 32


@pytest.mark.slow
def test_killed_job_resumes_without_loss_or_duplicates(
    ray_cluster, tiny_model_dir: Path, tmp_path: Path
) -> None:
    import ray
    from conftest import vllm_processes

    config = _config(tmp_path, tiny_model_dir, "crash", seeds=32)
    out_dir = tmp_path / "crash" / "reverse"
    address = ray.get_runtime_context().gcs_address
    engines_before = vllm_processes()
    job = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jobs.reverse",
            "--config",
            str(ROOT / "configs" / "local.yaml"),
            f"run.run_dir={tmp_path / 'crash'}",
            f"model.policy={tiny_model_dir}",
            "reverse.num_seeds=32",
            "reverse.shard_size=4",
            # two at a time: seeds flow in order, shards end one after another, the last ones well after
            "reverse.max_concurrent_dialogues=2",
            "reverse.max_tokens=256",
            "vllm.gpu_memory_utilization=0.1",
            f"ray.address={address}",
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    markers = out_dir / "shards"
    deadline = time.time() + 300
    while not any(markers.glob("*.done.json")) and time.time() < deadline and job.poll() is None:
        time.sleep(0.05)
    assert job.poll() is None, "the job ended before it could be killed half way"
    assert vllm_processes() - engines_before, "the job's replicas run no vLLM engine process"
    os.killpg(job.pid, signal.SIGKILL)  # kill the job half way, as soon as a first shard is written
    job.wait()
    deadline = time.time() + 60  # the engines the job's replicas ran die with them (issue 21)
    while (orphans := vllm_processes() - engines_before) and time.time() < deadline:
        time.sleep(0.5)
    assert not orphans, f"vLLM processes of the killed job still running: {sorted(orphans)}"
    finished_before = sorted(p.name for p in markers.glob("*.done.json"))
    assert 1 <= len(finished_before) < 8, finished_before  # killed after the first shard, before the end

    report = run_reverse(config, str(tiny_model_dir), out_dir)  # the rerun skips finished shards
    assert report.seeds == 32 == report.dialogues + report.rejected
    ids = reverse_seed_ids(out_dir)
    assert sorted(ids) == sorted(set(ids)) and len(ids) == 32

    # the same records as a run that was never killed
    clean_dir = tmp_path / "clean" / "reverse"
    run_reverse(_config(tmp_path, tiny_model_dir, "clean", seeds=32), str(tiny_model_dir), clean_dir)
    assert _records(out_dir) == _records(clean_dir)


def _records(out_dir: Path) -> tuple[list[dict[str, object]], list[tuple[str, str, str]]]:
    """A reverse stage's dialogues and rejected seeds, in seed order."""
    manifest = json.loads((out_dir / "manifest.json").read_text())
    rejected = [r for shard in manifest["shards"] for r in read_parquet(RejectedRow, shard["rejected"])]
    dialogues = sorted(read_dialogues(out_dir), key=lambda d: d.seed_id)
    return [d.to_row() for d in dialogues], sorted((r.input_id, r.reason, r.payload) for r in rejected)


def test_mixed_catalogue_seeds_use_both_kinds_of_tools() -> None:
    catalogue = load_catalogue("builtin+bfcl:GorillaFileSystem")
    config = load_config(None, ["reverse.num_seeds=6", "reverse.tool_window=5"]).reverse
    seeds = make_seeds(catalogue, config, 0)
    builtin = set(load_catalogue("builtin").names)
    assert [bool(s.initial_config) for s in seeds] == [False, True] * 3
    for seed in seeds:
        assert (set(seed.tool_names) <= builtin) != bool(seed.initial_config)


HOTEL = ROOT / "tests" / "fixtures" / "simulated_hotel.json"


def test_simulated_tools_are_answered_by_a_respond_step_and_then_by_the_cache() -> None:
    """Hand-written teacher outputs through the real transitions: a call to a simulated tool with no
    cached response becomes a respond step (the teacher writes the response under the tool's schema);
    the same call in another spelling later is answered from the cache without one; a response that
    fails the schema is a failed call, not cached."""
    config = load_config(None).reverse
    with ToolRegistry(load_catalogue(HOTEL), isolated=False) as registry:
        builder = ReverseBuilder(engine=None, registry=registry, config=config, teacher="scripted")  # type: ignore[arg-type]
        seed = Seed("seed-h", ("reserve_hotel_room", "hotel_rooms"), 5, 1)
        state = DialogueState(seed=seed, tools=[builder.specs[n] for n in seed.tool_names])
        session = registry.session(seed.seed_id)
        scene = {
            "scenario": "A weekend in Oslo",
            "information": ["Oslo", "2 nights"] * 2,
            "tools": seed.tool_names,
        }
        builder.advance(state, _completion(scene), session)
        rooms = {"name": "hotel_rooms", "arguments": {"city": "Oslo"}}
        builder.advance(state, _completion(rooms), session)
        assert state.phase == "respond" and state.responding == ToolCall("hotel_rooms", {"city": "Oslo"})
        builder.advance(state, _completion({"available": "many"}), session)  # fails the schema
        assert state.phase == "call" and state.failed_calls == 1 and not state.trajectory
        builder.advance(state, _completion(rooms), session)
        assert state.phase == "respond"
        builder.advance(state, _completion({"available": 4, "cheapest_price": 95.0}), session)
        assert state.trajectory == [
            (ToolCall("hotel_rooms", {"city": "Oslo"}), {"available": 4, "cheapest_price": 95.0})
        ]
        builder.advance(
            state,
            _completion({"name": "reserve_hotel_room", "arguments": {"room": "double", "nights": 2}}),
            session,
        )
        builder.advance(state, _completion({"booking_id": "B-17", "total": 190.0}), session)
        builder.advance(
            state,
            _completion({"name": "answer", "arguments": {"answer": "Booked: B-17, 190 in all."}}),
            session,
        )
        builder.advance(
            state, _completion({"question": "Can you book me a double in Oslo for 2 nights?"}), session
        )
        session.close()

        # Another dialogue makes the same call, arguments in another order: the cache answers it.
        other = DialogueState(
            seed=Seed("seed-i", ("reserve_hotel_room",), 3, 2), tools=[builder.specs["reserve_hotel_room"]]
        )
        other.phase, other.chosen = "call", [builder.specs["reserve_hotel_room"]]
        with registry.session("seed-i") as second:
            builder.advance(
                other,
                _completion({"name": "reserve_hotel_room", "arguments": {"nights": 2, "room": "double"}}),
                second,
            )
        assert other.phase == "call" and other.trajectory[0][1] == {"booking_id": "B-17", "total": 190.0}

    dialogue = state.result
    assert isinstance(dialogue, Dialogue)
    assert dialogue.provenance["simulated_calls"] == 2
    assert {t.source for t in dialogue.tools} == {f"simulated:{HOTEL.stem}"}
    assert builder.simulated_calls == {"written": 2, "invalid": 1, "cached": 1}
    assert registry.simulated.cache.size() == 2


def _simulated_answers(out_dir: Path) -> dict[str, set[str]]:
    """Every response a simulated call got in a reverse run's records (dialogues and the teacher
    messages of rejected seeds), by cache key; a written response that failed its check is left out
    (it was never an answer)."""
    from ttpa_ray.tools.simulated import SimulatedCache

    answers: dict[str, set[str]] = {}
    manifest = json.loads((out_dir / "manifest.json").read_text())
    rejected = [r for shard in manifest["shards"] for r in read_parquet(RejectedRow, shard["rejected"])]
    conversations = [
        [
            {"tool_calls": [{"function": c.to_dict()} for c in m.tool_calls], "content": m.content}
            for m in d.messages
        ]
        for d in read_dialogues(out_dir)
    ] + [json.loads(r.payload).get("teacher_messages", []) for r in rejected]
    for messages in conversations:
        for call_message, answer in itertools.pairwise(messages):
            for call in call_message.get("tool_calls") or []:
                function = call["function"]
                arguments = function["arguments"]
                arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
                if "the simulated response of" not in str(answer["content"]):
                    key = SimulatedCache.key(function["name"], arguments)
                    answers.setdefault(key, set()).add(str(answer["content"]))
    return answers


@pytest.mark.slow
def test_two_replicas_and_a_resumed_run_share_one_response_cache(
    ray_cluster, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """A schema-only catalogue on two replicas at once, then the run resumed with more seeds: every
    call of a simulated tool, on whichever replica and in whichever run, got the one response cached
    for it, and the cache's part files hold each call once."""
    from ttpa_ray.tools.simulated import SimulatedCache

    def config(seeds: int):
        return load_config(
            ROOT / "configs" / "local.yaml",
            [
                f"run.run_dir={tmp_path / 'run'}",
                f"model.policy={tiny_model_dir}",
                f"reverse.catalogue={HOTEL}",
                f"reverse.num_seeds={seeds}",
                "reverse.shard_size=2",
                "reverse.tool_window=3",
                "reverse.call_budget=[4,5]",
                "reverse.repeat_tools=true",
                "reverse.max_concurrent_dialogues=2",
                "reverse.max_tokens=160",
                "vllm.replicas_min=2",
                "vllm.replicas_max=2",
                "vllm.gpu_memory_utilization=0.1",
            ],
        )

    out_dir = tmp_path / "run" / "reverse"
    first = run_reverse(config(8), str(tiny_model_dir), out_dir)
    before = _simulated_answers(out_dir)
    markers = [json.loads(p.read_text()) for p in (out_dir / "shards").glob("*.done.json")]
    assert len({m["replica"] for m in markers}) == 2  # both replicas built shards
    second = run_reverse(config(12), str(tiny_model_dir), out_dir)
    after = _simulated_answers(out_dir)

    calls = sum(first.simulated[k] for k in ("cached", "written", "invalid"))
    assert calls >= 16 and first.simulated["cached"] > 0  # repeated calls were answered from the cache
    assert {key: len(answers) for key, answers in after.items()} == {key: 1 for key in after}
    assert all(after[key] == answers for key, answers in before.items())  # the resumed run kept them
    parts = sorted((out_dir / "simulated").glob("part-*.jsonl"))
    keys = [json.loads(line)["key"] for part in parts for line in part.read_text().splitlines()]
    assert (
        len(keys)
        == len(set(keys))
        == second.simulated["cache_size"]
        == SimulatedCache(out_dir / "simulated").size()
    )
    assert second.simulated["cached"] > first.simulated["cached"]
    assert second.seeds == 12 == second.dialogues + second.rejected
