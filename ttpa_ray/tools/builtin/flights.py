"""Flight search over the bundled weekly schedule of direct flights between the catalogue's cities.

Fares vary by date and cabin through a fixed hash of (flight, date), so a search always answers the
same without a live fare source.
"""

from __future__ import annotations

import datetime as dt
import zlib
from typing import Any, Literal

from ttpa_ray.tools.builtin._clock import local_to_utc, offset_minutes
from ttpa_ray.tools.builtin._data import City, find_city, load_csv, parse_date

Cabin = Literal["economy", "premium_economy", "business", "first"]
_CABIN_FACTORS = {"economy": 1.0, "premium_economy": 1.6, "business": 3.4, "first": 5.8}


def _hash(*parts: str) -> int:
    return zlib.crc32("|".join(parts).encode("utf-8"))


def search_flights(
    origin: City, destination: City, date: str, cabin: Cabin = "economy", max_price: float | None = None
) -> dict[str, Any]:
    """
    Search direct flights from one city to another on a given day, cheapest first.

    Args:
        origin: Departure city.
        destination: Arrival city.
        date: Departure date as YYYY-MM-DD (local time at the origin).
        cabin: Cabin class to price.
        max_price: Highest fare in USD to include; omit for no limit.

    Returns:
        The matching flights with local departure and arrival times, duration, fare and seats left.
    """
    source, target = find_city(origin, "origin"), find_city(destination, "destination")
    if source["city"] == target["city"]:
        raise ValueError(f"origin and destination are the same city ({source['city']})")
    day = parse_date(date)
    if max_price is not None and max_price <= 0:
        raise ValueError(f"max_price must be positive, got {max_price}")
    flights = []
    served = False
    for row in load_csv("flights.csv"):
        if row["origin"] != source["city"] or row["destination"] != target["city"]:
            continue
        served = True
        if str(day.isoweekday()) not in row["weekdays"]:
            continue
        departure = dt.datetime.combine(day, dt.time.fromisoformat(row["departure_local"]))
        utc = local_to_utc(source, departure)
        arrival_utc = utc + dt.timedelta(minutes=int(row["duration_minutes"]))
        arrival = arrival_utc + dt.timedelta(minutes=offset_minutes(target, arrival_utc))
        seed = _hash(row["flight_number"], day.isoformat())
        fare = float(row["economy_price_usd"]) * (0.85 + (seed % 41) / 100) * _CABIN_FACTORS[cabin]
        fare = round(fare, 2)
        if max_price is not None and fare > max_price:
            continue
        flights.append(
            {
                "flight_number": row["flight_number"],
                "airline": row["airline"],
                "origin": f"{source['city']} ({source['airport']})",
                "destination": f"{target['city']} ({target['airport']})",
                "departure": departure.strftime("%Y-%m-%d %H:%M"),
                "arrival": arrival.strftime("%Y-%m-%d %H:%M"),
                "duration_minutes": int(row["duration_minutes"]),
                "cabin": cabin,
                "price_usd": fare,
                "seats_left": 1 + (seed >> 8) % 9,
            }
        )
    flights.sort(key=lambda flight: (flight["price_usd"], flight["departure"]))
    result: dict[str, Any] = {
        "origin": source["city"],
        "destination": target["city"],
        "date": day.isoformat(),
        "cabin": cabin,
        "flights": flights,
    }
    if not served:
        result["note"] = f"no direct flights from {source['city']} to {target['city']} in the schedule"
    elif not flights:
        result["note"] = "no flight matches that day and price"
    return result
