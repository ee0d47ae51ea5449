"""The built-in catalogue: every tool answers deterministically from the bundled data, with clear errors."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from ttpa_ray.tools.registry import ToolRegistry, load_catalogue
from ttpa_ray.tools.sandbox import SandboxConfig


@pytest.fixture(scope="module")
def tools() -> Iterator[ToolRegistry]:
    with ToolRegistry(load_catalogue("builtin"), isolated=False) as registry:
        yield registry


def ok(tools: ToolRegistry, name: str, **arguments: Any) -> Any:
    result = tools.call(name, arguments)
    assert result.ok, result.error
    return result.content


def error(tools: ToolRegistry, name: str, **arguments: Any) -> str:
    result = tools.call(name, arguments)
    assert not result.ok and result.error is not None
    return result.error


def test_catalogue_loads_cleanly_with_described_parameters_and_enums() -> None:
    catalogue = load_catalogue("builtin")
    assert catalogue.errors == []
    assert 8 <= len(catalogue) <= 15
    for spec in catalogue.tools():
        assert spec.source == "builtin"
        assert spec.description
        for name, schema in spec.parameters["properties"].items():
            assert schema.get("description"), f"{spec.name}.{name} has no description"
    properties = {spec.name: spec.parameters["properties"] for spec in catalogue.tools()}
    assert properties["get_weather"]["unit"]["enum"] == ["celsius", "fahrenheit"]
    assert "JPY" in properties["convert_currency"]["to_currency"]["enum"]
    assert properties["search_flights"]["cabin"]["enum"] == [
        "economy",
        "premium_economy",
        "business",
        "first",
    ]
    assert properties["search_hotels"]["min_stars"]["enum"] == [1, 2, 3, 4, 5]
    assert "km" in properties["convert_units"]["from_unit"]["enum"]


def test_get_weather(tools: ToolRegistry) -> None:
    assert ok(tools, "get_weather", city="Tokyo", date="2026-08-01", unit="fahrenheit") == {
        "city": "Tokyo",
        "date": "2026-08-01",
        "condition": "sunny",
        "high": 86.0,
        "low": 72.3,
        "unit": "fahrenheit",
        "precipitation_mm": 0.0,
        "humidity_pct": 58,
        "wind_kph": 21.0,
    }
    from ttpa_ray.tools.builtin.weather import get_weather

    assert get_weather("paris", "2026-07-14")["high"] == 25.3  # called directly: any spelling, an alias
    with pytest.raises(ValueError, match="unknown city 'Atlantis'; known cities: Paris, London"):
        get_weather("Atlantis", "2026-08-01")
    assert error(tools, "get_weather", city="Atlantis", date="2026-08-01").startswith(
        'argument \'city\' must be one of "Paris", "London"'
    )
    assert error(tools, "get_weather", city="Paris", date="2025-08-01") == (
        "ValueError: no weather record for Paris on 2025-08-01; records cover 2026-01-01 to 2026-12-31"
    )
    assert error(tools, "get_weather", city="Paris", date="08/01/2026") == (
        "ValueError: date must be a date as YYYY-MM-DD, got '08/01/2026'"
    )
    assert error(tools, "get_weather", city="Paris") == (
        "missing required argument 'date' for get_weather; expected: city (string, one of Paris|London|"
        "Berlin|Madrid|Rome|New York|San Francisco|Toronto|Tokyo|Singapore|Dubai|Mumbai|Sydney, City name), "
        "date (string, YYYY-MM-DD), unit (string, optional, one of celsius|fahrenheit, Temperature unit of "
        "the answer)"
    )


def test_get_weather_summary(tools: ToolRegistry) -> None:
    summary = ok(tools, "get_weather_summary", city="London", start_date="2026-12-01", end_date="2026-12-07")
    assert summary["days"] == 7 and summary["rainy_days"] == 3
    assert (summary["highest"], summary["lowest"], summary["total_precipitation_mm"]) == (10.9, 0.0, 30.8)
    assert sum(summary["conditions"].values()) == 7
    assert "before start_date" in error(
        tools, "get_weather_summary", city="Rome", start_date="2026-05-02", end_date="2026-05-01"
    )
    assert "at most 62 days" in error(
        tools, "get_weather_summary", city="Rome", start_date="2026-01-01", end_date="2026-06-01"
    )


def test_convert_units(tools: ToolRegistry) -> None:
    assert ok(tools, "convert_units", value=26.2, from_unit="mi", to_unit="km")["result"] == 42.1648
    assert ok(tools, "convert_units", value=100, from_unit="celsius", to_unit="fahrenheit")["result"] == 212.0
    assert ok(tools, "convert_units", value=1, from_unit="gal", to_unit="l")["result"] == 3.78541
    assert ok(tools, "convert_units", value=2, from_unit="GB", to_unit="MB")["result"] == 2000.0
    assert error(tools, "convert_units", value=1, from_unit="kg", to_unit="km") == (
        "ValueError: cannot convert mass (kg) to length (km)"
    )
    assert "argument 'to_unit' must be one of" in error(
        tools, "convert_units", value=1, from_unit="kg", to_unit="x"
    )


def test_currency_tools(tools: ToolRegistry) -> None:
    converted = ok(tools, "convert_currency", amount=250, from_currency="GBP", to_currency="USD")
    assert (converted["converted_amount"], converted["rate"], converted["as_of"]) == (
        316.46,
        1.265823,
        "2026-01-01",
    )
    assert ok(tools, "get_exchange_rate", from_currency="USD", to_currency="JPY")["rate"] == 151.4
    assert ok(tools, "get_exchange_rate", from_currency="EUR", to_currency="EUR")["rate"] == 1.0
    assert error(tools, "convert_currency", amount=-5, from_currency="EUR", to_currency="USD") == (
        "ValueError: amount must not be negative, got -5"
    )


def test_convert_time_follows_daylight_saving(tools: ToolRegistry) -> None:
    summer = ok(tools, "convert_time", time="2026-07-01 09:00", from_city="New York", to_city="Mumbai")
    assert (summer["to_time"], summer["from_utc_offset"], summer["to_utc_offset"]) == (
        "2026-07-01 18:30",
        "UTC-04:00",
        "UTC+05:30",
    )
    southern = ok(tools, "convert_time", time="2026-01-15 18:30", from_city="Sydney", to_city="London")
    assert (southern["to_time"], southern["from_utc_offset"]) == ("2026-01-15 07:30", "UTC+11:00")
    assert "YYYY-MM-DD HH:MM" in error(tools, "convert_time", time="9am", from_city="Paris", to_city="Rome")


def test_get_time_difference_changes_with_the_dst_calendars(tools: ToolRegistry) -> None:
    # The US switches three weeks before Europe: London-New York is 4 h in between, 5 h otherwise.
    between = ok(tools, "get_time_difference", from_city="London", to_city="New York", date="2026-03-20")
    after = ok(tools, "get_time_difference", from_city="London", to_city="New York", date="2026-04-20")
    assert (between["difference_hours"], after["difference_hours"]) == (-4.0, -5.0)
    assert (
        ok(tools, "get_time_difference", from_city="Paris", to_city="Tokyo", date="2026-01-10")[
            "difference_hours"
        ]
        == 8.0
    )


def test_calendar_tools(tools: ToolRegistry) -> None:
    assert ok(tools, "add_days", date="2026-12-30", days=5) == {"date": "2027-01-04", "weekday": "Monday"}
    assert ok(tools, "add_days", date="2026-03-01", days=-1) == {"date": "2026-02-28", "weekday": "Saturday"}
    assert ok(tools, "days_between", start_date="2026-03-02", end_date="2026-03-16") == {
        "start_date": "2026-03-02",
        "end_date": "2026-03-16",
        "days": 14,
        "weeks": 2,
        "business_days": 10,
    }
    assert ok(tools, "days_between", start_date="2026-03-16", end_date="2026-03-02")["business_days"] == -10
    assert ok(tools, "get_weekday", date="2026-02-14") == {
        "date": "2026-02-14",
        "weekday": "Saturday",
        "iso_week": 7,
        "day_of_year": 45,
        "is_weekend": True,
    }
    assert "must be integer, got boolean" in error(tools, "add_days", date="2026-01-01", days=True)


def test_search_flights(tools: ToolRegistry) -> None:
    result = ok(
        tools, "search_flights", origin="London", destination="Paris", date="2026-06-10", max_price=90
    )
    assert result["flights"] == [
        {
            "flight_number": "BA1673",
            "airline": "British Airways",
            "origin": "London (LHR)",
            "destination": "Paris (CDG)",
            "departure": "2026-06-10 23:10",
            "arrival": "2026-06-11 01:10",
            "duration_minutes": 60,
            "cabin": "economy",
            "price_usd": 79.05,
            "seats_left": 8,
        }
    ]
    business = ok(
        tools, "search_flights", origin="Paris", destination="New York", date="2026-05-04", cabin="business"
    )
    prices = [flight["price_usd"] for flight in business["flights"]]
    assert prices == sorted(prices) and len(prices) == 2 and prices[0] > 1000
    assert business["flights"][0]["arrival"] == "2026-05-04 20:45"  # 19:00 CEST + 7 h 45 - 6 h
    no_route = ok(tools, "search_flights", origin="London", destination="Tokyo", date="2026-06-10")
    assert no_route["flights"] == [] and "no direct flights" in no_route["note"]
    assert "same city" in error(
        tools, "search_flights", origin="Paris", destination="Paris", date="2026-06-10"
    )
    # called directly, the function also takes airport codes (the schema offers the city names)
    from ttpa_ray.tools.builtin.flights import search_flights

    assert search_flights("LHR", "CDG", "2026-06-10", max_price=90)["flights"] == result["flights"]


def test_search_hotels(tools: ToolRegistry) -> None:
    result = ok(
        tools,
        "search_hotels",
        city="Paris",
        check_in="2026-06-05",
        check_out="2026-06-08",
        sort_by="rating",
        min_stars=4,
    )
    assert result["nights"] == 3
    assert [hotel["hotel_id"] for hotel in result["hotels"]] == ["H104", "H103"]
    assert result["hotels"][0]["total_price_usd"] == round(
        635 * (1 + 2 * 1.15), 2
    )  # Friday and Saturday nights
    cheap = ok(
        tools,
        "search_hotels",
        city="Mumbai",
        check_in="2026-02-02",
        check_out="2026-02-03",
        max_price_per_night=100,
    )
    assert all(hotel["price_per_night_usd"] <= 100 for hotel in cheap["hotels"]) and cheap["hotels"]
    assert "must be after check_in" in error(
        tools, "search_hotels", city="Rome", check_in="2026-05-02", check_out="2026-05-02"
    )


def test_get_city_info(tools: ToolRegistry) -> None:
    from ttpa_ray.tools.builtin.cities import get_city_info

    info = ok(tools, "get_city_info", city="Mumbai")
    assert get_city_info("bombay") == info  # aliases, called directly
    assert (info["city"], info["currency"], info["standard_utc_offset"], info["airport"]) == (
        "Mumbai",
        "INR",
        "UTC+05:30",
        "BOM",
    )


def test_every_builtin_tool_answers_the_same_through_the_sandbox(tools: ToolRegistry) -> None:
    samples = {
        "get_weather": {"city": "Berlin", "date": "2026-02-01"},
        "get_weather_summary": {"city": "Dubai", "start_date": "2026-07-01", "end_date": "2026-07-31"},
        "convert_units": {"value": 3, "from_unit": "ft", "to_unit": "cm"},
        "convert_currency": {"amount": 10, "from_currency": "CHF", "to_currency": "SEK"},
        "get_exchange_rate": {"from_currency": "AUD", "to_currency": "SGD"},
        "convert_time": {"time": "2026-10-25 02:30", "from_city": "Berlin", "to_city": "Toronto"},
        "get_time_difference": {"from_city": "Sydney", "to_city": "Dubai", "date": "2026-10-05"},
        "add_days": {"date": "2024-02-28", "days": 1},
        "days_between": {"start_date": "2026-01-01", "end_date": "2027-01-01"},
        "get_weekday": {"date": "2026-12-31"},
        "search_flights": {"origin": "Singapore", "destination": "Sydney", "date": "2026-09-09"},
        "search_hotels": {"city": "Toronto", "check_in": "2026-09-01", "check_out": "2026-09-04"},
        "get_city_info": {"city": "San Francisco"},
    }
    assert set(samples) == set(load_catalogue("builtin").names)
    with ToolRegistry(load_catalogue("builtin"), SandboxConfig(workers=1)) as sandboxed:
        for name, arguments in samples.items():
            inside, outside = sandboxed.call(name, arguments), tools.call(name, arguments)
            assert inside.ok, inside.error
            assert inside.content == outside.content


def test_city_parameters_offer_exactly_the_cities_the_data_covers() -> None:
    """A teacher that invents a city gets a tool error (the most common failed call of the 135M teacher
    on validation seeds, bench/quality.py): every city parameter's enum is the bundled data's cities, and
    an invented city is refused naming them."""
    from ttpa_ray.tools.builtin._data import city_names

    specs = load_catalogue("builtin").specs
    offered = {
        (name, key): schema.get("enum")
        for name, spec in specs.items()
        for key, schema in spec.parameters["properties"].items()
        if key in {"city", "origin", "destination", "from_city", "to_city"}
    }
    assert len(offered) == 10
    assert all(enum == city_names() for enum in offered.values()), offered
