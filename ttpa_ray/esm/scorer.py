"""ESM, the error-oriented scoring mechanism (DESIGN.md section 3): a pure scorer of tool calls.

One candidate call ``c`` against one reference call ``r``, with ``s`` the schema of the tool ``c`` names:

- name: 1 if ``c.name == r.name`` else 0
- required: share of ``s``'s required parameters present in ``c``'s arguments (1 if none required)
- key: ``c``'s argument keys that exist in ``s``'s properties
- value_type: ``c``'s argument values whose JSON type matches ``s``'s declared type
- value: per key of ``c`` also in ``r``: 1 for equal values; two strings get 0.5 for case-insensitive
  equality plus 0.5 for one containing the other (case-sensitive), so exact equality is 1
- key, value_type and value are divided by ``max(len(c.args), len(r.args))`` (1 when both are empty)
- ESM = (3*name + 3*required + 1*key + 2*value_type + 2*value) / 11, weights configurable

Edge cases: a candidate with empty arguments scores 1 if the names match and the reference's arguments
are empty too (optional alternatives aside), else 0 (components are still reported as computed); a
candidate that does not parse as calls (a ParseResult with an error, even with some calls read, or no
call at all while the reference has some) scores 0 with category ``parse``; a name not in the tools
scores 0 with ``unknown_tool``. An empty reference (no call expected) scores 1 only against no call.

Types: string, integer, number (an int is a number), boolean, array, object, null, and BFCL's names
(dict->object, float->number, tuple->array, any->any). A JSON boolean is neither an integer nor a
number; ``5.0`` is a number but not an integer. A parameter whose schema says ``"default": null`` or
``"nullable": true`` also accepts null. Values compare as JSON: ``1 == 1.0`` but ``true != 1``.

Alternatives: a reference value may be an :class:`Alternatives` (BFCL's possible answers: several
acceptable values, ``optional`` when BFCL lists ``""``). A candidate value equal to any alternative is
equal (string credit is the best over the alternatives); an optional argument the candidate leaves
out does not count in ``len(r.args)``. Plain list values are never alternatives: list-valued
references become alternatives only through :func:`prepare_reference` with ``alternatives=True``.

Error categories (a call can have several): ``parse``, ``unknown_tool``, ``wrong_tool`` (a known tool
other than the reference's, or an unmatched call of a turn), ``missing_required`` (a schema-required
parameter absent), ``unknown_key`` (not in the schema), ``type_mismatch`` (a known key of the wrong
type), ``value_mismatch`` (a shared key with a different value, a known key the reference does not
have, or a non-optional reference key the candidate lacks that the schema does not require).

Several calls in a turn (parallel calls): every candidate call is scored against every reference
call and the best one-to-one matching (largest total) is kept; unmatched calls score 0 and the total
is divided by the larger count, so call order does not matter; components are averaged the same
way. The matching is exact: brute force over the injections when the larger side has at most 5
calls, the Hungarian algorithm (own implementation, O(n^3)) beyond.

Speed: prepare tools once (:func:`prepare_tools`, cached by JSON text) and references once
(:func:`prepare_reference`); :func:`score_prepared` / :func:`score_components` are the inner loop.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Final

from ttpa_ray.codec import ParseResult, ToolCall, parse_any

CATEGORIES: Final[tuple[str, ...]] = (
    "parse",
    "unknown_tool",
    "wrong_tool",
    "missing_required",
    "unknown_key",
    "type_mismatch",
    "value_mismatch",
)
COMPONENTS: Final[tuple[str, ...]] = ("name", "required", "key", "value_type", "value")

_PARSE, _UNKNOWN_TOOL, _WRONG_TOOL, _MISSING_REQUIRED, _UNKNOWN_KEY, _TYPE_MISMATCH, _VALUE_MISMATCH = (
    1 << i for i in range(len(CATEGORIES))
)
# Error sets travel as bit masks while scoring; the tuple of names is looked up once per result.
_ERROR_NAMES: Final[tuple[tuple[str, ...], ...]] = tuple(
    tuple(name for bit, name in enumerate(CATEGORIES) if mask & (1 << bit)) for mask in range(1 << 7)
)
_BRUTE_FORCE_MAX: Final = 5


# ----------------------------------------------------------------------------------------- weights
@dataclass(frozen=True, slots=True)
class ESMWeights:
    """Weights of the five components; the score is their weighted mean (default 3/3/1/2/2)."""

    name: float = 3.0
    required: float = 3.0
    key: float = 1.0
    value_type: float = 2.0
    value: float = 2.0

    def __post_init__(self) -> None:
        values = (self.name, self.required, self.key, self.value_type, self.value)
        if any(v < 0 for v in values) or sum(values) <= 0:
            raise ValueError(f"ESM weights must be >= 0 with a positive sum, got {values}")

    @property
    def total(self) -> float:
        """Sum of the weights (the divisor of the score)."""
        return self.name + self.required + self.key + self.value_type + self.value

    @classmethod
    def from_config(cls, weights: Any) -> ESMWeights:
        """Build from any object with the five attributes (e.g. ``ttpa_ray.config.ESMWeights``)."""
        return cls(*(float(getattr(weights, name)) for name in COMPONENTS))


DEFAULT_WEIGHTS: Final = ESMWeights()


# ------------------------------------------------------------------------------------ alternatives
@dataclass(frozen=True, slots=True)
class Alternatives:
    """Acceptable values of one reference argument (any of them is equal).

    ``optional`` means the candidate may leave the argument out (BFCL writes ``""`` for it).
    """

    values: tuple[Any, ...]
    optional: bool = False

    @classmethod
    def from_list(cls, values: Sequence[Any]) -> Alternatives:
        """BFCL's form: a list of acceptable values where ``""`` means 'may be left out'."""
        kept = tuple(v for v in values if not (type(v) is str and v == ""))
        return cls(kept, optional=len(kept) < len(values))

    def first(self) -> Any:
        """The first acceptable value, or :data:`OMITTED` when the list starts with ``""``."""
        return self.values[0] if self.values else OMITTED


