"""ESM pure scorer: hand-computed cases for every component and edge case (docs/design.md section 4).

Default weights: score = (3*name + 3*required + 1*key + 2*value_type + 2*value) / 11.
Every expected number is worked out by hand in the comment beside it.
"""

from __future__ import annotations

import itertools
import json
import random

import pytest

from ttpa_ray.codec import ParseResult, ToolCall
from ttpa_ray.esm import (
    CATEGORIES,
    Alternatives,
    ESMWeights,
    ReferenceCall,
    SchemaError,
    best_matching,
    prepare_reference,
    prepare_tools,
    score,
)
from ttpa_ray.esm.stage import InvalidRecord, score_row

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather forecast.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "days": {"type": "integer"},
                    "units": {"type": "string", "enum": ["metric", "imperial"]},
                    "detailed": {"type": "boolean"},
                    "note": {"type": "string", "default": None},
                },
                "required": ["city"],
            },
        },
    },
    {
        # Bare spec with BFCL's type names (dict, float, tuple, any).
        "name": "book_flight",
        "parameters": {
            "type": "dict",
            "properties": {
                "from": {"type": "string"},
                "to": {"type": "string"},
                "price": {"type": "float"},
                "passengers": {"type": "array", "items": {"type": "dict"}},
                "options": {"type": "dict"},
                "window": {"type": "tuple", "items": {"type": "integer"}},
                "meta": {"type": "any"},
            },
            "required": ["from", "to"],
        },
    },
    {"type": "function", "function": {"name": "ping", "parameters": {"type": "object", "properties": {}}}},
]
INDEX = prepare_tools(TOOLS)


def call(name: str, **arguments: object) -> dict[str, object]:
    return {"name": name, "arguments": arguments}


def esm(candidate: object, reference: object, **kwargs: object) -> tuple[float, tuple[str, ...]]:
    result = score(candidate, reference, INDEX, **kwargs)  # type: ignore[arg-type]
    return result.score, result.errors


# ---------------------------------------------------------------------------------------- exact
def test_exact_match_scores_one_with_all_components_one() -> None:
    # every component 1 -> 11/11 = 1.0, no errors
    result = score(
        call("get_weather", city="Paris", days=3), call("get_weather", city="Paris", days=3), INDEX
    )
    assert result.score == 1.0
    assert result.components == {"name": 1.0, "required": 1.0, "key": 1.0, "value_type": 1.0, "value": 1.0}
    assert result.errors == ()


def test_arguments_as_json_text_and_key_order_do_not_matter() -> None:
    # '{"days": 3, "city": "Paris"}' parses to the same arguments -> 1.0
    candidate = {"name": "get_weather", "arguments": '{"days": 3, "city": "Paris"}'}
    assert esm(candidate, call("get_weather", city="Paris", days=3)) == (1.0, ())


# ---------------------------------------------------------------------------------------- values
def test_different_integer_value() -> None:
    # name 1, required 1, key 2/2, type 2/2, value (1 + 0)/2 = 0.5 -> (3+3+1+2+1)/11 = 10/11
    score, errors = esm(call("get_weather", city="Paris", days=3), call("get_weather", city="Paris", days=5))
    assert score == pytest.approx(10 / 11)
    assert errors == ("value_mismatch",)


def test_one_equals_one_point_zero_as_value_but_not_as_integer_type() -> None:
    # days=3.0 vs 3: value equal (1), but 3.0 is a number, not an integer: type 1/2
    # -> (3+3+1+2*0.5+2*1)/11 = 10/11
    result = score(
        call("get_weather", city="Paris", days=3.0), call("get_weather", city="Paris", days=3), INDEX
    )
    assert result.score == pytest.approx(10 / 11)
    assert result.components["value"] == 1.0
    assert result.errors == ("type_mismatch",)


def test_integer_counts_as_number_and_equals_float() -> None:
    # price declared float (number): 100 is a number and 100 == 100.0 -> 11/11 = 1.0
    score, errors = esm(
        call("book_flight", **{"from": "A", "to": "B", "price": 100}),
        call("book_flight", **{"from": "A", "to": "B", "price": 100.0}),
    )
    assert (score, errors) == (1.0, ())


