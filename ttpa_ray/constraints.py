"""What constrained decoding asks of a tool call: bounded JSON schemas for the arguments, the schema
of a whole call, and the regexes of a call's head. Pure (no engine, no Ray): the engine, the
reverse stage and the simulated tools use them alike."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from typing import Any

# Decoding guards added where a schema sets no bound of its own: a random (or confused) model can
# otherwise fill a number or string until max_tokens, and the call never closes.
MAX_STRING_CHARS = 64
MAX_NUMBER = 1_000_000
MAX_ITEMS = 8

# A length-bounded string is written as a pattern where xgrammar allows it: a pattern becomes an automaton
# whose token masks are cached, several times cheaper per token than a maxLength (a grammar repetition);
# compiling costs about the same. xgrammar 0.2.8 makes an automaton of a repetition of at most 128;
# above that a pattern is far slower per token, so longer bounds stay maxLength. Same characters as
# xgrammar's bounded strings: no quote, backslash or line break (so no escapes either).
PATTERN_MAX_CHARS = 128
_BOUNDED_CHARS = '[^"\\\\\\r\\n]'


def bounded_string(max_chars: int, min_chars: int = 0, **extra: Any) -> dict[str, Any]:
    """A JSON-schema string of ``min_chars``..``max_chars`` characters, in the form cheapest to decode."""
    if not 0 <= min_chars <= max_chars:
        raise ValueError(f"string bounds must be 0 <= min <= max, got {min_chars}..{max_chars}")
    if max_chars <= PATTERN_MAX_CHARS:
        return {**extra, "type": "string", "pattern": f"^{_BOUNDED_CHARS}{{{min_chars},{max_chars}}}$"}
    lengths = {"minLength": min_chars} if min_chars else {}
    return {**extra, "type": "string", **lengths, "maxLength": max_chars}


# A format a string parameter's description states, as the pattern its decoding follows: a teacher
# left free writes "08/01/2026" or "tomorrow" where the tool takes YYYY-MM-DD (on the 135M teacher the
# third most common failed call, bench/quality.py).
DESCRIBED_FORMATS = (
    ("YYYY-MM-DD HH:MM", "^[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9]{2}:[0-9]{2}$"),
    ("YYYY-MM-DD", "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"),
    ("HH:MM", "^[0-9]{2}:[0-9]{2}$"),
)


def bounded_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A copy of a JSON schema with length/range/size bounds added where none is declared.

    Strings with a length bound (declared or added) take the :func:`bounded_string` form; a string
    whose description states a format of :data:`DESCRIBED_FORMATS` takes its pattern instead.
    """
    out = dict(schema)
    kind = out.get("type")
    free = kind == "string" and not {"enum", "const", "pattern", "format"} & out.keys()
    described = str(out.get("description") or "") if free else ""
    pattern = next((p for fmt, p in DESCRIBED_FORMATS if fmt in described), None)
    if pattern is not None:  # a pattern beside a length bound is more than xgrammar takes
        out["pattern"] = pattern
        out.pop("minLength", None)
        out.pop("maxLength", None)
    elif free:
        # (xgrammar takes no length bound beside a pattern or format: those strings are left alone)
        low = int(out.pop("minLength", 0))
        high = int(out.pop("maxLength", low + MAX_STRING_CHARS))
        out = bounded_string(high, low, **out)
    elif kind in ("integer", "number"):
        out.setdefault("minimum", -MAX_NUMBER)
        out.setdefault("maximum", MAX_NUMBER)
    elif kind == "array":
        out.setdefault("maxItems", MAX_ITEMS)
        if isinstance(out.get("items"), dict):
            out["items"] = bounded_schema(out["items"])
    elif kind == "object" and isinstance(out.get("properties"), dict):
        out["properties"] = {
            k: bounded_schema(v) if isinstance(v, dict) else v for k, v in out["properties"].items()
        }
    for combinator in ("anyOf", "oneOf", "allOf"):
        if isinstance(out.get(combinator), list):
            out[combinator] = [bounded_schema(v) if isinstance(v, dict) else v for v in out[combinator]]
    return out


def arguments_schema(tool: dict[str, Any], *, bounded: bool = True) -> dict[str, Any]:
    """JSON schema of one tool's ``arguments`` object (an OpenAI spec, wrapped or bare).

    An object with no other properties than the declared ones; ``bounded`` adds decoding guards
    (:func:`bounded_schema`) where the schema declares no bound.
    """
    fn = tool.get("function", tool)
    params = fn.get("parameters") or {"type": "object", "properties": {}}
    params = {**params, "type": "object"}
    params.setdefault("additionalProperties", False)
    return bounded_schema(params) if bounded else params


def tool_call_schema(
    tools: Sequence[dict[str, Any]],
    *,
    bounded: bool = True,
    arguments: Callable[[str], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """JSON schema of one call ``{"name": ..., "arguments": {...}}`` to any of ``tools``.

    ``tools`` are OpenAI specs (wrapped or bare). Each tool becomes one ``anyOf`` branch whose
    arguments follow that tool's parameter schema (:func:`arguments_schema`), so a constrained decode
    yields a valid call. ``arguments(name)``, when given, supplies a tool's arguments schema instead
    (a caller that keeps one schema object per tool, or narrows one).
    """
    named: list[tuple[str, dict[str, Any]]] = []
    for tool in tools:
        fn = tool.get("function", tool)
        args = arguments(str(fn["name"])) if arguments else arguments_schema(tool, bounded=bounded)
        branch = {
            "type": "object",
            "properties": {"name": {"const": fn["name"]}, "arguments": args},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        named.append((str(fn["name"]), branch))
    if not named:
        raise ValueError("tool_call_schema needs at least one tool")
    # In name order: the same tools listed in another order give the same schema, which the engine
    # compiles into a grammar once (tens of ms each on a CPU, per distinct schema) instead of again.
    branches = [branch for _, branch in sorted(named, key=lambda pair: pair[0])]
    return branches[0] if len(branches) == 1 else {"anyOf": branches}


# A call in two requests: its head (up to the arguments) under a small regex, then the arguments under
# the chosen tool's own schema. The head is laid out as vLLM's xgrammar writes a one-request call
# without whitespace freedom (disable_any_whitespace: no spaces), so both ways produce the same text.
_REGEX_SPECIAL = re.compile(r"([\\.^$|?*+()\[\]{}])")


def call_head(name: str) -> str:
    """The text of a call up to its arguments: ``{"name":"<name>","arguments":``."""
    return '{"name":' + json.dumps(name, ensure_ascii=False) + ',"arguments":'


def call_head_regex(names: Sequence[str]) -> str:
    """A regex that admits exactly the heads (:func:`call_head`) of a call to one of ``names``."""
    if not names:
        raise ValueError("call_head_regex needs at least one tool name")
    # Only the metacharacters: xgrammar reads an escaped space or quote as a warning.
    return "|".join(_REGEX_SPECIAL.sub(r"\\\1", call_head(name)) for name in sorted(names))


def call_head_name(text: str, names: Sequence[str]) -> str | None:
    """The tool a generated head names, or None when ``text`` is not one of their heads."""
    for name in names:
        if text == call_head(name):
            return name
    return None