_MISSING: Final = object()


class _Omitted:
    def __repr__(self) -> str:
        return "OMITTED"


OMITTED: Final = _Omitted()
"""Marker returned by :meth:`Alternatives.first` for an argument best left out."""


# ------------------------------------------------------------------------------------------- tools
class SchemaError(ValueError):
    """A tool spec ESM cannot use; the message names the tool and the parameter."""

    def __init__(self, problem: str, tool: str | None = None, parameter: str | None = None) -> None:
        where = []
        if tool is not None:
            where.append(f"tool {tool!r}")
        if parameter is not None:
            where.append(f"parameter {parameter!r}")
        prefix = ", ".join(where)
        super().__init__(f"{prefix}: {problem}" if prefix else problem)
        self.tool = tool
        self.parameter = parameter


_TYPE_NAMES: Final[dict[str, str]] = {
    "string": "string",
    "integer": "integer",
    "number": "number",
    "boolean": "boolean",
    "array": "array",
    "object": "object",
    "null": "null",
    # BFCL's Python-flavoured names (DESIGN.md section 3).
    "dict": "object",
    "float": "number",
    "tuple": "array",
    "any": "any",
}
_PY_TYPES: Final[dict[str, frozenset[type]]] = {
    "string": frozenset({str}),
    "integer": frozenset({int}),
    "number": frozenset({int, float}),
    "boolean": frozenset({bool}),
    "array": frozenset({list, tuple}),
    "object": frozenset({dict}),
    "null": frozenset({type(None)}),
}
_JSON_TYPE_OF: Final[dict[type, str]] = {
    str: "string",
    int: "integer",
    float: "number",
    bool: "boolean",
    list: "array",
    tuple: "array",
    dict: "object",
    type(None): "null",
}


@dataclass(frozen=True, slots=True)
class ParamSpec:
    """One declared parameter: its JSON types (empty = any) and, for arrays, its items' types."""

    name: str
    types: tuple[str, ...]
    item_types: tuple[str, ...] = ()

    @property
    def accepts(self) -> frozenset[type] | None:
        """Python types of acceptable values (None: anything)."""
        if not self.types:
            return None
        return frozenset().union(*(_PY_TYPES[t] for t in self.types))


@dataclass(frozen=True, slots=True)
class ToolSchema:
    """What ESM needs of one tool: its parameters and the required ones."""

    name: str
    params: Mapping[str, ParamSpec]
    required: tuple[str, ...]
    accepts: Mapping[str, frozenset[type] | None]
    required_set: frozenset[str]


@dataclass(frozen=True, slots=True)
class ToolIndex:
    """Tools by name, validated once (:func:`prepare_tools`) and reused for every call scored."""

    tools: Mapping[str, ToolSchema]

    def __contains__(self, name: object) -> bool:
        return name in self.tools

    def __len__(self) -> int:
        return len(self.tools)


