"""ESM, the error-oriented scoring mechanism (docs/design.md section 4): a pure scorer of tool calls.

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
call and the best one-to-one matching (largest total, exact) is kept; unmatched calls score 0 and the
total is divided by the larger count, so call order does not matter; components are averaged the
same way.

    index = prepare_tools(tools)                      # once per tool list (SchemaError if unusable)
    reference = prepare_reference(bfcl_answer, alternatives=True, tools=index)
    result = score(model_text, reference, index)      # ESMResult(score, components, errors, matches)
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache, lru_cache
from typing import Any, Final, NamedTuple

from ttpa_ray.codec import ParseResult, ToolCall, json_type_of, parse_any

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

    @classmethod
    def from_config(cls, weights: Any) -> ESMWeights:
        """Build from any object with the five attributes (e.g. ``ttpa_ray.config.ESMWeights``)."""
        return cls(*(float(getattr(weights, name)) for name in COMPONENTS))


DEFAULT_WEIGHTS: Final = ESMWeights()


# ------------------------------------------------------------------------------------ alternatives
class _Omitted:
    def __repr__(self) -> str:
        return "OMITTED"


OMITTED: Final = _Omitted()
"""Marker returned by :meth:`Alternatives.first` for an argument best left out."""
_MISSING: Final = object()


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


# ------------------------------------------------------------------------------------------- tools
class SchemaError(ValueError):
    """A tool spec ESM cannot use; the message names the tool and the parameter."""

    def __init__(self, problem: str, tool: str | None = None, parameter: str | None = None) -> None:
        where = [f"tool {tool!r}"] if tool is not None else []
        if parameter is not None:
            where.append(f"parameter {parameter!r}")
        super().__init__(f"{', '.join(where)}: {problem}" if where else problem)
        self.tool = tool
        self.parameter = parameter


# JSON type names, and BFCL's Python-flavoured ones (docs/design.md section 4, Types), to the Python types of
# their values; None is BFCL's 'any'.
_PY_TYPES: Final[dict[str, frozenset[type] | None]] = {
    "string": frozenset({str}),
    "integer": frozenset({int}),
    "number": frozenset({int, float}),
    "boolean": frozenset({bool}),
    "array": frozenset({list, tuple}),
    "object": frozenset({dict}),
    "null": frozenset({type(None)}),
    "dict": frozenset({dict}),
    "float": frozenset({int, float}),
    "tuple": frozenset({list, tuple}),
    "any": None,
}


def _accepts(schema: Any, tool: str, param: str, *, top: bool) -> frozenset[type] | None:
    """Python types a schema node admits: None for any, empty when it declares none (below the top)."""
    if not isinstance(schema, Mapping):
        raise SchemaError(f"schema must be an object, got {type(schema).__name__}", tool, param)
    declared = schema.get("type")
    types: set[type] = set()
    if declared is not None:
        if not isinstance(declared, str | list):
            raise SchemaError(f"'type' must be a string or a list, got {declared!r}", tool, param)
        for name in [declared] if isinstance(declared, str) else declared:
            if not isinstance(name, str) or name not in _PY_TYPES:
                raise SchemaError(
                    f"unknown type {name!r} (known: {', '.join(sorted(_PY_TYPES))})", tool, param
                )
            accepted = _PY_TYPES[name]
            if accepted is None:
                return None
            types |= accepted
    elif "anyOf" in schema or "oneOf" in schema:
        for sub in schema.get("anyOf", []) + schema.get("oneOf", []):
            accepted = _accepts(sub, tool, param, top=top)
            if accepted is None:
                return None
            types |= accepted
    elif "enum" in schema or "const" in schema:
        for value in schema["enum"] if "enum" in schema else [schema["const"]]:
            types |= _PY_TYPES.get(json_type_of(value)) or {str}
    elif top:
        raise SchemaError("no type declared (add 'type', 'anyOf' or 'enum')", tool, param)
    else:
        return frozenset()
    if schema.get("nullable") is True or ("default" in schema and schema["default"] is None):
        types.add(type(None))
    return frozenset(types) if types else None  # nothing declared (e.g. an empty anyOf): any


def _check_nested(schema: Mapping[str, Any], tool: str, param: str) -> None:
    """Validate type names below a parameter (items, properties); nested types are not scored."""
    nodes: list[Any] = []
    for key in ("items", "additionalProperties"):
        sub = schema.get(key)
        nodes += sub if isinstance(sub, list) else [sub]
    props = schema.get("properties")
    if isinstance(props, Mapping):
        nodes += props.values()
    for node in nodes:
        if isinstance(node, Mapping):
            _accepts(node, tool, param, top=False)
            _check_nested(node, tool, param)


@dataclass(frozen=True, slots=True)
class ToolSchema:
    """What ESM needs of one tool: the types each parameter admits (None: any), the required ones,
    and which parameters are objects or arrays of objects (BFCL nests alternatives there)."""

    name: str
    accepts: Mapping[str, frozenset[type] | None]
    required: tuple[str, ...]
    objects: frozenset[str] = frozenset()
    object_arrays: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class ToolIndex:
    """Tools by name, validated once (:func:`prepare_tools`) and reused for every call scored."""

    tools: Mapping[str, ToolSchema] = field(default_factory=dict)

    def __contains__(self, name: object) -> bool:
        return name in self.tools

    def __len__(self) -> int:
        return len(self.tools)


def _tool_schema(spec: Any) -> ToolSchema:
    if not isinstance(spec, Mapping):
        raise SchemaError(f"a tool spec must be an object, got {type(spec).__name__}")
    if spec.get("type") == "function" and isinstance(spec.get("function"), Mapping):
        spec = spec["function"]
    name = spec.get("name")
    if not isinstance(name, str) or not name:
        raise SchemaError(f"a tool spec needs a non-empty string 'name', got {name!r}")
    parameters = spec.get("parameters")
    parameters = {} if parameters is None else parameters
    if not isinstance(parameters, Mapping):
        raise SchemaError(f"'parameters' must be an object schema, got {type(parameters).__name__}", name)
    top_type = parameters.get("type", "object")
    if top_type not in ("object", "dict"):
        raise SchemaError(f"'parameters' must have type object, got {top_type!r}", name)
    props = parameters.get("properties") or {}
    if not isinstance(props, Mapping):
        raise SchemaError("'properties' must be an object", name)
    accepts: dict[str, frozenset[type] | None] = {}
    objects, object_arrays = set(), set()
    for param, schema in props.items():
        accepted = _accepts(schema, name, param, top=True)
        accepts[param] = accepted
        _check_nested(schema, name, param)
        if accepted is None:
            continue
        if dict in accepted:
            objects.add(param)
        items = schema.get("items")
        if list in accepted and isinstance(items, Mapping):
            item_types = _accepts(items, name, param, top=False)
            if item_types is not None and dict in item_types:
                object_arrays.add(param)
    required = parameters.get("required") or []
    if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        raise SchemaError("'required' must be a list of parameter names", name)
    for param in required:
        if param not in accepts:
            raise SchemaError("listed in 'required' but not in 'properties'", name, param)
    return ToolSchema(
        name, accepts, tuple(dict.fromkeys(required)), frozenset(objects), frozenset(object_arrays)
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
    if value.optional and key not in schema.required:
        return OMITTED
    return _first_of(value)


def _first_of(value: Any) -> Any:
    if type(value) is Alternatives:
        first = value.first()
        return first if first is OMITTED else _first_of(first)
    if type(value) is dict:
        chosen = {k: _first_of(v) for k, v in value.items()}
        return {k: v for k, v in chosen.items() if v is not OMITTED}
    if type(value) in (list, tuple):
        return [_first_of(v) for v in value]
    return value


def _nested_alternatives(value: Any, key: str, schema: ToolSchema | None) -> Any:
    # BFCL nests alternatives one level down in dict values (and in dicts inside arrays of dicts).
    def alternatives_in(item: Any) -> Any:
        if type(item) is not dict:
            return item
        return {k: Alternatives.from_list(v) if type(v) is list else v for k, v in item.items()}

    if schema is None:
        return value
    if type(value) is dict and key in schema.objects:
        return alternatives_in(value)
    if type(value) is list and key in schema.object_arrays:
        return [alternatives_in(item) for item in value]
    return value


def _reference_one(obj: Any, alternatives: bool, index: ToolIndex | None) -> ReferenceCall:
    if type(obj) is ReferenceCall:
        return obj
    if isinstance(obj, ToolCall):
        name, args = obj.name, obj.arguments
    elif isinstance(obj, Mapping) and isinstance(obj.get("name"), str):
        name, args = obj["name"], obj.get("arguments", obj.get("parameters", {}))
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError as exc:
                raise ValueError(f"arguments of reference {name!r} are not valid JSON ({exc})") from None
        args = {} if args is None else args
    elif (
        isinstance(obj, Mapping)
        and alternatives
        and len(obj) == 1
        and not {"name", "arguments", "parameters"} & obj.keys()
        and isinstance(next(iter(obj.values())), Mapping)
    ):
        name, args = next(iter(obj.items()))  # BFCL's possible-answer form: {tool: {param: [values]}}
    elif isinstance(obj, Mapping):
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
                continue
            if type(value) is not list:
                raise ValueError(
                    f"reference {name!r}: with alternatives, argument {key!r} must be a list of "
                    f"acceptable values, got {type(value).__name__}"
                )
            if not value:
                raise ValueError(f"reference {name!r}: argument {key!r} lists no acceptable value")
            alts = Alternatives.from_list(value)
            nested = tuple(_nested_alternatives(v, key, schema) for v in alts.values)
            converted[key] = Alternatives(nested, alts.optional)
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


# ----------------------------------------------------------------------------------------- scoring
@dataclass(frozen=True, slots=True)
class ESMResult:
    """Score in [0, 1], the five components, the error categories (in CATEGORIES order), the matching.

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


