"""A real vLLM CPU engine on the tiny model produces schema-constrained tool calls the codec parses."""

from __future__ import annotations

from pathlib import Path

import pytest

from ttpa_ray.codec import parse_any, parse_hermes, render_hermes
from ttpa_ray.config import ModelConfig, VLLMConfig
from ttpa_ray.engine import ModelNotFoundError, engine_kwargs, resolve_model, tool_call_schema

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
    assert names == ["get_weather", "convert_currency"]
    assert schema["anyOf"][0]["properties"]["arguments"]["required"] == ["city", "date"]
    with pytest.raises(ValueError, match="at least one tool"):
        tool_call_schema([])


def test_engine_kwargs_cpu_build() -> None:
    kwargs = engine_kwargs("m", VLLMConfig(tensor_parallel_size=4), dtype="float32")
    assert kwargs["tensor_parallel_size"] == 1  # no GPU here: one process per replica
    assert kwargs["structured_outputs_config"]["disable_any_whitespace"] is True


def test_resolve_model_errors_name_the_folder(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ModelNotFoundError, match="nope"):
        resolve_model(str(missing), ModelConfig(make_tiny_if_missing=False))
    assert resolve_model("Qwen/Qwen2.5-7B-Instruct", ModelConfig()) == "Qwen/Qwen2.5-7B-Instruct"


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
        # The same call rendered the Qwen way parses back to itself.
        assert parse_hermes(render_hermes([call])).calls == (call,)


def test_bounded_schema_adds_guards_only_where_missing() -> None:
    from ttpa_ray.engine import MAX_NUMBER, bounded_schema

    schema = {
        "type": "object",
        "properties": {
            "n": {"type": "integer", "maximum": 5},
            "x": {"type": "number"},
            "tags": {"type": "array", "items": {"type": "string"}},
            "unit": {"type": "string", "enum": ["a", "b"]},
        },
    }
    out = bounded_schema(schema)
    assert out["properties"]["n"] == {"type": "integer", "maximum": 5, "minimum": -MAX_NUMBER}
    assert out["properties"]["x"]["maximum"] == MAX_NUMBER
    assert out["properties"]["tags"]["maxItems"] == 8
    assert out["properties"]["tags"]["items"]["maxLength"] == 64
    assert "maxLength" not in out["properties"]["unit"]
    assert "minimum" not in schema["properties"]["x"]  # the input is not modified
