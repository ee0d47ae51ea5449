"""Unit conversion between units of length, mass, volume, temperature, speed, area and data size."""

from __future__ import annotations

from typing import Any, Literal

Unit = Literal[
    "mm", "cm", "m", "km", "in", "ft", "yd", "mi", "nmi",
    "mg", "g", "kg", "t", "oz", "lb", "st",
    "ml", "l", "tsp", "tbsp", "cup", "fl_oz", "pt", "qt", "gal",
    "celsius", "fahrenheit", "kelvin",
    "m/s", "km/h", "mph", "kn",
    "m2", "km2", "ha", "acre", "ft2",
    "B", "KB", "MB", "GB", "TB",
]  # fmt: skip

# Factor to the dimension's base unit (m, kg, l, m/s, m2, byte); temperature is affine, handled apart.
_FACTORS: dict[str, tuple[str, float]] = {
    "mm": ("length", 0.001), "cm": ("length", 0.01), "m": ("length", 1.0), "km": ("length", 1000.0),
    "in": ("length", 0.0254), "ft": ("length", 0.3048), "yd": ("length", 0.9144),
    "mi": ("length", 1609.344), "nmi": ("length", 1852.0),
    "mg": ("mass", 1e-6), "g": ("mass", 0.001), "kg": ("mass", 1.0), "t": ("mass", 1000.0),
    "oz": ("mass", 0.028349523125), "lb": ("mass", 0.45359237), "st": ("mass", 6.35029318),
    "ml": ("volume", 0.001), "l": ("volume", 1.0), "tsp": ("volume", 0.00492892159375),
    "tbsp": ("volume", 0.01478676478125), "cup": ("volume", 0.2365882365),
    "fl_oz": ("volume", 0.0295735295625), "pt": ("volume", 0.473176473), "qt": ("volume", 0.946352946),
    "gal": ("volume", 3.785411784),
    "m/s": ("speed", 1.0), "km/h": ("speed", 1 / 3.6), "mph": ("speed", 0.44704),
    "kn": ("speed", 1852 / 3600),
    "m2": ("area", 1.0), "km2": ("area", 1e6), "ha": ("area", 1e4), "acre": ("area", 4046.8564224),
    "ft2": ("area", 0.09290304),
    "B": ("data size", 1.0), "KB": ("data size", 1e3), "MB": ("data size", 1e6), "GB": ("data size", 1e9),
    "TB": ("data size", 1e12),
}  # fmt: skip
_TEMPERATURES = ("celsius", "fahrenheit", "kelvin")


def _dimension(unit: str) -> str:
    if unit in _TEMPERATURES:
        return "temperature"
    if unit not in _FACTORS:
        raise ValueError(f"unknown unit {unit!r}; known units: {', '.join([*_FACTORS, *_TEMPERATURES])}")
    return _FACTORS[unit][0]


def _to_kelvin(value: float, unit: str) -> float:
    if unit == "celsius":
        return value + 273.15
    if unit == "fahrenheit":
        return (value - 32) * 5 / 9 + 273.15
    return value


def _from_kelvin(value: float, unit: str) -> float:
    if unit == "celsius":
        return value - 273.15
    if unit == "fahrenheit":
        return (value - 273.15) * 9 / 5 + 32
    return value


def convert_units(value: float, from_unit: Unit, to_unit: Unit) -> dict[str, Any]:
    """
    Convert a quantity between two units of the same dimension (length, mass, volume, temperature, speed,
    area or data size).

    Args:
        value: The quantity to convert.
        from_unit: Unit of the quantity (symbols: km, mi, kg, lb, l, gal, celsius, km/h, acre, GB...).
        to_unit: Unit to convert to, of the same dimension as from_unit.

    Returns:
        The converted quantity, rounded to 6 significant digits.
    """
    source, target = _dimension(from_unit), _dimension(to_unit)
    if source != target:
        raise ValueError(f"cannot convert {source} ({from_unit}) to {target} ({to_unit})")
    if source == "temperature":
        result = _from_kelvin(_to_kelvin(value, from_unit), to_unit)
    else:
        result = value * _FACTORS[from_unit][1] / _FACTORS[to_unit][1]
    return {
        "value": value,
        "from_unit": from_unit,
        "to_unit": to_unit,
        "dimension": source,
        "result": float(f"{result:.6g}"),
    }
