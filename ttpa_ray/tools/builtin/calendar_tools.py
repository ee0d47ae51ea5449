"""Calendar arithmetic: shifting dates, counting days and business days, naming weekdays."""

from __future__ import annotations

import datetime as dt
from typing import Any

from ttpa_ray.tools.builtin._data import parse_date

_MAX_DAYS = 36600  # a century either way keeps results inside the calendar


def _business_days(start: dt.date, end: dt.date) -> int:
    """Monday-to-Friday days in [start, end)."""
    full_weeks, rest = divmod((end - start).days, 7)
    count = full_weeks * 5
    for offset in range(rest):
        if (start + dt.timedelta(days=full_weeks * 7 + offset)).weekday() < 5:
            count += 1
    return count


def add_days(date: str, days: int) -> dict[str, Any]:
    """
    Add a number of days to a date (subtract with a negative number).

    Args:
        date: Start date as YYYY-MM-DD.
        days: Days to add; negative to go back in time.

    Returns:
        The resulting date and its weekday.
    """
    if abs(days) > _MAX_DAYS:
        raise ValueError(f"days must be between -{_MAX_DAYS} and {_MAX_DAYS}, got {days}")
    result = parse_date(date) + dt.timedelta(days=days)
    return {"date": result.isoformat(), "weekday": result.strftime("%A")}


def days_between(start_date: str, end_date: str) -> dict[str, Any]:
    """
    Count the days from one date to another, in calendar days, whole weeks and business days (Monday to
    Friday, public holidays not excluded).

    Args:
        start_date: First date as YYYY-MM-DD.
        end_date: Second date as YYYY-MM-DD; negative counts when it is before start_date.

    Returns:
        Day counts from start_date (included) to end_date (excluded).
    """
    start, end = parse_date(start_date, "start_date"), parse_date(end_date, "end_date")
    sign = 1 if end >= start else -1
    low, high = min(start, end), max(start, end)
    days = (high - low).days
    return {
        "start_date": start.isoformat(),
        "end_date": end.isoformat(),
        "days": sign * days,
        "weeks": sign * (days // 7),
        "business_days": sign * _business_days(low, high),
    }


def get_weekday(date: str) -> dict[str, Any]:
    """
    Get the weekday of a date, with its ISO week number and day of the year.

    Args:
        date: Date as YYYY-MM-DD.

    Returns:
        The weekday name, ISO week, day of the year and whether it falls on a weekend.
    """
    day = parse_date(date)
    return {
        "date": day.isoformat(),
        "weekday": day.strftime("%A"),
        "iso_week": day.isocalendar().week,
        "day_of_year": day.timetuple().tm_yday,
        "is_weekend": day.weekday() >= 5,
    }
