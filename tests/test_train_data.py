"""Training inputs without Ray: checks and rejected rows, BFCL pairs, config, DeepSpeed files, metrics."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from ttpa_ray.codec import ToolCall
from ttpa_ray.config import DEEPSPEED_DIR, TrainConfig, resolve_deepspeed_path
from ttpa_ray.records import Dialogue, Message, PreferencePair, ToolSpec
from ttpa_ray.train.data import (
    bfcl_preference_pairs,
    chat_token_counter,
    check_dialogues,
    check_pairs,
    to_hf_dataset,
)
from ttpa_ray.train.metrics import format_step, read_sample_log
from ttpa_ray.train.run import load_deepspeed

TOOL = ToolSpec(
    "get_weather",
    "Weather of a city",
    {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    source="builtin",
)


def _pair(pair_id: str, **changes: Any) -> PreferencePair:
    pair = PreferencePair(
        pair_id=pair_id,
        turn_id=f"{pair_id}-t",
        prompt=(Message("user", "Weather in Paris?"),),
        chosen=(Message("assistant", tool_calls=(ToolCall("get_weather", {"city": "Paris"}),)),),
        rejected=(Message("assistant", tool_calls=(ToolCall("get_weather", {"city": "Rome"}),)),),
        tools=(TOOL,),
        chosen_score=1.0,
        rejected_score=0.6,
    )
    return replace(pair, **changes)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


def test_check_pairs_rejects_each_bad_row_with_its_reason(tokenizer: Any) -> None:
    good = _pair("good").to_row()
    missing = _pair("missing").to_row()
    del missing["chosen"]
    empty_chosen = _pair("empty-chosen", chosen=()).to_row()
    empty_rejected = _pair("empty-rejected", rejected=(Message("assistant", ""),)).to_row()
    same = _pair("same", rejected=_pair("x").chosen).to_row()
    long = _pair("long", prompt=(Message("user", "word " * 400),)).to_row()
    rows = [good, missing, empty_chosen, empty_rejected, same, long]

    checked = check_pairs(rows, chat_token_counter(tokenizer), max_length=256)

    assert checked.num_rows == 1
    assert {r.input_id: r.reason for r in checked.rejected} == {
        "missing": "invalid_record",
        "empty-chosen": "empty_chosen",
        "empty-rejected": "empty_rejected",
        "same": "chosen_equals_rejected",
        "long": "too_long",
    }
    assert checked.reject_counts()["too_long"] == 1
    assert "1 rows kept, 5 rejected" in checked.summary()
    # nothing disappears: each rejected row keeps the original row
    assert checked.rejected[0].payload_object()["pair_id"] == "missing"
    # the kept table is what TRL reads: JSON columns decode to message dicts with dict arguments
    row = to_hf_dataset(checked.table)[0]
    assert row["sample_index"] == 0
    assert row["chosen"][0]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert row["tools"][0]["function"]["name"] == "get_weather"
    assert "ref_chosen_logps" not in checked.table.column_names


def test_reference_columns_are_kept_only_when_every_row_has_them(tokenizer: Any) -> None:
    count = chat_token_counter(tokenizer)
    with_ref = [_pair(f"p{i}", ref_chosen_logps=-1.0 - i, ref_rejected_logps=-2.0).to_row() for i in range(3)]
    table = check_pairs(with_ref, count, 512).table
    assert table.column("ref_chosen_logps").to_pylist() == [-1.0, -2.0, -3.0]
    mixed = [*with_ref, _pair("no-ref").to_row()]
    assert "ref_chosen_logps" not in check_pairs(mixed, count, 512).table.column_names


def test_check_dialogues(tokenizer: Any) -> None:
    call = ToolCall("get_weather", {"city": "Paris"})
    messages = (
        Message("user", "Weather in Paris?"),
        Message("assistant", tool_calls=(call,)),
        Message("tool", '{"temperature": 18}', name="get_weather"),
        Message("assistant", "18 degrees."),
    )
    good = Dialogue("d1", "s1", messages, (TOOL,))
    no_assistant = Dialogue("d2", "s1", messages[:1], (TOOL,))
    empty = Dialogue("d3", "s1", (), (TOOL,))
    broken = good.to_row() | {"dialogue_id": "d4", "messages": "not a list"}
    checked = check_dialogues(
        [good.to_row(), no_assistant.to_row(), empty.to_row(), broken], chat_token_counter(tokenizer), 512
    )
    assert checked.num_rows == 1
    assert {r.input_id: r.reason for r in checked.rejected} == {
        "d2": "no_assistant_turn",
        "d3": "no_messages",
        "d4": "invalid_record",
    }
    message = to_hf_dataset(checked.table)[0]["messages"][1]
    assert message["tool_calls"][0]["function"]["name"] == "get_weather"


def test_bfcl_pairs_are_ground_truth_against_a_real_mutation() -> None:
    pairs = bfcl_preference_pairs("simple_python")
    assert len(pairs) > 300
    assert len({p.pair_id for p in pairs}) == len(pairs)  # one pair per entry: split by pair = by entry
    errors = {p.rejected_errors[0] for p in pairs}
    assert errors == {"value_mismatch", "missing_required", "wrong_tool"}
    for pair in pairs[:50]:
        chosen, rejected = pair.chosen[0].tool_calls[0], pair.rejected[0].tool_calls[0]
        assert chosen != rejected
        assert chosen.name in {t.name for t in pair.tools}


def test_train_config_and_deepspeed_files() -> None:
    cfg = TrainConfig()
    assert cfg.deepspeed == "zero2" and cfg.dpo.reference == "replicas"  # the replicas score the reference
    with pytest.raises(ValueError, match="zero9"):
        TrainConfig(deepspeed="zero9")
    with pytest.raises(ValueError, match="extra"):
        TrainConfig.model_validate({"dpo": {"betta": 0.1}})
    for name, stage in (("zero2", 2), ("zero3", 3)):
        config = load_deepspeed(name)
        assert config is not None and config["zero_optimization"]["stage"] == stage
        # batch sizes are left to HF/accelerate, so one file serves every scale
        assert config["train_micro_batch_size_per_gpu"] == "auto"
        assert resolve_deepspeed_path(name).parent == DEEPSPEED_DIR
    assert load_deepspeed(None) is None


def test_zero3_live_parameters_are_one_decoder_layer(tiny_model_dir: Path) -> None:
    # DeepSpeed's 1e9 default would keep a small model gathered for the whole step; "auto" means one layer
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    layer = sum(p.numel() for p in model.model.layers[0].parameters())
    assert 0 < layer < sum(p.numel() for p in model.parameters()) // 2
    config = load_deepspeed("zero3", tiny_model_dir)
    assert config is not None
    zero = config["zero_optimization"]
    assert zero["stage3_max_live_parameters"] == zero["stage3_max_reuse_distance"] == layer
    # without a model, DeepSpeed's defaults (no "auto" string is left for DeepSpeed to reject)
    bare = load_deepspeed("zero3")
    assert bare is not None and "stage3_max_live_parameters" not in bare["zero_optimization"]
    assert "stage3_max_live_parameters" not in load_deepspeed("zero2")["zero_optimization"]  # type: ignore[index]


def test_console_line_and_sample_log(tmp_path: Path) -> None:
    line = format_step(3, 10, {"loss": 0.5, "rewards/accuracies": 0.75, "rewards/margins": 0.2}, 1234.0)
    assert line == "step 3/10 loss=0.5 r_acc=0.75 margin=0.2 tok/s=1234"
    log = tmp_path / "samples-rank0.jsonl"
    records = [(1, [0, 1]), (2, [2, 3]), (2, [9, 9]), (3, [4, 5])]  # step 2 redone after a resume
    log.write_text("".join(json.dumps({"step": s, "rank": 0, "samples": x}) + "\n" for s, x in records))
    assert read_sample_log(tmp_path) == {0: {1: [0, 1], 2: [9, 9], 3: [4, 5]}}


def test_input_files_take_only_the_wanted_record_from_a_stage_folder(tmp_path: Path) -> None:
    """The pairs stage's folder holds pairs, scored candidates and rejected turns (a file or a
    folder of them): DPO reads pairs only."""
    import pyarrow.parquet as pq

    from ttpa_ray.codec import ToolCall
    from ttpa_ray.records import Candidate, PreferencePair, ScoredCandidate, reject, write_parquet
    from ttpa_ray.train.data import bfcl_preference_pairs, input_files

    pairs = bfcl_preference_pairs("simple_python")[:3]
    write_parquet(pairs, tmp_path / "pairs.parquet")
    candidate = Candidate(
        candidate_id="c", turn_id="t", calls=(ToolCall("f", {}),), raw_text="", sampler="tps"
    )
    write_parquet(
        [ScoredCandidate(candidate, 0.5, {"name": 1.0}, ("value_mismatch",))], tmp_path / "scored.parquet"
    )
    write_parquet([reject("t2", "pairs", "no_candidates", "none", {})], tmp_path / "rejected.parquet")
    # a rejected folder written by Ray Data, whose files may carry no record name
    pq.write_table(
        pq.read_table(tmp_path / "rejected.parquet").replace_schema_metadata(None), tmp_path / "x.parquet"
    )
    (tmp_path / "rejected").mkdir()
    (tmp_path / "x.parquet").rename(tmp_path / "rejected" / "part-0.parquet")
    files = input_files(tmp_path, PreferencePair)
    assert files == [tmp_path / "pairs.parquet"]
    rows = [row for file in files for row in pq.read_table(file).to_pylist()]
    assert [r["pair_id"] for r in rows] == [p.pair_id for p in pairs]


def test_dpo_trains_on_as_many_pairs_as_its_steps_take() -> None:
    """max_steps shorter than an epoch: a seeded draw of exactly steps x global batch pairs, in their
    order, so the reference pass scores only pairs that are trained on; an epoch or more: all."""
    import pyarrow as pa

    from ttpa_ray.config import TrainConfig
    from ttpa_ray.train.run import rows_for_steps

    table = pa.table({"pair_id": [f"p{i}" for i in range(39)]})
    train = TrainConfig(num_workers=2, dpo={"max_steps": 6, "per_device_batch_size": 1})
    drawn = rows_for_steps(table, train, seed=0).column("pair_id").to_pylist()
    assert len(drawn) == 12 == len(set(drawn))
    assert drawn == sorted(drawn, key=lambda p: int(p[1:]))  # the file's order kept
    assert rows_for_steps(table, train, seed=0).column("pair_id").to_pylist() == drawn  # seeded
    assert rows_for_steps(table, train, seed=1).column("pair_id").to_pylist() != drawn
    accumulated = TrainConfig(
        num_workers=2, dpo={"max_steps": 10, "per_device_batch_size": 1, "gradient_accumulation_steps": 2}
    )
    assert rows_for_steps(table, accumulated, seed=0).num_rows == 39  # 40 wanted: all of them
    assert rows_for_steps(table, TrainConfig(dpo={"max_steps": -1}), seed=0).num_rows == 39  # epochs


def test_held_back_pairs_are_whole_dialogues_seeded_and_never_all() -> None:
    import pyarrow as pa

    from ttpa_ray.train.run import dialogue_of, hold_back_pairs

    # as the pairs stage names them: reversed dialogues' turns and BFCL turns (dialogue "bfcl/<entry>")
    assert dialogue_of("dlg-seed-0-000014/1/tps/28/5529/pair") == "dlg-seed-0-000014"
    assert dialogue_of("bfcl/simple_python_200/0/sequence/2/pair") == "bfcl/simple_python_200"
    assert dialogue_of("bfcl-simple_python_3") == "bfcl-simple_python_3"
    ids = [f"dlg-{d}/{t}/tps/{p}/7/pair" for d in range(5) for t in range(2) for p in range(3)]
    ids += [
        f"bfcl/simple_python_{d}/{t}/sequence/{p}/pair" for d in range(5) for t in range(2) for p in range(3)
    ]
    table = pa.table({"sample_index": list(range(len(ids))), "pair_id": ids})
    train, held = hold_back_pairs(table, 0.2, seed=7)
    dialogues = {dialogue_of(i) for i in held["pair_id"].to_pylist()}
    assert len(dialogues) == 2 and held.num_rows == 12 and train.num_rows == 48
    assert not dialogues & {dialogue_of(i) for i in train["pair_id"].to_pylist()}
    assert hold_back_pairs(table, 0.2, seed=7)[1].equals(held)
    assert not hold_back_pairs(table, 0.2, seed=8)[1].equals(held)
    assert hold_back_pairs(table, 0.0, seed=7)[1].num_rows == 0
    one = table.filter(pa.array([i.startswith("dlg-0/") for i in ids]))
    assert hold_back_pairs(one, 0.5, seed=7)[0].num_rows == 6  # a single dialogue is never held back