def test_boolean_is_not_an_integer() -> None:
    # days=True vs 1: type mismatch (bool is not integer) and True != 1 as JSON values
    # type 1/2, value 1/2 -> (3+3+1+2*0.5+2*0.5)/11 = 9/11
    score, errors = esm(
        call("get_weather", city="Paris", days=True), call("get_weather", city="Paris", days=1)
    )
    assert score == pytest.approx(9 / 11)
    assert errors == ("type_mismatch", "value_mismatch")


def test_integer_is_not_a_boolean() -> None:
    # detailed=1 vs True: same as above in reverse -> 9/11
    score, errors = esm(
        call("get_weather", city="Paris", detailed=1), call("get_weather", city="Paris", detailed=True)
    )
    assert score == pytest.approx(9 / 11)
    assert errors == ("type_mismatch", "value_mismatch")


def test_string_case_only_gets_half() -> None:
    # "paris" vs "Paris": 0.5 (case-insensitive equal) + 0 (neither contains the other, case-sensitive)
    # value 0.5 -> (3+3+1+2+2*0.5)/11 = 10/11
    result = score(call("get_weather", city="paris"), call("get_weather", city="Paris"), INDEX)
    assert result.components["value"] == 0.5
    assert result.score == pytest.approx(10 / 11)
    assert result.errors == ("value_mismatch",)


def test_string_containing_the_other_gets_half() -> None:
    # "Paris, France" contains "Paris": 0 + 0.5 = 0.5 -> 10/11; and the other way round too
    assert esm(call("get_weather", city="Paris, France"), call("get_weather", city="Paris"))[
        0
    ] == pytest.approx(10 / 11)
    assert esm(call("get_weather", city="Paris"), call("get_weather", city="Paris, France"))[
        0
    ] == pytest.approx(10 / 11)


def test_string_differing_in_case_and_length_gets_nothing() -> None:
    # "paris, france" vs "Paris": not equal ignoring case, no containment (case-sensitive) -> value 0
    # -> (3+3+1+2+0)/11 = 9/11
    score, _ = esm(call("get_weather", city="paris, france"), call("get_weather", city="Paris"))
    assert score == pytest.approx(9 / 11)


def test_unicode_strings() -> None:
    # "STRASSE" vs "Straße": casefold() makes both "strasse" -> 0.5; no containment -> value 0.5 -> 10/11
    assert esm(call("get_weather", city="STRASSE"), call("get_weather", city="Straße"))[0] == pytest.approx(
        10 / 11
    )
    # "Zürich" vs "Zürich": exact -> 1.0; "München Hbf" contains "München" -> 0.5 -> 10/11
    assert esm(call("get_weather", city="Zürich"), call("get_weather", city="Zürich")) == (1.0, ())
    assert esm(call("get_weather", city="München Hbf"), call("get_weather", city="München"))[
        0
    ] == pytest.approx(10 / 11)
    # "東京" vs "東京都": containment -> 0.5 -> 10/11
    assert esm(call("get_weather", city="東京"), call("get_weather", city="東京都"))[0] == pytest.approx(
        10 / 11
    )


def test_nested_objects_compare_as_json() -> None:
    # options equal although 1 vs 1.0 deep inside and keys reordered -> 1.0
    ref = call("book_flight", **{"from": "A", "to": "B", "options": {"seat": "aisle", "bags": {"n": 1}}})
    same = call("book_flight", **{"to": "B", "from": "A", "options": {"bags": {"n": 1.0}, "seat": "aisle"}})
    assert esm(same, ref) == (1.0, ())
    # a nested string differing in case is simply unequal (partial credit is for top-level strings):
    # value (1 + 1 + 0)/3 -> (3+3+1+2+2*2/3)/11 = 31/33
    other = call("book_flight", **{"from": "A", "to": "B", "options": {"seat": "Aisle", "bags": {"n": 1}}})
    score, errors = esm(other, ref)
    assert score == pytest.approx(31 / 33)
    assert errors == ("value_mismatch",)


