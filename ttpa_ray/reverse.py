"""Reversed dataset construction (docs/design.md section 1): tools -> executed calls -> answer -> question.

The pure core is :class:`ReverseBuilder`: given a teacher :class:`~ttpa_ray.engine.Engine` and a
:class:`~ttpa_ray.tools.registry.ToolRegistry`, it turns seeds into :class:`Dialogue` records or
:class:`RejectedRow` records with a named reason. Many dialogues share one engine and are advanced
step by step: every step sends the pending request of every live dialogue in one batch, and a
dialogue that finishes is replaced at once by the next seed, so no dialogue waits for the slowest
(the engine stays busy; bench/reverse.py measures how busy).

Per dialogue: (1) scene simulation: scenario, 4-7 information items and the related tools, as JSON;
(2) one tool call at a time, schema-constrained, EXECUTED through the registry and its real result
appended (a simulated tool's response, when no earlier call cached it, is written by the same teacher
in a ``respond`` step under the tool's response schema: :mod:`ttpa_ray.tools.simulated`); control
tools ``answer`` and ``restart``; nudges as the call budget runs out, and only ``answer`` allowed
once it is spent; (3) the question, written from scenario, answer and tools used; (4) the record:
system, user question, assistant tool calls with their results, assistant answer.

Quality filters (reasons of rejected rows): ``no_successful_call``, ``too_few_tools`` (fewer than
two distinct tools), ``restart``, ``question_names_tool``, ``answer_ungrounded`` (the answer uses no
value any call returned), ``parse_failure`` (teacher output unparseable beyond the retry limit),
``no_tools`` (the seed's window has no usable tool), ``prompt_too_long`` (a step's prompt leaves no
room under ``vllm.max_model_len``; it is never sent). Text gates (:mod:`ttpa_ray.quality`,
thresholds in ``reverse.quality``): ``repetitive_scenario``, ``repetitive_question``,
``repetitive_answer``, ``repetitive_argument``, ``unreadable_*`` (identifier or digit runs, no
prose), ``question_length``, ``answer_length``,
``question_copies_text``, ``prompt_leak`` (the builder's own prompts or nudges in the text),
``question_misses_call`` (optional: the question shows no argument value of one of the calls),
``answer_ungrounded`` also when a number or quoted value of the answer comes from no call, result or
the scenario; ``judge_rejected`` (the optional teacher verdict, ``reverse.judge``); and across the
whole run ``duplicate_question`` (a later seed's copy of a question, found by grouping on a
normalised-text key in Ray Data).

The Ray shell (:func:`run_reverse`) hosts one builder per vLLM replica in a Ray Data actor pool. Each
input row is one shard of seeds; a replica writes its shard's dialogues and rejected rows as Parquet
files and then a ``.done`` marker, so a retried or rerun shard is skipped and nothing is duplicated.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import socket
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ttpa_ray import store
from ttpa_ray.codec import ToolCall, parse_any
from ttpa_ray.config import ReverseConfig, TTPAConfig, check_mcp_tools_not_evaluated, simulated_catalogues
from ttpa_ray.constraints import (
    arguments_schema,
    bounded_string,
    call_head,
    call_head_name,
    call_head_regex,
    tool_call_schema,
)
from ttpa_ray.endpoint import EndpointTeacher, api_key
from ttpa_ray.engine import Completion, Engine
from ttpa_ray.quality import DEGENERATE, DUPLICATE, Gates, PromptLeaks, question_bigrams, question_key
from ttpa_ray.records import Dialogue, Message, RejectedRow, ToolSpec, reject, to_table
from ttpa_ray.tools.simulated import SimulatedCache, response_request

if TYPE_CHECKING:
    import ray

STAGE = "reverse"
TEACHER_UNAVAILABLE = "teacher_unavailable"  # a served teacher's request failed after its retries
SYSTEM_PROMPT = "You are a helpful assistant that can use tools. Call tools when needed, then answer."
ANSWER_TOOL = ToolSpec(
    name="answer",
    description="Finish: write the final answer to the user from the results of the calls so far.",
    parameters={
        "type": "object",
        "properties": {"answer": {"type": "string", "description": "the final answer"}},
        "required": ["answer"],
    },
    source="control",
)
RESTART_TOOL = ToolSpec(
    name="restart",
    description="Too many errors: discard this attempt and start again.",
    parameters={"type": "object", "properties": {}},
    source="control",
)
CONTROL_TOOLS = {ANSWER_TOOL.name: ANSWER_TOOL, RESTART_TOOL.name: RESTART_TOOL}
# The builder's own words to the teacher; the text gates reject a dialogue that repeats them.
CALL_SYSTEM = (
    "You are solving a task with tools, one call at a time. Use real values from the scenario and from "
    "earlier results. When you have what you need, call `answer` with the final answer; call `restart` "
    "only if the attempt cannot be saved."
)
NUDGE_LAST = "No calls left: call `answer` now."
NUDGE_SOON = "{left} call(s) left: finish with `answer` soon."
SCENE_SYSTEM = "You imagine realistic situations in which a person needs tools."
QUESTION_SYSTEM = "You write the question a user asked, given how it was answered."
# The question written by the teacher cast as the user (reverse.question_stem): a 135M teacher asked for
# "the user's question" mostly describes the request instead of making it (measured).
USER_SYSTEM = "You are a user talking to an assistant that can use tools."
USER_INSTRUCTION = (
    "Your situation: {scenario}\nThe assistant will answer you by calling {calls}, and will tell you: "
    "{answer}\nWrite the request you send to the assistant, in one sentence, with the values it needs."
)
ANSWER_SYSTEM = "You are an assistant that called tools for a user and now tells the user what they found."
ANSWER_INSTRUCTION = (
    "Situation: {scenario}\nThe tools returned:\n{results}\nTell the user the result in one sentence, "
    "with the values the tools returned."
)
JUDGE_SYSTEM = "You check tool-use dialogues for a training set. You are strict."
JUDGE_INSTRUCTION = (
    "A user asked: {question}\nThe assistant made these tool calls:\n{calls}\nand answered: {answer}\n\n"
    "answerable: can the question be answered by these calls? follows: does the answer follow from "
    "what the calls returned? Reply in JSON."
)
QUESTION_INSTRUCTION = (
    "Write the user's question in the first person, naturally, containing every value the calls needed "
    "(dates, places, names, numbers), without naming any tool. Reply in JSON."
)
SCENE_INSTRUCTION = (
    "Write a short scenario statement (no question, no tool names), {low} to {high} items of additional "
    "information (times, places, people, amounts: the values the tools' parameters will need), and pick "
    "the related tools. Reply in JSON."
)
PROMPT_LEAKS = PromptLeaks(
    short=[NUDGE_LAST, NUDGE_SOON],
    long=[
        SYSTEM_PROMPT,
        CALL_SYSTEM,
        SCENE_SYSTEM,
        QUESTION_SYSTEM,
        QUESTION_INSTRUCTION,
        SCENE_INSTRUCTION,
        USER_SYSTEM,
        USER_INSTRUCTION,
        JUDGE_SYSTEM,
        JUDGE_INSTRUCTION,
        ANSWER_SYSTEM,
        ANSWER_INSTRUCTION,
        ANSWER_TOOL.description,
        RESTART_TOOL.description,
    ],
)


@dataclass(frozen=True)
class Seed:
    """What one dialogue starts from: a window of tools, a call budget and its own random seed."""

    seed_id: str
    tool_names: tuple[str, ...]
    call_budget: int
    rng_seed: int
    initial_config: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "seed_id": self.seed_id,
            "tool_names": list(self.tool_names),
            "call_budget": self.call_budget,
            "rng_seed": self.rng_seed,
            "initial_config": self.initial_config,
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Seed:
        return cls(
            seed_id=obj["seed_id"],
            tool_names=tuple(obj["tool_names"]),
            call_budget=int(obj["call_budget"]),
            rng_seed=int(obj["rng_seed"]),
            initial_config=dict(obj.get("initial_config") or {}),
        )


def make_seeds(catalogue: Any, config: ReverseConfig, seed: int) -> list[Seed]:
    """``config.num_seeds`` seeds, each with a window of tools and a budget; same seed, same seeds.

    For BFCL's stateful environments a seed takes the tools of the classes one BFCL multi-turn entry
    involves, and that entry's initial state, so calls act on a realistic file system, account...
    MCP tools are grouped: a seed's window is drawn from one writing server's tools, or from the
    read-only servers' tools together.
    """
    rng = random.Random(seed)
    low, high = config.call_budget
    entries = _bfcl_entries(catalogue)
    names = sorted(catalogue.names)
    seeds = []
    stateless = [n for n in names if getattr(catalogue.bindings[n], "class_name", None) is None]
    # MCP tools: a seed's window comes from one group (McpBinding.group: one writing server, a dialogue
    # with one git repository or database; or the read-only servers together), drawn uniformly.
    groups: dict[str, list[str]] = {}
    for name in stateless:
        group = getattr(catalogue.bindings[name], "group", None)
        groups.setdefault(group or "", []).append(name)
    for i in range(config.num_seeds):
        initial: dict[str, Any] = {}
        pool = stateless or names
        if len(groups) > 1 or (groups and "" not in groups):
            pool = groups[rng.choice(sorted(groups))]
        # A mixed catalogue alternates: BFCL environments for odd seeds, the other tools for even ones.
        if entries and (not stateless or i % 2 == 1):
            entry = entries[rng.randrange(len(entries))]
            classes = set(entry.involved_classes)
            pool = [
                n for n in names if getattr(catalogue.bindings[n], "class_name", None) in classes
            ] or names
            initial = entry.initial_config
        window = tuple(sorted(rng.sample(pool, min(config.tool_window, len(pool)))))
        seeds.append(
            Seed(f"seed-{seed}-{i:06d}", window, rng.randint(low, high), rng.randrange(2**31), initial)
        )
    return seeds


def _bfcl_entries(catalogue: Any) -> list[Any]:
    """BFCL multi-turn entries (:class:`~ttpa_ray.tools.bfcl_envs.BfclScenario`) whose classes the
    catalogue has (empty for catalogues without BFCL)."""
    classes = {getattr(b, "class_name", None) for b in catalogue.bindings.values()} - {None}
    if not classes:
        return []
    from ttpa_ray.tools.bfcl_envs import load_scenarios

    return [e for e in load_scenarios("multi_turn_base") if set(e.involved_classes) <= classes]


# ------------------------------------------------------------------------------------------- checks
def returned_values(content: Any) -> Iterator[str]:
    """Scalar values of a tool result as the text an answer would show (numbers also rounded)."""
    if isinstance(content, dict):
        for value in content.values():
            yield from returned_values(value)
    elif isinstance(content, list):
        for value in content:
            yield from returned_values(value)
    elif isinstance(content, bool) or content is None:
        return
    elif isinstance(content, int | float):
        yield str(content)
        if isinstance(content, float):
            yield f"{content:g}"
            if content.is_integer():
                yield str(int(content))
    elif isinstance(content, str) and len(content.strip()) >= 2:
        text = content.strip()
        yield text
        if "\n" in text:  # a text result (git's log, a listing): its lines' cells, and "key: value" values
            for line in text.splitlines():
                for cell in re.split(r"\s{2,}|\t", line.strip(" \t-*+")):
                    if len(cell) >= 2:
                        yield cell
                    _key, colon, value = cell.partition(": ")
                    if colon and len(value.strip()) >= 2:
                        yield value.strip()


def _literal(value: str) -> str:
    """A value as a regex literal for the engine's grammar (xgrammar warns at ``re.escape``'s ``\\ ``)."""
    return re.escape(value).replace("\\ ", " ")


def answer_is_grounded(answer: str, results: Sequence[Any]) -> bool:
    """True when the answer shows at least one value that a successful call returned."""
    lowered = answer.lower()
    for content in results:
        for value in returned_values(content):
            if len(value) >= 2 and value.lower() in lowered:
                return True
            # A one-character value (a digit) only counts as a whole token.
            if len(value) == 1 and re.search(rf"(?<![\w.]){re.escape(value)}(?![\w.])", answer):
                return True
    return False


def names_a_tool(question: str, tool_names: Sequence[str]) -> str | None:
    """The tool name the question mentions (as written or with spaces for underscores), if any."""
    lowered = question.lower()
    for name in tool_names:
        for form in {name.lower(), name.lower().replace("_", " ")}:
            if len(form) >= 4 and form in lowered:
                return name
    return None


# ---------------------------------------------------------------------------------------- the loop
SCENE_EXAMPLE_TOOLS = [
    ToolSpec(
        name="find_restaurant",
        description="Find restaurants in a city for a cuisine.",
        parameters={
            "type": "object",
            "properties": {"city": {"type": "string"}, "cuisine": {"type": "string"}},
        },
        source="example",
    ),
    ToolSpec(
        name="book_table",
        description="Book a table at a restaurant for a date, time and party size.",
        parameters={
            "type": "object",
            "properties": {k: {"type": "string"} for k in ("restaurant", "date", "time", "people")},
        },
        source="example",
    ),
]
SCENE_EXAMPLE = {
    "scenario": "Maria wants to take her parents out for an Italian dinner in Lyon on Saturday evening.",
    "information": ["city: Lyon", "cuisine: Italian", "date: 2026-05-16", "time: 19:30", "party: 3 people"],
    "tools": ["find_restaurant", "book_table"],
}


def _scene_instruction(tools: Sequence[ToolSpec], low: int, high: int, parameters: bool) -> str:
    def parameter(name: str, schema: Any) -> str:
        about = schema.get("description", "") if isinstance(schema, dict) else ""
        return f"{name}: {about}" if about else name

    def listed(tool: ToolSpec) -> str:
        properties = (tool.parameters or {}).get("properties", {})
        about = "; ".join(parameter(k, v) for k, v in properties.items())
        return f"- {tool.name}: {tool.description}" + (f"\n  parameters: {about}" if parameters else "")

    listing = "\n".join(listed(t) for t in tools)
    return f"Tools:\n{listing}\n\n" + SCENE_INSTRUCTION.format(low=low, high=high)


@dataclass
class DialogueState:
    """One dialogue in flight: its phase, its trajectory so far, and what it has cost."""

    seed: Seed
    tools: list[ToolSpec]
    phase: str = "scene"  # scene -> call (<-> respond, a simulated tool's response) -> question -> done
    scenario: str = ""
    information: list[str] = field(default_factory=list)
    chosen: list[ToolSpec] = field(default_factory=list)
    trajectory: list[tuple[ToolCall, Any]] = field(default_factory=list)  # successful calls, results
    failed_calls: int = 0
    calls_made: int = 0
    answer: str = ""
    question: str = ""
    parse_failures: int = 0
    step: int = 0
    generated_tokens: int = 0
    teacher_messages: list[dict[str, Any]] = field(default_factory=list)
    # A call in two requests (config two_step_calls): the prompt of its head, then the tool the head
    # named and the token ids its arguments continue (prompt + head), until the arguments come back.
    call_prompt: list[int] = field(default_factory=list)
    call_name: str = ""
    call_head: list[int] = field(default_factory=list)
    responding: ToolCall | None = None  # the simulated call whose response the teacher is writing
    judge: dict[str, bool] = field(default_factory=dict)  # the judge's verdict (reverse.judge)
    result: Dialogue | RejectedRow | None = None


class ReverseBuilder:
    """Seeds -> dialogues and rejected rows with one teacher engine and one tool registry."""

    def __init__(
        self, engine: Engine | EndpointTeacher, registry: Any, config: ReverseConfig, *, teacher: str = ""
    ) -> None:
        self.engine = engine
        self.registry = registry
        self.config = config
        self.teacher = teacher
        self.specs = {spec.name: spec for spec in registry.specs}
        quality = config.quality
        self.gates = Gates(
            max_repeated_ngram_share=quality.max_repeated_ngram_share,
            max_repeated_line_share=quality.max_repeated_line_share,
            ngram=quality.ngram,
            question_chars=quality.question_chars,
            answer_chars=quality.answer_chars,
            max_copy_similarity=quality.max_copy_similarity,
            strict_grounding=quality.strict_grounding,
            call_values_in_question=quality.call_values_in_question,
            leaks=PROMPT_LEAKS,
        )
        self.stats: Counter[str] = Counter()
        self._arguments_schemas: dict[str, dict[str, Any]] = {}  # by tool: one object, one grammar
        self.busy_seconds = 0.0
        self.generated_tokens = 0
        self.requests = 0  # teacher steps sent to the engine
        # Calls of simulated tools: answered from the cache, written by the teacher, written invalid.
        self.simulated_calls: Counter[str] = Counter()
        self._pending: deque[Seed] = deque()
        self._finished: dict[str, Dialogue | RejectedRow] = {}
        self._on_done: Callable[[Seed, Dialogue | RejectedRow], None] | None = None

    @property
    def in_flight(self) -> int:
        """Dialogues sharing the engine at once (config, or four times the engine's slots), no more than
        a writing MCP server may have processes at once (its ``max_sessions``: each is 50-70 MB)."""
        wanted = dialogues_in_flight(self.config, self.engine.max_num_seqs)
        return min(wanted, self.registry.session_limit() or wanted)

    # -- prompts -----------------------------------------------------------------------------------
    # Each request: its prompt and its structured-output constraint, {"json": schema} or {"regex": ...}.
    def _scene_request(self, state: DialogueState) -> tuple[list[int], dict[str, Any]]:
        low, high = self.config.info_items
        example = self.config.scene_example
        messages = [
            {"role": "system", "content": SCENE_SYSTEM},
            # One worked example (fictional tools): a small teacher copies its shape, a large one ignores it.
            *(
                [
                    {"role": "user", "content": _scene_instruction(SCENE_EXAMPLE_TOOLS, low, high, True)},
                    {"role": "assistant", "content": json.dumps(SCENE_EXAMPLE, ensure_ascii=False)},
                ]
                if example
                else []
            ),
            {"role": "user", "content": _scene_instruction(state.tools, low, high, example)},
        ]
        schema = {
            "type": "object",
            "properties": {
                "scenario": bounded_string(
                    self.config.max_scenario_chars, min(30, self.config.max_scenario_chars)
                ),
                "information": {
                    "type": "array",
                    "items": bounded_string(80),
                    "minItems": low,
                    "maxItems": high,
                },
                "tools": {
                    "type": "array",
                    "items": {"enum": [t.name for t in state.tools]},
                    "minItems": min(2, len(state.tools)),
                    "maxItems": min(self.config.max_chosen_tools, len(state.tools)),
                },
            },
            "required": ["scenario", "information", "tools"],
            "additionalProperties": False,
        }
        return self.engine.render(messages), {"json": schema}

    def _call_request(self, state: DialogueState) -> tuple[list[int], dict[str, Any]]:
        """The next call step: the whole call, or (two_step_calls) its head, then its arguments."""
        if state.call_name:  # the head is out: the arguments, under the named tool's own schema
            return state.call_head, {"json": self._arguments_schema(state, state.call_name)}
        info = "\n".join(f"- {item}" for item in state.information)
        left = state.seed.call_budget - state.calls_made
        messages: list[dict[str, Any]] = [
            {"role": "system", "content": CALL_SYSTEM},
            {"role": "user", "content": f"Scenario: {state.scenario}\nInformation:\n{info}"},
            *state.teacher_messages,
        ]
        allowed = self._allowed_tools(state)
        if left <= 0:
            messages.append({"role": "user", "content": NUDGE_LAST})
        elif left <= self.config.nudge_when_left:
            messages.append({"role": "user", "content": NUDGE_SOON.format(left=left)})
        tools = [t.to_openai() for t in allowed]
        prompt = self.engine.render(messages, tools)
        if not self.config.two_step_calls:
            return prompt, {
                "json": tool_call_schema(tools, arguments=lambda n: self._arguments_schema(state, n))
            }
        if len(allowed) == 1:  # nothing to choose: the head is written, not generated
            head = self.engine.encoder.encode(call_head(allowed[0].name))
            self._head_chosen(state, allowed[0].name, prompt + head)
            return self._call_request(state)
        state.call_prompt = prompt
        return prompt, {"regex": call_head_regex([t.name for t in allowed])}

    def _allowed_tools(self, state: DialogueState) -> list[ToolSpec]:
        """The tools the next call may name; ``answer`` alone once the call budget is spent.

        Otherwise the chosen tools, less those that already succeeded unless ``repeat_tools``; ``answer``
        once ``answer_after_tools`` distinct tools succeeded (or none is left to call); ``restart`` once
        ``restart_after_failures`` calls failed. A strong teacher rarely needs these rails; a small one
        otherwise answers before any call, restarts at once or repeats one call until the budget ends.
        """
        if state.seed.call_budget - state.calls_made <= 0:
            return [ANSWER_TOOL]
        succeeded = {call.name for call, _ in state.trajectory}
        tools = [t for t in state.chosen if self.config.repeat_tools or t.name not in succeeded]
        controls = []
        if not tools or len(succeeded) >= min(self.config.answer_after_tools, len(state.chosen)):
            controls.append(ANSWER_TOOL)
        if state.failed_calls >= self.config.restart_after_failures:
            controls.append(RESTART_TOOL)
        return [*tools, *controls] or [ANSWER_TOOL]

    def _head_chosen(self, state: DialogueState, name: str, head: list[int]) -> None:
        state.call_name, state.call_head, state.call_prompt = name, head, []

    def _arguments_schema(self, state: DialogueState, name: str) -> dict[str, Any]:
        """A tool's arguments schema; the same object for every step that calls the tool, except a
        grounded ``answer`` (config grounded_answer), whose text must quote a value the calls returned."""
        if name == ANSWER_TOOL.name and state.trajectory and self.config.grounded_answer:
            grounded = self._grounded_answer(state)
            if grounded is not None:
                return grounded
        schema = self._arguments_schemas.get(name)
        if schema is None:
            spec = self.specs.get(name) or CONTROL_TOOLS[name]
            schema = self._arguments_schemas[name] = arguments_schema(spec.to_openai())
        return schema

    def _grounded_answer(self, state: DialogueState) -> dict[str, Any] | None:
        """``answer``'s arguments with a text that quotes a returned value (None: nothing to quote)."""
        values = sorted(
            {v for _, content in state.trajectory for v in returned_values(content) if len(v) >= 2}
        )
        if not values:
            return None
        alternation = "|".join(_literal(v) for v in values[:32])
        schema = arguments_schema(ANSWER_TOOL.to_openai(), bounded=False)
        answer = dict(schema["properties"]["answer"])  # a pattern and no length bound: xgrammar takes no pair
        answer["pattern"] = f'^[^"\\\\]{{0,80}}({alternation})[^"\\\\]{{0,80}}$'
        return {**schema, "properties": {**schema["properties"], "answer": answer}}

    def _answer_request(self, state: DialogueState) -> tuple[list[int], dict[str, Any]]:
        """The final answer as the assistant's own sentence (reverse.answer_stem): the results, then a
        sentence begun by the stem that quotes a returned value and ends with a full stop."""
        results = "\n".join(
            f"- {json.dumps(result, ensure_ascii=False)[:300]}" for _, result in state.trajectory
        )
        content = ANSWER_INSTRUCTION.format(scenario=state.scenario, results=results)
        messages = [{"role": "system", "content": ANSWER_SYSTEM}, {"role": "user", "content": content}]
        prompt = self.engine.encoder.encode(
            self.engine.render_text(messages) + (self.config.answer_stem or "")
        )
        values = sorted(
            {v for _, content in state.trajectory for v in returned_values(content) if 2 <= len(v) <= 60}
        )
        quoted = "|".join(_literal(v) for v in values[:32] if "\n" not in v)
        free = '[^\\n"]'
        if not quoted:
            return prompt, {"regex": f"{free}{{8,160}}\\."}
        return prompt, {"regex": f"{free}{{0,80}}({quoted}){free}{{0,80}}\\."}

    def _question_request(self, state: DialogueState) -> tuple[list[int], dict[str, Any]]:
        stem = self.config.question_stem
        if stem:  # the teacher as the user, its reply begun by the stem; one sentence ending in "?"
            calls = "; ".join(
                f"{call.name}({json.dumps(call.arguments, ensure_ascii=False)}) which returns "
                f"{json.dumps(result, ensure_ascii=False)[:160]}"
                for call, result in state.trajectory
            )
            instruction = USER_INSTRUCTION.format(scenario=state.scenario, calls=calls, answer=state.answer)
            messages = [{"role": "system", "content": USER_SYSTEM}, {"role": "user", "content": instruction}]
            prompt = self.engine.encoder.encode(self.engine.render_text(messages) + stem)
            longest = max(8, self.config.max_question_chars - len(stem) - 1)
            return prompt, {"regex": f'[^\\n"?]{{8,{longest}}}\\?'}
        used = "\n".join(
            f"- {call.name}({json.dumps(call.arguments, ensure_ascii=False)})" for call, _ in state.trajectory
        )
        messages = [
            {"role": "system", "content": QUESTION_SYSTEM},
            {
                "role": "user",
                "content": (
                    f"Scenario: {state.scenario}\nTool calls made:\n{used}\nFinal answer: {state.answer}\n\n"
                    + QUESTION_INSTRUCTION
                ),
            },
        ]
        schema = {
            "type": "object",
            "properties": {"question": bounded_string(self.config.max_question_chars)},
            "required": ["question"],
            "additionalProperties": False,
        }
        return self.engine.render(messages), {"json": schema}

    def _respond_request(self, state: DialogueState) -> tuple[list[int], dict[str, Any]]:
        """A simulated tool's response to the pending call (:func:`.simulated.response_request`)."""
        assert state.responding is not None
        call, simulated = state.responding, self.registry.simulated
        tool = self.registry.simulated_tool(call.name)
        examples = simulated.examples(tool)
        errors = self.config.simulated_errors
        messages, schema = response_request(tool, call.arguments, examples, state.scenario, errors=errors)
        return self.engine.render(messages), {"json": schema}

    def _request(self, state: DialogueState) -> tuple[list[int], Any]:
        make = {
            "scene": self._scene_request,
            "call": self._call_request,
            "respond": self._respond_request,
            "question": self._question_request,
            "judge": self._judge_request,
            "answer": self._answer_request,
        }
        prompt, constraint = make[state.phase](state)
        step_seed = int.from_bytes(
            hashlib.sha256(f"{state.seed.rng_seed}/{state.step}".encode()).digest()[:4], "big"
        )
        # After failed calls, sample the next call hotter: a small teacher otherwise repeats the failing
        # call verbatim. The texts (scene, answer, question) have a temperature of their own.
        text = state.phase != "call" or state.call_name == ANSWER_TOOL.name
        temperature = self.config.text_temperature if text else self.config.temperature
        if temperature is None:
            temperature = self.config.temperature
        if not text:
            temperature += self.config.failure_temperature_step * state.failed_calls
        params = self.engine.sampling_params(
            max_tokens=self.config.max_tokens,
            temperature=min(temperature, 1.5),
            seed=step_seed,
            # each step's schema declares its own bounds (tool arguments: arguments_schema)
            json_schema=constraint.get("json"),
            regex=constraint.get("regex"),
        )
        return prompt, params

    # -- transitions -------------------------------------------------------------------------------
    def _reject(self, state: DialogueState, reason: str, detail: str) -> None:
        self.stats[reason] += 1
        state.phase = "done"
        state.result = reject(
            state.seed.seed_id,
            STAGE,
            reason,
            detail,
            {
                "seed": state.seed.to_json(),
                "scenario": state.scenario,
                "calls": [[c.to_dict(), r] for c, r in state.trajectory],
                "answer": state.answer,
                "question": state.question,
                "judge": state.judge,
                "teacher_messages": state.teacher_messages,  # every call tried, failed ones included
            },
        )

    def _parse_failed(self, state: DialogueState, what: str, text: str) -> None:
        state.parse_failures += 1
        if state.parse_failures > self.config.max_parse_retries:
            self._reject(
                state,
                "parse_failure",
                f"{what} did not parse after {state.parse_failures} tries: {text[:200]}",
            )

    def advance(self, state: DialogueState, completion: Completion, session: Any) -> None:
        """Apply one teacher completion to a dialogue (and run the tool it calls)."""
        state.step += 1
        state.generated_tokens += len(completion.token_ids)
        text = completion.text
        if state.phase == "scene":
            try:
                scene = json.loads(text, strict=False)  # grammars admit raw control characters
                chosen = [self.specs[n] for n in dict.fromkeys(scene["tools"]) if n in self.specs]
                state.scenario, state.information = (
                    str(scene["scenario"]),
                    [str(i) for i in scene["information"]],
                )
            except (ValueError, KeyError, TypeError):
                self._parse_failed(state, "scene", text)
                return
            if not chosen:
                self._parse_failed(state, "scene (no known tool chosen)", text)
                return
            verdict = self.gates.scenario(state.scenario)
            if verdict is not None:
                self._reject(state, verdict.reason, verdict.detail)
                return
            state.chosen, state.phase = chosen, "call"
        elif state.phase == "call":
            if state.call_name:  # the arguments of a call whose head came first
                text = call_head(state.call_name) + text + "}"
                state.call_name, state.call_head = "", []
            elif state.call_prompt:  # the head of a call (two_step_calls)
                name = call_head_name(text, [t.name for t in self._allowed_tools(state)])
                if name is None or completion.finish_reason != "stop":
                    self._parse_failed(state, "tool call head", text)
                    return
                if name == ANSWER_TOOL.name and self.config.answer_stem:  # its text comes in its own step
                    state.call_prompt = []
                    self._take_call(state, ToolCall(name, {"answer": ""}), session)
                    return
                # The head's tokens without the stop token that ended it; the arguments continue them.
                self._head_chosen(state, name, state.call_prompt + list(completion.token_ids[:-1]))
                return
            state.call_prompt = []
            parsed = parse_any(text)
            if not parsed.ok:
                self._parse_failed(state, "tool call", text)
                return
            self._take_call(state, parsed.calls[0], session)
        elif state.phase == "respond":
            call, state.responding, state.phase = state.responding, None, "call"
            assert call is not None
            tool = self.registry.simulated_tool(call.name)
            failure = self.registry.simulated.answer(tool, call.arguments, completion.text)
            self.simulated_calls["invalid" if failure else "written"] += 1
            self._take_call(state, call, session, responded=True, failure=failure)
        elif state.phase == "answer":
            state.answer = (self.config.answer_stem or "") + text
            self._finish_calls(state)
        elif state.phase == "judge":
            try:
                verdict = json.loads(text, strict=False)
                answerable, follows = bool(verdict["answerable"]), bool(verdict["follows"])
            except (ValueError, KeyError, TypeError):
                self._parse_failed(state, "judge verdict", text)
                return
            state.judge = {"answerable": answerable, "follows": follows}
            if answerable and follows:
                self._admit(state)
            else:
                self._reject(
                    state, "judge_rejected", f"the judge found answerable={answerable}, follows={follows}"
                )
        elif state.phase == "question":
            if self.config.question_stem:
                state.question = (self.config.question_stem + text).strip()
            else:
                try:
                    state.question = str(json.loads(text, strict=False)["question"]).strip()
                except (ValueError, KeyError, TypeError):
                    self._parse_failed(state, "question", text)
                    return
            self._finish(state)

    def _take_call(
        self,
        state: DialogueState,
        call: ToolCall,
        session: Any,
        *,
        responded: bool = False,
        failure: Any = None,
    ) -> None:
        """A parsed call: a control tool ends the calls; any other tool is executed for real, or for a
        simulated tool with no cached response, its response is written first (the ``respond`` step,
        after which ``responded``; ``failure``: the written response was not valid)."""
        if call.name == RESTART_TOOL.name:
            self._reject(state, "restart", f"the teacher restarted after {state.calls_made} calls")
            return
        if call.name == ANSWER_TOOL.name:
            state.answer = str(call.arguments.get("answer", ""))
            self._finish_calls(state)
            return
        if not responded and self._needs_response(call):
            state.responding, state.phase = call, "respond"
            return
        state.calls_made += 1
        result = failure or session.call(call.name, call.arguments)
        content = result.to_message_content()
        call_id = f"call_{state.calls_made}"
        state.teacher_messages.append(
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"id": call_id, "type": "function", "function": call.to_dict()}],
            }
        )
        state.teacher_messages.append({"role": "tool", "tool_call_id": call_id, "content": content})
        if result.ok:
            state.trajectory.append((call, result.content))
        else:
            state.failed_calls += 1

    def _needs_response(self, call: ToolCall) -> bool:
        """Whether a call is to a simulated tool, valid, and not answered yet (a cached call is counted)."""
        if self.registry.simulated_tool(call.name) is None or self.registry.refuse(call.name, call.arguments):
            return False
        if self.registry.simulated.cache.get(call.name, call.arguments) is not None:
            self.simulated_calls["cached"] += 1
            return False
        return True

    def _finish_calls(self, state: DialogueState) -> None:
        """After `answer`: the filters that need no question, then question generation."""
        if not state.trajectory:
            self._reject(state, "no_successful_call", f"{state.failed_calls} call(s), none succeeded")
            return
        distinct = {call.name for call, _ in state.trajectory}
        if len(distinct) < 2:
            self._reject(
                state, "too_few_tools", f"only {sorted(distinct)} succeeded; two distinct tools needed"
            )
            return
        if self.config.answer_stem and state.phase != "answer":  # the answer is written next
            state.phase = "answer"
            return
        if not answer_is_grounded(state.answer, [content for _, content in state.trajectory]):
            self._reject(
                state, "answer_ungrounded", f"the answer uses no returned value: {state.answer[:200]}"
            )
            return
        # What the dialogue knows: results, the arguments the calls were given, the scenario.
        known = [
            *(content for _, content in state.trajectory),
            *(call.arguments for call, _ in state.trajectory),
            state.scenario,
            *state.information,
        ]
        verdict = self.gates.arguments(call for call, _ in state.trajectory) or self.gates.answer(
            state.answer, known
        )
        if verdict is not None:
            self._reject(state, verdict.reason, verdict.detail)
            return
        state.phase = "question"

    def _finish(self, state: DialogueState) -> None:
        named = names_a_tool(state.question, list(self.specs))
        if named is not None:
            self._reject(state, "question_names_tool", f"the question names the tool {named!r}")
            return
        calls = [call for call, _ in state.trajectory]
        verdict = self.gates.question(state.question, state.answer, state.scenario, calls)
        if verdict is not None:
            self._reject(state, verdict.reason, verdict.detail)
            return
        if self.config.judge:
            state.phase = "judge"
            return
        self._admit(state)

    def _admit(self, state: DialogueState) -> None:
        state.phase = "done"
        self.stats["dialogue"] += 1
        state.result = self._dialogue(state)

    def _judge_request(self, state: DialogueState) -> tuple[list[int], dict[str, Any]]:
        """The teacher as a judge (reverse.judge): can the calls answer the question, and does the answer
        follow from their results? Two booleans, under a JSON schema."""
        calls = "\n".join(
            f"- {call.name}({json.dumps(call.arguments, ensure_ascii=False)}) returned "
            f"{json.dumps(result, ensure_ascii=False)[:300]}"
            for call, result in state.trajectory
        )
        content = JUDGE_INSTRUCTION.format(question=state.question, calls=calls, answer=state.answer)
        messages = [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": content}]
        schema = {
            "type": "object",
            "properties": {"answerable": {"type": "boolean"}, "follows": {"type": "boolean"}},
            "required": ["answerable", "follows"],
            "additionalProperties": False,
        }
        return self.engine.render(messages), {"json": schema}

    def _dialogue(self, state: DialogueState) -> Dialogue:
        messages = [Message("system", SYSTEM_PROMPT), Message("user", state.question)]
        for i, (call, content) in enumerate(state.trajectory):
            call_id = f"call_{i}"
            messages.append(Message("assistant", None, tool_calls=(call,), tool_call_ids=(call_id,)))
            text = content if isinstance(content, str) else json.dumps(content, ensure_ascii=False)
            messages.append(Message("tool", text, tool_call_id=call_id, name=call.name))
        messages.append(Message("assistant", state.answer))
        used = {call.name for call, _ in state.trajectory}
        return Dialogue(
            dialogue_id=f"dlg-{state.seed.seed_id}",
            seed_id=state.seed.seed_id,
            messages=tuple(messages),
            tools=tuple(spec for spec in state.chosen if spec.name in used)
            + tuple(spec for spec in state.chosen if spec.name not in used),
            scenario=state.scenario,
            provenance={
                "teacher": self.teacher,
                "rng_seed": state.seed.rng_seed,
                "call_budget": state.seed.call_budget,
                "calls_made": state.calls_made,
                "failed_calls": state.failed_calls,
                "information": state.information,
                "generated_tokens": state.generated_tokens,
                **({"judge": state.judge} if state.judge else {}),
                # calls whose response the simulator wrote (their tools' sources say simulated:...)
                "simulated_calls": sum(
                    1 for call, _ in state.trajectory if self.registry.simulated_tool(call.name)
                ),
            },
            status="ok",
        )

    # -- driver ------------------------------------------------------------------------------------
    def run(
        self, seeds: Sequence[Seed], on_done: Callable[[Seed, Dialogue | RejectedRow], None] | None = None
    ) -> tuple[list[Dialogue], list[RejectedRow]]:
        """Build every seed; a finished dialogue's slot is refilled by the next seed at once.

        Continuous batching: a dialogue submits its next step as soon as its previous one finished, so
        the engine's batch never waits for the slowest dialogue (steps are short and unequal: a call
        head against a scene). Results come back in seed order; on the CPU build the same seeds and
        config give the same records (each step samples with its own seed). ``on_done(seed,
        result)`` is called as each seed ends (the replica writes a shard as soon as its last seed is
        done).
        """
        self._pending = deque(seeds)
        self._finished = {}
        self._on_done = on_done
        self._run_continuous()
        results = [self._finished[s.seed_id] for s in seeds]
        dialogues = [r for r in results if isinstance(r, Dialogue)]
        return dialogues, [r for r in results if isinstance(r, RejectedRow)]

    def _start_next(self) -> tuple[DialogueState, Any] | None:
        """The next seed as a dialogue in flight (with its tool session), or None when none is left."""
        while self._pending:
            seed = self._pending.popleft()
            tools = [self.specs[n] for n in seed.tool_names if n in self.specs]
            state = DialogueState(seed=seed, tools=tools)
            if tools:
                return state, self.registry.session(seed.seed_id, seed.initial_config)
            self._reject(state, "no_tools", f"none of {list(seed.tool_names)[:5]} is in the catalogue")
            self._record(state)
        return None

    def _step_done(self, state: DialogueState, session: Any, completion: Completion) -> bool:
        """Apply a finished step; True when the dialogue is over (its result recorded, session closed)."""
        self.generated_tokens += len(completion.token_ids)
        if (completion.finish_reason or "").startswith("error"):  # a served teacher that gave up
            self._reject(
                state, TEACHER_UNAVAILABLE, f"step {state.step} ({state.phase}): {completion.finish_reason}"
            )
        else:
            self.advance(state, completion, session)
        if state.phase != "done":
            return False
        session.close()
        self._record(state)
        return True

    def _fits(self, state: DialogueState, session: Any, prompt: list[int]) -> bool:
        """Whether the step's prompt fits the engine; if not, the seed ends rejected (prompt_too_long)."""
        why = self.engine.prompt_too_long(prompt)
        if why is None:
            return True
        self._reject(state, "prompt_too_long", f"step {state.step} ({state.phase}): {why}")
        session.close()
        self._record(state)
        return False

    def _record(self, state: DialogueState) -> None:
        result = state.result
        assert result is not None, "a dialogue ends with a record"
        self._finished[state.seed.seed_id] = result
        if self._on_done is not None:
            self._on_done(state.seed, result)

    def _run_continuous(self) -> None:
        in_flight: dict[str, tuple[DialogueState, Any]] = {}

        def submit(state: DialogueState, session: Any) -> None:
            request_id = f"{state.seed.seed_id}/{state.step}"
            prompt, params = self._request(state)
            if not self._fits(state, session, prompt):
                return
            in_flight[request_id] = (state, session)
            self.engine.submit(request_id, prompt, params)
            self.requests += 1

        while True:
            while len(in_flight) < self.in_flight and (started := self._start_next()):
                submit(*started)
            if not in_flight:
                return
            start = time.perf_counter()
            finished = self.engine.poll()
            self.busy_seconds += time.perf_counter() - start
            for request_id, completion in finished:
                state, session = in_flight.pop(request_id)
                if not self._step_done(state, session, completion):
                    submit(state, session)


# ----------------------------------------------------------------------------------------- Ray shell
def shard_paths(out_dir: str | Path, shard_id: str) -> dict[str, str]:
    """Where one shard's outputs live (paths, or URIs of a run dir in an object store); ``done`` is
    written last."""
    return {
        "dialogues": store.join(out_dir, "shards", f"{shard_id}.dialogues.parquet"),
        "rejected": store.join(out_dir, "shards", f"{shard_id}.rejected.parquet"),
        "done": store.join(out_dir, "shards", f"{shard_id}.done.json"),
    }


SHARD_SUMMARY_KEYS = ("shard_id", "dialogues", "rejected", "tokens", "seconds", "busy", "reasons")
SIMULATED_KEYS = ("cached", "written", "invalid")  # calls of simulated tools, by how they were answered


class ReverseReplica:
    """Ray Data actor: one teacher engine + tool registry; each input row is one shard of seeds."""

    def __init__(
        self, model: str, config: dict[str, Any], out_dir: str, cache: Any = None, api_key: str = ""
    ) -> None:
        from ttpa_ray.tools.registry import ToolRegistry, load_catalogue
        from ttpa_ray.tools.simulated import cache_of

        self.config = TTPAConfig.model_validate(config)
        self.out_dir = out_dir
        self.engine: Engine | EndpointTeacher
        if self.config.model.teacher_is_endpoint:  # model: the served teacher's tokenizer folder
            self.engine = EndpointTeacher(self.config.teacher_endpoint, model, api_key)
            self.teacher = str(self.config.model.teacher)
        else:
            self.engine = Engine(
                model, self.config.vllm, dtype=self.config.model.dtype, seed=self.config.run.seed
            )
            self.teacher = model
        # cache: the run's simulated-response cache actor (shared by every replica), if it has one
        self.registry = ToolRegistry(load_catalogue(self.config.reverse.catalogue), cache=cache_of(cache))

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Build the batch's shards as one stream of dialogues; a row per shard, in batch order.

        All seeds of the batch's unfinished shards share the engine (:func:`dialogues_in_flight` at
        once), so a shard's slowest dialogue does not hold the engine back; each shard is written,
        with its ``.done`` marker, the moment its last seed ends. Shards finished by an earlier
        attempt (a retried batch after a crash) are read back from their marker, not rebuilt.
        """
        done: dict[str, dict[str, Any]] = {}
        todo: dict[str, list[Seed]] = {}
        for shard_id, seeds_json in zip(batch["shard_id"], batch["seeds"], strict=True):
            paths = shard_paths(self.out_dir, str(shard_id))
            if store.exists(paths["done"]):
                done[str(shard_id)] = json.loads(store.read_text(paths["done"]))
            else:
                todo[str(shard_id)] = [Seed.from_json(s) for s in json.loads(seeds_json)]
        if todo:
            done.update(self._build_shards(todo))
        out: dict[str, list[Any]] = {k: [] for k in SHARD_SUMMARY_KEYS}
        for shard_id in batch["shard_id"]:
            for key in out:
                value = done[str(shard_id)][key]
                out[key].append(json.dumps(value) if key == "reasons" else value)
        return out

    def _build_shards(self, shards: dict[str, list[Seed]]) -> dict[str, dict[str, Any]]:
        builder = ReverseBuilder(self.engine, self.registry, self.config.reverse, teacher=self.teacher)
        shard_of = {seed.seed_id: shard_id for shard_id, seeds in shards.items() for seed in seeds}
        results: dict[str, dict[str, Dialogue | RejectedRow]] = {shard_id: {} for shard_id in shards}
        written: dict[str, dict[str, Any]] = {}
        start = time.perf_counter()
        marks: dict[str, Any] = {"tokens": 0, "requests": 0, "busy": 0.0, "time": start}
        marks["simulated"] = Counter()  # totals at the last shard written
        marks["endpoint"] = Counter()
        marks["mcp"] = Counter()

        def on_done(seed: Seed, result: Dialogue | RejectedRow) -> None:
            shard_id = shard_of[seed.seed_id]
            results[shard_id][seed.seed_id] = result
            if len(results[shard_id]) < len(shards[shard_id]):
                return
            # The work since the previous shard was written is this shard's share of the stream.
            now = time.perf_counter()
            usage = {
                "tokens": builder.generated_tokens - int(marks["tokens"]),
                "requests": builder.requests - int(marks["requests"]),
                "busy": builder.busy_seconds - marks["busy"],
                "seconds": now - marks["time"],
                "simulated": {k: builder.simulated_calls[k] - marks["simulated"][k] for k in SIMULATED_KEYS},
            }
            if isinstance(self.engine, EndpointTeacher):  # requests, retries, failures, latency
                figures = Counter(self.engine.summary())
                usage["endpoint"] = dict(figures - marks["endpoint"])
                marks["endpoint"] = figures
            mcp = Counter(self.registry.mcp_figures())  # MCP calls, tool errors, server starts
            if mcp:
                usage["mcp"] = dict(mcp - marks["mcp"])
                marks["mcp"] = mcp
            marks.update(
                tokens=builder.generated_tokens,
                requests=builder.requests,
                busy=builder.busy_seconds,
                time=now,
                simulated=Counter(builder.simulated_calls),
            )
            ordered = [results[shard_id][s.seed_id] for s in shards[shard_id]]
            written[shard_id] = self._write_shard(shard_id, shards[shard_id], ordered, usage)

        builder.run([seed for seeds in shards.values() for seed in seeds], on_done=on_done)
        return written

    def _write_shard(
        self, shard_id: str, seeds: list[Seed], results: list[Dialogue | RejectedRow], usage: dict[str, Any]
    ) -> dict[str, Any]:
        paths = shard_paths(self.out_dir, shard_id)
        dialogues = [r for r in results if isinstance(r, Dialogue)]
        rejected = [r for r in results if isinstance(r, RejectedRow)]
        # Each file is written whole (store.write_table), the marker last: a crash never leaves a
        # half-written shard behind, nor a marker without its shard.
        for key, records, cls in (("dialogues", dialogues, Dialogue), ("rejected", rejected, RejectedRow)):
            store.write_table(to_table(records, cls), paths[key])
        self.registry.simulated.cache.flush()  # the responses these dialogues got outlive the run
        done = {
            "shard_id": shard_id,
            "dialogues": len(dialogues),
            "rejected": len(rejected),
            **usage,
            "reasons": dict(Counter(r.reason for r in rejected)),
            "seed_ids": [s.seed_id for s in seeds],
            "replica": f"{socket.gethostname()}:{os.getpid()}",  # who built it
        }
        store.write_text(paths["done"], json.dumps(done))
        return done

    def __del__(self) -> None:
        registry = getattr(self, "registry", None)
        if registry is not None:
            registry.close()


# ------------------------------------------------------------------------------------------- driver
@dataclass
class ReverseReport:
    """Counts of a reverse run (all shards, including those finished by an earlier run)."""

    seeds: int
    dialogues: int
    rejected: int
    reasons: dict[str, int]
    generated_tokens: int
    seconds: float
    busy_fraction: float
    out_dir: str
    # calls of simulated tools by how they were answered (SIMULATED_KEYS), and the cache's size
    simulated: dict[str, int] = field(default_factory=dict)
    quality: dict[str, Any] = field(default_factory=dict)  # quality_summary
    # a served teacher's requests, retries, failures, tokens and summed latency (EndpointTeacher.summary)
    endpoint: dict[str, Any] = field(default_factory=dict)
    mcp: dict[str, int] = field(default_factory=dict)  # MCP calls, tool errors, server starts
    catalogue_errors: list[str] = field(default_factory=list)  # tools or servers that did not load


def _shards(seeds: Sequence[Seed], size: int) -> list[tuple[str, list[Seed]]]:
    return [(f"shard-{i // size:05d}", list(seeds[i : i + size])) for i in range(0, len(seeds), size)]


def dialogues_in_flight(reverse: ReverseConfig, max_num_seqs: int) -> int:
    """``reverse.max_concurrent_dialogues``, or when unset four times the engine's ``max_num_seqs``:
    more dialogues than slots keeps a waiting queue, so a slot freed by a finished step is refilled at
    the engine's next step instead of after the driver's round trip (tool call, next prompt). Waiting
    requests hold no KV cache, only a prompt. (bench/reverse.py measures the stage against raw vLLM.)
    """
    return reverse.max_concurrent_dialogues or 4 * max_num_seqs


def endpoint_pool(config: TTPAConfig) -> dict[str, Any]:
    """``map_batches`` arguments of the actors that send a served teacher its requests: CPUs only,
    ``teacher_endpoint.actors`` of them, restarted (their batch retried) as replicas are."""
    import ray.data

    endpoint = config.teacher_endpoint
    return {
        "compute": ray.data.ActorPoolStrategy(size=endpoint.actors, max_tasks_in_flight_per_actor=1),
        "max_restarts": config.vllm.max_restarts,
        "max_task_retries": config.vllm.max_restarts,
        "num_cpus": endpoint.cpus_per_actor,
    }


def shards_per_call(config: TTPAConfig, shards: int) -> int:
    """Shards a replica builds as one stream: enough seeds to keep the dialogues in flight
    (:func:`dialogues_in_flight`) four times over (the stream's tail, when its last dialogues run
    alone, is then a small share), but never so many that a replica of ``replicas_max`` is left
    without a batch."""
    reverse = config.reverse
    if config.model.teacher_is_endpoint:
        slots, replicas = config.teacher_endpoint.max_concurrency, config.teacher_endpoint.actors
    else:
        slots, replicas = config.vllm.max_num_seqs, config.vllm.replicas_max
    wanted = -(-4 * dialogues_in_flight(reverse, slots) // reverse.shard_size)
    fair = -(-shards // replicas)
    return max(1, min(wanted, fair))


def run_reverse(config: TTPAConfig, teacher: str, out_dir: Path, progress: Any = None) -> ReverseReport:
    """Build dialogues for ``config.reverse.num_seeds`` seeds with vLLM replicas on Ray Data.

    Shards already marked done in ``out_dir`` (by an earlier, maybe crashed, run) are skipped; the
    manifest is rebuilt from every shard's marker, and seeds = dialogues + rejected is checked.
    ``progress(done_summary, totals, shards)`` is called as each shard finishes (from a watcher thread).
    """
    import ray

    from ttpa_ray.replica import replica_pool
    from ttpa_ray.tools.registry import load_catalogue
    from ttpa_ray.tools.simulated import shared_cache

    catalogue = load_catalogue(config.reverse.catalogue)
    if not catalogue.names:
        raise ValueError(
            f"tool catalogue {config.reverse.catalogue!r} has no usable tool: {catalogue.errors[:3]}"
        )
    check_mcp_tools_not_evaluated(catalogue, config)
    seeds = make_seeds(catalogue, config.reverse, config.run.seed)
    shards = _shards(seeds, config.reverse.shard_size)
    # Replicas write the shards where every node reaches them: the object store of a run dir there.
    shards_at = store.shared(out_dir)
    todo = [(sid, s) for sid, s in shards if not store.exists(shard_paths(shards_at, sid)["done"])]
    start = time.perf_counter()
    simulated = bool(simulated_catalogues(config.reverse.catalogue))
    cache_at = store.join(shards_at, "simulated")  # the simulated-response cache's part files
    if todo:
        cache = shared_cache(cache_at) if simulated else None
        vllm = config.vllm
        rows = [{"shard_id": sid, "seeds": json.dumps([x.to_json() for x in s])} for sid, s in todo]
        per_call = shards_per_call(config, len(todo))
        served = config.model.teacher_is_endpoint
        ds = ray.data.from_items(rows, override_num_blocks=-(-len(rows) // per_call)).map_batches(
            ReverseReplica,
            fn_constructor_kwargs={
                "model": store.shared(teacher),
                "config": config.model_dump(mode="json"),
                "out_dir": shards_at,
                "cache": cache,
                # in the actors' memory only, never in the config (docs/design.md)
                "api_key": api_key(config.teacher_endpoint) if served else "",
            },
            batch_size=per_call,
            batch_format="numpy",
            # a batch is several shards: minutes on a GPU
            **(endpoint_pool(config) if served else replica_pool(vllm, one_batch_each=True)),
        )
        watcher = _ShardWatcher(shards_at, [sid for sid, _ in todo], progress)
        watcher.start()
        try:
            finished = sum(1 for _ in ds.iter_rows())  # a row per shard, once its replica call returns
        finally:
            watcher.stop()
            if cache is not None:
                ray.kill(cache)
        if finished != len(todo):
            raise RuntimeError(f"reverse: {finished} shard rows came back for {len(todo)} shards")
    dedup = config.reverse.quality.dedup_questions
    seconds = time.perf_counter() - start
    return write_manifest(
        out_dir,
        seeds,
        shards,
        seconds,
        shards_at,
        cache_at if simulated else None,
        dedup=dedup,
        catalogue_tools=len(catalogue.names),
        catalogue_errors=[str(e) for e in catalogue.errors],
    )


class _ShardWatcher:
    """Reports each shard to ``progress`` the moment its ``.done`` marker appears.

    A replica call builds several shards and returns their rows together, so progress follows the
    markers (the run directory is shared by the driver and the replicas) rather than the rows.
    """

    def __init__(self, out_dir: str, shard_ids: Sequence[str], progress: Any, interval: float = 1.0) -> None:
        import threading

        self.markers = {sid: shard_paths(out_dir, sid)["done"] for sid in shard_ids}
        self.progress = progress
        self.interval = interval
        self.totals: Counter[str] = Counter()
        self.reported: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="reverse-progress", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.poll()  # the shards that ended since the last look

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.poll()

    def poll(self) -> None:
        for sid, marker in self.markers.items():
            if sid in self.reported or not store.exists(marker):
                continue
            self.reported.add(sid)
            done = json.loads(store.read_text(marker))
            self.totals.update({"shards": 1, "dialogues": done["dialogues"], "rejected": done["rejected"]})
            self.totals["tokens"] += int(done["tokens"])
            if self.progress is not None:
                self.progress(done, self.totals, len(self.markers))


def write_manifest(
    out_dir: Path,
    seeds: Sequence[Seed],
    shards: Sequence[tuple[str, list[Seed]]],
    seconds: float,
    shards_at: str | None = None,
    cache_at: str | None = None,
    *,
    dedup: bool = False,
    catalogue_tools: int = 0,
    catalogue_errors: Sequence[str] = (),
) -> ReverseReport:
    """Check every seed ended as one dialogue or one rejected row, and write manifest.json (in
    ``out_dir``; the shards are in ``shards_at``, by default the same; the simulated-response cache,
    if the catalogue has simulated tools, in ``cache_at``). With ``dedup``, later copies of a question
    become rejected rows (:func:`drop_duplicate_questions`) and the manifest names the kept dialogues."""
    shards_at = shards_at or str(out_dir)
    reasons: Counter[str] = Counter()
    simulated: Counter[str] = Counter()
    endpoint: Counter[str] = Counter()
    mcp: Counter[str] = Counter()
    seen: Counter[str] = Counter()
    dialogues = rejected = tokens = 0
    busy = total = 0.0
    for sid, _ in shards:
        done = json.loads(store.read_text(shard_paths(shards_at, sid)["done"]))
        dialogues += done["dialogues"]
        rejected += done["rejected"]
        tokens += done["tokens"]
        busy += done["busy"]
        total += done["seconds"]
        reasons.update(done["reasons"])
        simulated.update(done.get("simulated", {}))
        endpoint.update(done.get("endpoint", {}))
        mcp.update(done.get("mcp", {}))
        seen.update(done["seed_ids"])
    duplicated = [s for s, n in seen.items() if n > 1]
    missing = [s.seed_id for s in seeds if s.seed_id not in seen]
    if duplicated or missing or dialogues + rejected != len(seeds):
        raise RuntimeError(
            f"reverse output does not account for every seed: {len(seeds)} seeds, {dialogues} dialogues, "
            f"{rejected} rejected, missing {missing[:3]}, duplicated {duplicated[:3]}"
        )
    folders: dict[str, str] = {}
    if dedup and dialogues:
        folders["unique"], folders["duplicates"], copies = drop_duplicate_questions(
            shards_at, [sid for sid, _ in shards]
        )
        dialogues, rejected = dialogues - copies, rejected + copies
        if copies:
            reasons[DUPLICATE] += copies
    report = ReverseReport(
        seeds=len(seeds),
        dialogues=dialogues,
        rejected=rejected,
        reasons=dict(reasons),
        generated_tokens=tokens,
        seconds=seconds,
        busy_fraction=busy / total if total else 0.0,
        out_dir=str(out_dir),
        simulated={**simulated, "cache_size": SimulatedCache(cache_at).size()} if cache_at else {},
        endpoint=dict(endpoint),
        mcp=dict(mcp),
        catalogue_errors=list(catalogue_errors),
    )
    kept = (
        store.files(folders["unique"])
        if "unique" in folders
        else [shard_paths(shards_at, sid)["dialogues"] for sid, _ in shards]
    )
    report.quality = quality_summary(report, kept, catalogue_tools)
    manifest = {
        "stage": STAGE,
        "report": report.__dict__,
        "shards": [{"shard_id": sid, **shard_paths(shards_at, sid)} for sid, _ in shards],
        **folders,
    }
    store.write_text(out_dir / "manifest.json", json.dumps(manifest, indent=2))
    return report


def dialogue_files(out_dir: Path) -> list[str]:
    """The Parquet files of a finished reverse run's dialogues (less the duplicate questions)."""
    manifest = json.loads((out_dir / "manifest.json").read_text())
    unique = manifest.get("unique")
    return store.files(unique) if unique else [shard["dialogues"] for shard in manifest["shards"]]


