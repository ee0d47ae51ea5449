"""Tests of the tool-call codec: round trips, the span map, canonical forms and malformed input."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ttpa_ray.codec import (
    FORMATS,
    ParseResult,
    RenderedCalls,
    Span,
    ToolCall,
    canonical,
    canonical_calls,
    dedupe,
    dedupe_indices,
    parse_any,
    parse_hermes,
    parse_json,
    parse_llama31,
    parse_openai,
    render,
    render_hermes,
    render_json,
    render_llama31,
    render_openai,
    render_with_spans,
    span_at,
    token_spans,
)

PROPS = settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

# --------------------------------------------------------------------------------------------------
# Strategies

# Realistic tool names: identifiers, dashes, dotted namespaces (BFCL's math.factorial).
names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_\-]{0,15}(\.[A-Za-z_][A-Za-z0-9_]{0,12}){0,2}", fullmatch=True)
# Characters that stress JSON escaping and tokenisation, mixed with arbitrary (non-surrogate) unicode.
tricky = st.sampled_from(
    ['"', "\\", "\n", "\t", "\r", "\x00", "\x1f", "\u2028", "😀", "東", "京", "é", ";", "}"]
)
texts = st.text(alphabet=st.one_of(st.characters(codec="utf-8"), tricky), max_size=12) | st.sampled_from(
    ["</tool_call>", "<tool_call>", '"}}', "; {", ""]
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**20), max_value=10**20),
    st.floats(allow_nan=False, allow_infinity=False),
    texts,
)
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(texts, children, max_size=4),
    max_leaves=12,
)
arguments = st.dictionaries(texts, json_values, max_size=5)
calls_st = st.builds(ToolCall, name=names, arguments=arguments)
call_lists = st.lists(calls_st, min_size=1, max_size=3)


def strict(calls: tuple[ToolCall, ...] | list[ToolCall]) -> list[str]:
    """Type- and order-exact form of calls: True != 1, 1 != 1.0, -0.0 != 0.0, key order matters."""
    return [json.dumps(call.to_dict(), ensure_ascii=False) for call in calls]


def _hermes_reference(calls: list[ToolCall]) -> str:
    """The Hermes text built straight from json.dumps, piece by piece as Qwen2.5's template does."""
    blocks = []
    for c in calls:
        args = json.dumps(c.arguments, ensure_ascii=False)
        blocks.append('<tool_call>\n{"name": "' + c.name + '", "arguments": ' + args + "}\n</tool_call>")
    return "\n".join(blocks)


def _get(value: Any, path: tuple[str | int, ...]) -> Any:
    for step in path:
        value = value[step]
    return value


def _count(value: Any) -> tuple[int, int]:
    """(dict entries, list items) in a JSON tree, at every depth."""
    entries = items = 0
    if isinstance(value, dict):
        entries += len(value)
        children = list(value.values())
    elif isinstance(value, list):
        items += len(value)
        children = value
    else:
        children = []
    for child in children:
        e, i = _count(child)
        entries, items = entries + e, items + i
    return entries, items


# --------------------------------------------------------------------------------------------------
# Round trips


@PROPS
@given(call_lists)
def test_hermes_round_trip(calls: list[ToolCall]) -> None:
    text = render_hermes(calls)
    assert text == _hermes_reference(calls)
    for result in (parse_hermes(text), parse_any(text)):
        assert result.ok, result.error
        assert strict(result.calls) == strict(calls)
        assert result.fmt == "hermes"


@PROPS
@given(call_lists)
def test_llama31_round_trip(calls: list[ToolCall]) -> None:
    text = render_llama31(calls)
    assert text == "; ".join(
        json.dumps({"name": c.name, "parameters": c.arguments}, ensure_ascii=False) for c in calls
    )
    for result in (
        parse_llama31(text),
        parse_any(text),
        parse_llama31("<|python_tag|>" + text + "<|eot_id|>"),
    ):
        assert result.ok, result.error
        assert strict(result.calls) == strict(calls)
    # Newline-separated calls (one per line) parse too.
    lines = "\n".join(render_llama31([c]) for c in calls)
    assert strict(parse_llama31(lines).calls) == strict(calls)


@PROPS
@given(call_lists)
def test_json_round_trip(calls: list[ToolCall]) -> None:
    text = render_json(calls)
    expected = [c.to_dict() for c in calls]
    assert text == json.dumps(expected[0] if len(calls) == 1 else expected, ensure_ascii=False)
    for result in (parse_json(text), parse_any(text), parse_any("```json\n" + text + "\n```")):
        assert result.ok, result.error
        assert strict(result.calls) == strict(calls)


