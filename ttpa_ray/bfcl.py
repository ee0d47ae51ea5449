"""BFCL v4 data from the installed ``bfcl-eval`` package (installed with --no-deps by scripts/setup.sh).

- :func:`load_entries`: the entries of one category joined by id with their possible answers.
- :func:`to_openai_tool`: a BFCL function doc as an OpenAI tool spec, BFCL's type names mapped
  (dict->object, float->number, tuple->array; any stays ``any``, which ESM reads as 'any type').
- :func:`load_multi_turn_tools`: the multi-turn function docs, as OpenAI tool specs, per API.
- :func:`ast_check`: BFCL's own pass/fail AST checker, imported through a stand-in
  ``model_config`` module (the real one imports every model handler and their dependencies).
"""

from __future__ import annotations

import json
import sys
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Final

from ttpa_ray.codec import ToolCall
from ttpa_ray.esm.scorer import ReferenceCall, ToolIndex, prepare_reference, prepare_tools

AST_CATEGORIES: Final[tuple[str, ...]] = (
    "simple_python",
    "multiple",
    "parallel",
    "parallel_multiple",
    "live_simple",
    "live_multiple",
    "live_parallel",
    "live_parallel_multiple",
)
# Entries whose right answer is no call at all (BFCL: pass when no call decodes); no possible answers.
IRRELEVANCE_CATEGORIES: Final[tuple[str, ...]] = ("irrelevance",)
BFCL_TYPE_NAMES: Final[dict[str, str]] = {"dict": "object", "float": "number", "tuple": "array", "any": "any"}
AST_MODEL_NAME: Final = "ttpa-esm"  # our entry in the stand-in MODEL_CONFIG_MAPPING (no "_": BFCL maps it)


class BfclDataError(RuntimeError):
    """bfcl-eval is missing or its data does not have the expected shape."""