def dialogue_dataset(out_dir: Path) -> ray.data.Dataset:
    """A finished reverse run's dialogues as a Ray dataset (read lazily, by the cluster)."""
    import ray

    files = dialogue_files(out_dir)
    return store.dataset(files) if files else ray.data.from_arrow(to_table([], Dialogue))


def read_dialogues(out_dir: Path) -> list[Dialogue]:
    """Every dialogue of a finished reverse run (less the duplicate questions), in seed order: for
    small runs and tests; the pipeline reads :func:`dialogue_dataset`."""
    from ttpa_ray.records import read_parquet

    found = [d for path in dialogue_files(out_dir) for d in read_parquet(Dialogue, path)]
    return sorted(found, key=lambda d: seed_order(d.seed_id))


# ------------------------------------------------------------------------------- duplicate questions
def seed_order(seed_id: str) -> tuple[int, str]:
    """Seeds in the order they were made (``seed-<run seed>-<index>``), whatever the index's width."""
    tail = seed_id.rsplit("-", 1)[-1]
    return (int(tail) if tail.isdigit() else -1, seed_id)


def _with_question_key(batch: Any) -> Any:
    """The batch with each dialogue's question key (quality.question_key) and its seed's index."""
    import pyarrow as pa

    from ttpa_ray.records import rows_from_batch, storage_schema

    dialogues = [Dialogue.from_row(row) for row in rows_from_batch(batch)]
    questions = [next((m.content or "" for m in d.messages if m.role == "user"), "") for d in dialogues]
    # Ray's hash shuffle cannot make empty blocks of Arrow extension types (the JSON columns): their
    # text crosses it as plain strings and becomes JSON again in _kept.
    batch = batch.cast(storage_schema(batch.schema))
    return batch.append_column("question_key", pa.array([question_key(q) for q in questions])).append_column(
        "seed_index", pa.array([seed_order(d.seed_id)[0] for d in dialogues], pa.int64())
    )


