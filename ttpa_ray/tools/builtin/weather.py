"""Weather tools over the bundled daily weather table (13 cities, every day of 2026)."""

from __future__ import annotations

import datetime as dt
from functools import cache
from typing import Any, Literal

from ttpa_ray.tools.builtin._data import City, find_city, load_csv, parse_date

_MAX_SUMMARY_DAYS = 62


@cache
def _table() -> dict[tuple[str, str], dict[str, str]]:
    return {(row["city"], row["date"]): row for row in load_csv("weather.csv")}


@cache
def _coverage() -> tuple[str, str]:
    dates = sorted({date for _, date in _table()})
    return dates[0], dates[-1]


def _temperature(celsius: float, unit: str) -> float:
    return round(celsius * 9 / 5 + 32, 1) if unit == "fahrenheit" else round(celsius, 1)


def _record(city: str, day: dt.date) -> dict[str, str]:
    row = _table().get((city, day.isoformat()))
    if row is None:
        first, last = _coverage()
        raise ValueError(
            f"no weather record for {city} on {day.isoformat()}; records cover {first} to {last}"
        )
    return row


def get_weather(city: City, date: str, unit: Literal["celsius", "fahrenheit"] = "celsius") -> dict[str, Any]:
    """
    Get the recorded weather of a city on one day: conditions, temperatures, rain, humidity and wind.

    Args:
        city: City name.
        date: Date in 2026 as YYYY-MM-DD (records cover 2026).
        unit: Temperature unit of the answer.

    Returns:
        The day's weather record.
    """
    record = find_city(city)
    day = parse_date(date)
    row = _record(record["city"], day)
    return {
        "city": record["city"],
        "date": day.isoformat(),
        "condition": row["condition"],
        "high": _temperature(float(row["high_c"]), unit),
        "low": _temperature(float(row["low_c"]), unit),
        "unit": unit,
        "precipitation_mm": float(row["precipitation_mm"]),
        "humidity_pct": int(row["humidity_pct"]),
        "wind_kph": float(row["wind_kph"]),
    }


def get_weather_summary(
    city: City, start_date: str, end_date: str, unit: Literal["celsius", "fahrenheit"] = "celsius"
) -> dict[str, Any]:
    """
    Summarise the weather of a city over a period: temperature extremes and averages, rainy days, total rain.

    Args:
        city: City name.
        start_date: First day in 2026 as YYYY-MM-DD (records cover 2026).
        end_date: Last day as YYYY-MM-DD (inclusive, at most 62 days after start_date).
        unit: Temperature unit of the answer.

    Returns:
        Statistics over the days of the period.
    """
    record = find_city(city)
    start, end = parse_date(start_date, "start_date"), parse_date(end_date, "end_date")
    if end < start:
        raise ValueError(f"end_date {end_date} is before start_date {start_date}")
    days = (end - start).days + 1
    if days > _MAX_SUMMARY_DAYS:
        raise ValueError(
            f"the period spans {days} days; at most {_MAX_SUMMARY_DAYS} days are summarised at once"
        )
    rows = [_record(record["city"], start + dt.timedelta(days=offset)) for offset in range(days)]
    highs = [float(row["high_c"]) for row in rows]
    lows = [float(row["low_c"]) for row in rows]
    rain = [float(row["precipitation_mm"]) for row in rows]
    conditions: dict[str, int] = {}
    for row in rows:
        conditions[row["condition"]] = conditions.get(row["condition"], 0) + 1
    return {
        "city": record["city"],
        "start_date": start.isoformat(),
        "end_date": end.isoformat(),
        "days": days,
        "unit": unit,
        "highest": _temperature(max(highs), unit),
        "lowest": _temperature(min(lows), unit),
        "average_high": _temperature(sum(highs) / days, unit),
        "average_low": _temperature(sum(lows) / days, unit),
        "rainy_days": sum(1 for amount in rain if amount > 0),
        "total_precipitation_mm": round(sum(rain), 1),
        "conditions": dict(sorted(conditions.items(), key=lambda item: (-item[1], item[0]))),
    }