def test_nested_arrays_are_ordered_and_bool_is_not_number_inside() -> None:
    ref = call("book_flight", **{"from": "A", "to": "B", "passengers": [{"name": "Ann"}, {"name": "Bob"}]})
    # reversed list: not equal -> value 2/3 -> (3+3+1+2+2*2/3)/11 = 31/33
    swapped = call(
        "book_flight", **{"from": "A", "to": "B", "passengers": [{"name": "Bob"}, {"name": "Ann"}]}
    )
    assert esm(swapped, ref)[0] == pytest.approx(31 / 33)
    # window [1, 2.0] vs [1.0, 2]: equal element-wise -> 1.0; [true, 2] vs [1, 2]: not equal -> 31/33
    w_ref = call("book_flight", **{"from": "A", "to": "B", "window": [1.0, 2]})
    assert esm(call("book_flight", **{"from": "A", "to": "B", "window": [1, 2.0]}), w_ref) == (1.0, ())
    assert esm(call("book_flight", **{"from": "A", "to": "B", "window": [True, 2]}), w_ref)[
        0
    ] == pytest.approx(31 / 33)


# ---------------------------------------------------------------------------------- keys/required
def test_missing_required_is_checked_on_the_candidate() -> None:
    # candidate {days:3}, reference {city, days}: required 0/1; denominator max(1, 2) = 2
    # key 1/2, type 1/2, value (days equal) 1/2 -> (3+0+0.5+2*0.5+2*0.5)/11 = 5.5/11 = 0.5
    result = score(call("get_weather", days=3), call("get_weather", city="Paris", days=3), INDEX)
    assert result.score == pytest.approx(0.5)
    assert result.components["required"] == 0.0
    assert result.errors == ("missing_required",)


def test_required_ignores_what_the_reference_lacks() -> None:
    # the reference omits required 'city' but the candidate has it: required = 1 (candidate's args);
    # denominator max(2, 1) = 2: key 2/2, type 2/2, value (days) 1/2; 'city' is not in the reference
    # -> value_mismatch; score (3+3+1+2+2*0.5)/11 = 10/11
    result = score(call("get_weather", city="Paris", days=3), call("get_weather", days=3), INDEX)
    assert result.components["required"] == 1.0
    assert result.score == pytest.approx(10 / 11)


def test_unknown_key() -> None:
    # {city, color}: key 1/2, type 1/2 (no declared type for color), value 1/2 (color not in reference)
    # -> (3+3+0.5+1+1)/11 = 8.5/11
    score, errors = esm(call("get_weather", city="Paris", color="red"), call("get_weather", city="Paris"))
    assert score == pytest.approx(8.5 / 11)
    assert errors == ("unknown_key",)


def test_extra_known_key_and_missing_optional_reference_key() -> None:
    # extra declared key 'units' the reference lacks: key 2/2, type 2/2, value 1/2 -> 10/11
    assert esm(call("get_weather", city="Paris", units="metric"), call("get_weather", city="Paris")) == (
        pytest.approx(10 / 11),
        ("value_mismatch",),
    )
    # reference has 'days' (not required) that the candidate lacks: denominator 2 -> key .5, type .5,
    # value .5 -> (3+3+0.5+1+1)/11 = 8.5/11
    assert esm(call("get_weather", city="Paris"), call("get_weather", city="Paris", days=3)) == (
        pytest.approx(8.5 / 11),
        ("value_mismatch",),
    )


def test_null_accepted_where_the_default_is_null() -> None:
    # note declared string with "default": null -> null is a valid type; equal -> 1.0
    assert esm(
        call("get_weather", city="Paris", note=None), call("get_weather", city="Paris", note=None)
    ) == (1.0, ())
    # days (integer, no null default) = null: type 1/2, value 0 -> (3+3+1+1+1)/11 = 9/11
    score, errors = esm(
        call("get_weather", city="Paris", days=None), call("get_weather", city="Paris", days=2)
    )
    assert score == pytest.approx(9 / 11)
    assert errors == ("type_mismatch", "value_mismatch")