def _equal(cv: Any, rv: Any) -> bool:
    """JSON equality: 1 == 1.0, true != 1, lists by position, dicts by keys; rv may hold Alternatives."""
    tc, tr = type(cv), type(rv)
    if tr is Alternatives:
        return any(_equal(cv, alt) for alt in rv.values)
    if tc is bool or tr is bool:
        return tc is tr and cv == rv
    if tc in (int, float) and tr in (int, float):
        return bool(cv == rv)
    if tr is dict:
        return (
            tc is dict
            and all(k in rv and _equal(v, rv[k]) for k, v in cv.items())
            and all(k in cv or (type(v) is Alternatives and v.optional) for k, v in rv.items())
        )
    if tr in (list, tuple):
        return tc in (list, tuple) and len(cv) == len(rv) and all(map(_equal, cv, rv))
    return tc is tr and bool(cv == rv)


_SCALARS: Final = (str, int, float, bool, type(None))


def _value_credit(cv: Any, rv: Any) -> float:
    if type(cv) is type(rv) and type(cv) in _SCALARS and cv == rv:  # the common case, first
        return 1.0
    if type(rv) is Alternatives:
        best = 0.0
        for alt in rv.values:
            best = max(best, _value_credit(cv, alt))
            if best == 1.0:
                break
        return best
    if type(cv) is str and type(rv) is str and cv != rv:
        return 0.5 * (cv.casefold() == rv.casefold()) + 0.5 * (cv in rv or rv in cv)
    return 1.0 if _equal(cv, rv) else 0.0