@PROPS
@given(call_lists, st.none() | st.text(max_size=10))
def test_openai_round_trip(calls: list[ToolCall], content: str | None) -> None:
    message = render_openai(calls, content)
    assert message["role"] == "assistant"
    assert message["content"] == content
    assert [tc["id"] for tc in message["tool_calls"]] == [f"call_{i}" for i in range(len(calls))]
    for tc, call in zip(message["tool_calls"], calls, strict=True):
        assert tc["type"] == "function"
        assert tc["function"]["arguments"] == json.dumps(call.arguments, ensure_ascii=False)
    as_dicts = render_openai(calls, content, string_arguments=False)
    for obj in (message, message["tool_calls"], as_dicts, as_dicts["tool_calls"], json.dumps(message)):
        result = parse_openai(obj)
        assert result.ok, result.error
        assert strict(result.calls) == strict(calls)
    assert strict(parse_any(message).calls) == strict(calls)
    assert strict(parse_any([c.to_dict() for c in calls]).calls) == strict(calls)


# Qwen2.5-Instruct's chat template, the message loop verbatim (system/tools header left out).
QWEN25_LOOP = r"""{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- endif %}
{%- endfor %}"""  # noqa: E501


@FEW
@given(call_lists)
def test_hermes_is_what_qwen25_template_emits(calls: list[ToolCall]) -> None:
    from transformers.utils.chat_template_utils import _compile_jinja_template

    template = _compile_jinja_template(QWEN25_LOOP)
    message = render_openai(calls, string_arguments=False)
    rendered = template.render(messages=[message])
    assert rendered == "<|im_start|>assistant\n" + render_hermes(calls) + "<|im_end|>\n"
    with_content = template.render(messages=[render_openai(calls, "Let me check.", string_arguments=False)])
    assert with_content == "<|im_start|>assistant\nLet me check.\n" + render_hermes(calls) + "<|im_end|>\n"


@PROPS
@given(call_lists, st.data())
def test_truncated_render_never_raises_and_yields_a_prefix(
    calls: list[ToolCall], data: st.DataObject
) -> None:
    fmt = data.draw(st.sampled_from(["hermes", "llama31"]))
    text = render(calls, fmt)
    cut = data.draw(st.integers(min_value=0, max_value=len(text)))
    result = parse_any(text[:cut])
    assert isinstance(result, ParseResult)
    assert result.ok or result.error
    # Whatever parsed is a prefix of the real calls: truncation never invents a different call.
    assert strict(result.calls) == strict(calls)[: len(result.calls)]


@PROPS
@given(
    st.one_of(st.text(max_size=60), st.binary(max_size=30), json_values, st.lists(json_values, max_size=3))
)
def test_parse_any_never_raises(obj: Any) -> None:
    result = parse_any(obj)
    assert isinstance(result, ParseResult)
    assert result.calls if result.ok else result.error
    for parse in (parse_any, parse_hermes, parse_llama31, parse_json, parse_openai):
        outcome = parse(obj)
        assert isinstance(outcome, ParseResult)
        assert "internal parser error" not in (outcome.error or "")


# --------------------------------------------------------------------------------------------------
# Span map


def _check_spans(rendered: RenderedCalls, calls: list[ToolCall]) -> None:
    assert len(rendered.spans) == len(rendered.call_index)
    assert list(rendered.spans) == sorted(rendered.spans, key=lambda s: (s.start, -s.end))
    for span, index in zip(rendered.spans, rendered.call_index, strict=True):
        piece = rendered.text_of(span)
        call = calls[index]
        if span.kind == "name":
            assert span.path == ()
            assert piece == call.name
        elif span.kind == "key":
            key = span.path[-1]
            assert json.loads('"' + piece + '"') == key
            if json.dumps(key, ensure_ascii=False) == f'"{key}"':
                assert piece == key
            assert key in _get(call.arguments, span.path[:-1])
        else:
            assert span.kind == "value"
            value = _get(call.arguments, span.path)
            assert json.dumps(json.loads(piece), ensure_ascii=False) == json.dumps(value, ensure_ascii=False)
    for index, call in enumerate(calls):
        mine = [s for s, i in zip(rendered.spans, rendered.call_index, strict=True) if i == index]
        entries, items = _count(call.arguments)
        assert sum(s.kind == "name" for s in mine) == 1
        assert sum(s.kind == "key" for s in mine) == entries
        assert sum(s.kind == "value" for s in mine) == entries + items


