"""Is the teacher a judge? ``reverse.judge`` asked of a hand-labelled set, against chance.

Twelve dialogues over the built-in tools, their calls executed for real here, labelled by hand: six a
person could train on (the question is answered by the calls, the answer follows from their results)
and six that no one should (a question the calls cannot answer, an answer about something else, an
answer with the wrong values), the bad ones modelled on what the 135M teacher wrote on validation
seeds (bench/quality.py). The judge's prompt and schema are the reverse stage's own
(``ReverseBuilder._judge_request``), greedy, on one engine; a dialogue is kept when both its booleans
are true. Always keeping (or always dropping) scores 0.5 balanced accuracy: the judge is worth its step
only above that.

    .venv/bin/python bench/judge.py [--quick] [--model M]
Last line: ``judge_balanced_accuracy = <mean of the kept share of good and the dropped share of bad>``
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

WEATHER = ("get_weather", {"city": "Paris", "date": "2026-07-14"})
WEEKDAY = ("get_weekday", {"date": "2026-07-14"})
FLIGHTS = ("search_flights", {"origin": "Paris", "destination": "Rome", "date": "2026-05-01"})
HOTELS = ("search_hotels", {"city": "Rome", "check_in": "2026-05-01", "check_out": "2026-05-03"})
MONEY = ("convert_currency", {"amount": 250, "from_currency": "USD", "to_currency": "EUR"})
TIME = ("convert_time", {"time": "2026-03-02 09:00", "from_city": "London", "to_city": "Tokyo"})
CITY = ("get_city_info", {"city": "Mumbai"})

# (good?, question, calls, answer): {name} in an answer is filled from the first call's result
LABELLED: list[tuple[bool, str, list[tuple[str, dict[str, Any]]], str]] = [
    (
        True,
        "What will the weather be in Paris on 2026-07-14, and which weekday is that?",
        [WEATHER, WEEKDAY],
        "On {weekday}, 2026-07-14, Paris will be {condition} with a high of {high} degrees.",
    ),
    (
        True,
        "How much is 250 US dollars in euros, and what time is it in Tokyo at 09:00 in London on 2026-03-02?",
        [MONEY, TIME],
        "250 USD is {converted_amount} EUR, and it is {to_time} in Tokyo.",
    ),
    (
        True,
        "Can you find me a flight from Paris to Rome on 2026-05-01 and a hotel in Rome until 2026-05-03?",
        [FLIGHTS, HOTELS],
        "The cheapest flight is {flight_number}; in Rome, {hotel_name} is free.",
    ),
    (
        True,
        "Which weekday is 2026-07-14, and how is the weather in Paris that day?",
        [WEEKDAY, WEATHER],
        "2026-07-14 is a {weekday}; Paris will be {condition}.",
    ),
    (
        True,
        "What currency do they use in Mumbai, and how many euros do I get for 250 dollars?",
        [CITY, MONEY],
        "Mumbai uses the {currency}; 250 USD is {converted_amount} EUR.",
    ),
    (
        True,
        "I land in Tokyo; when it is 09:00 in London on 2026-03-02, what time is it there, and what "
        "weekday is 2026-07-14?",
        [TIME, WEEKDAY],
        "It is {to_time} in Tokyo, and 2026-07-14 is a {weekday}.",
    ),
    (
        False,
        "Can you provide a list of cities visited by Ava in 2022?",
        [FLIGHTS, WEEKDAY],
        "no flight matches that day and price",
    ),
    (
        False,
        "Can you tell me the weather in Paris on 2026-07-14?",
        [WEATHER, WEEKDAY],
        "Paris is a city in Europe that is located in the north of Europe.",
    ),
    (
        False,
        "Can you provide the user's order date and time?",
        [WEEKDAY, CITY],
        "I found that the user's order was placed on 2026-07-14.",
    ),
    (
        False,
        "What is the exchange rate between the euro and the yen?",
        [WEATHER, WEEKDAY],
        "It will be {condition} in Paris.",
    ),
    (
        False,
        "How much is 250 US dollars in euros, and what currency does Mumbai use?",
        [MONEY, CITY],
        "250 USD is 999 EUR, and Mumbai uses the yen.",
    ),
    (
        False,
        "Can you book me a table for two at an Italian restaurant in Rome?",
        [HOTELS, FLIGHTS],
        "I found that {hotel_name} is in Rome.",
    ),
]


def _fill(template: str, results: list[Any]) -> str:
    values: dict[str, Any] = {}
    for result in results:
        flat = dict(result) if isinstance(result, dict) else {}
        for key in ("flights", "hotels"):
            if flat.get(key):
                flat.update(flat[key][0])
                flat["hotel_name"] = flat.get("name", flat.get("hotel_name"))
        for key, value in flat.items():
            values.setdefault(key, value)
    return template.format(**values)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="the same twelve dialogues (the set is small)")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="the judge: a model name or tiny")
    args = parser.parse_args()

    from ttpa_ray.codec import ToolCall
    from ttpa_ray.config import load_config
    from ttpa_ray.engine import Engine
    from ttpa_ray.models import resolve_model
    from ttpa_ray.reverse import DialogueState, ReverseBuilder, Seed
    from ttpa_ray.tools.registry import ToolRegistry, load_catalogue

    if args.model == "tiny":
        from ttpa_ray.tiny_model import ensure_tiny_model

        model = str(ensure_tiny_model(Path(tempfile.gettempdir()) / "ttpa-bench-tiny", seed=0))
    else:
        model = resolve_model(args.model)
    config = load_config(ROOT / "configs" / "local.yaml", ["reverse.judge=true"])
    engine = Engine(model, config.vllm, dtype=config.model.dtype, seed=0)
    states = []
    with ToolRegistry(load_catalogue("builtin"), isolated=False) as registry:
        builder = ReverseBuilder(engine, registry, config.reverse, teacher=model)
        for i, (_, question, calls, answer) in enumerate(LABELLED):
            state = DialogueState(seed=Seed(f"judge-{i}", (), 4, i), tools=[])
            for name, arguments in calls:
                result = registry.call(name, arguments)
                assert result.ok, (name, result.error)
                state.trajectory.append((ToolCall(name, arguments), result.content))
            state.question, state.answer = question, _fill(answer, [r for _, r in state.trajectory])
            state.phase = "judge"
            states.append(state)
        requests = [builder._request(state) for state in states]  # the stage's prompt and sampling
        completions = engine.generate([p for p, _ in requests], [q for _, q in requests])
        for state, completion in zip(states, completions, strict=True):
            builder.advance(state, completion, None)
    engine.close()
    kept_good = kept_bad = 0
    for (good, question, _, _), state in zip(LABELLED, states, strict=True):
        kept = state.result is not None and not hasattr(state.result, "reason")
        kept_good += kept and good
        kept_bad += kept and not good
        print(
            f"{'good' if good else 'bad ':>4} -> {'kept   ' if kept else 'dropped'} {json.dumps(state.judge)}"
            f"  {question[:70]}"
        )
    goods = sum(1 for g, *_ in LABELLED if g)
    bads = len(LABELLED) - goods
    print(f"kept {kept_good}/{goods} good and {kept_bad}/{bads} bad dialogues")
    print(f"judge_balanced_accuracy = {(kept_good / goods + (bads - kept_bad) / bads) / 2:.3f}")


if __name__ == "__main__":
    main()
