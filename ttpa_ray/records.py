"""Records: one versioned Arrow schema and one typed Python view per thing that flows between stages.

The flow is ToolSpec -> Dialogue -> Turn -> Candidate -> ScoredCandidate -> PreferencePair, and any
input a stage cannot turn into an output becomes a RejectedRow (nothing disappears). A Message is the
unit inside dialogues, turns and pairs. Every class is a frozen dataclass with ``SCHEMA``,
``to_row()`` (an Arrow-ready dict) and ``from_row()`` (validating: a missing or wrongly typed field
raises :class:`RecordError` naming the record type, the field and the row id); for all but Message
the three are derived from the dataclass fields alone (``_record``: a field's annotated type picks
its Arrow type, writer and reader), so a field is declared once. Tables carry the
metadata ``{"ttpa.record": <name>, "ttpa.schema_version": "1"}`` and a reader refuses a table of
another record type or version (:class:`SchemaMismatchError`).

Arrow layout, decided per field:

- Arbitrary JSON (tool arguments, JSON schemas, provenance, payloads) is stored as JSON text
  (``ensure_ascii=False``) in columns of Arrow's canonical JSON extension type ``pa.json_()``: its
  storage is a plain UTF-8 string (Parquet's JSON logical type), so pyarrow, pandas, numpy and Ray
  batches see strings, while ``datasets`` maps it to its ``Json()`` feature and hands back the decoded
  object. Nested dicts with varying keys cannot share one Arrow struct type, hence JSON. The Python
  views hold decoded objects (dicts, lists); ``from_row`` accepts either form.
- Message lists (Dialogue.messages, Turn.context, PreferencePair.prompt/chosen/rejected) are
  ``list<json>``: each element is exactly :meth:`Message.to_openai` (OpenAI/transformers chat message,
  keys present only when set, ``tool_calls[].function.arguments`` a JSON object). Why not a struct:
  a struct gives every message every key (``tool_calls: None`` on user turns), which breaks templates
  that test key presence (Llama 3.1 raises on ``'tool_calls' in message``); and a struct cannot hold
  the arguments dicts. A table of Message rows (``Message.SCHEMA``) uses typed columns instead.
- Tool lists (``tools``) are one JSON value: the list of :meth:`ToolSpec.to_openai` objects, exactly
  what ``apply_chat_template(tools=...)`` takes; ``tool_sources`` (list<string>) keeps each tool's
  ``source``, which must not leak into the rendered prompt.
- Parsed calls (Turn.reference_calls, Candidate.calls) are ``list<struct<name: string, arguments: json>>``.
- ``esm_components`` is ``map<string, double>``; token ids are ``list<int64>``; optionals are nulls.

TRL: a PreferencePair file is a conversational preference dataset that TRL's DPOTrainer reads as is
(``datasets.load_dataset("parquet", ...)``): ``prompt``/``chosen``/``rejected`` decode to lists of
message dicts whose tool-call arguments are dicts (Qwen-style ``arguments | tojson`` renders them
once, not double-encoded), and ``tools`` decodes to the list of tool dicts (TRL also ``json.loads`` a
string). ``ref_chosen_logps``/``ref_rejected_logps`` use TRL's names; TRL's collator cannot batch nulls,
so these columns are written only when set on every row of a table (all-or-none, else an error) and
read back as None when absent. (TRL 1.16 itself uses batch ref log-probs only with
``precompute_ref_log_probs=True``, which recomputes and appends them: drop these columns first there.)
Dialogue files follow the same conventions (``messages`` + ``tools``).

Ray Data: ``rows_from_batch`` turns a ``map_batches`` batch (pyarrow Table, dict of numpy arrays or
pandas DataFrame) into plain row dicts, and ``batch_from_rows`` builds the typed Arrow table back.
Requires pyarrow >= 19 (``pa.json_``).
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import Field, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Protocol, Self, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ttpa_ray.codec import ToolCall

__all__ = [
    "SCHEMA_VERSION",
    "Candidate",
    "Dialogue",
    "Message",
    "PreferencePair",
    "Record",
    "RecordError",
    "RejectedRow",
    "SchemaMismatchError",
    "ScoredCandidate",
    "ToolSpec",
    "Turn",
    "batch_from_rows",
    "check_schema",
    "from_table",
    "read_parquet",
    "reject",
    "rows_from_batch",
    "to_table",
    "write_parquet",
]

SCHEMA_VERSION = "1"
_META_RECORD = b"ttpa.record"
_META_VERSION = b"ttpa.schema_version"
_META_OMIT = b"ttpa.omit_when_null"

ROLES = frozenset({"system", "user", "assistant", "tool"})
SAMPLERS = frozenset({"tps", "sequence"})
CHOSEN_SOURCES = frozenset({"candidate", "reference"})
_REASON_RE = re.compile(r"^[a-z][a-z0-9_]*$")


# --------------------------------------------------------------------------------------------- errors


class RecordError(ValueError):
    """A record could not be built or read; names the record type, the field and the row id."""

    def __init__(
        self,
        record: str,
        field: str | None,
        problem: str,
        row_id: str | None = None,
        row_index: int | None = None,
        source: str | None = None,
    ) -> None:
        self.record = record
        self.field = field
        self.problem = problem
        self.row_id = row_id
        self.row_index = row_index
        self.source = source
        if row_id is not None:
            where = f" row {row_id!r}"
        elif row_index is not None:
            where = f" row #{row_index}"
        else:
            where = ""
        what = f" field {field!r}" if field is not None else ""
        origin = f"{source}: " if source else ""
        super().__init__(f"{origin}{record}{where}{what}: {problem}")

    def located(self, source: str, row_index: int | None = None) -> RecordError:
        """The same error, naming the file it came from (and the row index when the id is unknown)."""
        index = row_index if self.row_id is None else self.row_index
        return type(self)(self.record, self.field, self.problem, self.row_id, index, source)


class SchemaMismatchError(RecordError):
    """A table holds another record type or schema version than the reader expects."""


# ------------------------------------------------------------------------------------- arrow types

JSON = pa.json_()
CALLS = pa.list_(pa.struct([pa.field("name", pa.string()), pa.field("arguments", JSON)]))
MESSAGES = pa.list_(JSON)
STRINGS = pa.list_(pa.string())
_OPENAI_CALLS = pa.list_(
    pa.struct(
        [
            pa.field("id", pa.string()),
            pa.field("type", pa.string()),
            pa.field("function", pa.struct([pa.field("name", pa.string()), pa.field("arguments", JSON)])),
        ]
    )
)


def _schema(record: str, fields: list[pa.Field], omit_when_null: Sequence[str] = ()) -> pa.Schema:
    meta = {_META_RECORD: record.encode(), _META_VERSION: SCHEMA_VERSION.encode()}
    if omit_when_null:
        meta[_META_OMIT] = ",".join(omit_when_null).encode()
    return pa.schema(fields, metadata=meta)


def _storage_type(dtype: pa.DataType) -> pa.DataType:
    # pyarrow cannot build extension arrays from Python objects: build storage, then cast.
    if isinstance(dtype, pa.BaseExtensionType):
        return _storage_type(dtype.storage_type)
    if pa.types.is_struct(dtype):
        return pa.struct(
            [f.with_type(_storage_type(f.type)) for f in (dtype.field(i) for i in range(dtype.num_fields))]
        )
    if pa.types.is_list(dtype):
        return pa.list_(dtype.value_field.with_type(_storage_type(dtype.value_type)))
    return dtype


def storage_schema(schema: pa.Schema) -> pa.Schema:
    """The schema with every Arrow extension type (the JSON columns) as its storage type."""
    return pa.schema([f.with_type(_storage_type(f.type)) for f in schema], metadata=schema.metadata)


def _omit_when_null(schema: pa.Schema) -> list[str]:
    raw = (schema.metadata or {}).get(_META_OMIT, b"")
    return [name for name in raw.decode().split(",") if name]


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


# ------------------------------------------------------------------------------------ row reading


class _Reader:
    """Typed access to the fields of one row; each failure is a RecordError with record, field and id.

    A row (strict) must have every column, nulls only in optional ones; a nested OpenAI-style object
    (a message, a tool, a call) may leave optional keys out, as the OpenAI format does.
    """

    __slots__ = ("prefix", "record", "row", "row_id", "strict")

    def __init__(
        self, record: str, row: Any, row_id: str | None = None, prefix: str = "", strict: bool = False
    ) -> None:
        self.record = record
        self.row = row
        self.row_id = row_id
        self.prefix = prefix
        self.strict = strict

    @classmethod
    def for_row(cls, record: str, row: Any, id_field: str | None) -> _Reader:
        if not isinstance(row, Mapping):
            raise RecordError(record, None, f"expected a row mapping, got {type(row).__name__}")
        reader = cls(record, row, strict=True)
        if id_field is not None:
            reader.row_id = reader.text(id_field)
        return reader

    def sub(self, value: Any, path: str) -> _Reader:
        """A reader over a nested object, reporting fields as ``<path>.<key>``."""
        if not isinstance(value, Mapping):
            where = f"{self.prefix}{path}" or None
            raise RecordError(
                self.record, where, f"expected an object, got {type(value).__name__}", self.row_id
            )
        return _Reader(self.record, value, self.row_id, f"{self.prefix}{path}." if path else self.prefix)

    def fail(self, key: str, problem: str) -> RecordError:
        return RecordError(self.record, f"{self.prefix}{key}", problem, self.row_id)

    def raw(self, key: str, optional: bool = False, absent_ok: bool = False) -> Any:
        if key not in self.row:
            if absent_ok or (optional and not self.strict):
                return None
            raise self.fail(key, "is missing")
        value = self.row[key]
        if value is None and not optional:
            raise self.fail(key, "is null")
        return value

    def text(self, key: str) -> str:
        return self._as_text(key, self.raw(key))

    def opt_text(self, key: str) -> str | None:
        value = self.raw(key, optional=True)
        return None if value is None else self._as_text(key, value)

    def _as_text(self, key: str, value: Any) -> str:
        if not isinstance(value, str):
            raise self.fail(key, f"expected a string, got {type(value).__name__} {value!r:.80}")
        return str(value)

    def integer(self, key: str) -> int:
        return self._as_int(key, self.raw(key))

    def opt_integer(self, key: str) -> int | None:
        value = self.raw(key, optional=True)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return None
        return self._as_int(key, value)

    def _as_int(self, key: str, value: Any) -> int:
        if isinstance(value, bool | np.bool_):
            raise self.fail(key, f"expected an integer, got bool {value!r}")
        if isinstance(value, numbers.Integral):
            return int(value)
        # numpy batches turn a nullable int column into floats
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise self.fail(key, f"expected an integer, got {type(value).__name__} {value!r:.80}")

    def number(self, key: str) -> float:
        return self._as_float(key, self.raw(key))

    def opt_number(self, key: str, absent_ok: bool = False) -> float | None:
        value = self.raw(key, optional=True, absent_ok=absent_ok)
        # numpy/pandas batches spell null as NaN; a NaN optional means "not set"
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return None
        return self._as_float(key, value)

    def _as_float(self, key: str, value: Any) -> float:
        if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Real):
            raise self.fail(key, f"expected a number, got {type(value).__name__} {value!r:.80}")
        return float(value)

    def choice(self, key: str, allowed: frozenset[str]) -> str:
        value = self.text(key)
        if value not in allowed:
            raise self.fail(key, f"expected one of {sorted(allowed)}, got {value!r}")
        return value

    def items(self, key: str, optional: bool = False) -> list[Any]:
        value = self.raw(key, optional=optional)
        if value is None:
            return []
        if isinstance(value, np.ndarray):
            return list(value)
        if not isinstance(value, list | tuple):
            raise self.fail(key, f"expected a list, got {type(value).__name__}")
        return list(value)

    def texts(self, key: str) -> tuple[str, ...]:
        return tuple(self._as_text(f"{key}[{i}]", v) for i, v in enumerate(self.items(key)))

    def integers(self, key: str) -> tuple[int, ...]:
        return tuple(self._as_int(f"{key}[{i}]", v) for i, v in enumerate(self.items(key)))

    def json(self, key: str, optional: bool = False) -> Any:
        """A JSON field: text is decoded, an already-decoded value (``datasets`` rows) is taken as is."""
        value = self.raw(key, optional=optional)
        return self._decode(key, value)

    def _decode(self, key: str, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        try:
            return json.loads(value)
        except json.JSONDecodeError as exc:
            raise self.fail(key, f"is not valid JSON ({exc.msg} at char {exc.pos}): {value!r:.80}") from None

    def json_object(self, key: str) -> dict[str, Any]:
        value = self.json(key)
        if not isinstance(value, Mapping):
            raise self.fail(key, f"expected a JSON object, got {type(value).__name__}")
        return dict(value)

    def float_map(self, key: str) -> dict[str, float]:
        value = self.raw(key)
        # pyarrow gives a map as [(key, value)], the datasets library as [{"key":..., "value":...}]
        if isinstance(value, Mapping):
            pairs = list(value.items())
        elif isinstance(value, list | tuple | np.ndarray):
            pairs = [(p["key"], p["value"]) if isinstance(p, Mapping) else tuple(p) for p in value]
        else:
            raise self.fail(key, f"expected a mapping of name to number, got {type(value).__name__}")
        out: dict[str, float] = {}
        for name, number in pairs:
            out[self._as_text(key, name)] = self._as_float(f"{key}[{name!r}]", number)
        return out

    def calls(self, key: str) -> tuple[ToolCall, ...]:
        return tuple(_parse_call(self, f"{key}[{i}]", v) for i, v in enumerate(self.items(key)))

    def messages(self, key: str) -> tuple[Message, ...]:
        out = []
        for i, item in enumerate(self.items(key)):
            path = f"{key}[{i}]"
            out.append(_parse_message(self.sub(self._decode(path, item), path)))
        return tuple(out)

    def tools(self, key: str = "tools", sources_key: str = "tool_sources") -> tuple[ToolSpec, ...]:
        specs = self.json(key)
        if not isinstance(specs, list | tuple):
            raise self.fail(key, f"expected a JSON list of tools, got {type(specs).__name__}")
        sources = self.texts(sources_key)
        if len(sources) != len(specs):
            raise self.fail(sources_key, f"has {len(sources)} entries for {len(specs)} tools")
        return tuple(
            _parse_tool(self, f"{key}[{i}]", spec, source)
            for i, (spec, source) in enumerate(zip(specs, sources, strict=True))
        )


def _parse_arguments(reader: _Reader, key: str, value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if isinstance(value, str):
        if not value.strip():
            return {}
        value = reader._decode(key, value)
    if not isinstance(value, Mapping):
        raise reader.fail(key, f"expected a JSON object of arguments, got {type(value).__name__}")
    return dict(value)


def _parse_call(reader: _Reader, path: str, value: Any) -> ToolCall:
    call = reader.sub(value, path)
    if "function" in call.row and call.row["function"] is not None:
        call = call.sub(call.row["function"], "function")
    name = call.text("name")
    if not name:
        raise call.fail("name", "is empty")
    args_key = "arguments" if "arguments" in call.row else "parameters"
    return ToolCall(name=name, arguments=_parse_arguments(call, args_key, call.row.get(args_key)))


def _parse_message(msg: _Reader) -> Message:
    role = msg.choice("role", ROLES)
    content = msg.raw("content", optional=True)
    if isinstance(content, list):
        # OpenAI content parts: only text parts are meaningful for tool use
        texts = []
        for i, part in enumerate(content):
            part_reader = msg.sub(part, f"content[{i}]")
            texts.append(part_reader.text("text"))
        content = "".join(texts)
    elif content is not None and not isinstance(content, str):
        raise msg.fail("content", f"expected a string or null, got {type(content).__name__}")
    calls: list[ToolCall] = []
    ids: list[str | None] = []
    for i, raw_call in enumerate(msg.items("tool_calls", optional=True)):
        path = f"tool_calls[{i}]"
        calls.append(_parse_call(msg, path, raw_call))
        ids.append(msg.sub(raw_call, path).opt_text("id"))
    if any(i is None for i in ids) and not all(i is None for i in ids):
        raise msg.fail("tool_calls", "either every tool call has an 'id' or none has")
    return Message(
        role=role,
        content=content,
        tool_calls=tuple(calls),
        tool_call_id=msg.opt_text("tool_call_id"),
        name=msg.opt_text("name"),
        tool_call_ids=tuple(i for i in ids if i is not None),
    )


def _parse_tool(reader: _Reader, path: str, value: Any, source: str) -> ToolSpec:
    tool = reader.sub(value, path)
    if tool.row.get("type") == "function" and "function" in tool.row:
        tool = tool.sub(tool.row["function"], "function")
    name = tool.raw("name", optional=True)
    if not isinstance(name, str) or not name:
        raise tool.fail("name", f"a tool needs a non-empty string name, got {name!r:.80}")
    description = tool.raw("description", optional=True)
    if description is not None and not isinstance(description, str):
        raise tool.fail("description", f"tool {name!r}: expected a string, got {type(description).__name__}")
    if "parameters" in tool.row and tool.row["parameters"] is not None:
        parameters = tool.json("parameters")
    else:
        parameters = {"type": "object", "properties": {}}
    _check_parameters(tool, name, parameters)
    return ToolSpec(name=name, description=description or "", parameters=dict(parameters), source=source)


def _check_parameters(tool: _Reader, name: str, parameters: Any) -> None:
    def bad(problem: str) -> RecordError:
        return tool.fail("parameters", f"tool {name!r}: {problem}")

    if not isinstance(parameters, Mapping):
        raise bad(f"expected a JSON-schema object, got {type(parameters).__name__}")
    if parameters.get("type") != "object":
        raise bad(f"the parameters schema must have type 'object', got {parameters.get('type')!r}")
    properties = parameters.get("properties", {})
    if not isinstance(properties, Mapping) or not all(isinstance(p, Mapping) for p in properties.values()):
        raise bad("'properties' must map each parameter name to a schema object")
    required = parameters.get("required", [])
    if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        raise bad("'required' must be a list of parameter names")


def _freeze(obj: object, *names: str) -> None:
    # lists are accepted at construction; records hold tuples so that they stay immutable
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, tuple):
            object.__setattr__(obj, name, tuple(value))


def _call_row(call: ToolCall) -> dict[str, Any]:
    return {"name": call.name, "arguments": _dumps(call.arguments)}


def _tools_row(tools: Sequence[ToolSpec]) -> dict[str, Any]:
    return {"tools": _dumps([t.to_openai() for t in tools]), "tool_sources": [t.source for t in tools]}


def _messages_row(messages: Sequence[Message]) -> list[str]:
    return [_dumps(m.to_openai()) for m in messages]


# ---------------------------------------------------------------------------------------- records


class Record(Protocol):
    """What every record class provides."""

    SCHEMA: ClassVar[pa.Schema]

    def to_row(self) -> dict[str, Any]: ...

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Self: ...


R = TypeVar("R", bound=Record)


@dataclass(frozen=True, slots=True)
class _Column:
    """How one record field is stored: its Arrow fields, how its value is written, how it is read."""

    name: str
    fields: tuple[pa.Field, ...]
    write: Callable[[Any], dict[str, Any]]
    read: Callable[[_Reader], Any]


def _choice(allowed: frozenset[str]) -> Callable[[_Reader, str], str]:
    return lambda reader, key: reader.choice(key, allowed)


# Field type (as annotated) -> Arrow type, reader, writer. A field's metadata may override the Arrow
# type ("arrow") and the reader ("read"), and say "absent_ok" (an old table without the column reads
# as None) or "omit_when_null" (the column is written only when set on every row).
_KINDS: dict[str, tuple[pa.DataType, Callable[[_Reader, str], Any], Callable[[Any], Any]]] = {
    "str": (pa.string(), _Reader.text, lambda v: v),
    "str | None": (pa.string(), _Reader.opt_text, lambda v: v),
    "int": (pa.int64(), _Reader.integer, lambda v: v),
    "int | None": (pa.int64(), _Reader.opt_integer, lambda v: v),
    "float": (pa.float64(), _Reader.number, lambda v: v),
    "float | None": (pa.float64(), _Reader.opt_number, lambda v: v),
    "tuple[str, ...]": (STRINGS, _Reader.texts, list),
    "tuple[int, ...]": (pa.list_(pa.int64()), _Reader.integers, list),
    "tuple[ToolCall, ...]": (CALLS, _Reader.calls, lambda calls: [_call_row(c) for c in calls]),
    "tuple[Message, ...]": (MESSAGES, _Reader.messages, lambda messages: _messages_row(messages)),
    "dict[str, Any]": (JSON, _Reader.json_object, lambda v: _dumps(v)),
    "dict[str, float]": (pa.map_(pa.string(), pa.float64()), _Reader.float_map, dict),
}


def _column(f: Field[Any]) -> _Column:
    kind, name = str(f.type), f.name
    if kind == "tuple[ToolSpec, ...]":  # the tools and their sources, two columns
        return _Column(
            name, (pa.field(name, JSON), pa.field("tool_sources", STRINGS)), _tools_row, _Reader.tools
        )
    if kind == "Candidate":  # a nested record: its columns, flat
        arrow_fields = tuple(a for c in Candidate._COLUMNS for a in c.fields)
        return _Column(name, arrow_fields, lambda value: value.to_row(), Candidate._read)
    arrow, read, write = _KINDS[kind]
    arrow, read = f.metadata.get("arrow", arrow), f.metadata.get("read", read)
    absent_ok = f.metadata.get("absent_ok") or f.metadata.get("omit_when_null")

    def read_field(reader: _Reader) -> Any:
        return None if absent_ok and name not in reader.row else read(reader, name)

    return _Column(name, (pa.field(name, arrow),), lambda value: {name: write(value)}, read_field)


class _Row:
    """Base of the records declared by their dataclass fields alone (see :func:`_record`)."""

    __slots__ = ()
    SCHEMA: ClassVar[pa.Schema]
    _COLUMNS: ClassVar[tuple[_Column, ...]]
    _ID: ClassVar[str | None] = None  # the field that names a row in errors (None: the first)

    def __post_init__(self) -> None:
        # lists are accepted at construction; records hold tuples so that they stay immutable
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if str(f.type).startswith("tuple[") and not isinstance(value, tuple):
                object.__setattr__(self, f.name, tuple(value))

    def to_row(self) -> dict[str, Any]:
        """Arrow-ready row: JSON values as text, calls as name + arguments text, tools with their sources."""
        row: dict[str, Any] = {}
        for column in self._COLUMNS:
            row.update(column.write(getattr(self, column.name)))
        return row

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Self:
        """Validate and build from an Arrow row (or a ``datasets`` row, where JSON is already decoded);
        extra columns are ignored."""
        return cls._read(_Reader.for_row(cls.__name__, row, cls._ID or cls._COLUMNS[0].name))

    @classmethod
    def _read(cls, reader: _Reader) -> Self:
        return cls(**{c.name: c.read(reader) for c in cls._COLUMNS})


_R = TypeVar("_R", bound=_Row)


def _record(name: str) -> Callable[[type[_R]], type[_R]]:
    """Derive a record's Arrow schema, row writer and validating reader from its dataclass fields."""

    def derive(cls: type[_R]) -> type[_R]:
        cls._COLUMNS = tuple(_column(f) for f in fields(cls))  # type: ignore[arg-type]
        omit = [f.name for f in fields(cls) if f.metadata.get("omit_when_null")]  # type: ignore[arg-type]
        cls.SCHEMA = _schema(name, [a for c in cls._COLUMNS for a in c.fields], omit)
        return cls

    return derive