@PROPS
@given(call_lists, st.sampled_from(FORMATS))
def test_render_with_spans_matches_text_and_values(calls: list[ToolCall], fmt: str) -> None:
    rendered = render_with_spans(calls, fmt)
    assert rendered.text == render(calls, fmt)
    assert rendered.text == {"hermes": render_hermes, "llama31": render_llama31, "json": render_json}[fmt](
        calls
    )
    _check_spans(rendered, calls)


def test_render_with_spans_example_and_span_at() -> None:
    call = ToolCall("search.flights", {"city": "Paris", "filters": [{"lo": 1.5, "hi": None}], "k": True})
    rendered = render_with_spans([call])
    text = rendered.text
    assert text == (
        '<tool_call>\n{"name": "search.flights", "arguments": '
        '{"city": "Paris", "filters": [{"lo": 1.5, "hi": null}], "k": true}}\n</tool_call>'
    )
    by_path = {(s.kind, s.path): rendered.text_of(s) for s in rendered.spans}
    assert by_path[("name", ())] == "search.flights"
    assert by_path[("key", ("city",))] == "city"
    assert by_path[("value", ("city",))] == '"Paris"'  # string values keep their quotes
    assert by_path[("value", ("filters",))] == '[{"lo": 1.5, "hi": null}]'
    assert by_path[("value", ("filters", 0))] == '{"lo": 1.5, "hi": null}'
    assert by_path[("key", ("filters", 0, "lo"))] == "lo"
    assert by_path[("value", ("filters", 0, "lo"))] == "1.5"
    assert by_path[("value", ("k",))] == "true"

    def at(sub: str, offset: int = 0) -> Span | None:
        return span_at(rendered, text.index(sub) + offset)

    assert at("search.flights", 3) == Span("name", text.index("search"), text.index("search") + 14, ())
    lo = at("1.5")
    assert lo is not None and lo.kind == "value" and lo.path == ("filters", 0, "lo")
    key = at('"hi"', 1)
    assert key is not None and key.kind == "key" and key.path == ("filters", 0, "hi")
    # The comma inside the inner object belongs to the innermost container value.
    comma = at(', "hi"')
    assert comma is not None and comma.path == ("filters", 0)
    assert span_at(rendered, 0) is None  # inside "<tool_call>"
    assert span_at(rendered, len(text) + 5) is None


def test_two_calls_get_their_own_call_index() -> None:
    calls = [ToolCall("a", {"x": 1}), ToolCall("b", {"y": [2]})]
    rendered = render_with_spans(calls, "llama31")
    assert rendered.text == '{"name": "a", "parameters": {"x": 1}}; {"name": "b", "parameters": {"y": [2]}}'
    owners = {rendered.text_of(s): i for s, i in zip(rendered.spans, rendered.call_index, strict=True)}
    assert owners == {"a": 0, "x": 0, "1": 0, "b": 1, "y": 1, "[2]": 1, "2": 1}


def test_render_with_spans_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="unknown tool-call format"):
        render_with_spans([ToolCall("f")], "xml")
    with pytest.raises(TypeError):
        render_with_spans([ToolCall("f", {"x": {1, 2}})])


def test_non_string_keys_render_like_json_dumps() -> None:
    call = ToolCall("f", {1: "a", 2.5: "b", False: "c", None: "d"})  # type: ignore[dict-item]
    rendered = render_with_spans([call], "json")
    assert rendered.text == json.dumps(call.to_dict(), ensure_ascii=False)
    assert [rendered.text_of(s) for s in rendered.spans if s.kind == "key"] == ["1", "2.5", "false", "null"]


# --------------------------------------------------------------------------------------------------
# token_spans


def _naive_token_spans(spans: list[Span], offsets: list[tuple[int, int]], base: int) -> list[list[int]]:
    return [
        [i for i, (a, b) in enumerate(offsets) if b > a and a < s.end + base and b > s.start + base]
        for s in spans
    ]


@PROPS
@given(
    st.lists(st.tuples(st.integers(0, 60), st.integers(0, 8)), max_size=30),
    st.lists(st.tuples(st.integers(0, 60), st.integers(0, 10)), max_size=8),
    st.integers(0, 5),
)
def test_token_spans_matches_the_overlap_definition(
    raw_offsets: list[tuple[int, int]], raw_spans: list[tuple[int, int]], base: int
) -> None:
    offsets = [(a, a + n) for a, n in raw_offsets]  # unsorted, overlapping and empty ranges included
    spans = [Span("value", s, s + n) for s, n in raw_spans]
    assert token_spans(spans, offsets, base=base) == _naive_token_spans(spans, offsets, base)


