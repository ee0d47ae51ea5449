"""BFCL's executable multi-turn environments as a tool source.

Eight environments of ``bfcl-eval`` (installed with --no-deps by scripts/setup.sh) run as tools: file
system, math, messaging, posting, tickets, trading, travel booking and vehicle control. The memory and
web-search environments need packages that are not installed and are left out.

- Specs come from ``bfcl_eval/data/multi_turn_func_doc/*.json`` through :func:`ttpa_ray.bfcl.to_openai_tool`,
  the mapping the ESM scorer uses for the same docs (dict -> object, float -> number, tuple -> array;
  defaults kept); the doc's ``response`` schema, mapped the same way, is kept for the simulated versions
  (``bfcl-simulated``, :mod:`ttpa_ray.tools.simulated`). A doc without a method on its class is a load error.
- Execution is stateful: one object per class and per dialogue (a session of the registry), created on
  the session's first call to that class and given its state with ``_load_scenario(initial_config[Class])``,
  where an initial config is the ``initial_config`` of a BFCL multi-turn entry (:func:`load_scenarios`).
  A class missing from the config starts from BFCL's own default state, as in BFCL's evaluator.
- BFCL methods report failures two ways, by returning ``{"error": ...}`` or by raising (ValueError for an
  unknown airport or currency, TypeError for a bad keyword): both become ``ToolResult(ok=False, error=...)``
  (the returned form through the ``error`` key of the request, the raised form in the host).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from ttpa_ray.bfcl import BfclDataError, data_dir, json_schema, read_jsonl, to_openai_tool
from ttpa_ray.records import ToolSpec
from ttpa_ray.tools.sandbox import EnvironmentSpec
from ttpa_ray.tools.spec import LoadError, check_parameters_schema

logger = logging.getLogger(__name__)

BACKEND_PACKAGE = "bfcl_eval.eval_checker.multi_turn_eval.func_source_code"

# class -> (module in BACKEND_PACKAGE, function-doc file), as bfcl_eval.constants.executable_backend_config.
BFCL_CLASSES: dict[str, tuple[str, str]] = {
    "GorillaFileSystem": ("gorilla_file_system", "gorilla_file_system.json"),
    "MathAPI": ("math_api", "math_api.json"),
    "MessageAPI": ("message_api", "message_api.json"),
    "TwitterAPI": ("posting_api", "posting_api.json"),
    "TicketAPI": ("ticket_api", "ticket_api.json"),
    "TradingBot": ("trading_bot", "trading_bot.json"),
    "TravelAPI": ("travel_booking", "travel_booking.json"),
    "VehicleControlAPI": ("vehicle_control", "vehicle_control.json"),
}
STATELESS_CLASSES = frozenset({"MathAPI"})

BFCL_ENVIRONMENT = EnvironmentSpec(
    classes={name: f"{BACKEND_PACKAGE}.{module}:{name}" for name, (module, _doc) in BFCL_CLASSES.items()},
    state_loader="_load_scenario",
    stateless=STATELESS_CLASSES,
)

MULTI_TURN_CATEGORIES = (
    "multi_turn_base",
    "multi_turn_miss_func",
    "multi_turn_miss_param",
    "multi_turn_long_context",
)


@dataclass(frozen=True)
class BfclTool:
    """A BFCL environment method as a tool: its spec and the class whose object runs it."""

    spec: ToolSpec
    class_name: str
    response: dict[str, Any] | None = None  # the doc's response schema (JSON-schema types)


@dataclass(frozen=True)
class BfclScenario:
    """A BFCL multi-turn entry's starting point: the state of each class and the classes involved."""

    id: str
    initial_config: dict[str, Any]
    involved_classes: tuple[str, ...]
    question: list[Any] = field(default_factory=list)
    path: tuple[str, ...] = ()  # the ground-truth calls' "Class.method" names, in order