def _tool_parameters(reader: _Reader, key: str) -> dict[str, Any]:
    parameters = reader.json_object(key)
    _check_parameters(reader, reader.text("name"), parameters)
    return parameters


def _payload_text(reader: _Reader, key: str) -> str:
    payload = reader.raw(key)
    return payload if isinstance(payload, str) else _dumps(payload)  # a datasets row holds it decoded


@_record("tool_spec")
@dataclass(frozen=True, slots=True)
class ToolSpec(_Row):
    """A tool the model may call: name, description, JSON-schema ``parameters`` and its catalogue source."""

    name: str
    description: str = ""
    parameters: dict[str, Any] = field(
        default_factory=lambda: {"type": "object", "properties": {}}, metadata={"read": _tool_parameters}
    )
    source: str = "unknown"  # "builtin", "bfcl", "module:<path>", ...

    def to_openai(self) -> dict[str, Any]:
        """The OpenAI / transformers tool form ``{"type": "function", "function": {...}}``."""
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }

    @classmethod
    def from_openai(cls, obj: Mapping[str, Any], source: str = "unknown") -> ToolSpec:
        """Build from the wrapped or bare function form; a bad schema raises RecordError naming the tool."""
        inner = obj.get("function", obj) if isinstance(obj, Mapping) else None
        name = inner.get("name") if isinstance(inner, Mapping) else None
        reader = _Reader("ToolSpec", {}, row_id=name if isinstance(name, str) else None)
        return _parse_tool(reader, "", obj, source)