class _Pair(NamedTuple):
    score: float
    components: tuple[float, ...]  # in COMPONENTS order
    errors: set[str]


def _score_pair(
    name: str, args: Mapping[str, Any], ref: ReferenceCall, index: ToolIndex, w: ESMWeights
) -> _Pair:
    schema = index.tools.get(name)
    if schema is None:
        return _Pair(0.0, (0.0,) * 5, {"unknown_tool"})
    errors: set[str] = set()
    name_ok = float(name == ref.name)
    if not name_ok:
        errors.add("wrong_tool")
    present = sum(k in args for k in schema.required)
    required = present / len(schema.required) if schema.required else 1.0
    if present < len(schema.required):
        errors.add("missing_required")
    key_hits = type_hits = shared = 0
    value_sum = 0.0
    for k, v in args.items():
        accepted = schema.accepts.get(k, _MISSING)
        if accepted is _MISSING:
            errors.add("unknown_key")
        else:
            key_hits += 1
            if accepted is None or type(v) in accepted:  # type: ignore[operator]
                type_hits += 1
            else:
                errors.add("type_mismatch")
        if k in ref.arguments:
            shared += 1
            credit = _value_credit(v, ref.arguments[k])
            value_sum += credit
            if credit < 1.0:
                errors.add("value_mismatch")
        elif accepted is not _MISSING:
            errors.add("value_mismatch")
    n_r = shared
    for k in ref.arguments:
        if k not in args and k not in ref.optional:
            n_r += 1
            if k not in schema.required:
                errors.add("value_mismatch")
    denom = max(len(args), n_r)
    key, value_type, value = (key_hits / denom, type_hits / denom, value_sum / denom) if denom else (1.0,) * 3
    if args:
        total = (
            w.name * name_ok
            + w.required * required
            + w.key * key
            + w.value_type * value_type
            + w.value * value
        ) / (w.name + w.required + w.key + w.value_type + w.value)
    else:
        total = 1.0 if name_ok and n_r == 0 else 0.0
    return _Pair(total, (name_ok, required, key, value_type, value), errors)


