"""The pair rule, TRL output and turn accounting, on hand-built candidates and on real TPS output."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ttpa_ray.codec import ToolCall
from ttpa_ray.config import ESMConfig, TPSConfig
from ttpa_ray.pairs import (
    differing_fields,
    label_turn,
    pairs_for_turn,
    pairs_from_samples,
    score_candidates,
    single_field_share,
)
from ttpa_ray.records import (
    Candidate,
    Message,
    PreferencePair,
    RejectedRow,
    ScoredCandidate,
    ToolSpec,
    Turn,
    read_parquet,
    to_table,
    write_parquet,
)
from ttpa_ray.tps import (
    TokenLevelSampler,
    bfcl_dialogues,
    sample_table,
    split_sample_table,
    turns_from_dialogues,
)

WEATHER = ToolSpec(
    name="get_weather",
    parameters={
        "type": "object",
        "properties": {"city": {"type": "string"}, "date": {"type": "string"}, "unit": {"type": "string"}},
        "required": ["city", "date"],
    },
)
REFERENCE = ToolCall("get_weather", {"city": "Paris", "date": "2026-05-01"})
TURN = Turn(
    turn_id="d/0",
    dialogue_id="d",
    turn_index=0,
    context=(Message(role="user", content="Weather in Paris on 2026-05-01?"),),
    tools=(WEATHER,),
    reference_calls=(REFERENCE,),
)


def candidate(name: str, call: ToolCall | None, position: int = 5, text: str = "") -> Candidate:
    return Candidate(
        candidate_id=f"d/0/tps/{position}/{name}",
        turn_id="d/0",
        calls=(call,) if call else (),
        raw_text=text or ("" if call else '<tool_call>\n{"name": "get_wea'),
        parse_error=None if call else "truncated JSON",
        branch_position=position,
        branch_token=name,
        logprob=-1.0,
    )


def test_best_candidate_above_threshold_is_chosen() -> None:
    near = candidate("near", ToolCall("get_weather", {"city": "paris", "date": "2026-05-01"}))  # ~0.91
    wrong_date = candidate("date", ToolCall("get_weather", {"city": "Paris", "date": "2026-05-02"}), 9)
    broken = candidate("broken", None, 3)
    near = dataclasses.replace(near, sequence_logprob=-2.0)
    broken = dataclasses.replace(broken, sequence_logprob=-9.0)
    scored, reference_score = score_candidates(TURN, [wrong_date, near, broken])
    assert reference_score == 1.0
    pairs, rejected = pairs_for_turn(TURN, scored, reference_score)
    assert rejected is None
    best = max(s.esm_score for s in scored)
    assert best >= 0.8
    assert {p.chosen_source for p in pairs} == {"candidate"}
    assert all(p.chosen_score == best > p.rejected_score for p in pairs)
    by_token = {p.branch_token: p for p in pairs}
    assert set(by_token) == {"date", "broken"}  # the chosen one is not paired with itself
    assert by_token["broken"].rejected_errors == ("parse",)
    assert by_token["broken"].rejected[0].content == broken.raw_text  # unparsed text is kept as text
    assert by_token["broken"].chosen_logprob == -2.0 and by_token["broken"].rejected_logprob == -9.0
    assert by_token["broken"].branch_position == 3


def test_reference_is_chosen_when_no_candidate_reaches_threshold() -> None:
    bad = [
        candidate("a", ToolCall("get_weather", {"city": "Rome"}), 4),
        candidate("b", ToolCall("get_time", {"city": "Paris", "date": "2026-05-01"}), 2),
    ]
    bad = [dataclasses.replace(c, reference_logprob=-3.0) for c in bad]  # y*'s log-prob, on every candidate
    pairs, _scored, rejected = label_turn(TURN, bad, ESMConfig())
    assert rejected is None and len(pairs) == 2
    assert all(p.chosen_source == "reference" and p.chosen[0].tool_calls == (REFERENCE,) for p in pairs)
    assert all(p.chosen_score == 1.0 > p.rejected_score for p in pairs)
    assert all(p.chosen_logprob == -3.0 for p in pairs)
    assert "unknown_tool" in pairs[1].rejected_errors
    assert "missing_required" in pairs[0].rejected_errors


def test_turns_without_a_pair_are_rejected_with_the_reason() -> None:
    pairs, rejected = pairs_for_turn(TURN, [], 1.0)
    assert not pairs and rejected is not None and rejected.reason == "no_candidates"
    same = candidate("same", REFERENCE)
    pairs, _, rejected = label_turn(TURN, [same], ESMConfig())
    assert not pairs and rejected is not None and rejected.reason == "no_lower_candidate"
    assert rejected.payload_object()["turn_id"] == "d/0"  # the turn is kept, not lost


def test_differing_fields() -> None:
    a = ToolCall("f", {"x": 1, "y": "a"})
    assert differing_fields([a], [a]) == 0
    assert differing_fields([a], [ToolCall("g", {"x": 1, "y": "a"})]) == 1
    assert differing_fields([a], [ToolCall("f", {"x": 1.0, "y": "b"})]) == 1  # 1 == 1.0
    assert differing_fields([a], [ToolCall("f", {"x": 1, "z": "a"})]) == 1  # a renamed key
    assert differing_fields([a], [ToolCall("f", {"x": 1})]) == 1
    assert differing_fields([a], [ToolCall("g", {"x": 2, "y": "a"})]) == 2
    assert differing_fields([a], []) is None


@pytest.fixture(scope="module")
def tps_result(vllm_engine: Any) -> Any:
    turns, _ = turns_from_dialogues(bfcl_dialogues("simple_python", 4) + bfcl_dialogues("parallel", 1))
    samples = TokenLevelSampler(vllm_engine, TPSConfig(top_k=3, max_branches=2, max_tokens=40)).sample(turns)
    return turns, samples


def test_real_tps_pairs_keep_the_invariants(tps_result: Any, tmp_path: Path) -> None:
    turns, samples = tps_result
    result = pairs_from_samples(samples, ESMConfig())
    assert result.turns_in == len(turns) == result.turns_paired + len(result.rejected)
    assert result.balanced and result.pairs
    for pair in result.pairs:
        assert pair.chosen_score > pair.rejected_score
        assert pair.branch_position is not None and pair.branch_token
        assert pair.chosen_logprob is not None and pair.rejected_logprob is not None
        assert pair.rejected_logprob < 0 and pair.chosen_logprob < 0
    assert 0.0 <= single_field_share(result.pairs) <= 1.0
    path = write_parquet(result.pairs, tmp_path / "pairs.parquet")
    assert read_parquet(PreferencePair, path) == result.pairs


@pytest.mark.slow
def test_trl_computes_a_dpo_loss_on_the_output(tps_result: Any, tiny_model_dir: Path, tmp_path: Path) -> None:
    import math

    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    _, samples = tps_result
    result = pairs_from_samples(samples, ESMConfig())
    path = write_parquet(result.pairs[:4], tmp_path / "pairs.parquet")
    assert pq.read_schema(path).metadata[b"ttpa.record"] == b"preference_pair"
    data = load_dataset("parquet", data_files=str(path), split="train")
    assert data[0]["chosen"][0]["role"] == "assistant" and isinstance(data[0]["tools"], list)

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    args = DPOConfig(
        output_dir=str(tmp_path / "dpo"),
        max_steps=1,
        per_device_train_batch_size=4,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
    )
    trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    out = trainer.train()
    assert out.global_step == 1 and math.isfinite(out.training_loss) and out.training_loss > 0


@pytest.mark.slow
def test_pairs_stage_on_ray_matches_the_pure_rule(ray_cluster: Any, tps_result: Any, tmp_path: Path) -> None:
    """The stage (turns and candidates grouped by turn in Ray Data, labelled by the scorer actors)
    writes the pairs and scored candidates the pure rule makes; a turn with broken tools, a turn
    the sampler rejected and a dialogue without turns each end as one rejected row."""
    from ttpa_ray.config import TTPAConfig
    from ttpa_ray.pairs import run_pairs_stage

    turns, samples = tps_result
    bad_tool = ToolSpec(
        name="get_weather", parameters={"type": "object", "properties": {"city": {"type": "banana"}}}
    )
    bad_turn = Turn(
        "bad/0", "bad", 0, TURN.context, (bad_tool,), (ToolCall("get_weather", {"city": "Paris"}),)
    )
    bad_candidate = Candidate(
        candidate_id="bad/0/tps/3/7", turn_id="bad/0", raw_text="x", parse_error="no call"
    )
    unsampled = dataclasses.replace(TURN, turn_id="unsampled/0", dialogue_id="unsampled")
    candidates, rejected = split_sample_table(sample_table(samples))
    candidates = pa.concat_tables(
        [
            candidates,
            to_table(
                [dataclasses.replace(bad_candidate, sequence_logprob=-1.0, reference_logprob=-2.0)]
            ).append_column("generated_tokens", pa.array([1])),
        ]
    )
    sample_dir = tmp_path / "tps"
    (sample_dir / "rejected.parquet").mkdir(parents=True)
    pq.write_table(to_table([*turns, bad_turn, unsampled], Turn), sample_dir / "turns.parquet")
    pq.write_table(candidates, sample_dir / "candidates.parquet")
    sampler_rejected = [
        *(RejectedRow.from_row(r) for r in rejected.to_pylist()),
        RejectedRow("unsampled/0", "tps", "no_branch_point", "", "{}"),
    ]
    write_parquet(sampler_rejected, sample_dir / "rejected.parquet" / "turns-without-candidates.parquet")
    write_parquet(
        [RejectedRow("talk", "tps", "no_tool_call_turn", "", "{}")],
        sample_dir / "rejected.parquet" / "dialogues.parquet",
    )

    report = run_pairs_stage(TTPAConfig(), sample_dir, tmp_path / "pairs")

    pure = pairs_from_samples(samples, ESMConfig())
    by_id = lambda records, key: sorted(records, key=key)  # noqa: E731
    staged = read_parquet(PreferencePair, tmp_path / "pairs" / "pairs.parquet")
    assert by_id(staged, lambda p: p.pair_id) == by_id(pure.pairs, lambda p: p.pair_id)
    scored = read_parquet(ScoredCandidate, tmp_path / "pairs" / "scored.parquet")
    key = lambda s: s.candidate.candidate_id  # noqa: E731
    assert by_id(scored, key) == by_id(pure.scored, key)
    ended = read_parquet(RejectedRow, tmp_path / "pairs" / "rejected.parquet")
    reasons = {r.input_id: r.reason for r in ended}
    assert len(reasons) == len(ended)  # each input once
    assert reasons["bad/0"] == "invalid_tools" and reasons["unsampled/0"] == "no_branch_point"
    assert reasons["talk"] == "no_tool_call_turn"
    assert {p.turn_id for p in staged}.isdisjoint(reasons)
    assert report.turns == len(turns) + 2 and report.without_turns == 1
    assert report.turns == report.turns_paired + len(ended) - report.without_turns
    assert report.pairs == len(pure.pairs) and report.turns_paired == pure.turns_paired
    assert report.single_field_share == pytest.approx(single_field_share(pure.pairs))
    assert sum(report.reasons.values()) == report.rejected == len(ended)
