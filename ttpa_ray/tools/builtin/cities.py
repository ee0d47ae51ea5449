"""Facts about the cities the built-in catalogue covers."""

from __future__ import annotations

from typing import Any

from ttpa_ray.tools.builtin._data import City, find_city


def get_city_info(city: City) -> dict[str, Any]:
    """
    Get facts about a city: country, currency, time zone (standard UTC offset and daylight-saving rule),
    main airport, population and languages.

    Args:
        city: City name.

    Returns:
        The city's facts.
    """
    record = find_city(city)
    offset = record["utc_offset_minutes"]
    sign = "+" if offset >= 0 else "-"
    hours, minutes = divmod(abs(offset), 60)
    dst = {"eu": "European rule", "us": "North American rule", "au": "Australian rule", "none": "none"}
    return {
        "city": record["city"],
        "country": record["country"],
        "country_code": record["country_code"],
        "currency": record["currency"],
        "standard_utc_offset": f"UTC{sign}{hours:02d}:{minutes:02d}",
        "daylight_saving": dst[record["dst_rule"]],
        "airport": record["airport"],
        "population": record["population"],
        "languages": list(record["languages"]),
        "latitude": record["latitude"],
        "longitude": record["longitude"],
    }