def _declared_types(schema: Any, tool: str, param: str, *, top: bool) -> tuple[str, ...] | None:
    """JSON types a schema node allows: () for any, None when it declares none (allowed below top)."""
    if not isinstance(schema, Mapping):
        raise SchemaError(f"schema must be an object, got {type(schema).__name__}", tool, param)
    declared = schema.get("type")
    types: list[str] = []
    if declared is not None:
        if not isinstance(declared, str | list):
            raise SchemaError(f"'type' must be a string or a list, got {declared!r}", tool, param)
        for name in [declared] if isinstance(declared, str) else declared:
            mapped = _TYPE_NAMES.get(name) if isinstance(name, str) else None
            if mapped is None:
                known = ", ".join(sorted(_TYPE_NAMES))
                raise SchemaError(f"unknown type {name!r} (known: {known})", tool, param)
            if mapped == "any":
                return ()
            types.append(mapped)
    elif any(k in schema for k in ("anyOf", "oneOf")):
        for sub in schema.get("anyOf", []) + schema.get("oneOf", []):
            sub_types = _declared_types(sub, tool, param, top=top)
            if sub_types == ():
                return ()
            types.extend(sub_types or ())
    elif "enum" in schema or "const" in schema:
        values = schema["enum"] if "enum" in schema else [schema["const"]]
        types.extend(_JSON_TYPE_OF.get(type(v), "string") for v in values)
    elif top:
        raise SchemaError("no type declared (add 'type', 'anyOf' or 'enum')", tool, param)
    else:
        return None
    if schema.get("nullable") is True or ("default" in schema and schema["default"] is None):
        types.append("null")
    if "integer" in types and "number" in types:
        types.remove("integer")
    return tuple(dict.fromkeys(types))


def _check_nested(schema: Any, tool: str, param: str) -> None:
    """Validate type names below a parameter (items, properties); nested types are not scored."""
    if not isinstance(schema, Mapping):
        return
    for key in ("items", "additionalProperties"):
        sub = schema.get(key)
        for node in sub if isinstance(sub, list) else [sub]:
            if isinstance(node, Mapping):
                _declared_types(node, tool, param, top=False)
                _check_nested(node, tool, param)
    props = schema.get("properties")
    if isinstance(props, Mapping):
        for node in props.values():
            if isinstance(node, Mapping):
                _declared_types(node, tool, param, top=False)
                _check_nested(node, tool, param)


def _tool_schema(spec: Any) -> ToolSchema:
    if not isinstance(spec, Mapping):
        raise SchemaError(f"a tool spec must be an object, got {type(spec).__name__}")
    if spec.get("type") == "function" and isinstance(spec.get("function"), Mapping):
        spec = spec["function"]
    name = spec.get("name")
    if not isinstance(name, str) or not name:
        raise SchemaError(f"a tool spec needs a non-empty string 'name', got {name!r}")
    parameters = spec.get("parameters")
    if parameters is None:
        parameters = {}
    if not isinstance(parameters, Mapping):
        raise SchemaError(f"'parameters' must be an object schema, got {type(parameters).__name__}", name)
    top_type = parameters.get("type", "object")
    if not isinstance(top_type, str) or _TYPE_NAMES.get(top_type) != "object":
        raise SchemaError(f"'parameters' must have type object, got {top_type!r}", name)
    props = parameters.get("properties") or {}
    if not isinstance(props, Mapping):
        raise SchemaError("'properties' must be an object", name)
    params: dict[str, ParamSpec] = {}
    for param, schema in props.items():
        types = _declared_types(schema, name, param, top=True)
        assert types is not None
        _check_nested(schema, name, param)
        items = schema.get("items") if "array" in types else None
        item_types = _declared_types(items, name, param, top=False) if isinstance(items, Mapping) else None
        params[param] = ParamSpec(param, types, item_types or ())
    required = parameters.get("required") or []
    if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        raise SchemaError("'required' must be a list of parameter names", name)
    for param in required:
        if param not in params:
            raise SchemaError("listed in 'required' but not in 'properties'", name, param)
    required_t = tuple(dict.fromkeys(required))
    return ToolSchema(
        name=name,
        params=params,
        required=required_t,
        accepts={p: spec_.accepts for p, spec_ in params.items()},
        required_set=frozenset(required_t),
    )


def prepare_tools(tools: ToolIndex | str | Sequence[Any]) -> ToolIndex:
    """Validate tool specs once into a :class:`ToolIndex` (raises :class:`SchemaError`).

    Accepts OpenAI function specs, wrapped (``{"type": "function", "function": {...}}``) or bare, and
    BFCL's function docs. JSON text is cached by its exact text, so rows sharing their tools pay once.
    """
    if isinstance(tools, ToolIndex):
        return tools
    if isinstance(tools, str):
        return _prepare_tools_text(tools)
    if isinstance(tools, Mapping) or not isinstance(tools, Sequence):
        raise SchemaError(f"tools must be a list of tool specs, got {type(tools).__name__}")
    index: dict[str, ToolSchema] = {}
    for spec in tools:
        schema = _tool_schema(spec)
        if schema.name in index:
            raise SchemaError("declared twice", schema.name)
        index[schema.name] = schema
    return ToolIndex(index)