@dataclass(frozen=True, slots=True)
class Message:
    """One chat message. ``tool_call_ids`` are the OpenAI ids of ``tool_calls`` (parallel, or empty)."""

    role: str  # "system" | "user" | "assistant" | "tool"
    content: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None  # on a tool message: the call it answers
    name: str | None = None
    tool_call_ids: tuple[str, ...] = ()

    SCHEMA: ClassVar[pa.Schema] = _schema(
        "message",
        [
            pa.field("role", pa.string()),
            pa.field("content", pa.string()),
            pa.field("tool_calls", _OPENAI_CALLS),
            pa.field("tool_call_id", pa.string()),
            pa.field("name", pa.string()),
        ],
    )

    def __post_init__(self) -> None:
        _freeze(self, "tool_calls", "tool_call_ids")
        if self.role not in ROLES:
            raise RecordError("Message", "role", f"expected one of {sorted(ROLES)}, got {self.role!r}")
        if self.tool_call_ids and len(self.tool_call_ids) != len(self.tool_calls):
            raise RecordError(
                "Message",
                "tool_call_ids",
                f"{len(self.tool_call_ids)} ids for {len(self.tool_calls)} tool calls",
            )

    def _openai_calls(self, arguments_as_text: bool) -> list[dict[str, Any]]:
        out = []
        for i, call in enumerate(self.tool_calls):
            args: Any = _dumps(call.arguments) if arguments_as_text else call.arguments
            item: dict[str, Any] = {"type": "function", "function": {"name": call.name, "arguments": args}}
            if self.tool_call_ids:
                item = {"id": self.tool_call_ids[i], **item}
            out.append(item)
        return out

    def to_openai(self) -> dict[str, Any]:
        """The OpenAI / transformers chat message; keys only when set, tool-call arguments as dicts."""
        out: dict[str, Any] = {"role": self.role}
        if self.content is not None:
            out["content"] = self.content
        if self.tool_calls:
            out["tool_calls"] = self._openai_calls(arguments_as_text=False)
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            out["name"] = self.name
        return out

    @classmethod
    def from_openai(cls, obj: Mapping[str, Any]) -> Message:
        """Build from an OpenAI chat message; tool-call arguments may be a dict or JSON text."""
        return _parse_message(_Reader("Message", {}).sub(obj, ""))

    def to_row(self) -> dict[str, Any]:
        """Arrow-ready row of a Message table (tool-call arguments as JSON text)."""
        calls = self._openai_calls(arguments_as_text=True)
        for call in calls:
            call.setdefault("id", None)
        return {
            "role": self.role,
            "content": self.content,
            "tool_calls": calls,
            "tool_call_id": self.tool_call_id,
            "name": self.name,
        }

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Self:
        """Validate and build from a Message-table row (every column present, nulls allowed)."""
        msg = _parse_message(_Reader.for_row("Message", row, None))
        return cls(msg.role, msg.content, msg.tool_calls, msg.tool_call_id, msg.name, msg.tool_call_ids)