def data_dir() -> Path:
    """The ``data`` folder of the installed bfcl-eval package."""
    try:
        import bfcl_eval
    except ImportError:
        raise BfclDataError(
            "bfcl-eval is not installed: pip install --no-deps bfcl-eval==2026.3.23"
        ) from None
    return Path(bfcl_eval.__path__[0]) / "data"


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of one of bfcl-eval's JSON-lines data files."""
    if not path.is_file():
        raise BfclDataError(f"{path} not found: is this the bfcl-eval version scripts/setup.sh installs?")
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def json_schema(schema: Any) -> Any:
    """A copy of a JSON schema node with BFCL's type names mapped, recursively."""
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key == "type" and isinstance(value, str):
            out[key] = BFCL_TYPE_NAMES.get(value, value)
        elif key == "properties" and isinstance(value, dict):
            out[key] = {name: json_schema(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties"):
            out[key] = [json_schema(s) for s in value] if isinstance(value, list) else json_schema(value)
        elif key in ("anyOf", "oneOf", "allOf") and isinstance(value, list):
            out[key] = [json_schema(s) for s in value]
        else:
            out[key] = value
    return out


def to_openai_tool(func_doc: dict[str, Any]) -> dict[str, Any]:
    """``{"type": "function", "function": {name, description, parameters}}`` from a BFCL function doc."""
    function: dict[str, Any] = {"name": func_doc["name"], "description": func_doc.get("description", "")}
    function["parameters"] = json_schema(func_doc.get("parameters") or {"type": "dict", "properties": {}})
    return {"type": "function", "function": function}


@dataclass(frozen=True)
class BfclEntry:
    """One BFCL test entry: question turns, function docs and ground truth (``{name: {param: [alts]}}``)."""

    id: str
    category: str
    question: list[Any]
    functions: list[dict[str, Any]]
    ground_truth: list[dict[str, Any]]

    @property
    def tools(self) -> list[dict[str, Any]]:
        """The function docs as OpenAI tool specs."""
        return [to_openai_tool(f) for f in self.functions]

    def tool_index(self) -> ToolIndex:
        """The ESM tool index of the entry's functions."""
        return prepare_tools(self.tools)

    def reference(self, index: ToolIndex | None = None) -> tuple[ReferenceCall, ...]:
        """The ground truth as ESM reference calls whose values are :class:`Alternatives`."""
        return prepare_reference(
            self.ground_truth, alternatives=True, tools=index if index is not None else self.tool_index()
        )

    def ground_truth_calls(self, index: ToolIndex | None = None) -> list[ToolCall]:
        """The first acceptable value of each parameter that the schema admits (ReferenceCall.first_call)."""
        index = index if index is not None else self.tool_index()
        return [ref.first_call(index) for ref in self.reference(index)]


@cache
def _load_entries(category: str) -> tuple[BfclEntry, ...]:
    base = data_dir()
    questions = read_jsonl(base / f"BFCL_v4_{category}.json")
    if category in IRRELEVANCE_CATEGORIES:
        return tuple(BfclEntry(q["id"], category, q["question"], q["function"], []) for q in questions)
    answers = {
        row["id"]: row["ground_truth"]
        for row in read_jsonl(base / "possible_answer" / f"BFCL_v4_{category}.json")
    }
    missing = [q["id"] for q in questions if q["id"] not in answers]
    if missing:
        raise BfclDataError(f"{category}: {len(missing)} entries have no possible answer, e.g. {missing[:3]}")
    return tuple(
        BfclEntry(q["id"], category, q["question"], q["function"], answers[q["id"]]) for q in questions
    )


def load_entries(category: str) -> list[BfclEntry]:
    """Entries of one AST category (e.g. ``simple_python``), each joined with its possible answer
    (irrelevance entries have none: their right answer is no call)."""
    known = (*AST_CATEGORIES, *IRRELEVANCE_CATEGORIES)
    if category not in known:
        raise BfclDataError(f"unknown BFCL AST category {category!r}; known: {', '.join(known)}")
    return list(_load_entries(category))


def load_multi_turn_tools() -> dict[str, list[dict[str, Any]]]:
    """The multi-turn APIs' function docs as OpenAI tool specs, by API file name (``math_api`` ...)."""
    folder = data_dir() / "multi_turn_func_doc"
    return {
        path.stem: [to_openai_tool(doc) for doc in read_jsonl(path)] for path in sorted(folder.glob("*.json"))
    }


# ------------------------------------------------------------------------------------- AST checker
@dataclass(frozen=True)
class _StandInModelConfig:
    underscore_to_dot: bool = False


@cache
def load_ast_checker() -> Callable[..., dict[str, Any]]:
    """BFCL's ``ast_checker`` function, importable without BFCL's model handlers."""
    name = "bfcl_eval.constants.model_config"
    module = sys.modules.get(name)
    if module is None:
        # The real module imports every model handler (and their packages): a stand-in is enough,
        # the checker only reads MODEL_CONFIG_MAPPING[model].underscore_to_dot for dotted names.
        module = types.ModuleType(name)
        module.MODEL_CONFIG_MAPPING = {}  # type: ignore[attr-defined]
        sys.modules[name] = module
    module.MODEL_CONFIG_MAPPING.setdefault(AST_MODEL_NAME, _StandInModelConfig())
    from bfcl_eval.eval_checker.ast_eval.ast_checker import ast_checker

    return ast_checker


def ast_check(entry: BfclEntry, calls: Sequence[ToolCall]) -> dict[str, Any]:
    """BFCL's verdict (``{"valid": bool, "error": [...], ...}``) on calls for an entry."""
    from bfcl_eval.constants.enums import Language

    checker = load_ast_checker()
    model_output = [{call.name: dict(call.arguments)} for call in calls]
    return checker(
        entry.functions, model_output, entry.ground_truth, Language.PYTHON, entry.category, AST_MODEL_NAME
    )