@lru_cache(maxsize=8192)
def _prepare_tools_text(text: str) -> ToolIndex:
    try:
        tools = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SchemaError(f"tools are not valid JSON ({exc})") from None
    return prepare_tools(tools)


# -------------------------------------------------------------------------------------- references
@dataclass(frozen=True, slots=True)
class ReferenceCall:
    """A reference call; argument values may be :class:`Alternatives`."""

    name: str
    arguments: Mapping[str, Any]
    optional: frozenset[str] = frozenset()

    @classmethod
    def of(cls, name: str, arguments: Mapping[str, Any]) -> ReferenceCall:
        """Build one, noting which arguments are optional alternatives."""
        optional = frozenset(k for k, v in arguments.items() if type(v) is Alternatives and v.optional)
        return cls(name, arguments, optional)

    def first_call(self, tools: ToolIndex | None = None) -> ToolCall:
        """A call made of the first acceptable value of every argument.

        With ``tools``: the first value the tool's schema admits (declared key, declared type), else
        nothing if the argument is optional and not required, else the first value. BFCL's possible
        answers sometimes list first a value that their own schema does not admit.
        """
        schema = tools.tools.get(self.name) if tools is not None else None
        arguments: dict[str, Any] = {}
        for key, value in self.arguments.items():
            chosen = _first_admitted(key, value, schema) if schema is not None else _first_of(value)
            if chosen is not OMITTED:
                arguments[key] = chosen
        return ToolCall(self.name, arguments)


def _first_admitted(key: str, value: Any, schema: ToolSchema) -> Any:
    if type(value) is not Alternatives:
        return value
    accepts = schema.accepts.get(key, _MISSING)
    if accepts is not _MISSING:
        for choice in value.values:
            if accepts is None or type(choice) in accepts:  # type: ignore[operator]
                return _first_of(choice)
    if value.optional and key not in schema.required_set:
        return OMITTED
    return _first_of(value)


def _first_of(value: Any) -> Any:
    if type(value) is Alternatives:
        first = value.first()
        return first if first is OMITTED else _first_of(first)
    if type(value) is dict:
        out = {}
        for k, v in value.items():
            chosen = _first_of(v)
            if chosen is not OMITTED:
                out[k] = chosen
        return out
    if type(value) in (list, tuple):
        return [_first_of(v) for v in value]
    return value


def _nested_alternatives(value: Any, param: ParamSpec | None) -> Any:
    # BFCL nests alternatives one level down in dict values (and in dicts inside arrays of dicts).
    if param is None:
        return value
    if type(value) is dict and "object" in param.types:
        return {k: Alternatives.from_list(v) if type(v) is list else v for k, v in value.items()}
    if type(value) is list and "array" in param.types and "object" in param.item_types:
        return [
            {k: Alternatives.from_list(v) if type(v) is list else v for k, v in item.items()}
            if type(item) is dict
            else item
            for item in value
        ]
    return value


def _reference_one(obj: Any, alternatives: bool, index: ToolIndex | None) -> ReferenceCall:
    if type(obj) is ReferenceCall:
        return obj
    if isinstance(obj, ToolCall):
        name, args = obj.name, obj.arguments
    elif isinstance(obj, Mapping):
        if isinstance(obj.get("name"), str):
            name, args = obj["name"], obj.get("arguments", obj.get("parameters", {}))
            if isinstance(args, str):
                try:
                    args = json.loads(args) if args.strip() else {}
                except json.JSONDecodeError as exc:
                    raise ValueError(f"arguments of reference {name!r} are not valid JSON ({exc})") from None
            if args is None:
                args = {}
        elif (
            alternatives
            and len(obj) == 1
            and not {"name", "arguments", "parameters"} & obj.keys()
            and isinstance(next(iter(obj.values())), Mapping)
        ):
            # BFCL's possible-answer form: {tool_name: {param: [alternatives]}}.
            name, args = next(iter(obj.items()))
        else:
            raise ValueError(f"a reference call needs a string 'name', got {obj!r:.200}")
    else:
        raise ValueError(f"a reference call must be an object, got {type(obj).__name__}")
    if not isinstance(args, Mapping):
        raise ValueError(f"arguments of reference {name!r} must be an object, got {type(args).__name__}")
    if alternatives:
        schema = index.tools.get(name) if index is not None else None
        converted: dict[str, Any] = {}
        for key, value in args.items():
            if type(value) is Alternatives:
                converted[key] = value
            elif type(value) is list:
                if not value:
                    raise ValueError(f"reference {name!r}: argument {key!r} lists no acceptable value")
                spec = schema.params.get(key) if schema is not None else None
                alts = Alternatives.from_list(value)
                converted[key] = Alternatives(
                    tuple(_nested_alternatives(v, spec) for v in alts.values), alts.optional
                )
            else:
                raise ValueError(
                    f"reference {name!r}: with alternatives, argument {key!r} must be a list of "
                    f"acceptable values, got {type(value).__name__}"
                )
        args = converted
    return ReferenceCall.of(name, args)


