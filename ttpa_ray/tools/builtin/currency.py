"""Currency conversion at the fixed reference rates bundled with the catalogue (no live rates)."""

from __future__ import annotations

from typing import Any, Literal

from ttpa_ray.tools.builtin._data import load_json

Currency = Literal["USD", "EUR", "GBP", "JPY", "AUD", "CAD", "CHF", "CNY", "SGD", "AED", "INR", "SEK"]


def _rate(from_currency: str, to_currency: str) -> float:
    rates: dict[str, float] = load_json("currency_rates.json")["rates"]
    for code in (from_currency, to_currency):
        if code not in rates:
            raise ValueError(f"unknown currency {code!r}; known currencies: {', '.join(rates)}")
    return rates[to_currency] / rates[from_currency]


def get_exchange_rate(from_currency: Currency, to_currency: Currency) -> dict[str, Any]:
    """
    Get the exchange rate between two currencies (fixed reference rates as of 2026-01-01).

    Args:
        from_currency: ISO 4217 code of the currency to convert from.
        to_currency: ISO 4217 code of the currency to convert to.

    Returns:
        How many units of to_currency one unit of from_currency buys.
    """
    return {
        "from_currency": from_currency,
        "to_currency": to_currency,
        "rate": round(_rate(from_currency, to_currency), 6),
        "as_of": load_json("currency_rates.json")["as_of"],
    }


def convert_currency(amount: float, from_currency: Currency, to_currency: Currency) -> dict[str, Any]:
    """
    Convert an amount of money between two currencies (fixed reference rates as of 2026-01-01).

    Args:
        amount: The amount to convert.
        from_currency: ISO 4217 code of the amount's currency.
        to_currency: ISO 4217 code of the currency to convert to.

    Returns:
        The converted amount, rounded to 2 decimals, and the rate used.
    """
    if amount < 0:
        raise ValueError(f"amount must not be negative, got {amount}")
    rate = _rate(from_currency, to_currency)
    return {
        "amount": amount,
        "from_currency": from_currency,
        "to_currency": to_currency,
        "converted_amount": round(amount * rate, 2),
        "rate": round(rate, 6),
        "as_of": load_json("currency_rates.json")["as_of"],
    }
