"""The text gates of reversed construction (ttpa_ray/quality.py): the degenerate texts a 135M teacher
wrote in real runs are rejected with their reason, and fluent texts of the same kind pass."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from ttpa_ray.codec import ToolCall
from ttpa_ray.quality import (
    Gates,
    question_bigrams,
    question_key,
    repeated_ngram_share,
    restates_schema,
    ungrounded_values,
)
from ttpa_ray.records import reject
from ttpa_ray.reverse import PROMPT_LEAKS

GATES = Gates(leaks=PROMPT_LEAKS)

WEATHER = {"city": "London", "date": "2026-01-01", "max_rainfall_cm": 8.0, "summary": "light rain"}
FLIGHTS = {"flights": [{"number": "AF1234", "from": "Paris", "to": "Tokyo", "price_eur": 812.5}]}
KNOWN = [WEATHER, FLIGHTS, {"city": "London"}, "Anna is planning a trip from Paris to Tokyo in spring."]

FLUENT_QUESTIONS = [
    "Can you find me a flight from Paris to Tokyo and tell me how much it costs?",
    "What will the weather be like in London on 2026-01-01, and is there a cheap flight from Paris to Tokyo?",
    "I need to know the rainfall in London on January 1st, 2026, and the price of flight AF1234 in euros.",
    "Could you check the local time in Tokyo and convert 250 US dollars to Japanese yen for me?",
    "I'm flying from Paris to Tokyo next week: which flights are there, and what will the weather be "
    "in London when I come back on 2026-01-01?",
]
FLUENT_ANSWERS = [
    "Flight AF1234 from Paris to Tokyo costs 812.5 EUR. In London on 2026-01-01 expect light rain, "
    "with up to 8 cm of rainfall.",
    "The cheapest flight is AF1234 at 812.5 euros; London will have light rain on 2026-01-01.",
    "There is light rain in London, with at most 8.0 cm of rain, and flight AF1234 goes from Paris to Tokyo.",
]


@pytest.mark.parametrize("question", FLUENT_QUESTIONS)
def test_fluent_questions_pass(question: str) -> None:
    assert GATES.question(question, FLUENT_ANSWERS[0], KNOWN[-1]) is None
    assert GATES.question(question, "Sunny.", "s") is None  # a short text is in everything: no copy


@pytest.mark.parametrize("answer", FLUENT_ANSWERS)
def test_fluent_grounded_answers_pass(answer: str) -> None:
    assert GATES.answer(answer, KNOWN) is None


def test_fluent_arguments_pass() -> None:
    calls = [
        ToolCall("search_flights", {"origin": "Paris", "destination": "Tokyo", "date": "2026-03-02"}),
        ToolCall(
            "send_message", {"to": "anna", "text": "Your flight AF1234 leaves Paris at 10:05 tomorrow."}
        ),
        ToolCall("weather", {"city": "London", "days": 3, "units": ["metric"]}),
        ToolCall("open", {"url": "https://example.org/a/very/long/path/to/a/page/about/the_weather_today"}),
    ]
    assert GATES.arguments(calls) is None


@pytest.mark.parametrize(
    ("question", "reason"),
    [
        # the texts make run admitted at c41e51e and issue 31 quotes
        (
            "2026-01-01:10.010.7.2026.00:10.010.7.2026.00:10.010.7.2026.00:10.010.7.2026.00",
            "repetitive_question",
        ),
        ("The answer is: The answer is: The answer is: The answer is: The answer is:", "repetitive_question"),
        ("Weather?", "question_length"),
        ("Can you run get_exchange_rate_between_euro_and_usd for me please?", "unreadable_question"),
        ("London?? ??", "question_length"),
        ("No calls left: call answer now. What is the weather in London?", "prompt_leak"),
        ("Scenario: Anna is planning a trip. What flights are there?", "prompt_leak"),
        (FLUENT_ANSWERS[0], "question_copies_text"),
        ("Anna is planning a trip from Paris to Tokyo in spring", "question_copies_text"),
    ],
)
def test_degenerate_questions_are_rejected_with_their_reason(question: str, reason: str) -> None:
    verdict = GATES.question(question, FLUENT_ANSWERS[0], KNOWN[-1])
    assert verdict is not None and verdict.reason == reason, verdict


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        (
            "The answer is 0.92% of the answer is 0.92% of the answer is 0.92% of the answer is 0.92%",
            "repetitive_answer",
        ),
        ("light rain in London. finish with answer soon. 1 call left: AF1234", "prompt_leak"),
        ("No calls left: call 'answer' now. 1000000000 AF1234", "prompt_leak"),
        # invents values: no tool returned 2.5 or a lowest rainfall
        ("The highest rainfall in London in 2026 was 8.0 cm and the lowest was 2.5 cm.", "answer_ungrounded"),
        ('Your flight is "AF9999" from Paris, 812.5 EUR.', "answer_ungrounded"),
        ("AF", "answer_length"),
        # answers the 135M teacher wrote on validation seeds (bench/quality.py)
        (
            "no_response_text_to_return_to_user_with_error_message_returned_to_user_with_none2026-01-01",
            "unreadable_answer",
        ),
        (
            "no_calls_left_now_returned_to_user_returned_to_user_returned_to_user_returned_toMumbai",
            "repetitive_answer",
        ),
    ],
)
def test_degenerate_answers_are_rejected_with_their_reason(answer: str, reason: str) -> None:
    verdict = GATES.answer(answer, KNOWN)
    assert verdict is not None and verdict.reason == reason, verdict


def test_repetitive_scenario_is_rejected_and_a_fluent_one_passes() -> None:
    looping = "The team of the team of the team of the team of the team of the team of the team of the team"
    verdict = GATES.scenario(looping)
    assert verdict is not None and verdict.reason == "repetitive_scenario"
    assert GATES.scenario(KNOWN[-1]) is None
    digits = "The city has 1000000000000000000000000000000000000000000000000000000000000000000000000000"
    verdict = GATES.scenario(digits)  # seen on validation seeds
    assert verdict is not None and verdict.reason == "unreadable_scenario"


def test_repetitive_argument_is_rejected() -> None:
    calls = [
        ToolCall("weather", {"city": "London"}),
        ToolCall("calculator", {"expression": " x 4 0 0 0 0 1 0 0 1 0 0 0 0 1 0 0 1 0 0 0 0 1 0 0 1"}),
    ]
    verdict = GATES.arguments(calls)
    assert verdict is not None and verdict.reason == "repetitive_argument"
    assert "calculator.expression" in verdict.detail


def test_repeated_lines_count() -> None:
    text = "Flight AF1 leaves at 10.\nFlight AF1 leaves at 10.\nFlight AF1 leaves at 10.\nThat is all."
    verdict = GATES.answer(text, ["AF1", 10])
    assert verdict is not None and verdict.reason == "repetitive_answer"


def test_thresholds_come_from_the_gates() -> None:
    text = "the cat sat on the mat and the cat sat on the mat again today"
    share = repeated_ngram_share(text)
    assert 0.3 < share < 0.7
    assert Gates(max_repeated_ngram_share=0.9).question(text, "", "") is None
    assert Gates(max_repeated_ngram_share=0.3).question(text, "", "") is not None


def test_grounding_rounds_at_the_answers_precision_and_reads_arguments() -> None:
    sources = [{"temperature_c": 12.345, "pressure": 1013}, {"amount": 250}]
    assert (
        ungrounded_values("It is 12.3 C (12 rounded), 1,013 hPa; you asked about 250 dollars.", sources) == []
    )
    assert ungrounded_values("It is 12.4 C.", sources) == ["12.4"]
    assert ungrounded_values("It's London's wettest day.", sources) == []  # apostrophes are no quotes


def test_lenient_grounding_is_a_setting() -> None:
    answer = "The highest rainfall in London was 8.0 cm and the lowest was 2.5 cm."
    assert Gates(strict_grounding=False).answer(answer, KNOWN) is None


def test_question_key_finds_near_duplicates_and_keeps_word_order() -> None:
    same = [
        "Can you tell me the weather in Paris?",
        "the weather in paris, please",
        "What is the weather in Paris ?",
    ]
    assert len({question_key(q) for q in same}) == 1
    assert question_key("flights from Paris to Lyon") != question_key("flights from Lyon to Paris")
    assert question_key("weather in Paris on 2026-01-01") != question_key("weather in Paris on 2026-01-02")
    assert question_bigrams("Flights to Paris?") == ["flights to", "to paris"]


def test_restated_schema_is_found_and_answers_are_not() -> None:
    schema = {"type": "object", "properties": {"results": {"type": "array"}}}
    assert restates_schema({"query": {"type": ["string", "description"]}}, schema) == "query.type"
    assert restates_schema({"properties": {"city": {"type": "string"}}}, None) == "properties"
    assert restates_schema({"results": [{"title": "x", "type": "object"}]}, schema) == "results[0].type"
    # a declared "type" key, a type that is no JSON type, and plain answers pass
    declared = {"type": "object", "properties": {"type": {"type": "string"}}}
    assert restates_schema({"type": "string"}, declared) is None
    assert restates_schema({"results": [{"title": "x", "type": "museum"}]}, schema) is None
    assert restates_schema({"temperature": 12, "summary": "rain"}, None) is None


def test_duplicate_questions_across_shards_are_rejected_in_ray_data(
    ray_cluster: object, tmp_path: Path
) -> None:
    """Two shards whose dialogues ask the same questions in other spellings: the first seed's dialogue
    of each question is kept, later copies become ``duplicate_question`` rows naming it, and every
    seed still ends once (the manifest's check)."""
    from conftest import executed_dialogues

    from ttpa_ray.records import Message, RejectedRow, read_parquet, write_parquet
    from ttpa_ray.reverse import Seed, read_dialogues, shard_paths, write_manifest

    base = executed_dialogues()[0]
    questions = [
        "What weekday is 2026-03-14, and what date is ten days later?",  # seed 0: kept
        "Which day is 2026-03-14 and the date 10 days after it?",  # seed 1: kept (other words)
        "what weekday is 2026-03-14 and what date is ten days later",  # seed 2: copy of seed 0
        "Can you tell me: what weekday is 2026-03-14, and what date is ten days later?",  # seed 3: copy
        "What weekday is 2026-03-15, and what date is ten days later?",  # seed 4: kept (another date)
    ]
    seeds = [Seed(f"seed-0-{i:06d}", ("get_weekday", "add_days"), 4, i) for i in range(len(questions) + 1)]
    dialogues = [
        replace(
            base,
            dialogue_id=f"dlg-{seed.seed_id}",
            seed_id=seed.seed_id,
            messages=(base.messages[0], Message("user", q), *base.messages[2:]),
        )
        for seed, q in zip(seeds, questions, strict=False)
    ]
    # shard 1 holds seeds 3-5 (its first and third in reverse order: order on disk does not decide)
    shards = [("shard-00000", seeds[:3]), ("shard-00001", seeds[3:])]
    failed = reject(seeds[5].seed_id, "reverse", "restart", "restarted", {})
    for (sid, shard_seeds), records in (
        (shards[0], dialogues[:3]),
        (shards[1], [dialogues[4], dialogues[3]]),
    ):
        paths = shard_paths(tmp_path, sid)
        write_parquet(records, paths["dialogues"])
        write_parquet([failed] if sid == "shard-00001" else [], paths["rejected"], RejectedRow)
        marker = {
            "dialogues": len(records),
            "rejected": 1 if sid == "shard-00001" else 0,
            "tokens": 0,
            "busy": 0.0,
            "seconds": 1.0,
            "reasons": {"restart": 1} if sid == "shard-00001" else {},
            "seed_ids": [s.seed_id for s in shard_seeds],
        }
        Path(paths["done"]).write_text(json.dumps(marker))

    report = write_manifest(tmp_path, seeds, shards, 1.0, dedup=True, catalogue_tools=13)

    assert (report.seeds, report.dialogues, report.rejected) == (6, 3, 3)
    assert report.reasons == {"restart": 1, "duplicate_question": 2}
    quality = report.quality
    assert quality["yield"] == 0.5 and quality["duplicate_share"] == 0.4 and quality["degenerate_share"] == 0
    assert quality["calls_per_dialogue"] == quality["tools_per_dialogue"] == 2
    assert quality["catalogue_tools_used"] == round(2 / 13, 4)  # get_weekday and add_days
    assert 0.5 < quality["question_distinct_2grams"] < 1  # two questions share most of their words
    kept = read_dialogues(tmp_path)
    assert [d.seed_id for d in kept] == [s.seed_id for s in (seeds[0], seeds[1], seeds[4])]
    assert kept[0] == dialogues[0]  # the records come back whole
    copies = sorted(read_parquet(RejectedRow, tmp_path / "duplicates"), key=lambda r: r.input_id)
    assert [(r.input_id, r.reason) for r in copies] == [
        (seeds[2].seed_id, "duplicate_question"),
        (seeds[3].seed_id, "duplicate_question"),
    ]
    assert all("the question of dlg-seed-0-000000 again" in r.detail for r in copies)
    assert copies[1].payload_object()["messages"][1]  # the copy itself is kept as the payload
    again = write_manifest(tmp_path, seeds, shards, 1.0, dedup=True)  # a rerun writes the same
    assert (again.dialogues, again.rejected) == (3, 3) and read_dialogues(tmp_path) == kept


def test_the_report_has_a_data_quality_section() -> None:
    from ttpa_ray.evaluate import render_data_quality

    quality = {
        "seeds": 48,
        "dialogues": 9,
        "yield": 0.1875,
        "reasons": {"repetitive_answer": 12, "restart": 3},
        "degenerate_share": 0.25,
        "duplicate_share": 0.1,
        "simulated_invalid_share": None,
        "calls_per_dialogue": 2.5,
        "tools_per_dialogue": 2.0,
        "question_distinct_2grams": 0.8,
        "catalogue_tools_used": 0.6154,
    }
    text = render_data_quality(quality)
    assert "## Data quality (reversed construction)" in text
    assert "| 48 | 9 | 18.8% | 25.0% | 10.0% | 80.0% | 2.50 | 2.00 | 61.5% | - |" in text
    assert "Rejected by reason: repetitive_answer 12, restart 3" in text
    assert render_data_quality(None) == ""


def test_a_question_about_something_else_than_the_calls_is_caught_when_asked() -> None:
    """reverse.quality.call_values_in_question: each call needs one of its values in the question (the
    first and third questions are what make run's 135M teacher wrote over these calls)."""
    rate = ToolCall("get_exchange_rate", {"from_currency": "AUD", "to_currency": "SGD"})
    weather = ToolCall("get_weather_summary", {"city": "Paris", "start_date": "2026-01-01"})
    money = ToolCall("convert_currency", {"amount": 1.0, "from_currency": "USD", "to_currency": "EUR"})
    strict = Gates(call_values_in_question=True, leaks=PROMPT_LEAKS)
    verdict = strict.question(
        "Can you provide me with the latest weather forecast for Paris?", "", "", [rate, weather]
    )
    assert (
        verdict is not None
        and verdict.reason == "question_misses_call"
        and "get_exchange_rate" in verdict.detail
    )
    fine = "What is the AUD to SGD rate, and how was the weather in Paris from 2026-01-01?"
    assert strict.question(fine, "", "", [rate, weather]) is None
    assert (
        strict.question(
            "Can you give me the exchange rate between USD and EUR for 1 dollar?", "", "", [money]
        )
        is None
    )
    assert (
        GATES.question("Can you provide me with the latest weather forecast for Paris?", "", "", [rate])
        is None
    )