def prepare_reference(
    reference: Any, *, alternatives: bool = False, tools: ToolIndex | None = None
) -> tuple[ReferenceCall, ...]:
    """Normalise a reference (call object, :class:`ToolCall`, or a list of them) (raises ValueError).

    With ``alternatives=True`` every argument value is a LIST of acceptable values (BFCL's possible
    answers, ``""`` = may be left out), and BFCL's ``{tool: {param: [values]}}`` form is accepted;
    ``tools`` lets dict-valued parameters carry nested alternatives as BFCL's checker reads them.
    """
    if type(reference) is tuple and all(type(r) is ReferenceCall for r in reference):
        return reference
    if isinstance(reference, list | tuple):
        return tuple(_reference_one(r, alternatives, tools) for r in reference)
    return (_reference_one(reference, alternatives, tools),)


# -------------------------------------------------------------------------------------- candidates
def candidate_calls(candidate: Any) -> list[tuple[str, dict[str, Any]]] | None:
    """(name, arguments) of every call of a candidate, or None when it does not parse as calls.

    A candidate is a :class:`ParseResult`, a :class:`ToolCall`, a call object (arguments as an
    object or JSON text), a list of those, or raw model text: one definition of what a candidate
    means, ``codec.parse_any``'s; an empty list is a candidate that makes no call.
    """
    if type(candidate) in (list, tuple) and not candidate:
        return []
    parsed = candidate if type(candidate) is ParseResult else parse_any(candidate)
    return [(c.name, c.arguments) for c in parsed.calls] if parsed.ok else None