def test_any_and_tuple_types() -> None:
    # meta is 'any': a string, an object and a list are all the right type -> 1.0 each when equal
    for meta in ("x", {"k": [1]}, [1, "a"]):
        assert esm(
            call("book_flight", **{"from": "A", "to": "B", "meta": meta}),
            call("book_flight", **{"from": "A", "to": "B", "meta": meta}),
        ) == (1.0, ())
    # 'tuple' is an array: a string there is a type mismatch; type 2/3 and value 2/3
    # -> (3+3+1+2*2/3+2*2/3)/11 = (7+8/3)/11 = 29/33
    score, errors = esm(
        call("book_flight", **{"from": "A", "to": "B", "window": "1,2"}),
        call("book_flight", **{"from": "A", "to": "B", "window": [1, 2]}),
    )
    assert score == pytest.approx(29 / 33)
    assert errors == ("type_mismatch", "value_mismatch")


# ---------------------------------------------------------------------------------- edge cases
def test_empty_arguments_rule() -> None:
    # ping() vs ping(): names equal and both empty -> 1.0
    assert esm(call("ping"), call("ping")) == (1.0, ())
    # get_weather() vs get_weather(city): empty candidate, non-empty reference -> 0
    score, errors = esm(call("get_weather"), call("get_weather", city="Paris"))
    assert score == 0.0
    assert errors == ("missing_required",)
    # ping() vs get_weather(): names differ -> 0
    assert esm(call("ping"), call("get_weather")) == (0.0, ("wrong_tool",))


def test_empty_arguments_against_empty_reference_scores_one_even_if_schema_requires() -> None:
    # DESIGN rule: empty c and empty r with the same name -> 1; the missing required 'city' is still
    # reported (required component 0/1) so evaluation can count it.
    result = score(call("get_weather"), call("get_weather"), INDEX)
    assert result.score == 1.0
    assert result.components["required"] == 0.0
    assert result.errors == ("missing_required",)


def test_unknown_tool_scores_zero() -> None:
    # 'get_wether' is not in the tools -> 0 with unknown_tool, even with perfect arguments
    result = score(call("get_wether", city="Paris"), call("get_weather", city="Paris"), INDEX)
    assert result.score == 0.0
    assert result.errors == ("unknown_tool",)
    assert set(result.components.values()) == {0.0}


def test_wrong_known_tool() -> None:
    # book_flight(from, to) vs get_weather(city): name 0; book_flight's required from, to present: 1;
    # keys both declared: denominator max(2, 1) = 2, key 1, type 1; no shared key: value 0
    # -> (0+3+1+2+0)/11 = 6/11
    score, errors = esm(call("book_flight", **{"from": "A", "to": "B"}), call("get_weather", city="Paris"))
    assert score == pytest.approx(6 / 11)
    assert errors == ("wrong_tool", "value_mismatch")


@pytest.mark.parametrize(
    "candidate",
    [
        "I think the weather in Paris is nice.",  # prose, no call
        '{"name": "get_weather", "arguments": {"city": "Par',  # truncated JSON
        '<tool_call>{"name": "get_weather", "arguments": [1, 2]}</tool_call>',  # arguments not an object
        {"name": "get_weather", "arguments": "{not json"},  # arguments text not JSON
        {"arguments": {"city": "Paris"}},  # no name
        "",  # empty output
        ParseResult(error="truncated JSON"),
        42,
    ],
)
def test_non_calls_score_zero_with_parse(candidate: object) -> None:
    # anything that does not parse as a call -> 0 with category parse
    result = score(candidate, call("get_weather", city="Paris"), INDEX)
    assert (result.score, result.errors) == (0.0, ("parse",))


def test_raw_model_text_and_tool_call_objects() -> None:
    # hermes text, an OpenAI message and a ToolCall all parse to get_weather(city=Paris) -> 1.0
    ref = call("get_weather", city="Paris")
    hermes = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>'
    message = {
        "role": "assistant",
        "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}
        ],
    }
    for candidate in (hermes, message, ToolCall("get_weather", {"city": "Paris"}), json.dumps(ref)):
        assert esm(candidate, ref) == (1.0, ())