def conversation_problem(messages: Sequence[Message]) -> str | None:
    """What makes ``messages`` not a valid chat conversation, or None.

    Valid: a system message only first; then a user message; every tool message answers a call of
    the assistant message it follows (by id when ids are set, else by name), and every call is
    answered before the next user or assistant message (a conversation may stop at a call).
    """
    open_calls: list[ToolCall] = []
    open_ids: list[str] = []
    seen_user = False
    for i, message in enumerate(messages):
        where = f"message {i} ({message.role})"
        if message.role == "system":
            if i:
                return f"{where}: a system message may only come first"
            continue
        if not seen_user and message.role != "user":
            return f"{where}: the conversation must start with a user message"
        if message.role == "tool":
            if not open_calls:
                return f"{where}: answers no open tool call"
            if open_ids:
                if message.tool_call_id not in open_ids:
                    return f"{where}: tool_call_id {message.tool_call_id!r} is not one of {open_ids}"
                open_calls.pop(open_ids.index(message.tool_call_id))
                open_ids.remove(message.tool_call_id)
                continue
            names = [c.name for c in open_calls]
            if message.name is not None and message.name not in names:
                return f"{where}: {message.name!r} is not one of the open calls {names}"
            open_calls.pop(names.index(message.name) if message.name is not None else 0)
            continue
        if open_calls:
            return f"{where}: {[c.name for c in open_calls]} of the assistant before it have no tool response"
        seen_user = seen_user or message.role == "user"
        if message.role == "assistant":
            open_calls, open_ids = list(message.tool_calls), list(message.tool_call_ids)
    if not seen_user:
        return "no user message"
    return None