def best_matching(weights: Sequence[Sequence[float]]) -> list[tuple[int, int]]:
    """Pairs (row, column), sorted by row, of a one-to-one matching with the largest total weight.

    Exact, by dynamic programming over the subsets of used columns (the smaller side is matched in
    full): fine for the handful of parallel calls a turn has. Ties go to the earliest columns.
    """
    if not weights or not weights[0]:
        return []
    if len(weights) > len(weights[0]):
        transposed = [list(col) for col in zip(*weights, strict=True)]
        return sorted((r, c) for c, r in best_matching(transposed))
    n, m = len(weights), len(weights[0])
    if n == 1:
        return [(0, max(range(m), key=weights[0].__getitem__))]

    @cache
    def best(row: int, used: int) -> tuple[float, tuple[int, ...]]:
        if row == n:
            return 0.0, ()
        top: tuple[float, tuple[int, ...]] = (-1.0, ())
        for col in range(m):
            if not used & (1 << col):
                rest, cols = best(row + 1, used | (1 << col))
                if weights[row][col] + rest > top[0] + 1e-12:
                    top = (weights[row][col] + rest, (col, *cols))
        return top

    return list(enumerate(best(0, 0)[1]))


def _calls(candidate: Any) -> list[tuple[str, Mapping[str, Any]]] | None:
    """(name, arguments) of every call of a candidate, or None when it does not parse as calls.

    One definition of what a candidate means, ``codec.parse_any``'s; an empty list makes no call.
    """
    if type(candidate) in (list, tuple) and not candidate:
        return []
    parsed = candidate if type(candidate) is ParseResult else parse_any(candidate)
    return [(c.name, c.arguments) for c in parsed.calls] if parsed.ok else None


def _result(
    score: float, components: Sequence[float], errors: set[str] | frozenset[str], matches: Any
) -> ESMResult:
    return ESMResult(
        score,
        dict(zip(COMPONENTS, components, strict=True)),
        tuple(c for c in CATEGORIES if c in errors),
        tuple(matches),
    )


def score(
    candidate: Any,
    reference: Any,
    tools: ToolIndex | str | Sequence[Any],
    weights: ESMWeights = DEFAULT_WEIGHTS,
    *,
    alternatives: bool = False,
) -> ESMResult:
    """ESM of a candidate turn (one or several calls) against the reference call(s).

    ``candidate``: ParseResult, ToolCall, call object (arguments as an object or JSON text), a list of
    those, or raw model text. ``reference``: ToolCall, call object, :class:`ReferenceCall`, or a list
    of them (prepared once with :func:`prepare_reference` for speed); values may be
    :class:`Alternatives`, or lists of alternatives when ``alternatives=True``. ``tools``: a
    :class:`ToolIndex` (prepare it once per batch for speed), JSON text or a list of specs.
    Raises :class:`SchemaError` for unusable tools and ValueError for a reference that is not a call.
    """
    index = prepare_tools(tools)
    refs = prepare_reference(reference, alternatives=alternatives, tools=index)
    cands = _calls(candidate)
    if cands is None or (not cands and refs):
        return _result(0.0, (0.0,) * 5, {"parse"}, ())
    if not cands:
        return _result(1.0, (1.0,) * 5, set(), ())
    if not refs:
        unexpected = {"wrong_tool" if name in index else "unknown_tool" for name, _ in cands}
        return _result(0.0, (0.0,) * 5, unexpected, ((i, None, 0.0) for i in range(len(cands))))
    pairs = [[_score_pair(name, args, ref, index, weights) for ref in refs] for name, args in cands]
    matched = best_matching([[p.score for p in row] for row in pairs])
    errors: set[str] = set()
    sums = [0.0] * 6
    matches: list[tuple[int | None, int | None, float]] = []
    for i, j in matched:
        pair = pairs[i][j]
        for k, v in enumerate((pair.score, *pair.components)):
            sums[k] += v
        errors |= pair.errors
        matches.append((i, j, pair.score))
    for i in sorted(set(range(len(cands))) - {i for i, _ in matched}):
        errors.add("wrong_tool" if cands[i][0] in index else "unknown_tool")
        matches.append((i, None, 0.0))
    for j in sorted(set(range(len(refs))) - {j for _, j in matched}):
        errors.add("wrong_tool")
        matches.append((None, j, 0.0))
    larger = max(len(cands), len(refs))
    return _result(sums[0] / larger, [s / larger for s in sums[1:]], errors, matches)
