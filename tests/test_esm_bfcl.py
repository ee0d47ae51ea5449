"""ESM cross-checked on real BFCL v4 data (installed bfcl-eval) and against BFCL's own AST checker.

For every entry of five AST categories: the ground truth (first acceptable value per parameter)
scores 1.0 against the possible answers, and systematic mutations each produce their category and
a score below 1. Known defects of the data are listed by id and checked to be what they are.
"""

from __future__ import annotations

import copy
import json
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pytest

from ttpa_ray.bfcl import BfclEntry, ast_check, load_entries, load_multi_turn_tools, to_openai_tool
from ttpa_ray.codec import ToolCall
from ttpa_ray.esm import ESMResult, ReferenceCall, ToolIndex, prepare_tools, score

CATEGORIES = ("simple_python", "multiple", "parallel", "parallel_multiple", "live_simple")
ENTRY_COUNTS = {
    "simple_python": 400,
    "multiple": 200,
    "parallel": 200,
    "parallel_multiple": 200,
    "live_simple": 258,
}
# A required parameter's possible answers are an empty list: no call can match (BFCL's checker fails
# its own ground truth too). ESM refuses such a reference when it is prepared.
UNSATISFIABLE = {"live_simple_106-63-0", "live_simple_112-68-0"}
# The ground truth passes variable names ("data['sales']") where the schema declares arrays; BFCL's
# checker lets 'variables' through, ESM reports the type mismatch.
SCHEMA_VIOLATING = {"parallel_multiple_21"}
SCHEMA_VIOLATING_ERRORS = {"type_mismatch"}  # what such an entry brings to every mutation
# Mutations applied to every entry they fit, and how many entries they fit (bfcl-eval 2026.3.23).
EXPECTED_MUTATIONS = {
    "drop_required": 1233,
    "rename_unknown": 1256,
    "rename_wrong": 400,
    "change_type": 1254,
    "perturb_value": 1255,
    "add_unknown_key": 1256,
}
EXPECTED_CATEGORY = {
    "drop_required": "missing_required",
    "rename_unknown": "unknown_tool",
    "rename_wrong": "wrong_tool",
    "change_type": "type_mismatch",
    "perturb_value": "value_mismatch",
    "add_unknown_key": "unknown_key",
}
# Other categories a mutation may bring along (a new type is also a new value); None: anything.
ALLOWED_EXTRA: dict[str, set[str] | None] = {
    "drop_required": set(),
    "rename_unknown": set(),
    "rename_wrong": None,
    "change_type": {"value_mismatch"},
    "perturb_value": set(),
    "add_unknown_key": set(),
}
PY_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "float": (int, float),
    "boolean": (bool,),
    "array": (list,),
    "tuple": (list,),
    "dict": (dict,),
}


@dataclass
class Case:
    entry: BfclEntry
    index: ToolIndex
    reference: tuple[ReferenceCall, ...]
    truth: list[ToolCall]


@pytest.fixture(scope="module")
def cases() -> list[Case]:
    out = []
    for category in CATEGORIES:
        for entry in load_entries(category):
            if entry.id in UNSATISFIABLE:
                continue
            index = entry.tool_index()
            out.append(Case(entry, index, entry.reference(index), entry.ground_truth_calls(index)))
    return out


def _conforms(entry: BfclEntry, calls: list[ToolCall]) -> bool:
    """Independent check that calls use declared keys with values of the declared (BFCL) types."""
    docs = {f["name"]: f["parameters"] for f in entry.functions}
    for c in calls:
        props = docs[c.name].get("properties", {})
        for key, value in c.arguments.items():
            if key not in props:
                return False
            declared = props[key]["type"]
            if value is None and "default" in props[key] and props[key]["default"] is None:
                continue
            if declared == "any":
                continue
            if isinstance(value, bool) and declared != "boolean":
                return False
            if not isinstance(value, PY_TYPES[declared]):
                return False
    return True