@_record("dialogue")
@dataclass(frozen=True, slots=True)
class Dialogue(_Row):
    """A reversed-synthesis dialogue: system, user question, assistant calls + tool responses, answer."""

    dialogue_id: str
    seed_id: str
    messages: tuple[Message, ...]
    tools: tuple[ToolSpec, ...] = ()
    scenario: str = ""
    provenance: dict[str, Any] = field(default_factory=dict)  # teacher model, seed, config hash...
    status: str = "ok"


@_record("turn")
@dataclass(frozen=True, slots=True)
class Turn(_Row):
    """One assistant tool-call turn: the context before it, the tools, and the reference call(s) y*."""

    turn_id: str
    dialogue_id: str
    turn_index: int
    context: tuple[Message, ...]
    tools: tuple[ToolSpec, ...]
    reference_calls: tuple[ToolCall, ...]


@_record("candidate")
@dataclass(frozen=True, slots=True)
class Candidate(_Row):
    """A sampled completion for a turn: parsed calls (maybe none) and, for TPS, where it branched off y*.

    ``sequence_logprob`` and ``reference_logprob`` are the policy's own log-probs at sampling time,
    sums over completion tokens: of this whole completion, and of the turn's reference y* (teacher
    forced, y* includes the end token); a table written before they existed reads them as None.
    """

    candidate_id: str
    turn_id: str
    calls: tuple[ToolCall, ...] = ()
    raw_text: str = ""
    parse_error: str | None = None
    sampler: str = field(default="tps", metadata={"read": _choice(SAMPLERS)})  # "tps" | "sequence"
    branch_position: int | None = None  # token index in the reference completion where it diverges
    branch_token: str | None = None
    branch_token_id: int | None = None
    reference_token: str | None = None
    logprob: float | None = None  # policy log-prob of the branch token
    completion_token_ids: tuple[int, ...] = ()
    sequence_logprob: float | None = field(default=None, metadata={"absent_ok": True})
    reference_logprob: float | None = field(default=None, metadata={"absent_ok": True})


