"""Training inputs: checks before training, and the tables TRL's trainers read.

Every input row ends either in the training table or as a :class:`RejectedRow` with a reason
(``invalid_record``, ``empty_chosen``, ``empty_rejected``, ``chosen_equals_rejected``, ``too_long``,
``no_messages``, ``invalid_conversation``, ``no_assistant_turn``), so a bad row never reaches the
trainer and never crashes an epoch. The training tables keep TRL's conversational formats
(``prompt``/``chosen``/``rejected`` or ``messages``, plus a per-row ``tools``) as Arrow JSON columns,
which ``datasets`` decodes to dicts, and a ``sample_index`` column so that the data order of a run
can be recorded.

:func:`bfcl_preference_pairs` builds honest pairs from BFCL ground truth (chosen = the ground-truth
call, rejected = a systematically mutated call) for tests and the benchmark.
"""

from __future__ import annotations

import functools
import hashlib
import random
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ttpa_ray.codec import ToolCall
from ttpa_ray.records import (
    Dialogue,
    Message,
    PreferencePair,
    RecordError,
    RejectedRow,
    ToolSpec,
    batch_from_rows,
    conversation_problem,
    reject,
)

STAGE_NAME = "train"
PAIR_COLUMNS = ("sample_index", "pair_id", "prompt", "chosen", "rejected", "tools")
REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")


@dataclass
class CheckedData:
    """The rows that passed the checks (as a TRL-ready Arrow table) and those that did not."""

    table: pa.Table
    rejected: list[RejectedRow] = field(default_factory=list)

    @property
    def num_rows(self) -> int:
        """Rows kept for training."""
        return int(self.table.num_rows)

    def reject_counts(self) -> dict[str, int]:
        """Rejected rows per reason."""
        return dict(Counter(r.reason for r in self.rejected))

    def summary(self) -> str:
        """One line for the console: kept, rejected and why."""
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.reject_counts().items())) or "none"
        return f"{self.num_rows} rows kept, {len(self.rejected)} rejected ({reasons})"


TokenCounter = Callable[[Sequence[Mapping[str, Any]], list[dict[str, Any]] | None], int]


def chat_token_counter(tokenizer: Any) -> TokenCounter:
    """Count the tokens of messages rendered by the tokenizer's chat template, as TRL will tokenise them."""

    def count(messages: Sequence[Mapping[str, Any]], tools: list[dict[str, Any]] | None) -> int:
        ids = tokenizer.apply_chat_template(list(messages), tools=tools or None, tokenize=True)
        if isinstance(ids, Mapping):  # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
        return len(ids)

    return count


def assistant_token_mask(
    tokenizer: Any, messages: Sequence[Mapping[str, Any]], tools: list[dict[str, Any]] | None
) -> tuple[list[int], list[int]]:
    """Token ids of a rendered conversation, and 1 for each token that an assistant turn wrote.

    Each assistant turn is what the template adds between the conversation up to it (with the generation
    prompt, as at inference) and the conversation through it, so any template works, with or without
    ``{% generation %}`` markers (real ones such as Qwen2.5's or SmolLM2's have none). A template whose
    renderings are not prefixes of each other raises ValueError.
    """

    def render(part: Sequence[Mapping[str, Any]], prompt: bool) -> str:
        text = tokenizer.apply_chat_template(
            list(part), tools=tools or None, tokenize=False, add_generation_prompt=prompt
        )
        return str(text)

    full = render(messages, False)
    spans = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        before, through = render(messages[:i], True), render(messages[: i + 1], False)
        if not (through.startswith(before) and full.startswith(through)):
            raise ValueError(f"the chat template does not render turn {i} as a prefix of the conversation")
        # the line break a template puts after the turn's end token belongs to no one
        spans.append((len(before), len(through.rstrip())))
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(lo <= start < hi for lo, hi in spans)) for start, _ in encoded["offset_mapping"]]
    return list(encoded["input_ids"]), mask


def _message_is_empty(message: Message) -> bool:
    return not (message.content or "").strip() and not message.tool_calls