def module_refs(classes: Sequence[str] | None = None) -> list[tuple[str, None]]:
    """The environment modules of ``classes`` (all by default), for a sandbox to preload."""
    names = list(BFCL_CLASSES) if classes is None else list(classes)
    return [(f"{BACKEND_PACKAGE}.{BFCL_CLASSES[name][0]}", None) for name in names if name in BFCL_CLASSES]


def load_bfcl_tools(classes: Sequence[str] | None = None) -> tuple[list[BfclTool], list[LoadError]]:
    """The tools of the BFCL environments ``classes`` (all eight by default) and any load errors.

    Raises :class:`~ttpa_ray.bfcl.BfclDataError` when bfcl-eval is missing, ``ValueError`` for a class
    name that is not one of :data:`BFCL_CLASSES`.
    """
    names = list(BFCL_CLASSES) if classes is None else list(classes)
    unknown = [name for name in names if name not in BFCL_CLASSES]
    if unknown:
        raise ValueError(
            f"unknown BFCL environment(s) {', '.join(unknown)}; known: {', '.join(BFCL_CLASSES)}"
        )
    folder = data_dir() / "multi_turn_func_doc"
    tools: list[BfclTool] = []
    errors: list[LoadError] = []
    for class_name in names:
        module_name, doc_file = BFCL_CLASSES[class_name]
        path = folder / doc_file
        if not path.is_file():
            raise BfclDataError(f"{path} not found: is this the bfcl-eval version scripts/setup.sh installs?")
        try:
            cls = getattr(importlib.import_module(f"{BACKEND_PACKAGE}.{module_name}"), class_name)
        except Exception as exc:
            errors.append(
                LoadError(str(path), None, f"cannot import {class_name}: {type(exc).__name__}: {exc}")
            )
            continue
        for doc in read_jsonl(path):
            name = str(doc.get("name", ""))
            if not callable(getattr(cls, name, None)) or name.startswith("_"):
                errors.append(LoadError(str(path), name, f"{class_name} has no method {name!r}"))
                continue
            schema = to_openai_tool(doc)["function"]
            problems = check_parameters_schema(schema.get("parameters"))
            if problems:
                errors.append(LoadError(str(path), name, "bad schema: " + "; ".join(problems)))
                continue
            try:
                spec = ToolSpec.from_openai(schema, source=f"bfcl:{class_name}")
            except ValueError as exc:
                errors.append(LoadError(str(path), name, f"bad schema: {exc}"))
                continue
            response = json_schema(doc["response"]) if isinstance(doc.get("response"), dict) else None
            tools.append(BfclTool(spec=spec, class_name=class_name, response=response))
    for error in errors:
        logger.warning("tool not loaded: %s", error)
    return tools, errors


@cache
def _scenarios(category: str) -> tuple[BfclScenario, ...]:
    path = data_dir() / f"BFCL_v4_{category}.json"
    return tuple(
        BfclScenario(
            id=entry["id"],
            initial_config=entry.get("initial_config") or {},
            involved_classes=tuple(entry.get("involved_classes") or ()),
            question=entry.get("question") or [],
            path=tuple(entry.get("path") or ()),
        )
        for entry in read_jsonl(path)
    )


def load_scenarios(category: str = "multi_turn_base") -> list[BfclScenario]:
    """The starting points of BFCL's multi-turn entries of ``category`` (200 in ``multi_turn_base``).

    Long-context entries are read as they are; their extra long-context padding is not applied.
    """
    if category not in MULTI_TURN_CATEGORIES:
        raise ValueError(
            f"unknown multi-turn category {category!r}; known: {', '.join(MULTI_TURN_CATEGORIES)}"
        )
    return list(_scenarios(category))


def find_scenario(entry_id: str) -> BfclScenario:
    """The scenario of one multi-turn entry by id (e.g. ``multi_turn_base_0``)."""
    for category in MULTI_TURN_CATEGORIES:
        if entry_id.startswith(category + "_"):
            for scenario in _scenarios(category):
                if scenario.id == entry_id:
                    return scenario
    raise KeyError(f"no BFCL multi-turn entry {entry_id!r} (ids look like multi_turn_base_0)")