@_record("scored_candidate")
@dataclass(frozen=True, slots=True)
class ScoredCandidate(_Row):
    """A candidate with its ESM score, per-component scores and error categories (flat in Arrow)."""

    candidate: Candidate
    esm_score: float
    esm_components: dict[str, float] = field(default_factory=dict)  # name, required, key, value_type, value
    esm_errors: tuple[str, ...] = ()

    @property
    def candidate_id(self) -> str:
        return self.candidate.candidate_id

    _ID: ClassVar[str | None] = "candidate_id"

    @property
    def turn_id(self) -> str:
        return self.candidate.turn_id


@_record("preference_pair")
@dataclass(frozen=True, slots=True)
class PreferencePair(_Row):
    """A token-level preference pair; its table is also a TRL conversational preference dataset."""

    pair_id: str
    turn_id: str
    prompt: tuple[Message, ...]
    chosen: tuple[Message, ...]
    rejected: tuple[Message, ...]
    tools: tuple[ToolSpec, ...]
    chosen_score: float
    rejected_score: float
    rejected_errors: tuple[str, ...] = ()
    branch_position: int | None = None
    branch_token: str | None = None
    chosen_source: str = field(default="candidate", metadata={"read": _choice(CHOSEN_SOURCES)})
    chosen_logprob: float | None = None
    rejected_logprob: float | None = None
    # precomputed reference log-probs (TRL's column names); TRL's DPO collator batches these whenever
    # the column exists: a null would crash it
    ref_chosen_logps: float | None = field(default=None, metadata={"omit_when_null": True})
    ref_rejected_logps: float | None = field(default=None, metadata={"omit_when_null": True})


