"""Embedded models: SmolLM2-135M-Instruct converted from its wheel, a tool template, dtype, SFT masks."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from ttpa_ray.codec import ToolCall, parse_hermes, render_hermes
from ttpa_ray.models import (
    SMOLLM2,
    STAMP,
    check_model,
    hermes_template,
    is_hub_id,
    prepare_smollm2,
    renders_tools,
    resolve_dtype,
)
from ttpa_ray.train.data import assistant_token_mask

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather of a city on a day.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "date": {"type": "string"}},
                "required": ["city", "date"],
            },
        },
    }
]
CALL = ToolCall("get_weather", {"city": "Paris", "date": "2026-07-14"})
DIALOGUE = [
    {"role": "system", "content": "You can use tools."},
    {"role": "user", "content": "What was the weather in Paris on 14 July 2026?"},
    {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": CALL.to_dict()}]},
    {"role": "tool", "content": '{"high": 25.3}', "tool_call_id": "call_0"},
    {"role": "assistant", "content": "It reached 25.3 degrees."},
]


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The converted SmolLM2 folder (made by `make setup`; converted here if it is missing)."""
    return prepare_smollm2()


def test_smollm2_is_converted_once_with_its_digest_recorded(smollm2_dir: Path) -> None:
    stamp = json.loads((smollm2_dir / STAMP).read_text())
    assert stamp["gguf_sha256"] == SMOLLM2["gguf_sha256"] and stamp["tool_template_installed"] is True
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (30, 576, 49152)
    assert config["dtype"] == "bfloat16"
    started = time.perf_counter()
    assert prepare_smollm2(smollm2_dir) == smollm2_dir  # the second call only reads the stamp
    assert time.perf_counter() - started < 1.0


def test_smollm2_template_renders_tools_and_a_hermes_call(smollm2_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    assert renders_tools(tokenizer) and tokenizer.chat_template == hermes_template()
    text = tokenizer.apply_chat_template(DIALOGUE, tools=TOOLS, tokenize=False)
    assert "<tools>\n" + json.dumps(TOOLS[0], ensure_ascii=False) + "\n</tools>" in text
    call_text = render_hermes([CALL])
    assert "<|im_start|>assistant\n" + call_text + "<|im_end|>" in text
    assert parse_hermes(call_text).calls == (CALL,)
    assert '<tool_response>\n{"high": 25.3}\n</tool_response>' in text
    assert tokenizer.eos_token == "<|im_end|>"  # the model's own stop token ends an assistant turn


def test_assistant_mask_without_generation_markers(smollm2_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    assert "{%- generation" not in tokenizer.chat_template
    ids, mask = assistant_token_mask(tokenizer, DIALOGUE, TOOLS)
    assert ids == list(
        tokenizer.apply_chat_template(DIALOGUE, tools=TOOLS, tokenize=True, return_dict=True)["input_ids"]
    )
    trained = tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if m])
    assert trained == render_hermes([CALL]) + "<|im_end|>" + "It reached 25.3 degrees.<|im_end|>"


def test_assistant_mask_matches_generation_markers_of_the_tiny_template(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids, mask = assistant_token_mask(tokenizer, DIALOGUE, TOOLS)
    marked = tokenizer.apply_chat_template(
        DIALOGUE, tools=TOOLS, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    assert ids == list(marked["input_ids"]) and mask == list(marked["assistant_masks"])


def test_model_names_follow_one_rule(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert is_hub_id("Qwen/Qwen2.5-7B-Instruct")
    for not_hub in ("./models/x", "/abs/path", "gpt2", "a/b/c", "~/m", "s3://bucket/x"):
        assert not is_hub_id(not_hub), not_hub
    check_model("tiny")
    check_model("smollm2-135m-instruct")
    check_model("Qwen/Qwen2.5-7B-Instruct")
    with pytest.raises(ValueError, match=r"model\.teacher.*modles"):
        check_model("./modles/tny", "model.teacher")
    monkeypatch.chdir(tmp_path)
    check_model("models/tny")  # org/name: a hub id by rule...
    (tmp_path / "models").mkdir()
    with pytest.raises(ValueError, match="models/tny"):  # ...unless models/ is a folder here: a typo
        check_model("models/tny")
    assert resolve_dtype("float16") == "float16"
    assert resolve_dtype("auto") in {"bfloat16", "float32"}


@pytest.mark.slow
def test_smollm2_loads_and_reads_its_rendered_tool_call(smollm2_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.bfloat16)
    ids, mask = assistant_token_mask(tokenizer, DIALOGUE, TOOLS)
    inputs = torch.tensor([ids])
    labels = torch.where(torch.tensor([mask]) == 1, inputs, torch.tensor(-100))
    with torch.no_grad():
        loss = model(input_ids=inputs, labels=labels).loss.float().item()
    # a real language model reads its own template: far below the ~10.8 nats of a uniform guess
    assert 0.0 < loss < 6.0


def test_console_and_log_keeps_process_output_off_the_terminal(tmp_path: Path) -> None:
    """Whatever the process (or a child, as Ray's workers and vLLM are) writes to fds 1 and 2 goes to the
    log; the console's bars and lines go to the terminal, here a pipe."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(
        f"""
        import os, subprocess, sys
        from pathlib import Path
        from ttpa_ray.progress import StageBar, console_and_log
        with console_and_log(Path({str(tmp_path / "run.log")!r})) as console:
            print("from python stdout")
            os.write(2, b"Traceback (most recent call last): from fd 2\\n")
            subprocess.run([sys.executable, "-c", "print('from a child process')"], check=True)
            with StageBar(console, "stage", 4) as bar:
                bar.update(4, detail="all done")
            console.print("summary line")
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    log = (tmp_path / "run.log").read_text()
    assert "from python stdout" in log and "from fd 2" in log and "from a child process" in log
    assert "Traceback" not in done.stdout + done.stderr and "from" not in done.stdout
    assert "summary line" in done.stdout and "4/4" in done.stdout and "all done" in done.stdout