# ----------------------------------------------------------------------------------------- scoring
@dataclass(frozen=True, slots=True)
class ESMResult:
    """Score in [0, 1], the five components, the error categories, and the call matching.

    ``matches`` has one ``(candidate_index, reference_index, pair_score)`` per matched pair or
    unmatched call (the missing side is None).
    """

    score: float
    components: dict[str, float]
    errors: tuple[str, ...]
    matches: tuple[tuple[int | None, int | None, float], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (score, components, errors)."""
        return {"score": self.score, "components": dict(self.components), "errors": list(self.errors)}


_NUMBER: Final = frozenset({int, float})
# Same type and == means JSON-equal for these (not for lists/dicts: [True] == [1] in Python).
_SCALARS: Final = frozenset({str, int, float, bool, type(None)})

# (score, name, required, key, value_type, value, error mask)
_Pair = tuple[float, float, float, float, float, float, int]
# (candidate index, reference index, pair score) per matched pair or unmatched call
_Matches = tuple[tuple[int | None, int | None, float], ...]


def _equal(cv: Any, rv: Any) -> bool:
    """JSON equality: 1 == 1.0, true != 1, lists by position, dicts by keys; rv may hold Alternatives."""
    tr = type(rv)
    if tr is Alternatives:
        return any(_equal(cv, alt) for alt in rv.values)
    tc = type(cv)
    if tc is bool or tr is bool:
        return tc is tr and cv == rv
    if tc in _NUMBER and tr in _NUMBER:
        return bool(cv == rv)
    if tr is dict:
        if tc is not dict:
            return False
        for k, v in cv.items():
            if k not in rv or not _equal(v, rv[k]):
                return False
        if len(rv) != len(cv):
            for k, v in rv.items():
                if k not in cv and not (type(v) is Alternatives and v.optional):
                    return False
        return True
    if tr is list or tr is tuple:
        if (tc is not list and tc is not tuple) or len(cv) != len(rv):
            return False
        return all(_equal(a, b) for a, b in zip(cv, rv, strict=True))
    return tc is tr and bool(cv == rv)


def _plain_value_score(cv: Any, rv: Any) -> float:
    if type(cv) is str and type(rv) is str:
        if cv == rv:
            return 1.0
        credit = 0.5 if cv.casefold() == rv.casefold() else 0.0
        if cv in rv or rv in cv:
            credit += 0.5
        return credit
    return 1.0 if _equal(cv, rv) else 0.0


def _value_score(cv: Any, rv: Any) -> float:
    if type(rv) is Alternatives:
        tc = type(cv)
        if tc in _SCALARS:
            for alt in rv.values:
                if type(alt) is tc and alt == cv:
                    return 1.0
        best = 0.0
        for alt in rv.values:
            credit = _plain_value_score(cv, alt)
            if credit > best:
                best = credit
                if best == 1.0:
                    break
        return best
    return _plain_value_score(cv, rv)


def _score_pair(
    name: str, args: dict[str, Any], ref: ReferenceCall, index: ToolIndex, w: tuple[float, ...]
) -> _Pair:
    schema = index.tools.get(name)
    if schema is None:
        return (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, _UNKNOWN_TOOL)
    mask = 0
    name_ok = 1.0 if name == ref.name else 0.0
    if not name_ok:
        mask |= _WRONG_TOOL
    required = schema.required
    if required:
        present = 0
        for k in required:
            if k in args:
                present += 1
        req = present / len(required)
        if present != len(required):
            mask |= _MISSING_REQUIRED
    else:
        req = 1.0
    accepts = schema.accepts
    rargs = ref.arguments
    key_hits = 0
    type_hits = 0
    shared = 0
    value_sum = 0.0
    for k, v in args.items():
        acc = accepts.get(k, _MISSING)
        if acc is _MISSING:
            mask |= _UNKNOWN_KEY
        else:
            key_hits += 1
            if acc is None or type(v) in acc:  # type: ignore[operator]
                type_hits += 1
            else:
                mask |= _TYPE_MISMATCH
        rv = rargs.get(k, _MISSING)
        if rv is not _MISSING:
            shared += 1
            tv = type(v)
            if type(rv) is tv and tv in _SCALARS and rv == v:
                value_sum += 1.0
            else:
                credit = _value_score(v, rv)
                value_sum += credit
                if credit < 1.0:
                    mask |= _VALUE_MISMATCH
        elif acc is not _MISSING:
            mask |= _VALUE_MISMATCH
    n_c = len(args)
    n_r = shared
    if len(rargs) > shared:
        optional = ref.optional
        for k in rargs:
            if k not in args and k not in optional:
                n_r += 1
                if k not in schema.required_set:
                    mask |= _VALUE_MISMATCH
    denom = n_c if n_c > n_r else n_r
    if denom:
        key = key_hits / denom
        value_type = type_hits / denom
        value = value_sum / denom
    else:
        key = value_type = value = 1.0
    if n_c == 0:
        score = 1.0 if name_ok and n_r == 0 else 0.0
    else:
        score = (w[0] * name_ok + w[1] * req + w[2] * key + w[3] * value_type + w[4] * value) / w[5]
    return (score, name_ok, req, key, value_type, value, mask)


def _result(pair: _Pair, matches: _Matches) -> ESMResult:
    return ESMResult(
        pair[0],
        {"name": pair[1], "required": pair[2], "key": pair[3], "value_type": pair[4], "value": pair[5]},
        _ERROR_NAMES[pair[6]],
        matches,
    )


def _weights_tuple(weights: ESMWeights) -> tuple[float, ...]:
    return (weights.name, weights.required, weights.key, weights.value_type, weights.value, weights.total)


_DEFAULT_W: Final = _weights_tuple(DEFAULT_WEIGHTS)
_PARSE_RESULT: Final = ESMResult(0.0, dict.fromkeys(COMPONENTS, 0.0), ("parse",), ())


def _hungarian(weights: list[list[float]]) -> list[int]:
    """Column of each row in a maximum-total assignment of a rows <= columns matrix (Kuhn-Munkres)."""
    n, m = len(weights), len(weights[0])
    inf = float("inf")
    u = [0.0] * (n + 1)
    v = [0.0] * (m + 1)
    owner = [0] * (m + 1)  # owner[j]: row (1-based) assigned to column j, 0 if none
    way = [0] * (m + 1)
    for i in range(1, n + 1):
        owner[0] = i
        j0 = 0
        minv = [inf] * (m + 1)
        used = [False] * (m + 1)
        while True:
            used[j0] = True
            i0 = owner[j0]
            delta = inf
            j1 = 0
            row = weights[i0 - 1]
            for j in range(1, m + 1):
                if not used[j]:
                    cur = -row[j - 1] - u[i0] - v[j]
                    if cur < minv[j]:
                        minv[j] = cur
                        way[j] = j0
                    if minv[j] < delta:
                        delta = minv[j]
                        j1 = j
            for j in range(m + 1):
                if used[j]:
                    u[owner[j]] += delta
                    v[j] -= delta
                else:
                    minv[j] -= delta
            j0 = j1
            if owner[j0] == 0:
                break
        while j0:
            j1 = way[j0]
            owner[j0] = owner[j1]
            j0 = j1
    assignment = [-1] * n
    for j in range(1, m + 1):
        if owner[j]:
            assignment[owner[j] - 1] = j - 1
    return assignment


def _brute_force(weights: list[list[float]]) -> list[int]:
    """Same contract as :func:`_hungarian`, by trying every injection (small matrices only)."""
    n, m = len(weights), len(weights[0])
    best: tuple[int, ...] = ()
    best_total = -1.0
    for cols in itertools.permutations(range(m), n):
        total = 0.0
        for i, j in enumerate(cols):
            total += weights[i][j]
        if total > best_total + 1e-12:
            best, best_total = cols, total
    return list(best)


def best_matching(weights: list[list[float]]) -> list[tuple[int, int]]:
    """Pairs (row, column) of a one-to-one matching with the largest total weight (any shape)."""
    if not weights or not weights[0]:
        return []
    n, m = len(weights), len(weights[0])
    if n > m:
        transposed = [list(col) for col in zip(*weights, strict=True)]
        return sorted((r, c) for c, r in enumerate(best_matching_rows(transposed)))
    return list(enumerate(best_matching_rows(weights)))


def best_matching_rows(weights: list[list[float]]) -> list[int]:
    """Column of each row (rows <= columns): brute force up to 5 columns, Hungarian beyond."""
    if len(weights[0]) <= _BRUTE_FORCE_MAX:
        return _brute_force(weights)
    return _hungarian(weights)


_PARSE_PAIR: Final[_Pair] = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, _PARSE)
_NOTHING_PAIR: Final[_Pair] = (1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0)


def _turn(
    cands: list[tuple[str, dict[str, Any]]],
    refs: tuple[ReferenceCall, ...],
    index: ToolIndex,
    w: tuple[float, ...],
) -> tuple[_Pair, _Matches]:
    n, m = len(cands), len(refs)
    if n == 1 and m == 1:
        name, args = cands[0]
        pair = _score_pair(name, args, refs[0], index, w)
        return pair, ((0, 0, pair[0]),)
    if n == 0:
        return (_NOTHING_PAIR if m == 0 else _PARSE_PAIR), ()
    if m == 0:
        mask = 0
        for name, _ in cands:
            mask |= _WRONG_TOOL if name in index.tools else _UNKNOWN_TOOL
        return (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, mask), tuple((i, None, 0.0) for i in range(n))
    pairs = [[_score_pair(name, args, ref, index, w) for ref in refs] for name, args in cands]
    matched = best_matching([[p[0] for p in row] for row in pairs])
    sums = [0.0] * 6
    mask = 0
    matches: list[tuple[int | None, int | None, float]] = []
    for i, j in matched:
        pair = pairs[i][j]
        for k in range(6):
            sums[k] += pair[k]
        mask |= pair[6]
        matches.append((i, j, pair[0]))
    matched_c = {i for i, _ in matched}
    matched_r = {j for _, j in matched}
    for i, (name, _) in enumerate(cands):
        if i not in matched_c:
            mask |= _WRONG_TOOL if name in index.tools else _UNKNOWN_TOOL
            matches.append((i, None, 0.0))
    for j in range(m):
        if j not in matched_r:
            mask |= _WRONG_TOOL
            matches.append((None, j, 0.0))
    larger = max(n, m)
    total = (
        sums[0] / larger,
        sums[1] / larger,
        sums[2] / larger,
        sums[3] / larger,
        sums[4] / larger,
        sums[5] / larger,
        mask,
    )
    return total, tuple(matches)


def _score_turn(
    cands: list[tuple[str, dict[str, Any]]],
    refs: tuple[ReferenceCall, ...],
    index: ToolIndex,
    w: tuple[float, ...],
) -> ESMResult:
    pair, matches = _turn(cands, refs, index, w)
    return _result(pair, matches)


def score_calls(
    candidate: Any,
    reference: Any,
    tools: ToolIndex | str | Sequence[Any],
    weights: ESMWeights = DEFAULT_WEIGHTS,
    *,
    alternatives: bool = False,
) -> ESMResult:
    """ESM of a candidate turn (one or several calls) against the reference call(s).

    ``candidate``: ParseResult, ToolCall, call object, list of those, or raw model text.
    ``reference``: ToolCall, call object, :class:`ReferenceCall`, or a list of them; values may be
    :class:`Alternatives`, or lists of alternatives when ``alternatives=True``.
    ``tools``: a :class:`ToolIndex` (prepare it once per batch for speed), JSON text or a list of specs.
    Raises :class:`SchemaError` for unusable tools and ValueError for a reference that is not a call.
    """
    index = prepare_tools(tools)
    refs = prepare_reference(reference, alternatives=alternatives, tools=index)
    w = _DEFAULT_W if weights is DEFAULT_WEIGHTS else _weights_tuple(weights)
    cands = candidate_calls(candidate)
    if cands is None:
        return _PARSE_RESULT
    return _score_turn(cands, refs, index, w)


def score_call(
    candidate: ToolCall | Mapping[str, Any],
    reference: ToolCall | ReferenceCall | Mapping[str, Any],
    tools: ToolIndex | str | Sequence[Any],
    weights: ESMWeights = DEFAULT_WEIGHTS,
) -> ESMResult:
    """ESM of one candidate call against one reference call (see :func:`score_calls`)."""
    if isinstance(candidate, list | tuple) or isinstance(reference, list | tuple):
        raise TypeError("score_call scores one call against one call; use score_calls for turns")
    return score_calls(candidate, reference, tools, weights)


# ------------------------------------------------------------------------------------------ records
class InvalidRecord(ValueError):
    """A row that cannot be scored at all (not a low score): it goes to the rejected rows."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def record_tools(tools: Any) -> ToolIndex:
    """The tool index of a stored ``tools`` field (JSON text or list; cached by text), else InvalidRecord."""
    if tools is None:
        raise InvalidRecord("missing_value", "column 'tools' is null")
    try:
        return _prepare_tools_text(tools if type(tools) is str else json.dumps(tools, ensure_ascii=False))
    except (SchemaError, TypeError) as exc:
        raise InvalidRecord("invalid_tools", str(exc)) from None


def record_reference(reference: Any, alternatives: Any, index: ToolIndex) -> tuple[ReferenceCall, ...]:
    """The reference calls of a stored ``reference`` field (JSON text or object), else InvalidRecord."""
    if alternatives is None:
        alternatives = False
    if type(alternatives) is not bool:
        raise InvalidRecord(
            "invalid_reference", f"reference_alternatives must be true or false, got {alternatives!r}"
        )
    if reference is None:
        raise InvalidRecord("missing_value", "column 'reference' is null")
    if type(reference) is str:
        try:
            reference = json.loads(reference)
        except json.JSONDecodeError as exc:
            raise InvalidRecord(
                "invalid_reference", f"column 'reference' is not valid JSON ({exc})"
            ) from None
    try:
        return prepare_reference(reference, alternatives=alternatives, tools=index)
    except ValueError as exc:
        raise InvalidRecord("invalid_reference", str(exc)) from None


def score_prepared(
    candidate: Any,
    reference: tuple[ReferenceCall, ...],
    index: ToolIndex,
    weights: ESMWeights = DEFAULT_WEIGHTS,
) -> ESMResult:
    """:func:`score_calls` for a prepared reference and tool index (the inner loop of batch scoring)."""
    cands = candidate_calls(candidate)
    if cands is None:
        return _PARSE_RESULT
    w = _DEFAULT_W if weights is DEFAULT_WEIGHTS else _weights_tuple(weights)
    return _score_turn(cands, reference, index, w)


def score_components(
    candidate: Any,
    reference: tuple[ReferenceCall, ...],
    index: ToolIndex,
    weights: ESMWeights = DEFAULT_WEIGHTS,
) -> tuple[float, float, float, float, float, float, int]:
    """:func:`score_prepared` without building a result object, for columnar batches.

    Returns (score, name, required, key, value_type, value, error_mask); :func:`error_names` turns
    the mask into the error categories.
    """
    cands = candidate_calls(candidate)
    if cands is None:
        return _PARSE_PAIR
    return _turn(
        cands, reference, index, _DEFAULT_W if weights is DEFAULT_WEIGHTS else _weights_tuple(weights)
    )[0]


def score_fields(
    calls: Sequence[tuple[Any, Any]],
    reference: tuple[ReferenceCall, ...],
    index: ToolIndex,
    weights: ESMWeights = DEFAULT_WEIGHTS,
) -> tuple[float, float, float, float, float, float, int]:
    """:func:`score_components` of a candidate given as (name, arguments) pairs, as stored in columns.

    Same rules as a list of call objects ``{"name": name, "arguments": arguments}``.
    """
    cands = candidate_calls([{"name": name, "arguments": args} for name, args in calls])
    if cands is None:
        return _PARSE_PAIR
    return _turn(
        cands, reference, index, _DEFAULT_W if weights is DEFAULT_WEIGHTS else _weights_tuple(weights)
    )[0]


def error_names(mask: int) -> tuple[str, ...]:
    """The error categories of an error mask from :func:`score_components`, in CATEGORIES order."""
    return _ERROR_NAMES[mask]


def score_record(
    candidate: Any,
    reference: Any,
    tools: Any,
    *,
    reference_alternatives: Any = False,
    weights: ESMWeights = DEFAULT_WEIGHTS,
) -> ESMResult:
    """Score one stored row; raises :class:`InvalidRecord` (reason, detail) for a malformed row.

    Each field may be JSON text or the parsed object; ``candidate`` text may also be raw model text.
    ``reference_alternatives`` true means the reference's argument values are lists of alternatives.
    Reasons: missing_value, invalid_tools, invalid_reference.
    """
    if candidate is None:
        raise InvalidRecord("missing_value", "column 'candidate' is null")
    index = record_tools(tools)
    return score_prepared(
        candidate, record_reference(reference, reference_alternatives, index), index, weights
    )