def test_bfcl_data_loads_with_expected_counts() -> None:
    for category, count in ENTRY_COUNTS.items():
        entries = load_entries(category)
        assert len(entries) == count
        assert all(e.ground_truth for e in entries)
    # BFCL's type names are mapped in the OpenAI specs; 'any' is kept for ESM.
    spec = to_openai_tool(
        {
            "name": "f",
            "parameters": {"type": "dict", "properties": {"a": {"type": "float"}, "b": {"type": "tuple"}}},
        }
    )
    assert spec["function"]["parameters"] == {
        "type": "object",
        "properties": {"a": {"type": "number"}, "b": {"type": "array"}},
    }
    multi_turn = load_multi_turn_tools()
    assert sum(len(v) for v in multi_turn.values()) == 162
    assert len(prepare_tools(multi_turn["math_api"])) == len(multi_turn["math_api"])


def test_ground_truth_scores_one_for_every_entry(cases: list[Case]) -> None:
    per_category: Counter[str] = Counter()
    below_one = {}
    for case in cases:
        result = score(case.truth, case.reference, case.index)
        if result.score == 1.0:
            per_category[case.entry.category] += 1
        else:
            below_one[case.entry.id] = result
    # 1256 of 1258 entries are scorable; all but one score exactly 1.0
    assert len(cases) == 1256
    assert dict(per_category) == {
        "simple_python": 400,
        "multiple": 200,
        "parallel": 200,
        "parallel_multiple": 199,
        "live_simple": 256,
    }
    assert set(below_one) == SCHEMA_VIOLATING
    assert below_one["parallel_multiple_21"].errors == ("type_mismatch",)
    # the independent conformity check finds exactly the same entries
    assert {c.entry.id for c in cases if not _conforms(c.entry, c.truth)} == SCHEMA_VIOLATING


def test_unsatisfiable_ground_truth_is_refused_and_fails_bfcl_too() -> None:
    entries = [e for e in load_entries("live_simple") if e.id in UNSATISFIABLE]
    assert len(entries) == 2
    for entry in entries:
        with pytest.raises(ValueError, match="lists no acceptable value"):
            entry.reference()
        # BFCL's checker rejects the best call one can build from its possible answers as well
        truth = [
            ToolCall(n, {k: v[0] for k, v in p.items() if v})
            for g in entry.ground_truth
            for n, p in g.items()
        ]
        assert not ast_check(entry, truth)["valid"]


# ----------------------------------------------------------------------------------- mutations
def _other_type(value: Any, declared: str) -> Any:
    if declared == "string":
        return 12345
    return json.dumps(value)  # a string where a number, boolean, array or object is declared


def _perturbed(value: Any, alternatives: list[Any]) -> Any:
    if isinstance(value, bool):
        new: Any = not value
    elif isinstance(value, int):
        new = value + 7
    elif isinstance(value, float):
        new = value * 2 + 1.5
    elif isinstance(value, str):
        new = value + " (changed)"
    elif isinstance(value, list):
        new = [*value, value[-1]] if value else ["changed"]
    elif isinstance(value, dict):
        new = {**value, "changed": 1}
    else:
        return None
    return None if any(type(new) is type(a) and new == a for a in alternatives) else new


def _mutations(case: Case) -> dict[str, list[ToolCall]]:
    """Each mutation applied to the first call of the ground truth it fits (other calls unchanged)."""
    entry, truth = case.entry, case.truth
    docs = {f["name"]: f["parameters"] for f in entry.functions}
    answers = [next(iter(g.items())) for g in entry.ground_truth]
    out: dict[str, list[ToolCall]] = {}

    def replace(i: int, new_call: ToolCall) -> list[ToolCall]:
        return [new_call if j == i else c for j, c in enumerate(truth)]

    for i, c in enumerate(truth):
        params = docs[c.name]
        props = params.get("properties", {})
        alts = dict(answers[[n for n, _ in answers].index(c.name)][1]) if c.name in dict(answers) else {}
        args = copy.deepcopy(c.arguments)
        required = [k for k in params.get("required", []) if k in args]
        if required and "drop_required" not in out:
            out["drop_required"] = replace(
                i, ToolCall(c.name, {k: v for k, v in args.items() if k != required[0]})
            )
        if "rename_unknown" not in out:
            out["rename_unknown"] = replace(i, ToolCall(c.name + "_renamed", args))
        others = [n for n in docs if n != c.name]
        if others and "rename_wrong" not in out:
            out["rename_wrong"] = replace(i, ToolCall(others[0], args))
        typed = [k for k in args if k in props and props[k]["type"] != "any" and args[k] is not None]
        if typed and "change_type" not in out:
            key = typed[0]
            out["change_type"] = replace(
                i, ToolCall(c.name, {**args, key: _other_type(args[key], props[key]["type"])})
            )
        if "perturb_value" not in out:
            for key, value in args.items():
                new = _perturbed(value, alts.get(key, []))
                if new is not None:
                    out["perturb_value"] = replace(i, ToolCall(c.name, {**args, key: new}))
                    break
        if "add_unknown_key" not in out:
            out["add_unknown_key"] = replace(i, ToolCall(c.name, {**args, "ttpa_unknown_param": "x"}))
    return out