def _mark_copies(group: Any) -> Any:
    """One question key's dialogues: the first seed's keeps ``duplicate_of`` empty, later ones name it."""
    import pyarrow as pa

    ordered = group.sort_by([("seed_index", "ascending"), ("seed_id", "ascending")])
    first = ordered.column("dialogue_id")[0].as_py()
    marks = [""] + [first] * (ordered.num_rows - 1)
    return ordered.append_column("duplicate_of", pa.array(marks, pa.string()))


def _kept(batch: Any) -> Any:
    import pyarrow.compute as pc

    keep = pc.equal(batch.column("duplicate_of"), "")
    kept = batch.filter(keep).drop_columns(["question_key", "seed_index", "duplicate_of"])
    return kept.select(Dialogue.SCHEMA.names).cast(Dialogue.SCHEMA)


def _copies(batch: Any) -> Any:
    import pyarrow.compute as pc

    from ttpa_ray.records import rows_from_batch

    rows = rows_from_batch(batch.filter(pc.not_equal(batch.column("duplicate_of"), "")))
    rejected = []
    for row in rows:
        dialogue = Dialogue.from_row(row)
        question = next((m.content or "" for m in dialogue.messages if m.role == "user"), "")
        detail = f"the question of {row['duplicate_of']} again: {question[:160]!r}"
        rejected.append(reject(dialogue.seed_id, STAGE, DUPLICATE, detail, dialogue))
    return to_table(rejected, RejectedRow)


