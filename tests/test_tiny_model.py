"""The tiny model: reproducible to the byte, tool-aware template, loads in transformers and trains in TRL."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ttpa_ray.codec import ToolCall, render_hermes
from ttpa_ray.tiny_model import IM_END, folder_digest, make_tiny_model

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather of a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]
DIALOGUE = [
    {"role": "system", "content": "You can use tools."},
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
        ],
    },
    {"role": "tool", "content": '{"temperature": 18}'},
    {"role": "assistant", "content": "It is 18 degrees in Paris."},
]


def test_same_seed_same_bytes(tmp_path: Path, tiny_model_dir: Path) -> None:
    again = make_tiny_model(tmp_path / "again", seed=0)
    assert folder_digest(again) == folder_digest(tiny_model_dir)
    other = make_tiny_model(tmp_path / "other", seed=1)
    assert folder_digest(other) != folder_digest(tiny_model_dir)
    # Only the weights differ between seeds: the tokenizer is a function of the corpus alone.
    assert (other / "tokenizer.json").read_bytes() == (tiny_model_dir / "tokenizer.json").read_bytes()


def test_head_dim_guard(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="head_dim"):
        make_tiny_model(tmp_path / "x", hidden_size=64, num_heads=4)


def test_template_renders_tools_and_calls_as_qwen(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = tokenizer.apply_chat_template(DIALOGUE, tools=TOOLS, tokenize=False)
    assert json.dumps(TOOLS[0], ensure_ascii=False) in text  # tools listed one JSON per line
    call_text = render_hermes([ToolCall("get_weather", {"city": "Paris"})])
    assert "<|im_start|>assistant\n" + call_text + IM_END in text  # the codec renders what the template does
    assert '<tool_response>\n{"temperature": 18}\n</tool_response>' in text
    # Arguments stored as a JSON string (as Arrow holds them) render verbatim, not double-encoded.
    as_string = json.loads(json.dumps(DIALOGUE))
    as_string[2]["tool_calls"][0]["function"]["arguments"] = '{"city": "Paris"}'
    assert tokenizer.apply_chat_template(as_string, tools=TOOLS, tokenize=False) == text
    # Special and added tokens are single tokens.
    for token in ("<|im_start|>", IM_END, "<tool_call>", "</tool_call>"):
        assert len(tokenizer.encode(token, add_special_tokens=False)) == 1


def test_generation_mask_covers_assistant_turns_only(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    out = tokenizer.apply_chat_template(
        DIALOGUE, tools=TOOLS, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = out["input_ids"], out["assistant_masks"]
    assistant_text = tokenizer.decode([i for i, m in zip(ids, mask, strict=True) if m])
    assert "<tool_call>" in assistant_text and "It is 18 degrees" in assistant_text
    assert "Weather in Paris?" not in assistant_text and "temperature" not in assistant_text


def test_loads_in_transformers_and_trains_one_sft_step_in_trl(tiny_model_dir: Path, tmp_path: Path) -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert model.config.head_dim >= 32 if getattr(model.config, "head_dim", None) else True
    logits = model(torch.tensor([tokenizer.encode("hello", add_special_tokens=False)])).logits
    assert logits.shape[-1] == len(tokenizer)

    data = Dataset.from_list([{"messages": DIALOGUE, "tools": TOOLS}] * 4)
    args = SFTConfig(
        output_dir=str(tmp_path / "sft"),
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        assistant_only_loss=True,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    result = trainer.train()
    assert result.global_step == 2 and result.training_loss > 0