# ------------------------------------------------------------------------------- parallel calls
def test_parallel_calls_are_order_insensitive() -> None:
    # two exact calls in the reverse order -> matching pairs them crosswise -> (1+1)/2 = 1.0
    refs = [call("get_weather", city="Paris"), call("get_weather", city="Rome")]
    result = score(list(reversed(refs)), refs, INDEX)
    assert result.score == 1.0
    assert sorted(result.matches) == [(0, 1, 1.0), (1, 0, 1.0)]


def test_parallel_missing_and_extra_calls_score_zero() -> None:
    refs = [call("get_weather", city="Paris"), call("get_weather", city="Rome")]
    # one of two calls made: (1 + 0)/2 = 0.5; the reference call left unmatched -> wrong_tool
    assert esm([call("get_weather", city="Rome")], refs) == (0.5, ("wrong_tool",))
    # an extra ping: (1 + 1 + 0)/3 = 2/3
    score, errors = esm([*refs, call("ping")], refs)
    assert score == pytest.approx(2 / 3)
    assert errors == ("wrong_tool",)


def test_parallel_matching_is_optimal_not_greedy() -> None:
    # candidates c0 = (Paris, 3), c1 = (Paris, 5); references r0 = (Paris, 5), r1 = (Paris Nord, 3)
    # pair scores: c0-r0: value (1+0)/2 -> 10/11; c0-r1: value (0.5+1)/2 -> 10.5/11;
    #              c1-r0: 1.0;                    c1-r1: value (0.5+0)/2 -> 9.5/11
    # best total: c0-r1 + c1-r0 = 10.5/11 + 1 -> score (10.5/11 + 1)/2 = 21.5/22
    cands = [call("get_weather", city="Paris", days=3), call("get_weather", city="Paris", days=5)]
    refs = [call("get_weather", city="Paris", days=5), call("get_weather", city="Paris Nord", days=3)]
    result = score(cands, refs, INDEX)
    assert result.score == pytest.approx(21.5 / 22)
    assert sorted(result.matches) == [(0, 1, pytest.approx(10.5 / 11)), (1, 0, 1.0)]


def test_many_parallel_calls_are_matched_exactly() -> None:
    # 8 distinct calls shuffled: exact matching -> 8/8 = 1.0
    refs = [call("get_weather", city=f"City {i}", days=i) for i in range(8)]
    shuffled = refs[:]
    random.Random(0).shuffle(shuffled)
    assert esm(shuffled, refs) == (1.0, ())
    # keep 6 exact calls and add get_weather(city='x'): 6 pairs score 1; 'x' pairs with one of the two
    # references left, City k (days k): key 1/2, type 1/2, value 0 -> (3+3+0.5+1+0)/11 = 7.5/11;
    # the last reference is unmatched (0). Total (6 + 7.5/11)/8
    score, _ = esm([*shuffled[:6], call("get_weather", city="x")], refs)
    assert score == pytest.approx((6 + 7.5 / 11) / 8)


def test_matching_reaches_the_brute_force_optimum_on_random_matrices() -> None:
    # 300 random matrices, wide and tall: the matching is one-to-one and its total is the best of all
    # injections of the smaller side into the larger
    rng = random.Random(7)
    for _ in range(300):
        n = rng.randint(1, 6)
        m = rng.randint(1, 7)
        weights = [[rng.choice([0.0, 0.25, 0.5, rng.random(), 1.0]) for _ in range(m)] for _ in range(n)]
        if n <= m:
            best = max(
                sum(weights[i][j] for i, j in enumerate(cols)) for cols in itertools.permutations(range(m), n)
            )
        else:
            best = max(
                sum(weights[i][j] for j, i in enumerate(rows)) for rows in itertools.permutations(range(n), m)
            )
        matched = best_matching(weights)
        assert len(matched) == min(n, m)
        assert len({i for i, _ in matched}) == len({j for _, j in matched}) == len(matched)
        assert sum(weights[i][j] for i, j in matched) == pytest.approx(best)
    # greedy trap, tall matrix: rows 0,1 -> columns 1,0 (0.8 + 0.85 = 1.65 > 0.9 + 0.1)
    assert best_matching([[0.9, 0.8], [0.85, 0.1], [0.0, 0.0]]) == [(0, 1), (1, 0)]


