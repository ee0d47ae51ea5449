"""TPS on the real tiny model in vLLM: turns, branch points, candidates, the Ray shell."""

from __future__ import annotations

import math
from typing import Any

import pytest

from ttpa_ray.codec import ToolCall, canonical_calls, render_hermes
from ttpa_ray.config import TPSConfig
from ttpa_ray.records import Candidate, Dialogue, Message, ToolSpec, Turn, from_table
from ttpa_ray.tps import (
    SAMPLE_SCHEMA,
    BranchPoint,
    SequenceSampler,
    TokenLevelSampler,
    bfcl_dialogues,
    choose_branch_points,
    reference_tokens,
    sample_table,
    split_sample_table,
    turns_from_dialogues,
)

WEATHER = ToolSpec(
    name="get_weather",
    description="Weather forecast of a city on a date.",
    parameters={
        "type": "object",
        "properties": {"city": {"type": "string"}, "date": {"type": "string"}},
        "required": ["city", "date"],
    },
    source="builtin",
)
CONVERT = ToolSpec(
    name="convert_currency",
    description="Convert an amount between currencies.",
    parameters={
        "type": "object",
        "properties": {
            "amount": {"type": "number"},
            "from_currency": {"type": "string"},
            "to_currency": {"type": "string"},
        },
        "required": ["amount", "from_currency", "to_currency"],
    },
    source="builtin",
)
FIRST = ToolCall("get_weather", {"city": "Paris", "date": "2026-05-01"})
SECOND = ToolCall("convert_currency", {"amount": 250, "from_currency": "USD", "to_currency": "EUR"})


def two_step_dialogue(dialogue_id: str = "hand/0") -> Dialogue:
    """A hand-built multi-step dialogue over built-in tools: two call turns, tool responses, answer."""
    return Dialogue(
        dialogue_id=dialogue_id,
        seed_id="hand",
        messages=(
            Message(role="system", content="You are a helpful assistant that can use tools."),
            Message(role="user", content="Weather in Paris on 2026-05-01, and 250 USD in euros?"),
            Message(role="assistant", tool_calls=(FIRST,), tool_call_ids=("call_0",)),
            Message(role="tool", content='{"temp_c": 18}', tool_call_id="call_0", name="get_weather"),
            Message(role="assistant", tool_calls=(SECOND,), tool_call_ids=("call_1",)),
            Message(role="tool", content='{"amount": 230.0}', tool_call_id="call_1", name="convert_currency"),
            Message(role="assistant", content="18 degrees in Paris; 250 USD is 230 EUR."),
        ),
        tools=(WEATHER, CONVERT),
    )


@pytest.fixture(scope="module")
def turns() -> list[Turn]:
    dialogues = [two_step_dialogue(), *bfcl_dialogues("simple_python", 3), *bfcl_dialogues("parallel", 1)]
    found, rejected = turns_from_dialogues(dialogues)
    assert not rejected
    return found


def test_turns_from_dialogues() -> None:
    no_calls = Dialogue("hand/1", "hand", (Message(role="user", content="hi"), Message("assistant", "hello")))
    failed = Dialogue("hand/2", "hand", two_step_dialogue().messages, status="failed")
    turns, rejected = turns_from_dialogues([two_step_dialogue(), no_calls, failed])
    assert [t.turn_id for t in turns] == ["hand/0/0", "hand/0/1"]
    assert turns[0].reference_calls == (FIRST,) and len(turns[0].context) == 2
    assert turns[1].reference_calls == (SECOND,) and turns[1].context[-1].role == "tool"
    assert [(r.input_id, r.reason) for r in rejected] == [
        ("hand/1", "no_tool_call_turn"),
        ("hand/2", "dialogue_not_ok"),
    ]


def test_reference_tokens_match_the_chat_rendering(vllm_engine: Any, turns: list[Turn]) -> None:
    tokenizer = vllm_engine.tokenizer
    for turn in turns:
        ref = reference_tokens(vllm_engine, turn)
        assert tokenizer.decode(list(ref.reference_ids), skip_special_tokens=False) == (
            render_hermes(turn.reference_calls) + "<|im_end|>"
        )
        assert ref.span_positions and max(ref.span_positions) < len(ref.reference_ids) - 1
        # The name is a span, the fixed '<tool_call>' opener is not.
        span_text = "".join(tokenizer.decode([ref.reference_ids[t]]) for t in ref.span_positions)
        assert turn.reference_calls[0].name.split(".")[0] in span_text
        assert 0 not in ref.span_positions