def _row_id(row: Any, key: str, index: int) -> str:
    value = row.get(key) if isinstance(row, Mapping) else None
    return value if isinstance(value, str) and value else f"row-{index}"


def check_pairs(
    rows: Iterable[Mapping[str, Any]],
    count_tokens: TokenCounter,
    max_length: int,
    *,
    ref_columns: bool = False,
) -> CheckedData:
    """Validate preference-pair rows; the valid ones become the DPO table, the rest RejectedRows.

    The table has the reference log-prob columns when every kept row has them, or always with
    ``ref_columns`` (null where a row has none: a batch of a larger table, decided on the whole)."""
    kept: list[dict[str, Any]] = []
    rejected: list[RejectedRow] = []
    with_ref: list[bool] = []
    for index, row in enumerate(rows):
        pair_id = _row_id(row, "pair_id", index)
        try:
            pair = PreferencePair.from_row(row)
        except RecordError as exc:
            rejected.append(reject(pair_id, STAGE_NAME, "invalid_record", str(exc), dict(row)))
            continue
        problem = _pair_problem(pair, count_tokens, max_length)
        if problem is not None:
            rejected.append(reject(pair.pair_id, STAGE_NAME, problem[0], problem[1], dict(row)))
            continue
        full = pair.to_row()
        kept.append({name: full[name] for name in PAIR_COLUMNS[1:]} | {"sample_index": len(kept)})
        with_ref.append(pair.ref_chosen_logps is not None and pair.ref_rejected_logps is not None)
        kept[-1].update(ref_chosen_logps=pair.ref_chosen_logps, ref_rejected_logps=pair.ref_rejected_logps)
    # Reference log-probs are used only when every kept row has them (TRL cannot batch nulls).
    use_ref = ref_columns or (bool(with_ref) and all(with_ref))
    return CheckedData(_pairs_table(kept, use_ref), rejected)


def _pair_problem(
    pair: PreferencePair, count_tokens: TokenCounter, max_length: int
) -> tuple[str, str] | None:
    if not pair.prompt:
        return "invalid_record", "prompt has no messages"
    if not pair.chosen or all(_message_is_empty(m) for m in pair.chosen):
        return "empty_chosen", "chosen has no content and no tool call"
    if not pair.rejected or all(_message_is_empty(m) for m in pair.rejected):
        return "empty_rejected", "rejected has no content and no tool call"
    if [m.to_openai() for m in pair.chosen] == [m.to_openai() for m in pair.rejected]:
        return "chosen_equals_rejected", "chosen and rejected are identical: no preference to learn"
    tools = [t.to_openai() for t in pair.tools]
    prompt = [m.to_openai() for m in pair.prompt]
    longest = max(
        count_tokens(prompt + [m.to_openai() for m in pair.chosen], tools),
        count_tokens(prompt + [m.to_openai() for m in pair.rejected], tools),
    )
    if longest > max_length:
        return "too_long", f"{longest} tokens > train max_length {max_length}"
    return None


def _pairs_table(rows: list[dict[str, Any]], with_ref: bool) -> pa.Table:
    names = [*PAIR_COLUMNS[1:], *(REF_COLUMNS if with_ref else ())]
    return batch_from_rows(rows, _trainer_schema(PreferencePair.SCHEMA, names))


def _trainer_schema(record: pa.Schema, names: Sequence[str]) -> pa.Schema:
    """The trainer's input table: the row's index in the data, then these columns of a record."""
    return pa.schema([pa.field("sample_index", pa.int64()), *(record.field(n) for n in names)])