def test_mutations_produce_their_category_and_lower_the_score(cases: list[Case]) -> None:
    counts: Counter[str] = Counter()
    failures = []
    for case in cases:
        for kind, mutated in _mutations(case).items():
            result = score(mutated, case.reference, case.index)
            counts[kind] += 1
            expected = EXPECTED_CATEGORY[kind]
            extra = (
                set(result.errors)
                - {expected}
                - (SCHEMA_VIOLATING_ERRORS if case.entry.id in SCHEMA_VIOLATING else set())
            )
            allowed = ALLOWED_EXTRA[kind]
            if (
                result.score >= 1.0
                or expected not in result.errors
                or (allowed is not None and extra - allowed)
            ):
                failures.append((case.entry.id, kind, result.score, result.errors))
    assert failures == []
    assert dict(counts) == EXPECTED_MUTATIONS


# ------------------------------------------------------------------------------ BFCL's checker
def _esm(case: Case, calls: list[ToolCall]) -> ESMResult:
    return score(calls, case.reference, case.index)


def test_agrees_with_bfcl_ast_checker(cases: list[Case]) -> None:
    # ground truth: BFCL passes every scorable entry (including the 'variable' one) and ESM gives 1.0
    # except where the ground truth breaks its own schema
    checked: Counter[str] = Counter()
    for case in cases:
        verdict = ast_check(case.entry, case.truth)
        assert verdict["valid"], (case.entry.id, verdict["error"])
        assert _esm(case, case.truth).score == 1.0 or case.entry.id in SCHEMA_VIOLATING
        checked["truth"] += 1
        # mutations BFCL must reject whenever ESM is below 1
        for kind, mutated in _mutations(case).items():
            if kind not in ("drop_required", "add_unknown_key", "change_type", "rename_unknown"):
                continue
            if _esm(case, mutated).score < 1.0:
                assert not ast_check(case.entry, mutated)["valid"], (case.entry.id, kind)
                checked[kind] += 1
    assert checked == {
        "truth": 1256,
        "drop_required": 1233,
        "add_unknown_key": 1256,
        "change_type": 1254,
        "rename_unknown": 1256,
    }


def test_column_form_scores_like_call_objects(cases: list[Case]) -> None:
    # the stage reads the Candidate record's calls column (list<struct<name, arguments: JSON text>>)
    # and the stored JSON texts of reference and tools: same numbers as call objects scored directly
    import pyarrow as pa

    from ttpa_ray.esm.stage import score_table
    from ttpa_ray.records import CALLS

    rows, expected = [], []
    for case in cases[::4]:
        for mutated in [case.truth, *_mutations(case).values()]:
            objects = [{"name": c.name, "arguments": json.dumps(c.arguments)} for c in mutated]
            rows.append(
                {
                    "candidate": objects,
                    "reference": json.dumps(case.entry.ground_truth),
                    "tools": json.dumps(case.entry.tools),
                }
            )
            expected.append(score(objects, case.reference, case.index))
    assert len(rows) == 1979  # 314 entries x (truth + their mutations)
    stored = pa.list_(pa.struct([("name", pa.string()), ("arguments", pa.string())]))
    table = pa.table(
        {
            "candidate": pa.array([r["candidate"] for r in rows], stored).cast(CALLS),
            "reference": [r["reference"] for r in rows],
            "tools": [r["tools"] for r in rows],
            "reference_alternatives": [True] * len(rows),
        }
    )
    out = score_table(table)
    assert out.column("esm_score").to_pylist() == [e.score for e in expected]
    assert out.column("esm_errors").to_pylist() == [list(e.errors) for e in expected]
    assert [dict(c) for c in out.column("esm_components").to_pylist()] == [e.components for e in expected]