def _dist(*items: tuple[int, float]) -> dict[int, tuple[float, int]]:
    ranked = sorted(items, key=lambda it: -it[1])
    return {tok: (math.log(p), rank + 1) for rank, (tok, p) in enumerate(ranked)}


def test_choose_branch_points_ranks_by_off_reference_mass() -> None:
    reference = [10, 11, 12, 13, 14]
    dists = [
        _dist((10, 0.99), (20, 0.01)),  # below tau
        _dist((11, 0.5), (21, 0.3), (22, 0.2)),  # off mass 0.5
        _dist((12, 0.1), (23, 0.6), (24, 0.2), (25, 0.1)),  # off mass 0.9
        _dist((13, 0.3), (26, 0.7)),  # off mass 0.7, not in a span
        None,
    ]
    points = choose_branch_points(dists, reference, [0, 1, 2, 4], top_k=3, max_branches=2, tau=0.05)
    assert [p.position for p in points] == [1, 2]  # best two, in text order
    assert isinstance(points[1], BranchPoint)
    assert [tok for tok, _ in points[1].alternatives] == [23, 24]  # top-3 minus the reference token
    assert math.isclose(points[1].off_mass, 0.9)
    only = choose_branch_points(dists, reference, [0, 1, 2], top_k=3, max_branches=5, tau=0.6)
    assert [p.position for p in only] == [2]


def test_tps_candidates_share_the_reference_prefix_and_differ_at_the_branch(
    vllm_engine: Any, turns: list[Turn]
) -> None:
    config = TPSConfig(top_k=3, max_branches=3, tau=0.05, max_tokens=48)
    samples = TokenLevelSampler(vllm_engine, config).sample(turns)
    assert [s.turn.turn_id for s in samples] == [t.turn_id for t in turns]
    for sample in samples:
        assert sample.rejected is None and sample.candidates
        reference = reference_tokens(vllm_engine, sample.turn).reference_ids
        assert sample.reference_logprob is not None and sample.reference_logprob < 0
        assert len({c.branch_position for c in sample.candidates}) <= config.max_branches
        assert len(sample.candidates) <= config.max_branches * config.top_k  # top-k minus y*_t if in it
        keys = [canonical_calls(c.calls) if c.calls else c.raw_text for c in sample.candidates]
        assert len(keys) == len(set(keys))  # deduplicated
        for candidate in sample.candidates:
            logprob = candidate.sequence_logprob
            assert logprob is not None and candidate.reference_logprob == sample.reference_logprob
            t = candidate.branch_position
            assert t is not None and candidate.sampler == "tps"
            ids = candidate.completion_token_ids
            assert ids[:t] == reference[:t]
            assert ids[t] != reference[t] and ids[t] == candidate.branch_token_id
            assert len(ids) <= max(config.max_tokens, len(reference))
            assert candidate.logprob is not None and logprob <= candidate.logprob <= 0
            assert (candidate.parse_error is None) == bool(candidate.calls)


def test_sequence_sampler_behind_the_same_interface(vllm_engine: Any, turns: list[Turn]) -> None:
    config = TPSConfig(sampler="sequence", num_samples=3, temperature=1.0, max_tokens=24)
    samples = SequenceSampler(vllm_engine, config).sample(turns[:2])
    again = SequenceSampler(vllm_engine, config).sample(turns[:2])
    for sample, repeat in zip(samples, again, strict=True):
        assert 1 <= len(sample.candidates) <= 3
        assert all(c.sampler == "sequence" and c.branch_position is None for c in sample.candidates)
        assert [c.raw_text for c in sample.candidates] == [c.raw_text for c in repeat.candidates]  # seeded
        assert sample.generated_tokens == sum(sample.candidate_tokens) <= 3 * 24


def test_sample_table_round_trip_and_rejected_turns(vllm_engine: Any, turns: list[Turn]) -> None:
    long_turn = Turn(
        turn_id="long/0",
        dialogue_id="long",
        turn_index=0,
        context=(Message(role="user", content="weather " * 5000),),
        tools=(WEATHER,),
        reference_calls=(FIRST,),
    )
    config = TPSConfig(top_k=2, max_branches=2, max_tokens=16)
    samples = TokenLevelSampler(vllm_engine, config).sample([turns[0], long_turn])
    assert samples[1].rejected is not None and samples[1].rejected.reason == "prompt_too_long"
    table = sample_table(samples)
    assert table.schema.equals(SAMPLE_SCHEMA, check_metadata=False)
    candidates, rejected = split_sample_table(table)
    assert rejected.column("input_id").to_pylist() == ["long/0"]
    restored = from_table(Candidate, candidates)
    assert restored == list(samples[0].candidates)  # log-probs included
    assert all(c.sequence_logprob is not None for c in restored)
    assert [c.reference_logprob for c in restored] == pytest.approx(
        [samples[0].reference_logprob] * len(restored)
    )


