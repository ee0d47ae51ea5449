"""Bad data between stages (issue 17): each is one line naming the file and the record, or a rejected
row, never a traceback from inside Ray."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from ttpa_ray.cli import app
from ttpa_ray.codec import ToolCall
from ttpa_ray.config import load_config
from ttpa_ray.esm import ESMWeights
from ttpa_ray.evaluate import HELDOUT_CATEGORY, Answer, EvalItem, score_answers
from ttpa_ray.records import Dialogue, Message, RecordError, ToolSpec, conversation_problem, read_parquet
from ttpa_ray.reverse import ReverseBuilder, make_seeds
from ttpa_ray.tools.registry import ToolRegistry, load_catalogue
from ttpa_ray.tps import turns_from_dialogues
from ttpa_ray.train.data import check_dialogues

runner = CliRunner()


@pytest.fixture
def bad_files(tmp_path: Path) -> dict[str, Path]:
    files = {"missing": tmp_path / "missing.parquet", "typed": tmp_path / "typed.parquet"}
    pq.write_table(pa.table({"dialogue_id": ["d-1"], "seed_id": ["s"]}), files["missing"])
    pq.write_table(pa.table({"dialogue_id": [7], "seed_id": ["s"], "messages": ["[]"]}), files["typed"])
    return files


def test_a_parquet_file_with_a_missing_or_mistyped_column_names_file_record_and_field(
    bad_files: dict[str, Path],
) -> None:
    with pytest.raises(RecordError) as missing:
        read_parquet(Dialogue, bad_files["missing"])
    assert str(missing.value) == f"{bad_files['missing']}: Dialogue row 'd-1' field 'messages': is missing"
    with pytest.raises(RecordError) as typed:
        read_parquet(Dialogue, bad_files["typed"])
    assert str(typed.value) == (
        f"{bad_files['typed']}: Dialogue row #0 field 'dialogue_id': expected a string, got int 7"
    )


def test_sample_on_a_broken_dialogue_file_is_one_line(
    bad_files: dict[str, Path], tmp_path: Path, tiny_model_dir: Path
) -> None:
    overrides = [f"run.run_dir={tmp_path}", f"model.policy={tiny_model_dir}"]
    result = runner.invoke(app, ["sample", "--dialogues", str(bad_files["missing"]), *overrides])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if str(bad_files["missing"]) in line]
    assert lines == [f"{bad_files['missing']}: Dialogue row 'd-1' field 'messages': is missing"]
    assert "Traceback" not in result.output


@pytest.mark.parametrize("kind", ["empty", "all_broken"])
def test_a_catalogue_without_one_usable_tool_stops_reverse_with_one_line(
    ray_cluster: Any, tiny_model_dir: Path, tmp_path: Path, kind: str
) -> None:
    folder = tmp_path / "tools"
    folder.mkdir()
    if kind == "all_broken":  # no docstring, no type hints: no schema can be made for either
        (folder / "broken.py").write_text("def first(x):\n    return x\n\n\ndef second(y):\n    return y\n")
    result = runner.invoke(
        app,
        [
            "reverse",
            f"run.run_dir={tmp_path / 'run'}",
            f"model.policy={tiny_model_dir}",
            f"reverse.catalogue={folder}",
        ],
    )
    assert result.exit_code == 2, result.output
    line = next(line for line in result.output.splitlines() if "has no usable tool" in line)
    assert str(folder) in line
    if kind == "all_broken":
        assert "first" in line
    assert "Traceback" not in result.output


def _messages(*spec: tuple[str, ...]) -> tuple[Message, ...]:
    """Messages from (role, content-or-call-name[, id]) tuples; an assistant 'call:<name>' calls."""
    out = []
    for role, text, *ids in spec:
        if role == "assistant" and text.startswith("call:"):
            out.append(Message(role, None, (ToolCall(text[5:], {}),), tool_call_ids=tuple(ids)))
        elif role == "tool":
            out.append(Message(role, text, tool_call_id=ids[0] if ids else None, name=text))
        else:
            out.append(Message(role, text))
    return tuple(out)


VALID = _messages(("system", "s"), ("user", "q"), ("assistant", "call:f", "c1"), ("tool", "f", "c1"))
BROKEN = {
    "system_later": (
        _messages(("user", "q"), ("system", "s")),
        "message 1 (system): a system message may only come first",
    ),
    "starts_with_assistant": (
        _messages(("assistant", "hi"), ("user", "q")),
        "message 0 (assistant): the conversation must start with a user message",
    ),
    "tool_without_call": (
        _messages(("user", "q"), ("tool", "f")),
        "message 1 (tool): answers no open tool call",
    ),
    "wrong_call_id": (
        _messages(("user", "q"), ("assistant", "call:f", "c1"), ("tool", "f", "c9")),
        "message 2 (tool): tool_call_id 'c9' is not one of ['c1']",
    ),
    "unanswered_call": (
        _messages(("user", "q"), ("assistant", "call:f", "c1"), ("user", "again")),
        "message 2 (user): ['f'] of the assistant before it have no tool response",
    ),
    "no_user": (_messages(("system", "s")), "no user message"),
}


def test_conversation_rules() -> None:
    assert conversation_problem(VALID) is None
    assert conversation_problem(VALID[:3]) is None  # a conversation may stop at a call (BFCL turns)
    assert conversation_problem((*VALID, Message("assistant", "answer"))) is None
    for name, (messages, problem) in BROKEN.items():
        assert conversation_problem(messages) == problem, name


def _dialogue(dialogue_id: str, messages: tuple[Message, ...]) -> Dialogue:
    tools = (ToolSpec("f", "a tool", {"type": "object", "properties": {}}, source="test"),)
    return Dialogue(dialogue_id, dialogue_id, messages, tools)


def test_an_invalid_conversation_is_a_rejected_row_in_tps_and_sft() -> None:
    dialogues = [_dialogue("ok", (*VALID, Message("assistant", "done")))]
    dialogues += [_dialogue(name, messages) for name, (messages, _) in BROKEN.items()]
    turns, rejected = turns_from_dialogues(dialogues)
    assert [t.dialogue_id for t in turns] == ["ok"]
    assert {(r.input_id, r.reason, r.detail) for r in rejected} == {
        (name, "invalid_conversation", problem) for name, (_, problem) in BROKEN.items()
    }
    checked = check_dialogues([d.to_row() for d in dialogues], lambda messages, tools: 10, max_length=100)
    assert checked.table.column("dialogue_id").to_pylist() == ["ok"]
    assert {(r.input_id, r.reason, r.detail) for r in checked.rejected} == {
        (name, "invalid_conversation", problem) for name, (_, problem) in BROKEN.items()
    }


def test_an_answer_whose_prompt_did_not_fit_is_rejected_not_scored() -> None:
    item = EvalItem("h/0", HELDOUT_CATEGORY, [{"role": "user", "content": "q"}], [], reference=())
    answers = {"h/0": Answer("", "prompt_too_long: 5000 prompt tokens, vllm.max_model_len 4096")}
    results, rejected = score_answers([item], answers, ESMWeights())
    assert results == []
    assert [(r.input_id, r.reason, r.detail) for r in rejected] == [
        ("h/0", "prompt_too_long", "5000 prompt tokens, vllm.max_model_len 4096")
    ]


@pytest.mark.slow
def test_a_reverse_prompt_longer_than_max_model_len_rejects_its_seed(
    vllm_engine: Any, tmp_path: Path
) -> None:
    """Tools whose descriptions alone exceed the engine's 4096 tokens: each seed ends prompt_too_long
    (vLLM would refuse the request and fail the whole shard)."""
    folder = tmp_path / "tools"
    folder.mkdir()
    wordy = " ".join(f"word{i}" for i in range(2500))
    source = ""
    for name in ("first", "second"):
        source += (
            f'def {name}(x: int) -> int:\n    """\n    {wordy}\n\n    Args:\n        x: A number.\n    """\n'
        )
        source += "    return x\n\n\n"
    (folder / "wordy.py").write_text(source)
    config = load_config(None, ["reverse.num_seeds=3", f"reverse.catalogue={folder}"])
    catalogue = load_catalogue(config.reverse.catalogue)
    seeds = make_seeds(catalogue, config.reverse, 0)
    with ToolRegistry(catalogue) as registry:
        dialogues, rejected = ReverseBuilder(vllm_engine, registry, config.reverse).run(seeds)
    assert dialogues == []
    assert sorted(r.input_id for r in rejected) == sorted(s.seed_id for s in seeds)
    assert {r.reason for r in rejected} == {"prompt_too_long"}
    assert all("vllm.max_model_len 4096" in r.detail for r in rejected)
