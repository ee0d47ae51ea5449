"""A tiny, seeded Qwen2-architecture model with a tool-aware chat template, made locally in seconds.

No machine of this project can reach a model hub, so tests and the local default run on a model the
project makes itself: a byte-level BPE tokenizer trained on the tool schemas and call text the project
has, a Qwen-style chat template that renders ``tools`` and ``tool_calls``, and a randomly initialised
``Qwen2ForCausalLM`` (head_dim 64: vLLM's CPU attention has no kernel for head_dim 16).
The same seed gives byte-identical files. A real run names a hub id or a folder of real weights instead.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

from ttpa_ray.codec import ToolCall, render_hermes

# The special tokens of Qwen2.5's template, so prompts and tool calls tokenise as they would there.
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
END_OF_TEXT = "<|endoftext|>"
SPECIAL_TOKENS = [END_OF_TEXT, IM_START, IM_END]
# Added (not special) tokens: they survive decoding, as in Qwen2.5, so tool calls parse from text.
ADDED_TOKENS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]

DEFAULT_SYSTEM = "You are a helpful assistant that can use tools."

# Qwen2.5's tool template, plus {% generation %} markers so TRL can mask the loss to assistant turns,
# plus tool-call arguments given as a JSON string rendered verbatim (Arrow stores them as text).
CHAT_TEMPLATE = (
    "{%- macro render_arguments(arguments) -%}"
    "{%- if arguments is string -%}{{- arguments -}}{%- else -%}{{- arguments | tojson -}}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}"
    "{%- else %}{{- '" + DEFAULT_SYSTEM + "' }}{%- endif %}"
    "{{- '\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
    'within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, '
    '\\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n\' }}'
    "{%- else %}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM + "<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}"
    "{%- if message.content %}{{- message.content }}{%- endif %}"
    "{%- if message.tool_calls %}"
    "{%- for tool_call in message.tool_calls %}"
    "{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}"
    "{%- if not loop.first or message.content %}{{- '\\n' }}{%- endif %}"
    '{{- \'<tool_call>\\n{"name": "\' }}{{- tool_call.name }}{{- \'", "arguments": \' }}'
    "{{- render_arguments(tool_call.arguments) }}{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{%- endif %}"
    "{{- '<|im_end|>' }}"
    "{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if loop.index0 == 0 or messages[loop.index0 - 1].role != 'tool' %}"
    "{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' }}{{- message.content }}{{- '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Sentences in the register of tool-use dialogues, so questions and answers do not tokenise to bytes.
_DIALOGUE_TEXT = """\
I am planning a trip to Paris next Friday and need to know the weather forecast there.
Could you convert 250 US dollars to euros and tell me the exchange rate you used?
Please find a flight from Berlin to Madrid on 2025-06-14 for two adults, economy class.
What time is it in Tokyo when it is 9:30 in the morning in New York?
How many days are there between March 3 and April 17, and which weekday is the later date?
Book a hotel in Rome for three nights starting on the 12th with a budget of 120 per night.
The forecast for Paris on Friday is 18 degrees and light rain, so pack an umbrella.
I converted 250 USD at a rate of 0.92, which gives 230 EUR.
The cheapest flight leaves at 07:45 and costs 129 euros per person.
Based on the results of the tools, here is the answer to your question.
The user wants to know the total cost, the date, the time, the place and the people involved.
"""


def _bfcl_texts() -> Iterator[str]:
    """Function docs and questions shipped in bfcl_eval, if installed (pinned version: deterministic)."""
    try:
        import bfcl_eval
    except ImportError:
        return
    data = Path(bfcl_eval.__file__).parent / "data"
    for path in sorted((data / "multi_turn_func_doc").glob("*.json")):
        if path.stem.startswith(("memory", "web_search")):
            continue
        yield path.read_text(encoding="utf-8")
    for name in ("simple_python", "multiple", "parallel", "live_simple"):
        path = data / f"BFCL_v4_{name}.json"
        if path.exists():
            yield path.read_text(encoding="utf-8")
    for name in ("simple_python", "multiple", "parallel"):
        path = data / "possible_answer" / f"BFCL_v4_{name}.json"
        if path.exists():
            yield path.read_text(encoding="utf-8")


def _project_texts() -> Iterator[str]:
    """The project's own tool catalogue (schemas are derived from these docstrings) and configs."""
    root = Path(__file__).parent
    for path in sorted((root / "tools" / "builtin").rglob("*")):
        if path.is_file() and path.suffix in {".py", ".json", ".csv", ".jsonl"}:
            yield path.read_text(encoding="utf-8")