@_record("rejected_row")
@dataclass(frozen=True, slots=True)
class RejectedRow(_Row):
    """An input a stage could not turn into an output, with a machine-friendly reason and the original row."""

    input_id: str
    stage: str
    reason: str  # short and machine-friendly: "parse_error", "no_successful_call", ...
    detail: str  # the human message
    payload: str = field(metadata={"arrow": JSON, "read": _payload_text})  # JSON text of the original row

    def payload_object(self) -> Any:
        """The original row, decoded."""
        return json.loads(self.payload)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if hasattr(value, "to_row"):
        return value.to_row()
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    return repr(value)


def reject(input_id: str, stage: str, reason: str, detail: str, payload: Any) -> RejectedRow:
    """A RejectedRow; ``payload`` (a row dict, a record, anything) is stored as JSON text, never lost."""
    if not _REASON_RE.match(reason):
        raise ValueError(f"reject reason must be short snake_case like 'parse_error', got {reason!r}")
    if hasattr(payload, "to_row"):
        payload = payload.to_row()
    text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"), default=_json_default)
    return RejectedRow(input_id=input_id, stage=stage, reason=reason, detail=detail, payload=text)


# ------------------------------------------------------------------------------- tables and files


def check_schema(cls: type[Record], schema: pa.Schema, source: str = "table") -> None:
    """Raise SchemaMismatchError if ``schema`` is tagged with another record type or version than ``cls``.

    Untagged schemas (e.g. a table rebuilt by some tool that drops metadata) pass; their rows are still
    validated field by field by ``from_row``.
    """
    meta = schema.metadata or {}
    got_record, got_version = meta.get(_META_RECORD), meta.get(_META_VERSION)
    if got_record is None and got_version is None:
        return
    want = cls.SCHEMA.metadata
    if got_record != want[_META_RECORD] or got_version != want[_META_VERSION]:
        got = (got_record or b"?").decode()
        got_v = (got_version or b"?").decode()
        raise SchemaMismatchError(
            cls.__name__,
            None,
            f"expected a {want[_META_RECORD].decode()!r} table of schema version "
            f"{want[_META_VERSION].decode()}, got a {got!r} table of schema version {got_v} ({source})",
        )


def batch_from_rows(rows: Iterable[Mapping[str, Any]], schema: pa.Schema) -> pa.Table:
    """Arrow table of ``to_row()`` dicts under a record schema (what a ``map_batches`` stage returns)."""
    rows = list(rows)
    omit = _omit_when_null(schema)
    required = [name for name in schema.names if name not in omit]
    record = (schema.metadata or {}).get(_META_RECORD, b"record").decode()
    for index, row in enumerate(rows):
        missing = [name for name in required if name not in row]
        if missing:
            raise RecordError(record, missing[0], "is missing from the row dict", row_index=index)
    table = pa.Table.from_pylist(rows, schema=storage_schema(schema)).cast(schema)
    dropped = []
    for name in omit:
        nulls = table.column(name).null_count
        if nulls == table.num_rows:
            dropped.append(name)
        elif nulls:
            raise RecordError(
                record,
                name,
                f"is set on {table.num_rows - nulls} rows and null on {nulls}: set it on every row of a "
                "table or on none (TRL's DPO collator cannot batch nulls)",
            )
    return table.drop_columns(dropped) if dropped else table


