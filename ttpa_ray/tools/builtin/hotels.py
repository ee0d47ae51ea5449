"""Hotel search over the bundled hotel list (four hotels per city, fixed nightly rates)."""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from ttpa_ray.tools.builtin._data import City, find_city, load_csv, parse_date

_MAX_NIGHTS = 30
_WEEKEND_SURCHARGE = 1.15  # Friday and Saturday nights


def search_hotels(
    city: City,
    check_in: str,
    check_out: str,
    min_stars: Literal[1, 2, 3, 4, 5] | None = None,
    max_price_per_night: float | None = None,
    sort_by: Literal["price", "rating", "distance"] = "price",
) -> dict[str, Any]:
    """
    Search hotels in a city for a stay, with the total price of the stay (Friday and Saturday nights cost 15%
    more).

    Args:
        city: City name.
        check_in: Arrival date as YYYY-MM-DD.
        check_out: Departure date as YYYY-MM-DD, after check_in (at most 30 nights).
        min_stars: Lowest star rating to include; omit for any.
        max_price_per_night: Highest base nightly rate in USD to include; omit for no limit.
        sort_by: Order of the results: cheapest first, best rated first, or closest to the centre first.

    Returns:
        The matching hotels with rating, stars, amenities, nightly rate and total price.
    """
    record = find_city(city)
    arrival, departure = parse_date(check_in, "check_in"), parse_date(check_out, "check_out")
    nights = (departure - arrival).days
    if nights < 1:
        raise ValueError(f"check_out ({check_out}) must be after check_in ({check_in})")
    if nights > _MAX_NIGHTS:
        raise ValueError(f"the stay is {nights} nights; at most {_MAX_NIGHTS} nights can be searched")
    weekend_nights = sum(
        1 for offset in range(nights) if (arrival + dt.timedelta(days=offset)).weekday() in (4, 5)
    )
    hotels = []
    for row in load_csv("hotels.csv"):
        if row["city"] != record["city"]:
            continue
        stars, rate = int(row["stars"]), float(row["price_per_night_usd"])
        if min_stars is not None and stars < min_stars:
            continue
        if max_price_per_night is not None and rate > max_price_per_night:
            continue
        total = rate * (nights - weekend_nights) + rate * _WEEKEND_SURCHARGE * weekend_nights
        hotels.append(
            {
                "hotel_id": row["hotel_id"],
                "name": row["name"],
                "stars": stars,
                "rating": float(row["rating"]),
                "distance_to_center_km": float(row["distance_to_center_km"]),
                "amenities": row["amenities"].split(";"),
                "price_per_night_usd": rate,
                "total_price_usd": round(total, 2),
            }
        )
    keys = {
        "price": lambda hotel: (hotel["total_price_usd"], hotel["hotel_id"]),
        "rating": lambda hotel: (-hotel["rating"], hotel["hotel_id"]),
        "distance": lambda hotel: (hotel["distance_to_center_km"], hotel["hotel_id"]),
    }
    hotels.sort(key=keys[sort_by])
    return {
        "city": record["city"],
        "check_in": arrival.isoformat(),
        "check_out": departure.isoformat(),
        "nights": nights,
        "hotels": hotels,
    }