def check_dialogues(
    rows: Iterable[Mapping[str, Any]], count_tokens: TokenCounter, max_length: int
) -> CheckedData:
    """Validate dialogue rows for SFT; the valid ones become a ``messages``/``tools`` table."""
    kept: list[dict[str, Any]] = []
    rejected: list[RejectedRow] = []
    for index, row in enumerate(rows):
        dialogue_id = _row_id(row, "dialogue_id", index)
        try:
            dialogue = Dialogue.from_row(row)
        except RecordError as exc:
            rejected.append(reject(dialogue_id, STAGE_NAME, "invalid_record", str(exc), dict(row)))
            continue
        if not dialogue.messages:
            rejected.append(reject(dialogue_id, STAGE_NAME, "no_messages", "dialogue is empty", dict(row)))
            continue
        problem = conversation_problem(dialogue.messages)
        if problem is not None:
            rejected.append(reject(dialogue_id, STAGE_NAME, "invalid_conversation", problem, dict(row)))
            continue
        if not any(m.role == "assistant" and not _message_is_empty(m) for m in dialogue.messages):
            detail = "nothing to learn: no assistant turn"
            rejected.append(reject(dialogue_id, STAGE_NAME, "no_assistant_turn", detail, dict(row)))
            continue
        messages = [m.to_openai() for m in dialogue.messages]
        tools = [t.to_openai() for t in dialogue.tools]
        length = count_tokens(messages, tools)
        if length > max_length:
            detail = f"{length} tokens > train max_length {max_length}"
            rejected.append(reject(dialogue_id, STAGE_NAME, "too_long", detail, dict(row)))
            continue
        full = dialogue.to_row()
        kept.append(
            {
                "sample_index": len(kept),
                "dialogue_id": dialogue.dialogue_id,
                "messages": full["messages"],
                "tools": full["tools"],
            }
        )
    schema = _trainer_schema(Dialogue.SCHEMA, ["dialogue_id", "messages", "tools"])
    return CheckedData(batch_from_rows(kept, schema), rejected)