def _dialogue_figures(batch: Any) -> Any:
    """Per dialogue: its calls, its distinct tools, the tools' names and the question's 2-grams."""
    import pyarrow as pa

    from ttpa_ray.records import rows_from_batch

    calls, tools, names, bigrams = [], [], [], []
    for row in rows_from_batch(batch):
        dialogue = Dialogue.from_row(row)
        made = [c.name for m in dialogue.messages for c in m.tool_calls]
        question = next((m.content or "" for m in dialogue.messages if m.role == "user"), "")
        calls.append(len(made))
        tools.append(len(set(made)))
        names.append(sorted(set(made)))
        bigrams.append(question_bigrams(question))
    return pa.table({"calls": calls, "tools": tools, "tool_names": names, "bigrams": bigrams})


def quality_summary(
    report: ReverseReport, dialogue_files: Sequence[str], catalogue_tools: int
) -> dict[str, Any]:
    """The run's data quality (report and ``pipeline.json``): yield, rejected shares by kind, question
    diversity (distinct 2-grams over all 2-grams), calls and tools per dialogue, catalogue coverage and
    the simulated responses written invalid. Aggregated in Ray Data: the driver gets the figures."""
    from ray.data.aggregate import CountDistinct, Sum, Unique

    reasons = report.reasons
    made = report.dialogues + reasons.get(DUPLICATE, 0)
    simulated_written = report.simulated.get("written", 0) + report.simulated.get("invalid", 0)
    summary: dict[str, Any] = {
        "seeds": report.seeds,
        "yield": round(report.dialogues / max(report.seeds, 1), 4),
        "reasons": dict(sorted(reasons.items(), key=lambda kv: -kv[1])),
        "degenerate_share": round(sum(reasons.get(r, 0) for r in DEGENERATE) / max(report.seeds, 1), 4),
        "duplicate_share": round(reasons.get(DUPLICATE, 0) / max(made, 1), 4),
        "simulated_invalid_share": round(report.simulated.get("invalid", 0) / max(simulated_written, 1), 4)
        if simulated_written
        else None,
        "dialogues": report.dialogues,
    }
    if not report.dialogues:
        return summary
    figures = store.dataset(dialogue_files).map_batches(_dialogue_figures, batch_format="pyarrow")
    totals = figures.aggregate(Sum("calls"), Sum("tools"))
    grams = figures.flat_map(lambda row: [{"bigram": g} for g in row["bigrams"]]).materialize()
    distinct = grams.aggregate(CountDistinct("bigram"))["count_distinct(bigram)"] if grams.count() else 0
    all_grams = grams.count()
    tools = figures.flat_map(lambda row: [{"tool": t} for t in row["tool_names"]]).aggregate(Unique("tool"))
    n = report.dialogues
    summary.update(
        calls_per_dialogue=round(totals["sum(calls)"] / n, 3),
        tools_per_dialogue=round(totals["sum(tools)"] / n, 3),
        question_distinct_2grams=round(distinct / max(all_grams, 1), 4),
        catalogue_tools_used=round(len(tools["unique(tool)"]) / max(catalogue_tools, 1), 4),
    )
    return summary


