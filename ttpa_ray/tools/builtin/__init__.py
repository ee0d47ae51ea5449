"""The built-in tool catalogue: deterministic tools over bundled data (``load_catalogue("builtin")``).

One module per tool family; every public function is a tool whose schema comes from its signature
and docstring. Data lives in ``data/`` (weather for 2026, fixed exchange rates, city facts, a flight
schedule and a hotel list); nothing reads the clock or the network, so a call always answers the same.
"""