@pytest.fixture(scope="module")
def bpe_tokenizer() -> Any:
    """A small byte-level BPE (GPT-2 pre-tokenisation) trained on rendered calls, Qwen specials added."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus_calls = [
        ToolCall("get_weather", {"city": "Paris", "date": "2025-06-14"}),
        ToolCall("math.factorial", {"number": 12}),
        ToolCall("convert_currency", {"amount": 250, "from": "USD", "to": "EUR"}),
        ToolCall("search_hotels", {"city": "東京", "nights": 3, "tags": ["quiet", "pool"]}),
    ]
    corpus = [render_hermes([c]) for c in corpus_calls] * 20
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        special_tokens=["<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok)


@pytest.mark.parametrize(
    "call",
    [
        ToolCall("get_weather", {"city": "Paris", "date": "2025-06-14"}),
        ToolCall("math.factorial", {"number": 12}),
        ToolCall("unseen_tool.lookup", {"query": 'say "hi" 😀 東京', "nested": {"ids": [1, 2.5]}}),
    ],
)
def test_token_spans_with_a_real_tokenizer(bpe_tokenizer: Any, call: ToolCall) -> None:
    prefix = "<|im_start|>assistant\n"
    rendered = render_with_spans([call])
    full = prefix + rendered.text + "<|im_end|>"
    enc = bpe_tokenizer(full, return_offsets_mapping=True, add_special_tokens=False)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    assert bpe_tokenizer.decode(ids) == full
    per_span = token_spans(rendered.spans, offsets, base=len(prefix))
    for span, tokens in zip(rendered.spans, per_span, strict=True):
        assert tokens, f"no token for {span}"
        decoded = bpe_tokenizer.decode([ids[i] for i in tokens])
        if span.kind == "name":
            # Byte-level pre-tokenisation splits quotes from letters: the name tokens decode to the name.
            assert decoded == call.name
        else:
            assert rendered.text_of(span) in decoded
        # Every chosen token overlaps the span, and the tokens cover it.
        lo, hi = span.start + len(prefix), span.end + len(prefix)
        assert all(offsets[i][0] < hi and offsets[i][1] > lo for i in tokens)
        assert offsets[tokens[0]][0] <= lo and offsets[tokens[-1]][1] >= hi


# --------------------------------------------------------------------------------------------------
# Canonical forms and deduplication


def test_canonical_numbers_and_booleans() -> None:
    assert canonical(ToolCall("f", {"n": 1})) == canonical(ToolCall("f", {"n": 1.0}))
    assert canonical(ToolCall("f", {"n": [1, {"m": 2.0}]})) == canonical(
        ToolCall("f", {"n": [1.0, {"m": 2}]})
    )
    assert canonical(ToolCall("f", {"n": True})) != canonical(ToolCall("f", {"n": 1}))
    assert canonical(ToolCall("f", {"n": False})) != canonical(ToolCall("f", {"n": 0}))
    assert canonical(ToolCall("f", {"n": 1.5})) != canonical(ToolCall("f", {"n": 1}))
    assert canonical(ToolCall("f", {"a": 1, "b": 2})) == canonical(ToolCall("f", {"b": 2, "a": 1}))
    assert canonical(ToolCall("f", {"a": "東京"})) == '{"arguments":{"a":"東京"},"name":"f"}'


@PROPS
@given(call_lists)
def test_canonical_survives_every_round_trip(calls: list[ToolCall]) -> None:
    for fmt in FORMATS:
        parsed = parse_any(render(calls, fmt)).calls
        assert [canonical(c) for c in parsed] == [canonical(c) for c in calls]


def test_canonical_calls_and_dedupe() -> None:
    a, b = ToolCall("a", {"x": 1}), ToolCall("b", {"y": "z"})
    a_float = ToolCall("a", {"x": 1.0})
    assert canonical_calls([a, b]) == canonical_calls([b, a_float])
    assert canonical_calls([a]) != canonical_calls([a, a])
    assert json.loads(canonical_calls([a, b])) == [json.loads(canonical(c)) for c in (a, b)]
    assert dedupe([a, b, a_float, b]) == [a, b]
    assert dedupe([[a, b], [b, a_float], [a]]) == [[a, b], [a]]
    assert dedupe_indices([a, b, a_float, ToolCall("a", {"x": True})]) == [0, 1, 3]


# --------------------------------------------------------------------------------------------------
# Malformed input


MALFORMED: list[tuple[Any, str]] = [
    (None, "None"),
    ("", "empty input"),
    ("   \n", "empty input"),
    (42, "expected text"),
    ("The weather in Paris is sunny.", "no tool call found"),
    ('{"name": "get_weather", "arguments": {"city": "Par', "truncated JSON"),
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city"', "tool_call 0: truncated JSON"),
    (
        '<tool_call>\n{"name": "f", "arguments": [1, 2]}\n</tool_call>',
        "tool_call 0: arguments is not a JSON object",
    ),
    ('<tool_call>\n{"arguments": {}}\n</tool_call>', "tool_call 0: missing 'name'"),
    ('<tool_call>\n{"name": ["f"], "arguments": {}}\n</tool_call>', "'name' is array, not a string"),
    ('<tool_call>\n{"name": "  ", "arguments": {}}\n</tool_call>', "empty 'name'"),
    ('<tool_call>\n["f", {}]\n</tool_call>', "expected a JSON object, got array"),
    ("<tool_call>\n</tool_call>", "tool_call 0: empty <tool_call> block"),
    ("<tool_call>", "empty <tool_call> block"),
    ('<tool_call>\n{"name": "f", "arguments": {}}}\n</tool_call>', "unexpected text after the JSON object"),
    (
        '<tool_call>\n{"name": "f", "arguments": "{not json"}\n</tool_call>',
        "arguments string holds invalid JSON",
    ),
    (
        '<tool_call>\n{"name": "f", "arguments": "[1]"}\n</tool_call>',
        "arguments is not a JSON object (got array)",
    ),
    ('{"name": "f", "arguments": {"x": NaN}}', "NaN is not valid JSON"),
    ('{"name": "f", "arguments": {"x": 1e999}}', "overflows a float"),
    ('{"name": "f", "parameters": 3}', "parameters is not a JSON object (got integer)"),
    ('[{"name": "f", "arguments": {}}, "g"]', "tool_call 1: expected a JSON object, got string"),
    ("[1, 2", "truncated JSON"),
    ("[" * 5000 + "]" * 5000, "nested too deeply"),
    ('"just a string"', "expected a call object"),
    ({"role": "assistant", "content": "hi"}, "message has no tool_calls"),
    ({"role": "assistant", "tool_calls": "f()"}, "tool_calls is string, not a list"),
    ({"tool_calls": [{"function": "f"}]}, "'function' is string, not a JSON object"),
    ([], "no tool calls"),
]


@pytest.mark.parametrize(("obj", "reason"), MALFORMED)
def test_malformed_input_gives_an_error(obj: Any, reason: str) -> None:
    result = parse_any(obj)
    assert not result.ok
    assert result.error is not None and reason in result.error, result.error
    assert len(result.error) < 300


def test_errors_count_calls_and_keep_the_good_ones() -> None:
    good = render_hermes([ToolCall("a", {"x": 1}), ToolCall("b")])
    bad = '\n<tool_call>\n{"name": "c", "arguments": 7}\n</tool_call>'
    result = parse_hermes(good + bad)
    assert result.error == "tool_call 2: arguments is not a JSON object (got integer)"
    assert [c.name for c in result.calls] == ["a", "b"]
    llama = parse_llama31('{"name": "a", "parameters": {}}; {"name": "b", "parameters": {"x": ')
    assert llama.error is not None and llama.error.startswith("tool_call 1: truncated JSON")
    assert [c.name for c in llama.calls] == ["a"]


def test_lenient_shapes_are_accepted() -> None:
    # Surrounding prose, a missing closing tag at the end, "parameters" for "arguments", JSON-string
    # arguments, missing arguments, a raw newline inside a string, an end-of-turn token.
    text = (
        "Sure, calling it now.\n<tool_call>\n"
        '{"name": "a", "parameters": {"q": "x"}}\n</tool_call>\n'
        '<tool_call>{"name": "b", "arguments": "{\\"n\\": 2}"}</tool_call> ok\n'
        '<tool_call>{"name": "c"}\n<tool_call>{"name": "d", "arguments": {"s": "line1\nline2"}}<|im_end|>'
    )
    result = parse_any(text)
    assert result.ok, result.error
    assert strict(result.calls) == strict(
        [
            ToolCall("a", {"q": "x"}),
            ToolCall("b", {"n": 2}),
            ToolCall("c"),
            ToolCall("d", {"s": "line1\nline2"}),
        ]
    )
    assert parse_any(ToolCall("f", {"x": 1})).calls == (ToolCall("f", {"x": 1}),)
    assert parse_any(b'{"name": "f", "arguments": {}}').calls == (ToolCall("f"),)
    assert parse_any({"name": "f", "arguments": '{"x": 1}'}).calls == (ToolCall("f", {"x": 1}),)
    assert parse_llama31(
        '<|python_tag|>{"name": "f", "parameters": {}};\n{"name": "g", "parameters": {}};'
    ).ok
