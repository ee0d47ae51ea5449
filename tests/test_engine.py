"""A real vLLM CPU engine on the tiny model produces schema-constrained tool calls the codec parses."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from ttpa_ray.codec import parse_any, parse_hermes, render_hermes
from ttpa_ray.config import ModelConfig, VLLMConfig
from ttpa_ray.constraints import (
    arguments_schema,
    call_head,
    call_head_name,
    call_head_regex,
    tool_call_schema,
)
from ttpa_ray.engine import engine_kwargs
from ttpa_ray.models import ModelNotFoundError, resolve_model

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather of a city on a date.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 24},
                "date": {"type": "string", "maxLength": 10},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "date"],
        },
    },
}
CONVERT = {
    "type": "function",
    "function": {
        "name": "convert_currency",
        "description": "Convert an amount between currencies.",
        "parameters": {
            "type": "object",
            "properties": {"amount": {"type": "number"}, "to": {"type": "string", "enum": ["EUR", "USD"]}},
            "required": ["amount", "to"],
        },
    },
}


def test_tool_call_schema_one_branch_per_tool() -> None:
    schema = tool_call_schema([WEATHER, CONVERT])
    names = [b["properties"]["name"]["const"] for b in schema["anyOf"]]
    assert names == ["convert_currency", "get_weather"]  # name order, whatever order the tools came in
    assert schema == tool_call_schema([CONVERT, WEATHER])
    assert schema["anyOf"][1]["properties"]["arguments"]["required"] == ["city", "date"]
    with pytest.raises(ValueError, match="at least one tool"):
        tool_call_schema([])


def test_call_head_regex_admits_exactly_the_heads() -> None:
    names = ["get_weather", "math.factorial", "a+b(x)"]  # BFCL names carry dots
    pattern = re.compile(call_head_regex(names))
    for name in names:
        head = call_head(name)
        assert head == '{"name":"' + name + '","arguments":'
        assert pattern.fullmatch(head) and call_head_name(head, names) == name
    for text in ['{"name":"mathXfactorial","arguments":', '{"name": "get_weather", "arguments": ', ""]:
        assert not pattern.fullmatch(text) and call_head_name(text, names) is None
    with pytest.raises(ValueError, match="at least one"):
        call_head_regex([])


def test_engine_kwargs_cpu_build() -> None:
    kwargs = engine_kwargs("m", VLLMConfig(tensor_parallel_size=4), dtype="float32")
    assert kwargs["tensor_parallel_size"] == 1  # no GPU here: one process per replica
    assert kwargs["structured_outputs_config"]["disable_any_whitespace"] is True


def test_resolve_model_errors_name_the_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ModelNotFoundError, match="nope"):
        resolve_model(str(missing))
    assert not missing.exists()  # no tiny model is made where a folder was expected
    with pytest.raises(ModelNotFoundError, match="gpt2"):  # one name, not org/name: not a hub id by rule
        resolve_model("gpt2")
    # a hub id while no hub is reachable (HF_HUB_OFFLINE=1, set for the tests): the error says so
    with pytest.raises(ModelNotFoundError, match="HF_HUB_OFFLINE"):
        resolve_model("Qwen/Qwen2.5-7B-Instruct")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert resolve_model("Qwen/Qwen2.5-7B-Instruct") == "Qwen/Qwen2.5-7B-Instruct"
    with pytest.raises(ValueError, match=r"model\.teacher"):
        ModelConfig(teacher=str(missing))


@pytest.mark.slow
def test_constrained_tool_call_parses(vllm_engine) -> None:
    engine = vllm_engine
    tools = [WEATHER, CONVERT]
    prompt = engine.render([{"role": "user", "content": "What is the weather in Paris tomorrow?"}], tools)
    text = engine.tokenizer.decode(prompt)
    assert "<tools>" in text and '"get_weather"' in text and text.endswith("<|im_start|>assistant\n")

    params = engine.sampling_params(
        max_tokens=96, temperature=1.0, seed=7, json_schema=tool_call_schema(tools)
    )
    completions = engine.generate([prompt] * 4, params)
    assert len(completions) == 4
    for completion in completions:
        parsed = parse_any(completion.text)
        assert parsed.ok, (parsed.error, completion.text)
        (call,) = parsed.calls
        spec = {"get_weather": WEATHER, "convert_currency": CONVERT}[call.name]["function"]["parameters"]
        assert set(spec["required"]) <= set(call.arguments) <= set(spec["properties"])
        if call.name == "get_weather":  # declared bounds, decoded as patterns, hold
            assert len(call.arguments["city"]) <= 24 and len(call.arguments["date"]) <= 10
        # The same call rendered the Qwen way parses back to itself.
        assert parse_hermes(render_hermes([call])).calls == (call,)


@pytest.mark.slow
def test_two_step_call_continues_its_head(vllm_engine) -> None:
    """A head under the regex, then the arguments under the named tool's schema, continuing its tokens:
    the joined text is a valid call, laid out as a one-request call under tool_call_schema is."""
    engine = vllm_engine
    tools = {"get_weather": WEATHER, "convert_currency": CONVERT}
    prompt = engine.render(
        [{"role": "user", "content": "Weather in Paris, then 20 USD in EUR?"}], list(tools.values())
    )
    regex = call_head_regex(list(tools))
    heads = engine.generate(
        [prompt] * 4,
        [engine.sampling_params(max_tokens=48, temperature=1.0, seed=s, regex=regex) for s in range(4)],
    )
    for head in heads:
        name = call_head_name(head.text, list(tools))
        assert name is not None and head.finish_reason == "stop", head
        continued = prompt + head.token_ids[:-1]  # without the stop token that ended the head
        schema = arguments_schema(tools[name])
        (arguments,) = engine.generate(
            [continued], engine.sampling_params(max_tokens=96, temperature=1.0, seed=1, json_schema=schema)
        )
        parsed = parse_any(head.text + arguments.text + "}")
        assert parsed.ok, (parsed.error, head.text + arguments.text)
        (call,) = parsed.calls
        spec = tools[name]["function"]["parameters"]
        assert call.name == name and set(spec["required"]) <= set(call.arguments) <= set(spec["properties"])
        if name == "get_weather":  # declared bounds, decoded as patterns, hold
            assert len(call.arguments["city"]) <= 24 and len(call.arguments["date"]) <= 10
    (whole,) = engine.generate(
        [prompt],
        engine.sampling_params(
            max_tokens=96, temperature=1.0, seed=3, json_schema=tool_call_schema(list(tools.values()))
        ),
    )
    assert whole.text.startswith(call_head(parse_any(whole.text).calls[0].name))


def test_bounded_schema_adds_guards_only_where_missing() -> None:
    from ttpa_ray.constraints import MAX_NUMBER, bounded_schema

    schema = {
        "type": "object",
        "properties": {
            "n": {"type": "integer", "maximum": 5},
            "x": {"type": "number"},
            "tags": {"type": "array", "items": {"type": "string"}},
            "unit": {"type": "string", "enum": ["a", "b"]},
            "code": {"type": "string", "pattern": "^[A-Z]{3}$"},
            "who": {"type": "string", "minLength": 2, "maxLength": 10, "description": "a name"},
            "essay": {"type": "string", "maxLength": 500},
            "long": {"type": "string", "minLength": 100},
        },
    }
    out = bounded_schema(schema)
    assert out["properties"]["n"] == {"type": "integer", "maximum": 5, "minimum": -MAX_NUMBER}
    assert out["properties"]["x"]["maximum"] == MAX_NUMBER
    assert out["properties"]["tags"]["maxItems"] == 8
    # Length bounds up to 128 become a pattern (an automaton for xgrammar, cheap per token), with the
    # characters xgrammar allows in a bounded string; longer ones stay maxLength.
    chars = '[^"\\\\\\r\\n]'
    assert out["properties"]["tags"]["items"] == {"type": "string", "pattern": f"^{chars}{{0,64}}$"}
    assert out["properties"]["who"] == {
        "type": "string",
        "pattern": f"^{chars}{{2,10}}$",
        "description": "a name",
    }
    assert out["properties"]["essay"] == {"type": "string", "maxLength": 500}
    assert out["properties"]["long"] == {"type": "string", "minLength": 100, "maxLength": 164}
    assert out["properties"]["unit"] == schema["properties"]["unit"]
    assert out["properties"]["code"] == schema["properties"]["code"]  # pattern + length: xgrammar refuses
    pattern = re.compile(out["properties"]["who"]["pattern"])
    assert pattern.fullmatch("Ada L.") and not pattern.fullmatch("A") and not pattern.fullmatch('Ada "L"')
    assert not pattern.fullmatch("Ada\nL") and not pattern.fullmatch("A\\da")
    assert "minimum" not in schema["properties"]["x"]  # the input is not modified
    # a format the description states is the string's pattern
    dated = bounded_schema(
        {
            "type": "object",
            "properties": {
                "day": {"type": "string", "description": "Date in 2026 as YYYY-MM-DD."},
                "at": {"type": "string", "description": "Local time as YYYY-MM-DD HH:MM (24-hour clock)."},
                "alarm": {"type": "string", "description": "Time as HH:MM."},
            },
        }
    )["properties"]
    assert re.fullmatch(dated["day"]["pattern"], "2026-07-14") and not re.fullmatch(
        dated["day"]["pattern"], "07/14"
    )
    assert re.fullmatch(dated["at"]["pattern"], "2026-07-14 09:30")
    assert re.fullmatch(dated["alarm"]["pattern"], "09:30") and "maxLength" not in dated["alarm"]


def _dialogue_prompts(engine_tokenizer: object) -> list[str]:
    """Texts as reverse construction renders them: system with tools, turns that grow step by step."""
    messages: list[dict[str, object]] = [
        {"role": "system", "content": "You solve tasks with tools."},
        {"role": "user", "content": "Scenario: a trip to Paris (2026-12-01), budget 800 EUR."},
    ]
    texts = []
    for step in range(3):
        texts.append(
            engine_tokenizer.apply_chat_template(  # type: ignore[attr-defined]
                messages, tools=[WEATHER, CONVERT], add_generation_prompt=True, tokenize=False
            )
        )
        call = {"name": "get_weather", "arguments": {"city": "Paris", "date": f"2026-12-0{step + 1}"}}
        messages.append(
            {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": call}]}
        )
        messages.append({"role": "tool", "content": f'{{"temp_c": {12 + step}, "sky": "rain  \\n drizzle"}}'})
    return texts


def test_segment_encoder_matches_whole_encoding_and_reuses_turns(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    from ttpa_ray.engine import SegmentEncoder

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    encoder = SegmentEncoder(tokenizer, verify=0)  # no built-in check: this test is the check
    texts = _dialogue_prompts(tokenizer)
    for text in texts:
        assert encoder.encode(text) == tokenizer.encode(text, add_special_tokens=False)
    assert encoder.exact
    # The system turn (tool list) and every earlier turn were encoded once, then looked up.
    assert encoder.hits >= 2 * len(texts), (encoder.hits, encoder.misses)
    assert encoder.encode(texts[-1]) == tokenizer.encode(texts[-1], add_special_tokens=False)


def test_segment_encoder_falls_back_when_special_tokens_change_their_neighbours(tiny_model_dir: Path) -> None:
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    from ttpa_ray.engine import SegmentEncoder

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    # A special token that swallows the spaces around it: encoding between special tokens would keep them.
    tokenizer.add_special_tokens(
        {"additional_special_tokens": [AddedToken("<|sep|>", lstrip=True, rstrip=True)]}
    )
    text = "left side   <|sep|>   right side"
    whole = tokenizer.encode(text, add_special_tokens=False)
    encoder = SegmentEncoder(tokenizer, verify=4)
    assert encoder.encode(text) == whole
    assert not encoder.exact  # turned off for good: later prompts are encoded whole
    assert encoder.encode(text + " again") == tokenizer.encode(text + " again", add_special_tokens=False)


@pytest.mark.slow
def test_schema_checks_are_remembered_but_failures_are_not(vllm_engine) -> None:
    from vllm.exceptions import VLLMValidationError

    from ttpa_ray import engine as engine_module

    engine = vllm_engine
    prompt = engine.render([{"role": "user", "content": "Weather in Paris?"}], [WEATHER])
    schema = tool_call_schema([WEATHER])
    engine.generate(
        [prompt], engine.sampling_params(max_tokens=48, temperature=1.0, seed=1, json_schema=schema)
    )
    key = engine_module._constraint_key(
        engine.sampling_params(max_tokens=1, json_schema=schema).structured_outputs
    )
    assert key is not None and key in engine_module._VALIDATED_SCHEMAS
    regex = call_head_regex(["get_weather"])  # regexes too (vLLM starts a thread to check each one)
    engine.generate([prompt], engine.sampling_params(max_tokens=32, regex=regex))
    assert "regex\0" + regex in engine_module._VALIDATED_SCHEMAS
    # xgrammar cannot take multipleOf: vLLM's check refuses it every time, nothing is remembered.
    bad = {"type": "object", "properties": {"n": {"type": "integer", "multipleOf": 3}}, "required": ["n"]}
    for _ in range(2):
        with pytest.raises(VLLMValidationError):
            engine.generate([prompt], engine.sampling_params(max_tokens=8, json_schema=bad))
    assert "json\0" + json.dumps(bad, sort_keys=True) not in engine_module._VALIDATED_SCHEMAS
    with pytest.raises(VLLMValidationError):  # an unbalanced regex is refused, and not remembered
        engine.generate([prompt], engine.sampling_params(max_tokens=8, regex="(a|b"))
    assert "regex\0(a|b" not in engine_module._VALIDATED_SCHEMAS
    from vllm.v1.structured_output import backend_xgrammar

    installed = backend_xgrammar.validate_xgrammar_grammar
    assert engine_module.remember_schema_checks()  # idempotent: still installed, not wrapped twice
    assert backend_xgrammar.validate_xgrammar_grammar is installed
