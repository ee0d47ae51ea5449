"""Local times and time differences between the catalogue's cities.

Offsets come from the bundled city table (standard offset + daylight-saving rule: European, North
American, Australian or none), not from the host's time-zone database, so answers are the same on
every machine.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from ttpa_ray.tools.builtin._clock import at, format_offset, local_to_utc, offset_minutes
from ttpa_ray.tools.builtin._data import City, find_city, parse_date

_TIME_FORMAT_HINT = "YYYY-MM-DD HH:MM"


def _parse_local(text: str) -> dt.datetime:
    try:
        return dt.datetime.strptime(str(text).strip(), "%Y-%m-%d %H:%M")
    except ValueError:
        raise ValueError(f"time must be a local date and time as {_TIME_FORMAT_HINT}, got {text!r}") from None


def convert_time(time: str, from_city: City, to_city: City) -> dict[str, Any]:
    """
    Convert a local date and time in one city to the local date and time in another city, daylight saving
    time included.

    Args:
        time: Local date and time in from_city as YYYY-MM-DD HH:MM (24-hour clock).
        from_city: City whose local time is given.
        to_city: City to convert the time to.

    Returns:
        The same instant in both cities' local times, with their UTC offsets.
    """
    source, target = find_city(from_city, "from_city"), find_city(to_city, "to_city")
    utc = local_to_utc(source, _parse_local(time))
    source_offset, target_offset = offset_minutes(source, utc), offset_minutes(target, utc)
    converted = utc + dt.timedelta(minutes=target_offset)
    return {
        "from_city": source["city"],
        "from_time": (utc + dt.timedelta(minutes=source_offset)).strftime("%Y-%m-%d %H:%M"),
        "from_utc_offset": format_offset(source_offset),
        "to_city": target["city"],
        "to_time": converted.strftime("%Y-%m-%d %H:%M"),
        "to_utc_offset": format_offset(target_offset),
        "utc_time": utc.strftime("%Y-%m-%d %H:%M"),
    }


def get_time_difference(from_city: City, to_city: City, date: str) -> dict[str, Any]:
    """
    Get how many hours to_city's clocks are ahead of from_city's on a given day (negative when behind).

    Args:
        from_city: Reference city.
        to_city: City compared with the reference.
        date: Date as YYYY-MM-DD (the difference changes with daylight saving time).

    Returns:
        The difference in hours and both UTC offsets at noon UTC of that day.
    """
    source, target = find_city(from_city, "from_city"), find_city(to_city, "to_city")
    noon = at(parse_date(date), 12)
    source_offset, target_offset = offset_minutes(source, noon), offset_minutes(target, noon)
    return {
        "from_city": source["city"],
        "to_city": target["city"],
        "date": noon.date().isoformat(),
        "difference_hours": (target_offset - source_offset) / 60,
        "from_utc_offset": format_offset(source_offset),
        "to_utc_offset": format_offset(target_offset),
    }