def training_corpus() -> list[str]:
    """The tokenizer's training text, in a fixed order so the tokenizer is reproducible."""
    texts = [_DIALOGUE_TEXT, *_project_texts(), *_bfcl_texts()]
    # Calls rendered exactly as the chat template emits them, so '{"name": "' and friends merge.
    calls = [
        render_hermes([ToolCall("get_weather", {"city": "Paris", "date": "2025-06-14"})]),
        render_hermes([ToolCall("convert_currency", {"amount": 250, "from": "USD", "to": "EUR"})]),
        '<|im_start|>user\n<tool_response>\n{"temperature": 18}\n</tool_response><|im_end|>',
    ]
    texts.extend(calls * 20)
    return texts


def train_tokenizer(vocab_size: int = 4096) -> object:
    """Train a byte-level BPE tokenizer on :func:`training_corpus` and wrap it for transformers."""
    # Single-threaded training: merges are then independent of thread scheduling.
    os.environ["RAYON_NUM_THREADS"] = "1"
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(training_corpus(), trainer=trainer)
    tokenizer.add_tokens(ADDED_TOKENS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=None,
        eos_token=IM_END,
        pad_token=END_OF_TEXT,
        unk_token=None,
        model_max_length=8192,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_tiny_model(
    out: Path | str,
    *,
    seed: int = 0,
    vocab_size: int = 4096,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 2,
    max_position_embeddings: int = 8192,
) -> Path:
    """Write tokenizer + seeded Qwen2 weights to ``out`` (save_pretrained layout) and return it.

    head_dim = hidden_size / num_heads must be at least 32 for vLLM's CPU attention kernels.
    """
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    out = Path(out)
    if hidden_size // num_heads < 32:
        raise ValueError(
            f"head_dim = hidden_size/num_heads = {hidden_size // num_heads}; vLLM's CPU build needs >= 32"
        )
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(vocab_size)
    tokenizer.save_pretrained(out)  # type: ignore[attr-defined]

    config = Qwen2Config(
        vocab_size=len(tokenizer),  # type: ignore[arg-type]
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=1,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.convert_tokens_to_ids(END_OF_TEXT),  # type: ignore[attr-defined]
        eos_token_id=tokenizer.convert_tokens_to_ids(IM_END),  # type: ignore[attr-defined]
        pad_token_id=tokenizer.convert_tokens_to_ids(END_OF_TEXT),  # type: ignore[attr-defined]
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )
    model.save_pretrained(out, safe_serialization=True)
    (out / "ttpa_tiny_model.json").write_text(
        json.dumps({"seed": seed, "maker": "ttpa_ray.tiny_model"}, indent=2) + "\n", encoding="utf-8"
    )
    return out


def folder_digest(folder: Path | str) -> str:
    """SHA-256 over every file's relative path and bytes: equal digests mean byte-identical folders."""
    folder = Path(folder)
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def ensure_tiny_model(out: Path | str, *, seed: int = 0) -> Path:
    """Make the tiny model in ``out`` unless a finished one is already there."""
    out = Path(out)
    if (out / "ttpa_tiny_model.json").exists() and (out / "config.json").exists():
        return out
    return make_tiny_model(out, seed=seed)