# ---------------------------------------------------------------------------------- alternatives
def test_alternatives_any_value_counts_as_equal() -> None:
    # days may be 3 or 4: candidate 4 -> equal -> 1.0
    ref = ReferenceCall.of("get_weather", {"city": "Paris", "days": Alternatives((3, 4))})
    assert esm(call("get_weather", city="Paris", days=4), [ref]) == (1.0, ())
    # string credit is the best over alternatives: "paris" vs ("Paris", "Paris, France") -> max(0.5, 0) = 0.5
    # -> (3+3+1+2+2*0.5)/11 = 10/11
    ref = ReferenceCall.of("get_weather", {"city": Alternatives(("Paris", "Paris, France"))})
    assert esm(call("get_weather", city="paris"), [ref])[0] == pytest.approx(10 / 11)


def test_optional_alternative_may_be_left_out() -> None:
    # BFCL form: units ["metric", ""] may be left out; days [3] may not
    ref = prepare_reference(
        {"name": "get_weather", "arguments": {"city": ["Paris"], "units": ["metric", ""], "days": [3]}},
        alternatives=True,
    )
    # omitting units: it does not count in len(r) -> denominator 2, all equal -> 1.0
    assert esm(call("get_weather", city="Paris", days=3), ref) == (1.0, ())
    # omitting days (not optional): denominator 2, key 1/2, type 1/2, value 1/2 -> 8.5/11
    assert esm(call("get_weather", city="Paris"), ref) == (pytest.approx(8.5 / 11), ("value_mismatch",))
    # giving units with another value: value (1 + 1 + 0)/3 -> (3+3+1+2+2*2/3)/11 = 31/33
    assert esm(call("get_weather", city="Paris", days=3, units="imperial"), ref)[0] == pytest.approx(31 / 33)


def test_list_values_are_not_alternatives_unless_asked() -> None:
    # plain reference: window [1, 2] is one list value; the same list -> 1.0
    plain = call("book_flight", **{"from": "A", "to": "B", "window": [1, 2]})
    assert esm(call("book_flight", **{"from": "A", "to": "B", "window": [1, 2]}), plain) == (1.0, ())
    # candidate window=1 (one of the list's items) is the wrong type and value: type 2/3, value 2/3 -> 29/33
    assert esm(call("book_flight", **{"from": "A", "to": "B", "window": 1}), plain)[0] == pytest.approx(
        29 / 33
    )
    # with alternatives=True each value is a list of acceptable values: window [[1, 2], [2, 1]]
    alts = call("book_flight", **{"from": ["A"], "to": ["B", "b"], "window": [[1, 2], [2, 1]]})
    assert esm(
        call("book_flight", **{"from": "A", "to": "b", "window": [2, 1]}), alts, alternatives=True
    ) == (
        1.0,
        (),
    )
    # and without the flag the same object is a different reference: from "A" vs ["A"] -> unequal
    # value (0+0+0)/3, types fine -> (3+3+1+2+0)/11 = 9/11
    assert esm(call("book_flight", **{"from": "A", "to": "b", "window": [2, 1]}), alts)[0] == pytest.approx(
        9 / 11
    )


def test_bfcl_form_with_nested_alternatives() -> None:
    # {tool: {param: [alts]}}; a dict parameter carries alternatives one level down, as in BFCL
    bfcl = [
        {
            "book_flight": {
                "from": ["A"],
                "to": ["B"],
                "options": [{"seat": ["aisle", "window"], "bags": ["", 1]}],
            }
        }
    ]
    refs = prepare_reference(bfcl, alternatives=True, tools=INDEX)
    # seat 'window' is an alternative and bags may be left out -> 1.0
    assert esm(call("book_flight", **{"from": "A", "to": "B", "options": {"seat": "window"}}), refs) == (
        1.0,
        (),
    )
    # seat 'middle' is none of them: value (1+1+0)/3 -> 31/33
    assert esm(call("book_flight", **{"from": "A", "to": "B", "options": {"seat": "middle"}}), refs)[0] == (
        pytest.approx(31 / 33)
    )
    # first acceptable values, nested too ("" is skipped when a value follows it)
    assert refs[0].first_call(INDEX) == ToolCall(
        "book_flight", {"from": "A", "to": "B", "options": {"seat": "aisle", "bags": 1}}
    )