def drop_duplicate_questions(shards_at: str, shard_ids: Sequence[str]) -> tuple[str, str, int]:
    """Group the run's dialogues by question key in Ray Data and keep the first seed's of each group.

    Writes ``<shards_at>/unique`` (the dialogues kept) and ``<shards_at>/duplicates`` (a rejected row
    ``duplicate_question`` per later copy, naming the dialogue it repeats); the driver sees counts only.
    Deterministic for the same shards, so a rerun writes the same folders again. Returns both folders
    and the number of copies.
    """

    fs, _ = store.resolve(shards_at)
    unique, duplicates = store.join(shards_at, "unique"), store.join(shards_at, "duplicates")
    for folder in (unique, duplicates):
        if store.exists(folder):
            fs.delete_dir(store.resolve(folder)[1])
    marked = (
        store.dataset([shard_paths(shards_at, sid)["dialogues"] for sid in shard_ids])
        .map_batches(_with_question_key, batch_format="pyarrow")
        .groupby("question_key", num_partitions=max(1, min(len(shard_ids), 64)))
        .map_groups(_mark_copies, batch_format="pyarrow")
        .materialize()
    )
    copies = marked.map_batches(_copies, batch_format="pyarrow").materialize()
    marked.map_batches(_kept, batch_format="pyarrow").write_parquet(store.resolve(unique)[1], filesystem=fs)
    copies.write_parquet(store.resolve(duplicates)[1], filesystem=fs)
    return unique, duplicates, copies.count()
