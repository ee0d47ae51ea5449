"""Clock arithmetic of the bundled city table: UTC offsets with daylight-saving rules (private module)."""

from __future__ import annotations

import datetime as dt
from typing import Any


def _nth_sunday(year: int, month: int, n: int) -> dt.date:
    first = dt.date(year, month, 1)
    first_sunday = first + dt.timedelta(days=(6 - first.weekday()) % 7)
    return first_sunday + dt.timedelta(weeks=n - 1)


def _last_sunday(year: int, month: int) -> dt.date:
    following = dt.date(year + month // 12, month % 12 + 1, 1)
    last = following - dt.timedelta(days=1)
    return last - dt.timedelta(days=(last.weekday() - 6) % 7)


def at(day: dt.date, hour: int) -> dt.datetime:
    """Midnight of ``day`` plus ``hour`` hours (naive)."""
    return dt.datetime(day.year, day.month, day.day, hour)


def _daylight_saving(rule: str, standard: int, utc: dt.datetime) -> bool:
    """Whether daylight saving time is in force at the UTC instant ``utc``."""
    year = utc.year
    std = dt.timedelta(minutes=standard)
    if rule == "eu":  # last Sunday of March to last Sunday of October, at 01:00 UTC
        return at(_last_sunday(year, 3), 1) <= utc < at(_last_sunday(year, 10), 1)
    if rule == "us":  # second Sunday of March 02:00 local to first Sunday of November 02:00 local
        start = at(_nth_sunday(year, 3, 2), 2) - std
        end = at(_nth_sunday(year, 11, 1), 1) - std
        return start <= utc < end
    if rule == "au":  # southern summer: first Sunday of October 02:00 to first Sunday of April 03:00 local
        start = at(_nth_sunday(year, 10, 1), 2) - std
        end = at(_nth_sunday(year, 4, 1), 2) - std
        return utc >= start or utc < end
    return False


def offset_minutes(record: dict[str, Any], utc: dt.datetime) -> int:
    """The city's UTC offset in minutes at the UTC instant ``utc``."""
    standard = int(record["utc_offset_minutes"])
    return standard + (60 if _daylight_saving(record["dst_rule"], standard, utc) else 0)


def format_offset(minutes: int) -> str:
    """``UTC+05:30`` style text of an offset in minutes."""
    sign = "+" if minutes >= 0 else "-"
    hours, rest = divmod(abs(minutes), 60)
    return f"UTC{sign}{hours:02d}:{rest:02d}"


def local_to_utc(record: dict[str, Any], local: dt.datetime) -> dt.datetime:
    """The UTC instant of a local wall-clock time in the city."""
    # Read the offset at the standard-time guess: a local time inside a DST switch resolves one way.
    guess = local - dt.timedelta(minutes=int(record["utc_offset_minutes"]))
    return local - dt.timedelta(minutes=offset_minutes(record, guess))