@pytest.mark.slow
def test_sample_and_pairs_commands_on_ray(ray_cluster: Any, tiny_model_dir: Any, tmp_path: Any) -> None:
    """`ttpa sample` then `ttpa pairs` through the Ray Data replica: every dialogue and turn accounted for."""
    from typer.testing import CliRunner

    from ttpa_ray.cli import app
    from ttpa_ray.records import PreferencePair, RejectedRow, read_parquet, write_parquet

    no_calls = Dialogue("hand/1", "hand", (Message(role="user", content="hi"), Message("assistant", "hello")))
    dialogues = [two_step_dialogue(), *bfcl_dialogues("simple_python", 2), no_calls]
    path = write_parquet(dialogues, tmp_path / "in" / "x.dialogues.parquet")
    overrides = [
        f"run.run_dir={tmp_path / 'run'}",
        f"model.policy={tiny_model_dir}",
        "model.dtype=float32",
        "vllm.gpu_memory_utilization=0.1",
        "vllm.batch_size=2",
        "vllm.max_num_seqs=16",
        "tps.top_k=2",
        "tps.max_branches=2",
        "tps.max_tokens=16",
    ]
    runner = CliRunner()
    sampled = runner.invoke(app, ["sample", "--dialogues", str(path), *overrides])
    assert sampled.exit_code == 0, sampled.output
    assert "4 turns" in sampled.output and "1 rejected" in sampled.output
    paired = runner.invoke(app, ["pairs", *overrides])
    assert paired.exit_code == 0, paired.output
    pairs = read_parquet(PreferencePair, tmp_path / "run" / "pairs" / "pairs.parquet")
    rejected = read_parquet(RejectedRow, tmp_path / "run" / "pairs" / "rejected.parquet")
    turn_rejections = {r.input_id for r in rejected if r.input_id != "hand/1"}
    assert {r.input_id for r in rejected} >= {"hand/1"}
    assert len({p.turn_id for p in pairs}) + len(turn_rejections) == 4
    assert all(p.chosen_score > p.rejected_score for p in pairs)
    missing = runner.invoke(app, ["pairs", f"run.run_dir={tmp_path / 'nowhere'}"])
    assert missing.exit_code == 2 and "run `ttpa sample` first" in missing.output


@pytest.mark.slow
def test_killed_engine_core_mid_tps_loses_and_duplicates_nothing(
    ray_cluster: Any, tiny_model_dir: Any, tmp_path: Any
) -> None:
    """SIGKILL to a replica's engine core in the middle of TPS (issue 17): every turn ends once, as
    candidates or a rejected row, and no turn is lost to the dead engine."""
    import pyarrow.parquet as pq
    from conftest import ServingEngineCoreKiller, engine_cores

    from ttpa_ray.config import load_config
    from ttpa_ray.records import RejectedRow, read_parquet
    from ttpa_ray.tps import run_sample_stage

    dialogues = [two_step_dialogue(f"hand/{i}") for i in range(8)] + bfcl_dialogues("simple_python", 24)
    config = load_config(
        None,
        [
            f"model.policy={tiny_model_dir}",
            "model.dtype=float32",
            "vllm.gpu_memory_utilization=0.1",
            "vllm.batch_size=2",
            "tps.top_k=2",
            "tps.max_branches=2",
            "tps.max_tokens=64",  # a longer stage: a wider window to kill the engine in
        ],
    )
    killer = ServingEngineCoreKiller(engine_cores())
    report = run_sample_stage(
        config, str(tiny_model_dir), dialogues, tmp_path / "tps", lambda _: killer.output_seen()
    )
    killer.pid()
    turns = pq.read_table(tmp_path / "tps" / "turns.parquet").column("turn_id").to_pylist()
    sampled = pq.read_table(tmp_path / "tps" / "candidates.parquet").column("turn_id").to_pylist()
    rejected = [r.input_id for r in read_parquet(RejectedRow, tmp_path / "tps" / "rejected.parquet")]
    assert len(turns) == report.turns == 40 and len(set(turns)) == 40
    assert set(sampled) | set(rejected) == set(turns) and not set(sampled) & set(rejected)
    assert len(rejected) == len(set(rejected))