# ---------------------------------------------------------------------------------- weights/tools
def test_weights_are_configurable() -> None:
    # equal weights 1/1/1/1/1 on the 'different integer' case: (1+1+1+1+0.5)/5 = 0.9
    result = score(
        call("get_weather", city="Paris", days=3),
        call("get_weather", city="Paris", days=5),
        INDEX,
        ESMWeights(1, 1, 1, 1, 1),
    )
    assert result.score == pytest.approx(0.9)
    with pytest.raises(ValueError):
        ESMWeights(-1, 3, 1, 2, 2)


@pytest.mark.parametrize(
    ("properties", "message"),
    [
        ({"city": {"type": "str"}}, "tool 'w', parameter 'city': unknown type 'str'"),
        ({"city": {"description": "no type"}}, "tool 'w', parameter 'city': no type declared"),
        (
            {"city": {"type": "array", "items": {"type": "HashMap"}}},
            "tool 'w', parameter 'city': unknown type",
        ),
    ],
)
def test_schema_errors_name_tool_and_parameter_at_prepare_time(
    properties: dict[str, object], message: str
) -> None:
    with pytest.raises(SchemaError, match=message) as info:
        prepare_tools([{"name": "w", "parameters": {"type": "object", "properties": properties}}])
    assert (info.value.tool, info.value.parameter) == ("w", "city")


def test_other_schema_errors() -> None:
    with pytest.raises(SchemaError, match="declared twice"):
        prepare_tools([{"name": "w"}, {"name": "w"}])
    with pytest.raises(SchemaError, match="not in 'properties'"):
        prepare_tools([{"name": "w", "parameters": {"type": "object", "properties": {}, "required": ["x"]}}])
    with pytest.raises(SchemaError, match="not valid JSON"):
        prepare_tools("[{")
    # anyOf / enum-only parameters are typed by their parts: [1, "a"] -> integer or string
    index = prepare_tools(
        [
            {
                "name": "w",
                "parameters": {"properties": {"x": {"anyOf": [{"type": "integer"}, {"enum": ["a"]}]}}},
            }
        ]
    )
    assert score(call("w", x="a"), call("w", x="a"), index).score == 1.0
    assert score(call("w", x=True), call("w", x=1), index).errors == ("type_mismatch", "value_mismatch")


def test_score_row_reasons_for_malformed_rows() -> None:
    tools_text = json.dumps(TOOLS)
    ref_text = json.dumps(call("get_weather", city="Paris"))
    assert (
        score_row('{"name": "get_weather", "arguments": {"city": "Paris"}}', ref_text, tools_text).score
        == 1.0
    )
    cases = [
        (None, ref_text, tools_text, "missing_value"),
        ("x", ref_text, None, "missing_value"),
        ("x", ref_text, "not json", "invalid_tools"),
        (
            "x",
            ref_text,
            '[{"name": "w", "parameters": {"properties": {"a": {"type": "str"}}}}]',
            "invalid_tools",
        ),
        ("x", '{"arguments": {}}', tools_text, "invalid_reference"),
        ("x", "[1, 2]", tools_text, "invalid_reference"),
        ("x", "{", tools_text, "invalid_reference"),
    ]
    for candidate, reference, tools, reason in cases:
        with pytest.raises(InvalidRecord) as info:
            score_row(candidate, reference, tools)
        assert info.value.reason == reason
    assert set(CATEGORIES) == {
        "parse",
        "unknown_tool",
        "wrong_tool",
        "missing_required",
        "unknown_key",
        "type_mismatch",
        "value_mismatch",
    }