def input_files(path: str | Path, record: type | None = None) -> list[Path]:
    """The Parquet file, or the Parquet files of a directory that hold ``record``.

    A stage's folder holds several records (the pairs stage writes pairs, scored candidates and
    rejected turns; reverse shards write dialogues beside rejected seeds): in a directory, a file
    whose schema names another record type is skipped, and so is any ``rejected`` file or folder.
    Files without the project's metadata (data from elsewhere) are read as they are.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"training input {path} does not exist: run the stage that writes it first")
    if path.is_file():
        return [path]
    wanted = record.SCHEMA.metadata.get(b"ttpa.record") if record is not None else None  # type: ignore[attr-defined]
    files = []
    for file in sorted(path.rglob("*.parquet")):
        found = (pq.read_schema(file).metadata or {}).get(b"ttpa.record")
        rejected = any("rejected" in part for part in file.relative_to(path).parts)
        if rejected or (wanted is not None and found is not None and found != wanted):
            continue
        files.append(file)
    if not files:
        raise FileNotFoundError(f"training input {path} holds no Parquet files of the right record")
    return files


def trainer_schema(stage: str) -> pa.Schema:
    """The columns of a stage's training table (DPO's with the reference log-prob columns)."""
    if stage == "dpo":
        return _trainer_schema(PreferencePair.SCHEMA, [*PAIR_COLUMNS[1:], *REF_COLUMNS])
    return _trainer_schema(Dialogue.SCHEMA, ["dialogue_id", "messages", "tools"])


@functools.cache
def _token_counter(model: str) -> TokenCounter:
    from transformers import AutoTokenizer

    from ttpa_ray.store import local_copy

    return chat_token_counter(AutoTokenizer.from_pretrained(local_copy(model)))


def check_batch(batch: pa.Table, *, stage: str, model: str, max_length: int) -> pa.Table:
    """Ray Data: a batch of input rows checked (:func:`check_pairs` or :func:`check_dialogues`, with
    ``model``'s chat template), as one :func:`~ttpa_ray.records.pack` table: ``row`` (the kept rows in
    :func:`trainer_schema`, ``sample_index`` a 63-bit hash of the row's id, unique in the dataset)
    and ``rejected`` (RejectedRow)."""
    from ttpa_ray.records import pack, to_table

    rows = batch.to_pylist()
    if stage == "dpo":
        checked = check_pairs(rows, _token_counter(model), max_length, ref_columns=True)
    else:
        checked = check_dialogues(rows, _token_counter(model), max_length)
    table, ids = checked.table, checked.table.column(1).to_pylist()  # pair_id or dialogue_id
    hashed = [int.from_bytes(hashlib.sha256(str(i).encode()).digest()[:8], "big") >> 1 for i in ids]
    table = table.set_column(0, "sample_index", pa.array(hashed, pa.int64()))
    schemas = {"row": trainer_schema(stage), "rejected": RejectedRow.SCHEMA}
    return pack({"row": table, "rejected": to_table(checked.rejected, RejectedRow)}, schemas)


def to_hf_dataset(table: pa.Table) -> Any:
    """A ``datasets.Dataset`` over a checked table; JSON columns decode to Python objects."""
    import datasets

    return datasets.Dataset(table)


# ------------------------------------------------------------------------- pairs from BFCL ground truth

MUTATIONS = ("wrong_value", "missing_required", "wrong_name")


def _mutate_value(value: Any, rng: random.Random) -> Any:
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + rng.choice([1, 2, 3, 7, 10])
    if isinstance(value, float):
        return round(value * 2 + 1, 3)
    if isinstance(value, str):
        return value[::-1] if len(value) > 1 else value + "x"
    if isinstance(value, list):
        return value[:-1] if value else [0]
    if isinstance(value, dict):
        return {}
    return "unknown"


def mutate_call(
    call: ToolCall, tool: Mapping[str, Any], mutation: str, rng: random.Random
) -> tuple[ToolCall, str] | None:
    """The call with one systematic error, and the ESM error category it carries (None: not applicable)."""
    args = dict(call.arguments)
    if mutation == "wrong_value" and args:
        key = rng.choice(sorted(args))
        args[key] = _mutate_value(args[key], rng)
        return (ToolCall(call.name, args), "value_mismatch") if args != call.arguments else None
    if mutation == "missing_required":
        required = [k for k in tool.get("parameters", {}).get("required", []) if k in args]
        if not required:
            return None
        del args[rng.choice(required)]
        return ToolCall(call.name, args), "missing_required"
    if mutation == "wrong_name":
        parts = call.name.rsplit(".", 1)
        wrong = parts[0] + ".get_" + parts[1] if len(parts) == 2 else "get_" + call.name
        return ToolCall(wrong, args), "wrong_tool"
    return None


def bfcl_preference_pairs(category: str = "simple_python", seed: int = 0) -> list[PreferencePair]:
    """One pair per BFCL entry: prompt = the question with the entry's tools, chosen = the ground-truth
    call, rejected = that call with one mutation (cycled per entry: wrong value, missing required, wrong
    name; the next applicable one if a mutation does not apply). Scores are 1.0 vs 0.0 placeholders."""
    from ttpa_ray.bfcl import load_entries

    rng = random.Random(seed)
    pairs = []
    for number, entry in enumerate(load_entries(category)):
        calls = entry.ground_truth_calls()
        if len(calls) != 1 or not entry.question or not entry.question[0]:
            continue
        call = calls[0]
        tool = next((t["function"] for t in entry.tools if t["function"]["name"] == call.name), None)
        if tool is None:
            continue
        mutated = None
        for shift in range(len(MUTATIONS)):
            mutation = MUTATIONS[(number + shift) % len(MUTATIONS)]
            mutated = mutate_call(call, tool, mutation, rng)
            if mutated is not None:
                break
        if mutated is None:
            continue
        prompt = tuple(Message.from_openai(m) for m in entry.question[0])
        pairs.append(
            PreferencePair(
                pair_id=f"bfcl-{entry.id}",
                turn_id=f"bfcl-{entry.id}-turn0",
                prompt=prompt,
                chosen=(Message("assistant", tool_calls=(call,)),),
                rejected=(Message("assistant", tool_calls=(mutated[0],)),),
                tools=tuple(ToolSpec.from_openai(t, source="bfcl") for t in entry.tools),
                chosen_score=1.0,
                rejected_score=0.0,
                rejected_errors=(mutated[1],),
                chosen_source="reference",
            )
        )
    return pairs