def to_table(records: Sequence[R], cls: type[R] | None = None) -> pa.Table:
    """Arrow table of records of one type (``cls`` is needed only when ``records`` is empty)."""
    if cls is None:
        if not records:
            raise ValueError("to_table of an empty sequence needs cls= to know the schema")
        cls = type(records[0])
    wrong = next((r for r in records if type(r) is not cls), None)
    if wrong is not None:
        raise TypeError(f"to_table: expected only {cls.__name__} records, got a {type(wrong).__name__}")
    return batch_from_rows([r.to_row() for r in records], cls.SCHEMA)


def from_table(cls: type[R], table: pa.Table, source: str = "table") -> list[R]:
    """Records of type ``cls`` from an Arrow table (checks the record type and schema version first)."""
    check_schema(cls, table.schema, source)
    out = []
    for index, row in enumerate(table.to_pylist()):
        try:
            out.append(cls.from_row(row))
        except RecordError as exc:
            raise exc.located(source, index) from None
    return out


def write_parquet(records: Sequence[R], path: str | os.PathLike[str], cls: type[R] | None = None) -> Path:
    """Write records to one Parquet file (parent directories are created); returns the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(to_table(records, cls), out)
    return out


def read_parquet(cls: type[R], path: str | os.PathLike[str]) -> list[R]:
    """Read records of type ``cls`` from a Parquet file or a directory of Parquet files (e.g. Ray's)."""
    return from_table(cls, pq.read_table(path), source=str(path))


# ----------------------------------------------------------------------------------- Ray batches


def _structs(table: pa.Table | None, schema: pa.Schema, n: int) -> pa.Array | pa.ChunkedArray:
    """A table's rows as one struct column of ``schema``'s storage types (a column the table lacks,
    as those TRL's tables omit when null, is null), or ``n`` nulls."""
    storage = storage_schema(schema)
    if table is None or not n:
        return pa.nulls(n, pa.struct(list(storage)))
    names = table.column_names
    columns = [table.column(f.name).cast(f.type) if f.name in names else pa.nulls(n, f.type) for f in storage]
    return pa.table(columns, schema=storage).to_struct_array()


def pack(
    tables: Mapping[str, pa.Table], schemas: Mapping[str, pa.Schema], key: str | None = None
) -> pa.Table:
    """Rows of several kinds as one table, so that they travel as one Ray dataset: a struct column
    per kind of ``schemas`` holding that kind's rows (null in the others' rows), and the ``key``
    column of every table when one is named."""
    parts = []
    for kind, table in tables.items():
        n = table.num_rows
        columns = {key: table.column(key)} if key else {}
        columns |= {
            name: _structs(table if name == kind else None, schema, n) for name, schema in schemas.items()
        }
        parts.append(pa.table(columns))
    return pa.concat_tables(parts)


def unpack(table: pa.Table, kind: str, schema: pa.Schema) -> pa.Table:
    """The rows of one kind of a :func:`pack` table, with ``schema``'s types (extension types again)."""
    column = table.column(kind)
    rows = (
        pa.Table.from_struct_array(column.filter(column.is_valid())).cast(storage_schema(schema)).cast(schema)
    )
    # as to_table writes them: the columns TRL's tables omit when null, left out when null throughout
    return rows.drop_columns(
        [name for name in _omit_when_null(schema) if rows.column(name).null_count == len(rows)]
    )


def _plain(value: Any) -> Any:
    """numpy containers and scalars (as in Ray's numpy/pandas batches) -> plain Python values."""
    if isinstance(value, np.ndarray):
        return value.tolist() if value.dtype != object else [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):  # pyarrow map entries are (key, value) tuples: keep them so
        return tuple(_plain(v) for v in value)
    if type(value).__name__ == "NAType":  # pandas.NA, without importing pandas
        return None
    return value


def _plain_cell(value: Any) -> Any:
    value = _plain(value)
    # numpy and pandas batches spell a null scalar as NaN
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def rows_from_batch(batch: Any) -> list[dict[str, Any]]:
    """Row dicts of a Ray Data batch: a pyarrow Table/RecordBatch, a dict of numpy arrays, or a DataFrame.

    Numpy and pandas values become plain Python values and null scalars (NaN) become None, so the rows
    feed ``from_row`` directly whatever ``batch_format`` the stage asked for.
    """
    if isinstance(batch, pa.Table | pa.RecordBatch):
        return batch.to_pylist()
    if isinstance(batch, Mapping):
        columns = {name: list(col) if not isinstance(col, list) else col for name, col in batch.items()}
        lengths = {len(col) for col in columns.values()}
        if len(lengths) > 1:
            raise ValueError(f"batch columns have different lengths: {sorted(lengths)}")
        n = lengths.pop() if lengths else 0
        return [{name: _plain_cell(col[i]) for name, col in columns.items()} for i in range(n)]
    if hasattr(batch, "to_dict") and hasattr(batch, "columns"):  # pandas.DataFrame
        return [{str(k): _plain_cell(v) for k, v in rec.items()} for rec in batch.to_dict("records")]
    raise TypeError(
        f"unsupported batch type {type(batch).__name__}: expected a pyarrow Table, dict or DataFrame"
    )
